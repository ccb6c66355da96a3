"""The landscape job: rebuild a run's model from its checkpoint, compute the landscape, log it to the same run.

`LandscapeSpec` (in `compute`) is shared by the CLI (`trainwatch landscape RUN_ID`) and `run_landscape`.
With several devices it starts one process per device (or joins `torchrun`'s group); only rank 0 logs.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from trainwatch.landscape import export
from trainwatch.landscape.compute import Landscape, LandscapeSpec, _rank_world, batches_of, compute_landscape
from trainwatch.landscape.directions import pca_directions
from trainwatch.landscape.surface import LossFn, default_loss

__all__ = ["Landscape", "LandscapeSpec", "artifacts", "compute_landscape", "load_module", "module_loss", "run_landscape"]


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
    if ls.trajectory is not None:
        arrays["trajectory"] = ls.trajectory
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    directions = {f"d{i + 1}/{name}": t.detach().cpu().contiguous() for i, d in enumerate(ls.directions) for name, t in d.items()}
    kind = "PCA of the trajectory" if ls.trajectory is not None else f"filter-normalised, seed {ls.meta.get('seed')}"
    title = f"loss landscape ({kind})"
    return {
        "surface.npz": buffer.getvalue(),
        "directions.safetensors": save_safetensors(directions),
        "meta.json": json.dumps(ls.meta, indent=1, default=str).encode(),
        "curve.png": plot.curve_png(ls.alphas, ls.curve, ls.curve_accuracy, title),
        "contour.png": plot.contour_png(ls.alphas, ls.betas, ls.loss, title, ls.trajectory, _trajectory_note(ls)),
        "surface.png": plot.surface_png(ls.alphas, ls.betas, ls.loss, title),
        "surface.html": plot.surface_html(ls.alphas, ls.betas, ls.loss, title, ls.accuracy).encode(),
    }


def _trajectory_note(ls: Landscape) -> str | None:
    if ls.trajectory is None:
        return None
    ratio = ls.meta.get("explained_variance_ratio") or [float("nan")] * 2
    return f"training path projected on its 2 principal directions ({100 * ratio[0]:.0f}% + {100 * ratio[1]:.0f}% of its variance); points off the plane are projections"


def run_landscape(spec: LandscapeSpec, progress: Callable[[str], None] | None = print) -> Landscape:
    """Compute the landscape of `spec.run_id` and log it to that run under `trainwatch/landscape/<name>/`.

    With `spec.devices > 1` it starts that many processes (one per GPU; gloo on CPU) that split the grid; under
    `torchrun` it joins the process group torchrun set up. Only rank 0 logs.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if spec.devices > 1 and not launched and not _rank_world()[1] > 1:
        return _spawn(spec, progress)
    joined = launched and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if torch.cuda.is_available() and spec.device != "cpu" else "gloo")
    try:
        return _run(spec, progress)
    finally:
        if joined:
            dist.destroy_process_group()


def _run(spec: LandscapeSpec, progress: Callable[[str], None] | None) -> Landscape:
    from trainwatch.runs import RunStore

    rank, world = _rank_world()
    progress = progress if rank == 0 else None
    store = RunStore(spec.run_id, spec.tracking_uri)
    prefix = f"landscape/{spec.name}"
    params = {f"{prefix}/{k}": str(v) for k, v in spec.settings().items()}
    store.check_params(params)
    inputs, targets = export.read_eval(store.read(export.EVAL_DATA, "landscape evaluation data"))
    meta = json.loads(store.read(export.MODEL_JSON, "model class record"))
    device = _device(spec.device, rank, world)
    model = load_module(meta, store.read(export.CHECKPOINT, "checkpoint"), device)
    batches = batches_of(inputs, targets, spec.batch_size, device)
    partial = Path(spec.work_dir) / spec.run_id / spec.name
    if progress:
        where = f"{world} processes" if world > 1 else str(device)
        progress(f"trainwatch landscape: {len(inputs)} samples, {spec.steps}x{spec.steps} grid + {spec.steps}-point curve on {where}")
    directions, span, trajectory = None, None, None
    if spec.directions == "pca":
        directions, trajectory, explained = _trajectory_plane(store, model, spec)
        span = 1.25 * float(np.abs(trajectory).max()) or spec.span  # the grid covers the whole path
    loss_fn = module_loss(model, spec.loss)
    landscape = compute_landscape(model, batches, spec, loss_fn, partial, progress=progress is not None, directions=directions, span=span)
    if trajectory is not None:
        landscape.trajectory = trajectory
        landscape.meta["explained_variance_ratio"] = explained.tolist()
    if rank != 0:
        return landscape
    files = {f"trainwatch/landscape/{spec.name}/{name}": data for name, data in artifacts(landscape).items()}
    store.write(files)
    metrics = {f"{prefix}/{k}": v for k, v in landscape.metrics(spec.sharpness_radius).items() if np.isfinite(v)}
    store.log(metrics, params)
    for leftover in partial.glob("*.npz"):
        leftover.unlink()
    if progress:
        m = landscape.meta
        progress(
            f"trainwatch landscape: centre loss {landscape.centre:.4g}; {m['seconds']} s, {1000 * m['seconds_per_point']:.2f} ms per point "
            f"(a plain forward: {1000 * m['floor_seconds_per_point']:.2f} ms); {_flops(m['achieved_flop_per_s'])} achieved vs "
            f"{_flops(m['inference_flop_per_s'])} plain inference; logged to run {spec.run_id}"
        )
    return landscape


def _trajectory_plane(store: object, model: nn.Module, spec: LandscapeSpec) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """PCA directions of the run's trajectory snapshots around the final weights, and the projected path."""
    paths = store.files_in(export.TRAJECTORY_DIR)  # type: ignore[attr-defined]
    if len(paths) < 2:
        raise FileNotFoundError(
            f"run {spec.run_id} has {len(paths)} trajectory snapshots under {export.TRAJECTORY_DIR}/; train with "
            "`TrainWatch(trajectory_every_n_epochs=1)` for PCA directions, or use the default random directions."
        )
    snapshots = [load_safetensors(store.read(path, "trajectory snapshot")) for path in sorted(paths)]  # type: ignore[attr-defined]
    final = {name: p.detach() for name, p in model.named_parameters()}
    return pca_directions(snapshots, final, spec.ignore)


def _flops(rate: object) -> str:
    return f"{rate / 1e9:.2f} GFLOP/s" if isinstance(rate, float) else "n/a FLOP/s"


def _device(name: str, rank: int = 0, world: int = 1) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        if world > torch.cuda.device_count():
            raise ValueError(f"{world} processes but {torch.cuda.device_count()} CUDA devices; pass --devices <= that, or --device cpu")
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    return device


def _spawn(spec: LandscapeSpec, progress: Callable[[str], None] | None) -> Landscape:
    """Start `spec.devices` processes on one machine (torch.multiprocessing + a rendezvous file in a fresh
    directory: unlike a TCP port picked in advance, no other process can take it before the workers bind)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(spec, tmp, progress is not None), nprocs=spec.devices, join=True)
        return torch.load(Path(tmp) / "landscape.pt", weights_only=False)


def _worker(rank: int, spec: LandscapeSpec, tmp: str, show: bool) -> None:
    backend = "nccl" if torch.cuda.is_available() and spec.device != "cpu" else "gloo"
    rendezvous = dist.FileStore(str(Path(tmp, "rendezvous")), spec.devices)  # a path, not a file:// URI: no escaping
    dist.init_process_group(backend, store=rendezvous, rank=rank, world_size=spec.devices)
    try:
        landscape = _run(spec, print if show else None)
        if rank == 0:
            torch.save(landscape, Path(tmp) / "landscape.pt")
        dist.barrier()  # no rank tears down gloo's connections while another still uses them (that one aborts)
    finally:
        dist.destroy_process_group()
