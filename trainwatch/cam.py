"""Where the model looks: Grad-CAM and related maps as pure functions of (model, inputs, layer, targets).

Gradients come only from `torch.autograd.grad` with respect to the layer's activation (or the input), so
parameters' `.grad` are never touched; hooks are removed in `finally`. The model's mode is the caller's:
use eval mode (and `probes._scope.untouched`) for maps comparable over training.

Every function returns maps [B, *input_spatial] after ReLU, upsampled to the input size and min-max
normalised per image to [0, 1]; pass `normalize=False` for the raw maps (their `amax` is the strength of
the evidence, which per-image normalisation hides).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Layer = nn.Module | str
Reshape = Callable[[Tensor], Tensor]
EPS = 1e-7


# --- layers ------------------------------------------------------------------------------------------------
def resolve_layer(model: nn.Module, layer: Layer | None, inputs: Tensor | None = None) -> nn.Module:
    """A module given as itself or by its `named_modules()` name; None picks the last module (in forward
    order) whose output is spatial ([B, C, L] or [B, C, H, W]), which needs `inputs` for one forward."""
    if isinstance(layer, nn.Module):
        return layer
    modules = dict(model.named_modules())
    if isinstance(layer, str):
        if layer not in modules:
            close = difflib.get_close_matches(layer, list(modules), n=3)
            raise ValueError(f"CAM layer {layer!r} is not in `model.named_modules()`; closest names: {close}.")
        return modules[layer]
    if inputs is None:
        raise ValueError("resolve_layer(layer=None) needs `inputs` to find the last module with a spatial output.")
    return modules[default_layer_name(model, inputs)]


def default_layer_name(model: nn.Module, inputs: Tensor) -> str:
    """Name of the last module, in forward order, whose output has spatial dimensions of more than one
    position (a global pool's [B, C, 1, 1] does not count: it has nothing left to localise)."""
    seen: list[str] = []
    handles = [
        m.register_forward_hook(
            lambda m, a, o, name=name: seen.append(name) if isinstance(o, Tensor) and o.dim() >= 3 and o[0, 0].numel() > 1 else None
        )
        for name, m in model.named_modules()
        if name and not any(m.children())
    ]
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # hooks fire in a compiled model too
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError(
            f"No module of {type(model).__name__} has a spatial output ([B, C, L] or [B, C, H, W]) for inputs of shape "
            f"{tuple(inputs.shape)}; name the layer explicitly (and pass `reshape=` for token outputs)."
        )
    return seen[-1]


@contextmanager
def _grad_mode(inputs: Tensor):
    """Gradients on even inside `no_grad` or `inference_mode` (validation), on a normal copy of the inputs; a
    `torch.compile`d model runs eagerly, so that the hooks on its modules fire (and no graph is compiled)."""
    with torch.inference_mode(False), torch.enable_grad(), torch.compiler.set_stance("force_eager"):
        yield inputs.detach().clone()


def _capture(model: nn.Module, inputs: Tensor, layer: nn.Module, targets: Tensor, reshape: Reshape | None) -> tuple[Tensor, Tensor]:
    """Forward with a hook that keeps the layer's output and passes a clone downstream (so an in-place op after
    the layer cannot change what we keep), then d(score of each target)/d(activation). Returns
    (activation, gradient), both [B, C, *S]."""
    store: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: object, output: Tensor) -> Tensor:
        if not output.requires_grad:  # a frozen backbone: no graph reaches this layer, so one starts here
            output = output.detach().requires_grad_(True)
        store["a"] = output
        return output.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with _grad_mode(inputs) as x:
            score = _target_scores(model(x), targets)
            (grad,) = torch.autograd.grad(score.sum(), store["a"])
            act = store["a"].detach()
    finally:
        handle.remove()
    if reshape is not None:
        act, grad = reshape(act), reshape(grad)
    if act.dim() < 3:
        name = next((n for n, m in model.named_modules() if m is layer), "?")
        raise ValueError(
            f"CAM layer {name!r} ({type(layer).__name__}) outputs shape {tuple(act.shape)}: no spatial dimensions. Pick a "
            "layer with a [B, C, H, W] or [B, C, L] output (a conv layer), or pass `reshape=` for tokens."
        )
    return act, grad


def class_scores(output: object) -> Tensor:
    """The [batch, classes] scores in a forward's output: the tensor itself, the `logits` of a dict or of an output
    object (Hugging Face's `ModelOutput`), or the first item of a tuple (`(logits, aux)`). ValueError otherwise."""
    if isinstance(output, Tensor):
        scores = output
    elif isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        scores = output["logits"]
    elif isinstance(getattr(output, "logits", None), Tensor):
        scores = output.logits  # type: ignore[attr-defined]
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        scores = output[0]
    else:
        keys = f" with keys {', '.join(map(repr, output))}" if isinstance(output, Mapping) else ""
        raise ValueError(
            f"CAM needs class scores from the model's forward: a [batch, classes] tensor, a dict or output object with "
            f"`logits`, or a tuple that starts with them; it returned a {type(output).__name__}{keys}."
        )
    if scores.dim() != 2:
        raise ValueError(f"CAM needs class scores of shape [batch, classes]; the model's forward gave shape {tuple(scores.shape)}.")
    return scores


def _target_scores(output: object, targets: Tensor) -> Tensor:
    """Each input's score for its target class, from the forward's output (see `class_scores`)."""
    logits = class_scores(output)
    targets = torch.as_tensor(targets, device=logits.device).long().reshape(-1)
    if targets.numel() != logits.shape[0]:
        raise ValueError(f"targets: one class index per input, got {targets.numel()} for {logits.shape[0]} inputs.")
    if targets.min() < 0 or targets.max() >= logits.shape[1]:
        raise ValueError(f"targets must be class indices in [0, {logits.shape[1]}), got {targets.tolist()}.")
    return logits.gather(1, targets[:, None]).squeeze(1)


# --- post-processing -----------------------------------------------------------------------------------------
def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear (2-D) or linear (1-D) upsampling of [B, *S] maps to `size`."""
    mode = "bilinear" if len(size) == 2 else "linear"
    return F.interpolate(maps[:, None], size=tuple(size), mode=mode, align_corners=False)[:, 0]


def normalize_maps(maps: Tensor) -> Tensor:
    """Min-max per map to [0, 1]; a constant map (its spread within float rounding of its values) becomes all
    zeros. The test is relative: a model with a small head has small maps, and they are maps all the same."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    spread = hi - lo
    varies = spread > 1e-6 * torch.maximum(hi.abs(), lo.abs())
    return torch.where(varies, (flat - lo) / torch.where(varies, spread, 1.0), 0.0).reshape(maps.shape)


def _finish(cam: Tensor, inputs: Tensor, normalize: bool) -> Tensor:
    cam = upsample(F.relu(cam), inputs.shape[2:])
    return normalize_maps(cam) if normalize else cam


def _spatial_dims(t: Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.dim()))


# --- methods --------------------------------------------------------------------------------------------------
def grad_cam(
    model: nn.Module, inputs: Tensor, layer: Layer | None, targets: Tensor, reshape: Reshape | None = None, normalize: bool = True
) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ReLU(Σ_k α_k A^k), α_k the spatial mean of ∂y_c/∂A^k."""
    act, grad = _capture(model, inputs, resolve_layer(model, layer, inputs), targets, reshape)
    weights = grad.mean(_spatial_dims(grad), keepdim=True)
    return _finish((weights * act).sum(1), inputs, normalize)


def grad_cam_pp(
    model: nn.Module, inputs: Tensor, layer: Layer | None, targets: Tensor, reshape: Reshape | None = None, normalize: bool = True
) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018): pixel-weighted positive gradients, with the closed-form α for an
    exponential score, α_ij = g_ij² / (2 g_ij² + (Σ_ab A_ab) g_ij³). Only g > 0 counts (the weights take ReLU(g));
    there α = 1 / (2 + (Σ_ab A_ab) g_ij) exactly, with no ε to swamp the small gradients of a score. A layer with
    negative outputs can make that denominator ≤ 0, where the formula (derived for A ≥ 0) has no value: α = 0."""
    act, grad = _capture(model, inputs, resolve_layer(model, layer, inputs), targets, reshape)
    dims = _spatial_dims(grad)
    denominator = 2 + act.sum(dims, keepdim=True) * grad
    alpha = torch.where((grad > 0) & (denominator > 0), 1 / denominator.clamp_min(EPS), 0.0)
    weights = (alpha * F.relu(grad)).sum(dims, keepdim=True)
    return _finish((weights * act).sum(1), inputs, normalize)


def hires_cam(
    model: nn.Module, inputs: Tensor, layer: Layer | None, targets: Tensor, reshape: Reshape | None = None, normalize: bool = True
) -> Tensor:
    """HiResCAM (Draelos & Carin 2020): ReLU(Σ_k ∂y_c/∂A^k ⊙ A^k), element-wise, faithful to the score."""
    act, grad = _capture(model, inputs, resolve_layer(model, layer, inputs), targets, reshape)
    return _finish((grad * act).sum(1), inputs, normalize)


def layer_cam(
    model: nn.Module, inputs: Tensor, layer: Layer | None, targets: Tensor, reshape: Reshape | None = None, normalize: bool = True
) -> Tensor:
    """LayerCAM (Jiang et al. 2021): ReLU(Σ_k ReLU(∂y_c/∂A^k) ⊙ A^k), good on early layers."""
    act, grad = _capture(model, inputs, resolve_layer(model, layer, inputs), targets, reshape)
    return _finish((F.relu(grad) * act).sum(1), inputs, normalize)


def _input_gradient(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    with _grad_mode(inputs) as x:
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(_target_scores(model(x), targets).sum(), x)
    return grad


def saliency(
    model: nn.Module, inputs: Tensor, layer: Layer | None, targets: Tensor, reshape: Reshape | None = None, normalize: bool = True
) -> Tensor:
    """Gradient saliency (Simonyan et al. 2014): max over channels of |∂y_c/∂x|. `layer` is unused."""
    maps = _input_gradient(model, inputs, targets).abs().amax(1)
    return normalize_maps(maps) if normalize else maps


class _GuidedReLU(torch.autograd.Function):
    """Identity on an (already rectified) output; backward passes only positive gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.clamp_min(0)


def guided_backprop(
    model: nn.Module, inputs: Tensor, layer: Layer | None, targets: Tensor, reshape: Reshape | None = None, normalize: bool = True
) -> Tensor:
    """Guided backpropagation (Springenberg et al. 2015): input gradient with negative gradients zeroed at
    every `nn.ReLU` (ReLU's own backward already masks negative inputs). `layer` is unused."""
    handles = [m.register_forward_hook(lambda m, a, o: _GuidedReLU.apply(o)) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        maps = _input_gradient(model, inputs, targets).abs().amax(1)
    finally:
        for h in handles:
            h.remove()
    return normalize_maps(maps) if normalize else maps


def guided_grad_cam(
    model: nn.Module, inputs: Tensor, layer: Layer | None, targets: Tensor, reshape: Reshape | None = None, normalize: bool = True
) -> Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backprop ⊙ upsampled Grad-CAM: fine and class-specific."""
    maps = guided_backprop(model, inputs, layer, targets, normalize=False) * grad_cam(
        model, inputs, layer, targets, reshape, normalize=True
    )
    return normalize_maps(maps) if normalize else maps


def occlusion(
    model: nn.Module, inputs: Tensor, targets: Tensor, window: int = 4, stride: int = 2, baseline: float = 0.0, normalize: bool = True
) -> Tensor:
    """Occlusion sensitivity (Zeiler & Fergus 2014): drop of the target score when a `window` patch (of
    `baseline`) covers each position, sliding by `stride`; averaged where patches overlap."""
    if window < 1 or stride < 1:
        raise ValueError(f"occlusion needs window >= 1 and stride >= 1, got window={window}, stride={stride}.")
    spatial = inputs.shape[2:]
    with torch.no_grad():
        base = _target_scores(model(inputs), targets)
        drop = inputs.new_zeros(inputs.shape[0], *spatial)
        hits = inputs.new_zeros(*spatial)
        # every `stride`, and a last window flush with the far edge, so that no position is left uncovered
        starts = [sorted({*range(0, max(s - window, 0) + 1, stride), max(s - window, 0)}) for s in spatial]
        for corner in _product(starts):
            region = tuple(slice(c, c + window) for c in corner)
            patched = inputs.clone()
            patched[(slice(None), slice(None), *region)] = baseline
            drop[(slice(None), *region)] += (base - _target_scores(model(patched), targets)).view(-1, *[1] * len(spatial))
            hits[region] += 1
    maps = F.relu(drop / hits.clamp_min(1))
    return normalize_maps(maps) if normalize else maps


def _product(ranges: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for r in ranges:
        out = [(*o, i) for o in out for i in r]
    return out


METHODS: dict[str, Callable[..., Tensor]] = {
    "grad_cam": grad_cam,
    "grad_cam_pp": grad_cam_pp,
    "hires_cam": hires_cam,
    "layer_cam": layer_cam,
    "saliency": saliency,
    "guided_backprop": guided_backprop,
    "guided_grad_cam": guided_grad_cam,
}

__all__ = [
    "METHODS",
    "class_scores",
    "default_layer_name",
    "grad_cam",
    "grad_cam_pp",
    "guided_backprop",
    "guided_grad_cam",
    "hires_cam",
    "layer_cam",
    "normalize_maps",
    "occlusion",
    "resolve_layer",
    "saliency",
]
