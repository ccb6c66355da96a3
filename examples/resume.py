"""Resume a crashed fit from its checkpoint: TrainWatch goes on in the run the first fit started.

    .venv/bin/python examples/resume.py [--tracking-uri sqlite:///mlflow.db] [--checkpoints checkpoints]

The first fit saves a checkpoint every 20 steps and dies at step 50 (a simulated crash); the second resumes from
the step-40 checkpoint with `fit(ckpt_path=...)`. TrainWatch keeps its run id in the checkpoint, so both fits
land in one run, which ends FINISHED, and the diagnosis goes on from the first fit's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from trainwatch import TrainWatch
from trainwatch.demo import DigitsCNN, DigitsData


class CrashAt(pl.Callback):
    """Raises at the start of step `step`, as a lost node or an out-of-memory error would end a fit."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def fit(tracking_uri: str, checkpoints: Path, ckpt_path: Path | None = None) -> TrainWatch:
    watch = TrainWatch(tracking_uri=tracking_uri, run_name="resume-example", every_n_steps=5)
    saver = ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=20, save_top_k=-1)
    callbacks = [watch, saver] if ckpt_path else [watch, saver, CrashAt(50)]
    trainer = pl.Trainer(max_steps=80, logger=False, callbacks=callbacks, log_every_n_steps=5, enable_progress_bar=False)
    pl.seed_everything(0)
    trainer.fit(DigitsCNN(), DigitsData(), ckpt_path=ckpt_path)
    return watch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    args = parser.parse_args()

    try:
        fit(args.tracking_uri, args.checkpoints)
    except RuntimeError as crash:
        print(f"first fit: {crash}")
    last = max(args.checkpoints.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    print(f"resuming from {last}")
    watch = fit(args.tracking_uri, args.checkpoints, ckpt_path=last)
    print(f"both fits logged to run {watch.run_id}; open the MLflow UI with: .venv/bin/mlflow ui --backend-store-uri {args.tracking_uri}")


if __name__ == "__main__":
    main()
