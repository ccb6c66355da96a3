"""Per-logged-step gradient and weight statistics: trainwatch's CPU paths against the fused `_foreach_norm` ones.

For each model's real parameter shapes (random gradients), times side by side, interleaved over `--repeats`:
  max |g|        `gradients.max_abs` (on CPU the integer bits of |g|, as below)  vs  `_foreach_norm(ord=inf)`
  zero count     `gradients.count_nonzero` (on CPU the integer bits of |g|)  vs  `_foreach_norm(ord=0)`
  max + zeros    `gradients.nonzero_and_max_abs`, both from one pass (what a logged step uses)  vs  two passes:
                 `aminmax` per tensor and the bits count (the CPU path up to the ninth stop)
  scattered 0s   the same, with 30 % of the entries zero at random  vs  `torch.count_nonzero` per tensor (the CPU
                 path up to 2026-11-24, fast on a run of zeros and ten times slower on scattered ones)
  NaN count      `gradients.count_nonfinite` once a gradient holds a NaN (bits of g − g on CPU)  vs  the L0 norm
                 of g·0 (what CUDA uses)
  update norms   the pre-step copy and ‖Δw‖ of a step: `WeightCopy.take` + `.distances` (the page-cache file
                 beside the CPU, pinned host memory beside a GPU) vs a fresh in-memory `gradients.snapshot` +
                 `gradients.update_norms` (what CUDA uses); the timed step in between is the same `_foreach_add_`
  distances      `WeightCopy.distances` beside the CPU (the file mapped, w − copy in a scratch chunk)  vs  the
                 file read back chunk by chunk into a buffer and subtracted there (the CPU path up to the ninth stop)
  update + init  `weight_copy.measure` of the pre-step copy (with its norms) and the initial copy, one pass over the
                 weights (what a logged step uses beside the CPU)  vs  one pass per copy (up to the tenth stop)
  small record   (weights of 4 MB or less) a logged step's copies now: a fresh pre-step copy in memory and the
                 initial one in process memory  vs  both in files, as up to the tenth stop (take, step, `measure`)
The update-norm, distance and update + init rows time the copies in files (`IN_MEMORY_BYTES` set to 0), as beside
the CPU for any model over 4 MB of weights.
  non-finite     `NonfiniteWatch.check` on a clean step            (one number: it runs every optimizer step)
and checks that both sides of each pair agree. Prints the ratio fused / ours. With `--cold` a 256 MB buffer is read
before every timed call, so each call starts with the caches cold, as a logged step does after a training step's
forward and backward (the large models' figures; on the small CNN it mostly times refetching Python's own data).

Run: .venv/bin/python benchmarks/grad_stats.py [--models small-cnn resnet18] [--repeats 20] [--threads 1] [--cold]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _models import MODELS

from trainwatch.probes import gradients as G
from trainwatch.probes import weight_copy
from trainwatch.probes.nonfinite import NonfiniteWatch
from trainwatch.probes.weight_copy import Measured, WeightCopy, _segments, measure

_EVICT: torch.Tensor | None = None  # read before each timed call with --cold


def timed(fn: Callable[[], object]) -> float:
    if _EVICT is not None:
        _EVICT.sum()  # read, not written: no dirty lines to write back inside the timed call
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
    parser.add_argument("--cold", action="store_true", help="evict the caches before each timed call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global _EVICT
    _EVICT = torch.zeros(64 << 20) if args.cold else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}; device {device}; {torch.get_num_threads()} thread(s); caches {'cold' if args.cold else 'warm'}")
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
    if device.type == "cpu":
        two_passes = lambda: (G._abs_pass(grads).nonzero, torch.stack([aminmax_abs(t) for t in grads]))
        assert all(torch.equal(a, b) for a, b in zip(G.nonzero_and_max_abs(grads), two_passes(), strict=True))
        compare("max + zeros", run(lambda: G.nonzero_and_max_abs(grads)), run(two_passes), repeats, "two passes")
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
    small = sum(p.numel() * p.element_size() for p in params) <= weight_copy.IN_MEMORY_BYTES
    in_memory, weight_copy.IN_MEMORY_BYTES = weight_copy.IN_MEMORY_BYTES, 0  # the file path, whatever the model's size
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
    if device.type == "cpu":
        copy.take(params)
        with torch.no_grad():
            torch._foreach_add_(params, step)
        torch.testing.assert_close(copy.distances(params), read_back(copy, params), rtol=1e-6, atol=0)
        compare("distances", lambda: copy.distances(params), lambda: read_back(copy, params), repeats, "read back")
        init = WeightCopy([p - 1e-2 for p in params])
        one_pass = lambda: measure(params, [copy, init], copy_norms=True)
        two_passes = lambda: (measure(params, [copy], copy_norms=True), init.distances(params))
        measured, (alone, from_init) = one_pass(), two_passes()
        assert torch.equal(measured.distances[0], alone.distances[0]) and torch.equal(measured.copy_norms, alone.copy_norms)
        assert torch.equal(measured.distances[1], from_init)
        compare("update + init", one_pass, two_passes, repeats, "two passes")
        if small:  # what a logged step of this model does now: a fresh pre-step copy, the initial one in memory
            weight_copy.IN_MEMORY_BYTES = in_memory
            init_in_memory = WeightCopy([p - 1e-2 for p in params])

            @torch.no_grad()
            def small_record() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                before = G.snapshot(params)
                weight = G.norms(before, 2.0)
                torch._foreach_add_(params, step)
                return G.update_norms(params, before), weight, init_in_memory.distances(params)

            @torch.no_grad()
            def filed_record() -> Measured:
                copy.take(params)
                torch._foreach_add_(params, step)
                return measure(params, [copy, init], copy_norms=True)

            compare("small record", run(small_record), run(filed_record), repeats, "in files")
            init_in_memory.close()
        init.close()
    weight_copy.IN_MEMORY_BYTES = in_memory
    copy.close()
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad
    watch = NonfiniteWatch(params, torch.zeros(len(params), dtype=torch.long, device=device), 1, device)
    calls = 200
    per_call = statistics.median(timed(run(lambda: [watch.check(i) for i in range(calls)])) for _ in range(5)) / calls
    print(f"  {'non-finite':14s} check on a clean step {per_call * 1e6:8.1f} us")


def aminmax_abs(t: torch.Tensor) -> torch.Tensor:
    low, high = torch.aminmax(t)
    return torch.maximum(-low, high).float()


def read_back(copy: WeightCopy, params: list[torch.Tensor]) -> torch.Tensor:
    """`WeightCopy.distances` as it was up to the ninth stop: each chunk of the file read into one buffer (the
    kernel copies it), then w subtracted from it in place."""
    flat = [p.detach().reshape(-1) for p in params]
    squares = torch.zeros(len(params), dtype=torch.float64)
    buffer = torch.empty(max(c.nbytes for c in copy._chunks), dtype=torch.uint8)
    copy._file.seek(0)
    for chunk in copy._chunks:
        raw = buffer[: chunk.nbytes]
        copy._file.readinto(raw.numpy())
        before = _segments(raw, chunk)
        torch._foreach_sub_(before, [flat[i][start : start + n] for i, start, n in chunk.segments])
        owners = torch.tensor([i for i, _, _ in chunk.segments])
        squares.index_add_(0, owners, G.norms(before, 2.0).double().square())
    return squares.sqrt().float()


if __name__ == "__main__":
    main()
