"""CUDA-only checks (skipped without a GPU): TrainWatch's hooks never synchronise the host with the device."""

from __future__ import annotations

import numpy as np
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
    watch = StrictTrainWatch(
        every_n_steps=1, activations_every_n_steps=1, activations=activations, tracking_uri=store, system_metrics=False
    )
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
    watched = run([TrainWatch(every_n_steps=1, activations_every_n_steps=1, tracking_uri=store, system_metrics=False)])
    for name, tensor in bare.items():
        assert torch.equal(tensor, watched[name]), name


class UnscaledNorm(pl.Callback):
    """After TrainWatch in the list: the total gradient norm it should see, and the loss scale at that step."""

    def __init__(self) -> None:
        self.norm: dict[int, float] = {}
        self.scale: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.reshape(-1).float() for p in pl_module.parameters() if p.grad is not None]
        self.norm[trainer.global_step] = torch.linalg.vector_norm(torch.cat(grads)).item()
        self.scale[trainer.global_step] = trainer.precision_plugin.scaler.get_scale()


def test_gradients_are_logged_unscaled_under_fp16_amp(store):
    from mlflow.tracking import MlflowClient

    pl.seed_everything(0)
    train, val = loaders(images(n=64), batch_size=8)
    seen = UnscaledNorm()
    watch = TrainWatch(every_n_steps=1, tracking_uri=store, system_metrics=False)
    trainer(max_steps=6, accelerator="cuda", precision="16-mixed", callbacks=[watch, seen]).fit(Classifier(cnn()), train, val)
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("trainwatch").experiment_id])
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/grad_norm_total")}
    assert sorted(logged) == sorted(seen.norm) == list(range(6))
    assert all(seen.scale[s] > 1 for s in logged)  # the loss really was scaled, so a scaled norm would differ
    assert logged == pytest.approx(seen.norm, rel=1e-4)
    scales = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss_scale")}
    assert scales == seen.scale  # copied on the device before the scaler's update, read with the record


def test_the_probe_batch_waits_in_pinned_host_memory_and_its_numbers_match_the_cpu(store):
    """Beside a GPU the probe batch stays on the host (pinned) and only a part at a time is copied over: the logged
    activation numbers must equal those of the same training on the CPU."""
    from mlflow.tracking import MlflowClient

    def run(accelerator, experiment):
        pl.seed_everything(0)
        train, val = loaders(images(n=64), batch_size=8)  # probe of 64 validation inputs: eight parts of 8
        watch = TrainWatch(
            every_n_steps=2, activations_every_n_steps=2, tracking_uri=store, experiment_name=experiment, system_metrics=False
        )
        trainer(max_steps=4, accelerator=accelerator, callbacks=[watch]).fit(Classifier(cnn()), train, val)
        return watch

    on_gpu = run("cuda", "gpu")
    (held,) = on_gpu._probe_inputs.tensors()
    assert held.device.type == "cpu" and held.is_pinned()
    run("cpu", "cpu")
    client = MlflowClient(store)

    def zero_frac(experiment):
        (r,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        return {m.step: m.value for m in client.get_metric_history(r.info.run_id, "act_zero_frac/net.2")}

    gpu, cpu = zero_frac("gpu"), zero_frac("cpu")
    assert sorted(gpu) == sorted(cpu) == [0, 2]
    assert gpu == pytest.approx(cpu, abs=0.02)  # the same training on another device: close, not bit-equal


class Regressor(Classifier):
    """An MSE head: `Trainer(deterministic=True)` refuses NLLLoss on CUDA, a refusal of the user's own loss."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), torch.nn.functional.one_hot(y, 3).float())


def test_deterministic_training_on_cuda_is_watched(store):
    """`Trainer(deterministic=True)` turns on `torch.use_deterministic_algorithms`, under which `torch.histc` raises on
    CUDA: the activation histograms count by `index_add_` instead, and equal those of the same fit without it."""
    from mlflow.tracking import MlflowClient

    from tests.models import blobs, mlp

    def run(deterministic, experiment):
        pl.seed_everything(0)
        watch = TrainWatch(
            every_n_steps=2, activations_every_n_steps=2, tracking_uri=store, experiment_name=experiment, system_metrics=False
        )
        train = torch.utils.data.DataLoader(blobs(n=64), batch_size=16)
        trainer(max_steps=4, accelerator="cuda", deterministic=deterministic, callbacks=[watch]).fit(Regressor(mlp()), train)
        client = MlflowClient(store)
        (r,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        hist = np.load(client.download_artifacts(r.info.run_id, "trainwatch/histograms/activations/part-00000.npz"))
        return hist["values"]

    strict, loose = run(True, "deterministic"), run(False, "default")
    assert strict.shape == loose.shape and strict.shape[0] == 2
    np.testing.assert_array_equal(strict, loose)
