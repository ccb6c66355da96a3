"""The only MLflow writer: a bounded queue, one worker thread, batched writes, a disk spool when MLflow is down.

The training thread only calls `submit` (never blocks, never does I/O). The worker turns items into ops
(through `publish`), delivers them in `log_batch` calls and, while the server is unreachable, appends them to
a spool on disk that is replayed, in order and once, when the server answers again or by `trainwatch sync`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainwatch.ops import MAX_METRICS_PER_BATCH, ArtifactOp, ImageOp, MetricsOp, Op, ParamsOp, TagsOp, batched, npy_bytes, npy_load
from trainwatch.overflow import IN_MEMORY, Overflow

log = logging.getLogger(__name__)
_STOP = object()
# After close's timeout, the worker gets this long to finish the send it is in and spool what is left: a request
# to a server gives up after HTTP_TIMEOUT_S, tried 1 + HTTP_RETRIES times.
SPOOL_REST_WITHIN_S = 60.0
SPOOL_PART = 1000  # ops written to the spool at a time when the rest of a backlog goes there

# A request to a tracking server gives up after this many seconds and retries: MLflow's defaults (120 s,
# 7 retries, backoff 2) hold a writer for minutes on a dead server.
HTTP_TIMEOUT_S = "10"
HTTP_RETRIES = "2"


def use_short_http_timeouts() -> None:
    """Default MLflow's HTTP timeout/retries to short values unless the user has set them."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_RETRIES)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def without_password(uri: str) -> str:
    """`uri` with the password of its user part left out (`postgresql://me:secret@db/mlflow` → `postgresql://me@db/mlflow`),
    for what is stored beside a run (a checkpoint travels further than a secret should)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}" if parts.username else host))


def absolute_sqlite_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` → `sqlite:////<working dir>/mlflow.db`; other URIs unchanged.

    MLflow caches one store per URI string for the life of the process, so a relative SQLite URI keeps pointing
    at the directory where it was first used; resolved now, every client (and trainwatch's writer process) opens
    the same file whatever the working directory is later."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/") or uri == prefix + ":memory:":
        return uri
    path, sep, query = uri[len(prefix) :].partition("?")
    return f"{prefix}{Path(path).resolve()}{sep}{query}"


def open_client(tracking_uri: str) -> MlflowClient:
    """A client for `tracking_uri`, checked by one request so a bad URI fails now with a readable error.

    A malformed URI fails in MLflow's constructor already (unsupported scheme, a path MLflow reads as a file
    store): that is reported the same way."""
    if tracking_uri.startswith(("http://", "https://")):
        use_short_http_timeouts()
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as error:
        if denied(error):  # the server answered: pointing at the URI or at starting a server would be the wrong fix
            raise ConnectionError(
                f"trainwatch was refused by the MLflow tracking server at {tracking_uri!r} ({refusal(error)}). Check the "
                f"credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an "
                f"account of that server with write access."
            ) from error
        raise ConnectionError(
            f"trainwatch cannot reach the MLflow tracking store at {tracking_uri!r}: {type(error).__name__}: "
            f"{str(error)[:300]}. Check the URI ('http://host:port' for a server, 'sqlite:///path/mlflow.db' for a "
            f"local file), start the server (e.g. `mlflow server --host 127.0.0.1 --port 5000`), or point trainwatch at a "
            f"reachable store such as 'sqlite:///mlflow.db': `TrainWatch(tracking_uri=...)` in training, `--tracking-uri` "
            f"on the command line, or MLFLOW_TRACKING_URI."
        ) from error
    return client


def create_run(client: MlflowClient, experiment: str, run_name: str | None) -> str:
    """Create a run in `experiment` (created if missing) and return its id. Many jobs may start at once against
    one server: when another one created the experiment between our lookup and our create, use theirs.

    An account that may read the experiment but not write to it (a server with `--app-name basic-auth`) gets a
    PermissionError that names the account, the experiment and the ways out."""
    try:
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(experiment)
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS" or (found := client.get_experiment_by_name(experiment)) is None:
                    raise
                experiment_id = found.experiment_id
        return client.create_run(experiment_id, run_name=run_name).info.run_id
    except MlflowException as error:
        if not denied(error):
            raise
        raise PermissionError(
            f"trainwatch may not create a run in the experiment {experiment!r} at {tracking_uri_of(client)!r} ({refusal(error)}): "
            f"{account()} may not write to that experiment. Ask the server's admin for EDIT "
            f"permission on it, log in as an account that has it (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD), "
            f"or pass `TrainWatch(experiment_name=...)` a new experiment name: its creator may write to it."
        ) from error


def denied(error: BaseException) -> bool:
    """True if the tracking server answered that these credentials are unknown (401) or may not do this (403)."""
    return isinstance(error, MlflowException) and error.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED")


def refusal(error: MlflowException) -> str:
    """'HTTP 403 PERMISSION_DENIED: <the server's words>', for messages."""
    return f"HTTP {error.get_http_status_code()} {error.error_code}: {str(error)[:300]}"


def account() -> str:
    """Who this process is to the server, for messages (a user name is not a secret; the password is never shown)."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        return f"the account {user!r} (MLFLOW_TRACKING_USERNAME)"
    return "the token in MLFLOW_TRACKING_TOKEN" if os.environ.get("MLFLOW_TRACKING_TOKEN") else "this process (no credentials set)"


def end_run(client: MlflowClient, run_id: str, status: str, end_time_ms: int | None = None) -> None:
    """End a run with `status`, at `end_time_ms` (when training ended; default now)."""
    client.set_terminated(run_id, status=status, end_time=end_time_ms)


def tracking_uri_of(client: MlflowClient) -> str:
    return client._tracking_client.tracking_uri


def start_system_metrics(run_id: str, tracking_uri: str, interval_s: float, resume: bool = False) -> object | None:
    """MLflow's own system-metrics monitor (CPU, RAM, disk, network; GPU with nvidia-ml-py) on `run_id`,
    in its own thread; None if it cannot start (it then never affects training). `resume`: the run holds an earlier
    fit's system metrics, whose steps go on rather than start again at 0."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=resume, tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception as error:  # noqa: BLE001
        log.warning("trainwatch: MLflow's system-metrics monitor did not start (%s); system/ metrics are off.", error)
        return None


class SyncIncomplete(RuntimeError):
    """`sync` delivered part of a spool (possibly none of it) and left the rest in it; the message says what."""


def sync(spool_dir: str | Path) -> int:
    """Deliver a spool left by a run whose server was unreachable; returns the number of ops delivered.

    Delivered ops leave the spool as they go: a failure part-way (`SyncIncomplete`) keeps only the rest, and
    running `sync` again continues from there, so nothing is sent twice."""
    spool = Spool(Path(spool_dir))
    meta = spool.read_meta()
    client = open_client(meta["tracking_uri"])
    writer = MlflowWriter(client, meta["run_id"])
    delivered = 0

    def deliver(op: Op) -> None:
        nonlocal delivered
        writer(op)
        delivered += 1

    again = f"Run `trainwatch sync {spool.directory}` again"
    try:
        spool.replay(deliver)
    except Exception as error:
        reason = refusal(error) + f" for {account()}" if denied(error) else f"{type(error).__name__}: {str(error)[:300]}"
        raise SyncIncomplete(
            f"{meta['tracking_uri']} stopped taking the spooled operations ({reason}) after {delivered} of them, which "
            f"left the spool; the other {len(spool)} stay in {spool.directory}. {again} once the server takes them."
        ) from error
    if len(spool):  # only artifacts and images the server's artifact store still refuses are left
        raise SyncIncomplete(
            f"{delivered} spooled operations were delivered and left the spool, but the artifact store of {meta['tracking_uri']} "
            f"still refuses {len(spool)} artifacts/images; they stay in {spool.directory}. {again} once the server stores "
            f"artifacts (check its --artifacts-destination)."
        )
    if meta.get("end_status"):
        end_run(client, meta["run_id"], meta["end_status"], meta.get("end_time_ms"))  # when training ended, not now
    spool.remove_if_delivered()  # a second sync finds nothing to do, and says so
    if meta.get("report"):
        from trainwatch.report import REPORT_PATH, build_report

        try:
            client.log_text(meta["run_id"], build_report([meta["run_id"]], meta["tracking_uri"]), REPORT_PATH)
        except Exception as error:  # noqa: BLE001 - the records are delivered; the page can be built later
            log.warning("trainwatch sync: the dashboard was not built (%s); `trainwatch report %s` builds it.", error, meta["run_id"])
    return delivered


class ArtifactStoreError(Exception):
    """The tracking server answers, but an artifact or image upload failed (its artifact store cannot write).

    Not an outage, and not a refusal of the op itself: the op waits in the spool (behind it, every later artifact
    and image, to keep their order) while metrics, params and tags go on being delivered."""


class Spool:
    """Ops waiting on disk: `ops.jsonl` in order, large payloads in blob files beside it."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.index = self.directory / "ops.jsonl"

    def __len__(self) -> int:
        if not self.index.exists():
            return 0
        with self.index.open() as f:
            return sum(1 for _ in f)

    def write_meta(
        self, tracking_uri: str, run_id: str, end_status: str | None = None, end_time_ms: int | None = None, report: bool = False
    ) -> None:
        """Where the ops belong; for own runs the status and time to end the run with once they are delivered; and
        whether to build the run's dashboard then (it is not built while records wait in the spool)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {"tracking_uri": tracking_uri, "run_id": run_id, "end_status": end_status, "end_time_ms": end_time_ms, "report": report}
        (self.directory / "run.json").write_text(json.dumps(meta))

    def read_meta(self) -> dict:
        path = self.directory / "run.json"
        if not path.exists():
            raise FileNotFoundError(f"{self.directory} is not a trainwatch spool: it has no run.json.")
        return json.loads(path.read_text())

    def artifact_paths(self) -> list[str]:
        """The artifact paths the spooled ops will write (unreadable entries left out)."""
        if not self.index.exists():
            return []
        paths = []
        for line in self.index.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("op") == "artifact":
                paths.append(str(entry.get("path")))
        return paths

    def remove_if_delivered(self) -> bool:
        """Remove the spool directory if no op waits in it (only `run.json` is left); True if it is gone."""
        if len(self):
            return False
        (self.directory / "run.json").unlink(missing_ok=True)
        try:
            self.directory.rmdir()  # only if empty: a blob of a skipped entry keeps it
        except OSError:
            return not self.directory.exists()
        return True

    def append(self, ops: Iterable[Op]) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        n = 0
        with self.index.open("a") as f:
            if f.tell() and not self._ends_with_newline():
                f.write("\n")  # a line torn by a crash stays one unreadable line instead of swallowing the next
            for op in ops:
                entry = self._encode(op)
                if entry is not None:
                    f.write(json.dumps(entry) + "\n")
                    n += 1
        return n

    def _ends_with_newline(self) -> bool:
        with self.index.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _blob(self, data: bytes) -> str:
        name = f"blob-{uuid.uuid4().hex}.bin"  # unique even for blobs written within one clock tick
        (self.directory / name).write_bytes(data)
        return name

    def _encode(self, op: Op) -> dict | None:
        """The spool entry of `op`; None for a figure that cannot be drawn (dropped with an error, as delivering
        it would: the ops after it are spooled)."""
        if isinstance(op, MetricsOp):
            return {"op": "metrics", "values": [list(v) for v in op.values]}
        if isinstance(op, ArtifactOp):
            return {"op": "artifact", "path": op.path, "blob": self._blob(op.data)}
        if isinstance(op, ImageOp):
            try:
                pixels = op.pixels()
            except Exception as error:  # noqa: BLE001
                log.error(
                    "trainwatch: image %r at step %d could not be drawn (%s: %s); it is dropped.",
                    op.key,
                    op.step,
                    type(error).__name__,
                    error,
                )
                return None
            return {"op": "image", "key": op.key, "step": op.step, "ts": op.timestamp_ms, "blob": self._blob(npy_bytes(pixels))}
        if isinstance(op, TagsOp):
            return {"op": "tags", "items": [list(t) for t in op.tags]}
        if isinstance(op, ParamsOp):
            return {"op": "params", "items": [list(p) for p in op.params]}
        raise TypeError(f"trainwatch cannot spool {type(op).__name__} objects: not an op")

    def _decode(self, d: dict) -> Op:
        kind = d["op"]
        if kind == "metrics":
            return MetricsOp(tuple((k, float(v), int(t), int(s)) for k, v, t, s in d["values"]))
        if kind == "artifact":
            return ArtifactOp(d["path"], (self.directory / d["blob"]).read_bytes())
        if kind == "image":
            return ImageOp(d["key"], d["step"], d["ts"], npy_load((self.directory / d["blob"]).read_bytes()))
        if kind == "tags":
            return TagsOp(tuple((k, v) for k, v in d["items"]))
        return ParamsOp(tuple((k, v) for k, v in d["items"]))

    def replay(self, deliver: Callable[[Op], None]) -> int:
        """Deliver spooled ops in order; on failure keep the undelivered rest and re-raise. Returns the number
        delivered. An entry that cannot be read back (a line torn by a crash, a missing blob) can never be
        delivered: it is logged and skipped rather than blocking everything after it. An artifact or image the
        artifact store refuses (`ArtifactStoreError`) stays, and so does every artifact and image after it (a later
        version of a file must not be overwritten by an earlier one); the other ops after it are delivered."""
        if not self.index.exists():
            return 0
        lines = self.index.read_text().splitlines()
        delivered = 0
        kept: list[str] = []
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
                op = self._decode(entry)
            except Exception as error:  # noqa: BLE001
                log.error(
                    "trainwatch: entry %d of %s cannot be read (%s: %s); it is skipped.", i + 1, self.index, type(error).__name__, error
                )
                continue
            if kept and isinstance(op, (ArtifactOp, ImageOp)):
                kept.append(line)
                continue
            try:
                deliver(op)
            except ArtifactStoreError:
                kept.append(line)
                continue
            except Exception:
                self._rewrite(kept + lines[i:])
                raise
            delivered += 1
            if "blob" in entry:
                (self.directory / entry["blob"]).unlink(missing_ok=True)
        if kept:
            self._rewrite(kept)
        else:
            self.index.unlink()
        return delivered

    def _rewrite(self, lines: Sequence[str]) -> None:
        """Replace the index atomically: a crash while rewriting leaves the old or the new one, never half."""
        tmp = self.index.with_name(self.index.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, self.index)


REFUSALS_LOGGED = 10


def refused(error: BaseException) -> bool:
    """True if the store answered and refused the op itself (an invalid metric name, a changed param value, a
    deleted run, an image key MLflow does not accept): sending it again cannot succeed, so it is no outage.
    Connection errors, timeouts and 5xx answers (MLflow raises them as INTERNAL_ERROR or
    TEMPORARILY_UNAVAILABLE) are outages, and so is anything from `requests` (an OSError, even where it is a
    ValueError too)."""
    if isinstance(error, MlflowException):
        return error.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")
    return isinstance(error, (ValueError, TypeError)) and not isinstance(error, OSError)


class MlflowWriter:
    """Deliver ops to one run with an MlflowClient.

    An op the store refuses (see `refused`) is dropped with an error in the log instead of raising: raised, it
    would look like an outage to the sink, which would spool it and everything after it for good, and
    `trainwatch sync` would stop at it every time. Metrics, params and tags are split until the refused items
    are isolated, so the rest of a batch is delivered; a refused metric key is not sent again.
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.refused = 0  # items dropped: metric values, params, tags, artifacts, images
        self.refused_keys: set[str] = set()

    def __call__(self, op: Op) -> None:
        c, run = self.client, self.run_id
        if isinstance(op, MetricsOp):
            self._split(
                "metric", list(op.values), lambda vs: c.log_batch(run, metrics=[Metric(k, v, t, s) for k, v, t, s in vs], synchronous=True)
            )
        elif isinstance(op, ArtifactOp):
            directory, _, name = op.path.rpartition("/")
            self._one(f"artifact {op.path!r}", lambda: _log_bytes(c, run, directory, name, op.data), stored=True)
        elif isinstance(op, ImageOp):
            try:
                image = op.pixels()
            except Exception as error:  # noqa: BLE001 - a figure that cannot be drawn is no outage: drop it, say why
                self._refuse(f"image {op.key!r} at step {op.step} (drawing it failed)", error)
                return
            send = lambda: c.log_image(run, image, key=op.key, step=op.step, timestamp=op.timestamp_ms, synchronous=True)
            self._one(f"image {op.key!r} at step {op.step}", send, stored=True)
        elif isinstance(op, TagsOp):
            self._split("tag", list(op.tags), lambda ts: c.log_batch(run, tags=[RunTag(k, v) for k, v in ts], synchronous=True))
        elif isinstance(op, ParamsOp):
            self._split("param", list(op.params), lambda ps: c.log_batch(run, params=[Param(k, v) for k, v in ps], synchronous=True))
        else:
            self._refuse(f"a {type(op).__name__} object", TypeError("not an op"))

    def _split(self, kind: str, items: list[tuple], send: Callable[[list[tuple]], object]) -> None:
        """Send `items` (tuples whose first element is the key); if refused, halve until the refused ones are alone."""
        if kind == "metric":
            items = [item for item in items if item[0] not in self.refused_keys]
        if not items:
            return
        try:
            send(items)
        except Exception as error:
            if not refused(error):
                raise
            if len(items) > 1:
                half = len(items) // 2
                self._split(kind, items[:half], send)
                self._split(kind, items[half:], send)
                return
            if kind == "metric":
                self.refused_keys.add(items[0][0])
            self._refuse(f"{kind} {items[0][0]!r}", error)

    def _one(self, what: str, send: Callable[[], object], stored: bool = False) -> None:
        """Send one op; `stored`: an artifact or image, whose failure while the tracking API answers is the artifact
        store's (e.g. a server whose --artifacts-destination cannot be written): `ArtifactStoreError`, not an outage."""
        try:
            send()
        except Exception as error:
            if refused(error):
                self._refuse(what, error)
                return
            if stored and self._tracking_answers():
                raise ArtifactStoreError(f"{what} ({type(error).__name__}: {str(error)[:300]})") from error
            raise

    def _tracking_answers(self) -> bool:
        """True if the tracking API answers for this run; tried twice, as a failed upload can leave a pooled
        connection that the server has closed."""
        for _ in range(2):
            try:
                self.client.get_run(self.run_id)
                return True
            except Exception:  # noqa: BLE001 - any failure: not known to answer
                continue
        return False

    def _refuse(self, what: str, error: Exception) -> None:
        self.refused += 1
        if self.refused <= REFUSALS_LOGGED:
            log.error(
                "trainwatch: MLflow refused %s of run %s (%s: %s); it is dropped, the rest is delivered.%s",
                what,
                self.run_id,
                type(error).__name__,
                str(error)[:300],
                " Further refusals are not logged." if self.refused == REFUSALS_LOGGED else "",
            )


def _log_bytes(client: MlflowClient, run_id: str, directory: str, name: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="trainwatch-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        client.log_artifact(run_id, str(path), artifact_path=directory or None)


@dataclass
class SinkStats:
    submitted: int = 0
    overflowed: int = 0
    delivered_ops: int = 0
    spooled_ops: int = 0
    replayed_ops: int = 0
    failures: int = 0


class MlflowSink:
    """Bounded queue → worker thread → batched MLflow writes, with a disk spool while MLflow is down.

    `publish(item) -> list[Op]` runs on the worker thread and turns submitted items into ops.
    """

    def __init__(
        self,
        deliver: Callable[[Op], None],
        spool: Spool,
        publish: Callable[[object], list[Op]] | None = None,
        queue_size: int = 1000,
        retry_after_s: float = 5.0,
        describe: str = "MLflow",
        deliver_every_s: float = 1.0,
    ) -> None:
        self._deliver_op, self.spool, self._publish = deliver, spool, publish or _ops_as_they_are
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        # Items submitted while the queue is full wait here, in order, behind everything queued before them: the
        # training thread parks an item without a lock or I/O, and all but the newest few wait in a temporary file.
        self._overflow = Overflow()
        self._retry_after_s = retry_after_s
        # Ops wait up to this long (or until a full log_batch of values is pending) to be written together: MLflow's
        # per-call cost dominates small batches (SQLite: ~12 ms of CPU for one step's 100 values alone, ~5 ms each when
        # 10 steps go in one call), and a team server takes one request instead of one per logged step.
        self._deliver_every_s = deliver_every_s
        self._describe = describe
        self._down_since: float | None = None
        self._held: str | None = None  # the artifact store's last error while artifacts and images wait in the spool
        self._warned_held = False
        self._next_try = 0.0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._spool_rest = threading.Event()  # set by close when its timeout ran out: send nothing more, spool it
        self.stats = SinkStats()
        self.last_error: str | None = None

    # --- training thread -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="trainwatch-sink", daemon=True)
            self._thread.start()

    def submit(self, item: object) -> None:
        """Hand an item to the worker; never blocks. A full queue parks the item for the worker (see `Overflow`),
        which takes items in submission order; the overflow is reported when it starts and at close."""
        self.stats.submitted += 1
        if not self._enqueue(item):
            self.stats.overflowed += 1
            if self.stats.overflowed == 1:
                log.warning(
                    "trainwatch: %s takes records more slowly than training makes them: the sink queue (%d records) is "
                    "full. Later records wait in order, the oldest of them in a temporary file (%d stay in memory); none is "
                    "dropped. A larger every_n_steps, or a tracking server closer to this machine, lets it keep up.",
                    self._describe, self._queue.maxsize, IN_MEMORY,
                )  # fmt: skip

    def _enqueue(self, item: object) -> bool:
        """Queue `item` (True) or park it (False); never blocks. Once an item is parked, later ones are parked
        behind it until the worker has taken them all, so every queued item precedes every parked one."""
        if not self._overflow:
            try:
                self._queue.put_nowait(item)
                return True
            except queue.Full:
                pass
        self._overflow.park(item)
        return False

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is delivered or spooled; True if that happened in time."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return True
        done = threading.Event()
        self._enqueue(done)  # never blocks, even on a full queue: the timeout holds
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))):
            if not thread.is_alive() or (deadline is not None and time.monotonic() >= deadline):
                return done.is_set()
        return True

    def close(self, timeout: float | None = 120.0) -> None:
        """Flush, stop the worker and, if ops are still spooled, say how to deliver them; remove the spool
        directory if nothing waits in it. Idempotent.

        While MLflow is down, close makes one last delivery attempt whatever the retry timer says, so a server
        that came back shortly before the end gets everything now rather than through `trainwatch sync`. A server
        that answers but has not taken the backlog within `timeout` seconds gets no more: the worker writes the
        rest to the spool (a process ending after `fit` would lose it with the worker thread)."""
        if self._closed:
            return
        self._closed = True
        gave_up = False
        if self._thread is not None and self._thread.is_alive():
            self._enqueue(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                gave_up = True
                self._spool_rest.set()
                self._thread.join(SPOOL_REST_WITHIN_S)
                if self._thread.is_alive():
                    warnings.warn(
                        f"trainwatch: the sink was still writing {self._queue.qsize() + len(self._overflow)} records to "
                        f"{self.spool.directory} {timeout} + {SPOOL_REST_WITHIN_S:.0f} s after the end of training; it goes on in "
                        f"the background, and what it has not written when this process exits is lost. Deliver the spool with: "
                        f"trainwatch sync {self.spool.directory}",
                        stacklevel=2,
                    )
        stopped = self._thread is None or not self._thread.is_alive()
        if stopped:
            getattr(self._deliver_op, "close", lambda: None)()  # a ProcessWriter's child exits
            self._overflow.close()  # the worker took every parked item
        left = len(self.spool)
        if not left and stopped:
            self.spool.remove_if_delivered()  # nothing waits: no directory left behind per run
        if left and self._down_since is None and gave_up:
            warnings.warn(
                f"trainwatch: {self._describe} took records more slowly than training made them, and {timeout} s after the "
                f"end of training it had not taken {left} operations; they are kept in {self.spool.directory}. Deliver them "
                f"with: trainwatch sync {self.spool.directory}",
                stacklevel=2,
            )
        elif left and self._down_since is None and self._held is not None:
            warnings.warn(
                f"trainwatch: {self._describe} did not store {left} artifacts/images ({self._held}); they are kept in "
                f"{self.spool.directory}. Deliver them once its artifact store works with: trainwatch sync {self.spool.directory}",
                stacklevel=2,
            )
        elif left:
            warnings.warn(
                f"trainwatch: {self._describe} was unreachable ({self.last_error}); {left} operations are kept in "
                f"{self.spool.directory}. Deliver them when it is back with: trainwatch sync {self.spool.directory}",
                stacklevel=2,
            )
        if self.stats.overflowed:
            log.warning(
                "trainwatch: the sink queue overflowed %d times; those records waited behind it, %d of them in a temporary "
                "file (at most %d at once); none was dropped.",
                self.stats.overflowed, self._overflow.spilled, self._overflow.most_on_disk,
            )  # fmt: skip

    # --- worker thread ---------------------------------------------------------------------------------
    def _next(self, wait_s: float) -> object | None:
        """The next item in submission order (queued items first: they precede every parked one), or None
        after `wait_s` seconds without any."""
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            pass
        try:
            return self._overflow.take()
        except IndexError:
            pass
        try:
            return self._queue.get(timeout=wait_s) if wait_s > 0 else None
        except queue.Empty:
            return None

    def _run(self) -> None:
        getattr(self._deliver_op, "start", lambda: None)()  # a ProcessWriter starts its child now, off training's thread
        pending: list[Op] = []
        values = 0  # metric values in `pending`
        since: float | None = None  # when the oldest pending op was published
        while True:
            if self._spool_rest.is_set():
                self._spool_the_rest(pending)
                return
            wait = 0.5 if since is None else since + self._deliver_every_s - time.monotonic()
            item = self._next(wait)
            if item is _STOP or isinstance(item, threading.Event):
                ops, pending, values, since = pending + self._safe_publish(_FLUSH), [], 0, None
                self._safe_deliver(ops, final=item is _STOP)
                if item is _STOP:
                    return
                item.set()
                continue
            if item is not None:
                new = self._safe_publish(item)
                if new and since is None:
                    since = time.monotonic()
                pending.extend(new)
                values += sum(len(op.values) for op in new if isinstance(op, MetricsOp))
            if pending and (values >= MAX_METRICS_PER_BATCH or time.monotonic() - since >= self._deliver_every_s):  # type: ignore[operator]
                ops, pending, values, since = pending, [], 0, None
                self._safe_deliver(ops)
            elif item is None and not pending and (self._down_since is not None or self._held is not None):
                self._safe_deliver([])  # retry the spool while idle

    def _spool_the_rest(self, pending: list[Op]) -> None:
        """Write `pending` and every item still waiting to the spool, in order, and send nothing more. Written
        as it goes, so a long backlog comes back from the overflow's file a part at a time."""
        ops = list(pending)
        while (item := self._next(0)) is not None and item is not _STOP:
            if isinstance(item, threading.Event):
                item.set()  # a flush waiting on it: its records are spooled
            else:
                ops.extend(self._safe_publish(item))
            if len(ops) >= SPOOL_PART:
                self._spool_or_log(ops)
                ops = []
        self._spool_or_log(ops + self._safe_publish(_FLUSH))

    def _spool_or_log(self, ops: list[Op]) -> None:
        try:
            self.stats.spooled_ops += self.spool.append(batched(ops))
        except Exception:
            log.exception("trainwatch: %d operations could be neither delivered nor spooled; they are lost", len(ops))

    def _safe_publish(self, item: object) -> list[Op]:
        try:
            return self._publish(item)
        except Exception:
            log.exception("trainwatch: could not turn a record into MLflow operations; it is skipped")
            return []

    def _safe_deliver(self, ops: list[Op], final: bool = False) -> None:
        """`_deliver`, but an unexpected error (the spool's disk full) is logged: the worker must live on, or
        `flush` and `close` would wait for it in vain."""
        try:
            self._deliver(ops, final)
        except Exception:
            log.exception("trainwatch: %d operations could be neither delivered nor spooled; they are lost", len(ops))

    def _deliver(self, ops: list[Op], final: bool = False) -> None:
        ops = batched(ops)
        if self._down_since is not None or self._held is not None:
            due = final or time.monotonic() >= self._next_try
            if self._down_since is not None and not due:
                self.stats.spooled_ops += self.spool.append(ops)
                return
            if due:
                try:
                    self.stats.replayed_ops += self.spool.replay(self._send)
                except _SpoolRest:
                    self.stats.spooled_ops += self.spool.append(ops)
                    return
                except Exception as error:  # noqa: BLE001
                    self._went_down(error)
                    self.stats.spooled_ops += self.spool.append(ops)
                    return
                if self._down_since is not None:
                    log.warning("trainwatch: %s is reachable again; spooled operations delivered.", self._describe)
                    self._down_since = None
                if not len(self.spool):
                    self._held = None  # the artifact store took what waited
                self._next_try = time.monotonic() + self._retry_after_s
        for i, op in enumerate(ops):
            if self._held is not None and isinstance(op, (ArtifactOp, ImageOp)):
                self.stats.spooled_ops += self.spool.append([op])  # behind the held ones: files keep their order
                continue
            try:
                self._send(op)
                self.stats.delivered_ops += 1
            except ArtifactStoreError:
                self.stats.spooled_ops += self.spool.append([op])
            except _SpoolRest:
                self.stats.spooled_ops += self.spool.append(ops[i:])
                return
            except Exception as error:  # noqa: BLE001
                self._went_down(error)
                self.stats.spooled_ops += self.spool.append(ops[i:])
                return

    def _send(self, op: Op) -> None:
        """Deliver one op; an artifact store that refuses it puts the sink in the holding state (one warning)."""
        if self._spool_rest.is_set():
            raise _SpoolRest
        try:
            self._deliver_op(op)
        except ArtifactStoreError as error:
            self._held = str(error)
            self._next_try = time.monotonic() + self._retry_after_s
            if not self._warned_held:
                self._warned_held = True
                warnings.warn(
                    f"trainwatch: {self._describe} answers but did not store {error}. Training continues and metrics, "
                    f"params and tags are delivered; artifacts and images wait in {self.spool.directory} and are delivered "
                    f"when its artifact store takes them again (or with `trainwatch sync {self.spool.directory}`).",
                    stacklevel=1,
                )
            raise

    def _went_down(self, error: Exception) -> None:
        self.stats.failures += 1
        self.last_error = f"{type(error).__name__}: {str(error)[:200]}"
        if self._down_since is None:
            self._down_since = time.monotonic()
            if denied(error):  # it answers, but no longer lets these credentials write: not an outage to wait out
                warnings.warn(
                    f"trainwatch: {self._describe} refused to store this run's records ({refusal(error)} for {account()}). "
                    f"Training continues; records are spooled to {self.spool.directory} and delivered as soon as the account "
                    f"may write to the run's experiment again (or later with `trainwatch sync {self.spool.directory}`).",
                    stacklevel=1,
                )
                return
            warnings.warn(
                f"trainwatch: cannot write to {self._describe} ({self.last_error}). Training continues; records are "
                f"spooled to {self.spool.directory} and delivered when it answers again.",
                stacklevel=1,
            )
        self._next_try = time.monotonic() + self._retry_after_s


class _SpoolRest(Exception):
    """Raised instead of sending once close has run out of time: the op and the ones after it go to the spool."""


class _Flush:
    """Marker passed to `publish` at a flush, so it can emit what it has been accumulating."""


_FLUSH = _Flush()


def is_flush(item: object) -> bool:
    return item is _FLUSH


def _ops_as_they_are(item: object) -> list[Op]:
    """The default `publish`: items are ops already; the flush marker adds none."""
    return [] if is_flush(item) else [item]  # type: ignore[list-item]
