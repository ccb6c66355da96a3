"""The framework-free middle of the landscape job: a model, evaluation batches and a `LandscapeSpec` in, a
`Landscape` (grids, curve, directions, timing) out. Shards the grid over a torch.distributed group when one is
running, and keeps finished chunks on disk so an interrupted computation resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from trainwatch.landscape.directions import Ignore, Norm, directions_for
from trainwatch.landscape.surface import (
    Batch,
    BnMode,
    LossFn,
    Mode,
    Surface,
    _sync,
    default_loss,
    evaluation_mode,
    grid_axis,
    grid_points,
)


@dataclass(frozen=True)
class LandscapeSpec:
    """Settings of one landscape; `name` is its folder under `trainwatch/landscape/` in the run."""

    run_id: str = ""
    tracking_uri: str | None = None
    name: str = "random"  # becomes "pca" with directions="pca" unless given
    directions: Literal["random", "pca"] = "random"  # pca: principal directions of the training trajectory
    steps: int = 51  # points per axis (odd: the trained model is the centre)
    span: float = 1.0  # each axis covers [−span, span] in units of the filter-normalised direction
    seed: int = 0
    norm: Norm = "filter"
    ignore: Ignore = "biasbn"
    bn_mode: BnMode = "eval"
    mode: Mode = "auto"
    chunk: int = 64  # points per vmap call and per resumable partial result
    batch_size: int = 512  # evaluation samples per forward
    device: str = "auto"
    devices: int = 1  # processes (one per GPU, or CPU processes on gloo) sharing the grid via torch.distributed
    loss: str | None = None  # "cross_entropy", "mse", or an attribute of the module; default: inferred
    sharpness_radius: float = 0.1
    work_dir: str = ".trainwatch/landscape"

    def __post_init__(self) -> None:
        grid_axis(self.steps, self.span)  # odd steps, span > 0: fail before any work
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name):
            raise ValueError(
                f"landscape name {self.name!r}: use letters, digits, '_', '.', '-' (it names a folder in the run's artifacts, "
                "trainwatch/landscape/<name>/, and must not leave it)"
            )
        if self.directions not in ("random", "pca"):
            raise ValueError(f"directions must be 'random' or 'pca', got {self.directions!r}")
        if self.directions == "pca" and self.name == "random":
            object.__setattr__(self, "name", "pca")
        if self.chunk < 1 or self.batch_size < 1 or self.devices < 1:
            raise ValueError(f"chunk, batch_size and devices must be >= 1, got {self.chunk}, {self.batch_size}, {self.devices}")

    def settings(self) -> dict[str, object]:
        keep = ("directions", "steps", "span", "seed", "norm", "ignore", "bn_mode", "loss", "sharpness_radius")
        return {k: v for k, v in asdict(self).items() if k in keep}


@dataclass
class Landscape:
    """Arrays of one computed landscape and how it was made."""

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray  # [len(alphas), len(betas)]
    accuracy: np.ndarray | None
    curve: np.ndarray  # 1-D loss along direction 1 (its own evaluation)
    curve_accuracy: np.ndarray | None
    directions: list[dict[str, Tensor]]
    meta: dict[str, object] = field(default_factory=dict)
    trajectory: np.ndarray | None = None  # [T, 2] coordinates of training snapshots (PCA directions)

    @property
    def centre(self) -> float:
        return float(self.loss[len(self.alphas) // 2, len(self.betas) // 2])

    def metrics(self, radius: float) -> dict[str, float]:
        """Centre loss, sharpness (largest loss increase within `radius` of the centre; NaN when no grid point
        but the centre lies that close) and the curvature (second difference of the loss at the centre along each
        direction, and their mean)."""
        a, b = np.meshgrid(self.alphas, self.betas, indexing="ij")
        near = np.hypot(a, b) <= radius + 1e-12
        c, i, j = self.centre, len(self.alphas) // 2, len(self.betas) // 2
        h = self.alphas[1] - self.alphas[0] if len(self.alphas) > 1 else np.nan
        k = self.betas[1] - self.betas[0] if len(self.betas) > 1 else np.nan
        curv_a = (self.loss[i + 1, j] - 2 * c + self.loss[i - 1, j]) / h**2 if len(self.alphas) > 1 else np.nan
        curv_b = (self.loss[i, j + 1] - 2 * c + self.loss[i, j - 1]) / k**2 if len(self.betas) > 1 else np.nan
        return {
            "centre_loss": c,
            "sharpness": float(np.nanmax(self.loss[near]) - c) if near.sum() > 1 else math.nan,
            "curvature_d1": float(curv_a),
            "curvature_d2": float(curv_b),
            "curvature": float(np.nanmean([curv_a, curv_b])),
        }


def batches_of(inputs: Tensor, targets: Tensor, batch_size: int, device: torch.device) -> list[Batch]:
    """The evaluation data on the device, split into fixed batches (no shuffle, no augmentation)."""
    inputs, targets = inputs.to(device), targets.to(device)
    return [(inputs[i : i + batch_size], targets[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]


def _spec_key(spec: LandscapeSpec, data: Sequence[Batch]) -> str:
    digest = hashlib.sha256(json.dumps(spec.settings(), sort_keys=True).encode())
    for x, y in data:
        digest.update(x.detach().cpu().numpy().tobytes())
        digest.update(y.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _evaluate(
    surface: Surface, points: np.ndarray, spec: LandscapeSpec, partial: Path | None, key: str, label: str = ""
) -> tuple[np.ndarray, np.ndarray | None]:
    """Loss (and accuracy) at every point; with `partial`, finished chunks are saved and skipped on resume."""
    loss = np.full(len(points), np.nan)
    acc = np.full(len(points), np.nan)
    done = np.zeros(len(points), dtype=bool)
    if partial is not None and partial.exists():
        saved = np.load(partial)
        if str(saved["key"]) == key and len(saved["loss"]) == len(points):
            loss, acc, done = saved["loss"].copy(), saved["acc"].copy(), saved["done"].copy()
    todo = np.flatnonzero(~done)
    has_acc = bool(np.isfinite(acc[done]).any()) if done.any() else True
    with tqdm(total=len(points), initial=int(done.sum()), desc=label, unit="pt", disable=not label, dynamic_ncols=True) as bar:
        for part, chunk_loss, chunk_acc in surface.evaluate(points[todo], spec.mode, spec.chunk):
            index = todo[part]
            loss[index], done[index] = chunk_loss, True
            if chunk_acc is None:
                has_acc = False
            else:
                acc[index] = chunk_acc
            if partial is not None:
                partial.parent.mkdir(parents=True, exist_ok=True)
                np.savez(partial.with_suffix(".tmp.npz"), key=key, loss=loss, acc=acc, done=done)
                partial.with_suffix(".tmp.npz").replace(partial)
            bar.update(len(index))
    return loss, (acc if has_acc else None)


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _sharded(
    surface: Surface, points: np.ndarray, spec: LandscapeSpec, partial: Path | None, key: str, label: str, shard: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """`_evaluate` on this rank's share of the points (every world-th point), then one all-gather: no
    collective per point, and each rank's partial results resume on their own. `shard=False`: all points here."""
    rank, world = _rank_world() if shard else (0, 1)
    if world == 1:
        return _evaluate(surface, points, spec, partial, key, label)
    mine = np.arange(rank, len(points), world)
    shard = partial.with_name(f"{partial.stem}.rank{rank}of{world}.npz") if partial is not None else None
    loss, acc = _evaluate(surface, points[mine], spec, shard, key, label if rank == 0 else "")
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (mine, loss, acc))
    full_loss, full_acc = np.full(len(points), np.nan), np.full(len(points), np.nan)
    for index, part_loss, part_acc in gathered:
        full_loss[index] = part_loss
        if part_acc is not None:
            full_acc[index] = part_acc
    has_acc = all(part_acc is not None for _, _, part_acc in gathered)
    return full_loss, (full_acc if has_acc else None)


def forward_flops(model: nn.Module, batches: Sequence[Batch], bn_mode: BnMode) -> tuple[float, float]:
    """FLOPs of one forward over the evaluation batches (torch's FlopCounterMode) and the seconds a plain
    forward takes (best of 3): the floor a grid point cannot beat."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    with evaluation_mode(model, bn_mode):
        counter = FlopCounterMode(display=False)
        with counter:
            for x, _ in batches:
                model(x)
        best = math.inf
        for _ in range(3):
            _sync(device)
            t0 = time.perf_counter()
            for x, _ in batches:
                model(x)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
    return float(counter.get_total_flops()), best


def compute_landscape(
    model: nn.Module,
    batches: Sequence[Batch],
    spec: LandscapeSpec,
    loss_fn: LossFn = default_loss,
    partial_dir: Path | None = None,
    progress: bool = False,
    directions: list[dict[str, Tensor]] | None = None,
    span: float | None = None,
    shard: bool = True,
) -> Landscape:
    """Directions from `spec.seed`, the 1-D curve along direction 1 and the 2-D grid; the model is restored
    bitwise. `partial_dir` keeps finished chunks so an interrupted job resumes where it stopped. With `shard` (and
    a `torch.distributed` group) every rank of the group must call: each evaluates a share of the points."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    directions = directions or directions_for(model, 2, spec.seed, spec.norm, spec.ignore)
    axis = grid_axis(spec.steps, span or spec.span)
    key = _spec_key(spec, batches)
    part = (lambda n: partial_dir / f"{n}.npz") if partial_dir is not None else (lambda n: None)
    label = (lambda what: f"landscape {what}") if progress else (lambda what: "")
    flops, floor_s = forward_flops(model, batches, spec.bn_mode)
    evaluating = time.perf_counter()
    curve_surface = Surface(model, directions[:1], batches, loss_fn, spec.bn_mode)
    curve, curve_acc = _sharded(curve_surface, axis[:, None], spec, part("curve"), key, label("1-D"), shard)
    surface = Surface(model, directions, batches, loss_fn, spec.bn_mode)
    loss, acc = _sharded(surface, grid_points([axis, axis]), spec, part("surface"), key, label("2-D"), shard)
    evaluated = time.perf_counter() - evaluating
    points = len(axis) + len(axis) ** 2
    shape = (len(axis), len(axis))
    meta = {
        **spec.settings(),
        "span": float(axis[-1]),
        "direction_kind": "Gaussian, filter-normalised per output filter (Li et al. 2018), not orthogonalised"
        if spec.directions == "random"
        else "principal components of the training trajectory (unit vectors, not filter-normalised)",
        "samples": sum(len(y) for _, y in batches),
        "data_sha256_16": key,
        "device": str(device),
        "engine": getattr(surface, "engine", spec.mode),
        "seconds": round(time.perf_counter() - start, 3),
        "points": points,
        "processes": _rank_world()[1],
        "forward_flops": flops,
        "seconds_per_point": evaluated / points,
        "floor_seconds_per_point": floor_s,
        "achieved_flop_per_s": flops * points / evaluated if evaluated > 0 else None,
        "inference_flop_per_s": flops / floor_s if floor_s > 0 else None,
    }
    return Landscape(axis, axis, loss.reshape(shape), None if acc is None else acc.reshape(shape), curve, curve_acc, directions, meta)
