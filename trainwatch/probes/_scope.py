"""`untouched(model)`: run a probe and leave the model exactly as it was found.

Restores, in `finally`: every module's train/eval mode, BatchNorm running statistics, every `.grad`,
the torch (CPU and CUDA), Python and NumPy RNG states. It never changes parameters. Inside, torch.compile'd
code runs eagerly (`force_eager`), so a probe's eval mode and hooks add no graph and no recompilation.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


@contextmanager
def preserved_rng(device: torch.device | None = None) -> Iterator[None]:
    """Fork every RNG a probe or a data loader might draw from, and restore it afterwards."""
    devices = [device] if device is not None and device.type == "cuda" else []
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices, enabled=True):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextmanager
def untouched(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Yield `model` (in eval mode by default, gradients disabled) and restore its state on exit."""
    modes = [(m, m.training) for m in model.modules()]
    norm_buffers = [
        (b, b.detach().clone())
        for m in model.modules()
        if isinstance(m, _NormBase)
        for b in (m.running_mean, m.running_var, m.num_batches_tracked)
        if b is not None
    ]
    grads = [(p, p.grad) for p in model.parameters()]
    device = next((p.device for p in model.parameters()), None)
    try:
        with preserved_rng(device), torch.no_grad(), torch.compiler.set_stance("force_eager"):
            if eval_mode:
                model.eval()
            yield model
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in norm_buffers:
                buffer.copy_(saved)
        for param, grad in grads:
            param.grad = grad
