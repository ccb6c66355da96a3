"""TrainWatch watches what the fit's optimizers train: parameters that require grad but that no optimizer holds (an
EMA copy, a teacher, a target network) are left out, and warned about when they get gradients all the same."""

from __future__ import annotations

import json
import logging

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torch.optim.swa_utils import AveragedModel

from tests.models import Classifier, blobs, loaders, mlp, trainer
from trainwatch import TrainWatch


class WithEma(Classifier):
    """An average of the net's weights, as diffusion and self-supervised models keep one (SWA, EMA): a deep copy whose
    parameters require grad (copied flags) but are never in the loss nor in the optimizer."""

    def __init__(self) -> None:
        super().__init__(mlp())
        self.ema = AveragedModel(self.net)  # a running mean (an EMA's `get_ema_multi_avg_fn` closure would not pickle)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=1e-2)

    def on_train_batch_end(self, *args) -> None:
        self.ema.update_parameters(self.net)


class ForgottenHead(Classifier):
    """The optimizer is given every layer but the last: the head gets gradients and is never trained."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.net[:5].parameters(), lr=1e-2)


def _run(store: str):
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("trainwatch").experiment_id])
    return client, run


def test_an_ema_copy_is_not_watched_nor_diagnosed_as_getting_no_gradient(store, caplog):
    pl.seed_everything(0)
    train, val = loaders(blobs(n=128))
    watch = TrainWatch(every_n_steps=2, tracking_uri=store, system_metrics=False)
    with caplog.at_level(logging.INFO, logger="trainwatch"):
        trainer(max_steps=6, callbacks=[watch]).fit(WithEma(), train, val)
    client, run = _run(store)
    assert sorted(k for k in run.data.metrics if k.startswith("grad_norm/")) == ["grad_norm/net.0", "grad_norm/net.3", "grad_norm/net.5"]
    diagnosis = json.load(open(client.download_artifacts(run.info.run_id, "trainwatch/diagnosis.json")))
    assert [f["kind"] for f in diagnosis["findings"]] == []
    assert "not watching ema.module.0, ema.module.3, ema.module.5: parameters that require grad but that no optimizer holds" in caplog.text
    assert "get gradients, but no optimizer holds" not in caplog.text
    assert watch.plan is not None and not [m for g in watch.plan.groups for m in g.act_modules if m.startswith("ema")]
    assert not [k for k in run.data.metrics if "ema." in k]  # nor the copy's activation keys, which took budget


def test_layers_left_out_of_the_optimizer_that_get_gradients_are_warned_about(store, caplog):
    pl.seed_everything(0)
    train, val = loaders(blobs(n=128))
    watch = TrainWatch(every_n_steps=2, tracking_uri=store, system_metrics=False)
    trainer(max_steps=4, callbacks=[watch]).fit(ForgottenHead(mlp()), train, val)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "no optimizer holds" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("trainwatch: net.5 get gradients, but no optimizer holds their parameters")
    _, run = _run(store)
    assert "grad_norm/net.5" not in run.data.metrics and "grad_norm/net.3" in run.data.metrics


def test_update_ratios_of_the_trained_layers_stay_exact_beside_an_ema(store):
    """The EMA's update (after each step, outside the optimizer) changes its weights, not the watched layers'."""

    class Before(pl.Callback):
        def __init__(self) -> None:
            self.weights: dict[int, torch.Tensor] = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.weights[trainer.global_step] = pl_module.net[0].weight.detach().clone()

        def on_train_batch_end(self, trainer, pl_module, *args):
            step = trainer.global_step - 1
            w = self.weights[step]
            self.weights[step] = torch.linalg.vector_norm(pl_module.net[0].weight.detach() - w) / torch.linalg.vector_norm(w)

    pl.seed_everything(0)
    train, val = loaders(blobs(n=128))
    seen = Before()
    model = WithEma()
    model.net[0].bias.requires_grad_(False)  # only the weight: the ratio is of one tensor
    trainer(max_steps=4, callbacks=[TrainWatch(every_n_steps=2, tracking_uri=store, system_metrics=False), seen]).fit(model, train, val)
    client, run = _run(store)
    ratios = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "update_ratio/net.0")}
    assert sorted(ratios) == [0, 2]
    for step, value in ratios.items():
        assert value == pytest.approx(seen.weights[step].item(), rel=1e-5)


class NoOptimizer(Classifier):
    """Manual optimisation with no optimizer from `configure_optimizers` (Lightning runs a mock one): every
    parameter that requires grad stays watched."""

    def __init__(self) -> None:
        super().__init__(mlp())
        self.automatic_optimization = False
        self.opt = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        with torch.no_grad():
            for p in self.parameters():
                p -= 0.01 * p.grad
                p.grad = None

    def configure_optimizers(self):
        return None


def test_without_optimizers_every_parameter_that_requires_grad_is_watched(store):
    pl.seed_everything(0)
    train, val = loaders(blobs(n=64))
    watch = TrainWatch(every_n_steps=1, tracking_uri=store, system_metrics=False, activations="off")
    trainer(max_steps=2, max_epochs=1, callbacks=[watch]).fit(NoOptimizer(), train, val)
    assert watch.plan is not None and sorted(g.key for g in watch.plan.groups if g.param_modules) == ["net.0", "net.3", "net.5"]


class Backbone(Classifier):
    """A backbone for Lightning's `BackboneFinetuning`, which freezes it in its `setup` and unfreezes it later."""

    def __init__(self) -> None:
        super().__init__(mlp())
        self.backbone, self.head = self.net[:3], self.net[3:]

    def forward(self, x):
        return self.head(self.backbone(x))

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


@pytest.mark.parametrize("first", [True, False])
def test_a_backbone_frozen_by_a_finetuning_callback_is_left_out_in_either_callback_order(store, caplog, first):
    """Whether TrainWatch's `setup` runs before the callback freezes the backbone or after, the groups are those trained
    at the start (the backbone's first layer, frozen, has none and is no `no_gradient` warning); when the callback
    unfreezes it, a warning says the groups stay those of the start."""
    from pytorch_lightning.callbacks import BackboneFinetuning

    pl.seed_everything(0)
    train, val = loaders(blobs(n=64))
    watch, finetuning = (
        TrainWatch(every_n_steps=2, tracking_uri=store, system_metrics=False),
        BackboneFinetuning(unfreeze_backbone_at_epoch=1),
    )
    trainer(max_epochs=2, max_steps=-1, callbacks=[watch, finetuning] if first else [finetuning, watch]).fit(Backbone(), train, val)
    _, run = _run(store)
    assert sorted(k for k in run.data.metrics if k.startswith("grad_norm/")) == ["grad_norm/net.3", "grad_norm/net.5"]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("trainwatch")]
    assert not [w for w in warned if "warning no_gradient" in w]  # the frozen prefix is an info finding
    assert [w for w in warned if "optimizers now hold 6 parameters, 4 at the start" in w]


def test_a_watch_and_its_narrowed_predicate_pickle_for_ddp_spawn(store):
    """`ddp_spawn` pickles the trainer and its callbacks before the fit; the narrowing happens in each spawned process,
    whose predicate must pickle too (a later spawn, a checkpointed callback). No closures."""
    import pickle

    from trainwatch.groups import HeldBy

    assert isinstance(pickle.loads(pickle.dumps(TrainWatch(tracking_uri=store))), TrainWatch)
    model = WithEma()
    held = HeldBy(frozenset(id(p) for p in model.net.parameters()))
    again = pickle.loads(pickle.dumps(held))
    assert again == held and held(model.net[0].weight) and not held(model.ema.module[0].weight)


class SharedEncoder(Classifier):
    """Two optimizers that share the first layer (alternating heads, manual optimization)."""

    def __init__(self) -> None:
        super().__init__(mlp())
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for optimizer in self.optimizers():
            optimizer.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            optimizer.step()

    def configure_optimizers(self):
        shared = list(self.net[0].parameters())
        return torch.optim.SGD(shared + list(self.net[3].parameters()), lr=0.01), torch.optim.SGD(
            shared + list(self.net[5].parameters()), lr=0.01
        )


def test_a_parameter_two_optimizers_share_is_no_change_of_holdings(store, caplog):
    pl.seed_everything(0)
    train, val = loaders(blobs(n=64))
    trainer(max_steps=6, callbacks=[TrainWatch(every_n_steps=2, tracking_uri=store, system_metrics=False)]).fit(SharedEncoder(), train, val)
    assert "optimizers now hold" not in caplog.text
    _, run = _run(store)
    assert {"grad_norm/net.0", "grad_norm/net.3", "grad_norm/net.5"} <= set(run.data.metrics)
