"""Exact extra peak tensor memory of training with TrainWatch, against bare training.

`overhead.py` reports peak RSS on the CPU, which moves by tens of MB between two runs of the same arm (Python's heap,
the allocator's free lists, imported libraries). This measures what `torch.cuda.max_memory_allocated` measures on a
GPU, on the CPU too: the peak of the tensor memory allocated by the training thread above what was allocated at
`on_train_start`, from the CPU allocator's own allocation and free events (`torch.profiler` with
`profile_memory=True`), so the watched-minus-bare difference is exact and repeatable. On CUDA it reads
`max_memory_allocated` (every thread) instead.

One caveat on the CPU: the profiler sees the training thread's allocations and frees only. A tensor allocated there
and freed by another thread (a record handed to trainwatch's sink thread) is counted live until its address is
reused: "peak" is an upper bound, and "without" counts those tensors as freed at once (a lower bound); the truth
lies between.

Arms: bare, trainwatch-default (every 50 steps), trainwatch-every1, as in `overhead.py`, one fit each (the figures
vary by under 0.1 MB between runs: the records in flight to the sink), over `--steps` steps (default 55: two logged steps at the default cadence).

`--batch-size` and `--image-size` change the training batch and the input size: a small batch of large images
is where the activation probe (64 inputs by default) could need more memory than a training step.

Run: .venv/bin/python benchmarks/memory.py [--models small-cnn resnet18] [--steps 55] [--batch-size B --image-size S]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from _models import MODELS, Batches
from overhead import Arm, arms, fit_once
from torch.profiler import ProfilerActivity, profile

ARMS = ("bare", "trainwatch-default", "trainwatch-every1")


class TensorPeak(pl.Callback):
    """Put first in `callbacks`: measures from its `on_train_start` to `on_train_end`."""

    def __init__(self) -> None:
        self.peak_mb = self.lower_mb = 0.0
        self.sites: list[tuple[float, str]] = []  # (MB, op stack) of the allocations alive at the peak
        self._prof: profile | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._prof is None:
            torch.cuda.synchronize()
            self.peak_mb = self.lower_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            return
        self._prof.__exit__(None, None, None)
        events = allocation_events(self._prof)
        self.peak_mb, self.sites = peak(events, freed_elsewhere_live=True)
        self.lower_mb, _ = peak(events, freed_elsewhere_live=False)


def allocation_events(prof: profile) -> list[tuple[int, int, int, Any]]:
    """(time ns, address, bytes: negative for a free, event node) of every CPU allocation and free, in time order."""
    nodes, events = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while nodes:
        node = nodes.pop()
        nodes += node.children
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.ptr, fields.alloc_size, node))
    return sorted(events, key=lambda e: e[0])


def peak(events: list[tuple[int, int, int, Any]], freed_elsewhere_live: bool) -> tuple[float, list[tuple[float, str]]]:
    """Peak MB of the tensors alive at once, and what was alive then. An allocation whose free this thread never saw
    (its address is allocated again first) is live until then, or freed at once when not `freed_elsewhere_live`."""
    freed_elsewhere = set()
    last_alloc: dict[int, int] = {}
    for i, (_, ptr, size, _) in enumerate(events):
        if size > 0:
            if ptr in last_alloc:
                freed_elsewhere.add(last_alloc[ptr])
            last_alloc[ptr] = i
        else:
            last_alloc.pop(ptr, None)
    live: dict[int, tuple[int, Any]] = {}
    now = best = 0
    at_best: dict[int, tuple[int, Any]] = {}
    for i, (_, ptr, size, node) in enumerate(events):
        if size > 0:
            if ptr in live:  # freed by another thread before this allocation
                now -= live.pop(ptr)[0]
            if freed_elsewhere_live or i not in freed_elsewhere:
                live[ptr] = (size, node)
                now += size
        elif ptr in live:
            now -= live.pop(ptr)[0]
        if now > best:
            best, at_best = now, dict(live)
    sites: Counter[str] = Counter()
    for size, node in at_best.values():
        names, parent = [], node.parent
        while parent is not None and len(names) < 4:
            names.append(parent.name)
            parent = parent.parent
        sites[" < ".join(names) or "(outside any op)"] += size
    return best / 2**20, [(b / 2**20, s) for s, b in sites.most_common()]


def run(model_name: str, steps: int, accelerator: str, tmp: Path, batch_size: int | None, image_size: int | None) -> None:
    _, shape, default_batch = MODELS[model_name]
    batch_size = batch_size or default_batch
    shape = (shape[0], image_size, image_size) if image_size else shape
    data = Batches(steps + 1, batch_size, shape, classes=10)
    table = arms(tmp)
    fit_once(model_name, data, 5, table["bare"], tmp / f"{model_name}-warm", accelerator, 0)  # one-time costs first
    results: dict[str, TensorPeak] = {}
    for name in ARMS:
        meter = TensorPeak()
        arm = Arm(name, table[name].cadence, lambda d, make=table[name].make, meter=meter: [meter, *make(d)])
        fit_once(model_name, data, steps, arm, tmp / f"{model_name}-{name}", accelerator, 0)
        results[name] = meter
    bare = results["bare"]
    print(f"\n{model_name}: batch {batch_size} of {'x'.join(map(str, shape))} inputs, {steps} steps")
    print(f"{'arm':<22} {'peak MB':>9} {'extra MB':>9} {'extra':>7} {'without':>9} {'extra':>7}")
    for name, meter in results.items():
        extra, low = meter.peak_mb - bare.peak_mb, meter.lower_mb - bare.lower_mb
        print(
            f"{name:<22} {meter.peak_mb:>9.2f} {extra:>+9.2f} {100 * extra / bare.peak_mb:>+6.1f}% "
            f"{meter.lower_mb:>9.2f} {100 * low / bare.lower_mb:>+6.1f}%"
        )
    for name, meter in results.items():
        if name != "bare" and meter.sites:
            bare_sites = dict((s, mb) for mb, s in bare.sites)
            more = [(mb - bare_sites.get(s, 0.0), s) for mb, s in meter.sites]
            more = [(mb, s) for mb, s in sorted(more, reverse=True) if mb > 0.01][:6]
            print(f"  {name}: alive at its peak and not at bare's: " + "; ".join(f"{mb:.2f} MB {s}" for mb, s in more))
    for name, meter in results.items():
        if name != "bare":
            print(f"extra peak tensor memory {model_name} {name}: {100 * (meter.peak_mb / bare.peak_mb - 1):+.1f}% (upper bound)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=55)
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default: the model's, as overhead.py)")
    parser.add_argument("--image-size", type=int, default=None, help="input height and width (default: the model's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("pytorch_lightning", "lightning.pytorch", "mlflow", "alembic", "trainwatch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    device = torch.cuda.get_device_name() if accelerator == "cuda" else f"CPU ({os.cpu_count()} cores), allocator events"
    print(f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, python {sys.version.split()[0]}; {device}")
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="trainwatch-memory-") as tmp:
        os.chdir(tmp)  # MLflow's SQLite stores put artifacts under ./mlruns
        try:
            for model_name in args.models:
                run(model_name, args.steps, accelerator, Path(tmp), args.batch_size, args.image_size)
        finally:
            os.chdir(cwd)


if __name__ == "__main__":
    main()
