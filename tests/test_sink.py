"""MlflowSink, MlflowWriter and Spool against a real SQLite MLflow store (no mocks of MLflow).

What goes through: exactly once, in order, in log_batch calls of at most 1000 values; flush and close; a full
queue; a deliver function that raises (an outage) and the spool that replays it; artifacts and images through
the spool; ops MLflow refuses; a spool damaged by a crash; `sync`; a malformed tracking URI.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from trainwatch.ops import MAX_METRICS_PER_BATCH, ArtifactOp, ImageOp, MetricsOp, Op, ParamsOp, TagsOp, batched
from trainwatch.overflow import IN_MEMORY
from trainwatch.sink import MlflowSink, MlflowWriter, Spool, absolute_sqlite_uri, create_run, open_client, sync

T0 = 1_700_000_000_000  # fixed capture timestamps (ms), as the Packer fixes them at capture


def metrics(step: int, keys: tuple[str, ...] = ("a", "b")) -> MetricsOp:
    return MetricsOp(tuple((k, step + i / 10, T0 + step, step) for i, k in enumerate(keys)))


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """Every stored step of `key`, sorted: `== list(range(n))` means each step is there exactly once."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


class Link:
    """A deliver function in front of a real MlflowWriter. It records what it delivered, can be cut (it then
    raises ConnectionError, as a writer does while the server is gone) and can hold deliveries at a gate."""

    def __init__(self, writer: MlflowWriter) -> None:
        self.writer = writer
        self.up = True
        self.fail_at: int | None = None  # raise on this call (0-based), once
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls = 0
        self.delivered: list[Op] = []

    def __call__(self, op: Op) -> None:
        call, self.calls = self.calls, self.calls + 1
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        if not self.up or call == self.fail_at:
            raise ConnectionError("link down")
        self.writer(op)
        self.delivered.append(op)

    def steps(self, key: str = "a") -> list[int]:
        """Steps of `key` in the order they were delivered."""
        return [s for op in self.delivered if isinstance(op, MetricsOp) for k, _, _, s in op.values if k == key]

    def batch_sizes(self) -> list[int]:
        return [len(op.values) for op in self.delivered if isinstance(op, MetricsOp)]


@pytest.fixture
def run(store) -> tuple[MlflowClient, str]:
    client = open_client(store)
    return client, create_run(client, "sink-tests", None)


@pytest.fixture
def make_sink(run, tmp_path):
    """Build sinks on the test's run with a Link in front of the writer; every sink is closed at teardown."""
    client, run_id = run
    sinks: list[MlflowSink] = []

    def make(**kwargs) -> tuple[MlflowSink, Link]:
        link = Link(MlflowWriter(client, run_id))
        sink = MlflowSink(link, Spool(tmp_path / "spool"), **kwargs)
        sinks.append(sink)
        sink.start()
        return sink, link

    yield make
    for sink in sinks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sink.close(timeout=30)


def cannot_write(record: pytest.WarningsRecorder) -> list[str]:
    return [str(w.message) for w in record if "cannot write" in str(w.message)]


def kept_in_spool(record: pytest.WarningsRecorder) -> list[str]:
    return [str(w.message) for w in record if "trainwatch sync" in str(w.message)]


# --- delivery -------------------------------------------------------------------------------------------


def test_metrics_arrive_exactly_once(run, make_sink):
    client, run_id = run
    sink, _ = make_sink()
    for step in range(50):
        sink.submit(metrics(step))
    assert sink.flush(timeout=60)
    assert steps_of(client, run_id, "a") == list(range(50))
    assert steps_of(client, run_id, "b") == list(range(50))
    assert {m.step: m.value for m in client.get_metric_history(run_id, "b")} == {s: s + 0.1 for s in range(50)}
    assert {m.timestamp for m in client.get_metric_history(run_id, "a")} == {T0 + s for s in range(50)}
    assert sink.stats.spooled_ops == 0 and sink.stats.failures == 0
    assert len(sink.spool) == 0


def test_records_submitted_one_by_one_are_written_together_without_a_flush(run, make_sink):
    """Records that trickle in (one per logged step, the sink keeping up) wait up to `deliver_every_s` and go out
    in one log_batch, not one call each; they still arrive without any flush."""
    client, run_id = run
    sink, link = make_sink(deliver_every_s=5.0)
    for step in range(20):
        sink.submit(metrics(step))
        time.sleep(0.05)  # the worker is idle between records (one record takes ~10 ms to write)
    deadline = time.monotonic() + 30
    while len(steps_of(client, run_id, "a")) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert steps_of(client, run_id, "a") == list(range(20))  # delivered by the worker's own timer
    assert link.calls <= 2 and sum(link.batch_sizes()) == 40  # written together, not one call per record


def test_a_full_batch_is_written_without_waiting_for_the_timer(run, make_sink):
    client, run_id = run
    sink, link = make_sink(deliver_every_s=3600)
    keys = tuple(f"k{i}" for i in range(100))
    for step in range(10):  # 10 x 100 values: one full log_batch
        sink.submit(metrics(step, keys))
    deadline = time.monotonic() + 30
    while len(steps_of(client, run_id, "k0")) < 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert steps_of(client, run_id, "k0") == list(range(10)) and link.batch_sizes() == [MAX_METRICS_PER_BATCH]


def test_batched_merges_metrics_into_batches_of_at_most_1000_in_order():
    big = MetricsOp(tuple((f"k{i}", float(i), T0, 0) for i in range(1500)))
    art = ArtifactOp("x.bin", b"x")
    out = batched([metrics(0), metrics(1), art, big, metrics(2)])
    assert [type(op).__name__ for op in out] == ["MetricsOp", "ArtifactOp", "MetricsOp", "MetricsOp"]
    assert [len(op.values) for op in out if isinstance(op, MetricsOp)] == [4, MAX_METRICS_PER_BATCH, 502]
    flat = [v for op in out if isinstance(op, MetricsOp) for v in op.values]
    assert flat == [*metrics(0).values, *metrics(1).values, *big.values, *metrics(2).values]


def test_more_than_1000_metrics_are_split_into_several_log_batch_calls(run, make_sink):
    client, run_id = run
    sink, link = make_sink()
    keys = tuple(f"layer{i:03d}" for i in range(250))
    for step in range(10):  # 2500 values
        sink.submit(metrics(step, keys))
    assert sink.flush(timeout=60)
    sizes = link.batch_sizes()
    assert sum(sizes) == 2500
    assert max(sizes) <= MAX_METRICS_PER_BATCH
    assert len(sizes) >= 3
    for key in ("layer000", "layer123", "layer249"):
        assert steps_of(client, run_id, key) == list(range(10))


def test_flush_delivers_everything_and_close_is_idempotent(run, make_sink, recwarn):
    client, run_id = run
    sink, _ = make_sink()
    sink.submit(TagsOp((("t", "v"),)))
    sink.submit(ParamsOp((("p", "1"),)))
    sink.submit(ArtifactOp("dir/a.txt", b"hello"))
    for step in range(5):
        sink.submit(metrics(step))
    assert sink.flush(timeout=60) is True
    data = client.get_run(run_id).data
    assert data.tags["t"] == "v" and data.params["p"] == "1"
    assert Path(client.download_artifacts(run_id, "dir/a.txt")).read_bytes() == b"hello"
    assert steps_of(client, run_id, "a") == list(range(5))
    assert sink.flush(timeout=60) is True  # nothing new: still True

    sink.close()
    assert sink._thread is not None and not sink._thread.is_alive()
    sink.close()
    sink.close(timeout=0)
    assert sink.flush(timeout=1) is True  # nothing left to wait for
    assert steps_of(client, run_id, "a") == list(range(5))
    assert not [w for w in recwarn if "trainwatch" in str(w.message)]


def test_close_warns_once_however_often_it_is_called(make_sink, recwarn):
    sink, link = make_sink(retry_after_s=3600)
    link.up = False
    sink.submit(metrics(0))
    assert sink.flush(timeout=30)
    sink.close()
    sink.close()
    assert len(kept_in_spool(recwarn)) == 1


def test_full_queue_never_blocks_submit_and_keeps_everything_in_order(run, make_sink, caplog):
    client, run_id = run
    sink, link = make_sink(queue_size=1)
    link.gate.clear()  # the worker blocks in its first delivery until the gate opens
    sink.submit(metrics(0))
    assert link.entered.wait(30)
    # The worker stays stuck in its first delivery while the training thread submits 1000 more: had submit waited
    # for the worker, this loop could not finish before the gate opens (the join is a deadlock guard, not a timing).
    submitter = threading.Thread(target=lambda: [sink.submit(metrics(step)) for step in range(1, 1001)])
    submitter.start()
    submitter.join(120)
    assert not submitter.is_alive(), "submit blocked while the worker was stuck in a delivery"
    assert not link.gate.is_set() and link.calls == 1  # the worker really was stuck the whole time
    assert sink.stats.overflowed >= 998  # the queue holds one item; the worker is stuck
    said = [r.getMessage() for r in caplog.records if "queue (1 records) is full" in r.getMessage()]
    assert len(said) == 1 and "none is dropped" in said[0] and "temporary file" in said[0]  # said once, when it happened
    # memory holds the newest parked records only: the spill thread moves the rest to disk while the worker is stuck
    deadline = time.monotonic() + 60  # a deadlock guard, not a timing: the spill thread runs every 50 ms
    while sink._overflow.in_memory() > IN_MEMORY and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink._overflow.in_memory() == IN_MEMORY and len(sink._overflow) == sink.stats.overflowed
    assert sink._overflow.spilled == sink.stats.overflowed - IN_MEMORY
    link.gate.set()
    assert sink.flush(timeout=120)
    assert steps_of(client, run_id, "a") == list(range(1001))
    assert link.steps("a") == list(range(1001)), "items overtook each other between the queue, the file and memory"
    assert sink.stats.spooled_ops == 0
    assert max(link.batch_sizes()) > 2  # the backlog is delivered in merged log_batch calls, not one call per record
    sink.close()
    said = [r.getMessage() for r in caplog.records if "overflowed" in r.getMessage()]
    assert said == [
        f"trainwatch: the sink queue overflowed {sink.stats.overflowed} times; those records waited behind it, "
        f"{sink._overflow.spilled} of them in a temporary file (at most {sink._overflow.most_on_disk} at once); none was dropped."
    ]
    # every record parked while the worker was stuck went through the file (the flush marker may push one more)
    assert sink._overflow.most_on_disk >= sink.stats.overflowed - IN_MEMORY and sink._overflow.spilled >= sink._overflow.most_on_disk


def test_a_backlog_the_server_has_not_taken_by_the_close_timeout_is_spooled_for_sync(run, make_sink, tmp_path, recwarn):
    """A server slower than training: close waits `timeout`, then the worker finishes the op it is sending and
    writes everything left to the spool, instead of going on in a thread the end of the process would kill."""
    client, run_id = run
    sink, link = make_sink(queue_size=4)
    Spool(tmp_path / "spool").write_meta(client._tracking_client.tracking_uri, run_id)  # as the callback does at setup
    link.gate.clear()
    sink.submit(metrics(0))
    assert link.entered.wait(30)  # the worker is in its first send, and stays there
    for step in range(1, 301):
        sink.submit(metrics(step))
    opener = threading.Thread(target=lambda: sink._spool_rest.wait(60) and link.gate.set())  # after close gave up
    opener.start()
    sink.close(timeout=0.2)
    opener.join(60)
    assert link.steps("a") == [0]  # the op in flight was delivered; nothing was sent after close gave up
    said = [str(w.message) for w in recwarn if "more slowly than training" in str(w.message)]
    assert len(said) == 1 and "had not taken 1 operations" in said[0] and f"trainwatch sync {tmp_path / 'spool'}" in said[0]
    assert steps_of(client, run_id, "a") == [0]
    assert sync(tmp_path / "spool") == 1  # one merged log_batch of the 300 records' 600 values
    assert steps_of(client, run_id, "a") == list(range(301))
    assert not (tmp_path / "spool").exists()


def test_flush_timeout_holds_when_the_queue_is_full(make_sink):
    sink, link = make_sink(queue_size=1)
    link.gate.clear()
    sink.submit(metrics(0))
    assert link.entered.wait(30)
    sink.submit(metrics(1))
    sink.submit(metrics(2))  # queue full, one parked
    result: list[bool] = []
    caller = threading.Thread(target=lambda: result.append(sink.flush(timeout=0.3)))
    caller.start()
    caller.join(60)  # a deadlock guard: the worker stays stuck, so only flush's own timeout can end the call
    assert not caller.is_alive(), "flush(timeout=0.3) blocked on the full queue"
    assert result == [False]
    assert not link.gate.is_set()
    link.gate.set()
    assert sink.flush(timeout=60)


# --- outages and the spool ------------------------------------------------------------------------------


def test_failing_deliver_spools_and_replay_delivers_in_order_exactly_once(run, make_sink, recwarn, tmp_path):
    client, run_id = run
    sink, link = make_sink(retry_after_s=3600)  # no retry during the test: only the explicit replay delivers
    link.up = False
    for step in range(20):
        sink.submit(metrics(step))
        assert sink.flush(timeout=30)  # one delivery attempt (and one spool append) per step
    assert len(cannot_write(recwarn)) == 1
    assert "link down" in cannot_write(recwarn)[0]
    assert client.get_metric_history(run_id, "a") == []
    assert sink.stats.delivered_ops == 0 and sink.stats.spooled_ops == len(Spool(tmp_path / "spool")) > 0
    sink.close()
    (warning,) = kept_in_spool(recwarn)
    assert f"trainwatch sync {tmp_path / 'spool'}" in warning

    writer = Link(MlflowWriter(client, run_id))
    assert Spool(tmp_path / "spool").replay(writer) == sink.stats.spooled_ops
    assert writer.steps("a") == list(range(20))
    assert steps_of(client, run_id, "a") == list(range(20))
    assert steps_of(client, run_id, "b") == list(range(20))
    assert not (tmp_path / "spool" / "ops.jsonl").exists()
    assert Spool(tmp_path / "spool").replay(writer) == 0  # a second replay delivers nothing again
    assert steps_of(client, run_id, "a") == list(range(20))


def test_replay_that_fails_midway_keeps_the_rest_for_the_next_replay(run, tmp_path):
    client, run_id = run
    spool = Spool(tmp_path / "spool")
    assert spool.append([metrics(step) for step in range(10)]) == 10
    link = Link(MlflowWriter(client, run_id))
    link.fail_at = 4
    with pytest.raises(ConnectionError):
        spool.replay(link)
    assert steps_of(client, run_id, "a") == [0, 1, 2, 3]
    assert len(spool) == 6
    assert spool.replay(link) == 6
    assert steps_of(client, run_id, "a") == list(range(10))
    assert link.steps("a") == list(range(10))
    assert len(spool) == 0


def test_sink_replays_by_itself_when_deliver_works_again(run, make_sink, recwarn):
    client, run_id = run
    sink, link = make_sink(retry_after_s=0.2)
    link.up = False
    for step in range(10):
        sink.submit(metrics(step))
    assert sink.flush(timeout=30)
    assert sink.stats.spooled_ops > 0 and sink._down_since is not None
    link.up = True
    time.sleep(0.3)  # past the retry time
    for step in range(10, 20):
        sink.submit(metrics(step))
    assert sink.flush(timeout=30)
    deadline = time.monotonic() + 10
    while sink._down_since is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert steps_of(client, run_id, "a") == list(range(20))
    assert link.steps("a") == list(range(20))
    assert len(sink.spool) == 0
    sink.close()
    assert len(cannot_write(recwarn)) == 1
    assert kept_in_spool(recwarn) == []
    assert not sink.spool.directory.exists()  # delivered: nothing left behind


def test_close_tries_once_more_before_leaving_a_spool(run, make_sink, recwarn):
    """The server came back before the retry timer ran out: close delivers now instead of leaving a spool."""
    client, run_id = run
    sink, link = make_sink(retry_after_s=3600)
    link.up = False
    for step in range(5):
        sink.submit(metrics(step))
    assert sink.flush(timeout=30)
    assert len(sink.spool) > 0
    link.up = True
    sink.close()
    assert steps_of(client, run_id, "a") == list(range(5))
    assert len(sink.spool) == 0 and not sink.spool.directory.exists()
    assert kept_in_spool(recwarn) == []


def test_artifacts_and_images_round_trip_through_the_spool(run, tmp_path):
    client, run_id = run
    rng = np.random.default_rng(0)
    images = {step: rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8) for step in (3, 4)}
    payload = rng.bytes(5000)
    spool = Spool(tmp_path / "spool")
    spool.append([ArtifactOp("trainwatch/blobs/data.bin", payload)])
    spool.append([ImageOp("trainwatch/img", step, T0 + step, image) for step, image in images.items()])
    assert len(list((tmp_path / "spool").glob("blob-*"))) == 3  # one blob per op, none overwritten

    fresh = Spool(tmp_path / "spool")  # as `trainwatch sync` reads it: another object, maybe another process
    assert fresh.replay(MlflowWriter(client, run_id)) == 3
    assert Path(client.download_artifacts(run_id, "trainwatch/blobs/data.bin")).read_bytes() == payload
    pngs = sorted(Path(client.download_artifacts(run_id, "images", str(tmp_path / "dl"))).glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        key, _, step, _, timestamp, _ = png.stem.split("+")
        assert key == "trainwatch~img" and int(timestamp) == T0 + int(step)
        np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), images[int(step)])
    assert list((tmp_path / "spool").glob("blob-*")) == []


def test_unreadable_spool_entries_are_skipped_not_blocking(run, tmp_path, caplog):
    """A crash can tear the last line or lose a blob: those entries are skipped, everything else delivered."""
    client, run_id = run
    spool = Spool(tmp_path / "spool")
    spool.append([metrics(0), ArtifactOp("lost.bin", b"gone"), metrics(1)])
    blob = json.loads(spool.index.read_text().splitlines()[1])["blob"]
    (spool.directory / blob).unlink()
    with spool.index.open("a") as f:
        f.write('{"op": "metrics", "values": [["a", 1.0, 17')  # torn by a crash mid-write
    spool.append([metrics(2), metrics(3)])
    assert spool.replay(MlflowWriter(client, run_id)) == 4
    assert steps_of(client, run_id, "a") == [0, 1, 2, 3]
    assert len(spool) == 0
    assert sum("cannot be read" in r.getMessage() for r in caplog.records) == 2


# --- ops MLflow refuses ---------------------------------------------------------------------------------


def test_refused_ops_are_dropped_without_taking_the_sink_down(run, make_sink, recwarn, caplog):
    """An invalid metric name or a changed param value is refused by a store that works: not an outage. The
    valid values of the same batch arrive, and so does everything after it, directly (no spool)."""
    client, run_id = run
    sink, link = make_sink(retry_after_s=3600)
    sink.submit(ParamsOp((("lr", "0.1"), ("batch", "32"))))
    assert sink.flush(timeout=30)
    sink.submit(ParamsOp((("lr", "0.2"), ("seed", "7"))))  # changing a param is refused; "seed" is fine
    for step in range(5):
        sink.submit(metrics(step, ("a", "acc@1", "b")))  # "@" is not allowed in a metric name
    sink.submit(ImageOp("bad key!", 0, T0, np.zeros((4, 4, 3), np.uint8)))  # MLflow refuses the key
    assert sink.flush(timeout=60)
    assert steps_of(client, run_id, "a") == list(range(5))
    assert steps_of(client, run_id, "b") == list(range(5))
    assert client.get_run(run_id).data.params == {"lr": "0.1", "batch": "32", "seed": "7"}
    assert cannot_write(recwarn) == [] and len(sink.spool) == 0 and sink.stats.failures == 0
    writer = link.writer
    assert writer.refused_keys == {"acc@1"}
    assert writer.refused == 3  # the param, the metric key (once: later batches skip it), the image
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("'acc@1'" in m for m in refusals) and any("'lr'" in m for m in refusals)


# --- sync and opening the store -------------------------------------------------------------------------


def test_sync_delivers_a_spool_ends_the_run_when_training_did_and_builds_its_dashboard(run, store, tmp_path, capsys):
    from trainwatch.cli import main as cli
    from trainwatch.report import REPORT_PATH

    client, run_id = run
    spool = Spool(tmp_path / "spool")
    ended = T0 + 60_000  # when training ended, long before the server came back
    spool.write_meta(store, run_id, "FINISHED", end_time_ms=ended, report=True)
    spool.append([metrics(step) for step in range(7)])
    assert sync(tmp_path / "spool") == 7
    assert steps_of(client, run_id, "a") == list(range(7))
    info = client.get_run(run_id).info
    assert (info.status, info.end_time) == ("FINISHED", ended)
    assert any(f.path == REPORT_PATH for f in client.list_artifacts(run_id, "trainwatch"))
    assert not (tmp_path / "spool").exists()  # delivered: nothing left to sync twice
    with pytest.raises(FileNotFoundError, match=r"no run\.json"):
        sync(tmp_path / "spool")
    assert cli(["sync", str(tmp_path / "spool")]) == 1
    err = capsys.readouterr().err
    assert "is not a trainwatch spool" in err and "run the command again" not in err


@pytest.mark.parametrize("uri", ["htp:/nope", "http//no-scheme"])
def test_malformed_tracking_uri_is_a_readable_error(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConnectionError) as info:
        open_client(uri)
    message = str(info.value)
    assert repr(uri) in message and "Check the URI" in message and "tracking_uri" in message


def test_relative_sqlite_uris_are_resolved_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_sqlite_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_sqlite_uri("sqlite:///runs/m.db?timeout=5") == f"sqlite:///{tmp_path}/runs/m.db?timeout=5"
    for unchanged in ("sqlite:////abs/m.db", "sqlite:///:memory:", "http://127.0.0.1:5000", "postgresql://u@h/db"):
        assert absolute_sqlite_uri(unchanged) == unchanged
