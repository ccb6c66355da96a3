"""Per-logged-step gradient and weight statistics: trainwatch's CPU paths against the fused `_foreach_norm` ones.

For each model's real parameter shapes (random gradients), times side by side, interleaved over `--repeats`:
  max |g|        `gradients.max_abs` (aminmax per tensor on CPU)   vs  `_foreach_norm(ord=inf)`
  zero count     `gradients.count_nonzero` (masked bits on CPU)   vs  `_foreach_norm(ord=0)`
  scattered 0s   the same, with 30 % of the entries zero at random  vs  `torch.count_nonzero` per tensor (the CPU
                 path up to 2026-11-24, fast on a run of zeros and ten times slower on scattered ones)
  NaN count      `gradients.count_nonfinite` once a gradient holds a NaN (bits of g − g on CPU)  vs  the L0 norm
                 of g·0 (what CUDA uses)
  update norms   the pre-step copy and ‖Δw‖ of a step: `WeightCopy.take` + `.distances` (the page-cache file
                 beside the CPU, pinned host memory beside a GPU) vs a fresh in-memory `gradients.snapshot` +
                 `gradients.update_norms` (what CUDA uses); the timed step in between is the same `_foreach_add_`
  non-finite     `NonfiniteWatch.check` on a clean step            (one number: it runs every optimizer step)
and checks that both sides of each pair agree. Prints the ratio fused / ours.

Run: .venv/bin/python benchmarks/grad_stats.py [--models small-cnn resnet18] [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _models import MODELS

from trainwatch.probes import gradients as G
from trainwatch.probes.nonfinite import NonfiniteWatch
from trainwatch.probes.weight_copy import WeightCopy


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(name: str, ours: Callable[[], object], fused: Callable[[], object], repeats: int, label: str = "fused/fresh") -> None:
    ours(), fused()  # warm up
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(ours))
        b.append(timed(fused))
    mo, mf = statistics.median(a) * 1e3, statistics.median(b) * 1e3
    print(f"  {name:14s} ours {mo:8.3f} ms   {label} {mf:8.3f} ms   ratio {mf / mo:6.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}; device {device}; {torch.get_num_threads()} thread(s)")
    for name in args.models:
        bench_model(name, device, args.repeats)


def bench_model(name: str, device: torch.device, repeats: int) -> None:
    factory, _, _ = MODELS[name]
    params = [p.to(device) for p in factory().parameters()]
    g = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(p.shape, generator=g, device=device) for p in params]
    for t in grads:
        t.view(-1)[: max(1, t.numel() // 10)] = 0  # some exact zeros
    print(f"{name}: {len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.2f}M parameters")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn: Callable[[], object]) -> Callable[[], object]:
        return lambda: (fn(), sync())

    fused_max = lambda: torch.stack(torch._foreach_norm(grads, float("inf"), dtype=torch.float32))
    fused_zero = lambda: torch.stack(torch._foreach_norm(grads, 0.0, dtype=torch.float32))
    assert torch.equal(G.max_abs(grads), fused_max()) and torch.equal(G.count_nonzero(grads), fused_zero())
    compare("max |g|", run(lambda: G.max_abs(grads)), run(fused_max), repeats)
    compare("zero count", run(lambda: G.count_nonzero(grads)), run(fused_zero), repeats)
    scattered = [t * (torch.rand(t.shape, generator=g, device=device) >= 0.3) for t in grads]
    per_tensor = lambda: torch.stack([torch.count_nonzero(t) for t in scattered]).float()
    assert torch.equal(G.count_nonzero(scattered), per_tensor())
    compare("scattered 0s", run(lambda: G.count_nonzero(scattered)), run(per_tensor), repeats, "count_nonzero")
    with_nan = [t.clone() for t in grads]
    with_nan[len(grads) // 2].view(-1)[0] = float("nan")
    largest = G.max_abs(with_nan)
    l0_of_zeroed = lambda: torch.cat([G.norms(torch._foreach_mul(c, 0.0), 0.0) for c in G._chunks(with_nan)])
    assert torch.equal(G.count_nonfinite(with_nan, largest), l0_of_zeroed()) and G.count_nonfinite(with_nan).sum() == 1
    compare("NaN count", run(lambda: G.count_nonfinite(with_nan, largest)), run(l0_of_zeroed), repeats, "L0 of g*0")
    step = [torch.full_like(p, 1e-3) for p in params]
    copy = WeightCopy(params)

    @torch.no_grad()
    def filed() -> torch.Tensor:
        copy.take(params)
        torch._foreach_add_(params, step)
        return copy.distances(params)

    @torch.no_grad()
    def fresh() -> torch.Tensor:
        before = G.snapshot(params)
        torch._foreach_add_(params, step)
        return G.update_norms(params, before)

    # both sides sum squares in float32 (over different chunks): each is within ~5e-4 of a float64 norm on ResNet-18's
    # 2.4 M-element tensors when every element moves alike, as here
    torch.testing.assert_close(filed(), fresh(), rtol=2e-3, atol=0)
    compare("update norms", run(filed), run(fresh), repeats)
    copy.close()
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad
    watch = NonfiniteWatch(params, torch.zeros(len(params), dtype=torch.long, device=device), 1, device)
    calls = 200
    per_call = statistics.median(timed(run(lambda: [watch.check(i) for i in range(calls)])) for _ in range(5)) / calls
    print(f"  {'non-finite':14s} check on a clean step {per_call * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
