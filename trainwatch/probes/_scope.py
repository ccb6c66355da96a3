"""`untouched(model)`: run a probe and leave the model exactly as it was found.

Restores, in `finally`: every module's train/eval mode, BatchNorm running statistics, every `.grad`,
the torch (CPU and CUDA), Python and NumPy RNG states. It never changes parameters. Inside, torch.compile'd
code runs eagerly (`force_eager`), so a probe's eval mode and hooks add no graph and no recompilation.

`read_quietly(loader)`: read a few batches of the training's own data loaders and leave them, and every RNG they
draw from, as they were.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.data import DataLoader, IterableDataset


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
def read_quietly(loader: Iterable) -> Iterator[Iterable]:
    """`loader`'s batches, to read without changing what the training will see: the global RNGs and the loader's
    own generators (`DataLoader(generator=...)`; a shuffling sampler and each new iterator draw from them) are
    restored afterwards, and a `DataLoader` whose workers persist is read through a worker-less twin: its one
    iterator, made by its first reader, draws the workers' seed then and never again, so a probe reading first
    would take that draw away from the training."""
    generators = _generators_of(loader)
    states = [g.get_state() for g in generators]
    try:
        with preserved_rng():
            yield _without_persistent_workers(loader)
    finally:
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)


def _generators_of(loader: object) -> list[torch.Generator]:
    """The generators a DataLoader, its sampler and its batch sampler draw from, each once."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    holders = (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
    found: list[torch.Generator] = []
    for holder in holders:
        generator = getattr(holder, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _without_persistent_workers(loader: Iterable) -> Iterable:
    """`loader`, or for a DataLoader with persistent workers a twin reading the same data in the same order (its
    sampler, batches and collate function) in this process."""
    if not (isinstance(loader, DataLoader) and loader.persistent_workers and loader.num_workers > 0):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, collate_fn=loader.collate_fn)
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)
    return DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, collate_fn=loader.collate_fn)


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
