"""Run by test_ddp.py as a script: Lightning's `ddp` strategy relaunches this file once per rank.

    ddp_train.py URI EVERY ACT_EVERY [DEVICES BATCH_PER_DEVICE ORDERED] [--landscape]

ORDERED=1 trains a dropout-free MLP so that 2 ranks of batch b see, step by step, the same samples as 1 process of
batch 2b, and so train the same weights: under DDP Lightning deals the training set with a shuffling
DistributedSampler (seed 0: ranks r gets permutation[r::2]); the single process reads that permutation in order.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from tests.models import Classifier, blobs, loaders, mlp, trainer
from trainwatch import TrainWatch

if __name__ == "__main__":
    landscape = "--landscape" in sys.argv  # TrainWatch(landscape_at_end=True), which rank zero computes alone
    args = [a for a in sys.argv if a != "--landscape"]
    uri, every, act_every = args[1], int(args[2]), int(args[3])
    devices, batch, ordered = (int(a) for a in args[4:7]) if len(args) > 4 else (2, 16, 0)
    pl.seed_everything(0)
    data = blobs(n=256)
    if ordered:
        net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        order = None if devices > 1 else DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
        train, val = DataLoader(data, batch_size=batch, sampler=order, shuffle=False), DataLoader(data, batch_size=64)
    else:
        net = mlp()
        train, val = loaders(data, batch_size=batch)
    watch = TrainWatch(
        every_n_steps=every,
        activations_every_n_steps=act_every,
        tracking_uri=uri,
        system_metrics=False,
        probe_samples=32 * 2 // devices,
        landscape_at_end=landscape,
        landscape_steps=5,
    )
    strategy = "ddp" if devices > 1 else "auto"
    trainer(max_steps=9, strategy=strategy, devices=devices, callbacks=[watch]).fit(Classifier(net), train, val)
