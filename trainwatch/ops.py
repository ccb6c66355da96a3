"""Operations the sink delivers to MLflow: plain data, serialisable to the disk spool and back.

No tensors and no MLflow objects here, so an op can wait on disk for a server that is down.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_METRICS_PER_BATCH = 1000  # MLflow's own limit for one log_batch call


@dataclass(frozen=True)
class MetricsOp:
    """(key, value, timestamp_ms, step) tuples; timestamps are fixed at capture so a replay is idempotent."""

    values: tuple[tuple[str, float, int, int], ...]


@dataclass(frozen=True)
class ArtifactOp:
    """A file at `path` (relative to the run's artifact root); a later op for the same path replaces it."""

    path: str
    data: bytes


# The figures' layout, shared by the publisher (which keeps only what a figure shows) and `render` (which draws it).
MAX_PANELS = 12  # modules the histogram-evolution image shows
FILMSTRIP_SNAPSHOTS = 8  # CAM snapshots a filmstrip shows


def shown_modules(n: int, most: int = MAX_PANELS) -> list[int]:
    """Indices of at most `most` of `n` modules, evenly spread, the first and the last included."""
    return np.unique(np.linspace(0, n - 1, min(n, most)).round().astype(int)).tolist() if n else []


@dataclass(frozen=True)
class Render:
    """A figure to draw where its op is delivered: `trainwatch.render.<function>(**kwargs)` on NumPy data.

    With the default writer process that is the child, so matplotlib (0.2-0.5 s per figure, holding the interpreter
    lock) never runs beside the training thread; spooling an image draws it first."""

    function: str
    kwargs: dict[str, Any]

    def __call__(self) -> np.ndarray:
        from trainwatch import render

        return getattr(render, self.function)(**self.kwargs)


@dataclass(frozen=True)
class ImageOp:
    """An image at a step, shown by the MLflow UI with a step slider."""

    key: str
    step: int
    timestamp_ms: int
    image: np.ndarray | Render  # uint8 [H, W, 3], or the figure that draws it

    def pixels(self) -> np.ndarray:
        """The image as uint8 [H, W, 3], drawn now if it is a `Render`."""
        return self.image() if isinstance(self.image, Render) else self.image


@dataclass(frozen=True)
class TagsOp:
    tags: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ParamsOp:
    params: tuple[tuple[str, str], ...]


Op = MetricsOp | ArtifactOp | ImageOp | TagsOp | ParamsOp


def batched(ops: list[Op]) -> list[Op]:
    """Merge runs of MetricsOp into batches of at most MAX_METRICS_PER_BATCH values, keeping order."""
    out: list[Op] = []
    pending: list[tuple[str, float, int, int]] = []

    def close() -> None:
        for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
            out.append(MetricsOp(tuple(pending[i : i + MAX_METRICS_PER_BATCH])))
        pending.clear()

    for op in ops:
        if isinstance(op, MetricsOp):
            pending.extend(op.values)
        else:
            close()
            out.append(op)
    close()
    return out


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
