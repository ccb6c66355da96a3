"""The landscape job: rebuild a run's model, compute its 1-D curve and 2-D surface, log them to the same run.

`LandscapeSpec` is shared by the CLI (`trainwatch landscape RUN_ID`) and the Python API (`run_landscape`).
`compute_landscape` is the framework-free middle: a model, batches and a spec in, arrays out.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from trainwatch.landscape import export
from trainwatch.landscape.directions import Ignore, Norm, directions_for
from trainwatch.landscape.surface import Batch, BnMode, LossFn, Mode, Surface, default_loss, grid_axis, grid_points


@dataclass(frozen=True)
class LandscapeSpec:
    """Settings of one landscape; `name` is its folder under `trainwatch/landscape/` in the run."""

    run_id: str = ""
    tracking_uri: str | None = None
    name: str = "random"
    steps: int = 51  # points per axis (odd: the trained model is the centre)
    span: float = 1.0  # each axis covers [−span, span] in units of the filter-normalised direction
    seed: int = 0
    norm: Norm = "filter"
    ignore: Ignore = "biasbn"
    bn_mode: BnMode = "eval"
    mode: Mode = "auto"
    chunk: int = 64  # points per vmap call and per resumable partial result
    batch_size: int = 512  # evaluation samples per forward
    device: str = "auto"
    loss: str | None = None  # "cross_entropy", "mse", or an attribute of the module; default: inferred
    sharpness_radius: float = 0.1
    work_dir: str = ".trainwatch/landscape"

    def __post_init__(self) -> None:
        grid_axis(self.steps, self.span)  # odd steps, span > 0: fail before any work
        if self.chunk < 1 or self.batch_size < 1:
            raise ValueError(f"chunk and batch_size must be >= 1, got chunk={self.chunk}, batch_size={self.batch_size}")

    def settings(self) -> dict[str, object]:
        keep = ("steps", "span", "seed", "norm", "ignore", "bn_mode", "loss", "sharpness_radius")
        return {k: v for k, v in asdict(self).items() if k in keep}


@dataclass
class Landscape:
    """Arrays of one computed landscape and how it was made."""

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray  # [len(alphas), len(betas)]
    accuracy: np.ndarray | None
    curve: np.ndarray  # 1-D loss along direction 1 (its own evaluation)
    curve_accuracy: np.ndarray | None
    directions: list[dict[str, Tensor]]
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def centre(self) -> float:
        return float(self.loss[len(self.alphas) // 2, len(self.betas) // 2])

    def metrics(self, radius: float) -> dict[str, float]:
        """Centre loss, sharpness (largest loss increase within `radius` of the centre) and the curvature
        (second difference of the loss at the centre along each direction, and their mean)."""
        a, b = np.meshgrid(self.alphas, self.betas, indexing="ij")
        near = np.hypot(a, b) <= radius + 1e-12
        c, i, j = self.centre, len(self.alphas) // 2, len(self.betas) // 2
        h = self.alphas[1] - self.alphas[0] if len(self.alphas) > 1 else np.nan
        k = self.betas[1] - self.betas[0] if len(self.betas) > 1 else np.nan
        curv_a = (self.loss[i + 1, j] - 2 * c + self.loss[i - 1, j]) / h**2 if len(self.alphas) > 1 else np.nan
        curv_b = (self.loss[i, j + 1] - 2 * c + self.loss[i, j - 1]) / k**2 if len(self.betas) > 1 else np.nan
        return {
            "centre_loss": c,
            "sharpness": float(np.nanmax(self.loss[near]) - c),
            "curvature_d1": float(curv_a),
            "curvature_d2": float(curv_b),
            "curvature": float(np.nanmean([curv_a, curv_b])),
        }


def batches_of(inputs: Tensor, targets: Tensor, batch_size: int, device: torch.device) -> list[Batch]:
    """The evaluation data on the device, split into fixed batches (no shuffle, no augmentation)."""
    inputs, targets = inputs.to(device), targets.to(device)
    return [(inputs[i : i + batch_size], targets[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]


def _spec_key(spec: LandscapeSpec, data: Sequence[Batch]) -> str:
    digest = hashlib.sha256(json.dumps(spec.settings(), sort_keys=True).encode())
    for x, y in data:
        digest.update(x.detach().cpu().numpy().tobytes())
        digest.update(y.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _evaluate(
    surface: Surface, points: np.ndarray, spec: LandscapeSpec, partial: Path | None, key: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Loss (and accuracy) at every point; with `partial`, finished chunks are saved and skipped on resume."""
    loss = np.full(len(points), np.nan)
    acc = np.full(len(points), np.nan)
    done = np.zeros(len(points), dtype=bool)
    if partial is not None and partial.exists():
        saved = np.load(partial)
        if str(saved["key"]) == key and len(saved["loss"]) == len(points):
            loss, acc, done = saved["loss"].copy(), saved["acc"].copy(), saved["done"].copy()
    todo = np.flatnonzero(~done)
    has_acc = bool(np.isfinite(acc[done]).any()) if done.any() else True
    for part, chunk_loss, chunk_acc in surface.evaluate(points[todo], spec.mode, spec.chunk):
        index = todo[part]
        loss[index], done[index] = chunk_loss, True
        if chunk_acc is None:
            has_acc = False
        else:
            acc[index] = chunk_acc
        if partial is not None:
            partial.parent.mkdir(parents=True, exist_ok=True)
            np.savez(partial.with_suffix(".tmp.npz"), key=key, loss=loss, acc=acc, done=done)
            partial.with_suffix(".tmp.npz").replace(partial)
    return loss, (acc if has_acc else None)


def compute_landscape(
    model: nn.Module, batches: Sequence[Batch], spec: LandscapeSpec, loss_fn: LossFn = default_loss, partial_dir: Path | None = None
) -> Landscape:
    """Directions from `spec.seed`, the 1-D curve along direction 1 and the 2-D grid; the model is restored
    bitwise. `partial_dir` keeps finished chunks so an interrupted job resumes where it stopped."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    directions = directions_for(model, 2, spec.seed, spec.norm, spec.ignore)
    axis = grid_axis(spec.steps, spec.span)
    key = _spec_key(spec, batches)
    part = (lambda n: partial_dir / f"{n}.npz") if partial_dir is not None else (lambda n: None)
    curve, curve_acc = _evaluate(Surface(model, directions[:1], batches, loss_fn, spec.bn_mode), axis[:, None], spec, part("curve"), key)
    surface = Surface(model, directions, batches, loss_fn, spec.bn_mode)
    loss, acc = _evaluate(surface, grid_points([axis, axis]), spec, part("surface"), key)
    shape = (len(axis), len(axis))
    meta = {
        **spec.settings(),
        "directions": "Gaussian, filter-normalised per output filter (Li et al. 2018), not orthogonalised",
        "samples": sum(len(y) for _, y in batches),
        "data_sha256_16": key,
        "device": str(device),
        "engine": getattr(surface, "engine", spec.mode),
        "seconds": round(time.perf_counter() - start, 3),
        "points": len(axis) + len(axis) ** 2,
    }
    return Landscape(axis, axis, loss.reshape(shape), None if acc is None else acc.reshape(shape), curve, curve_acc, directions, meta)


# --- the job against a run ----------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_module(meta: dict, checkpoint: bytes, device: torch.device) -> nn.Module:
    """Import the LightningModule class named in model.json and load the checkpoint into it."""
    path = str(meta.get("class", ""))
    module_name, _, qualname = path.partition(":")
    if module_name == "__main__" or not qualname:
        raise ValueError(
            f"the run's model class {path!r} was defined in a script's __main__, so this process cannot import it; "
            "move the LightningModule into an importable module and train again."
        )
    try:
        cls = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"cannot import the run's model class {path!r} ({error}); install or add to PYTHONPATH the package that defines it."
        ) from error
    try:
        model = cls.load_from_checkpoint(io.BytesIO(checkpoint), map_location=device, weights_only=False)
    except TypeError as error:
        raise ValueError(
            f"{path} could not be rebuilt from its checkpoint ({error}); call `self.save_hyperparameters()` in its __init__ "
            "so that Lightning can pass the constructor arguments."
        ) from error
    return model.to(device)


def module_loss(model: nn.Module, name: str | None) -> LossFn:
    """The loss to evaluate: by name, a callable attribute of the module, or `default_loss` (inferred)."""
    import torch.nn.functional as F

    if name is None:
        for attr in ("loss_fn", "criterion"):
            fn = getattr(model, attr, None)
            if callable(fn):
                return fn
        return default_loss
    if name == "cross_entropy":
        return F.cross_entropy
    if name == "mse":
        return lambda out, y: F.mse_loss(out, y.to(out.dtype).reshape(out.shape))
    fn = getattr(model, name, None)
    if not callable(fn):
        raise ValueError(f"loss {name!r} is neither 'cross_entropy', 'mse' nor a callable attribute of {type(model).__name__}")
    return fn


def artifacts(landscape: Landscape) -> dict[str, bytes]:
    """Files of a landscape: surface.npz, directions.safetensors, meta.json, the plots and surface.html."""
    from trainwatch.landscape import plot

    ls = landscape
    arrays = {"alphas": ls.alphas, "betas": ls.betas, "loss": ls.loss, "curve_alphas": ls.alphas, "curve_loss": ls.curve}
    if ls.accuracy is not None:
        arrays["accuracy"] = ls.accuracy
    if ls.curve_accuracy is not None:
        arrays["curve_accuracy"] = ls.curve_accuracy
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    directions = {f"d{i + 1}/{name}": t.detach().cpu().contiguous() for i, d in enumerate(ls.directions) for name, t in d.items()}
    title = f"loss landscape (filter-normalised, seed {ls.meta.get('seed')})"
    return {
        "surface.npz": buffer.getvalue(),
        "directions.safetensors": save_safetensors(directions),
        "meta.json": json.dumps(ls.meta, indent=1, default=str).encode(),
        "curve.png": plot.curve_png(ls.alphas, ls.curve, ls.curve_accuracy, title),
        "contour.png": plot.contour_png(ls.alphas, ls.betas, ls.loss, title),
        "surface.png": plot.surface_png(ls.alphas, ls.betas, ls.loss, title),
        "surface.html": plot.surface_html(ls.alphas, ls.betas, ls.loss, title, ls.accuracy).encode(),
    }


def run_landscape(spec: LandscapeSpec, progress: Callable[[str], None] | None = print) -> Landscape:
    """Compute the landscape of `spec.run_id` and log it to that run under `trainwatch/landscape/<name>/`."""
    from trainwatch.runs import RunStore

    store = RunStore(spec.run_id, spec.tracking_uri)
    prefix = f"landscape/{spec.name}"
    params = {f"{prefix}/{k}": str(v) for k, v in spec.settings().items()}
    store.check_params(params)
    inputs, targets = export.read_eval(store.read(export.EVAL_DATA, "landscape evaluation data"))
    meta = json.loads(store.read(export.MODEL_JSON, "model class record"))
    device = _device(spec.device)
    model = load_module(meta, store.read(export.CHECKPOINT, "checkpoint"), device)
    batches = batches_of(inputs, targets, spec.batch_size, device)
    partial = Path(spec.work_dir) / spec.run_id / spec.name
    if progress:
        progress(f"trainwatch landscape: {len(inputs)} samples, {spec.steps}x{spec.steps} grid + {spec.steps}-point curve on {device}")
    landscape = compute_landscape(model, batches, spec, module_loss(model, spec.loss), partial)
    files = {f"trainwatch/landscape/{spec.name}/{name}": data for name, data in artifacts(landscape).items()}
    store.write(files)
    metrics = {f"{prefix}/{k}": v for k, v in landscape.metrics(spec.sharpness_radius).items() if np.isfinite(v)}
    store.log(metrics, params)
    for leftover in partial.glob("*.npz"):
        leftover.unlink()
    if progress:
        progress(f"trainwatch landscape: centre loss {landscape.centre:.4g}, {landscape.meta['seconds']} s; logged to run {spec.run_id}")
    return landscape
