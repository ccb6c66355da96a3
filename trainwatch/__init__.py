"""trainwatch: watch a PyTorch Lightning model train — gradients, updates, activations and dynamics in MLflow."""

from trainwatch._version import __version__
from trainwatch.callback import TrainWatch

__all__ = ["TrainWatch", "__version__"]
