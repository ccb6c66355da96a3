"""Memory of the sink's backlog when the tracking server is slower than training: records moved to a file by the
overflow's spill thread (trainwatch's default) against every parked record kept in memory (the behaviour before).

A real SQLite MLflow store behind the real `MlflowWriter`, slowed by `--delay-ms` per delivered operation (the
stand-in for a distant server), and a small sink queue (`--queue`), so the backlog builds at once. Each arm
submits `--records` ResNet-18-sized records as a training loop logging every step would (`sink.submit(packer.ship())`:
60 metrics, the 62×7 parameter table and the 60×98 activation summaries; a record still in flight holds its
tensors and their host copy, about 100 KB), waits until the spill thread has caught up, and reads the growth of the
process's resident memory; then it delivers everything and checks the last step arrived. A small untimed run
first absorbs one-time costs; the arms then alternate over `--repeats`, in one process.

Prints per arm: resident memory added by the backlog (MB), records in memory and in the file at that moment,
submit p50/p99 (µs, the training thread's cost), seconds to deliver the backlog, and the ratio of the memory.

Run: .venv/bin/python benchmarks/backlog.py [--records 2000] [--delay-ms 2] [--queue 100] [--repeats 2]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch

from trainwatch.ops import Op
from trainwatch.overflow import Overflow
from trainwatch.publish import Publisher
from trainwatch.record import Packer
from trainwatch.sink import MlflowSink, MlflowWriter, Spool, create_run, open_client

KEYS = [f"g{i}" for i in range(60)]


class SlowWriter:
    """The real writer, `delay_s` slower per op: a server far away."""

    def __init__(self, writer: MlflowWriter, delay_s: float) -> None:
        self.writer, self.delay_s = writer, delay_s

    def __call__(self, op: Op) -> None:
        time.sleep(self.delay_s)
        self.writer(op)


def record(step: int) -> Packer:
    packer = Packer(step)
    packer.metrics("grad_norm", KEYS, torch.rand(len(KEYS)))
    packer.array("param_stats", torch.rand(62, 7))
    packer.array("activations", torch.rand(60, 98))
    return packer


def rss_mb() -> float:
    """Resident memory now, after returning freed heap pages to the system (glibc), so frees since count."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss / 2**20


def one_arm(name: str, uri: str, tmp: Path, args: argparse.Namespace) -> dict[str, float]:
    client = open_client(uri)
    run_id = create_run(client, "backlog", name)
    publisher = Publisher([f"p{i}" for i in range(62)], [f"m{i}" for i in range(60)])
    sink = MlflowSink(SlowWriter(MlflowWriter(client, run_id), args.delay_ms / 1e3), Spool(tmp / name), publisher, queue_size=args.queue)
    if name == "in-memory":  # the behaviour before the spill thread: every parked record stays in memory
        sink._overflow = Overflow(in_memory=10**9)
    sink.start()
    before = rss_mb()
    submits = []
    for step in range(args.records):
        item = record(step).ship()
        t0 = time.perf_counter()
        sink.submit(item)
        submits.append(time.perf_counter() - t0)
    deadline = time.monotonic() + 60
    while sink._overflow.in_memory() > 64 and name == "spill" and time.monotonic() < deadline:
        time.sleep(0.05)
    grown = rss_mb() - before
    in_memory, on_disk = sink._overflow.in_memory() + sink._queue.qsize(), len(sink._overflow) - sink._overflow.in_memory()
    t0 = time.perf_counter()
    assert sink.flush(timeout=600), "the backlog was not delivered in 10 minutes"
    deliver_s = time.perf_counter() - t0
    sink.close()
    last = max(m.step for m in client.get_metric_history(run_id, "grad_norm/g0"))
    assert last == args.records - 1, f"{name}: last step {last}"
    submits.sort()
    return {
        "grown": grown,
        "in_memory": in_memory,
        "on_disk": on_disk,
        "p50": submits[len(submits) // 2] * 1e6,
        "p99": submits[int(len(submits) * 0.99)] * 1e6,
        "deliver_s": deliver_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--delay-ms", type=float, default=2.0)
    parser.add_argument("--queue", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("trainwatch").setLevel(logging.ERROR)  # the sink's overflow warnings, once per arm
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; {args.records} records, queue {args.queue}, server {args.delay_ms} ms slower per op")
    results: dict[str, list[dict[str, float]]] = {"spill": [], "in-memory": []}
    with tempfile.TemporaryDirectory(prefix="trainwatch-backlog-") as d:
        tmp = Path(d)
        uri = f"sqlite:///{tmp}/mlflow.db"
        warm = argparse.Namespace(**{**vars(args), "records": min(args.records, 200)})
        one_arm("spill", uri, tmp / "warm-up", warm)
        one_arm("in-memory", uri, tmp / "warm-up", warm)
        for r in range(args.repeats):
            for name in ["spill", "in-memory"] if r % 2 == 0 else ["in-memory", "spill"]:
                res = one_arm(name, uri, tmp / f"r{r}", args)
                results[name].append(res)
                print(
                    f"  [r{r}] {name:9s} +{res['grown']:7.1f} MB  in memory {res['in_memory']:5.0f}  in the file {res['on_disk']:5.0f}  "
                    f"submit p50 {res['p50']:6.1f} us p99 {res['p99']:7.1f} us  delivered in {res['deliver_s']:5.1f} s"
                )
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
    for name, m in med.items():
        print(
            f"{name:9s} backlog memory +{m['grown']:.1f} MB, submit p50 {m['p50']:.1f} us / p99 {m['p99']:.1f} us, delivered in {m['deliver_s']:.1f} s"
        )
    print(f"backlog memory: in-memory / spill = {med['in-memory']['grown'] / max(med['spill']['grown'], 0.1):.1f}x")


if __name__ == "__main__":
    main()
