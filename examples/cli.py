"""TrainWatch configured from a LightningCLI YAML (`trainer.callbacks`), on the demo's digits CNN.

    .venv/bin/python examples/cli.py fit --config examples/cli.yaml

The tracking URI is not in the file: TrainWatch takes `MLFLOW_TRACKING_URI`, then `sqlite:///mlflow.db` in the
working directory.
"""

from __future__ import annotations

from pytorch_lightning.cli import LightningCLI

from trainwatch.demo import DigitsCNN, DigitsData

if __name__ == "__main__":
    LightningCLI(DigitsCNN, DigitsData, save_config_callback=None)
