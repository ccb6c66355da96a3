"""The scripts in examples/ run as a user runs them (a fresh process, the working directory holding the store) and
leave what their docstrings promise in MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.slow


def _run(tmp_path: Path, *args: str) -> str:
    """Runs a script with the test's store as `MLFLOW_TRACKING_URI` (MLflow's `set_tracking_uri` in an earlier test
    leaves that variable set in this process, and a script that reads it would log there)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _runs(tmp_path: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments)


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_attach_logs_into_the_loggers_run(tmp_path):
    said = _run(tmp_path, str(EXAMPLES / "attach.py"), "--max-steps", "30")
    client, (run,) = _runs(tmp_path)
    assert f"logged to run {run.info.run_id}" in said and run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id, "grad_norm/net.1") == [0, 10, 20]  # TrainWatch's, every 10 steps
    assert "train_loss" in run.data.metrics and "val_loss" in run.data.metrics  # the module's own, same run
    assert "act_zero_frac/net.2" in run.data.metrics and "act_saturated_frac/net.4" in run.data.metrics


def test_resume_goes_on_in_the_first_fits_run(tmp_path):
    said = _run(tmp_path, str(EXAMPLES / "resume.py"))
    client, (run,) = _runs(tmp_path)
    assert "simulated crash at step 50" in said and "step=40.ckpt" in said
    assert run.info.status == "FINISHED" and run.info.run_name == "resume-example"
    steps = _steps(client, run.info.run_id, "train/grad_norm_total")
    assert steps == sorted([*range(0, 50, 5), *range(40, 80, 5)])  # the first fit to 45, the resumed one from 40


def test_lightning_cli_yaml(tmp_path):
    _run(tmp_path, str(EXAMPLES / "cli.py"), "fit", "--config", str(EXAMPLES / "cli.yaml"), "--trainer.max_steps", "21")
    client, (run,) = _runs(tmp_path)
    assert run.info.run_name == "cli-example" and run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id, "grad_norm/features.0") == [0, 10, 20]
    assert not any(key.startswith("grad_norm/classifier") for key in run.data.metrics)  # `modules: [features]`
