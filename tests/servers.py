"""A real `mlflow server` on a free loopback port, for tests that need a tracking server that can go away.

The server runs in its own session, so it and the worker processes it forks are stopped together through its
process group id (= its own pid). It can be stopped and started again on the same port with the same SQLite
store and artifact directory, as a server that restarts after an outage would be.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MLFLOW = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    """A loopback port nothing listens on (bound and released by us, so a connect to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server --backend-store-uri sqlite:///<root>/mlflow.db --artifacts-destination <root>/artifacts`."""

    def __init__(self, root: Path, port: int | None = None, backend_uri: str | None = None, workers: int = 1) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the same store, read directly (no server needed); a PostgreSQL URI for the team-server tests
        self.store_uri = backend_uri or f"sqlite:///{self.root / 'mlflow.db'}"
        self.workers = workers
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def command(self) -> list[str]:
        return [
            str(MLFLOW), "server",
            "--backend-store-uri", self.store_uri,
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", str(self.workers),
        ]  # fmt: skip

    def start(self, timeout_s: float = 120.0) -> MlflowServer:
        """Start the server and wait until GET /health answers 200."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"mlflow server on port {self.port} is already running (pid {self.proc.pid})")
        self.starts += 1
        log = (self.root / f"server-{self.starts}.log").open("wb")
        env = {**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        finally:
            log.close()  # the child holds its own descriptor
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"mlflow server did not answer {self.url}/health within {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """Kill the server's process group (SIGKILL: an abrupt outage, no graceful shutdown) and wait for it.
        Only this server's own process group is signalled."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while self._port_open():  # forked workers may take a moment to die after the group signal
            if time.monotonic() > deadline:
                raise TimeoutError(f"port {self.port} still accepts connections after stopping the server")
            time.sleep(0.05)

    def restart(self, timeout_s: float = 120.0) -> MlflowServer:
        self.stop()
        return self.start(timeout_s)

    def _port_open(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log_tail(self, n: int = 3000) -> str:
        logs = sorted(self.root.glob("server-*.log"))
        return logs[-1].read_text(errors="replace")[-n:] if logs else ""

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def table_steps(client, run_id: str, table: str, directory: Path) -> list[list[int]]:
    """The steps of each part of trainwatch's table `table` (say "stats/params") in a run, in part order."""
    import io

    import numpy as np

    parts = sorted(f.path for f in client.list_artifacts(run_id, f"trainwatch/{table}"))
    return [np.load(io.BytesIO(Path(client.download_artifacts(run_id, p, str(directory))).read_bytes()))["step"].tolist() for p in parts]
