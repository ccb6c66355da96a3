"""Cost of one CAM snapshot (K probes, forward + backward per method) against one training step, measured
side by side in one process; and the cost of rendering the filmstrip, which runs on the sink's thread.

    .venv/bin/python benchmarks/cam.py [--repeats 20] [--probes 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import MODELS

from trainwatch.probes.cam_probe import CamProbe
from trainwatch.record import Packer
from trainwatch.render import cam_filmstrip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bench(name: str, probes: int, repeats: int, methods: list[str], device: torch.device) -> dict[str, float]:
    factory, shape, batch = MODELS[name]
    torch.manual_seed(0)
    module = factory().to(device)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device)
    probe = CamProbe.build(module, methods, None, torch.randn(probes, *shape, device=device), torch.arange(probes, device=device) % 10)

    def train_step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()

    def snapshot() -> None:
        packer = Packer(0)
        probe.snapshot(module, packer)
        packer.ship().resolve()

    for _ in range(3):
        train_step(), snapshot()
    step_s, snap_s = [], []
    for _ in range(repeats):  # interleaved A/B
        step_s.append(_time(train_step, device))
        snap_s.append(_time(snapshot, device))
    maps = np.random.rand(probes, *shape[1:])
    history = [(s, maps, np.zeros(probes), np.ones(probes)) for s in range(8)]
    t0 = time.perf_counter()
    cam_filmstrip(methods[0], np.random.rand(probes, *shape), np.zeros(probes), history)
    render_s = time.perf_counter() - t0
    return {"step_ms": 1e3 * statistics.median(step_s), "snapshot_ms": 1e3 * statistics.median(snap_s), "render_ms": 1e3 * render_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--probes", type=int, default=16)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, {args.probes} probes")
    print(f"{'model':10} {'methods':10} {'train step ms':>14} {'snapshot ms':>12} {'ratio':>6} {'render ms':>10}")
    for name in MODELS:
        batch = MODELS[name][2]
        for label, methods in (
            ("grad_cam", ["grad_cam"]),
            ("all 7", ["grad_cam", "grad_cam_pp", "hires_cam", "layer_cam", "saliency", "guided_backprop", "guided_grad_cam"]),
        ):
            r = bench(name, args.probes, args.repeats, methods, device)
            ratio = r["snapshot_ms"] / r["step_ms"]
            print(f"{name:10} {label:10} {r['step_ms']:14.2f} {r['snapshot_ms']:12.2f} {ratio:5.2f}x {r['render_ms']:10.1f}")
            print(f"cam snapshot {name} {label} ({args.probes} probes) vs train step (batch {batch}): {ratio:.2f}x")


if __name__ == "__main__":
    main()
