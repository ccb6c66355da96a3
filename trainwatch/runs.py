"""An existing MLflow run, for post-training jobs: read its artifacts, add artifacts, metrics and params.

The synchronous counterpart of the sink (a job has no training thread to protect). Errors name the fix.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainwatch.sink import open_client

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def artifact_paths(client: MlflowClient, run_id: str, folder: str) -> list[str]:
    """Paths of the files directly under a run's artifact `folder` (empty when it does not exist)."""
    try:
        return [f.path for f in client.list_artifacts(run_id, folder) if not f.is_dir]
    except (MlflowException, OSError):
        return []


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The argument, then MLFLOW_TRACKING_URI, then the embedded default (as the callback does)."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class RunStore:
    """Artifacts, metrics and params of one run at one tracking URI."""

    def __init__(self, run_id: str, tracking_uri: str | None = None) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.client = open_client(self.tracking_uri)
        self.run_id = run_id
        try:
            self.run = self.client.get_run(run_id)
        except MlflowException as error:
            raise ValueError(
                f"no run {run_id!r} at {self.tracking_uri!r}: {str(error)[:200]}. Copy the run id from the MLflow UI and pass "
                "the tracking URI the run was logged to (--tracking-uri or MLFLOW_TRACKING_URI)."
            ) from error

    def read(self, path: str, what: str) -> bytes:
        """The bytes of artifact `path`; FileNotFoundError says what is missing and how to get it."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = self.client.download_artifacts(self.run_id, path, tmp)
            except (MlflowException, OSError) as error:
                status = self.run.info.status
                if status in ("FAILED", "KILLED"):
                    raise FileNotFoundError(
                        f"run {self.run_id} has no {what} ({path}): it ended {status}, before the end of `fit`, where "
                        f"TrainWatch logs the model and its checkpoint. Finish the training (resume it from a checkpoint "
                        f"of your own), then run this again."
                    ) from error
                raise FileNotFoundError(
                    f"run {self.run_id} has no {what} ({path}). Train with `TrainWatch()` attached (it logs the evaluation "
                    f"subset at the start of `fit` and the checkpoint at its end; `landscape_samples=0` turns both off)."
                ) from error
            return Path(local).read_bytes()

    def files_in(self, folder: str) -> list[str]:
        """Artifact paths directly under `folder` (empty when it does not exist)."""
        return artifact_paths(self.client, self.run_id, folder)

    def folders_in(self, folder: str) -> list[str]:
        """Artifact folders directly under `folder` (empty when it does not exist)."""
        try:
            return [f.path for f in self.client.list_artifacts(self.run_id, folder) if f.is_dir]
        except (MlflowException, OSError):
            return []

    def write(self, files: dict[str, bytes]) -> None:
        """Log each `{artifact path: bytes}` (replacing an earlier file of that path)."""
        with tempfile.TemporaryDirectory() as tmp:
            for path, data in files.items():
                local = Path(tmp) / path
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(data)
                self.client.log_artifact(self.run_id, str(local), os.path.dirname(path) or None)

    def log(self, metrics: dict[str, float], params: dict[str, str], step: int = 0) -> None:
        """Metrics at `step` and params; a param that exists with another value raises (params are immutable)."""
        self.check_params(params)
        have = self.run.data.params
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in params.items() if k not in have],
        )

    def check_params(self, params: dict[str, str]) -> None:
        """Raise before any work if `params` clash with the run's (see `log`)."""
        have = self.run.data.params
        for key, value in params.items():
            if key in have and have[key] != value:
                raise ValueError(
                    f"run {self.run_id} already has {key}={have[key]!r} (now {value!r}); give this landscape another name (--name)."
                )
