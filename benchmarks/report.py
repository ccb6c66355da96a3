"""Size and load time of the run dashboard for a large run: 100k optimizer steps, 300 groups.

Builds the artifacts such a run leaves (per-parameter tables of 2,000 logged steps at the default cadence of 50,
300 parameter groups of 2 tensors each, activation histograms of 300 modules, 8 metric series of 100k points
each, 4 CAM methods x 40 snapshots x 8 probes) in a local SQLite MLflow store, then times
`report.collect` + `report.render` and the page's load in Debian's Chromium (Playwright), from navigation until
the page marks itself ready (every view's data decoded and the first view drawn).

Run: .venv/bin/python benchmarks/report.py [--steps 100000] [--groups 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric

from trainwatch.probes.activations import STAT_COLUMNS, histogram_labels
from trainwatch.publish import PARAM_COLUMNS
from trainwatch.report import collect, render
from trainwatch.runs import RunStore


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def build_run(uri: str, steps: int, groups: int, every: int = 50) -> str:
    """A run with the artifacts and metrics of `steps` training steps watched at cadence `every`."""
    rng = np.random.default_rng(0)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("report-bench")).info.run_id
    logged = np.arange(0, steps, every)
    names = [f"blocks.{g}.{t}" for g in range(groups) for t in ("weight", "bias")]
    groups_json = {
        "groups": [{"key": f"blocks.{g}", "param_modules": [f"blocks.{g}"], "activation_modules": [f"blocks.{g}"]} for g in range(groups)]
    }
    store = RunStore(run_id, uri)
    files: dict[str, bytes] = {"trainwatch/groups.json": json.dumps(groups_json).encode()}
    for part, chunk in enumerate(np.array_split(logged, max(1, len(logged) // 200))):
        values = np.abs(rng.normal(1, 0.3, (len(chunk), len(names), len(PARAM_COLUMNS))))
        files[f"trainwatch/stats/params/part-{part:05d}.npz"] = _npz(
            step=chunk, values=values, names=np.array(names), columns=np.array(PARAM_COLUMNS)
        )
        counts = rng.integers(0, 1000, (len(chunk), groups, len(histogram_labels()))).astype(np.float64)
        stats = np.abs(rng.normal(100, 10, (len(chunk), groups, len(STAT_COLUMNS))))
        acts = np.concatenate([stats, counts], axis=2)
        files[f"trainwatch/histograms/activations/part-{part:05d}.npz"] = _npz(
            step=chunk,
            values=acts,
            names=np.array([f"blocks.{g}" for g in range(groups)]),
            columns=np.array(STAT_COLUMNS),
            bins=np.array(histogram_labels()),
        )
    files["trainwatch/cam/probes.npz"] = _npz(inputs=rng.normal(size=(8, 3, 32, 32)), targets=np.arange(8))
    for method in ("grad_cam", "grad_cam_pp", "layer_cam", "saliency"):
        for snap in range(40):
            files[f"trainwatch/cam/{method}/step-{snap * 2500:08d}.npz"] = _npz(
                step=np.int64(snap * 2500),
                maps=rng.random((8, 32, 32)),
                raw_max=rng.random(8),
                predicted=np.arange(8),
                confidence=rng.random(8),
            )
    store.write(files)
    now = int(time.time() * 1000)
    for key in [f"train/metric_{i}" for i in range(6)] + ["train_loss", "val_loss"]:
        values = np.exp(-np.arange(steps) / steps) + rng.normal(0, 0.01, steps)
        batch = [Metric(key, float(v), now, int(s)) for s, v in zip(range(steps), values, strict=True)]
        for i in range(0, len(batch), 1000):
            client.log_batch(run_id, metrics=batch[i : i + 1000])
    return run_id


def load_time(page_path: Path, repeats: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        print("no chromium: load time skipped (apt-get install chromium)")
        return []
    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for _ in range(repeats):
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            t0 = time.perf_counter()
            page.goto(page_path.as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            times.append(time.perf_counter() - t0)
            page.close()
        browser.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--groups", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        t0 = time.perf_counter()
        run_id = build_run(uri, args.steps, args.groups)
        print(f"built a {args.steps}-step, {args.groups}-group run in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        payload = collect(RunStore(run_id, uri))
        collected = time.perf_counter() - t0
        t0 = time.perf_counter()
        page = render([payload])
        rendered = time.perf_counter() - t0
        path = Path(tmp) / "report.html"
        path.write_text(page, encoding="utf-8")
        print(f"collect {collected:.2f} s, render {rendered:.2f} s, page {len(page.encode()) / 1e6:.2f} MB")
        times = load_time(path, args.repeats)
        if times:
            print(f"load in Chromium until ready: median {statistics.median(times):.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    sys.exit(main())
