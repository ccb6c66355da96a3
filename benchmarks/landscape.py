"""Seconds per grid point of a 2-D loss landscape: trainwatch's engines against loss-landscapes and the forward floor.

For each model, the same model (same initial weights; BatchNorm affine parameters moved off their init, as after
training, and eval mode on running statistics from one train-mode pass over the data) and the same evaluation
batch of `--samples` random inputs with random labels; a `--grid` x `--grid` plane (grid² points). Arms:

  ours-loop        Surface.evaluate(points, mode="loop"): each point written into the model's own parameters
                   (fused in-place foreach ops), one forward per point
  ours-vmap        mode="vmap": torch.func.vmap over stacked parameters, `--chunk` points per call
                   (reported as skipped if vmap cannot batch the model)
  ours-auto        mode="auto": times each engine on 4 points after a one-point warm-up (the timed points are
                   results), then keeps the faster engine for the rest; on a 3x3 grid that choice is most of the work
  loss-landscapes  loss_landscapes.random_plane(model, Loss(CrossEntropyLoss(), x, y), distance=1,
                   steps=--grid, normalization="filter", deepcopy_model=True): the same number of points
                   (its plane has no centre point and other semantics, see tests/landscape/test_reference.py;
                   only the cost is compared). It is CPU-only and never calls eval(): it gets an eval-mode CPU
                   copy of the model, so it computes the same kind of loss. On CUDA it runs on the CPU, for
                   reference, and its ratio to ours is then a cross-device ratio (--no-reference skips it).
  floor            one plain `model(x)` over the evaluation batch under torch.no_grad() in eval mode: the cost
                   of a point if writing the parameters and the loss were free.

Every landscape arm is timed end to end: its two filter-normalised directions (ours: directions_for; theirs:
uniform, orthogonalised, filter-normalised), its setup and every point of the grid; per point = total / grid².
The arms are interleaved in one process: repeat r runs every arm once, in an order rotated by r, after one
untimed warm-up of each on a few points; the table shows the median and the minimum over repeats.

Models: resnet20 (the CIFAR ResNet-20: 3x3 stem, 3 stages of 3 basic blocks at 16/32/64 channels, BatchNorm,
0.27M parameters, on random 3x32x32 inputs) and mlp (64-32-10 on random 64-d inputs, digits-sized: the cost
of a point is dominated by per-point overhead, not by the forward).

Run:
  .venv/bin/python benchmarks/landscape.py                  # quick: mlp 11x11, resnet20 3x3, 256 samples (~2 min on 2 CPU cores)
  .venv/bin/python benchmarks/landscape.py --grid 51        # the issue's full setting, 51x51 = 2601 points per arm
                                                            # (ResNet-20 on CPU: about 20 min per arm; use a GPU
                                                            # and --no-reference, or --models mlp)
  .venv/bin/python benchmarks/landscape.py --models mlp --grid 21 --repeats 5 --threads 2 --device cpu

--threads defaults to 1: on a shared 2-core machine a second intra-op thread waiting for a busy core made a
small forward up to ~50x slower; pass --threads 0 to keep torch's default.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainwatch.landscape.directions import directions_for
from trainwatch.landscape.surface import Surface, grid_axis, grid_points

QUICK_GRID = {"mlp": 11, "resnet20": 3}  # without --grid: the quick run
ARMS = ("ours-loop", "ours-vmap", "ours-auto", "loss-landscapes", "floor")
FLOOR_MIN_SECONDS = 0.5


# --- models -----------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 (projection shortcuts where the shape changes): 272,474 parameters."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(3):
                blocks.append(BasicBlock(cin, cout, stride if b == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {"resnet20": (ResNet20, (3, 32, 32)), "mlp": (_mlp, (64,))}


def build(name: str, samples: int, device: torch.device, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    make, shape = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make()
    x = torch.randn(samples, *shape, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                # affine parameters off their init, as after training: a fresh BN bias is all zeros, and
                # loss-landscapes' filter normalisation then divides by zero (ZeroDivisionError)
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.momentum = None  # running statistics: the cumulative average of one train-mode pass
        model.train()(x)
    return model.eval().to(device), x.to(device), y.to(device)


# --- arms -------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, points: np.ndarray, mode: str, chunk: int) -> tuple[np.ndarray, Surface]:
    surface = Surface(model, directions_for(model, 2, seed=0), [(x, y)])
    losses = np.full(len(points), np.nan)
    for part, loss, _ in surface.evaluate(points, mode, chunk):
        losses[part] = loss
    return losses, surface


def run_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> np.ndarray:
    import loss_landscapes
    import loss_landscapes.metrics

    metric = loss_landscapes.metrics.Loss(nn.CrossEntropyLoss(), x, y)
    return loss_landscapes.random_plane(model, metric, distance=1, steps=steps, normalization="filter", deepcopy_model=True)


def run_floor(model: nn.Module, x: torch.Tensor, device: torch.device, limit: int) -> tuple[float, int]:
    """Plain forwards until FLOOR_MIN_SECONDS have passed (at least 3, at most `limit`): (seconds, count)."""
    count, t0 = 0, time.perf_counter()
    with torch.no_grad():
        while True:
            model(x)
            count += 1
            _sync(device)
            elapsed = time.perf_counter() - t0
            if count >= limit or (count >= 3 and elapsed >= FLOOR_MIN_SECONDS):
                return elapsed, count


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> None:
    steps = args.grid or QUICK_GRID[name]
    model, x, y = build(name, args.samples, device)
    points = grid_points([grid_axis(steps, 1.0)] * 2)
    n = len(points)
    params = sum(p.numel() for p in model.parameters())
    print(f"\n== {name}: {params:,} parameters, {args.samples} samples, {steps}x{steps} = {n} points, chunk {args.chunk} ==")

    reference = None
    if not args.no_reference:
        try:
            import loss_landscapes  # noqa: F401

            reference = (copy.deepcopy(model).cpu().eval(), x.cpu(), y.cpu())
            if device.type != "cpu":
                print("loss-landscapes is CPU-only: it runs on the CPU here; its ratio to ours is CPU vs " + device.type)
        except ImportError:
            print("loss-landscapes is not installed (pip install loss-landscapes): its arm is skipped")

    skipped: dict[str, str] = {}
    if reference is None:
        skipped["loss-landscapes"] = "not run"
    outputs: dict[str, np.ndarray] = {}
    picked: list[str] = []

    def arm(label: str, few: bool = False) -> float | None:
        """Run one arm (on the first few points only when `few`, untimed); return seconds per point."""
        if label in skipped:
            return None
        pts = points[: min(n, 3)] if few else points
        _sync(device)
        t0 = time.perf_counter()
        if label == "floor":
            seconds, count = run_floor(model, x, device, 3 if few else n)
            return seconds / count
        try:
            if label == "loss-landscapes":
                assert reference is not None
                out = run_reference(*reference, 2 if few else steps).reshape(-1)
            else:
                out, surface = run_ours(model, x, y, pts, label.removeprefix("ours-"), args.chunk)
                if label == "ours-auto" and not few:
                    picked.append(f"{surface.engine} ({', '.join(f'{k} {v * 1e3:.3g} ms' for k, v in surface.timings.items())})")
        except (RuntimeError, NotImplementedError) as error:
            if label != "ours-vmap":
                raise
            skipped[label] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            return None
        _sync(device)
        seconds = time.perf_counter() - t0
        if not few:
            outputs[label] = out
        return seconds / (len(out) if label == "loss-landscapes" else len(pts))

    for label in ARMS:  # warm-up: allocator, vmap's first batching rules, lazy imports
        arm(label, few=True)
    per_point: dict[str, list[float]] = {label: [] for label in ARMS}
    for r in range(args.repeats):
        for label in ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]:
            value = arm(label)
            if value is not None:
                per_point[label].append(value)

    floor = statistics.median(per_point["floor"])
    ours = {label: statistics.median(v) for label, v in per_point.items() if v and label.startswith("ours-")}
    print(f"{'arm':<16} {'median s/point':>15} {'min s/point':>12} {'x floor':>8}")
    for label in ARMS:
        if not per_point[label]:
            print(f"{label:<16} {'skipped':>15}  {skipped.get(label, '')}")
            continue
        med, low = statistics.median(per_point[label]), min(per_point[label])
        where = " (CPU)" if label == "loss-landscapes" and device.type != "cpu" else ""
        print(f"{label:<16} {med:>15.3e} {low:>12.3e} {med / floor:>8.2f}{where}")
    if picked:
        print(f"ours-auto picked: {picked[-1]}")
    if per_point["loss-landscapes"]:
        theirs = statistics.median(per_point["loss-landscapes"])
        print("loss-landscapes / ours: " + ", ".join(f"{label.removeprefix('ours-')} {theirs / v:.2f}x" for label, v in ours.items()))
    if "ours-loop" in outputs and "ours-vmap" in outputs:
        rel = np.max(np.abs(outputs["ours-vmap"] / outputs["ours-loop"] - 1))
        print(f"check: loop vs vmap max relative difference of the losses {rel:.1e}")
    if args.grid is None and name == "resnet20":
        print(
            f"(quick run: {steps}x{steps}; --grid 51 for the full setting, expect about {2601 * ours.get('ours-loop', 0.0) / 60:.0f} min for ours-loop alone)"
        )


# --- environment ------------------------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5, check=False).stdout
        match = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "resnet20"])
    parser.add_argument("--grid", type=int, default=None, help="points per axis, odd (default: mlp 11, resnet20 3; full setting: 51)")
    parser.add_argument("--samples", type=int, default=256, help="evaluation batch size (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every arm (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0 keeps torch's default)")
    parser.add_argument("--chunk", type=int, default=64, help="points per evaluate() chunk (the engine's default 64)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-reference", action="store_true", help="skip the loss-landscapes arm")
    args = parser.parse_args(argv)
    if args.grid is not None and (args.grid < 1 or args.grid % 2 == 0):
        parser.error("--grid must be odd (the trained model is the centre of our grid)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device
    )

    try:
        from importlib.metadata import version

        reference_version = version("loss-landscapes")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        reference_version = "not installed"
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"device {device}{gpu}, torch {torch.__version__}, python {sys.version.split()[0]}, loss-landscapes {reference_version}")
    print(f"CPU {cpu_model()}, {torch.get_num_threads()} intra-op threads, {torch.get_num_interop_threads()} inter-op threads")
    t0 = time.perf_counter()
    for name in args.models:
        bench_model(name, args, device)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
