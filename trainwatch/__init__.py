"""trainwatch: watch a PyTorch Lightning model train — gradients, updates, activations and dynamics in MLflow."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainwatch._version import __version__

if TYPE_CHECKING:
    from trainwatch.callback import TrainWatch

__all__ = ["TrainWatch", "__version__"]


def __getattr__(name: str) -> object:
    """`trainwatch.TrainWatch` is imported on first use: the writer process (`trainwatch.writer_process`) and
    the MLflow-only modules then start without torch and Lightning (seconds and a few hundred MB)."""
    if name == "TrainWatch":
        from trainwatch.callback import TrainWatch

        return TrainWatch
    raise AttributeError(f"module 'trainwatch' has no attribute {name!r}")
