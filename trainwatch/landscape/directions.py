"""Random directions in parameter space, filter-normalised as in Li et al. (NeurIPS 2018).

Pure tensor functions over `{name: tensor}` dicts in `named_parameters()` order. A "filter" is the set of
weights that feed one output unit: a slice along dim 0 for Linear and Conv weights, along dim 1 for
ConvTranspose (weight [in, out/groups, ...]) and Embedding (weight [tokens, dim]: output unit j reads column j,
as in the equivalent Linear layer on one-hot inputs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

Ignore = Literal["biasbn", "none"]
Norm = Literal["filter", "layer", "none"]

EPS = 1e-10  # as in Li et al.'s code: d_i · ‖w_i‖ / (‖d_i‖ + eps)

_FILTER_DIM_1 = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding, nn.EmbeddingBag)


def filter_dims(model: nn.Module) -> dict[str, int]:
    """The filter dimension of every parameter of `model`: 1 for ConvTranspose and Embedding weights, else 0."""
    dims = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            dims[full] = 1 if isinstance(module, _FILTER_DIM_1) and param_name == "weight" else 0
    return dims


def filter_normalize(direction: Tensor, weight: Tensor, dim: int = 0, eps: float = EPS) -> Tensor:
    """Rescale each filter (slice along `dim`) of `direction` to the norm of the same filter of `weight`."""
    d = direction.movedim(dim, 0).reshape(direction.shape[dim], -1)
    w = weight.movedim(dim, 0).reshape(weight.shape[dim], -1)
    scale = torch.linalg.vector_norm(w, dim=1, keepdim=True) / (torch.linalg.vector_norm(d, dim=1, keepdim=True) + eps)
    return (d * scale).reshape(direction.movedim(dim, 0).shape).movedim(0, dim)


def random_direction(
    weights: Mapping[str, Tensor],
    generator: torch.Generator,
    norm: Norm = "filter",
    ignore: Ignore = "biasbn",
    dims: Mapping[str, int] | None = None,
) -> dict[str, Tensor]:
    """A Gaussian direction with the shape of every weight, normalised per filter (or per layer).

    With `ignore="biasbn"` every 1-D parameter (biases, BatchNorm/LayerNorm scales and shifts) gets a zero
    direction; with `ignore="none"` it moves along itself (Li et al.'s choice for 1-D parameters). Drawn on the
    generator's device (the CPU for a CPU generator), in float32, then moved to each weight's device and dtype,
    so a seed gives the same direction on any device.
    """
    dims = dims or {}
    out: dict[str, Tensor] = {}
    for name, w in weights.items():
        w = w.detach()
        if w.dim() <= 1:
            out[name] = torch.zeros_like(w) if ignore == "biasbn" else w.clone()
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32, device=generator.device).to(w.device, w.dtype)
        if norm == "filter":
            d = filter_normalize(d, w, dims.get(name, 0))
        elif norm == "layer":
            d = d * (torch.linalg.vector_norm(w) / (torch.linalg.vector_norm(d) + EPS))
        out[name] = d
    return out


def directions_for(model: nn.Module, count: int, seed: int, norm: Norm = "filter", ignore: Ignore = "biasbn") -> list[dict[str, Tensor]]:
    """`count` independent directions for `model`'s parameters from one seed (not orthogonalised, as in Li et al.)."""
    generator = torch.Generator().manual_seed(seed)
    weights = dict(model.named_parameters())
    dims = filter_dims(model)
    return [random_direction(weights, generator, norm, ignore, dims) for _ in range(count)]


def pca_directions(
    snapshots: Sequence[Mapping[str, Tensor]], final: Mapping[str, Tensor], ignore: Ignore = "biasbn"
) -> tuple[list[dict[str, Tensor]], np.ndarray, np.ndarray]:
    """The two principal directions of the path θ_t − θ_final (Li et al. §7), and the path projected on them.

    Returns (directions as unit vectors over all parameters, coordinates [T, 2] of every snapshot, explained
    variance ratios [2]). With `ignore="biasbn"`, 1-D parameters are left out of the PCA (zero direction).
    Coordinates are dot products with the unit directions: a point off the plane is shown at its projection.
    """
    names = [n for n, w in final.items() if not (ignore == "biasbn" and w.dim() <= 1)]
    if len(snapshots) < 2:
        raise ValueError(f"a PCA trajectory needs at least 2 snapshots, got {len(snapshots)}; train with trajectory_every_n_epochs")
    flat_final = torch.cat([final[n].detach().double().reshape(-1).cpu() for n in names])
    diffs = torch.stack([torch.cat([s[n].double().reshape(-1).cpu() for n in names]) - flat_final for s in snapshots])
    centred = diffs - diffs.mean(0, keepdim=True)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:2]
    ratio = (singular[:2] ** 2 / (singular**2).sum().clamp_min(1e-300)).numpy()
    coords = (diffs @ components.T).numpy()
    directions = []
    for component in components:
        d, offset = {}, 0
        for name, w in final.items():
            if name in names:
                d[name] = component[offset : offset + w.numel()].reshape(w.shape).to(w.device, w.dtype)
                offset += w.numel()
            else:
                d[name] = torch.zeros_like(w)
        directions.append(d)
    return directions, coords, ratio
