"""What a probe forwards: the positional and keyword inputs of the model's forward, held by samples.

Follows Lightning's `example_input_array` convention (its model summary calls the model the same way): a tensor is
the one argument, a tuple or list the positional arguments, a dict the keyword arguments. Tensors may nest in
tuples, lists and dicts (a forward that takes a dict of features); every tensor with a dimension has the samples
along its first one, and a 0-d tensor or any other value goes whole to every part. Pure values; no Lightning here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

FORMS = "a tensor (the forward's one input), a tuple or list (its positional inputs) or a dict (its keyword inputs)"


@dataclass(frozen=True, eq=False)  # eq: tensors have no truth value to compare by
class ModelInputs:
    """`model(*args, **kwargs)` for a batch of `samples` inputs; raises ValueError when it holds no batch of samples."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {t.shape[0] for t in self.tensors() if t.dim()}
        if len(sizes) != 1 or 0 in sizes:
            found = ", ".join(_describe(t) for t in self.tensors()) or "no tensor"
            raise ValueError(f"must hold one batch: tensors whose first dimension is the samples, as many in each; found {found}.")

    @classmethod
    def of(cls, value: object) -> ModelInputs:
        """The inputs a user gives (`probe_batch=`), in Lightning's `example_input_array` convention."""
        if isinstance(value, Tensor):
            return cls((value,))
        if isinstance(value, (tuple, list)):
            return cls(tuple(value))
        if isinstance(value, Mapping):
            if not all(isinstance(k, str) for k in value):
                raise ValueError(f"is a {type(value).__name__} of keyword inputs, so its keys must be strings, got {list(value)}.")
            return cls((), dict(value))
        raise ValueError(f"must be {FORMS}, got {type(value).__name__}.")

    @property
    def samples(self) -> int:
        return next(t.shape[0] for t in self.tensors() if t.dim())

    def tensors(self) -> list[Tensor]:
        found: list[Tensor] = []
        apply_to_collection((self.args, self.kwargs), Tensor, found.append)
        return found

    def map(self, fn: Callable[[Tensor], Tensor], *, by_sample: bool = False) -> ModelInputs:
        """Every tensor through `fn`; with `by_sample`, only those that hold the samples (to slice them)."""
        apply = (lambda t: fn(t) if t.dim() else t) if by_sample else fn
        args, kwargs = apply_to_collection((self.args, self.kwargs), Tensor, apply)
        return ModelInputs(tuple(args), dict(kwargs))

    def head(self, n: int) -> ModelInputs:
        return self.map(lambda t: t[:n], by_sample=True)

    def parts(self, count: int) -> list[ModelInputs]:
        """`count` balanced parts (sizes differ by at most one), in order."""
        return [self.map(lambda t, i=i: t.tensor_split(count)[i], by_sample=True) for i in range(count)]

    def forward(self, model: nn.Module, device: torch.device | None = None) -> Any:
        """`model(*args, **kwargs)` on copies of the tensors (moved to `device` if given; non-blocking from pinned
        memory): a forward that changes its inputs in place (`x.sub_(mean)`) must leave the probe as it is, since the
        probe is forwarded again at every snapshot and its numbers must stay comparable."""
        fresh = self.map(lambda t: t.to(device or t.device, non_blocking=True, copy=True))
        return model(*fresh.args, **fresh.kwargs)

    def describe(self) -> str:
        """Shapes and dtypes, for error messages: `shape (64, 1, 8, 8) float32` or `input_ids shape (4, 16) int64, ...`."""
        if not self.kwargs and len(self.args) == 1 and isinstance(self.args[0], Tensor):
            return _describe(self.args[0])
        named = [(f"[{i}]", a) for i, a in enumerate(self.args)] + list(self.kwargs.items())
        return ", ".join(f"{name} {_describe(v) if isinstance(v, Tensor) else type(v).__name__}" for name, v in named)

    def state(self) -> dict[str, Any] | None:
        """Host tensors in plain tuples, lists and dicts: what a checkpoint loads with `weights_only=True`, as Lightning
        loads it. None for inputs that hold anything else (a named tuple, a dataclass, an array): the checkpoint
        would not load at all, so a fit resumed from it draws its probe again."""
        moved = self.map(lambda t: t.detach().cpu())
        return {"args": moved.args, "kwargs": moved.kwargs} if _plain((moved.args, moved.kwargs)) else None

    @classmethod
    def from_state(cls, state: object) -> ModelInputs | None:
        """What `state` saved; a bare tensor is the probe batch of a checkpoint written before inputs had forms."""
        if isinstance(state, Tensor):
            return cls((state,))
        if isinstance(state, dict) and {"args", "kwargs"} <= state.keys():
            return cls(tuple(state["args"]), dict(state["kwargs"]))
        return None


def concat(chunks: list[ModelInputs]) -> ModelInputs:
    """The chunks' samples one after the other; the chunks have one structure (the first one's values elsewhere)."""
    columns = zip(*(chunk.tensors() for chunk in chunks), strict=True)
    joined: Iterator[Tensor] = iter([torch.cat(column) if column[0].dim() else column[0] for column in columns])
    return chunks[0].map(lambda _: next(joined))


def same_form(a: ModelInputs, b: ModelInputs) -> bool:
    """The same structure, keys in the same order, the same other values, and tensors of the same per-sample shapes
    and dtypes (the sample counts may differ): `concat` can join them, tensor by tensor in walking order."""
    return _form(a) == _form(b)


def _form(inputs: ModelInputs) -> str:
    """The inputs with each tensor replaced by its per-sample shape and dtype, written out: a dict's repr keeps its
    keys' order, which `concat`'s pairing of tensors depends on."""
    return repr(apply_to_collection((inputs.args, inputs.kwargs), Tensor, lambda t: (t.dim(), tuple(t.shape[1:]), t.dtype)))


def _plain(value: object) -> bool:
    """Built of what `torch.load(weights_only=True)` accepts: tensors, plain tuples, lists and dicts, numbers, text."""
    if type(value) in (tuple, list):
        return all(_plain(v) for v in value)  # type: ignore[attr-defined]
    if type(value) is dict:
        return all(_plain(k) and _plain(v) for k, v in value.items())  # type: ignore[attr-defined]
    return isinstance(value, Tensor) or value is None or type(value) in (bool, int, float, str)


def inputs_of(batch: object, template: object = None) -> ModelInputs:
    """The model's inputs in a batch of the data. `template`, the LightningModule's `example_input_array`, tells
    which when it is set: a dict names the input keys of dict batches (or of the first item of tuple batches), a tuple
    of k counts the first k items of tuple batches. Otherwise the first item of a tuple batch, or a tensor batch
    itself, is the forward's one input. Dict batches are any mapping (Hugging Face's `BatchEncoding` too)."""
    try:
        return _inputs_of(batch, template)
    except ValueError as error:
        raise ValueError(f"the model inputs in its batches {error}") from error


def _inputs_of(batch: object, template: object) -> ModelInputs:
    if isinstance(batch, Tensor):
        return ModelInputs((batch,))
    if isinstance(template, Mapping) and isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Mapping):
        batch = batch[0]  # (features, targets): the features are the keyword inputs
    if isinstance(batch, Mapping):
        if template is not None and not isinstance(template, Mapping):
            raise ValueError(
                f"are unknown: the batches are dicts (keys {', '.join(map(repr, batch))}), but `example_input_array` is a "
                f"{type(template).__name__}, not a dict of the forward's keyword inputs naming which batch keys to forward"
            )
        if template is None:
            raise ValueError(
                f"are unknown: the batches are dicts (keys {', '.join(map(repr, batch))}) and TrainWatch cannot tell inputs "
                "from targets. Set the LightningModule's `example_input_array` to a dict of the forward's "
                "keyword inputs (Lightning's convention: its keys say which batch keys to forward)"
            )
        missing = [k for k in template if k not in batch]
        if missing:
            raise ValueError(
                f"lack {', '.join(map(repr, missing))}, which `example_input_array` names (the batches hold {', '.join(map(repr, batch))})"
            )
        return ModelInputs((), {str(k): batch[k] for k in template})
    if isinstance(batch, (tuple, list)) and batch:
        count = len(template) if isinstance(template, (tuple, list)) else 1
        return ModelInputs(tuple(batch[:count]))
    raise ValueError(f"are unknown: the batches are {type(batch).__name__}, not a tensor, a tuple or a dict")


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
