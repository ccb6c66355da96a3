"""Tiny real models and data for tests: an MLP and a CNN with BatchNorm and dropout, on generated data."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def blobs(n: int = 256, dim: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, dim, generator=g) * 2
    return TensorDataset(centres[y] + torch.randn(n, dim, generator=g), y)


def images(n: int = 128, size: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, size, size, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def mlp(dim: int = 8, classes: int = 3, hidden: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(0.2), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


def cnn(classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Sigmoid(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    )  # fmt: skip


def loaders(data: TensorDataset, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    return DataLoader(data, batch_size=batch_size, shuffle=True), DataLoader(data, batch_size=64)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=100, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
    )  # fmt: skip
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class StepCounter(pl.Callback):
    """Counts training batches started: 0 proves a setup error came before the first step."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1
