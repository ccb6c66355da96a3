"""Attach TrainWatch to your own LightningModule: the quick start's three lines, on a model you can run.

    .venv/bin/python examples/attach.py [--max-steps 300] [--tracking-uri sqlite:///mlflow.db]

With an `MLFlowLogger`, TrainWatch logs into the logger's run, beside what the module logs itself (`train_loss`,
`val_loss`); without one it opens a run of its own. TrainWatch warns once that the module's class is defined in
`__main__`, which the post-training `trainwatch landscape` job cannot import: in a project, keep the
LightningModule in a module of its own.
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import MLFlowLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from trainwatch import TrainWatch
from trainwatch.demo import digits_tensors


class DigitsMLP(pl.LightningModule):
    """An MLP on scikit-learn's 8×8 digits, with a ReLU and a tanh layer for the activation statistics to show."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()

    pl.seed_everything(0)
    x, y = digits_tensors()
    train, val = random_split(TensorDataset(x, y), [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    logger = MLFlowLogger(experiment_name="trainwatch-examples", run_name="attach", tracking_uri=args.tracking_uri)
    trainer = pl.Trainer(
        max_steps=args.max_steps, logger=logger, callbacks=[TrainWatch(every_n_steps=10)], log_every_n_steps=10, enable_progress_bar=False
    )
    trainer.fit(DigitsMLP(), DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256))
    print(f"logged to run {logger.run_id}; open the MLflow UI with: .venv/bin/mlflow ui --backend-store-uri {args.tracking_uri}")


if __name__ == "__main__":
    main()
