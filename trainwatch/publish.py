"""Turn Records into MLflow operations on the sink's thread: metrics, per-parameter tables, histogram parts,
and the rendered histogram-evolution image.

It accumulates arrays between flushes; it never touches tensors (records arrive as host numbers) nor MLflow
itself (a resumed run's earlier snapshots are read, on the sink thread, through the `RunStore` given to
`earlier_snapshots`).
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from trainwatch.diagnose import Diagnosis
from trainwatch.ops import FILMSTRIP_SNAPSHOTS, ArtifactOp, ImageOp, MetricsOp, Op, Render, TagsOp, npz_bytes, shown_modules
from trainwatch.ops import MAX_PANELS as MAX_PANELS  # the image's layout, kept beside what it trims
from trainwatch.probes.activations import STAT_COLUMNS, histogram_labels
from trainwatch.record import PendingRecord, Record
from trainwatch.sink import is_flush

if TYPE_CHECKING:
    from trainwatch.runs import RunStore

log = logging.getLogger(__name__)

PARAM_COLUMNS = ("grad_norm", "grad_max", "grad_nonfinite", "grad_zero_frac", "weight_norm", "update_norm", "numel")
ARTIFACT_ROOT = "trainwatch"
PARAM_TABLE, ACT_TABLE = "stats/params", "histograms/activations"  # folders under ARTIFACT_ROOT of numbered npz parts
TABLES = (PARAM_TABLE, ACT_TABLE)


def next_parts(existing: dict[str, list[str]]) -> dict[str, int]:
    """The first free part number of each table, given the artifact paths a run already holds in its folders."""
    out = {}
    for table, paths in existing.items():
        numbers = [int(m.group(1)) for p in paths if (m := re.search(r"part-(\d+)\.npz$", p))]
        out[table] = max(numbers, default=-1) + 1
    return out


HISTOGRAM_IMAGE_KEY = "trainwatch/activation_histograms"
CAM_IMAGE_KEY = "trainwatch/cam"
# Snapshots kept for the histogram-evolution image. Past this many, every other one is dropped and only every
# other later one is kept (evenly spaced still): a panel is about 420 pixels wide, and a run logging every step
# for days must not keep every histogram it ever made.
MAX_HISTORY = 1024


@dataclass
class HistogramHistory:
    """The histograms the evolution image shows: every `stride`-th of `records` records; past MAX_HISTORY every
    other one is dropped and the stride doubles, so they stay evenly spaced however long the run."""

    steps: list[int] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)  # [shown modules, bins] float32 per kept step
    stride: int = 1
    records: int = 0

    def add(self, step: int, counts: np.ndarray) -> None:
        if self.records % self.stride == 0:
            self.steps.append(step)
            self.counts.append(counts)
            if len(self.steps) > MAX_HISTORY:
                self.steps, self.counts, self.stride = self.steps[::2], self.counts[::2], 2 * self.stride
        self.records += 1


@dataclass
class EarlierSnapshots(HistogramHistory):
    """What a resumed run's earlier fit drew its images from, for them to go on from: its histogram history and
    each CAM method's last snapshots with the probes they were drawn over."""

    cam: dict[str, list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = field(default_factory=dict)
    cam_probes: tuple[np.ndarray, np.ndarray] | None = None  # inputs, targets


def earlier_snapshots(store: RunStore, before_step: int, act_names: Sequence[str]) -> EarlierSnapshots:
    """The run's activation histograms and CAM snapshots of the steps before `before_step` (a fit resumed at that
    step trains the later ones again)."""
    earlier = EarlierSnapshots()
    _read_histograms(earlier, store, before_step, act_names)
    _read_cam(earlier, store, before_step)
    return earlier


def _read_histograms(history: HistogramHistory, store: RunStore, before_step: int, act_names: Sequence[str]) -> None:
    """The activation table's rows before `before_step` into `history`, part by part (so memory stays bounded
    however long the run); of a step logged twice, by a fit and a later resumed one, the later part's row. A part
    of other modules, columns or bins (another model or trainwatch version) is left out."""
    shown, layout = shown_modules(len(act_names)), (list(act_names), list(STAT_COLUMNS), list(histogram_labels()))
    seen: set[int] = set()
    for path in sorted(p for p in store.files_in(f"{ARTIFACT_ROOT}/{ACT_TABLE}") if p.endswith(".npz")):
        part = np.load(io.BytesIO(store.read(path, "activation table part")))
        if tuple([str(x) for x in part[key]] for key in ("names", "columns", "bins")) != layout:
            continue
        for step, row in zip(part["step"].tolist(), part["values"], strict=True):
            if step >= before_step:
                continue
            counts = row[shown, len(STAT_COLUMNS) :].astype(np.float32)
            if step not in seen:
                seen.add(step)
                history.add(step, counts)
            elif step in history.steps:  # logged again by a resumed fit: its row replaces the kept one
                history.counts[history.steps.index(step)] = counts


_SNAPSHOT_NAME = re.compile(r"step-(\d+)\.npz$")


def _read_cam(earlier: EarlierSnapshots, store: RunStore, before_step: int) -> None:
    """Each CAM method's last snapshots before `before_step`, and the probes they were drawn over (none without
    them: the filmstrip draws maps over the probes)."""
    try:
        probes = np.load(io.BytesIO(store.read(f"{ARTIFACT_ROOT}/cam/probes.npz", "CAM probes")))
    except FileNotFoundError:
        return
    earlier.cam_probes = (probes["inputs"], probes["targets"].astype(np.int64))
    for folder in store.folders_in(f"{ARTIFACT_ROOT}/cam"):
        numbered = sorted((int(m.group(1)), p) for p in store.files_in(folder) if (m := _SNAPSHOT_NAME.search(p)))
        files = [p for step, p in numbered if step < before_step][-FILMSTRIP_SNAPSHOTS:]
        snapshots = [np.load(io.BytesIO(store.read(p, "CAM snapshot"))) for p in files]
        if snapshots:
            earlier.cam[folder.rsplit("/", 1)[-1]] = [
                (int(s["step"]), s["maps"], s["predicted"].astype(np.int64), s["confidence"]) for s in snapshots
            ]


@dataclass
class _Table:
    """Rows of one array family, one row per logged step, written as numbered npz parts."""

    name: str
    rows_per_part: int
    part: int = 0
    steps: list[int] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)

    def add(self, step: int, row: np.ndarray) -> bool:
        self.steps.append(step)
        self.rows.append(row)
        return len(self.rows) >= self.rows_per_part

    def take(self, **columns: np.ndarray) -> ArtifactOp | None:
        if not self.rows:
            return None
        data = npz_bytes(step=np.asarray(self.steps, dtype=np.int64), values=np.stack(self.rows), **columns)
        return ArtifactOp(f"{ARTIFACT_ROOT}/{self.name}/part-{self.part:05d}.npz", data)

    def next_part(self) -> None:
        self.part += 1
        self.steps, self.rows = [], []


class Publisher:
    """Callable for `MlflowSink(publish=...)`: PendingRecord / Record / Op / flush marker → list of ops."""

    def __init__(
        self,
        param_names: list[str],
        act_names: list[str],
        rows_per_part: int = 200,
        render_every: int = 10,
        render_interval_s: float = 30.0,
        diagnosis: Diagnosis | None = None,
        first_parts: dict[str, int] | None = None,
    ) -> None:
        """`first_parts`: the first part number of each table (`TABLES`), after those a resumed run already holds."""
        self.diagnosis = diagnosis
        self.final = False  # set by the callback before the flush at the end of fit: diagnosis.json is then final
        self.param_names, self.act_names = param_names, act_names
        first = first_parts or {}
        self.params = _Table(PARAM_TABLE, rows_per_part, first.get(PARAM_TABLE, 0))
        self.acts = _Table(ACT_TABLE, rows_per_part, first.get(ACT_TABLE, 0))
        # The evolution image is redrawn after `render_every` snapshots but at most every `render_interval_s`
        # (a matplotlib render takes ~0.5 s of the sink thread, which shares the GIL with training).
        self.render_every, self.render_interval_s = render_every, render_interval_s
        self._rendered_time = -float("inf")
        self._act_records = 0
        self._rendered_at = 0  # activation records covered by the last image
        self._histograms = HistogramHistory()  # the shown modules' counts, for the evolution image
        self._shown = shown_modules(len(act_names))
        self._drawn_step = -1  # last step of the history the last image showed
        self._cam_inputs: np.ndarray | None = None
        self._cam_targets: np.ndarray | None = None
        self._cam_history: dict[str, list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = {}
        self._cam_drawn: dict[str, tuple[float, int]] = {}  # per method: monotonic time and step of the last filmstrip
        # a resumed run's CAM snapshots and the probes they were drawn over, until this fit's probes arrive
        self._earlier_cam: tuple[dict[str, list], tuple[np.ndarray, np.ndarray]] | None = None
        self._read_earlier: tuple[Callable[[], EarlierSnapshots], int] | None = None

    def go_on_from_read(self, read: Callable[[], EarlierSnapshots], at_step: int) -> None:
        """`go_on_from(read())`, called on the sink thread before the first item: a long run's tables download there,
        not on the training thread. If `read` fails, the images begin afresh at `at_step`, with a warning."""
        self._read_earlier = (read, at_step)

    def _take_earlier(self) -> None:
        assert self._read_earlier is not None
        (read, at_step), self._read_earlier = self._read_earlier, None
        try:
            self.go_on_from(read())
        except Exception as error:  # noqa: BLE001 - only the images lose their start
            log.warning(
                "trainwatch: the earlier fit's snapshots could not be read (%s: %s); this fit's histogram image and CAM "
                "filmstrips begin at step %d.", type(error).__name__, error, at_step,
            )  # fmt: skip

    def go_on_from(self, earlier: EarlierSnapshots) -> None:
        """Begin the evolution image and the filmstrips with an earlier fit's snapshots (a resumed run), before
        any record of this fit. The filmstrips take them once this fit's probes arrive, if they are the same."""
        self._histograms = HistogramHistory(list(earlier.steps), list(earlier.counts), earlier.stride, earlier.records)
        self._earlier_cam = (earlier.cam, earlier.cam_probes) if earlier.cam and earlier.cam_probes is not None else None

    def __call__(self, item: object) -> list[Op]:
        if self._read_earlier is not None:
            self._take_earlier()
        if is_flush(item):
            return self._flush()
        if isinstance(item, PendingRecord):
            item = item.resolve()
        if not isinstance(item, Record):
            return [item]  # already an op
        return self._record_ops(item)

    def _record_ops(self, record: Record) -> list[Op]:
        ops: list[Op] = []
        if record.metrics:
            ops.append(MetricsOp(tuple((k, v, record.timestamp_ms, record.step) for k, v in sorted(record.metrics.items()))))
        if self.diagnosis is not None and (record.metrics or record.arrays):
            ops += self._diagnose(record)
        if "param_stats" in record.arrays and self.params.add(record.step, record.arrays["param_stats"]):
            ops += self._emit(self.params, full=True)
        if "activations" in record.arrays:
            ops += self._activation_ops(record)
        if "cam_inputs" in record.arrays:
            self._cam_inputs, self._cam_targets = record.arrays["cam_inputs"], record.arrays["cam_targets"].astype(np.int64)
            if self._earlier_cam is not None:
                snapshots, (inputs, targets) = self._earlier_cam
                if np.array_equal(inputs, self._cam_inputs) and np.array_equal(targets, self._cam_targets):
                    self._cam_history = {method: list(snaps) for method, snaps in snapshots.items()}
                self._earlier_cam = None
            ops.append(ArtifactOp(f"{ARTIFACT_ROOT}/cam/probes.npz", npz_bytes(inputs=self._cam_inputs, targets=self._cam_targets)))
        methods = [name.split("/", 1)[1] for name in record.arrays if name.startswith("cam/")]
        for method in methods:
            ops += self._cam_ops(record, method)
        return ops

    def _diagnose(self, record: Record) -> list[Op]:
        """Run the rules on this record; new findings are warned about once and saved with the run's tags."""
        assert self.diagnosis is not None
        fresh = self.diagnosis.observe(record.step, record.metrics, record.arrays)
        counts = {k: v for k, v in self.diagnosis.counts().items() if v or k == "train/findings_total"}
        ops: list[Op] = [MetricsOp(tuple((k, v, record.timestamp_ms, record.step) for k, v in sorted(counts.items())))]
        for finding in fresh:
            log.warning(
                "trainwatch: %s %s at %s from step %d (%s). %s",
                finding.severity,
                finding.kind,
                finding.group,
                finding.first_step,
                ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in finding.evidence.items()),
                finding.advice,
            )
        return ops + self._diagnosis_ops(final=False) if fresh else ops

    def _diagnosis_ops(self, final: bool) -> list[Op]:
        assert self.diagnosis is not None
        report = self.diagnosis.to_json(final)
        kinds = sorted({f["kind"] for f in report["findings"]})  # type: ignore[index, union-attr]
        return [
            ArtifactOp(f"{ARTIFACT_ROOT}/diagnosis.json", json.dumps(report, indent=1, default=str).encode()),
            TagsOp((("trainwatch.health", str(report["health"])), ("trainwatch.findings", ",".join(kinds) or "none"))),
        ]

    def _cam_ops(self, record: Record, method: str) -> list[Op]:
        """Raw maps of the snapshot as an artifact, and the filmstrip so far as an image at this step."""
        a = record.arrays
        maps, predicted, confidence = a[f"cam/{method}"], a["cam_predicted"].astype(np.int64), a["cam_confidence"]
        history = self._cam_history.setdefault(method, [])
        history.append((record.step, maps, predicted, confidence))
        del history[:-FILMSTRIP_SNAPSHOTS]
        data = npz_bytes(
            step=np.int64(record.step), maps=maps, raw_max=a[f"cam_raw_max/{method}"], predicted=predicted, confidence=confidence
        )
        ops: list[Op] = [ArtifactOp(f"{ARTIFACT_ROOT}/cam/{method}/step-{record.step:08d}.npz", data)]
        # The filmstrip (0.2-0.5 s of matplotlib per method on this thread, which shares the GIL with training) is
        # drawn at the first snapshot, then at most every `render_interval_s`, and at every flush (`_flush`).
        if time.monotonic() - self._cam_drawn.get(method, (-float("inf"), -1))[0] >= self.render_interval_s:
            ops += self._cam_image(method, record.timestamp_ms)
        return ops

    def _cam_image(self, method: str, timestamp_ms: int) -> list[Op]:
        history = self._cam_history[method]
        if self._cam_inputs is None or self._cam_targets is None:
            return []
        self._cam_drawn[method] = (time.monotonic(), history[-1][0])
        figure = Render(
            "cam_filmstrip", {"method": method, "inputs": self._cam_inputs, "targets": self._cam_targets, "snapshots": list(history)}
        )
        return [ImageOp(f"{CAM_IMAGE_KEY}/{method}", history[-1][0], timestamp_ms, figure)]

    def _activation_ops(self, record: Record) -> list[Op]:
        ops: list[Op] = []
        summaries = record.arrays["activations"]
        self._histograms.add(record.step, summaries[self._shown, len(STAT_COLUMNS) :].astype(np.float32))
        self._act_records += 1
        if self.acts.add(record.step, summaries):
            ops += self._emit(self.acts, full=True)
        due = self._act_records - self._rendered_at >= self.render_every
        if self._act_records == 1 or (due and time.monotonic() - self._rendered_time >= self.render_interval_s):
            ops.append(self._image(record.step, record.timestamp_ms))
        return ops

    def _image(self, step: int, timestamp_ms: int) -> ImageOp:
        self._rendered_at, self._rendered_time = self._act_records, time.monotonic()
        self._drawn_step = self._histograms.steps[-1]
        figure = Render(
            "histogram_evolution",
            {
                "steps": list(self._histograms.steps),
                "counts": np.stack(self._histograms.counts),
                "names": [self.act_names[i] for i in self._shown],
                "labels": histogram_labels(),
            },
        )
        return ImageOp(HISTOGRAM_IMAGE_KEY, step, timestamp_ms, figure)

    def _emit(self, table: _Table, full: bool) -> list[Op]:
        if table is self.params:
            op = table.take(names=np.asarray(self.param_names), columns=np.asarray(PARAM_COLUMNS))
        else:
            op = table.take(names=np.asarray(self.act_names), columns=np.asarray(STAT_COLUMNS), bins=np.asarray(histogram_labels()))
        if full:
            table.next_part()
        return [op] if op is not None else []

    def _flush(self) -> list[Op]:
        """At a flush the open parts are written (and rewritten at the next flush), and the image redrawn."""
        ops = self._emit(self.params, full=False) + self._emit(self.acts, full=False)
        if self.diagnosis is not None:
            ops += self._diagnosis_ops(final=self.final)
        if self._act_records > self._rendered_at and self._histograms.steps[-1] != self._drawn_step:
            ops.append(self._image(self._histograms.steps[-1], int(time.time() * 1000)))
        for method, history in self._cam_history.items():
            if history and self._cam_drawn.get(method, (0.0, -1))[1] != history[-1][0]:
                ops += self._cam_image(method, int(time.time() * 1000))
        return ops


def groups_artifact(plan_json: dict) -> ArtifactOp:
    return ArtifactOp(f"{ARTIFACT_ROOT}/groups.json", json.dumps(plan_json, indent=1).encode())
