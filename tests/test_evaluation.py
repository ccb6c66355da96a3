"""`trainer.validate` and `trainer.test` after a fit: what the module logs there goes to the run TrainWatch opened
for the fit (an `MLFlowLogger` logs them to its own run, and TrainWatch adds nothing)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.models import Classifier, blobs, loaders, mlp, trainer
from trainwatch import TrainWatch


class Tested(Classifier):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_validate_and_test_after_a_fit_log_to_the_fits_run(store):
    pl.seed_everything(0)
    train, val = loaders(blobs(n=96), batch_size=16)
    x, y = val.dataset.tensors
    held_out = DataLoader(TensorDataset(x[:40], y[:40]), batch_size=64)  # not the fit's validation data: another loss
    watch = TrainWatch(tracking_uri=store, system_metrics=False, report=False, landscape_samples=0, writer="thread")
    t = trainer(max_steps=6, callbacks=[watch])
    model = Tested(mlp())
    t.fit(model, train, val)
    (validated,) = t.validate(model, held_out, verbose=False)
    (tested,) = t.test(model, val, verbose=False)
    (run,) = _runs(store)
    client = MlflowClient(store)
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in ("val_loss", "test_loss", "test_acc")}
    assert history["test_loss"] == [(6, tested["test_loss"])] and history["test_acc"] == [(6, tested["test_acc"])]
    assert len(history["val_loss"]) == 2 and history["val_loss"][1] == (6, validated["val_loss"])  # the fit's, then validate's
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model.eval()(x[:40]), y[:40]).item()
    assert validated["val_loss"] == pytest.approx(expected, rel=1e-6) != history["val_loss"][0][1]
    trainer(callbacks=[watch]).test(model, val, verbose=False)  # the same callback on another trainer: not the fit's run
    assert len(client.get_metric_history(run.info.run_id, "test_loss")) == 1 and len(_runs(store)) == 1
    assert pickle.loads(pickle.dumps(watch))._fitted_by is None  # still picklable for ddp_spawn after a fit


def test_an_mlflow_logger_logs_them_once_and_a_trainer_that_never_fit_logs_nothing(store):
    pl.seed_everything(0)
    train, val = loaders(blobs(n=96), batch_size=16)
    logger = MLFlowLogger(tracking_uri=store)
    t = trainer(
        max_steps=4, callbacks=[TrainWatch(system_metrics=False, report=False, landscape_samples=0, writer="thread")], logger=logger
    )
    model = Tested(mlp())
    t.fit(model, train, val)
    t.test(model, val, verbose=False)
    assert [m.step for m in MlflowClient(store).get_metric_history(logger.run_id, "test_loss")] == [4]  # Lightning's one value
    alone = Path("alone.db")
    trainer(callbacks=[TrainWatch(tracking_uri=f"sqlite:///{alone.absolute()}", system_metrics=False)]).test(
        Tested(mlp()), val, verbose=False
    )
    assert not alone.exists()  # not even connected to
