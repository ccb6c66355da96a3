"""Deliver ops from a child process, so MLflow's Python runs under another interpreter lock than training's.

`MlflowWriter` in the sink thread holds the training process's GIL while MLflow builds requests or, for a
local SQLite store, runs SQLAlchemy: about 19 ms of CPU per step of a small CNN logged every step, during which
the training thread cannot launch a kernel. `ProcessWriter` is a drop-in `deliver` for `MlflowSink` that sends
each op to `python -m trainwatch.writer_process`, which runs the same `MlflowWriter` and answers how it went.
Refusals, artifact-store failures and outages come back as the exceptions the sink already tells apart; a child
that dies is an outage (the sink spools) and the next delivery starts a new one.

Frames on the child's stdin and stdout: a 4-byte big-endian length, then a pickle.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import IO, Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode
from mlflow.tracking import MlflowClient

from trainwatch.ops import Op
from trainwatch.sink import ArtifactStoreError, MlflowWriter

log = logging.getLogger(__name__)
_HEADER = struct.Struct(">I")


class WriterProcessError(ConnectionError):
    """An error the child raised while delivering an op, under its own type name (for the sink's messages)."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name

    def __str__(self) -> str:
        return f"{self.type_name}: {self.args[0]}"


def write_frame(stream: IO[bytes], obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> Any:
    """The next object, or raise EOFError when the other side has closed the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("stream closed")
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("stream closed mid-frame")
    return pickle.loads(data)


class ProcessWriter:
    """`deliver` for `MlflowSink`: the op goes to a child process running `MlflowWriter(client, run_id)`.

    The child is started on first use (importing MLflow takes it a second or two, in the sink thread, never in
    training's) and again after it died. `refused` and `refused_keys` mirror the child writer's; its log lines
    are re-emitted here, under this process's `trainwatch.sink` logger."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.refused = 0
        self.refused_keys: set[str] = set()
        self.starts = 0
        self.ready = threading.Event()  # set once a child has imported MLflow and answered
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()  # the sink calls from one thread; `close` may come from another

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        """Start the child now and wait for its ready answer (the sink thread calls this first, so the import
        overlaps the trainer's own start); a failure here is left for the first delivery to report."""
        with self._lock:
            try:
                self._running()
            except (OSError, EOFError, pickle.UnpicklingError):
                self._stop()

    def __call__(self, op: Op) -> None:
        with self._lock:
            try:
                proc = self._running()
                assert proc.stdin is not None and proc.stdout is not None
                write_frame(proc.stdin, op)
                reply = read_frame(proc.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as error:
                code = self._stop()
                raise ConnectionError(
                    f"trainwatch's MLflow writer process stopped ({type(error).__name__}, exit code {code}); "
                    "a new one is started at the next delivery"
                ) from error
        self._apply(reply)

    def _running(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            self.starts += 1
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "trainwatch.writer_process", self.tracking_uri, self.run_id],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"},
            )
            assert self._proc.stdout is not None
            read_frame(self._proc.stdout)  # "ready": MLflow is imported and the client made
            self.ready.set()
        return self._proc

    def _apply(self, reply: dict[str, Any]) -> None:
        """Mirror the child's refusals and log lines, then raise what it raised."""
        self.refused += reply["refused"]
        self.refused_keys |= reply["refused_keys"]
        for level, message in reply["logs"]:
            logging.getLogger("trainwatch.sink").log(level, "%s", message)
        error = reply.get("error")
        if error is None:
            return
        kind, type_name, message, code = error
        if kind == "artifact_store":
            raise ArtifactStoreError(message)
        if kind == "mlflow":  # the code travels by name: MlflowException takes the protobuf enum's number
            raise MlflowException(message, error_code=ErrorCode.Value(code))
        raise WriterProcessError(type_name, message)

    def _stop(self) -> int | None:
        """End the child (it exits when its stdin closes) and return its exit code."""
        proc, self._proc = self._proc, None
        self.ready.clear()
        if proc is None:
            return None
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def close(self) -> None:
        with self._lock:
            self._stop()


class _Collect(logging.Handler):
    """Collects the child's `trainwatch` log records for the reply."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def serve(tracking_uri: str, run_id: str, requests: IO[bytes], replies: IO[bytes]) -> None:
    """The child's loop: one reply per op until the parent closes the stream."""
    writer = MlflowWriter(MlflowClient(tracking_uri), run_id)
    collect = _Collect()
    logger = logging.getLogger("trainwatch")
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    write_frame(replies, "ready")
    while True:
        try:
            op = read_frame(requests)
        except EOFError:
            return
        refused, keys = writer.refused, set(writer.refused_keys)
        error: tuple[str, str, str, str | None] | None = None
        try:
            writer(op)
        except ArtifactStoreError as e:
            error = ("artifact_store", type(e).__name__, str(e), None)
        except MlflowException as e:
            error = ("mlflow", type(e).__name__, e.message, e.error_code)
        except Exception as e:  # noqa: BLE001 - every failure goes back to the sink, which decides
            error = ("other", type(e).__name__, str(e)[:1000], None)
        write_frame(
            replies,
            {"refused": writer.refused - refused, "refused_keys": writer.refused_keys - keys, "logs": collect.lines, "error": error},
        )
        collect.lines = []


if __name__ == "__main__":
    # stdout carries frames only: anything MLflow prints goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.argv[1], sys.argv[2], sys.stdin.buffer, replies)
