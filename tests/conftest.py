from __future__ import annotations

import os
import warnings

import pytest

# Lightning and MLflow chatter that says nothing about trainwatch.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store; the working directory is the test's tmp dir (spools land there)."""
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path}/mlflow.db"
