"""CUDA-only checks (skipped without a GPU): TrainWatch's hooks never synchronise the host with the device."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from tests.models import Classifier, cnn, images, loaders, trainer
from trainwatch import TrainWatch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class StrictTrainWatch(TrainWatch):
    """TrainWatch whose training hooks raise on any synchronising CUDA call."""

    def _strict(self, hook, *args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return hook(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def on_train_batch_start(self, *args):
        return self._strict(super().on_train_batch_start, *args)

    def on_before_optimizer_step(self, *args):
        return self._strict(super().on_before_optimizer_step, *args)

    def on_train_batch_end(self, *args):
        return self._strict(super().on_train_batch_end, *args)


@pytest.mark.parametrize("activations", ["probe", "live"])
def test_hooks_do_not_synchronise_on_cuda(store, activations):
    pl.seed_everything(0)
    train, val = loaders(images(n=64), batch_size=8)
    watch = StrictTrainWatch(every_n_steps=1, activations=activations, tracking_uri=store, system_metrics=False)
    # warm-up outside the strict hooks: the probe batch is drawn and checked at on_train_start
    trainer(max_steps=6, accelerator="cuda", callbacks=[watch]).fit(Classifier(cnn()), train, val)
    assert watch.sink is None


def test_bit_identical_on_cuda(store):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def run(callbacks):
        pl.seed_everything(3)
        model = Classifier(cnn(), lr=0.05)
        train, val = loaders(images(n=64), batch_size=8)
        trainer(max_steps=8, accelerator="cuda", callbacks=callbacks).fit(model, train, val)
        return model.state_dict()

    bare = run([])
    watched = run([TrainWatch(every_n_steps=1, tracking_uri=store, system_metrics=False)])
    for name, tensor in bare.items():
        assert torch.equal(tensor, watched[name]), name
