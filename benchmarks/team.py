"""N watched training processes against one `mlflow server`: values/s delivered, nothing lost, p99 enqueue time.

Starts a real `mlflow server` (PostgreSQL backend on the machine's 127.0.0.1:5432 in a fresh database when it is
reachable, else SQLite; proxied artifacts in a temp dir) with `--workers W`, then N processes that each train the
tests' MLP for S steps with `TrainWatch(every_n_steps=1)` and time every `sink.submit(...)` on the training
thread. Afterwards every run is read back: each metric key must hold exactly S steps. Prints values/s (all values
of all runs / wall time from the first process start to the last process exit, final flushes included) and the
p50/p99/max submit time. Run it once per worker count to compare server settings:

    .venv/bin/python benchmarks/team.py --jobs 8 --steps 40 --workers 1
    .venv/bin/python benchmarks/team.py --jobs 8 --steps 40 --workers 4
    .venv/bin/python benchmarks/team.py --latency        # ms per small request for --workers 1, 2, 4 side by side
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.servers import MlflowServer  # noqa: E402

CHILD = r"""
import json, sys, time
import pytorch_lightning as pl
from tests.models import Classifier, blobs, loaders, mlp, trainer
from trainwatch import TrainWatch
uri, name, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
times = []

class TimeSubmit(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        sink = watch.sink
        submit = sink.submit
        def timed(item):
            t0 = time.perf_counter()
            submit(item)
            times.append(time.perf_counter() - t0)
        sink.submit = timed

pl.seed_everything(0, verbose=False)
train, val = loaders(blobs(n=512), batch_size=16)
watch = TrainWatch(every_n_steps=1, tracking_uri=uri, experiment_name="team-load", run_name=name, system_metrics=False,
                   landscape_samples=0, report=False)
trainer(max_steps=steps, callbacks=[watch, TimeSubmit()]).fit(Classifier(mlp()), train, val)
print(json.dumps({"run_id": watch.run_id, "submit_s": times}))
"""


def postgres_uri() -> tuple[str | None, str | None]:
    try:
        import psycopg
    except ImportError:
        return None, None
    name = f"tw_load_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError:
        return None, None
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", name


def drop(name: str) -> None:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def request_latency(requests: int = 200) -> None:
    """Median and p90 ms of the small requests trainwatch sends (a 50-value log_batch; a get_run read), per server
    worker count and backend, servers started one after the other, each on a fresh store."""
    from mlflow.entities import Metric

    for backend_kind in ("PostgreSQL", "SQLite"):
        for workers in (1, 2, 4):
            backend, db = postgres_uri() if backend_kind == "PostgreSQL" else (None, None)
            if backend_kind == "PostgreSQL" and backend is None:
                print("PostgreSQL is not reachable on 127.0.0.1:5432: skipped")
                break
            with tempfile.TemporaryDirectory() as tmp:
                server = MlflowServer(Path(tmp) / "server", backend_uri=backend, workers=workers).start()
                try:
                    client = mlflow.MlflowClient(server.url)
                    run_id = client.create_run(client.create_experiment("latency")).info.run_id
                    writes, reads = [], []
                    for i in range(requests):
                        batch = [Metric(f"m{k}", float(k), 0, i) for k in range(50)]
                        t0 = time.perf_counter()
                        client.log_batch(run_id, metrics=batch)
                        t1 = time.perf_counter()
                        client.get_run(run_id)
                        writes.append((t1 - t0) * 1000)
                        reads.append((time.perf_counter() - t1) * 1000)
                    print(
                        f"{backend_kind:10s} --workers {workers}: log_batch of 50 values median {np.median(writes):6.1f} ms "
                        f"(p90 {np.percentile(writes, 90):6.1f}); get_run median {np.median(reads):6.1f} ms (p90 {np.percentile(reads, 90):6.1f})"
                    )
                finally:
                    server.stop()
                    if db:
                        drop(db)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sqlite", action="store_true", help="use a SQLite backend even when PostgreSQL is reachable")
    parser.add_argument("--latency", action="store_true", help="only compare request latency across --workers 1, 2, 4")
    args = parser.parse_args()
    if args.latency:
        request_latency()
        return
    backend, db = (None, None) if args.sqlite else postgres_uri()
    with tempfile.TemporaryDirectory() as tmp:
        server = MlflowServer(Path(tmp) / "server", backend_uri=backend, workers=args.workers).start()
        try:
            print(f"mlflow server {server.url}: backend {'PostgreSQL' if backend else 'SQLite'}, --workers {args.workers}")
            t0 = time.perf_counter()
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", CHILD, server.url, f"job-{i}", str(args.steps)],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for i in range(args.jobs)
            ]
            outs = [p.communicate(timeout=900) for p in procs]
            wall = time.perf_counter() - t0
            failed = [err[-1500:] for p, (_, err) in zip(procs, outs, strict=True) if p.returncode != 0]
            if failed:
                raise SystemExit("a training process failed:\n" + failed[0])
            results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
            client = mlflow.MlflowClient(server.url)
            values, lost = 0, 0
            for r in results:
                keys = [k for k in client.get_run(r["run_id"]).data.metrics if not k.startswith(("train/findings", "val_"))]
                for key in keys:
                    steps = [m.step for m in client.get_metric_history(r["run_id"], key)]
                    values += len(steps)
                    if key.startswith(("grad_norm/", "update_ratio/", "act_mean/")):
                        lost += args.steps - len(set(steps))
            submits = np.array([s for r in results for s in r["submit_s"]]) * 1e6
            print(
                f"{args.jobs} processes x {args.steps} steps, every step logged: {values} values in {wall:.1f} s -> {values / wall:.0f} values/s"
            )
            print(f"missing logged steps over all per-group keys: {lost}")
            print(
                f"training-thread submit: p50 {np.percentile(submits, 50):.0f} us, p99 {np.percentile(submits, 99):.0f} us, max {submits.max():.0f} us ({len(submits)} submits)"
            )
        finally:
            server.stop()
            if db:
                drop(db)


if __name__ == "__main__":
    main()
