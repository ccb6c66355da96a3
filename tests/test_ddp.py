"""Real DDP: 2 CPU processes on gloo under Lightning's `ddp` strategy."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from trainwatch.probes.activations import STAT_COLUMNS

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("ddp_train.py")


@pytest.mark.parametrize(("every", "act_every"), [(1, 1), (3, 2)])
def test_ddp_one_run_rank_zero_logs_and_histograms_sum_over_ranks(tmp_path, migrated_store, every, act_every):
    shutil.copy(migrated_store, tmp_path / "ddp.db")
    uri = f"sqlite:///{tmp_path}/ddp.db"
    landscape = ["--landscape"] if every == 3 else []  # the landscape at the end, on rank zero alone
    done = subprocess.run(
        [sys.executable, str(SCRIPT), uri, str(every), str(act_every), *landscape],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("trainwatch").experiment_id])
    assert len(runs) == 1  # only rank zero opened a run
    run_id = runs[0].info.run_id
    grad_steps = [m.step for m in client.get_metric_history(run_id, "grad_norm/net.0")]
    assert grad_steps == sorted(set(grad_steps)) == [s for s in range(9) if s % every == 0]
    act_steps = [m.step for m in client.get_metric_history(run_id, "act_mean/net.1")]
    assert act_steps == [s for s in range(9) if s % act_every == 0]
    path = client.download_artifacts(run_id, "trainwatch/histograms/activations/part-00000.npz")
    hist = np.load(io.BytesIO(Path(path).read_bytes()))
    row = list(hist["names"]).index("net.1")
    # 32 probe samples on each of 2 ranks, 16 hidden units: summed over ranks
    assert hist["values"][0, row, 0] == 2 * 32 * 16
    assert hist["values"][0, row, len(STAT_COLUMNS) :].sum() == 2 * 32 * 16
    if landscape:
        metrics = runs[0].data.metrics
        assert np.isfinite(metrics["landscape/random/centre_loss"]), metrics
        assert "landscape/random/sharpness" not in metrics  # 5 points over ±1: none within 0.1 of the centre (NaN)
        assert any(f.path.endswith("random") for f in client.list_artifacts(run_id, "trainwatch/landscape"))


def _train(tmp_path: Path, migrated_store: Path, name: str, devices: int, batch: int) -> tuple[MlflowClient, str]:
    shutil.copy(migrated_store, tmp_path / f"{name}.db")
    uri = f"sqlite:///{tmp_path}/{name}.db"
    args = [sys.executable, str(SCRIPT), uri, "1", "2", str(devices), str(batch), "1"]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("trainwatch").experiment_id])
    return client, run.info.run_id


def _histories(client: MlflowClient, run_id: str) -> dict[str, dict[int, float]]:
    keys = client.get_run(run_id).data.metrics
    return {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}


# What differs by construction: wall-clock timing, and the loss Lightning logs without sync_dist (rank zero's
# half of the batch). Throughput is compared through samples per step, which timing does not enter.
NOT_COMPARABLE = {"train/step_ms", "train/samples_per_s", "train_loss", "val_loss"}


def _samples_per_step(history: dict[str, dict[int, float]]) -> list[float]:
    rate, step_ms = history["train/samples_per_s"], history["train/step_ms"]
    return [rate[s] * step_ms[s] / 1000 for s in sorted(rate) if s > 0]


def test_ddp_metrics_match_the_single_process_run_of_the_same_global_batch(tmp_path, migrated_store):
    """2 ranks x batch 8 and 1 process x batch 16 see the same samples per step, so every gradient, weight,
    update and activation metric agrees (up to the order of float additions in the all-reduce)."""
    single = _histories(*_train(tmp_path, migrated_store, "single", devices=1, batch=16))
    ddp = _histories(*_train(tmp_path, migrated_store, "ddp", devices=2, batch=8))
    assert set(single) == set(ddp)
    compared = sorted(set(single) - NOT_COMPARABLE)
    assert any(k.startswith("grad_norm/") for k in compared) and any(k.startswith("act_hist") or k.startswith("act_") for k in compared)
    for key in compared:
        assert single[key].keys() == ddp[key].keys(), key
        steps = sorted(single[key])
        np.testing.assert_allclose([ddp[key][s] for s in steps], [single[key][s] for s in steps], rtol=1e-4, atol=1e-7, err_msg=key)
    # samples/s counts every rank's samples: 2 x 8 per step, as the single process's 16
    np.testing.assert_allclose(_samples_per_step(ddp), 16.0, rtol=1e-6)
    np.testing.assert_allclose(_samples_per_step(single), 16.0, rtol=1e-6)
