"""Where a watched step's time goes: TrainWatch's hooks and the pieces of a logged step, timed inside a real fit.

One `pl.Trainer.fit` of `overhead.py`'s models and arms, with `time.perf_counter` around each TrainWatch hook and
around the functions a logged step spends its time in (wrapped for this run only, then put back). Prints, per
timed function, how often it ran and its median and mean wall time, beside the fit's median step. Unlike
`grad_stats.py`, which times the same functions alone in a loop, these figures include what a training step leaves
in the caches and what the writer process does on the other core at the same time.

Run: .venv/bin/python benchmarks/hook_times.py [--model resnet18] [--arm trainwatch-every1] [--steps 80]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from _models import MODELS, Batches
from overhead import arms, fit_once

from trainwatch import callback, capture
from trainwatch.probes import activations, gradients

# (label, owner, attribute): indented labels run inside the one above them
TIMED = [
    ("on_train_batch_start", callback.TrainWatch, "on_train_batch_start"),
    ("on_before_optimizer_step", callback.TrainWatch, "on_before_optimizer_step"),
    ("  gradient statistics", gradients, "grad_stats"),
    ("  pre-step weight copy", capture.Capture, "_take_pre_step"),
    ("on_train_batch_end", callback.TrainWatch, "on_train_batch_end"),
    ("  updates and distances", capture.Capture, "updates"),
    ("    distances from the weight copies", capture, "measure"),
    ("  probe forward and summaries", capture.Capture, "probe_activations"),
    ("    one activation summary", activations, "summary_and_fired"),
]


@contextmanager
def timing(times: dict[str, list[float]]) -> Iterator[None]:
    """Wrap every TIMED function to record its wall time; put the originals back on exit."""
    originals = [(owner, name, owner.__dict__[name]) for _, owner, name in TIMED]
    for (label, owner, name), (_, _, original) in zip(TIMED, originals, strict=True):
        setattr(owner, name, _timed(original, times[label]))
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def _timed(fn: Callable, out: list[float]) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            out.append(time.perf_counter() - t0)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    parser.add_argument("--arm", default="trainwatch-every1", help="an arm of overhead.py (default trainwatch-every1)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=5, help="calls discarded per function (the first ones start things up)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, shape, batch_size = MODELS[args.model]
    times: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp, timing(times):
        arm = arms(Path(tmp))[args.arm]
        data = Batches(args.steps + 1, batch_size, shape, classes=10)
        timer, _ = fit_once(args.model, data, args.steps, arm, Path(tmp) / "work", "cpu", seed=0)
    steps = timer.step_times()[args.warmup :]
    print(
        f"{args.model} {args.arm}: {len(steps)} steps, median {statistics.median(steps) * 1e3:.2f} ms, mean {statistics.mean(steps) * 1e3:.2f} ms"
    )
    print(f"{'':36s} {'calls':>6s} {'median ms':>10s} {'mean ms':>9s}")
    for label, _, _ in TIMED:
        calls = times[label][args.warmup :] if len(times[label]) > 2 * args.warmup else times[label]
        with suppress(statistics.StatisticsError):
            print(f"{label:36s} {len(calls):6d} {statistics.median(calls) * 1e3:10.2f} {statistics.mean(calls) * 1e3:9.2f}")


if __name__ == "__main__":
    main()
