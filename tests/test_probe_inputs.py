"""The activation probe of models whose forward takes more than one tensor: keyword inputs from dict batches (named by
`example_input_array`, Lightning's convention), positional inputs given as a tuple, and resumes that keep them."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tests.models import Classifier, StepCounter, blobs, mlp, trainer
from trainwatch import TrainWatch


class Records(Dataset):
    """Dict samples, as tokenised text datasets give them: two inputs the forward takes by keyword, and a label."""

    def __init__(self, n: int = 128) -> None:
        data = blobs(n=n)
        self.x, self.y = data.tensors
        self.scale = 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "scale": self.scale[i], "label": self.y[i]}


class KeywordModel(Classifier):
    """`forward(x, scale)` on dict batches, called as `self(**inputs)`."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.net(x * scale[:, None])

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(x=batch["x"], scale=batch["scale"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(x=batch["x"], scale=batch["scale"]), batch["label"]))


class ProbeOutputs(pl.Callback):
    """After each logged step, the outputs of the net's layers on `probe` forwarded by hand (eval, no grad)."""

    def __init__(self, every: int, probe_args: tuple, probe_kwargs: dict) -> None:
        self.every, self.args, self.kwargs = every, probe_args, probe_kwargs
        self.outs: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        if step % self.every or step in self.outs:
            return
        outs: dict[str, torch.Tensor] = {}
        handles = [
            m.register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o.detach().clone())) for n, m in pl_module.net.named_children()
        ]
        pl_module.eval()
        with torch.no_grad():
            pl_module(*[a.clone() for a in self.args], **{k: v.clone() for k, v in self.kwargs.items()})
        pl_module.train()
        for h in handles:
            h.remove()
        self.outs[step] = outs


def _history(uri: str, key: str) -> dict[int, float]:
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("trainwatch").experiment_id])
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


def _assert_acts_match(uri: str, seen: ProbeOutputs, steps: list[int]) -> None:
    tanh_mean, relu_zero = _history(uri, "act_mean/net.1"), _history(uri, "act_zero_frac/net.4")
    assert sorted(seen.outs) == sorted(tanh_mean) == sorted(relu_zero) == steps
    for step, outs in seen.outs.items():
        assert tanh_mean[step] == pytest.approx(outs["1"].mean().item(), rel=1e-5, abs=1e-7)
        assert relu_zero[step] == pytest.approx((outs["4"] == 0).float().mean().item())


def test_dict_batches_without_example_input_array_fail_before_training_naming_both_fixes(store):
    counter = StepCounter()
    loader = DataLoader(Records(), batch_size=16)
    message = r"training data: the model inputs in its batches are unknown: the batches are dicts \(keys 'x', 'scale', 'label'\).*`example_input_array`.*`TrainWatch\(probe_batch=...\)`"
    with pytest.raises(MisconfigurationException, match=message):
        trainer(max_steps=2, callbacks=[TrainWatch(tracking_uri=store), counter]).fit(KeywordModel(mlp()), loader)
    assert counter.batches == 0
    experiment = MlflowClient(store).get_experiment_by_name("trainwatch")
    assert experiment is None or not MlflowClient(store).search_runs([experiment.experiment_id])  # no FAILED run left


def test_example_input_array_names_the_keyword_inputs_drawn_from_dict_batches(store):
    """The probe is the first 64 validation records' `x` and `scale` (not `label`), forwarded as keywords; the logged
    activations equal those of that forward done by hand after each logged step."""
    pl.seed_everything(0)
    data = Records()
    model = KeywordModel(mlp())
    model.example_input_array = {"x": torch.zeros(2, 8), "scale": torch.ones(2)}
    seen = ProbeOutputs(3, (), {"x": data.x[:64], "scale": data.scale[:64]})
    watch = TrainWatch(every_n_steps=3, activations_every_n_steps=3, tracking_uri=store, system_metrics=False)
    train, val = DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=40)  # two val batches joined
    trainer(max_steps=7, callbacks=[watch, seen]).fit(model, train, val)
    assert sorted(watch._probe_inputs.kwargs) == ["scale", "x"] and watch._probe_inputs.samples == 64
    _assert_acts_match(store, seen, [0, 3, 6])


def test_missing_example_input_array_key_is_named(store):
    model = KeywordModel(mlp())
    model.example_input_array = {"x": torch.zeros(2, 8), "weight": torch.ones(2)}
    with pytest.raises(
        MisconfigurationException, match=r"lack 'weight', which `example_input_array` names \(the batches hold 'x', 'scale', 'label'\)"
    ):
        trainer(max_steps=2, callbacks=[TrainWatch(tracking_uri=store)]).fit(model, DataLoader(Records(), batch_size=16))


class TwoInputModel(Classifier):
    """`forward(x, scale)` on tuple batches `(x, scale, y)`."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.net(x * scale[:, None])

    def training_step(self, batch, batch_idx):
        x, scale, y = batch
        return nn.functional.cross_entropy(self(x, scale), y)


def _tuples(n: int = 128) -> torch.utils.data.TensorDataset:
    data = Records(n)
    return torch.utils.data.TensorDataset(data.x, data.scale, data.y)


@pytest.mark.parametrize("given", ["example_input_array", "probe_batch"])
def test_positional_inputs_from_a_tuple(store, given):
    """Two positional inputs: counted by a tuple `example_input_array` (the batches' first two items), or given as a
    tuple `probe_batch`; the probe is forwarded in parts of the training batch size, and its numbers add up."""
    pl.seed_everything(0)
    data = _tuples()
    x, scale = data.tensors[0][:48], data.tensors[1][:48]
    model = TwoInputModel(mlp())
    kwargs = {}
    if given == "example_input_array":
        model.example_input_array = (torch.zeros(2, 8), torch.ones(2))
        kwargs["probe_samples"] = 48
    else:
        kwargs["probe_batch"] = (x, scale)
    seen = ProbeOutputs(2, (x, scale), {})
    watch = TrainWatch(every_n_steps=2, activations_every_n_steps=2, tracking_uri=store, system_metrics=False, **kwargs)
    trainer(max_steps=5, callbacks=[watch, seen]).fit(model, DataLoader(data, batch_size=16))  # no val: training data
    assert len(watch._probe_inputs.args) == 2 and watch._probe_inputs.samples == 48
    _assert_acts_match(store, seen, [0, 2, 4])


def test_a_probe_of_the_wrong_form_fails_in_setup_with_its_shapes(store):
    model = TwoInputModel(mlp())
    bad = TrainWatch(tracking_uri=store, probe_batch={"x": torch.zeros(4, 8), "scale": torch.ones(4), "label": torch.zeros(4)})
    with pytest.raises(
        MisconfigurationException,
        match=r"\(the `probe_batch` argument: x shape \(4, 8\) float32, scale shape \(4,\) float32, label shape \(4,\) float32\) fails in `TwoInputModel.forward`: TypeError",
    ):
        trainer(max_steps=2, callbacks=[bad]).fit(model, DataLoader(_tuples(), batch_size=16))


def test_a_resumed_fit_forwards_the_first_fits_keyword_probe(store, tmp_path):
    """The checkpoint holds the probe's inputs as plain containers (loadable with weights_only=True), and the resumed
    fit forwards the same keyword inputs, though its own data would give others."""
    pl.seed_everything(0)
    data = Records()
    model = KeywordModel(mlp())
    model.example_input_array = {"x": torch.zeros(2, 8), "scale": torch.ones(2)}
    first = TrainWatch(every_n_steps=2, tracking_uri=store, system_metrics=False)
    t = trainer(max_steps=2, callbacks=[first])
    t.fit(model, DataLoader(data, batch_size=16))
    ckpt = tmp_path / "first.ckpt"
    t.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    (saved,) = [v for k, v in state["callbacks"].items() if k.startswith("TrainWatch")]
    assert set(saved["probe_inputs"]["kwargs"]) == {"x", "scale"}
    torch.testing.assert_close(saved["probe_inputs"]["kwargs"]["x"], data.x[:64])

    again = TrainWatch(every_n_steps=2, tracking_uri=store, system_metrics=False)
    other = DataLoader(Records(), batch_size=16, shuffle=True)
    pl.seed_everything(5)
    trainer(max_steps=4, callbacks=[again]).fit(model, other, ckpt_path=ckpt)
    torch.testing.assert_close(again._probe_inputs.kwargs["scale"], data.scale[:64])


class InPlaceInput(Classifier):
    """A forward that changes its input in place, as `x.sub_(mean)` normalisation does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.mul_(0.5).add_(1.0))


def test_a_forward_that_changes_its_input_in_place_leaves_the_probe_as_it_was(store):
    """Every snapshot forwards the same probe, so its numbers stay comparable: the forward gets a copy (on the CPU
    moving to the device is no copy), and the user's `probe_batch` tensor is left alone too."""
    pl.seed_everything(0)
    data = blobs(n=128)
    probe = data.tensors[0][:40].clone()
    original = probe.clone()
    seen = ProbeOutputs(2, (original,), {})
    watch = TrainWatch(every_n_steps=2, activations_every_n_steps=2, tracking_uri=store, system_metrics=False, probe_batch=probe)
    trainer(max_steps=5, callbacks=[watch, seen]).fit(InPlaceInput(mlp()), DataLoader(data, batch_size=16))
    assert torch.equal(probe, original) and torch.equal(watch._probe_inputs.args[0], original)
    _assert_acts_match(store, seen, [0, 2, 4])
