"""The fixed probe batch: drawn once from the data without touching any RNG training uses, and checked
against the model's forward before the first step. Raises ValueError with the fix; no Lightning here."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from trainwatch.probes._scope import preserved_rng, untouched

_HOW = "Pass `TrainWatch(probe_batch=...)` a tensor the model's forward accepts, or `activations='live'`."


def first_loader(loaders: object) -> Iterable | None:
    """A single dataloader from what Lightning holds (a loader or a list of them)."""
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    return None if loader is None or isinstance(loader, (list, tuple, dict)) else loader


def draw_inputs(sources: Sequence[tuple[str, Iterable | None]], samples: int) -> tuple[str, Tensor]:
    """The first `samples` inputs (the first tensor of each batch) of the first source that has data. Batches
    padded to their own length (variable-length sequences) cannot be stacked: the probe then stops before the first
    batch whose shape differs from the first one's, and holds fewer inputs."""
    for source, loader in sources:
        if loader is None:
            continue
        chunks: list[Tensor] = []
        with preserved_rng():  # creating a DataLoader iterator draws from torch's global RNG
            for batch in loader:
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                if not isinstance(x, Tensor):
                    raise ValueError(
                        f"TrainWatch cannot take a probe batch from the {source}: its batches hold {type(x).__name__}, not a tensor of inputs first. {_HOW}"
                    )
                if chunks and x.shape[1:] != chunks[0].shape[1:]:
                    break
                chunks.append(x)
                if sum(len(c) for c in chunks) >= samples:
                    break
        if chunks:
            inputs = torch.cat(chunks)[:samples]
            return f"the first {len(inputs)} inputs of the {source}", inputs
    raise ValueError(f"TrainWatch found no validation or training data to draw the activation probe batch from. {_HOW}")


def check_forward(model: nn.Module, inputs: Tensor, source: str) -> None:
    """Forward the probe batch once, untouched, so a wrong shape fails now and not at step 50."""
    try:
        with untouched(model):
            model(inputs)
    except Exception as error:
        raise ValueError(
            f"TrainWatch: the activation probe batch ({source}, shape {tuple(inputs.shape)}, dtype {inputs.dtype}) "
            f"fails in `{type(model).__name__}.forward`: {type(error).__name__}: {error}. {_HOW}"
        ) from error
