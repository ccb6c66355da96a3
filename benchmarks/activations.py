"""The activation probe's per-module work: trainwatch's histogram and summary against the straightforward way.

For each benchmark model, the outputs of every leaf module on a probe batch (64 inputs by default, as
`TrainWatch(probe_samples=64)`) are captured once; then, interleaved, medians of `--repeats`:

  histogram  `activations.histogram_counts` (table lookup on the float's top 13 bits, one comparison, one bincount)
             vs a reference written the obvious way: `torch.bucketize` of |x| on the edges, sign and zero/NaN/±Inf
             masks, one bincount; both checked equal on every module before timing
  summary    `activations.activation_summary` (histogram + sums + dead units), for the total per probe
  forward    the probe batch's eval-mode forward itself, for scale

Run: .venv/bin/python benchmarks/activations.py [--models ...] [--samples 64] [--repeats 9] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _models import MODELS
from torch import Tensor

from trainwatch.probes import activations as A


def reference_histogram(x: Tensor, edges: Tensor = A.EDGES) -> Tensor:
    """The same slots as `histogram_counts`, the obvious way: bucketize magnitudes, then mirror by sign."""
    x = x.detach().reshape(-1).to(torch.float32)
    n_edges = len(edges)
    e32 = edges.to(torch.float32)  # the largest float32 <= e, as trainwatch compares
    e32 = torch.where(e32.double() > edges.double(), torch.nextafter(e32, torch.zeros_like(e32)), e32).to(x.device)
    m = torch.bucketize(x.abs(), e32)  # #{edges < |x|}
    slot = torch.where(x < 0, n_edges - m, n_edges + 2 + m)
    slot = torch.where(x == 0, n_edges + 1, slot)
    slot = torch.where(torch.isnan(x), 2 * n_edges + 3, slot)
    slot = torch.where(x == float("inf"), 2 * n_edges + 4, slot)
    slot = torch.where(x == float("-inf"), 2 * n_edges + 5, slot)
    return torch.bincount(slot, minlength=A.num_bins(edges)).to(torch.float64)


def module_outputs(model: torch.nn.Module, inputs: Tensor) -> list[Tensor]:
    outs: list[Tensor] = []
    leaves = [m for _, m in model.named_modules() if not list(m.children())]
    handles = [m.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone())) for m in leaves]
    with torch.no_grad():
        model(inputs)
    for h in handles:
        h.remove()
    return outs


def elapsed_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def bench_model(name: str, samples: int, repeats: int, device: torch.device, sync) -> None:
    make, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = make().to(device).eval()
    inputs = torch.randn(samples, *shape, device=device)
    outs = module_outputs(model, inputs)
    for out in outs:
        if not torch.equal(A.histogram_counts(out), reference_histogram(out)):
            raise SystemExit(f"{name}: the histograms differ on a {tuple(out.shape)} output")
    numel = sum(o.numel() for o in outs)
    print(f"{name}: {len(outs)} leaf modules, {numel / 1e6:.2f} M activation values for {samples} probe inputs (histograms equal)")
    ours = lambda: ([A.histogram_counts(o) for o in outs], sync())
    ref = lambda: ([reference_histogram(o) for o in outs], sync())
    times: dict[str, list[float]] = {"ours": [], "ref": [], "summary": [], "forward": []}
    for r in range(repeats):  # interleaved, so drift hits every side alike
        for label, fn in (("ours", ours), ("ref", ref)) if r % 2 == 0 else (("ref", ref), ("ours", ours)):
            times[label].append(elapsed_ms(fn))
        times["summary"].append(elapsed_ms(lambda: ([A.activation_summary(o) for o in outs], sync())))
        with torch.no_grad():
            times["forward"].append(elapsed_ms(lambda: (model(inputs), sync())))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"  histogram   ours {med['ours']:8.2f} ms   bucketize reference {med['ref']:8.2f} ms   ratio {med['ref'] / med['ours']:5.1f}x")
    print(f"  summary     ours {med['summary']:8.2f} ms   (histogram, sums and dead units of every module)")
    print(f"  forward          {med['forward']:8.2f} ms   (the probe batch in eval mode, no hooks)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--samples", type=int, default=64, help="probe inputs (TrainWatch's probe_samples)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (overhead.py uses cores - 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}; device {device}; {torch.get_num_threads()} thread(s); cpus {os.cpu_count()}")
    for name in args.models:
        bench_model(name, args.samples, args.repeats, device, sync)


if __name__ == "__main__":
    main()
