"""Training dynamics that need no extra device work: learning rates, step time, throughput, device memory.

Host-side bookkeeping only (Python floats the optimizer and the allocator already hold); no host sync.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def learning_rates(optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, float]:
    """`train/lr/opt<i>_group<j>` for every optimizer and parameter group (a tensor lr is read without sync
    only if it lives on the CPU; a device lr is skipped)."""
    out: dict[str, float] = {}
    for i, optimizer in enumerate(optimizers):
        for j, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            if isinstance(lr, Tensor):
                if lr.device.type != "cpu":
                    continue
                lr = lr.item()
            if lr is not None:
                out[f"train/lr/opt{i}_group{j}"] = float(lr)
    return out


def grad_scaler(precision_plugin: object) -> torch.amp.GradScaler | None:
    """The GradScaler of fp16 mixed precision (Lightning's `MixedPrecision("16-mixed")`, FSDP's), if one is on."""
    scaler = getattr(precision_plugin, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() else None


def loss_scale(scaler: torch.amp.GradScaler) -> Tensor | None:
    """The scale this step's backward used, as a device scalar copied now (`update()` after the optimizer step
    changes it in place); no sync. None before the first backward."""
    read = getattr(scaler, "_get_scale_async", None)  # get_scale() would read it to the host
    scale = read() if read is not None else getattr(scaler, "_scale", None)
    return scale.detach().clone() if isinstance(scale, Tensor) else None


def batch_size(batch: object) -> int:
    """Samples in a batch: the leading size of its first tensor (0 if it holds none)."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, Mapping):  # a dict, or Hugging Face's BatchEncoding
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            n = batch_size(item)
            if n:
                return n
    return 0


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory the caching allocator has handed out since the start (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


class Throughput:
    """Wall time and samples between logged steps: ms per optimizer step and samples per second."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self._step0 = 0
        self._samples = 0

    def add_samples(self, n: int) -> None:
        self._samples += n

    def lap(self, step: int, world_size: int = 1) -> dict[str, float]:
        """Rates since the last lap; samples/s over all ranks, which see batches of the same size under DDP."""
        now = time.perf_counter()
        elapsed, steps = now - self._t0, step - self._step0
        out = {"train/samples_per_s": world_size * self._samples / elapsed} if elapsed > 0 and self._samples else {}
        if steps > 0:
            out["train/step_ms"] = 1000 * elapsed / steps
        self._t0, self._step0, self._samples = now, step, 0
        return out
