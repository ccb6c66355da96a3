"""The run dashboard: one self-contained HTML page per run (or two runs side by side), data and code inline.

`collect(store)` reads what a run holds (metric histories, the per-parameter tables, activation histograms, CAM
maps, landscapes, the diagnosis) into a compact, downsampled payload; `render(payloads)` puts it into the
template of `dashboards/` (read with importlib.resources). The payload is embedded as JSON that cannot close its
<script> element, and the page inserts every string with textContent: names from a run are never markup.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import resources

import numpy as np

from trainwatch._version import __version__
from trainwatch.probes.activations import STAT_COLUMNS
from trainwatch.publish import ACT_TABLE, ARTIFACT_ROOT, PARAM_TABLE

MAX_POINTS = 1000  # per series: min/max pairs of 500 buckets keep spikes visible
MAX_STEPS = 200  # columns of the gradient-flow and histogram heatmaps
MAX_HIST_MODULES, MAX_HIST_STEPS = 48, 120  # histogram heatmaps: 48 x 120 x 88 bins = 0.5 MB of uint8
MAX_CAM_SNAPSHOTS = 12
CAM_TILE = 80  # pixels; the page shows tiles at 2x
ARCHITECTURE = "trainwatch/model/architecture.json"
REPORT_PATH = "trainwatch/report.html"
_FAMILY_KEYS = re.compile(r"^(grad_norm|grad_max|grad_nonfinite|grad_zero_frac|weight_norm|update_ratio|weight_dist_init|act_\w+)/")


def downsample(steps: Sequence[int], values: Sequence[float], max_points: int = MAX_POINTS) -> tuple[list[int], list[float | None]]:
    """At most `max_points` points: the min and the max of each of max_points/2 step buckets, in step order, so
    spikes survive. Non-finite values become None."""
    s, v = np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    if len(s) > max_points:
        keep: list[int] = []
        for bucket in np.array_split(np.arange(len(s)), max_points // 2):
            finite = bucket[np.isfinite(v[bucket])]
            pick = [finite[np.argmin(v[finite])], finite[np.argmax(v[finite])]] if len(finite) else [bucket[0]]
            keep += sorted(set(int(i) for i in pick))
        s, v = s[keep], v[keep]
    return s.tolist(), [_short(x) for x in v.tolist()]


def _columns(n: int, limit: int = MAX_STEPS) -> np.ndarray:
    """Indices of at most `limit` evenly spread columns, the last one included."""
    return np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(int)) if n else np.zeros(0, dtype=int)


def _short(x: float) -> float | None:
    """4 significant digits (what a chart can show; half the bytes of a full float64), None if not finite."""
    return float(f"{x:.4g}") if math.isfinite(x) else None


def _json_list(a: np.ndarray) -> list:
    return [[_short(x) for x in row] for row in np.asarray(a, dtype=np.float64).tolist()]


def _parts(store: object, folder: str) -> list[dict[str, np.ndarray]]:
    paths = sorted(p for p in store.files_in(folder) if p.endswith(".npz"))  # type: ignore[attr-defined]
    return [dict(np.load(io.BytesIO(store.read(p, folder)))) for p in paths]  # type: ignore[attr-defined]


def _rows_by_step(parts: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Steps and value rows of a table's parts, sorted by step, one row per step: a fit resumed from an earlier
    checkpoint logs some steps again, and the later part (the resumed fit) wins."""
    steps = np.concatenate([p["step"] for p in parts])
    values = np.concatenate([p["values"] for p in parts])
    order = np.argsort(steps, kind="stable")  # stable: for one step, a later part's row stays after an earlier one's
    steps, values = steps[order], values[order]
    last = np.r_[steps[1:] != steps[:-1], True]
    return steps[last], values[last]


def _optional(store: object, path: str) -> bytes | None:
    try:
        return store.read(path, path)  # type: ignore[attr-defined]
    except FileNotFoundError:
        return None


# --- views ------------------------------------------------------------------------------------------------------
def _grad_flow(store: object, groups_json: dict | None) -> tuple[list[str], dict]:
    """Per-group gradient norm and update ratio over steps, pooled from the per-parameter tables."""
    tables = _parts(store, f"{ARTIFACT_ROOT}/{PARAM_TABLE}")
    if not tables or groups_json is None:
        return [], {}
    names = [str(n) for n in tables[0]["names"]]
    columns = [str(c) for c in tables[0]["columns"]]
    steps, values = _rows_by_step(tables)  # [S], [S, P, C]
    owner = {}
    for group in groups_json.get("groups", []):
        for module in group["param_modules"]:
            owner[module] = group["key"]
    keys = [g["key"] for g in groups_json.get("groups", []) if g["param_modules"]]
    index = np.array([keys.index(owner.get(n.rsplit(".", 1)[0] if "." in n else "", keys[0])) for n in names])
    col = {c: i for i, c in enumerate(columns)}
    pick = _columns(len(steps))
    pooled = lambda c: np.sqrt(np.stack([np.bincount(index, values[s, :, col[c]] ** 2, len(keys)) for s in pick], axis=1))
    grad, weight, update = pooled("grad_norm"), pooled("weight_norm"), pooled("update_norm")
    ratio = np.where(weight > 0, update / np.where(weight > 0, weight, 1), np.nan)
    return keys, {"steps": steps[pick].tolist(), "grad_norm": _json_list(grad), "update_ratio": _json_list(ratio)}


def _activations(store: object) -> dict:
    parts = _parts(store, f"{ARTIFACT_ROOT}/{ACT_TABLE}")
    if not parts:
        return {}
    steps, values = _rows_by_step(parts)  # [S], [S, M, C + B]
    pick, modules = _columns(len(steps), MAX_HIST_STEPS), _columns(values.shape[1], MAX_HIST_MODULES)
    values, c = values[pick][:, modules], {name: i for i, name in enumerate(STAT_COLUMNS)}
    counts = values[:, :, len(STAT_COLUMNS) :]
    scaled = np.log10(1 + counts) / max(np.log10(1 + counts.max()), 1e-12)
    ratio = lambda a, b: np.where(values[:, :, c[b]] > 0, values[:, :, c[a]] / np.maximum(values[:, :, c[b]], 1), np.nan).T
    return {
        "modules": [str(parts[0]["names"][m]) for m in modules],
        "steps": steps[pick].tolist(),
        "bins": [str(b) for b in parts[0]["bins"]],
        "shape": list(counts.shape),
        "hist_b64": base64.b64encode(np.round(255 * scaled).astype(np.uint8).tobytes()).decode(),
        "zero_frac": _json_list(ratio("zeros", "numel")),
        "dead_frac": _json_list(ratio("dead", "positions")),
        "saturated_frac": _json_list(ratio("saturated", "sat_numel")),
    }


def _jpeg(rgb: np.ndarray) -> str:
    """A small inline image: JPEG at 80 px is ~2 KB a tile, a 128 px PNG ~16 KB (hundreds of tiles per run)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _cam(store: object) -> dict:
    probes = _optional(store, "trainwatch/cam/probes.npz")
    folders = store.folders_in("trainwatch/cam") if probes else []  # type: ignore[attr-defined]
    if probes is None:
        return {}
    from trainwatch.render import cam_tiles

    data = np.load(io.BytesIO(probes))
    inputs, targets = data["inputs"], data["targets"]
    out = {
        "methods": [],
        "probes": {"targets": targets.tolist(), "images": [_jpeg(t) for t in cam_tiles(inputs, None, CAM_TILE)]},
        "snapshots": {},
    }
    for folder in sorted(folders):
        method = folder.rsplit("/", 1)[-1]
        files = sorted(p for p in store.files_in(folder) if p.endswith(".npz"))  # type: ignore[attr-defined]
        chosen = [files[i] for i in _columns(len(files), MAX_CAM_SNAPSHOTS)]
        snaps = []
        for path in chosen:
            snap = np.load(io.BytesIO(store.read(path, "CAM snapshot")))  # type: ignore[attr-defined]
            snaps.append(
                {
                    "step": int(snap["step"]),
                    "images": [_jpeg(t) for t in cam_tiles(inputs, snap["maps"], CAM_TILE)],
                    "predicted": snap["predicted"].tolist(),
                    "confidence": [float(x) for x in snap["confidence"]],
                    "raw_max": [float(x) for x in snap["raw_max"]],
                }
            )
        out["methods"].append(method)
        out["snapshots"][method] = snaps
    return out


def _landscapes(store: object) -> dict:
    out = {}
    for folder in store.folders_in("trainwatch/landscape"):  # type: ignore[attr-defined]
        raw = _optional(store, f"{folder}/surface.npz")
        if raw is None:
            continue
        s = np.load(io.BytesIO(raw))
        meta = json.loads(_optional(store, f"{folder}/meta.json") or b"{}")
        out[folder.rsplit("/", 1)[-1]] = {
            "alphas": s["alphas"].tolist(),
            "betas": s["betas"].tolist(),
            "loss": _json_list(s["loss"]),
            "curve": _json_list(s["curve_loss"][None])[0],
            "trajectory": s["trajectory"].tolist() if "trajectory" in s else None,
            "meta": meta,
        }
    return out


def collect(store: object) -> dict:
    """Everything the page shows for one run (a `runs.RunStore`), downsampled."""
    run = store.run  # type: ignore[attr-defined]
    client = store.client  # type: ignore[attr-defined]
    groups_json = json.loads(_optional(store, "trainwatch/groups.json") or b"null")
    diagnosis = json.loads(_optional(store, "trainwatch/diagnosis.json") or b"{}")
    series = {}
    for key in sorted(run.data.metrics):
        if _FAMILY_KEYS.match(key):
            continue  # per-group families are drawn from the per-parameter tables, not one request per key
        history = client.get_metric_history(run.info.run_id, key)
        steps, values = downsample([m.step for m in history], [m.value for m in history])
        series[key] = {"step": steps, "value": values}
    groups, grad_flow = _grad_flow(store, groups_json)
    metrics = run.data.metrics
    start, end = run.info.start_time, run.info.end_time
    experiment = client.get_experiment(run.info.experiment_id)
    return {
        "id": run.info.run_id,
        "name": run.info.run_name or run.info.run_id,
        "experiment": experiment.name if experiment else "",
        "status": run.info.status,
        "start": _iso(start),
        "end": _iso(end),
        "duration_s": (end - start) / 1000 if start and end else None,
        "params": dict(run.data.params),
        "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.log-model")},
        "health": diagnosis.get("health"),
        "findings": diagnosis.get("findings", []),
        "architecture": json.loads(_optional(store, ARCHITECTURE) or b"[]"),
        "timing": {k: metrics.get(f"train/{k}") for k in ("step_ms", "samples_per_s", "peak_memory_mb")},
        "series": series,
        "groups": groups,
        "grad_flow": grad_flow,
        "activations": _activations(store),
        "cam": _cam(store),
        "landscapes": _landscapes(store),
    }


def _iso(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds") if ms else ""


def render(runs: Sequence[dict]) -> str:
    """The page: the template with its CSS, JS and the payload inlined. The JSON cannot end its <script>
    element (every `<` is escaped as \\u003c), and the page inserts strings with textContent only."""
    root = resources.files("dashboards")
    template = (root / "report.html").read_text(encoding="utf-8")
    payload = {"version": __version__, "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": list(runs)}
    data = json.dumps(_json_safe(payload), separators=(",", ":"), allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e")
    page = template.replace("/*__CSS__*/", (root / "report.css").read_text(encoding="utf-8"))
    page = page.replace("/*__JS__*/", (root / "report.js").read_text(encoding="utf-8"))
    return page.replace("__DATA__", data)


def _json_safe(value: object) -> object:
    """NaN and ±Inf (a diverged run's losses, CAM confidences, a finding's evidence) become null: JSON has no such
    numbers, and the page draws null as a gap."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def build_report(run_ids: Sequence[str], tracking_uri: str | None = None, final_status: str | None = None) -> str:
    """The page for one run, or two runs side by side. `final_status`: the status the (first) run is about to end
    with, for a page built in the last moments of a run that the server still shows as RUNNING."""
    from trainwatch.runs import RunStore

    runs = [collect(RunStore(run_id, tracking_uri)) for run_id in run_ids]
    if final_status is not None and runs and runs[0]["status"] == "RUNNING":
        runs[0]["status"] = final_status
    return render(runs)
