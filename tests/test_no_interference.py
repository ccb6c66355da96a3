"""Monitoring never changes training: bit-identical parameters and BatchNorm buffers with and without
TrainWatch, every probe on, with dropout, shuffling and gradient accumulation; no hook left behind."""

from __future__ import annotations

import random

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from tests.models import Classifier, cnn, images, loaders, trainer
from trainwatch import TrainWatch

pytestmark = pytest.mark.slow


def _train(callbacks: list, accumulate: int) -> Classifier:
    pl.seed_everything(7)
    model = Classifier(cnn(), lr=0.05)
    train, val = loaders(images(n=96), batch_size=8)
    trainer(max_steps=12, accumulate_grad_batches=accumulate, callbacks=callbacks).fit(model, train, val)
    return model


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("activations", ["probe", "live"])
def test_training_is_bit_identical_with_trainwatch(store, accumulate, activations):
    bare = _train([], accumulate)
    watch = TrainWatch(every_n_steps=1, activations_every_n_steps=1, activations=activations, tracking_uri=store, system_metrics=False)
    watched = _train([watch], accumulate)
    bare_state, watched_state = bare.state_dict(), watched.state_dict()
    assert bare_state.keys() == watched_state.keys()
    for name, tensor in bare_state.items():  # parameters and BatchNorm running statistics
        assert torch.equal(tensor, watched_state[name]), name
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in watched.modules())
    assert watched.training == bare.training
    assert watch.sink is None  # closed at teardown


def test_probe_preserves_prefilled_grads_and_mode(store):
    """Drive the probe directly on a model holding gradients, in a mixed train/eval state."""
    from trainwatch.capture import Capture
    from trainwatch.groups import activation_modules, bind, param_modules, plan_groups
    from trainwatch.probes.model_inputs import ModelInputs
    from trainwatch.record import Packer

    model = cnn()
    model.train()
    model[3].eval()
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    plan = plan_groups(param_modules(model), activation_modules(model), 300, 20, order=[n for n, _ in model.named_modules()])
    capture = Capture(bind(plan, model), torch.device("cpu"), distance_from_init=True)
    packer = Packer(0)
    rng = torch.get_rng_state()
    capture.probe_activations(
        model, ModelInputs.of(torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))), lambda t: t, packer
    )
    assert torch.equal(rng, torch.get_rng_state())
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True, True, True, True, True, True]
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
    record = packer.ship().resolve()
    assert "act_saturated_frac/6" in record.metrics  # the sigmoid group
    assert record.arrays["activations"].shape[0] == len(activation_modules(model))


def test_compiled_model_gets_no_extra_graphs_and_identical_training(store):
    """The probe forward runs the eager code (`set_stance("force_eager")`): no recompiles, no graph breaks."""
    from torch._dynamo.utils import counters

    from tests.models import blobs, mlp

    def run(callbacks: list) -> tuple[Classifier, dict]:
        torch._dynamo.reset()
        counters.clear()
        pl.seed_everything(0)
        model = Classifier(mlp())
        model.net = torch.compile(model.net, backend="eager")
        train, _ = loaders(blobs(n=64), batch_size=8)
        trainer(max_steps=8, callbacks=callbacks).fit(model, train)  # no validation: only the training graph
        return model, dict(counters["stats"])

    bare, bare_stats = run([])
    watched, watched_stats = run([TrainWatch(every_n_steps=1, tracking_uri=store, system_metrics=False)])
    assert watched_stats == bare_stats
    for a, b in zip(bare.state_dict().values(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b)


class Augmented(torch.utils.data.Dataset):
    """Random noise added to each image as it is read, from torch's global RNG (as torchvision's transforms draw)
    or from Python's (as many hand-written augmentations do)."""

    def __init__(self, python_random: bool = False) -> None:
        self.data, self.python_random = images(n=96), python_random

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = self.data[i]
        return x + 0.1 * (random.gauss(0.0, 1.0) if self.python_random else torch.randn_like(x)), y


def _loaders(kind: str) -> tuple[DataLoader, DataLoader | None]:
    data = images(n=96)
    if kind == "augmenting dataset, CAM probes by index":
        return DataLoader(Augmented(), batch_size=8, shuffle=True), None
    if kind == "augmenting with Python's random":  # a new run's name is drawn from it
        return DataLoader(Augmented(python_random=True), batch_size=8, shuffle=True), None
    if kind == "own generator":  # PyTorch's reproducibility recipe: the shuffle draws from the loader's generator
        return DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3)), None
    persistent = dict(num_workers=1, persistent_workers=True)
    train = DataLoader(data, batch_size=8, shuffle=True, **persistent)
    return train, DataLoader(data, batch_size=32, **persistent) if kind == "persistent workers, validation" else None


@pytest.mark.parametrize(
    "kind",
    [
        "own generator", "persistent workers", "persistent workers, validation", "augmenting dataset, CAM probes by index",
        "augmenting with Python's random",
    ],
)  # fmt: skip
def test_drawing_probes_from_the_loaders_leaves_their_order_and_seeds_alone(store, kind):
    """The activation probe, the CAM probes and the landscape's subset are read from the fit's own loaders (the
    validation loader, else the training loader). A loader's generator, or the one worker seed a persistent-worker
    loader draws when its iterator is first made, taken by those reads would change the training's batches or the
    RNG stream that dropout draws from; so would CAM probes read by index from a dataset that augments, and
    MLflow's random name for a new run, drawn from Python's `random`."""

    def run(callbacks: list) -> Classifier:
        pl.seed_everything(7)
        model = Classifier(cnn(), lr=0.05)
        trainer(max_steps=8, val_check_interval=4, callbacks=callbacks).fit(model, *_loaders(kind))
        return model

    bare = run([])
    watch = TrainWatch(
        every_n_steps=1, tracking_uri=store, system_metrics=False, report=False, cam_every_n_steps=3, landscape_samples=16, writer="thread",
        cam_probes=[0, 5, 9] if kind.endswith("by index") else None,
    )  # fmt: skip
    watched = run([watch])
    for name, tensor in bare.state_dict().items():
        assert torch.equal(tensor, watched.state_dict()[name]), name
