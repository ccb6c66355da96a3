"""TrainWatch against a real `mlflow server` that goes away: during training, for good, or before training.

Real Lightning training (a tiny MLP on generated data), a real server subprocess on a loopback port (see
`tests/servers.py`), killed and restarted by a callback at chosen steps. Checked: training completes and is not
held up, every logged value reaches the server exactly once, one warning per outage, the spool is delivered
(by the sink itself, or later by `trainwatch sync`), and an unreachable or malformed URI fails before training.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import pytorch_lightning as pl
import requests
from mlflow.tracking import MlflowClient
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from tests.models import Classifier, StepCounter, blobs, mlp, trainer
from tests.servers import MlflowServer, free_port, table_steps
from trainwatch import TrainWatch

pytestmark = pytest.mark.slow

TRAINWATCH = Path(sys.executable).with_name("trainwatch")
LAYERS = ("net.0", "net.3", "net.5")  # the Linear layers of `mlp()`


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (starting one takes ~10 s); tests that stop it leave it running again."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running


@pytest.fixture
def live_server(server, monkeypatch):
    if not server.healthy():
        server.start()
    # A dead server answers "connection refused" at once; no MLflow-level retries: the sink retries itself.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    return server


class TimedWatch(TrainWatch):
    """TrainWatch, timing what the training thread spends in its per-step hooks, summed per training batch
    (printed, not asserted), and knowing whether training is between its first and last batch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hook_s: dict[int, float] = collections.defaultdict(float)
        self._batch = -1
        self.training = False

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self.training = True

    def on_train_end(self, trainer, pl_module):
        self.training = False
        super().on_train_end(trainer, pl_module)

    @contextmanager
    def _clock(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.hook_s[self._batch] += time.perf_counter() - t

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch += 1
        with self._clock():
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_backward(self, trainer, pl_module, loss):
        with self._clock():
            super().on_before_backward(trainer, pl_module, loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with self._clock():
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with self._clock():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class Outage(pl.Callback):
    """Placed after TrainWatch: after optimizer step `stop_at` the server is killed; after step `start_at` it is
    started again (on the same port and store; this holds training for the seconds a start takes), and after
    step `wait_at` training waits until the sink has replayed its spool by itself (or `wait_s` passed)."""

    def __init__(self, server: MlflowServer, watch: TrainWatch, stop_at: int, start_at: int | None = None, wait_at: int | None = None):
        self.server, self.watch = server, watch
        self.stop_at, self.start_at, self.wait_at = stop_at, start_at, wait_at
        self.steps = 0
        self.recovered_during_training = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        if trainer.global_step == self.stop_at:
            self.server.stop()
        if trainer.global_step == self.start_at:
            self.server.start()
        if trainer.global_step == self.wait_at:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not self.recovered_during_training:
                sink = self.watch.sink
                self.recovered_during_training = sink is not None and sink.stats.replayed_ops > 0 and len(sink.spool) == 0
                time.sleep(0.1)


def fit(watch: TrainWatch, *callbacks: pl.Callback, steps: int) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    loader = DataLoader(blobs(n=256), batch_size=32, shuffle=True)
    t = trainer(max_steps=steps, callbacks=[watch, *callbacks])
    t.fit(Classifier(mlp()), loader)
    return t


def only_run(client: MlflowClient, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def stored_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """Every stored step of `key`, sorted: `== list(range(n))` means each step is there exactly once."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def messages(record: pytest.WarningsRecorder, text: str) -> list[str]:
    return [str(w.message) for w in record if text in str(w.message)]


def spool_files(spool_dir: Path) -> list[str]:
    return sorted(p.name for p in spool_dir.rglob("*") if p.is_file())


class HttpSpy:
    """Counts the HTTP requests MLflow's client makes through `requests`, and which of them the training thread
    made while `watch` was training. It calls through: every request still reaches the real server."""

    def __init__(self) -> None:
        self.watch: TimedWatch | None = None
        self.requests = 0
        self.from_training_thread: list[str] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        request = requests.Session.request

        def spy(session, method, url, *args, **kwargs):
            self.requests += 1
            if threading.current_thread() is threading.main_thread() and self.watch is not None and self.watch.training:
                self.from_training_thread.append(f"{method} {url}")
            return request(session, method, url, *args, **kwargs)

        monkeypatch.setattr(requests.Session, "request", spy)


@pytest.fixture
def http_spy(monkeypatch) -> HttpSpy:
    spy = HttpSpy()
    spy.install(monkeypatch)
    return spy


def test_server_down_mid_training_everything_arrives_once(live_server, tmp_path, recwarn, http_spy):
    steps = 60
    watch = TimedWatch(
        every_n_steps=1, tracking_uri=live_server.url, experiment_name="outage", system_metrics=False, activations="probe",
        activations_every_n_steps=1,
        spool_dir=str(tmp_path / "spool"),
    )  # fmt: skip
    http_spy.watch = watch
    outage = Outage(live_server, watch, stop_at=15, start_at=40, wait_at=50)
    t = fit(watch, outage, steps=steps)

    assert t.state.finished and t.global_step == steps and outage.steps == steps
    assert outage.recovered_during_training, "the sink did not replay its spool by itself after the server came back"
    client = MlflowClient(live_server.url)
    run = only_run(client, "outage")
    assert run.info.status == "FINISHED"
    for layer in LAYERS:
        assert stored_steps(client, run.info.run_id, f"grad_norm/{layer}") == list(range(steps))
        assert stored_steps(client, run.info.run_id, f"update_ratio/{layer}") == list(range(steps))
    assert stored_steps(client, run.info.run_id, "train_loss") == list(range(steps))
    assert len(messages(recwarn, "cannot write")) == 1, messages(recwarn, "trainwatch")
    assert messages(recwarn, "trainwatch sync") == []
    assert spool_files(tmp_path / "spool") == []  # delivered: no ops, no blobs, no run.json left behind
    slowest = max(watch.hook_s.values())
    print(f"slowest step in TrainWatch hooks: {slowest * 1000:.1f} ms (median {sorted(watch.hook_s.values())[steps // 2] * 1000:.1f} ms)")
    assert len(watch.hook_s) == steps
    # The sink's bound: the training thread never waits on MLflow. It made none of the requests during training
    # (the sink thread made them all, through the outage), and submit never waits for the sink thread
    # (test_sink.py::test_full_queue_never_blocks_submit_and_keeps_everything_in_order).
    assert http_spy.requests > 0
    assert http_spy.from_training_thread == []


def test_server_never_back_spool_is_kept_and_trainwatch_sync_delivers_it(live_server, tmp_path, recwarn):
    steps = 20
    watch = TrainWatch(
        every_n_steps=1, tracking_uri=live_server.url, experiment_name="never-back", system_metrics=False, activations="probe",
        activations_every_n_steps=1,
        spool_dir=str(tmp_path / "spool"),
    )  # fmt: skip
    t = fit(watch, Outage(live_server, watch, stop_at=1), steps=steps)

    assert t.state.finished and t.global_step == steps
    assert not live_server.healthy()
    (spool_dir,) = (tmp_path / "spool").iterdir()
    assert "ops.jsonl" in spool_files(spool_dir)
    meta = json.loads((spool_dir / "run.json").read_text())
    assert meta["tracking_uri"] == live_server.url and meta["end_status"] == "FINISHED"
    assert len(messages(recwarn, "cannot write")) == 1
    (closing,) = messages(recwarn, "trainwatch sync")
    assert f"trainwatch sync {spool_dir}" in closing

    live_server.start()
    done = subprocess.run([str(TRAINWATCH), "sync", str(spool_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "delivered" in done.stdout
    client = MlflowClient(live_server.url)
    run = client.get_run(meta["run_id"])
    assert run.info.status == "FINISHED"
    for layer in LAYERS:
        assert stored_steps(client, run.info.run_id, f"grad_norm/{layer}") == list(range(steps))
    assert stored_steps(client, run.info.run_id, "train_loss") == list(range(steps))
    assert run.data.params["trainwatch.every_n_steps"] == "1"
    assert "ops.jsonl" not in spool_files(spool_dir) and not any(n.startswith("blob-") for n in spool_files(spool_dir))


def test_a_resumed_fit_delivers_the_first_fits_spool_before_its_own(live_server, tmp_path, recwarn):
    """Fit 1 loses its server after step 1 and ends with its records, its table parts and its end status in the
    spool. The server comes back and fit 2 resumes from fit 1's step-3 checkpoint into the same run: the spool goes
    first, every step arrives (fit 1's, then fit 2's, each fit in its own table part), the run ends FINISHED and no
    spool is left."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    loader = DataLoader(blobs(n=256), batch_size=32, shuffle=True)
    kwargs = dict(
        every_n_steps=1, tracking_uri=live_server.url, experiment_name="resume-spool", system_metrics=False,
        spool_dir=str(tmp_path / "spool"), landscape_samples=0, report=False,
    )  # fmt: skip
    first = TrainWatch(**kwargs)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    pl.seed_everything(0)
    callbacks = [first, Outage(live_server, first, stop_at=1), saver]
    trainer(max_steps=4, callbacks=callbacks, enable_checkpointing=True).fit(Classifier(mlp()), loader)
    spool_dir = tmp_path / "spool" / first.run_id
    assert json.loads((spool_dir / "run.json").read_text())["end_status"] == "FINISHED"

    live_server.start()
    (ckpt,) = (tmp_path / "ckpt").iterdir()
    again = TrainWatch(**kwargs)
    trainer(max_steps=6, callbacks=[again]).fit(Classifier(mlp()), loader, ckpt_path=ckpt)
    client = MlflowClient(live_server.url)
    run = only_run(client, "resume-spool")
    assert run.info.run_id == again.run_id == first.run_id
    assert run.info.status == "FINISHED"
    assert stored_steps(client, run.info.run_id, "grad_norm/net.0") == [0, 1, 2, 3, 3, 4, 5]
    assert table_steps(client, run.info.run_id, "stats/params", tmp_path) == [[0, 1, 2, 3], [3, 4, 5]]
    assert not spool_dir.exists()
    assert messages(recwarn, "could not be delivered") == []


@pytest.mark.parametrize(
    "uri", [pytest.param(f"http://127.0.0.1:{free_port()}", id="closed-port"), pytest.param("htp:/nope", id="malformed")]
)
def test_unreachable_at_setup_fails_before_training(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    counter = StepCounter()
    watch = TrainWatch(every_n_steps=1, tracking_uri=uri, system_metrics=False, spool_dir=str(tmp_path / "spool"))
    with pytest.raises(MisconfigurationException) as info:
        fit(watch, counter, steps=5)
    message = str(info.value)
    assert repr(uri) in message
    assert "TrainWatch(tracking_uri=...)" in message and "start the server" in message.lower()
    assert counter.batches == 0
    assert not (tmp_path / "spool").exists()
