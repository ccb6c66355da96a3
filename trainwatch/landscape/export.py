"""What the training run leaves for the landscape job: a fixed evaluation subset, the module class, a checkpoint.

Built on the training side (by the callback, at setup and at the end of `fit`) as artifact bytes; read back by
`landscape.job`. No MLflow and no Lightning here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from trainwatch._version import __version__
from trainwatch.probes._scope import read_quietly
from trainwatch.probes.model_inputs import ModelInputs

EVAL_DATA = "trainwatch/landscape/eval.safetensors"
MODEL_JSON = "trainwatch/model/model.json"
CHECKPOINT = "trainwatch/model/last.ckpt"
TRAJECTORY_DIR = "trainwatch/trajectory"
MAX_EVAL_BYTES = 64 * 2**20  # the evaluation subset travels with the run: keep it small


def draw_pairs(sources: Sequence[tuple[str, Iterable | None]], samples: int) -> tuple[str, Tensor, Tensor]:
    """The first `samples` (input, target) pairs of the first source with data, in loader order, without
    touching any RNG training uses; it stops before a batch whose shapes differ from the first one's (batches
    padded to their own length). Raises ValueError when batches are not (inputs, targets, ...) tensors."""
    for source, loader in sources:
        if loader is None:
            continue
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        with read_quietly(loader) as batches:
            for batch in batches:
                if not (isinstance(batch, (list, tuple)) and len(batch) >= 2 and all(isinstance(t, Tensor) for t in batch[:2])):
                    raise ValueError(
                        f"the {source} yields {type(batch).__name__} batches, not (inputs, targets) tensors; pass "
                        "`TrainWatch(landscape_data=(inputs, targets))` or `landscape_samples=0`."
                    )
                if xs and (batch[0].shape[1:] != xs[0].shape[1:] or batch[1].shape[1:] != ys[0].shape[1:]):
                    break
                xs.append(batch[0])
                ys.append(batch[1])
                if sum(len(x) for x in xs) >= samples:
                    break
        if xs:
            inputs, targets = torch.cat(xs)[:samples], torch.cat(ys)[:samples]
            return f"the first {len(inputs)} samples of the {source}", inputs, targets
    raise ValueError("found no validation or training data for the landscape's evaluation subset")


def eval_bytes(inputs: Tensor, targets: Tensor, source: str) -> bytes:
    """The evaluation subset as safetensors (inputs and targets, their dtypes kept), at most MAX_EVAL_BYTES."""
    if len(inputs) != len(targets):
        raise ValueError(f"landscape data: {len(inputs)} inputs but {len(targets)} targets")
    per_sample = inputs[:1].numel() * inputs.element_size() + targets[:1].numel() * targets.element_size()
    keep = max(1, min(len(inputs), MAX_EVAL_BYTES // max(per_sample, 1)))
    tensors = {"inputs": inputs[:keep].detach().cpu().contiguous(), "targets": targets[:keep].detach().cpu().contiguous()}
    return save_safetensors(tensors, metadata={"source": source, "samples": str(keep)})


def read_eval(data: bytes) -> tuple[Tensor, Tensor]:
    tensors = load_safetensors(data)
    return tensors["inputs"], tensors["targets"]


def trajectory_snapshot(module: nn.Module, epochs_done: int) -> tuple[str, bytes]:
    """The parameters after `epochs_done` epochs, as (artifact path, safetensors bytes) for PCA trajectories."""
    tensors = {name: p.detach().cpu().contiguous() for name, p in module.named_parameters()}
    return f"{TRAJECTORY_DIR}/epoch-{epochs_done:05d}.safetensors", save_safetensors(tensors, metadata={"epochs": str(epochs_done)})


def class_path(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}:{cls.__qualname__}"


def model_json_importable(module: nn.Module) -> bool:
    """Whether another process can import the module's class (not one defined in a script's __main__)."""
    return not class_path(module).startswith("__main__:")


def model_json(module: nn.Module) -> bytes:
    """Which class rebuilds the checkpoint, and whether a separate process can import it."""
    meta = {"class": class_path(module), "importable": model_json_importable(module), "trainwatch": __version__}
    return json.dumps(meta, indent=1).encode()


def architecture(model: nn.Module, sample: ModelInputs | None, device: torch.device | None = None) -> bytes:
    """The module tree for the dashboard: name, type, depth, parameter counts and, when `sample` (a couple of
    inputs) is given, each module's output shape from one forward of it on `device`, with the model left untouched."""
    from trainwatch.probes._scope import untouched
    from trainwatch.probes.activations import first_tensor

    shapes: dict[str, list[int]] = {}
    if sample is not None:
        handles = []
        for name, module in model.named_modules():

            def hook(module: nn.Module, args: object, output: object, name: str = name) -> None:
                out = first_tensor(output)
                if out is not None:
                    shapes.setdefault(name, list(out.shape))

            handles.append(module.register_forward_hook(hook))
        try:
            with untouched(model):
                sample.forward(model, device)
        except Exception:  # noqa: BLE001 - the tree without shapes is still worth having
            shapes.clear()
        finally:
            for handle in handles:
                handle.remove()
    rows = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        rows.append(
            {
                "name": name or "(model)",
                "type": type(module).__name__,
                "depth": name.count(".") + 1 if name else 0,
                "params": sum(p.numel() for p in module.parameters()),
                "trainable": sum(p.numel() for p in own if p.requires_grad),
                "out_shape": shapes.get(name),
            }
        )
    return json.dumps(rows).encode()
