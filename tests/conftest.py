from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

# Lightning and MLflow chatter that says nothing about trainwatch.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

# Under pytest-xdist (`make test` runs one worker per core) each worker takes its share of the cores for torch's
# intra-op threads, rather than every worker one thread per core: oversubscribed cores slow every test down.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """An empty SQLite MLflow store whose schema MLflow created once for the session (its migrations take 2-3 s
    for every new file, which a hundred tests would pay)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)
    return path


@pytest.fixture
def store(migrated_store, tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store (a copy of the migrated empty one) at ./mlflow.db: the working directory is the
    test's tmp dir (spools land there, and the default URI `sqlite:///mlflow.db` names this store)."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(migrated_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"
