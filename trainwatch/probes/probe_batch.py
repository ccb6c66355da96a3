"""The fixed probe batch: drawn once from the data without touching any RNG training uses, and checked
against the model's forward before the first step. Raises ValueError with the fix; no Lightning here."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from trainwatch.probes._scope import read_quietly, untouched
from trainwatch.probes.model_inputs import ModelInputs, concat, inputs_of, same_form

_HOW = (
    "Pass `TrainWatch(probe_batch=...)` what the model's forward takes: a tensor (its one input), a tuple (its positional "
    "inputs) or a dict (its keyword inputs); or `activations='live'`."
)


def first_loader(loaders: object) -> Iterable | None:
    """A single dataloader from what Lightning holds (a loader or a list of them)."""
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    return None if loader is None or isinstance(loader, (list, tuple, dict)) else loader


def draw_inputs(sources: Sequence[tuple[str, Iterable | None]], samples: int, template: object = None) -> tuple[str, ModelInputs]:
    """The first `samples` model inputs (see `inputs_of`; `template` is the module's `example_input_array`) of the
    first source that has data. Batches padded to their own length (variable-length sequences) cannot be stacked: the
    probe then stops before the first batch whose shapes differ from the first one's, and holds fewer inputs."""
    for source, loader in sources:
        if loader is None:
            continue
        chunks: list[ModelInputs] = []
        with read_quietly(loader) as batches:
            for batch in batches:
                try:
                    inputs = inputs_of(batch, template)
                except ValueError as error:
                    raise ValueError(f"TrainWatch cannot take a probe batch from the {source}: {error}. {_HOW}") from error
                if chunks and not same_form(inputs, chunks[0]):
                    break
                chunks.append(inputs)
                if sum(c.samples for c in chunks) >= samples:
                    break
        if chunks:
            inputs = concat(chunks).head(samples)
            return f"the first {inputs.samples} inputs of the {source}", inputs
    raise ValueError(f"TrainWatch found no validation or training data to draw the activation probe batch from. {_HOW}")


def check_forward(model: nn.Module, inputs: ModelInputs, source: str, device: torch.device | None = None) -> None:
    """Forward the probe batch once (a copy, on `device`), untouched, so a wrong shape fails now and not at step 50."""
    try:
        with untouched(model):
            inputs.forward(model, device)
    except Exception as error:
        raise ValueError(
            f"TrainWatch: the activation probe batch ({source}: {inputs.describe()}) "
            f"fails in `{type(model).__name__}.forward`: {type(error).__name__}: {error}. {_HOW}"
        ) from error
