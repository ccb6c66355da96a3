"""Real DDP: 2 CPU processes on gloo under Lightning's `ddp` strategy."""

from __future__ import annotations

import io
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
def test_ddp_one_run_rank_zero_logs_and_histograms_sum_over_ranks(tmp_path, every, act_every):
    uri = f"sqlite:///{tmp_path}/ddp.db"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), uri, str(every), str(act_every)], cwd=tmp_path, capture_output=True, text=True, timeout=300
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
