"""The team path: a real `mlflow server` on the machine's PostgreSQL (proxied artifacts), several watched training
processes against it at once, and names MLflow rejects."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest

from tests.servers import MlflowServer

psycopg = pytest.importorskip("psycopg")
PG = "postgresql://postgres@127.0.0.1:5432"
pytestmark = pytest.mark.slow

TRAIN = r"""
import sys, json, time
import pytorch_lightning as pl
from tests.models import Classifier, blobs, loaders, mlp, trainer
from trainwatch import TrainWatch
uri, name, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
pl.seed_everything(0, verbose=False)
train, val = loaders(blobs(n=256), batch_size=16)
watch = TrainWatch(every_n_steps=1, tracking_uri=uri, experiment_name="team", run_name=name, system_metrics=False, landscape_samples=0)
trainer(max_steps=steps, callbacks=[watch]).fit(Classifier(mlp()), train, val)
print(json.dumps({"run_id": watch.run_id}))
"""


@pytest.fixture
def postgres_db():
    """A fresh database on the machine's PostgreSQL (trust auth), dropped afterwards."""
    name = f"tw_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(f"{PG}/test", autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL at {PG}: {error}")
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"  # SQLAlchemy 2.1: name the psycopg 3 driver
    with psycopg.connect(f"{PG}/test", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _train(uri: str, name: str, steps: int) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[1]
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN, uri, name, str(steps)], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_concurrent_watched_trainings_on_a_postgresql_server_lose_nothing(postgres_db, tmp_path):
    steps, jobs = 10, 8  # the N = 8 (benchmarks/team.py measures the same with 40 steps)
    with MlflowServer(tmp_path / "server", backend_uri=postgres_db, workers=1) as server:  # docker/'s default
        procs = [_train(server.url, f"job-{i}", steps) for i in range(jobs)]
        outs = [p.communicate(timeout=480) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err[-2000:]
        run_ids = [json.loads(out.strip().splitlines()[-1])["run_id"] for out, _ in outs]
        client = mlflow.MlflowClient(server.url)
        for run_id in run_ids:
            run = client.get_run(run_id)
            assert run.info.status == "FINISHED"
            history = client.get_metric_history(run_id, "grad_norm/net.0")
            assert sorted(m.step for m in history) == list(range(steps))  # every logged step exactly once
            paths = {f.path for f in client.list_artifacts(run_id, "trainwatch")}
            assert {"trainwatch/groups.json", "trainwatch/diagnosis.json", "trainwatch/report.html"} <= paths
        # the runs are in PostgreSQL, the artifacts behind the server's proxy (the trainers had no store credentials)
        with psycopg.connect(postgres_db.replace("postgresql+psycopg", "postgresql")) as conn:
            count = conn.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'").fetchone()[0]
        assert count == jobs
        assert any((tmp_path / "server" / "artifacts").rglob("groups.json"))


def test_jobs_starting_at_once_share_one_new_experiment(postgres_db, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from trainwatch.sink import create_run

    with MlflowServer(tmp_path / "server", backend_uri=postgres_db, workers=2) as server:  # requests really in parallel
        clients = [mlflow.MlflowClient(server.url) for _ in range(8)]
        with ThreadPoolExecutor(8) as pool:  # lookup-then-create from 8 clients at once: some lose the race
            run_ids = list(pool.map(lambda c: create_run(c, "fresh-experiment", None), clients))
        runs = [clients[0].get_run(r) for r in run_ids]
        assert len(set(run_ids)) == 8 and len({r.info.experiment_id for r in runs}) == 1
