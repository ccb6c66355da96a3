"""The demo job: a small CNN trained on scikit-learn's digits (real data shipped with the package) with
TrainWatch attached, logging to the embedded default MLflow store."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import MLFlowLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainwatch.callback import DEFAULT_TRACKING_URI, TrainWatch


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8×8 digit images as [N, 1, 8, 8] floats in [0, 1] and integer labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


class DigitsData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed

    def setup(self, stage: str | None = None) -> None:
        x, y = digits_tensors()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(len(x) * self.val_fraction)
        self.val = TensorDataset(x[order[:n_val]], y[order[:n_val]])
        self.train = TensorDataset(x[order[n_val:]], y[order[n_val:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)


class DigitsCNN(pl.LightningModule):
    """conv → BN → ReLU ×2, global average pool, linear: small, with every kind of layer trainwatch watches."""

    def __init__(self, lr: float = 3e-3, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(self.features(x)).flatten(1)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


DEMO_CAM_METHODS = ["grad_cam", "grad_cam_pp", "layer_cam", "guided_grad_cam"]


def run_demo(tracking_uri: str = DEFAULT_TRACKING_URI, epochs: int = 5, every_n_steps: int = 5, seed: int = 0) -> str:
    """Train the demo and return the MLflow run id."""
    pl.seed_everything(seed, verbose=False)
    logger = MLFlowLogger(experiment_name="trainwatch-demo", tracking_uri=tracking_uri, run_name="digits-cnn")
    trainer = pl.Trainer(
        max_epochs=epochs, logger=logger, callbacks=[TrainWatch(every_n_steps=every_n_steps, cam_every_n_epochs=1, cam_methods=DEMO_CAM_METHODS)],
        log_every_n_steps=every_n_steps, enable_progress_bar=False, enable_model_summary=False, accelerator="auto",
        enable_checkpointing=False,  # TrainWatch logs a weights-only checkpoint to the run itself
    )  # fmt: skip
    trainer.fit(DigitsCNN(), DigitsData(seed=seed))
    return logger.run_id
