"""The CAM probe: a fixed set of probe images, and a snapshot of every chosen CAM method on them.

Picks the probes once (balanced over classes), validates layer, methods, shapes and targets before training,
and writes each snapshot's maps, predictions and raw maxima into a Packer. No MLflow, no rendering here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainwatch import cam
from trainwatch.probes._scope import read_quietly, untouched
from trainwatch.record import Packer

MAX_SCAN_BATCHES = 50  # how far into the data we look for examples of every class


def balanced_probes(loader: Iterable, k: int) -> tuple[Tensor, Tensor]:
    """The first `k` (input, label) pairs of `loader`, taken round-robin over classes in label order, so a
    skewed data set still gives every class a probe."""
    by_class: dict[int, list[Tensor]] = {}
    with read_quietly(loader) as batches:
        for i, batch in enumerate(batches):
            if not (isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[0], Tensor)):
                raise ValueError("TrainWatch CAM probes need (inputs, labels) batches; pass `cam_probes=` and `cam_targets=` tensors.")
            for x, y in zip(batch[0], batch[1], strict=False):
                by_class.setdefault(int(y), []).append(x)
            if i + 1 >= MAX_SCAN_BATCHES or min(len(v) for v in by_class.values()) >= k:
                break
    picked: list[tuple[Tensor, int]] = []
    for rank in range(k):
        picked += [(xs[rank], c) for c, xs in sorted(by_class.items()) if rank < len(xs)]
    if not picked:
        raise ValueError("TrainWatch found no samples for CAM probes in the validation or training data.")
    picked = picked[:k]
    return torch.stack([x for x, _ in picked]), torch.tensor([c for _, c in picked])


@dataclass
class CamProbe:
    """Methods × probes: one snapshot writes `cam/<method>` maps [K, *S] and per-probe metrics."""

    methods: tuple[str, ...]
    layer_name: str
    inputs: Tensor
    targets: Tensor

    @staticmethod
    def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
        unknown = [m for m in methods if m not in cam.METHODS]
        if unknown or not methods:
            raise ValueError(f"`TrainWatch(cam_methods={list(methods)!r})`: unknown {unknown}; choose from {sorted(cam.METHODS)}.")
        return tuple(methods)

    @classmethod
    def build(cls, model: nn.Module, methods: Sequence[str], layer: str | None, inputs: Tensor, targets: Tensor) -> CamProbe:
        """Validate everything with one dry snapshot on the real model, untouched: a wrong layer, shape,
        dtype or target fails here, before the first training step."""
        if inputs.dim() < 3 or not inputs.is_floating_point():
            raise ValueError(
                f"CAM probes must be float images [K, C, H, W] or series [K, C, L]; got shape {tuple(inputs.shape)}, dtype {inputs.dtype}."
            )
        if targets.shape != (inputs.shape[0],):
            raise ValueError(
                f"`cam_targets` needs one class index per probe: {inputs.shape[0]} probes, targets of shape {tuple(targets.shape)}."
            )
        try:
            with untouched(model):
                name = layer if layer is not None else cam.default_layer_name(model, inputs)
                cam.resolve_layer(model, name)
            probe = cls(cls.check_methods(methods), name, inputs, targets.long())
            probe.snapshot(model, None)
        except ValueError:
            raise  # already says what to fix
        except Exception as error:
            raise ValueError(
                f"CAM probes of shape {tuple(inputs.shape)} and dtype {inputs.dtype} fail in `{type(model).__name__}.forward`: "
                f"{type(error).__name__}: {error}. Pass `TrainWatch(cam_probes=...)` inputs the model accepts."
            ) from error
        return probe

    def to(self, device: torch.device) -> CamProbe:
        self.inputs, self.targets = self.inputs.to(device), self.targets.to(device)
        return self

    def snapshot(self, model: nn.Module, packer: Packer | None) -> None:
        """All methods on all probes, eval mode, model left exactly as found."""
        with untouched(model):
            logits = cam.class_scores(model(self.inputs))
            probs = logits.softmax(1)
            confidence, predicted = probs.max(1)
            maps = {m: cam.METHODS[m](model, self.inputs, self.layer_name, self.targets, normalize=False) for m in self.methods}
        if packer is None:
            return
        keys = [f"p{i}" for i in range(len(self.targets))]
        packer.metrics("cam_confidence", keys, confidence)
        packer.metrics("cam_true_class_prob", keys, probs.gather(1, self.targets[:, None]).squeeze(1))
        packer.array("cam_predicted", predicted)
        packer.array("cam_confidence", confidence)
        for method, raw in maps.items():
            raw_max = raw.flatten(1).amax(1)
            packer.metrics(f"cam_raw_max_{method}", keys, raw_max)
            packer.array(f"cam/{method}", cam.normalize_maps(raw))
            packer.array(f"cam_raw_max/{method}", raw_max)
