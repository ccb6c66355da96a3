"""TrainWatch against tracking servers that answer, but badly: HTTP 500 to everything, an artifact store that
cannot write, wrong credentials.

Real Lightning training (a tiny MLP on generated data) and real servers: a `http.server` thread on a loopback
port, and real `mlflow server` processes (see `tests/servers.py`), stopped in `finally` by their own process
group. Each case must end in a clear error at setup (a `MisconfigurationException` naming the URI and the fix,
before the first training step) or in warnings with nothing lost.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import pytorch_lightning as pl
from mlflow.tracking import MlflowClient
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from tests.models import Classifier, StepCounter, blobs, loaders, mlp, trainer
from tests.servers import MlflowServer, table_steps
from trainwatch import TrainWatch
from trainwatch.sink import HTTP_RETRIES, HTTP_TIMEOUT_S

pytestmark = pytest.mark.slow

TRAINWATCH = Path(sys.executable).with_name("trainwatch")
LAYERS = ("net.0", "net.3", "net.5")  # the Linear layers of `mlp()`
HTTP_SETTINGS = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


@pytest.fixture(autouse=True)
def trainwatch_http_defaults(monkeypatch):
    """No MLflow HTTP settings from outside, so trainwatch's own short ones apply (`use_short_http_timeouts`);
    whatever it sets in os.environ is removed again after the test."""
    for name in HTTP_SETTINGS:
        monkeypatch.setenv(name, "")  # records the original value (or its absence) for the undo
        monkeypatch.delenv(name)


def fit(watch: TrainWatch, *callbacks: pl.Callback, steps: int) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    t = trainer(max_steps=steps, callbacks=[watch, *callbacks])
    t.fit(Classifier(mlp()), *loaders(blobs()))
    return t


def stored_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def messages(record: pytest.WarningsRecorder, text: str) -> list[str]:
    return [str(w.message) for w in record if text in str(w.message)]


def spool_files(spool_dir: Path) -> list[str]:
    return sorted(p.name for p in spool_dir.rglob("*") if p.is_file())


# --- 1. a server that answers HTTP 500 to everything ------------------------------------------------------


class Always500(BaseHTTPRequestHandler):
    """Reads the request (so the client sees the answer, not a reset) and answers 500, MLflow-style."""

    def _fail(self) -> None:
        self.server.requests += 1  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = b'{"error_code": "INTERNAL_ERROR", "message": "broken on purpose"}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _fail

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server_500() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Always500)
    server.requests = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, name="always-500", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def refusing_store(tmp_path) -> Iterator[RefusingStore]:
    """A real server whose artifact destination is a regular file (running as root, permissions would not stop the
    server): the tracking API works, every artifact upload fails with a 500, until `store_again()`."""
    store = RefusingStore(MlflowServer(tmp_path / "server"))
    store.destination.write_text("a file where the artifact directory should be\n")
    try:
        store.server.start()
        yield store
    finally:
        store.server.stop()


class RefusingStore:
    def __init__(self, server: MlflowServer) -> None:
        self.server, self.destination = server, server.root / "artifacts"

    def store_again(self) -> None:
        """The destination fixed (a directory now) and the server restarted."""
        self.destination.unlink()
        self.destination.mkdir()
        self.server.restart()


def test_server_answering_500_to_everything_fails_at_setup_after_a_bounded_number_of_requests(server_500, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{server_500.server_address[1]}"
    counter = StepCounter()
    watch = TrainWatch(every_n_steps=1, tracking_uri=uri, system_metrics=False, spool_dir=str(tmp_path / "spool"))
    started = time.monotonic()
    with pytest.raises(MisconfigurationException) as info:
        fit(watch, counter, steps=5)
    elapsed = time.monotonic() - started

    message = str(info.value)
    print(f"500 server: setup failed after {elapsed:.1f} s and {server_500.requests} requests: {message}")
    assert repr(uri) in message
    assert "500" in message  # what the server said
    assert "TrainWatch(tracking_uri=...)" in message and "start the server" in message.lower()  # the fix
    assert counter.batches == 0
    assert server_500.requests >= 1
    # trainwatch's short HTTP setup bounded it: 1 request + HTTP_RETRIES retries, HTTP_TIMEOUT_S s each at most
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_RETRIES
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == HTTP_TIMEOUT_S
    assert server_500.requests <= 1 + int(HTTP_RETRIES)
    assert not (tmp_path / "spool").exists()


# --- 2. an artifact store that refuses writes -------------------------------------------------------------


def test_a_fit_resumed_while_the_artifact_store_refuses_keeps_both_fits_tables_apart(refusing_store, tmp_path, monkeypatch, caplog):
    """Fit 1's artifacts wait in its spool (the store refuses them) when fit 2 resumes into the run, and the store
    still refuses them: they move to a spool of their own, without the run's end status (fit 2 ends the run), and
    fit 2 numbers its table parts after the ones waiting there. Once the store works, `trainwatch sync` of both
    spools delivers both fits' parts, none overwriting another, and the run ends as fit 2 did."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="trainwatch")
    server = refusing_store.server
    kwargs = dict(
        every_n_steps=2, tracking_uri=server.url, experiment_name="resume-refused", system_metrics=False, landscape_samples=0,
        report=False, spool_dir=str(tmp_path / "spool"),
    )  # fmt: skip
    first = TrainWatch(**kwargs)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    pl.seed_everything(0, verbose=False)
    train, val = loaders(blobs())
    trainer(max_steps=6, callbacks=[first, saver], enable_checkpointing=True).fit(Classifier(mlp()), train, val)
    run_id = first.run_id
    (ckpt,) = (tmp_path / "ckpt").iterdir()
    again = TrainWatch(**kwargs)
    trainer(max_steps=8, callbacks=[again]).fit(Classifier(mlp()), train, val, ckpt_path=ckpt)
    assert again.run_id == run_id

    (aside,) = [d for d in (tmp_path / "spool").iterdir() if d.name.startswith(f"{run_id}-")]
    assert json.loads((aside / "run.json").read_text())["end_status"] is None
    assert json.loads((tmp_path / "spool" / run_id / "run.json").read_text())["end_status"] == "FINISHED"
    (said,) = [r.getMessage() for r in caplog.records if "could not be delivered" in r.getMessage()]
    assert f"trainwatch sync {aside}" in said

    refusing_store.store_again()
    for spool in (aside, tmp_path / "spool" / run_id):
        done = subprocess.run([str(TRAINWATCH), "sync", str(spool)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    client = MlflowClient(server.url)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert table_steps(client, run_id, "stats/params", tmp_path) == [[0, 2, 4], [4, 6]]  # fit 1's part, then fit 2's: neither overwritten


def test_artifact_store_refusing_writes_keeps_artifacts_in_the_spool_until_sync(refusing_store, tmp_path, monkeypatch, recwarn, caplog):
    """The destination of the server's artifacts is a regular file (running as root, permissions would not stop
    the server, `refusing_store`): the tracking API works, every artifact upload fails with a 500. Metrics, params and tags must
    arrive during training; artifacts and images wait in the spool (one warning while training, one at the end
    with the `trainwatch sync` hint) and `trainwatch sync` delivers them once the destination is fixed."""
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="trainwatch")
    server = refusing_store.server
    steps = 40
    watch = TrainWatch(
        every_n_steps=2, tracking_uri=server.url, experiment_name="no-artifacts", system_metrics=False, landscape_samples=0,
        report=False, spool_dir=str(tmp_path / "spool"),
    )  # fmt: skip
    t = fit(watch, steps=steps)

    assert t.state.finished and t.global_step == steps
    client = MlflowClient(server.url)
    run_id = watch.run_id
    assert run_id is not None
    for layer in LAYERS:  # metrics all arrived, during training, although no artifact did
        assert stored_steps(client, run_id, f"grad_norm/{layer}") == list(range(0, steps, 2))
    assert set(range(0, steps, 2)) <= set(stored_steps(client, run_id, "train_loss"))  # and at validation ends
    assert stored_steps(client, run_id, "val_loss")
    run = client.get_run(run_id)
    assert run.data.params["trainwatch.every_n_steps"] == "2"
    assert "trainwatch.version" in run.data.tags
    assert client.list_artifacts(run_id) == []
    assert run.info.status == "RUNNING"  # it ends when the rest is delivered

    # nothing lost: the artifacts and images wait in the spool, in order, with the run's final status
    (spool_dir,) = (tmp_path / "spool").iterdir()
    kept = [json.loads(line) for line in (spool_dir / "ops.jsonl").read_text().splitlines()]
    assert {entry["op"] for entry in kept} == {"artifact", "image"}
    latest = {entry["path"]: (spool_dir / entry["blob"]).read_bytes() for entry in kept if entry["op"] == "artifact"}
    assert {"trainwatch/groups.json", "trainwatch/model/architecture.json", "trainwatch/diagnosis.json"} <= set(latest)
    meta = json.loads((spool_dir / "run.json").read_text())
    ended = meta.pop("end_time_ms")  # when training ended: the run's end time once sync delivers the rest
    assert meta == {"tracking_uri": server.url, "run_id": run_id, "end_status": "FINISHED", "report": False}
    assert len(messages(recwarn, "answers but did not store")) == 1, messages(recwarn, "trainwatch")
    (closing,) = messages(recwarn, "Deliver them once its artifact store works")
    assert f"trainwatch sync {spool_dir}" in closing and f"did not store {len(kept)} artifacts/images" in closing
    assert messages(recwarn, "unreachable") == [] and messages(recwarn, "cannot write") == []  # not an outage
    assert f"trainwatch sync {spool_dir}" in caplog.text

    # sync while the store still refuses: an error, and the spool is left as it was
    refused = subprocess.run([str(TRAINWATCH), "sync", str(spool_dir)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "still refuses" in refused.stderr and f"trainwatch sync {spool_dir}" in refused.stderr
    assert "were delivered and left the spool" in refused.stderr and "Nothing was removed" not in refused.stderr
    assert len((spool_dir / "ops.jsonl").read_text().splitlines()) == len(kept)

    # the destination fixed (a directory now) and the server restarted: sync delivers everything once
    refusing_store.store_again()
    done = subprocess.run([str(TRAINWATCH), "sync", str(spool_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"delivered {len(kept)} spooled operations" in done.stdout
    client = MlflowClient(server.url)
    assert (client.get_run(run_id).info.status, client.get_run(run_id).info.end_time) == ("FINISHED", ended)
    for path, data in latest.items():  # the latest version of each file, where it was submitted twice
        assert Path(client.download_artifacts(run_id, path, str(tmp_path / "download"))).read_bytes() == data, path
    assert any(f.path == "images" for f in client.list_artifacts(run_id))
    assert not spool_dir.exists()  # delivered, blobs included: the spool is gone


# --- 3. wrong credentials on a basic-auth server ----------------------------------------------------------

ADMIN, PASSWORD = "admin", f"pw-{secrets.token_hex(12)}"
WRONG_PASSWORD = f"wrong-{secrets.token_hex(12)}"


class BasicAuthServer(MlflowServer):
    """`mlflow server --app-name basic-auth` with its user database and config in `root`; `admin` may write."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        config = self.root / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{self.root / 'basic_auth.db'}\n"
            f"admin_username = {ADMIN}\n"
            f"admin_password = {PASSWORD}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 600\n"  # one PBKDF2 check per credential, not one per request (seconds on a busy CPU)
        )
        self.env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}

    def command(self) -> list[str]:
        return [*super().command(), "--app-name", "basic-auth"]

    def start(self, timeout_s: float = 180.0) -> MlflowServer:
        with pytest.MonkeyPatch.context() as mp:  # the server's environment only, not this process's
            for name, value in self.env.items():
                mp.setenv(name, value)
            return super().start(timeout_s)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[BasicAuthServer]:
    pytest.importorskip(
        "flask_wtf",
        reason="`mlflow server --app-name basic-auth` needs Flask-WTF (MLflow's `auth` extra): pip install 'mlflow[auth]'",
    )
    server = BasicAuthServer(tmp_path_factory.mktemp("mlflow-auth"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "user, password",
    [
        pytest.param(ADMIN, WRONG_PASSWORD, id="wrong-password"),
        pytest.param("nobody", WRONG_PASSWORD, id="unknown-user"),
        pytest.param(None, None, id="no-credentials"),
    ],
)
def test_wrong_credentials_fail_at_setup_with_a_401(auth_server, user, password, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    counter = StepCounter()
    watch = TrainWatch(every_n_steps=1, tracking_uri=auth_server.url, system_metrics=False, spool_dir=str(tmp_path / "spool"))
    with pytest.raises(MisconfigurationException) as info:
        fit(watch, counter, steps=5)

    message = str(info.value)
    print(f"{user}: {message}")
    assert repr(auth_server.url) in message
    assert "401" in message and "UNAUTHENTICATED" in message
    assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message  # the fix
    assert "start the server" not in message.lower()  # it answered: starting one is not the fix
    assert WRONG_PASSWORD not in message and PASSWORD not in message
    assert counter.batches == 0
    assert not (tmp_path / "spool").exists()


def test_right_credentials_log_and_the_password_is_stored_nowhere(auth_server, tmp_path, monkeypatch, caplog, capsys, recwarn):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    caplog.set_level(logging.DEBUG)
    steps = 10
    watch = TrainWatch(
        every_n_steps=2, tracking_uri=auth_server.url, experiment_name="auth", system_metrics=False, spool_dir=str(tmp_path / "spool")
    )
    t = fit(watch, steps=steps)  # defaults otherwise: landscape data, checkpoint, dashboard: more artifacts to search

    assert t.state.finished and t.global_step == steps
    client = MlflowClient(auth_server.url)
    run_id = watch.run_id
    assert run_id is not None
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for layer in LAYERS:
        assert stored_steps(client, run_id, f"grad_norm/{layer}") == list(range(0, steps, 2))
    assert not (tmp_path / "spool").exists() or spool_files(tmp_path / "spool") == []

    secret_forms = [PASSWORD, base64.b64encode(f"{ADMIN}:{PASSWORD}".encode()).decode()]  # as typed, and as sent
    stored = [*run.data.params.items(), *run.data.tags.items()]
    assert stored and [(k, v) for k, v in stored if any(s in k or s in v for s in secret_forms)] == []
    files = [p for p in Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts"))).rglob("*") if p.is_file()]
    assert {"groups.json", "report.html", "last.ckpt"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        assert not any(s.encode() in data for s in secret_forms), f"the password is in the artifact {path}"
    captured = capsys.readouterr()
    output = "\n".join([caplog.text, captured.out, captured.err, *(str(w.message) for w in recwarn), auth_server.log_tail(10**7)])
    assert caplog.records  # the log was captured (at DEBUG, with MLflow's and urllib3's records)
    assert not any(s in output for s in secret_forms), "the password is in the log output"


def test_replay_keeps_refused_artifacts_in_order_and_delivers_the_rest(tmp_path):
    """The spool's side of case 2, with a plain deliver function: an artifact the store refuses stays, every
    artifact after it stays behind it (an older version must never overwrite a newer one), metrics go on; an
    outage after that keeps the kept ones first and the rest in order."""
    from trainwatch.ops import ArtifactOp, MetricsOp
    from trainwatch.sink import ArtifactStoreError, Spool

    def metrics(step: int) -> MetricsOp:
        return MetricsOp((("loss", float(step), 0, step),))

    spool = Spool(tmp_path / "spool")
    spool.append([ArtifactOp("a.json", b"v1"), metrics(0), ArtifactOp("a.json", b"v2"), metrics(1), metrics(2)])
    delivered: list[object] = []

    def store_refuses(op) -> None:
        if isinstance(op, ArtifactOp):
            raise ArtifactStoreError(f"artifact {op.path!r}")
        if op == metrics(2):
            raise ConnectionError("the server went away")
        delivered.append(op)

    with pytest.raises(ConnectionError):
        spool.replay(store_refuses)
    assert delivered == [metrics(0), metrics(1)]
    assert len(spool) == 3  # v1, v2 (kept, in order), then the undelivered metrics(2)

    delivered.clear()
    assert spool.replay(delivered.append) == 3
    assert delivered == [ArtifactOp("a.json", b"v1"), ArtifactOp("a.json", b"v2"), metrics(2)]
    assert spool_files(tmp_path / "spool") == []


# --- 4. an account that may read but not write ------------------------------------------------------------

READER, READER_PASSWORD = "reader", f"pw-{secrets.token_hex(12)}"


@pytest.fixture
def login(monkeypatch):
    """Log this process in as `user` (the environment variables MLflow's clients read); undone after the test."""

    def switch(user: str, password: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

    return switch


def _experiment_with_reader(server: BasicAuthServer, name: str) -> tuple[str, object]:
    """As admin: create the user `reader` (once) and an experiment; the reader gets the server's default, READ."""
    from mlflow.server import get_app_client

    auth = get_app_client("basic-auth", tracking_uri=server.url)
    try:
        auth.create_user(READER, READER_PASSWORD)
    except Exception as error:  # noqa: BLE001 - created by an earlier test of this module
        assert "already exists" in str(error).lower() or "RESOURCE_ALREADY_EXISTS" in str(error), error
    return MlflowClient(server.url).create_experiment(name), auth


def test_read_only_account_fails_at_setup_naming_the_account_and_the_fix(auth_server, tmp_path, monkeypatch, login):
    monkeypatch.chdir(tmp_path)
    login(ADMIN, PASSWORD)
    _experiment_with_reader(auth_server, "team-shared")
    login(READER, READER_PASSWORD)
    counter = StepCounter()
    watch = TrainWatch(
        every_n_steps=1,
        tracking_uri=auth_server.url,
        experiment_name="team-shared",
        system_metrics=False,
        spool_dir=str(tmp_path / "spool"),
    )
    with pytest.raises(MisconfigurationException) as info:
        fit(watch, counter, steps=5)

    message = str(info.value)
    print(message)
    assert "403" in message and "PERMISSION_DENIED" in message
    assert "'team-shared'" in message and repr(auth_server.url) in message and "'reader'" in message
    assert "EDIT permission" in message and "experiment_name=" in message  # the ways out
    assert READER_PASSWORD not in message
    assert counter.batches == 0 and not (tmp_path / "spool").exists()


class RevokeAt(pl.Callback):
    """At `step`, once what was logged so far is delivered, the admin takes the reader's EDIT permission on the
    experiment away (the server default, READ, is left)."""

    def __init__(self, step: int, watch: TrainWatch, revoke: object) -> None:
        self.step, self.watch, self.revoke, self.done = step, watch, revoke, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.done:
            self.done = True
            assert self.watch.sink is not None and self.watch.sink.flush(timeout=60)
            self.revoke()


def test_permission_revoked_mid_run_spools_with_one_warning_and_sync_delivers_once(auth_server, tmp_path, monkeypatch, login, recwarn):
    """Not an outage: the server answers 403. Training goes on, records wait in the spool (one warning naming the
    account), and once the permission is back `trainwatch sync` delivers every step exactly once."""
    monkeypatch.chdir(tmp_path)
    login(ADMIN, PASSWORD)
    experiment_id, auth = _experiment_with_reader(auth_server, "revoked")
    auth.grant_user_permission(READER, "experiment", experiment_id, "EDIT")
    admin_env = {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": PASSWORD}

    def revoke() -> None:  # the admin's request, from this process, without touching the reader's environment
        with pytest.MonkeyPatch.context() as mp:
            for k, v in admin_env.items():
                mp.setenv(k, v)
            auth.revoke_user_permission(READER, "experiment", experiment_id)

    login(READER, READER_PASSWORD)
    steps, revoked_at = 30, 6
    watch = TrainWatch(
        every_n_steps=2, tracking_uri=auth_server.url, experiment_name="revoked", system_metrics=False, landscape_samples=0,
        report=False, spool_dir=str(tmp_path / "spool"),
    )  # fmt: skip
    t = fit(watch, RevokeAt(revoked_at, watch, revoke), steps=steps)

    assert t.state.finished and t.global_step == steps
    run_id = watch.run_id
    refusals = messages(recwarn, "refused to store this run's records")
    assert len(refusals) == 1, messages(recwarn, "trainwatch")
    assert "403 PERMISSION_DENIED" in refusals[0] and "'reader'" in refusals[0] and READER_PASSWORD not in refusals[0]
    assert messages(recwarn, "cannot write to") == []  # not reported as an outage
    (spool_dir,) = (tmp_path / "spool").iterdir()
    (closing,) = messages(recwarn, "are kept in")
    assert f"trainwatch sync {spool_dir}" in closing
    client = MlflowClient(auth_server.url)
    before = stored_steps(client, run_id, "grad_norm/net.0")
    assert before == list(range(0, revoked_at, 2))  # what was delivered before the revocation, no more

    login(ADMIN, PASSWORD)
    auth.grant_user_permission(READER, "experiment", experiment_id, "EDIT")
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": READER, "MLFLOW_TRACKING_PASSWORD": READER_PASSWORD}
    done = subprocess.run([str(TRAINWATCH), "sync", str(spool_dir)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    for layer in LAYERS:
        assert stored_steps(client, run_id, f"grad_norm/{layer}") == list(range(0, steps, 2)), layer  # each step once
    assert client.get_run(run_id).info.status == "FINISHED"
