"""Publisher on its own: what it keeps between records is bounded however long the run, and figures are drawn
where they are delivered (a `Render` in the op), from exactly the data kept."""

from __future__ import annotations

import numpy as np
import pytest

from trainwatch import render
from trainwatch.ops import ImageOp, Render
from trainwatch.probes.activations import STAT_COLUMNS, histogram_labels
from trainwatch.publish import FILMSTRIP_SNAPSHOTS, MAX_HISTORY, MAX_PANELS, EarlierSnapshots, Publisher, shown_modules
from trainwatch.record import Record
from trainwatch.render import MAX_SNAPSHOTS
from trainwatch.sink import _FLUSH

BINS = len(histogram_labels())


def _activations(step: int, modules: int = 3) -> Record:
    counts = np.full((modules, BINS), float(step))  # each record's counts say which step they came from
    return Record(step, 0, arrays={"activations": np.concatenate([np.zeros((modules, len(STAT_COLUMNS))), counts], axis=1)})


def test_the_histogram_history_stays_bounded_and_evenly_spaced_over_a_long_run():
    publisher = Publisher([], ["a", "b", "c"], rows_per_part=10**9, render_every=10**9)
    n = 5 * MAX_HISTORY + 123  # e.g. a run that logs every step for a long time
    for step in range(n):
        publisher(_activations(step))
    images = [op for op in publisher(_FLUSH) if isinstance(op, ImageOp)]
    assert len(images) == 1 and isinstance(images[0].image, Render)  # drawn by the writer, not here
    figure = images[0].image.kwargs
    steps, counts = np.asarray(figure["steps"]), figure["counts"]
    assert MAX_HISTORY // 2 <= len(steps) <= MAX_HISTORY
    assert steps[0] == 0 and len(set(np.diff(steps))) == 1  # from the first step, evenly spaced
    assert n - 1 - steps[-1] < np.diff(steps)[0]  # up to the last kept stride
    assert counts.dtype == np.float32 and counts.shape == (len(steps), 3, BINS)
    np.testing.assert_array_equal(counts[:, 1, 5], steps)  # each kept row is that step's histogram
    assert images[0].pixels().shape[2] == 3  # and the figure draws


def test_only_the_snapshots_a_filmstrip_shows_are_kept():
    assert FILMSTRIP_SNAPSHOTS == MAX_SNAPSHOTS
    g = np.random.default_rng(0)
    publisher = Publisher([], [], render_interval_s=3600.0)
    publisher(Record(0, 0, arrays={"cam_inputs": g.random((2, 1, 8, 8)), "cam_targets": np.array([0.0, 1.0])}))
    for step in range(0, 300, 10):
        arrays = {"cam/grad_cam": g.random((2, 8, 8)), "cam_raw_max/grad_cam": np.ones(2)}
        publisher(Record(step, 0, arrays=arrays | {"cam_predicted": np.array([0.0, 1.0]), "cam_confidence": np.array([0.9, 0.8])}))
    assert [s for s, *_ in publisher._cam_history["grad_cam"]] == list(range(220, 300, 10))
    (image,) = [op for op in publisher(_FLUSH) if isinstance(op, ImageOp)]
    assert [s for s, *_ in image.image.kwargs["snapshots"]] == list(range(220, 300, 10))


def test_only_the_modules_the_image_shows_are_kept_and_it_shows_the_same_ones():
    """A model with many modules: the image shows 12, evenly chosen; the publisher keeps those 12 only, and the
    figure drawn from them equals the figure drawn from all the modules' counts."""
    assert MAX_PANELS == render.MAX_PANELS
    names = [f"m{i}" for i in range(30)]
    publisher = Publisher([], names, rows_per_part=10**9, render_every=10**9)
    g = np.random.default_rng(0)
    full = []
    for step in range(5):
        counts = g.integers(0, 100, size=(30, BINS)).astype(np.float64)
        full.append(counts)
        publisher(Record(step, 0, arrays={"activations": np.concatenate([np.zeros((30, len(STAT_COLUMNS))), counts], axis=1)}))
    (image,) = [op for op in publisher(_FLUSH) if isinstance(op, ImageOp)]
    shown = shown_modules(30)
    assert len(shown) == 12 and shown[0] == 0 and shown[-1] == 29
    assert image.image.kwargs["names"] == [names[i] for i in shown]
    assert image.image.kwargs["counts"].shape == (5, 12, BINS)
    everything = render.histogram_evolution(list(range(5)), np.stack(full), names, histogram_labels())
    np.testing.assert_array_equal(image.pixels(), everything)


def test_the_flush_draws_no_image_the_last_one_already_showed():
    """Past the decimation the last records may not enter the history: a flush then has nothing new to draw."""
    publisher = Publisher([], ["a"], rows_per_part=10**9, render_every=10**9)
    for step in range(MAX_HISTORY + 1):  # the last one halves the history and the stride becomes 2
        publisher(_activations(step, modules=1))
    assert publisher._histograms.stride == 2
    drawn = [op.step for op in publisher(_FLUSH) if isinstance(op, ImageOp)]
    publisher(_activations(MAX_HISTORY + 1, modules=1))  # an odd record: not kept at stride 2
    assert drawn == [MAX_HISTORY] and [op for op in publisher(_FLUSH) if isinstance(op, ImageOp)] == []
    publisher(_activations(MAX_HISTORY + 2, modules=1))
    assert [op.step for op in publisher(_FLUSH) if isinstance(op, ImageOp)] == [MAX_HISTORY + 2]


def _seeded_publisher(probes: np.ndarray, targets: np.ndarray, g: np.random.Generator) -> tuple[Publisher, EarlierSnapshots]:
    cam = lambda step: (step, g.random((2, 8, 8)), np.array([0, 1]), np.array([0.5, 0.5]))
    earlier = EarlierSnapshots(
        steps=[0, 4, 8], counts=[np.full((3, BINS), float(s), dtype=np.float32) for s in (0, 4, 8)], stride=2, records=6,
        cam={"grad_cam": [cam(s) for s in range(0, 12, 2)]}, cam_probes=(probes, targets),
    )  # fmt: skip
    publisher = Publisher([], ["a", "b", "c"], rows_per_part=10**9, render_every=10**9, render_interval_s=3600.0)
    publisher.go_on_from(earlier)
    return publisher, earlier


def _resumed_images(publisher: Publisher, probes: np.ndarray, g: np.random.Generator) -> tuple[dict, dict | None]:
    publisher(Record(12, 0, arrays={"cam_inputs": probes, "cam_targets": np.array([0.0, 1.0])}))
    for step in range(12, 17):
        arrays = {"cam/grad_cam": g.random((2, 8, 8)), "cam_raw_max/grad_cam": np.ones(2)}
        publisher(_activations(step))
        publisher(Record(step, 0, arrays=arrays | {"cam_predicted": np.array([0.0, 1.0]), "cam_confidence": np.array([0.9, 0.8])}))
    ops = [op for op in publisher(_FLUSH) if isinstance(op, ImageOp)]
    (histograms,) = [op.image.kwargs for op in ops if op.image.function == "histogram_evolution"]
    (filmstrip,) = [op.image.kwargs for op in ops if op.image.function == "cam_filmstrip"]
    return histograms, filmstrip


def test_a_resumed_fits_images_go_on_from_the_earlier_fits_snapshots():
    """Seeded with an earlier fit's 6 records thinned to every 2nd, the evolution image shows them and then this
    fit's records at the same stride, counted on from the earlier ones; the filmstrip shows the earlier fit's last
    snapshots, then this fit's, when this fit's probes are the earlier ones."""
    g = np.random.default_rng(0)
    probes = g.random((2, 1, 8, 8))
    publisher, _ = _seeded_publisher(probes, np.array([0, 1]), g)
    histograms, filmstrip = _resumed_images(publisher, probes.copy(), g)
    assert histograms["steps"] == [0, 4, 8, 12, 14, 16]
    np.testing.assert_array_equal(histograms["counts"][:, 0, 0], [0, 4, 8, 12, 14, 16])
    assert [s for s, *_ in filmstrip["snapshots"]] == [4, 6, 8, 10, 12, 13, 14, 15, 16][-FILMSTRIP_SNAPSHOTS:]

    odd = Publisher([], ["a", "b", "c"], rows_per_part=10**9, render_every=10**9)
    odd.go_on_from(EarlierSnapshots(steps=[0, 4], counts=[np.zeros((3, BINS), dtype=np.float32)] * 2, stride=2, records=3))
    for step in range(6, 11):
        odd(_activations(step))
    (image,) = [op for op in odd(_FLUSH) if isinstance(op, ImageOp)]
    assert image.image.kwargs["steps"] == [0, 4, 7, 9]  # records 3, 5 and 7 of the run: every 2nd still


def test_earlier_snapshots_are_read_at_the_first_item_and_a_failed_read_only_loses_them(caplog):
    """The callback hands the read to the publisher, which runs it on the sink thread with the first item."""
    reads: list[int] = []
    earlier = EarlierSnapshots(steps=[0, 2], counts=[np.zeros((3, BINS), dtype=np.float32)] * 2, stride=1, records=2)
    publisher = Publisher([], ["a", "b", "c"], rows_per_part=10**9, render_every=10**9)
    publisher.go_on_from_read(lambda: reads.append(1) or earlier, at_step=4)
    assert reads == [] and publisher._histograms.steps == []
    publisher(_activations(4))
    publisher(_activations(5))
    assert reads == [1] and publisher._histograms.steps == [0, 2, 4, 5]

    def unreachable() -> EarlierSnapshots:
        raise ConnectionError("server down")

    lost = Publisher([], ["a", "b", "c"], rows_per_part=10**9, render_every=10**9)
    lost.go_on_from_read(unreachable, at_step=4)
    lost(_activations(4))
    assert lost._histograms.steps == [4]
    assert (
        "snapshots could not be read (ConnectionError: server down); this fit's histogram image and CAM filmstrips begin at step 4"
        in caplog.text
    )


def test_a_resumed_fit_with_other_probes_starts_its_filmstrips_afresh():
    g = np.random.default_rng(1)
    publisher, _ = _seeded_publisher(g.random((2, 1, 8, 8)), np.array([0, 1]), g)
    _, filmstrip = _resumed_images(publisher, g.random((2, 1, 8, 8)), g)  # the maps were drawn over other images
    assert [s for s, *_ in filmstrip["snapshots"]] == [12, 13, 14, 15, 16]


def _table(client, run_id: str, tmp_path, part: int, steps: list[int], names: list[str], bins: int = BINS) -> None:
    from trainwatch.ops import npz_bytes

    values = np.zeros((len(steps), len(names), len(STAT_COLUMNS) + bins))
    values[:, :, len(STAT_COLUMNS)] = np.asarray(steps)[:, None] + part / 10  # first bin: the step (+ which part)
    labels = np.asarray([*histogram_labels(), "extra"][:bins])
    local = tmp_path / f"part-{part:05d}.npz"
    data = npz_bytes(step=np.asarray(steps), values=values, names=np.asarray(names), columns=np.asarray(STAT_COLUMNS), bins=labels)
    local.write_bytes(data)
    client.log_artifact(run_id, str(local), "trainwatch/histograms/activations")


def test_earlier_snapshots_are_the_runs_rows_and_cam_snapshots_before_the_resume_step(store, tmp_path):
    """Read from a real store: rows before the step only (a later part's row of a step logged twice wins), the shown
    modules' counts, parts of another layout left out; the last CAM snapshots before the step in step order (names
    of 9 digits too), other files ignored, and the probes they were drawn over."""
    from mlflow import MlflowClient

    from trainwatch.ops import npz_bytes
    from trainwatch.publish import earlier_snapshots
    from trainwatch.runs import RunStore

    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    names = [f"m{i}" for i in range(20)]
    _table(client, run_id, tmp_path, 0, [0, 2, 4], names)
    _table(client, run_id, tmp_path, 1, [5], names[:-1])  # another model's: left out
    _table(client, run_id, tmp_path, 2, [5], names, bins=BINS + 1)  # another version's bins: left out
    _table(client, run_id, tmp_path, 3, [4, 6, 8], names)  # an earlier resume logged 4 again; 8 is trained again
    cam = tmp_path / "cam"
    cam.mkdir()
    steps = [0, 3, 5, 99_999_999, 100_000_001]
    for step in steps:
        maps = np.full((2, 4, 4), float(step))
        (cam / f"step-{step:08d}.npz").write_bytes(
            npz_bytes(step=np.int64(step), maps=maps, raw_max=np.ones(2), predicted=np.array([1, 0]), confidence=np.ones(2))
        )
    (cam / "notes.npz").write_bytes(npz_bytes(x=np.zeros(1)))
    client.log_artifacts(run_id, str(cam), "trainwatch/cam/grad_cam")
    probes = tmp_path / "probes.npz"
    probes.write_bytes(npz_bytes(inputs=np.ones((2, 1, 4, 4)), targets=np.array([1.0, 0.0])))
    client.log_artifact(run_id, str(probes), "trainwatch/cam")

    earlier = earlier_snapshots(RunStore(run_id, store), 100_000_000, names)
    assert earlier.steps == [0, 2, 4, 6, 8] and earlier.stride == 1 and earlier.records == 5
    shown = shown_modules(len(names))
    assert all(c.shape == (len(shown), BINS) and c.dtype == np.float32 for c in earlier.counts)
    assert [c[0, 0] for c in earlier.counts] == pytest.approx([0.0, 2.0, 4.3, 6.3, 8.3])
    assert [s for s, *_ in earlier.cam["grad_cam"]] == [0, 3, 5, 99_999_999]
    assert earlier.cam["grad_cam"][-1][1][0, 0, 0] == 99_999_999.0
    assert earlier.cam_probes is not None and earlier.cam_probes[1].tolist() == [1, 0]
    assert earlier_snapshots(RunStore(run_id, store), 5, names).steps == [0, 2, 4]


def test_a_long_earlier_history_is_thinned_like_the_publishers_own(store, tmp_path):
    """Over twice the cap: every 4th row is kept as the rows are read, and this fit's records go on counting from
    the earlier ones (2101 of them), so the image stays evenly spaced across the resume."""
    from mlflow import MlflowClient

    from trainwatch.publish import earlier_snapshots
    from trainwatch.runs import RunStore

    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    n = 2 * MAX_HISTORY + 53
    _table(client, run_id, tmp_path, 0, list(range(n)), ["a", "b"])
    earlier = earlier_snapshots(RunStore(run_id, store), 10**9, ["a", "b"])
    assert earlier.stride == 4 and earlier.records == n and earlier.steps == list(range(0, n, 4))
    assert [c[0, 0] for c in earlier.counts] == earlier.steps
    publisher = Publisher([], ["a", "b"], rows_per_part=10**9, render_every=10**9)
    publisher.go_on_from(earlier)
    for step in range(n, n + 12):
        publisher(_activations(step, modules=2))
    (image,) = [op for op in publisher(_FLUSH) if isinstance(op, ImageOp)]
    assert image.image.kwargs["steps"][-4:] == [n - 1, n + 3, n + 7, n + 11]  # record n - 1 is kept: n + 3 next
