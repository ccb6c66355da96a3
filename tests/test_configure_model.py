"""Modules that build, wrap or compile their layers in `configure_model` (Lightning calls it after the callbacks'
`setup`): TrainWatch plans and checks them once they exist, still before the first step."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from tests.models import Classifier, StepCounter, blobs, loaders, mlp, trainer
from trainwatch import TrainWatch


class BuiltLate(Classifier):
    """The layers exist only once `configure_model` has run (the pattern Lightning recommends for large models)."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.lr, self.net = 1e-2, None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = mlp()


class CompiledLate(Classifier):
    """Compiled in `configure_model`: its modules are named `net._orig_mod.*` from then on."""

    def configure_model(self) -> None:
        if not hasattr(self.net, "_orig_mod"):
            self.net = torch.compile(self.net, backend="eager")


class BuiltInSetup(Classifier):
    """The layers made in the module's own `setup`, which Lightning calls after the callbacks' `setup`."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.lr, self.net = 1e-2, None

    def setup(self, stage: str) -> None:
        if self.net is None:
            self.net = mlp()


class Grads(pl.Callback):
    """`.grad` of every parameter at the steps TrainWatch logs, taken after it in the callback list."""

    def __init__(self, every: int) -> None:
        self.every, self.grads = every, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step % self.every == 0:
            self.grads[trainer.global_step] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}


def _history(uri: str, key: str) -> dict[int, float]:
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("trainwatch").experiment_id])
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


@pytest.mark.parametrize(("model", "prefix"), [(BuiltLate, "net."), (BuiltInSetup, "net."), (CompiledLate, "net._orig_mod.")])
def test_layers_made_in_configure_model_are_watched_under_their_final_names(store, model, prefix):
    pl.seed_everything(0)
    train, val = loaders(blobs(n=128))
    grads = Grads(2)
    watch = TrainWatch(every_n_steps=2, activations_every_n_steps=2, tracking_uri=store, system_metrics=False)
    module = model(mlp()) if model is CompiledLate else model()
    trainer(max_steps=5, callbacks=[watch, grads]).fit(module, train, val)
    logged = _history(store, f"grad_norm/{prefix}0")
    assert sorted(logged) == sorted(grads.grads) == [0, 2, 4]
    for step, seen in grads.grads.items():
        expect = torch.linalg.vector_norm(torch.cat([seen[f"{prefix}0.weight"].flatten(), seen[f"{prefix}0.bias"].flatten()]))
        assert logged[step] == pytest.approx(expect.item(), rel=1e-5)
    assert sorted(_history(store, f"act_zero_frac/{prefix}4")) == [0, 2, 4]  # the probe's hooks fire on the layers


def test_a_bad_module_name_fails_before_the_first_step_once_configure_model_has_run(store):
    counter = StepCounter()
    train, val = loaders(blobs(n=64))
    watch = TrainWatch(tracking_uri=store, modules=["net.9"])
    with pytest.raises(MisconfigurationException, match=r"names module 'net.9'.*Closest names"):
        trainer(max_steps=2, callbacks=[watch, counter]).fit(BuiltLate(), train, val)
    assert counter.batches == 0


def test_the_setup_dry_runs_use_the_weights_device_not_the_one_lightning_already_names(store):
    """In `setup` Lightning has set `pl_module.device` to the device the weights will move to (a GPU), while they are
    still on the CPU: `probe_batch` and `cam_probes` are checked where the weights are."""
    from tests.models import cnn, images

    model = Classifier(cnn())
    model._device = torch.device("meta")  # what Lightning sets before the callbacks' setup, here a device never used
    probes = images(n=4).tensors[0]
    watch = TrainWatch(
        tracking_uri=store, probe_batch=probes, cam_probes=probes, cam_targets=torch.zeros(4, dtype=torch.long), cam_every_n_steps=5
    )
    watch._check_model(model)
    assert watch.plan is not None
