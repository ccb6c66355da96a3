"""Evaluate the loss at θ₀ + Σ_j c_j·d_j for many points c, fast, leaving the model bitwise unchanged.

Two engines over the same arithmetic: `loop` writes each point into the model's own parameters with fused
in-place ops (`torch._foreach_copy_` / `_foreach_add_`: no model copy per point) and runs the forward; `vmap`
evaluates a chunk of points at once with `torch.func.functional_call` over stacked parameters (fast for small
models, K× the parameter memory). Losses stay on the device until a chunk is done: one host sync per chunk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from trainwatch.probes._scope import untouched

Mode = Literal["auto", "loop", "vmap"]
VMAP_SAMPLES = 8192  # samples in one vmap call (points × batch size): bounds activation memory
VMAP_PARAM_BYTES = 1 << 30  # stacked parameters of one vmap call
PICK_POINTS = 4  # points each engine is timed on when mode="auto"
BnMode = Literal["eval", "train"]
LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


def grid_axis(steps: int, span: float) -> np.ndarray:
    """`steps` evenly spaced coordinates over [−span, span], inclusive, with the exact 0 at the centre."""
    if steps < 1 or steps % 2 == 0:
        raise ValueError(f"a landscape axis needs an odd number of points so that the trained model is the centre; got {steps}")
    if not 0 < span < math.inf:
        raise ValueError(f"a landscape span must be > 0 and finite; got {span}")
    half = steps // 2
    return np.arange(-half, half + 1, dtype=np.float64) * (span / half) if half else np.zeros(1)


def grid_points(axes: Sequence[np.ndarray]) -> np.ndarray:
    """All points of the grid, [∏ len(axis), len(axes)], the last axis varying fastest."""
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=1)


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for integer class targets with [B, C] outputs, mean squared error otherwise."""
    if not targets.is_floating_point() and outputs.dim() >= 2:
        return F.cross_entropy(outputs, targets)
    return F.mse_loss(outputs, targets.to(outputs.dtype).reshape(outputs.shape))


def _correct(outputs: Tensor, targets: Tensor) -> Tensor | None:
    if targets.is_floating_point() or outputs.dim() != 2:
        return None
    return (outputs.argmax(1) == targets).sum()


@contextmanager
def evaluation_mode(model: nn.Module, bn_mode: BnMode) -> Iterator[None]:
    """Eval mode (dropout off) with BatchNorm on running statistics, or on batch statistics for
    `bn_mode="train"`; every mode, BN buffer, `.grad` and RNG state restored afterwards."""
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
    with untouched(model):
        if bn_mode == "train":
            for m in model.modules():
                if isinstance(m, _BatchNorm):
                    m.train()
        yield


class Surface:
    """The loss of `model` on `batches` along fixed `directions` (each `{name: tensor}` as `named_parameters()`)."""

    def __init__(
        self,
        model: nn.Module,
        directions: Sequence[Mapping[str, Tensor]],
        batches: Sequence[Batch],
        loss_fn: LossFn = default_loss,
        bn_mode: BnMode = "eval",
    ) -> None:
        self.model, self.batches, self.loss_fn, self.bn_mode = model, list(batches), loss_fn, bn_mode
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        missing = [n for d in directions for n in self.names if n not in d]
        if missing:
            raise ValueError(f"a direction has no entry for parameter {missing[0]!r}; build directions from this model")
        self.dirs = [[d[n].to(p.device, p.dtype) for n, p in zip(self.names, self.params, strict=True)] for d in directions]
        self.samples = sum(len(y) for _, y in self.batches)
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.params)
        self.classifier: bool | None = None  # integer targets and [B, C] outputs: accuracy too; set at the first forward
        # vmap evaluates points × batch samples at once: bound both the stacked parameters and the batch
        largest_batch = max((len(y) for _, y in self.batches), default=1)
        self.vmap_points = max(1, min(VMAP_SAMPLES // largest_batch, VMAP_PARAM_BYTES // max(self.param_bytes, 1)))

    # --- engines ------------------------------------------------------------------------------------------
    def _loop(self, coords: np.ndarray) -> tuple[Tensor, Tensor | None]:
        """Each point written into the model's own parameters (reset to θ₀, then + c_j·d_j: exact points, no drift)."""
        totals: list[Tensor] = []
        hits: list[Tensor] = []
        theta0 = [p.detach().clone() for p in self.params]
        try:
            for point in coords:
                torch._foreach_copy_(self.params, theta0)
                for c, d in zip(point.tolist(), self.dirs, strict=True):
                    if c != 0.0:
                        torch._foreach_add_(self.params, d, alpha=c)
                loss, hit = self._point()
                totals.append(loss)
                hits.append(hit)
        finally:
            torch._foreach_copy_(self.params, theta0)  # bitwise: θ₀ itself, not θ₀ + 0·d
        acc = torch.stack(hits).double() / self.samples if self.classifier else None
        return torch.stack(totals).double() / self.samples, acc

    def _point(self) -> tuple[Tensor, Tensor]:
        """Summed loss and correct predictions over the evaluation batches at the model's current parameters."""
        loss = hit = None
        for x, y in self.batches:
            out = self.model(x)
            batch_loss = self.loss_fn(out, y).double() * len(y)  # float64 sums: a single batch gives its mean exactly
            loss = batch_loss if loss is None else loss + batch_loss
            if self.classifier is None:
                self.classifier = _correct(out, y) is not None
            if self.classifier:
                batch_hit = _correct(out, y)
                hit = batch_hit if hit is None else hit + batch_hit
        assert loss is not None
        return loss, (hit if hit is not None else torch.zeros((), device=loss.device))

    def _vmap(self, coords: np.ndarray) -> tuple[Tensor, Tensor | None]:
        from torch.func import functional_call, vmap

        device = self.params[0].device
        c = torch.as_tensor(coords, dtype=self.params[0].dtype, device=device)
        stacked = []
        for i, p in enumerate(self.params):
            shape = (len(coords),) + (1,) * p.dim()
            value = p.detach().expand(len(coords), *p.shape).clone()
            for j, d in enumerate(self.dirs):
                value.add_(c[:, j].reshape(shape) * d[i])
            stacked.append(value)
        buffers = dict(self.model.named_buffers())
        names = self.names
        classifier = []  # set while vmap traces point_loss (its Python body runs once per call)

        def point_loss(flat: tuple[Tensor, ...], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            out = functional_call(self.model, ({**dict(zip(names, flat, strict=True)), **buffers}), (x,))
            hit = _correct(out, y)
            classifier.append(hit is not None)
            return self.loss_fn(out, y), (hit if hit is not None else torch.zeros((), device=out.device, dtype=torch.long))

        losses = torch.zeros(len(coords), dtype=torch.float64, device=device)
        correct = torch.zeros(len(coords), dtype=torch.float64, device=device)
        batched = vmap(point_loss, in_dims=(0, None, None))
        for x, y in self.batches:
            loss, hit = batched(tuple(stacked), x, y)
            losses += loss.double() * len(y)
            correct += hit.double()
        self.classifier = all(classifier)
        return losses / self.samples, (correct / self.samples if self.classifier else None)

    # --- driver -------------------------------------------------------------------------------------------
    def evaluate(self, coords: np.ndarray, mode: Mode = "auto", chunk: int = 64) -> Iterator[tuple[slice, np.ndarray, np.ndarray | None]]:
        """Yield (slice of `coords`, losses, accuracies or None) chunk by chunk; one host sync per chunk.

        `mode="auto"` times the first chunk both ways and keeps the faster engine; `vmap` is only offered with
        BatchNorm on running statistics (batch statistics would update buffers inside the transform).
        """
        coords = np.asarray(coords, dtype=np.float64)
        coords = coords[:, None] if coords.ndim == 1 else coords
        if coords.shape[1] != len(self.dirs):
            raise ValueError(f"points have {coords.shape[1]} coordinates but there are {len(self.dirs)} directions")
        if mode == "vmap" and self.bn_mode == "train":
            raise ValueError("mode='vmap' needs bn_mode='eval'; use mode='loop' for BatchNorm on batch statistics")
        engine = mode if mode != "auto" else ("loop" if self.bn_mode == "train" else None)
        chunk = max(1, chunk)
        start = 0
        with evaluation_mode(self.model, self.bn_mode):
            if engine is None and len(coords):
                engine, timed = self._pick(coords[: min(chunk, len(coords))])
                yield from timed
                start = timed[-1][0].stop
            self.engine = engine
            run = self._loop if engine == "loop" else self._vmap
            size = min(chunk, self.vmap_points) if engine == "vmap" else chunk
            while start < len(coords):
                stop = min(start + size, len(coords))
                losses, acc = run(coords[start:stop])
                yield slice(start, stop), losses.cpu().numpy(), (acc.cpu().numpy() if acc is not None else None)
                start = stop

    def _pick(self, coords: np.ndarray) -> tuple[str, list[tuple[slice, np.ndarray, np.ndarray | None]]]:
        """Time both engines on PICK_POINTS points each (after a one-point warm-up; vmap traces on its first
        call) and keep the faster; the timed points are results, not waste."""
        few = max(1, min(PICK_POINTS, len(coords) // 2))
        timed: list[tuple[slice, np.ndarray, np.ndarray | None]] = []
        per_point: dict[str, float] = {}
        parts = (("loop", slice(0, few)), ("vmap", slice(few, min(2 * few, len(coords)))))
        for engine, part in parts:
            run = self._loop if engine == "loop" else self._vmap
            try:
                if part.stop <= part.start:
                    continue
                run(coords[part.start : part.start + 1])
                _sync(self.params[0].device)
                t0 = time.perf_counter()
                losses, acc = run(coords[part])
                _sync(self.params[0].device)
            except (RuntimeError, NotImplementedError):
                continue  # a module vmap cannot batch (or out of memory): the loop serves
            per_point[engine] = (time.perf_counter() - t0) / (part.stop - part.start)
            timed.append((part, losses.cpu().numpy(), acc.cpu().numpy() if acc is not None else None))
        for engine, part in parts:
            if engine not in per_point and part.stop > part.start:  # that engine failed: one that works takes its points
                losses, acc = (self._vmap if "vmap" in per_point else self._loop)(coords[part])  # both failed: the loop's error
                timed.append((part, losses.cpu().numpy(), acc.cpu().numpy() if acc is not None else None))
        timed.sort(key=lambda t: t[0].start)
        self.timings = per_point
        return min(per_point, key=per_point.get) if per_point else "loop", timed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
