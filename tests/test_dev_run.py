"""`Trainer(fast_dev_run=True)`: Lightning runs one batch with its loggers replaced by a `DummyLogger`. TrainWatch
checks its configuration as in any fit and logs nothing: no stray run at the default URI (the trainer's
`MLFlowLogger` is gone), no spool, no landscape."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from tests.models import Classifier, StepCounter, cnn, images, loaders, trainer
from trainwatch import TrainWatch


def _fit(watch: TrainWatch | None, **kwargs) -> tuple[Classifier, StepCounter]:
    pl.seed_everything(0)
    train, val = loaders(images(n=64), batch_size=16)
    model, counter = Classifier(cnn()), StepCounter()
    callbacks = [counter] + ([watch] if watch is not None else [])
    trainer(fast_dev_run=2, callbacks=callbacks, **kwargs).fit(model, train, val)
    return model, counter


def test_a_dev_run_logs_nothing_anywhere_and_leaves_training_as_it_is(store, tmp_path, monkeypatch):
    """With an `MLFlowLogger` on the team's server, a dev run once opened a run of its own in ./mlflow.db."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # where the default URI (sqlite:///mlflow.db) and the spool would be
    logger = MLFlowLogger(tracking_uri=store)
    watch = TrainWatch(landscape_at_end=True, landscape_steps=3, cam_every_n_steps=1, report_every_n_epochs=1)
    watched, counter = _fit(watch, logger=logger)
    bare, _ = _fit(None)
    assert counter.batches == 2  # the dev run trained
    assert sorted(p.name for p in work.iterdir()) == []  # no ./mlflow.db, no mlruns/, no .trainwatch/ spool
    client = MlflowClient(store)
    assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []
    for name, value in bare.state_dict().items():  # the probes drawn and checked at the start changed nothing
        assert torch.equal(watched.state_dict()[name], value), name
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in watched.modules())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(modules=["net.nope"]), "net.nope"),
        (dict(probe_batch=torch.zeros(2, 3, 8, 8)), "probe_batch"),  # 3 channels for a 1-channel CNN
        (dict(cam_every_n_steps=1, cam_layer="net.9"), "net.9"),  # the Linear head has no spatial output
    ],
)
def test_a_dev_run_still_fails_on_bad_configuration_before_the_first_step(store, kwargs, message):
    train, val = loaders(images(n=64), batch_size=16)
    counter = StepCounter()
    with pytest.raises(MisconfigurationException, match=message):
        trainer(fast_dev_run=2, callbacks=[counter, TrainWatch(tracking_uri=store, **kwargs)]).fit(Classifier(cnn()), train, val)
    assert counter.batches == 0
