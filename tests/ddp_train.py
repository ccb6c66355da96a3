"""Run by test_ddp.py as a script: Lightning's `ddp` strategy relaunches this file once per rank."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl

from tests.models import Classifier, blobs, loaders, mlp, trainer
from trainwatch import TrainWatch

if __name__ == "__main__":
    uri, every, act_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    pl.seed_everything(0)
    train, val = loaders(blobs(n=256), batch_size=16)
    watch = TrainWatch(every_n_steps=every, activations_every_n_steps=act_every, tracking_uri=uri, system_metrics=False, probe_samples=32)
    trainer(max_steps=9, strategy="ddp", devices=2, callbacks=[watch]).fit(Classifier(mlp()), train, val)
