"""ProcessWriter: MLflow's client in a child process, against a real SQLite MLflow store (no mocks of MLflow).

What it must keep from the in-thread MlflowWriter: the same stored data, refusals counted and logged in the
training process, outages raised as outages (a dead child included, and a new one started), and no MLflow
store code left in the training process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient
from PIL import Image

import trainwatch.render
from tests.servers import free_port
from trainwatch.ops import ArtifactOp, ImageOp, MetricsOp, ParamsOp, Render, TagsOp
from trainwatch.sink import MlflowSink, MlflowWriter, Spool, create_run, open_client, refused
from trainwatch.writer_process import ProcessWriter

T0 = 1_700_000_000_000


def metrics(step: int, keys: tuple[str, ...] = ("a", "b")) -> MetricsOp:
    return MetricsOp(tuple((k, step + i / 10, T0 + step, step) for i, k in enumerate(keys)))


def ops() -> list:
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    return [
        TagsOp((("t", "v"),)),
        ParamsOp((("lr", "0.1"),)),
        *[metrics(step) for step in range(20)],
        ArtifactOp("trainwatch/x/table.json", b'{"a": 1}'),
        ImageOp("acts", 3, T0 + 3, image),
    ]


def stored(client: MlflowClient, run_id: str) -> dict:
    """Everything a run holds that the ops above wrote, run id and times of writing left out."""
    run = client.get_run(run_id)
    history = {k: [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, k)] for k in ("a", "b")}
    table = Path(client.download_artifacts(run_id, "trainwatch/x/table.json")).read_bytes()
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    return {
        "params": run.data.params,
        "tags": tags,
        "history": history,
        "images": len(client.list_artifacts(run_id, "images")),
        "table": table,
    }


@pytest.fixture
def client(store) -> MlflowClient:
    return open_client(store)


@pytest.fixture
def writer(store, client):
    made: list[ProcessWriter] = []

    def make(run_id: str, uri: str = store) -> ProcessWriter:
        made.append(ProcessWriter(uri, run_id))
        return made[-1]

    yield make
    for w in made:
        w.close()


def test_the_child_stores_what_the_thread_writer_stores_and_the_parent_runs_no_store_code(client, writer, monkeypatch):
    in_thread, in_child = create_run(client, "w", "thread"), create_run(client, "w", "process")
    calls: list[str] = []
    log_batch = SqlAlchemyStore.log_batch  # a spy that calls through
    monkeypatch.setattr(SqlAlchemyStore, "log_batch", lambda self, *a, **k: calls.append("log_batch") or log_batch(self, *a, **k))
    for op in ops():
        MlflowWriter(client, in_thread)(op)
    assert len(calls) == 22  # the spy sees the in-thread writer's tags, params and 20 metric batches

    calls.clear()
    child = writer(in_child)
    for op in ops():
        child(op)
    assert calls == []  # all of the SQLAlchemy work ran in the child
    assert child.pid is not None and child.pid != os.getpid() and child.starts == 1

    assert stored(client, in_child) == stored(client, in_thread)
    assert [s for s, _, _ in stored(client, in_child)["history"]["a"]] == list(range(20))


def test_refusals_are_counted_and_logged_in_the_training_process(client, writer, caplog):
    run_id = create_run(client, "w", None)
    child = writer(run_id)
    child(ParamsOp((("lr", "0.1"),)))
    child(ParamsOp((("lr", "0.2"), ("seed", "7"))))  # a changed param is refused, "seed" is stored
    for step in range(3):
        child(metrics(step, ("a", "acc@1")))  # "@" is not allowed in a metric name
    child(ImageOp("bad key!", 0, T0, np.zeros((4, 4, 3), np.uint8)))
    assert child.refused == 3 and child.refused_keys == {"acc@1"}
    assert client.get_run(run_id).data.params == {"lr": "0.1", "seed": "7"}
    assert [m.step for m in client.get_metric_history(run_id, "a")] == [0, 1, 2]
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert {r.name for r in refusals} == {"trainwatch.sink"}
    assert any("'acc@1'" in r.getMessage() for r in refusals) and any("'lr'" in r.getMessage() for r in refusals)


def _histograms(seed: int) -> Render:
    rng = np.random.default_rng(seed)
    labels = [f"b{i}" for i in range(13)]
    counts = rng.integers(0, 50, size=(6, 3, len(labels))).astype(np.float32)
    return Render("histogram_evolution", {"steps": list(range(0, 60, 10)), "counts": counts, "names": ["a", "b", "c"], "labels": labels})


def test_figures_are_drawn_in_the_child_and_stored_as_drawn(client, writer, monkeypatch, tmp_path, caplog):
    """matplotlib runs in the child, not beside the training thread; a figure that cannot be drawn is dropped with
    an error (a refusal), not taken for an outage, and the ops after it are delivered."""
    run_id = create_run(client, "w", None)
    expected = _histograms(0)()  # drawn here, before the spy: what the child must store
    drawn: list[str] = []
    draw = trainwatch.render.figure_to_rgb  # a spy that calls through
    monkeypatch.setattr(trainwatch.render, "figure_to_rgb", lambda fig: drawn.append("here") or draw(fig))
    child = writer(run_id)
    child(ImageOp("trainwatch/activation_histograms", 50, T0 + 50, _histograms(0)))
    child(ImageOp("broken", 51, T0 + 51, Render("histogram_evolution", {"steps": [0]})))  # missing arguments
    child(metrics(52))
    assert drawn == [] and child.refused == 1
    assert any("'broken' at step 51 (drawing it failed)" in r.getMessage() for r in caplog.records)
    assert [m.step for m in client.get_metric_history(run_id, "a")] == [52]
    pngs = sorted(Path(client.download_artifacts(run_id, "images", str(tmp_path / "dl"))).glob("*.png"))
    stored = [png for png in pngs if "compressed" not in png.stem and png.stem.startswith("trainwatch~activation")]
    assert len(stored) == 1
    np.testing.assert_array_equal(np.asarray(Image.open(stored[0]).convert("RGB")), expected)


def test_a_figure_is_drawn_before_it_is_spooled_and_one_that_cannot_be_drawn_is_left_out(tmp_path, caplog):
    spool = Spool(tmp_path / "spool")
    broken = ImageOp("broken", 51, T0 + 51, Render("histogram_evolution", {"steps": [0]}))
    written = spool.append([metrics(49), ImageOp("trainwatch/activation_histograms", 50, T0 + 50, _histograms(1)), broken, metrics(52)])
    assert written == 3  # the ops after the broken figure are spooled too
    entries = [json.loads(line) for line in spool.index.read_text().splitlines()]
    assert [e["op"] for e in entries] == ["metrics", "image", "metrics"]
    kept = spool._decode(entries[1])
    assert isinstance(kept.image, np.ndarray)  # the spool holds pixels: `trainwatch sync` draws nothing
    np.testing.assert_array_equal(kept.image, _histograms(1)())
    assert any("'broken' at step 51 could not be drawn" in r.getMessage() for r in caplog.records)


def test_an_unreachable_server_is_an_outage_named_by_the_child(client, writer, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    port = free_port()
    child = writer("0" * 32, f"http://127.0.0.1:{port}")
    with pytest.raises(Exception) as info:
        child(metrics(0))
    assert not refused(info.value)  # the sink spools it and retries: an outage, not a refusal
    assert str(port) in str(info.value)
    assert child.pid is not None  # the child lives on: the failure was the server's


def test_a_killed_child_is_an_outage_and_a_new_one_delivers_everything_once(client, store, tmp_path, recwarn):
    run_id = create_run(client, "w", None)
    child = ProcessWriter(store, run_id)
    sink = MlflowSink(child, Spool(tmp_path / "spool"), retry_after_s=0.1, deliver_every_s=0.0)
    sink.start()
    for step in range(10):
        sink.submit(metrics(step))
    assert sink.flush(timeout=60)
    os.kill(child.pid, signal.SIGKILL)
    for step in range(10, 30):
        sink.submit(metrics(step))
    assert sink.flush(timeout=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sink.close(timeout=60)

    assert [m.step for m in client.get_metric_history(run_id, "a")] == list(range(30))
    down = [str(w.message) for w in recwarn if "cannot write" in str(w.message)]
    assert len(down) == 1 and "writer process stopped" in down[0] and "SIGKILL" not in down[0]
    assert child.starts == 2 and sink.stats.spooled_ops >= 1 and len(sink.spool) == 0
    assert child.pid is None  # close ended the child


def test_close_ends_the_child_and_is_idempotent(client, store):
    child = ProcessWriter(store, create_run(client, "w", None))
    child(metrics(0))
    pid = child.pid
    child.close()
    child.close()
    assert child.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie


def test_the_child_imports_mlflow_but_not_torch():
    """torch would add a second and about 180 MB to every writer process (the sink's overflow imported it once)."""
    code = "import sys, trainwatch.writer_process; print(sorted(m for m in ('torch', 'pytorch_lightning') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
