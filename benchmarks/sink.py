"""Throughput of trainwatch's MLflow sink against a real local `mlflow server`, and what it costs the training
thread.

Starts `mlflow server` (SQLite backend, local artifact root, a free port on 127.0.0.1), waits for /health and
stops it by its own pid at the end. Then, each against its own run:

  (a) delivered values/s
      sink      MlflowSink(MlflowWriter(client, run), Spool(dir), Publisher([], [])) — the callback's own
                construction with `writer="thread"`; `sink-process` the same with `ProcessWriter(url, run)`,
                the default `writer="process"` (timed once its child is ready): `--steps` records of `--metrics` values, each built with a Packer and submitted
                as `sink.submit(packer.ship())`, one every `--interval-ms` (faster than the server can take
                them, so the worker batches up to 1000 values per log_batch), then `flush()`; values/s counts
                from the first submit to the end of the flush
      log_batch the careful synchronous alternative: one `client.log_batch(run, 300 metrics)` per step
      naive     one `client.log_metric(run, key, value, step=...)` per value, on the calling thread
      (log_batch and naive run fewer steps, `--batch-steps` and `--naive-steps`; values/s is a rate either way)
  (b) training-thread cost of a logged step: each `sink.submit(packer.ship())` of the sink runs above is timed
      on its own (p50/p99 in µs; the worker is busy delivering the backlog meanwhile), and again in a run
      with the sink idle between records (`--idle-steps`, one every `--idle-interval-ms`). Building the
      Packer (`packer.metrics(...)` for 4 families) is timed separately.

Every run is checked by reading a metric's history back from the server.

Run: .venv/bin/python benchmarks/sink.py [--steps N] [--naive-steps N] [--batch-steps N] [--metrics M] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Metric

from trainwatch.publish import Publisher
from trainwatch.record import Packer
from trainwatch.sink import MlflowSink, MlflowWriter, Spool, create_run, open_client, tracking_uri_of
from trainwatch.writer_process import ProcessWriter

FAMILIES = ("grad_norm", "grad_max", "weight_norm", "update_ratio")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(tmp: Path, timeout_s: float = 120.0) -> Iterator[str]:
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin), "server",
        "--backend-store-uri", f"sqlite:///{tmp}/db.sqlite",
        "--default-artifact-root", str(tmp / "art"),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log = (tmp / "server.log").open("wb")
    # Its own session, so the workers it forks can be stopped with it through its process group id (= its pid).
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {tmp / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server did not answer /health within {timeout_s:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def keys(n: int) -> dict[str, list[str]]:
    """n metric keys spread over the families, like TrainWatch's per-group metrics."""
    per = {f: [] for f in FAMILIES}
    for i in range(n):
        per[FAMILIES[i % len(FAMILIES)]].append(f"layer{i // len(FAMILIES):03d}")
    return per


def make_packer(step: int, key_map: dict[str, list[str]], values: dict[str, torch.Tensor]) -> Packer:
    packer = Packer(step)
    for family, ks in key_map.items():
        packer.metrics(family, ks, values[family])
    return packer


def random_values(key_map: dict[str, list[str]], device: torch.device) -> dict[str, torch.Tensor]:
    return {f: torch.rand(len(ks), device=device) for f, ks in key_map.items()}


def check(client: mlflow.MlflowClient, run_id: str, key: str, expected: int) -> str:
    got = len(client.get_metric_history(run_id, key))
    return "ok" if got == expected else f"MISMATCH: {got} of {expected} values of {key!r} on the server"


def sink_run(
    client: mlflow.MlflowClient,
    experiment: str,
    tmp: Path,
    steps: int,
    n_metrics: int,
    interval_s: float,
    device: torch.device,
    process: bool = False,
) -> tuple[float, list[float], list[float], list[float], str]:
    """Submit `steps` records of `n_metrics` values, one every `interval_s`, then flush. Returns delivered
    values/s (first submit to end of flush) and, per logged step, the seconds spent building the Packer, in
    `ship()` and in `submit(ship())`. `process`: MLflow's client in a child process (`TrainWatch`'s default
    `writer="process"`), timed from when the child is ready."""
    run_id = create_run(client, experiment, "sink-process" if process else "sink")
    writer = ProcessWriter(tracking_uri_of(client), run_id) if process else MlflowWriter(client, run_id)
    sink = MlflowSink(writer, Spool(tmp / f"spool-{run_id}"), Publisher([], []))
    sink.start()
    if process and not writer.ready.wait(120):
        raise RuntimeError("the writer process did not start within 120 s")
    key_map = keys(n_metrics)
    build, ship, total = [], [], []
    t_start = time.perf_counter()
    for s in range(steps):
        values = random_values(key_map, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        packer = make_packer(s, key_map, values)
        t1 = time.perf_counter()
        pending = packer.ship()
        t2 = time.perf_counter()
        sink.submit(pending)
        t3 = time.perf_counter()
        build.append(t1 - t0)
        ship.append(t2 - t1)
        total.append(t3 - t1)
        if interval_s:
            time.sleep(interval_s)
    sink.flush()
    elapsed = time.perf_counter() - t_start
    sink.close()
    status = check(client, run_id, f"{FAMILIES[0]}/{key_map[FAMILIES[0]][0]}", steps)
    if sink.stats.overflowed or sink.stats.spooled_ops or sink.stats.failures:
        status += f"; overflowed {sink.stats.overflowed}, spooled {sink.stats.spooled_ops} ops, {sink.stats.failures} failures ({sink.last_error})"
    client.set_terminated(run_id)
    return steps * n_metrics / elapsed, build, ship, total, status


def log_batch_throughput(client: mlflow.MlflowClient, experiment: str, steps: int, n_metrics: int) -> tuple[float, str]:
    run_id = create_run(client, experiment, "log_batch")
    key_map = keys(n_metrics)
    t0 = time.perf_counter()
    for s in range(steps):
        ts = int(time.time() * 1000)
        metrics = [
            Metric(f"{f}/{k}", float(v), ts, s) for f, ks in key_map.items() for k, v in zip(ks, torch.rand(len(ks)).tolist(), strict=True)
        ]
        client.log_batch(run_id, metrics=metrics, synchronous=True)
    elapsed = time.perf_counter() - t0
    status = check(client, run_id, f"{FAMILIES[0]}/{key_map[FAMILIES[0]][0]}", steps)
    client.set_terminated(run_id)
    return steps * n_metrics / elapsed, status


def naive_throughput(client: mlflow.MlflowClient, experiment: str, steps: int, n_metrics: int) -> tuple[float, str]:
    run_id = create_run(client, experiment, "naive")
    key_map = keys(n_metrics)
    t0 = time.perf_counter()
    for s in range(steps):
        for f, ks in key_map.items():
            for k, v in zip(ks, torch.rand(len(ks)).tolist(), strict=True):
                client.log_metric(run_id, f"{f}/{k}", v, step=s)
    elapsed = time.perf_counter() - t0
    status = check(client, run_id, f"{FAMILIES[0]}/{key_map[FAMILIES[0]][0]}", steps)
    client.set_terminated(run_id)
    return steps * n_metrics / elapsed, status


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="records submitted to the sink per throughput run")
    parser.add_argument("--interval-ms", type=float, default=10.0, help="time between submitted records in the throughput runs")
    parser.add_argument("--batch-steps", type=int, default=20, help="steps of the synchronous log_batch runs")
    parser.add_argument("--naive-steps", type=int, default=1, help="steps of the naive log_metric runs (each is --metrics requests)")
    parser.add_argument("--metrics", type=int, default=300, help="metric values per step")
    parser.add_argument("--repeats", type=int, default=2, help="runs per method, interleaved")
    parser.add_argument("--idle-steps", type=int, default=40, help="records of the idle-sink submit-cost run (0 to skip)")
    parser.add_argument("--idle-interval-ms", type=float, default=250.0, help="time between records in the idle-sink run")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, mlflow {mlflow.__version__}, python {sys.version.split()[0]}; tensors on {device}")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    rates: dict[str, list[float]] = {"sink": [], "sink-process": [], "log_batch": [], "naive": []}
    busy: dict[str, list[float]] = {"build": [], "ship": [], "total": []}
    idle: dict[str, list[float]] = {"build": [], "ship": [], "total": []}
    with tempfile.TemporaryDirectory(prefix="trainwatch-sink-bench-") as tmp_name, mlflow_server(Path(tmp_name)) as url:
        tmp = Path(tmp_name)
        print(f"mlflow server at {url} (SQLite backend in {tmp})")
        client = open_client(url)
        experiment = "trainwatch-sink-bench"
        create_run(client, experiment, "warm-up")  # experiment creation and the first request off the clock

        for r in range(args.repeats):
            names = ("sink", "sink-process", "log_batch", "naive")
            for name in names if r % 2 == 0 else names[::-1]:
                if name.startswith("sink"):
                    rate, build, ship, total, status = sink_run(
                        client, experiment, tmp, args.steps, args.metrics, args.interval_ms / 1000, device, process=name == "sink-process"
                    )
                    busy["build"] += build
                    busy["ship"] += ship
                    busy["total"] += total
                    n = args.steps
                elif name == "log_batch":
                    rate, status = log_batch_throughput(client, experiment, args.batch_steps, args.metrics)
                    n = args.batch_steps
                else:
                    rate, status = naive_throughput(client, experiment, args.naive_steps, args.metrics)
                    n = args.naive_steps
                rates[name].append(rate)
                print(f"  [r{r}] {name:<12} {n:4d} steps x {args.metrics} values: {rate:8.0f} values/s  (read back: {status})", flush=True)
        if args.idle_steps:
            _, build, ship, total, status = sink_run(
                client, experiment, tmp, args.idle_steps, args.metrics, args.idle_interval_ms / 1000, device
            )
            idle.update(build=build, ship=ship, total=total)
            print(f"  idle-sink run: {args.idle_steps} records, one every {args.idle_interval_ms:g} ms (read back: {status})")

    naive = statistics.median(rates["naive"])
    sink_rate = statistics.median(rates["sink"])
    print()
    print(f"{'method':<46} {'values/s (median)':>18} {'vs naive':>9}")
    labels = {
        "sink": "MlflowSink, writer='thread' (batched)",
        "sink-process": "MlflowSink, writer='process' (batched)",
        "log_batch": "client.log_batch per step (synchronous)",
        "naive": "client.log_metric per value (synchronous)",
    }
    for name, label in labels.items():
        rate = statistics.median(rates[name])
        print(f"{label:<46} {rate:>18.0f} {rate / naive:>8.1f}x")
    us = lambda xs, q: 1e6 * pct(xs, q)
    print()
    print(f"training-thread cost per logged step ({args.metrics} values per record)")
    for title, samples in (("sink busy (throughput runs)", busy), ("sink idle", idle)):
        if not samples["total"]:
            continue
        print(f"  {title}, {len(samples['total'])} records:")
        for label, key in (
            ("sink.submit(packer.ship())", "total"),
            ("  of which packer.ship()", "ship"),
            ("building the Packer (4 families)", "build"),
        ):
            xs = samples[key]
            print(f"    {label:<34} p50 {us(xs, 0.5):8.1f} µs   p99 {us(xs, 0.99):8.1f} µs   max {us(xs, 1.0):8.1f} µs")
    print()
    print(f"sink throughput: {sink_rate:.0f} values/s vs naive log_metric {naive:.0f} values/s ({sink_rate / naive:.1f}x)")
    process_rate = statistics.median(rates["sink-process"])
    print(
        f"sink throughput, writer process: {process_rate:.0f} values/s ({process_rate / naive:.1f}x naive, {process_rate / sink_rate:.2f}x the thread writer)"
    )
    for title, samples in (("busy", busy), ("idle", idle)):
        if samples["total"]:
            print(f"submit cost ({title} sink): p50 {us(samples['total'], 0.5):.1f} µs, p99 {us(samples['total'], 0.99):.1f} µs")


if __name__ == "__main__":
    main()
