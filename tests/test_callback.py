"""TrainWatch on real Lightning training into a real MLflow store: values, cadence, runs, bad configuration."""

from __future__ import annotations

import errno
import io
import json
import math
import mmap
import os
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.models import Classifier, blobs, loaders, mlp, trainer
from trainwatch import TrainWatch
from trainwatch.capture import Capture
from trainwatch.ops import Render
from trainwatch.probes import weight_copy
from trainwatch.probes.activations import STAT_COLUMNS
from trainwatch.publish import shown_modules

pytestmark = pytest.mark.slow


def _only_run(uri: str, experiment: str = "trainwatch"):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _history(client, run_id: str, key: str) -> dict[int, float]:
    hist = client.get_metric_history(run_id, key)
    steps = [m.step for m in hist]
    assert len(steps) == len(set(steps)), f"{key} logged twice at a step"
    return {m.step: m.value for m in hist}


def _npz(client, run_id: str, path: str) -> dict:
    local = client.download_artifacts(run_id, path)
    with open(local, "rb") as f:
        return dict(np.load(io.BytesIO(f.read())))


class Recorder(pl.Callback):
    """Independent measurements at the hooks TrainWatch uses, placed after it in the callback list."""

    def __init__(self, every: int, probe: torch.Tensor) -> None:
        self.every, self.probe = every, probe
        self.grad: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.update: dict[int, dict[str, float]] = {}
        self.acts: dict[int, dict[str, torch.Tensor]] = {}
        self.initial: dict[str, torch.Tensor] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module):
        self.initial = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        if step % self.every == 0:
            self.grad[step] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}
            self.before[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        if step not in self.before or step in self.update:
            return
        self.update[step] = {n: p.detach().clone() - self.before[step][n] for n, p in pl_module.named_parameters()}
        self.after[step] = {n: p.detach() - self.initial[n] for n, p in pl_module.named_parameters()}
        outs: dict[str, torch.Tensor] = {}
        handles = [
            m.register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o.detach().clone())) for n, m in pl_module.net.named_children()
        ]
        pl_module.eval()
        with torch.no_grad():
            pl_module(trainer.precision_plugin.convert_input(self.probe))
        pl_module.train()
        for h in handles:
            h.remove()
        self.acts[step] = outs


def _module_norm(tensors: dict[str, torch.Tensor], module: str) -> float:
    return torch.linalg.vector_norm(torch.cat([t.reshape(-1) for n, t in tensors.items() if n.startswith(f"net.{module}.")])).item()


class ProbeSizes(pl.Callback):
    """The batch sizes the model's first layer sees in eval mode once training runs: the probe's forwards."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:  # after TrainWatch's checks at the start, which forward the whole probe batch once
            first = pl_module.net[0]
            first.register_forward_pre_hook(lambda m, args: None if m.training else self.sizes.append(args[0].shape[0]))


def test_the_probe_batch_is_forwarded_in_parts_no_larger_than_a_training_batch(store):
    """A probe of 40 inputs beside training batches of 16: three balanced forwards (14, 13, 13) per snapshot, so the probe never
    holds activations for more samples than a training step, and the parts add up to the whole batch's numbers,
    dead units included (a unit that fires in any part is alive)."""
    pl.seed_everything(0)
    data = blobs()
    train = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    probe = data.tensors[0][:40].clone()
    probe[:, 0] = -1.0
    probe[36, 0] = 1.0  # in the last part (27..39)
    sizes, rec = ProbeSizes(), Recorder(2, probe)
    model = Classifier(mlp())
    with torch.no_grad():
        model.net[0].weight[0], model.net[0].bias[0] = 0.0, 0.0
        model.net[0].weight[0, 0] = 10.0  # tanh unit 0 is the sign of input 0: +1 for probe input 36 only
        model.net[3].bias[:5] = -50.0  # five ReLU units that never fire
        model.net[3].weight[5], model.net[3].bias[5] = 0.0, -0.5
        model.net[3].weight[5, 0] = 1.0  # ReLU unit 5 fires for probe input 36 only
    watch = TrainWatch(every_n_steps=2, activations_every_n_steps=2, tracking_uri=store, system_metrics=False, probe_batch=probe)
    trainer(max_steps=4, callbacks=[sizes, watch, rec]).fit(model, train)
    assert sizes.sizes[:3] == [14, 13, 13] and len(sizes.sizes) == 2 * 3 + 2 * 1  # two snapshots, and rec's whole batches
    client, run = _only_run(store)
    hist = _npz(client, run.info.run_id, "trainwatch/histograms/activations/part-00000.npz")
    assert hist["step"].tolist() == [0, 2]
    row = list(hist["names"]).index("net.4")
    col = {c: i for i, c in enumerate(STAT_COLUMNS)}
    for i, step in enumerate(hist["step"].tolist()):
        relu = rec.acts[step]["4"]
        dead = int((relu == 0).all(0).sum())
        assert 5 <= dead < 16 and (relu[:, 5] > 0).nonzero().flatten().tolist() == [36]
        values = hist["values"][i, row]
        assert (values[col["dead"]], values[col["positions"]], values[col["numel"]]) == (dead, 16, 40 * 16)
        assert values[col["zeros"]] == (relu == 0).sum().item()


# "64-true": float64 weights, gradients and probe inputs. Weight copies beside the CPU: this model's few kB in process
# memory, or in temporary files (a model larger than `IN_MEMORY_BYTES`; update and distance from init in one pass)
@pytest.mark.parametrize(("precision", "copies"), [("32-true", "memory"), ("32-true", "files"), ("64-true", "files")])
def test_logged_values_equal_independent_computation(store, precision, copies, monkeypatch):
    if copies == "files":
        monkeypatch.setattr(weight_copy, "IN_MEMORY_BYTES", 0)
    drawn: list[str] = []  # figures drawn in this, the training process: none, the writer process draws them
    draw = Render.__call__
    monkeypatch.setattr(Render, "__call__", lambda figure: drawn.append(figure.function) or draw(figure))
    pl.seed_everything(0)
    data = blobs()
    train, val = loaders(data)
    probe = data.tensors[0][:64]
    rec = Recorder(3, probe)
    model = Classifier(mlp())
    callbacks = [TrainWatch(every_n_steps=3, activations_every_n_steps=3, tracking_uri=store, system_metrics=False), rec]
    trainer(max_steps=10, precision=precision, callbacks=callbacks).fit(model, train, val)
    assert all(g.dtype == (torch.float64 if precision == "64-true" else torch.float32) for g in rec.grad[0].values())

    client, run = _only_run(store)
    rid = run.info.run_id
    assert sorted(rec.grad) == [0, 3, 6, 9]
    for module in ("net.0", "net.3", "net.5"):
        m = module.split(".")[1]
        norms = _history(client, rid, f"grad_norm/{module}")
        ratios = _history(client, rid, f"update_ratio/{module}")
        weights = _history(client, rid, f"weight_norm/{module}")
        maxes = _history(client, rid, f"grad_max/{module}")
        from_init = _history(client, rid, f"weight_dist_init/{module}")
        assert sorted(norms) == sorted(from_init) == [0, 3, 6, 9]
        for step in norms:
            assert norms[step] == pytest.approx(_module_norm(rec.grad[step], m), rel=1e-5)
            expect_max = max(t.abs().max().item() for n, t in rec.grad[step].items() if n.startswith(f"net.{m}."))
            assert maxes[step] == pytest.approx(expect_max, rel=1e-6)
            w = _module_norm(rec.before[step], m)
            assert weights[step] == pytest.approx(w, rel=1e-5)
            assert ratios[step] == pytest.approx(_module_norm(rec.update[step], m) / w, rel=1e-4)
            assert from_init[step] == pytest.approx(_module_norm(rec.after[step], m), rel=1e-5)  # after the step
    total = _history(client, rid, "train/grad_norm_total")
    for step, grads in rec.grad.items():
        expect = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads.values()])).item()
        assert total[step] == pytest.approx(expect, rel=1e-5)

    # activations of the fixed probe batch (the first 64 validation inputs), eval mode
    tanh_mean, relu_zero, tanh_sat = (
        _history(client, rid, k) for k in ("act_mean/net.1", "act_zero_frac/net.4", "act_saturated_frac/net.1")
    )
    for step, outs in rec.acts.items():
        assert tanh_mean[step] == pytest.approx(outs["1"].mean().item(), rel=1e-5, abs=1e-7)
        assert relu_zero[step] == pytest.approx((outs["4"] == 0).float().mean().item())
        assert tanh_sat[step] == pytest.approx((outs["1"].abs() > 0.99).float().mean().item())
    assert "act_saturated_frac/net.4" not in run.data.metrics  # only tanh/sigmoid groups have one

    hist = _npz(client, rid, "trainwatch/histograms/activations/part-00000.npz")
    assert hist["step"].tolist() == [0, 3, 6, 9]
    counts = hist["values"][:, :, len(STAT_COLUMNS) :]
    np.testing.assert_array_equal(counts.sum(-1), hist["values"][:, :, 0])
    assert hist["values"][0, list(hist["names"]).index("net.1"), 0] == 64 * 16

    table = _npz(client, rid, "trainwatch/stats/params/part-00000.npz")
    names, cols = list(table["names"]), list(table["columns"])
    for i, step in enumerate(table["step"].tolist()):
        for name in ("net.0.weight", "net.5.bias"):
            expect = torch.linalg.vector_norm(rec.grad[step][name]).item()
            assert table["values"][i, names.index(name), cols.index("grad_norm")] == pytest.approx(expect, rel=1e-5)
    groups = client.download_artifacts(rid, "trainwatch/groups.json")
    assert '"key": "net.0"' in open(groups).read()
    # the histogram evolution image, through log_image(key=..., step=...): drawn at the first snapshot and at the end
    images = [f.path for f in client.list_artifacts(rid, "images") if "activation_histograms" in f.path and f.path.endswith(".png")]
    assert {int(p.split("+step+")[1].split("+")[0]) for p in images} == {0, 9}, images
    assert Path(client.download_artifacts(rid, images[0])).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn == []
    assert run.data.tags["trainwatch.version"]
    assert "train_loss" in run.data.metrics and "train/lr/opt0_group0" in run.data.metrics
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("failure", ["unwritable", "unmappable"])
def test_an_unwritable_temporary_directory_costs_the_distance_from_init_not_the_run(store, tmp_path, monkeypatch, caplog, failure):
    """The weight copies go to temporary files, read back mapped into memory: if they cannot be written (a
    missing or read-only TMPDIR) or mapped (a file system without mmap, ENODEV), training goes on, the update ratio
    is measured from a copy in memory, and two warnings, at setup and at the first logged step, say what is
    missing and how to fix it."""
    monkeypatch.setattr(weight_copy, "IN_MEMORY_BYTES", 0)  # this model's copies are small enough for process memory
    if failure == "unwritable":
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
    else:

        def refuse(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))  # what mmap(2) says on such a file system

        monkeypatch.setattr(mmap, "mmap", refuse)
    pl.seed_everything(0)
    train, val = loaders(blobs())
    rec = Recorder(1, blobs().tensors[0][:8])
    watch = TrainWatch(every_n_steps=1, tracking_uri=store, system_metrics=False, landscape_samples=0)
    trainer(max_steps=4, callbacks=[watch, rec]).fit(Classifier(mlp()), train, val)
    client, run = _only_run(store)
    ratios = _history(client, run.info.run_id, "update_ratio/net.0")
    assert sorted(ratios) == [0, 1, 2, 3]
    for step, ratio in ratios.items():
        assert ratio == pytest.approx(_module_norm(rec.update[step], "0") / _module_norm(rec.before[step], "0"), rel=1e-4)
    assert "weight_dist_init/net.0" not in run.data.metrics
    said = [r.getMessage() for r in caplog.records if "could not be kept in a temporary file" in r.getMessage()]
    assert len(said) == 2 and all("TMPDIR" in m for m in said)
    assert all(("cannot be mapped" in m) == (failure == "unmappable") for m in said)
    assert "weight_dist_init is not logged" in said[0] and "copied in memory from now on" in said[1]
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize(
    ("every", "act_every", "log_every", "expected", "expected_act"),
    [
        (4, None, 2, [0, 4, 8, 12, 16], [0, 4, 8, 12, 16]),
        (None, None, 5, [0, 5, 10, 15], [0, 5, 10, 15]),
        (1, 1, 50, list(range(17)), list(range(17))),
        # Activation snapshots (a forward each) default to no more often than the trainer's logging: the first
        # multiple of every_n_steps at or above log_every_n_steps.
        (1, None, 5, list(range(17)), [0, 5, 10, 15]),
        (3, None, 5, [0, 3, 6, 9, 12, 15], [0, 6, 12]),
        (2, 3, 50, [0, 2, 4, 6, 8, 10, 12, 14, 16], [0, 3, 6, 9, 12, 15]),
    ],
)
@pytest.mark.parametrize("activations", ["live", "probe"])
def test_logged_steps_are_exactly_the_cadence(store, every, act_every, log_every, expected, expected_act, activations):
    pl.seed_everything(0)
    train, val = loaders(blobs(n=64), batch_size=8)
    watch = TrainWatch(
        every_n_steps=every, activations_every_n_steps=act_every, tracking_uri=store, system_metrics=False,
        activations=activations, landscape_samples=0, report=False,
    )  # fmt: skip
    trainer(max_steps=17, log_every_n_steps=log_every, callbacks=[watch]).fit(Classifier(mlp()), train, val)
    client, run = _only_run(store)
    assert sorted(_history(client, run.info.run_id, "grad_norm/net.0")) == expected
    assert sorted(_history(client, run.info.run_id, "act_mean/net.1")) == expected_act
    assert run.data.params["trainwatch.activations_every_n_steps"] == str(expected_act[1] - expected_act[0])


def test_trainer_without_logging_cadence_needs_every_n_steps(store):
    StepCounter.steps = 0
    train, val = loaders(blobs(n=32), batch_size=16)
    with pytest.raises(MisconfigurationException, match=r"log_every_n_steps`, which is 0.*TrainWatch\(every_n_steps=N\)"):
        trainer(max_steps=2, log_every_n_steps=0, callbacks=[TrainWatch(tracking_uri=store), StepCounter()]).fit(
            Classifier(mlp()), train, val
        )
    assert StepCounter.steps == 0
    pl.seed_everything(0)  # with its own cadence it runs: steps 0 and 1 logged
    trainer(max_steps=2, log_every_n_steps=0, callbacks=[TrainWatch(every_n_steps=1, tracking_uri=store)]).fit(
        Classifier(mlp()), train, val
    )
    client, run = _only_run(store)
    assert sorted(_history(client, run.info.run_id, "grad_norm/net.0")) == [0, 1]
    assert sorted(_history(client, run.info.run_id, "act_mean/net.1")) == [0, 1]  # nor a floor for the activations'


def test_gradient_accumulation_logs_optimizer_steps(store):
    pl.seed_everything(0)
    train, val = loaders(blobs(n=128), batch_size=8)
    rec = Recorder(2, torch.zeros(1, 8))
    watch = TrainWatch(every_n_steps=2, tracking_uri=store, system_metrics=False, activations="off")
    trainer(max_steps=6, accumulate_grad_batches=3, callbacks=[watch, rec]).fit(Classifier(mlp()), train, val)
    client, run = _only_run(store)
    norms = _history(client, run.info.run_id, "grad_norm/net.0")
    assert sorted(norms) == [0, 2, 4]
    for step, value in norms.items():  # accumulated over 3 micro-batches, as the optimizer sees it
        assert value == pytest.approx(_module_norm(rec.grad[step], "0"), rel=1e-5)


def test_mlflow_logger_run_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/logger.db"
    logger = MLFlowLogger(experiment_name="mine", tracking_uri=uri)
    train, val = loaders(blobs(n=64), batch_size=16)
    trainer(max_steps=4, logger=logger, callbacks=[TrainWatch(every_n_steps=1, system_metrics=False)]).fit(Classifier(mlp()), train, val)
    assert mlflow.active_run() is None
    client, run = _only_run(uri, "mine")
    assert run.info.run_id == logger.run_id
    assert sorted(_history(client, run.info.run_id, "grad_norm/net.0")) == [0, 1, 2, 3]
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the default store


def test_own_run_uses_argument_then_env_uri_then_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train, val = loaders(blobs(n=32), batch_size=16)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    watch = TrainWatch(every_n_steps=1, system_metrics=False, tracking_uri=f"sqlite:///{tmp_path}/arg.db")
    trainer(max_steps=2, callbacks=[watch]).fit(Classifier(mlp()), train, val)
    _only_run(f"sqlite:///{tmp_path}/arg.db")
    assert not (tmp_path / "env.db").exists()  # the argument wins over the environment
    trainer(max_steps=2, callbacks=[TrainWatch(every_n_steps=1, system_metrics=False)]).fit(Classifier(mlp()), train, val)
    _only_run(f"sqlite:///{tmp_path}/env.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    trainer(max_steps=2, callbacks=[TrainWatch(every_n_steps=1, system_metrics=False, run_name="r")]).fit(Classifier(mlp()), train, val)
    assert (tmp_path / "mlflow.db").is_file()  # the default store is the working directory's mlflow.db
    _, run = _only_run(f"sqlite:///{tmp_path}/mlflow.db")  # absolute: MLflow caches stores per URI string
    assert run.info.run_name == "r" and "grad_norm/net.0" in run.data.metrics


class StepCounter(pl.Callback):
    steps = 0

    def on_train_batch_start(self, *args):
        StepCounter.steps += 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"modules": ["net.9"]}, r"names module 'net.9'.*Closest names"),
        ({"probe_batch": torch.zeros(4, 5)}, r"probe batch.*shape \(4, 5\).*fails in `Classifier.forward`"),
    ],
)
def test_bad_configuration_fails_in_setup_before_any_step(store, kwargs, match):
    StepCounter.steps = 0
    train, val = loaders(blobs(n=32), batch_size=16)
    with pytest.raises(MisconfigurationException, match=match):
        trainer(max_steps=2, callbacks=[TrainWatch(tracking_uri=store, **kwargs), StepCounter()]).fit(Classifier(mlp()), train, val)
    assert StepCounter.steps == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": -1}, r"every_n_steps=-1\)` must be a positive integer"),
        ({"every_n_steps": 0}, r"every_n_steps=0\)`"),
        ({"activations": "all"}, r"activations='all'\)` must be one of"),
        ({"max_metric_keys": 10}, r"max_metric_keys=10\)` must be an integer >= "),
        ({"probe_batch": [1, 2]}, r"probe_batch=...\)` must hold one batch.*found no tensor"),
        ({"probe_batch": (torch.zeros(4, 8), torch.zeros(3))}, r"found shape \(4, 8\) float32, shape \(3,\) float32"),
        ({"probe_batch": "x"}, r"probe_batch=...\)` must be a tensor .*, a tuple or list .* or a dict .*got str"),
        ({"writer": "async"}, r"writer='async'\)` must be 'process'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainWatch(**kwargs)


def test_state_dict_keeps_the_probe_set_for_a_resumed_run(store, tmp_path):
    train, val = loaders(blobs(n=64), batch_size=16)
    watch = TrainWatch(every_n_steps=1, tracking_uri=store, system_metrics=False)
    t = trainer(max_steps=2, callbacks=[watch], enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(Classifier(mlp()), train, val)
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)
    resumed = TrainWatch(every_n_steps=1, tracking_uri=store, system_metrics=False)
    trainer(max_steps=4, callbacks=[resumed]).fit(Classifier(mlp()), train, val, ckpt_path=ckpt)
    assert torch.equal(resumed.state_dict()["probe_inputs"]["args"][0], watch.state_dict()["probe_inputs"]["args"][0])


class Troubled(Classifier):
    """NaN gradients at step 2, then a crash at step 6; slow enough for system metrics to be sampled (every 0.2 s)."""

    def training_step(self, batch, batch_idx):
        time.sleep(0.2)
        if self.global_step == 6:
            raise RuntimeError("node lost")
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 2 else loss


def test_a_fit_resumed_from_a_checkpoint_goes_on_in_its_own_run(store, tmp_path, caplog):
    """The usual resume: a fit dies at step 6 (its run ends FAILED), a new TrainWatch resumes from the step-4
    checkpoint: the same run goes on, ends FINISHED and holds both fits' records and findings; a changed setting
    keeps the first fit's param (MLflow does not change params), with a warning, and nothing is refused or spooled."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    train, val = loaders(blobs(n=128), batch_size=16)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    system = dict(system_metrics=True, system_metrics_interval_s=0.2)
    first = TrainWatch(
        every_n_steps=2, activations_every_n_steps=2, tracking_uri=store, landscape_samples=0, on_nonfinite="skip_step", **system
    )
    with pytest.raises(RuntimeError, match="node lost"):
        trainer(max_steps=8, callbacks=[first, saver], enable_checkpointing=True).fit(Troubled(mlp()), train, val)
    client = MlflowClient(store)
    assert client.get_run(first.run_id).info.status == "FAILED"
    (ckpt,) = [p for p in (tmp_path / "ckpt").iterdir() if "step=4" in p.name]

    system_steps = sorted(m.step for m in client.get_metric_history(first.run_id, "system/cpu_utilization_percentage"))
    again = TrainWatch(every_n_steps=1, activations_every_n_steps=1, tracking_uri=store, landscape_samples=0, **system)
    trainer(max_steps=8, callbacks=[again]).fit(Classifier(mlp()), train, val, ckpt_path=ckpt)
    client, run = _only_run(store)
    assert run.info.run_id == first.run_id == again.run_id
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "grad_norm/net.0"))
    assert steps == [0, 2, 4, 4, 5, 6, 7]  # the first fit's 0, 2, 4, then the resumed fit's 4..7
    parts = sorted(f.path.rsplit("/", 1)[1] for f in client.list_artifacts(run.info.run_id, "trainwatch/stats/params"))
    assert parts == ["part-00000.npz", "part-00001.npz"]
    assert run.data.params["trainwatch.every_n_steps"] == "2"
    said = [r.getMessage() for r in caplog.records if r.name.startswith("trainwatch")]
    assert any("keeps the param trainwatch.every_n_steps=2" in m and "this fit uses 1" in m for m in said), said
    assert not any("refused" in m or "spool" in m for m in said), said
    assert run.data.tags["trainwatch.weight_dist_init_from_step"] == "4"
    assert not (tmp_path / ".trainwatch" / "spool" / run.info.run_id).exists()  # everything delivered
    both = [m.step for m in client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")]
    assert system_steps and len(both) > len(system_steps) and len(set(both)) == len(both)  # the resumed fit's go on
    diagnosis = json.loads(Path(client.download_artifacts(run.info.run_id, "trainwatch/diagnosis.json", str(tmp_path))).read_text())
    assert diagnosis["final"] and diagnosis["health"] == "critical"
    (nan,) = [f for f in diagnosis["findings"] if f["kind"] == "nonfinite_gradients"]
    assert nan["first_step"] == 2  # found by the first fit, kept by the resumed one
    assert run.data.tags["trainwatch.health"] == "critical"
    # the exploding rule's baseline: the first fit's finite norms before step 4, topped up by the resumed fit's
    totals = sorted(client.get_metric_history(run.info.run_id, "train/grad_norm_total"), key=lambda m: (m.timestamp, m.step))
    assert [m.step for m in totals[-4:]] == [4, 5, 6, 7]
    earlier = [m.value for m in totals if m.step < 4 and math.isfinite(m.value)]
    expected = (earlier + [m.value for m in totals[-4:]])[:5]
    assert earlier and diagnosis["exploding_baseline"] == {"grad_norm_total_median": pytest.approx(np.median(expected)), "records": 5}
    # the images go on from the first fit's snapshots: its histograms before step 4, then the resumed fit's
    act_parts = sorted(f.path for f in client.list_artifacts(run.info.run_id, "trainwatch/histograms/activations"))
    acts = [np.load(io.BytesIO(Path(client.download_artifacts(run.info.run_id, act_parts[0], str(tmp_path))).read_bytes()))]
    first_steps = [int(s) for s in acts[0]["step"] if s < 4]
    history = again._publisher._histograms.steps
    assert first_steps and history == [*first_steps, 4, 5, 6, 7]
    shown = shown_modules(len(acts[0]["names"]))
    np.testing.assert_array_equal(
        again._publisher._histograms.counts[0], acts[0]["values"][0][shown, len(STAT_COLUMNS) :].astype(np.float32)
    )


@pytest.mark.parametrize("case", ["deleted", "another store", "another run name"])
def test_a_resumed_fit_whose_run_is_gone_logs_to_a_new_run_and_says_why(store, tmp_path, caplog, case):
    train, val = loaders(blobs(n=64), batch_size=16)
    kwargs = dict(every_n_steps=1, system_metrics=False, landscape_samples=0, report=False)
    first = TrainWatch(tracking_uri=store, **kwargs)
    t = trainer(max_steps=2, callbacks=[first])
    t.fit(Classifier(mlp()), train, val)
    t.save_checkpoint(tmp_path / "last.ckpt")
    uri, name = store, None
    if case == "deleted":
        MlflowClient(store).delete_run(first.run_id)
    elif case == "another store":
        uri = f"sqlite:///{tmp_path}/other.db"
    else:  # how to start a new run from a checkpoint (fine-tuning, a sweep)
        name = "fine-tune"
    again = TrainWatch(tracking_uri=uri, run_name=name, **kwargs)
    trainer(max_steps=3, callbacks=[again]).fit(Classifier(mlp()), train, val, ckpt_path=tmp_path / "last.ckpt")
    assert again.run_id != first.run_id
    client = MlflowClient(uri)
    assert client.get_run(again.run_id).info.status == "FINISHED"
    assert sorted(_history(client, again.run_id, "grad_norm/net.0")) == [2]
    (said,) = [r.getMessage() for r in caplog.records if "is not continued" in r.getMessage()]
    assert first.run_id in said and again.run_id in said
    assert {"deleted": "it is deleted at", "another store": "other.db", "another run name": "this TrainWatch names its run 'fine-tune'"}[
        case
    ] in said


def test_a_run_id_loaded_but_not_used_yet_stays_in_the_state_and_no_password_is_kept():
    """A checkpoint saved between the restore and the start of training (a learning-rate finder) keeps the run to go
    on in; the stored tracking URI leaves the password out."""
    from trainwatch.sink import without_password

    watch = TrainWatch()
    run = {"tracking_uri": "http://mlflow:5000", "run_id": "abc"}
    watch.load_state_dict({"probe_inputs": None, "run": run})
    assert watch.state_dict()["run"] == run
    watch.load_state_dict({"probe_inputs": None, "run": "garbage"})  # a malformed entry is not a run
    assert "run" not in watch.state_dict()
    assert without_password("postgresql://me:s3cret@db:5432/mlflow") == "postgresql://me@db:5432/mlflow"
    assert without_password("https://:token@host/mlflow") == "https://host/mlflow"
    assert without_password("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_lightning_cli_yaml_configures_trainwatch(store, tmp_path):
    from pytorch_lightning.cli import LightningCLI

    from trainwatch.demo import DigitsCNN, DigitsData

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  max_steps: 4
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  accelerator: cpu
  callbacks:
    - class_path: trainwatch.TrainWatch
      init_args:
        every_n_steps: 2
        tracking_uri: {store}
        system_metrics: false
        modules: [features]
"""
    )
    LightningCLI(DigitsCNN, DigitsData, args=["fit", "--config", str(config)], save_config_callback=None)
    client, run = _only_run(store)
    assert sorted(_history(client, run.info.run_id, "grad_norm/features.0")) == [0, 2]
    assert "grad_norm/classifier" not in run.data.metrics  # `modules` restricted what is watched


def test_no_trainable_parameter_in_modules_is_an_error(store):
    model = Classifier(mlp())
    for p in model.net[0].parameters():
        p.requires_grad_(False)
    train, val = loaders(blobs(n=32), batch_size=16)
    with pytest.raises(MisconfigurationException, match="nothing to watch"):
        trainer(max_steps=1, callbacks=[TrainWatch(tracking_uri=store, modules=["net.0"], activations="off")]).fit(model, train, val)


def test_lazy_modules_must_be_initialised_before_fit(store):
    """A probe forward before training would initialise a lazy module's parameters outside the training's random
    stream (training would not be that of a bare fit): refused in setup, naming the module and the fix; once
    initialised by a forward of an example batch, the same model trains watched."""
    train, val = loaders(blobs(n=32), batch_size=16)
    model = Classifier(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.LazyLinear(3)))
    with pytest.raises(MisconfigurationException, match=r"net\.2 has uninitialised \(lazy\) parameters.*calling the model once"):
        trainer(max_steps=1, callbacks=[TrainWatch(tracking_uri=store)]).fit(model, train, val)
    model(torch.zeros(1, 8))
    trainer(max_steps=2, callbacks=[TrainWatch(every_n_steps=1, tracking_uri=store, system_metrics=False)]).fit(model, train, val)
    client, run = _only_run(store)
    assert sorted(_history(client, run.info.run_id, "grad_norm/net.2")) == [0, 1]


def test_complex_parameters_are_measured(store):
    """A complex weight: its gradient's norm, max modulus and the update are those of the complex values."""

    class Rotate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 3, dtype=torch.cfloat))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.to(torch.cfloat) @ self.w).abs()

    pl.seed_everything(0)
    train, val = loaders(blobs())
    rec = Recorder(1, blobs().tensors[0][:8])
    watch = TrainWatch(every_n_steps=1, tracking_uri=store, system_metrics=False, activations="off", landscape_samples=0)
    trainer(max_steps=3, callbacks=[watch, rec]).fit(Classifier(Rotate()), train, val)
    client, run = _only_run(store)
    rid = run.info.run_id
    norms, maxes, ratios = (_history(client, rid, f"{family}/net") for family in ("grad_norm", "grad_max", "update_ratio"))
    for step in (0, 1, 2):
        grad, before = rec.grad[step]["net.w"], rec.before[step]["net.w"]
        assert norms[step] == pytest.approx(torch.linalg.vector_norm(grad).item(), rel=1e-5)
        assert maxes[step] == pytest.approx(grad.abs().max().item(), rel=1e-6)
        assert ratios[step] == pytest.approx(
            (torch.linalg.vector_norm(rec.update[step]["net.w"]) / torch.linalg.vector_norm(before)).item(), rel=1e-4
        )
    assert run.info.status == "FINISHED"


def test_exception_in_training_keeps_everything_logged_and_fails_the_run(store):
    class Exploding(Classifier):
        def training_step(self, batch, batch_idx):
            if self.global_step == 5:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    train, val = loaders(blobs(n=256), batch_size=8)
    with pytest.raises(RuntimeError, match="boom"):
        watch = TrainWatch(every_n_steps=1, activations_every_n_steps=1, tracking_uri=store, system_metrics=False)
        trainer(max_steps=10, callbacks=[watch]).fit(Exploding(mlp()), train, val)
    client, run = _only_run(store)
    assert sorted(_history(client, run.info.run_id, "grad_norm/net.0")) == [0, 1, 2, 3, 4]
    assert run.info.status == "FAILED"
    hist = _npz(client, run.info.run_id, "trainwatch/histograms/activations/part-00000.npz")
    assert hist["step"].tolist() == [0, 1, 2, 3, 4]  # the open part was flushed on the exception
    # the landscape job says why this run has no checkpoint, rather than "attach TrainWatch"
    from trainwatch.cli import main as cli
    from trainwatch.landscape.job import LandscapeSpec, run_landscape

    with pytest.raises(FileNotFoundError, match="it ended FAILED, before the end of `fit`"):
        run_landscape(LandscapeSpec(run_id=run.info.run_id, tracking_uri=store, steps=3), progress=None)
    assert cli(["landscape", run.info.run_id, "--tracking-uri", store, "--steps", "3"]) == 1


def test_large_model_stays_under_the_key_budget(store):
    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU()) for _ in range(60)])
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            for block in self.blocks:
                x = x + block(x)
            return self.head(x)

    train, val = loaders(blobs(n=32), batch_size=16)
    trainer(max_steps=2, callbacks=[TrainWatch(every_n_steps=1, tracking_uri=store, system_metrics=False)]).fit(
        Classifier(Deep()), train, val
    )
    client, run = _only_run(store)
    keys = set(run.data.metrics)
    assert len(keys) <= 300
    # 60 blocks do not fit one group each (60 × 11 keys): ranges of 3 consecutive blocks do
    assert {"grad_norm/net.blocks.0..2", "grad_norm/net.head", "act_zero_frac/net.blocks.57..59"} <= keys
    groups = client.download_artifacts(run.info.run_id, "trainwatch/groups.json")
    import json

    plan = json.loads(Path(groups).read_text())
    assert plan["grouping"] == "prefix_depth_3"
    block0 = next(g for g in plan["groups"] if g["key"] == "net.blocks.0..2")
    assert block0["param_modules"] == [f"net.blocks.{i}.{j}" for i in range(3) for j in range(2)]
    # full per-parameter detail still goes to the table
    table = _npz(client, run.info.run_id, "trainwatch/stats/params/part-00000.npz")
    assert len(table["names"]) == 60 * 4 + 2


def test_demo_trains_and_logs(tmp_path, monkeypatch, capsys):
    from trainwatch.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--epochs", "1", "--landscape-steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in out
    _, run = _only_run(f"sqlite:///{tmp_path}/mlflow.db", "trainwatch-demo")
    assert {"grad_norm/features.0", "update_ratio/classifier", "act_zero_frac/features.2", "val_acc"} <= set(run.data.metrics)
    assert "landscape/random/centre_loss" in run.data.metrics


def test_system_metrics_land_in_the_same_run(store):
    import time

    class Slow(Classifier):
        def training_step(self, batch, batch_idx):
            time.sleep(0.4)
            return super().training_step(batch, batch_idx)

    train, val = loaders(blobs(n=64), batch_size=8)
    watch = TrainWatch(every_n_steps=2, tracking_uri=store, system_metrics_interval_s=0.5)
    trainer(max_steps=8, callbacks=[watch]).fit(Slow(mlp()), train, val)
    _, run = _only_run(store)
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    assert "train/step_ms" in run.data.metrics and run.data.metrics["train/step_ms"] >= 400


class ScheduledClassifier(Classifier):
    """Adam with a per-step LambdaLR; `used_lr[step]` is the rate the optimizer steps with."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net, lr=0.1)
        self.used_lr: dict[int, float] = {}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        self.used_lr[self.trainer.global_step] = optimizer.param_groups[0]["lr"]
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class PreClipNorm(pl.Callback):
    """The total gradient norm where TrainWatch reads it, and after Lightning's clipping."""

    def __init__(self) -> None:
        self.before: dict[int, float] = {}
        self.clipped: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.reshape(-1) for p in pl_module.parameters()]
        self.before[trainer.global_step] = torch.linalg.vector_norm(torch.cat(grads)).item()

    def on_before_zero_grad(self, trainer, pl_module, optimizer):  # before the next batch's backward
        if all(p.grad is not None for p in pl_module.parameters()):
            grads = [p.grad.reshape(-1) for p in pl_module.parameters()]
            self.clipped[trainer.global_step - 1] = torch.linalg.vector_norm(torch.cat(grads)).item()


def test_learning_rate_is_the_one_each_step_used_and_gradients_are_read_before_clipping(store):
    pl.seed_everything(0)
    train, val = loaders(blobs(n=128), batch_size=16)
    model, clip = ScheduledClassifier(mlp()), PreClipNorm()
    watch = TrainWatch(every_n_steps=1, tracking_uri=store, system_metrics=False, activations="off")
    trainer(max_steps=6, gradient_clip_val=0.05, callbacks=[watch, clip]).fit(model, train, val)
    client, run = _only_run(store)
    lr = _history(client, run.info.run_id, "train/lr/opt0_group0")
    assert lr == pytest.approx(model.used_lr) and lr[2] == pytest.approx(0.1 / 3)  # LambdaLR: 0.1/(1+step)
    total = _history(client, run.info.run_id, "train/grad_norm_total")
    assert total == pytest.approx(clip.before, rel=1e-5)
    assert len(clip.clipped) == 5 and all(total[s] > 0.05 for s in clip.clipped)  # so clipping changed these gradients
    assert clip.clipped == pytest.approx(dict.fromkeys(clip.clipped, 0.05), rel=1e-3)  # ...after TrainWatch read them


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with one optimizer per sub-network, as in a GAN: each batch steps `a`, then `b`.
    Records, per global step, the gradients each step used and the weights before and after it."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.moved: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[int, dict[str, torch.Tensor]] = {}

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        for optimizer, part in zip(self.optimizers(), ("a", "b"), strict=True):
            loss = nn.functional.cross_entropy(self(x), y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            step = self.trainer.global_step
            before = {n: p.detach().clone() for n, p in self.named_parameters()}
            self.grads[step] = {n: p.grad.clone() for n, p in self.named_parameters() if n.startswith(part)}
            optimizer.step()
            self.moved[step] = {n: p.detach() - before[n] for n, p in self.named_parameters()}
            self.before[step] = before
            assert self.trainer.global_step == step + 1

    def configure_optimizers(self):
        return torch.optim.Adam(self.a.parameters(), lr=0.01), torch.optim.SGD(self.b.parameters(), lr=0.1)


@pytest.mark.parametrize(("every", "logged"), [(1, list(range(8))), (4, [0, 1, 4, 5])])
@pytest.mark.parametrize("activations", ["probe", "live"])
def test_two_optimizers_give_one_record_per_optimizer_step(store, every, logged, activations):
    """Each batch is two global steps (a's, then b's); a logged batch logs both, whatever the cadence's parity."""
    pl.seed_everything(0)
    train, _ = loaders(blobs(n=64), batch_size=16)
    model = TwoOptimizers()
    probe = torch.zeros(4, 8) if activations == "probe" else None
    watch = TrainWatch(
        every_n_steps=every, activations_every_n_steps=every, activations=activations, tracking_uri=store, system_metrics=False,
        probe_batch=probe,
    )  # fmt: skip
    trainer(max_steps=8, callbacks=[watch]).fit(model, train)
    client, run = _only_run(store)
    rid = run.info.run_id
    # live hooks see the batch's forwards once, with its first optimizer step; the probe runs at every record
    act_steps = logged if activations == "probe" else logged[::2]
    assert sorted(_history(client, rid, "act_mean/a")) == act_steps
    if activations == "live":  # the batch's forward up to its first backward: 16 samples of 8 units, nothing else
        hist = _npz(client, rid, "trainwatch/histograms/activations/part-00000.npz")
        assert hist["values"][:, list(hist["names"]).index("a"), 0].tolist() == [16 * 8] * len(act_steps)
    # throughput once per logged batch, with its last record: 16 samples per batch, two optimizer steps per batch
    rate, step_ms = _history(client, rid, "train/samples_per_s"), _history(client, rid, "train/step_ms")
    assert sorted(rate) == sorted(step_ms) == logged[1::2]
    assert [rate[s] * step_ms[s] / 1000 for s in sorted(rate)] == pytest.approx([8.0] * len(rate))
    for part in ("a", "b"):
        norms, ratios = _history(client, rid, f"grad_norm/{part}"), _history(client, rid, f"update_ratio/{part}")
        assert sorted(norms) == sorted(ratios) == logged
        for step in logged:
            moved = torch.cat([t.reshape(-1) for n, t in model.moved[step].items() if n.startswith(part)])
            weights = torch.cat([t.reshape(-1) for n, t in model.before[step].items() if n.startswith(part)])
            stepped = (step % 2 == 0) == (part == "a")  # even global steps are a's optimizer, odd ones b's
            assert (ratios[step] > 0) == stepped  # the other optimizer's step leaves this part where it was
            assert (moved.abs().max().item() > 0) == stepped
            if stepped:
                expect = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in model.grads[step].values()])).item()
                assert norms[step] == pytest.approx(expect, rel=1e-5)
                expect = torch.linalg.vector_norm(moved).item() / torch.linalg.vector_norm(weights).item()
                assert ratios[step] == pytest.approx(expect, rel=1e-4)


class SometimesSkips(Classifier):
    """Computes the loss but returns None (no backward, no optimizer update) on odd batches, as a loop that drops
    a batch with a bad loss does."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx % 2 else loss


def test_live_hooks_come_off_after_a_batch_that_skipped_its_step(store):
    pl.seed_everything(0)
    train, val = loaders(blobs(n=128), batch_size=16)
    model = SometimesSkips(mlp())
    watch = TrainWatch(every_n_steps=1, tracking_uri=store, system_metrics=False, activations="live")
    trainer(max_steps=3, callbacks=[watch], limit_val_batches=1, val_check_interval=2).fit(model, train, val)
    assert not any(m._forward_hooks for m in model.modules())
    client, run = _only_run(store)
    hist = _npz(client, run.info.run_id, "trainwatch/histograms/activations/part-00000.npz")
    net0 = list(hist["names"]).index("net.0")
    # each logged step saw its one training forward of 16 samples, never a validation batch (64 samples)
    assert hist["values"][:, net0, 0].tolist() == [16 * 16] * len(hist["step"])


class SequenceClassifier(pl.LightningModule):
    """Token sequences of varying length, padded per batch (the usual text collate): mean of embeddings, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(50, 8, padding_idx=0), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.emb(x).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _padded_loader(n: int, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    items = [(torch.randint(1, 50, (int(torch.randint(3, 12, (), generator=g)),), generator=g), i % 2) for i in range(n)]

    def collate(batch):
        return nn.utils.rnn.pad_sequence([x for x, _ in batch], batch_first=True), torch.tensor([y for _, y in batch])

    return torch.utils.data.DataLoader(items, batch_size=batch_size, collate_fn=collate)


def test_probe_from_batches_padded_to_their_own_length_keeps_the_first_shape(store):
    pl.seed_everything(0)
    train, val = _padded_loader(64, 16, 0), _padded_loader(64, 16, 1)
    kept = []  # the leading batches that share the first one's padded length, up to 64 sequences
    for x, _ in val:
        if (kept and x.shape[1:] != kept[0].shape[1:]) or sum(len(k) for k in kept) >= 64:
            break
        kept.append(x)
    assert 0 < sum(len(k) for k in kept) < 64  # the batches differ in length: the probe holds fewer than asked
    watch = TrainWatch(
        every_n_steps=2, activations_every_n_steps=2, tracking_uri=store, system_metrics=False
    )  # probe_samples=64: four batches asked
    trainer(max_steps=4, callbacks=[watch]).fit(SequenceClassifier(), train, val)
    client, run = _only_run(store)
    hist = _npz(client, run.info.run_id, "trainwatch/histograms/activations/part-00000.npz")
    emb = list(hist["names"]).index("emb")
    assert hist["values"][:, emb, 0].tolist() == [sum(k.numel() for k in kept) * 8] * 2  # 8 embedding dims per token


def test_float64_probes_pass_the_setup_checks_of_a_64_bit_run(store):
    """The probes are checked in `setup`, before Lightning turns the module into float64 for `precision="64-true"`."""
    from tests.models import cnn, images

    pl.seed_everything(0)
    data = images(n=64)
    train, val = loaders(data, batch_size=16)
    probes = data.tensors[0][:4].double()  # e.g. data that came from NumPy
    watch = TrainWatch(
        every_n_steps=2, activations_every_n_steps=2, tracking_uri=store, system_metrics=False, probe_batch=probes, cam_probes=probes,
        cam_targets=torch.tensor([0, 1, 2, 0]), cam_every_n_steps=2, cam_methods=["grad_cam"],
    )  # fmt: skip
    trainer(max_steps=4, precision="64-true", callbacks=[watch]).fit(Classifier(cnn()), train, val)
    client, run = _only_run(store)
    assert sorted(_history(client, run.info.run_id, "act_mean/net.0")) == [0, 2]
    assert sorted(_history(client, run.info.run_id, "cam_confidence/p0")) == [0, 2]


def flat_cnn(blocks: int = 16) -> nn.Module:
    """One group per module takes 266 keys here: that fits 300 only if nothing else is logged."""
    layers: list[nn.Module] = [nn.Conv2d(1, 4, 3, padding=1)]
    for _ in range(blocks):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_the_key_budget_holds_for_the_whole_run_with_cam_system_metrics_and_landscape(store):
    from tests.models import images

    pl.seed_everything(0)
    train, val = loaders(images(n=64), batch_size=16)
    watch = TrainWatch(
        every_n_steps=1, tracking_uri=store, system_metrics_interval_s=0.2, cam_every_n_steps=2,
        cam_methods=["grad_cam", "layer_cam", "hires_cam", "grad_cam_pp"], landscape_at_end=True, landscape_steps=3, landscape_samples=32,
    )  # fmt: skip
    trainer(max_steps=4, callbacks=[watch]).fit(Classifier(flat_cnn()), train, val)
    _, run = _only_run(store)
    keys = set(run.data.metrics)
    families = {k.split("/", 1)[0] for k in keys}
    assert {"grad_norm", "cam_confidence", "system", "landscape", "train"} <= families, families
    assert len(keys) <= 300, len(keys)  # CAM (8 probes x 6), system (8), landscape (5) and train/ keys included


def test_a_fit_resumed_into_the_same_run_keeps_the_first_fits_tables(store, tmp_path, monkeypatch):
    """Resume from a mid-run checkpoint (step 4 of 8) into the logger's run: the first fit's table parts stay, the
    resumed fit's go after them, the dashboard takes the resumed rows for the steps logged twice; an explicit
    `probe_batch` wins over the checkpoint's; the run says where weight_dist_init now measures from. The first fit's
    snapshots, which begin the resumed fit's histogram image, are downloaded off the training thread."""
    import threading

    from pytorch_lightning.callbacks import ModelCheckpoint

    from trainwatch.report import build_report
    from trainwatch.runs import RunStore

    training = threading.Event()  # set between on_train_start and on_train_end of the resumed fit
    read, reads = RunStore.read, []  # (on the main thread, while it trains, what)
    monkeypatch.setattr(
        RunStore,
        "read",
        lambda self, *a: reads.append((threading.current_thread() is threading.main_thread(), training.is_set(), a[1])) or read(self, *a),
    )

    class Training(pl.Callback):
        def on_train_start(self, *args):
            training.set()

        def on_train_end(self, *args):
            training.clear()

    pl.seed_everything(0)
    train, val = loaders(blobs(n=128), batch_size=16)
    logger = MLFlowLogger(experiment_name="resume", tracking_uri=store)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    first = TrainWatch(every_n_steps=2, activations_every_n_steps=2, system_metrics=False)
    trainer(max_steps=8, logger=logger, callbacks=[first, saver], enable_checkpointing=True).fit(Classifier(mlp()), train, val)
    (ckpt,) = [p for p in (tmp_path / "ckpt").iterdir() if "step=4" in p.name]
    probe = torch.randn(5, 8)
    again = TrainWatch(every_n_steps=2, activations_every_n_steps=2, system_metrics=False, probe_batch=probe)
    same_run = MLFlowLogger(experiment_name="resume", tracking_uri=store, run_id=logger.run_id)
    reads.clear()
    trainer(max_steps=8, logger=same_run, callbacks=[Training(), again]).fit(Classifier(mlp()), train, val, ckpt_path=ckpt)
    assert torch.equal(again.state_dict()["probe_inputs"]["args"][0], probe)
    table_reads = [main for main, _, what in reads if what == "activation table part"]
    assert table_reads and not any(table_reads)  # the first fit's, on the sink thread
    assert not [r for r in reads if r[:2] == (True, True)]  # nothing read on the training thread while it trains
    assert again._publisher._histograms.steps[:2] == [0, 2]  # and it begins this fit's image
    client = MlflowClient(store)
    parts = sorted(f.path for f in client.list_artifacts(logger.run_id, "trainwatch/stats/params"))
    assert [p.rsplit("/", 1)[1] for p in parts] == ["part-00000.npz", "part-00001.npz"]
    assert _npz(client, logger.run_id, parts[0])["step"].tolist() == [0, 2, 4, 6]
    assert _npz(client, logger.run_id, parts[1])["step"].tolist() == [4, 6]
    assert client.get_run(logger.run_id).data.tags["trainwatch.weight_dist_init_from_step"] == "4"
    page = build_report([logger.run_id], store)
    payload = json.loads(page.split('id="trainwatch-data">', 1)[1].split("</script>", 1)[0])
    assert payload["runs"][0]["activations"]["steps"] == [0, 2, 4, 6]  # one row per step


def _fit_validating_every_4_steps(store: str, module: pl.LightningModule):
    """Our own run, 12 steps logged every 2, a validation every 4; the run's client and record."""
    pl.seed_everything(0)
    train, val = loaders(blobs(n=256), batch_size=16)
    watch = TrainWatch(every_n_steps=2, tracking_uri=store, system_metrics=False, activations="off")
    trainer(max_steps=12, val_check_interval=4, limit_val_batches=2, callbacks=[watch]).fit(module, train, val)
    return _only_run(store)


def test_own_run_logs_each_metric_once_per_step_and_validation_metrics_at_validation(store):
    client, run = _fit_validating_every_4_steps(store, Classifier(mlp()))
    train_loss = _history(client, run.info.run_id, "train_loss")  # asserts one value per step
    assert sorted(train_loss) == list(range(0, 12, 2))
    assert sorted(_history(client, run.info.run_id, "val_loss")) == [4, 8, 12]  # after each validation, not at every step


class SameNameInBothLoops(Classifier):
    """Logs "acc" from training_step and from validation_step, as many modules do."""

    def training_step(self, batch, batch_idx):
        self.log("acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.log("acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())


def test_a_metric_named_alike_in_training_and_validation_keeps_its_training_values(store):
    client, run = _fit_validating_every_4_steps(store, SameNameInBothLoops(mlp()))
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "acc")}
    assert {0, 2, 6, 10} <= steps  # training values at the logged steps, also after the first validation


class _MixedDtypes(nn.Module):
    """A bfloat16 layer with an odd number of biases (6 bytes) before float32 ones."""

    def __init__(self) -> None:
        super().__init__()
        self.low = nn.Linear(8, 3).bfloat16()
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.low(x.bfloat16()).float())


@pytest.mark.parametrize("copies", ["memory", "files"])
def test_parameters_of_mixed_dtypes_are_measured(store, monkeypatch, copies):
    """Weight copies of bfloat16 and float32 parameters side by side (odd sizes): the distance from
    initialisation at the last step equals the independent one, and training is not interrupted."""
    if copies == "files":
        monkeypatch.setattr(weight_copy, "IN_MEMORY_BYTES", 0)
    pl.seed_everything(0)
    train, _ = loaders(blobs())
    model = Classifier(_MixedDtypes())
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    watch = TrainWatch(every_n_steps=1, tracking_uri=store, system_metrics=False, landscape_samples=0)
    trainer(max_steps=4, callbacks=[watch]).fit(model, train)
    client, run = _only_run(store)
    for module in ("low", "head"):
        from_init = _history(client, run.info.run_id, f"weight_dist_init/net.{module}")
        assert sorted(from_init) == [0, 1, 2, 3] and sorted(_history(client, run.info.run_id, f"update_ratio/net.{module}")) == [0, 1, 2, 3]
        moved = [(p.detach() - initial[n]).double() for n, p in model.named_parameters() if n.startswith(f"net.{module}.")]
        assert from_init[3] == pytest.approx(torch.linalg.vector_norm(torch.cat([m.reshape(-1) for m in moved])).item(), rel=1e-3)
    assert run.info.status == "FINISHED"


class _Bag(pl.LightningModule):
    """Token ids → a sparse-gradient embedding (rows of the batch's tokens only) → mean → linear; plain SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 4, sparse=True)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(1))

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        return nn.functional.cross_entropy(self(tokens), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _DenseGrads(pl.Callback):
    def __init__(self) -> None:
        self.grad: dict[int, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        assert pl_module.embed.weight.grad.is_sparse
        self.grad[trainer.global_step] = pl_module.embed.weight.grad.to_dense()


def test_sparse_gradients_are_measured_as_their_dense_values(store):
    """`nn.Embedding(sparse=True)` gives sparse gradients (rows of the tokens seen, a token seen twice stored
    twice): norm, max and zero fraction are the dense gradient's, and the per-step check reads them too."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 50, (96, 5), generator=g), torch.randint(0, 3, (96,), generator=g))
    rec = _DenseGrads()
    watch = TrainWatch(every_n_steps=2, tracking_uri=store, system_metrics=False, landscape_samples=0)
    trainer(max_steps=5, callbacks=[watch, rec]).fit(_Bag(), DataLoader(data, batch_size=16))
    client, run = _only_run(store)
    rid = run.info.run_id
    norms, maxes, zeros = (_history(client, rid, f"{family}/embed") for family in ("grad_norm", "grad_max", "grad_zero_frac"))
    assert sorted(norms) == [0, 2, 4]
    for step, dense in rec.grad.items():
        if step % 2 == 0:
            assert norms[step] == pytest.approx(torch.linalg.vector_norm(dense).item(), rel=1e-5)
            assert maxes[step] == pytest.approx(dense.abs().max().item(), rel=1e-6)
            assert zeros[step] == pytest.approx((dense == 0).float().mean().item(), rel=1e-6)
    assert _history(client, rid, "train/nonfinite_steps")[4] == 0
    assert run.info.status == "FINISHED"


def test_a_measurement_that_raises_is_turned_off_and_training_goes_on(store, monkeypatch, caplog):
    """A bug in a measurement (here the update ratio, from step 4) is logged once with its traceback and turns
    that measurement off; the rest goes on being logged, the run finishes, and training is that of a bare fit."""
    real = Capture.updates

    def updates(self: Capture, packer) -> None:
        if packer.step >= 4:
            raise RuntimeError("a bug in the update ratio")
        real(self, packer)

    monkeypatch.setattr(Capture, "updates", updates)

    def fit(callbacks: list) -> Classifier:
        pl.seed_everything(0)
        train, val = loaders(blobs())
        model = Classifier(mlp())
        trainer(max_steps=8, callbacks=callbacks).fit(model, train, val)
        return model

    watched = fit([TrainWatch(every_n_steps=2, activations_every_n_steps=2, tracking_uri=store, system_metrics=False)])
    bare = fit([])
    assert all(torch.equal(a, b) for a, b in zip(watched.state_dict().values(), bare.state_dict().values(), strict=True))
    client, run = _only_run(store)
    rid = run.info.run_id
    assert sorted(_history(client, rid, "update_ratio/net.0")) == [0, 2]
    assert sorted(_history(client, rid, "grad_norm/net.0")) == [0, 2, 4]  # step 4's came before its update failed
    assert sorted(_history(client, rid, "act_mean/net.0")) == [0, 2, 4, 6]
    said = [r for r in caplog.records if "raised an error at step 4" in r.getMessage()]
    assert len(said) == 1 and "gradient and weight statistics" in said[0].getMessage() and said[0].exc_info is not None
    assert run.info.status == "FINISHED"


def test_a_module_that_does_not_run_in_the_probe_logs_no_activation_values(store):
    """An auxiliary head used only in training never runs in the eval-mode probe: its activation metrics are
    absent (not zeros that would read as an all-zero output); the other modules' are logged at every snapshot."""

    class WithAuxHead(Classifier):
        def __init__(self) -> None:
            super().__init__(mlp())
            self.aux = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.net(x)
            return out + self.aux(x) if self.training else out

    train, val = loaders(blobs())
    watch = TrainWatch(every_n_steps=2, activations_every_n_steps=2, tracking_uri=store, system_metrics=False, landscape_samples=0)
    trainer(max_steps=4, callbacks=[watch]).fit(WithAuxHead(), train, val)
    client, run = _only_run(store)
    assert sorted(_history(client, run.info.run_id, "act_mean/net.0")) == [0, 2]
    assert not any(k.startswith("act_") and k.endswith("/aux") for k in run.data.metrics)
    assert sorted(_history(client, run.info.run_id, "grad_norm/aux")) == [0, 2]  # it trains, and is measured as such


def test_weight_normed_layers_are_measured_as_layers(store):
    """A layer under weight norm (`torch.nn.utils.parametrizations.weight_norm`): its gradient norm covers its
    parametrization's parameters (magnitude and direction) with its bias, and its activations are the layer's
    output, not the weight its parametrization computes."""
    from torch.nn.utils import parametrizations

    pl.seed_everything(0)
    data = blobs()
    train, val = loaders(data)
    probe = data.tensors[0][:64]
    net = mlp()
    parametrizations.weight_norm(net[0])
    rec = Recorder(2, probe)
    watch = TrainWatch(every_n_steps=2, activations_every_n_steps=2, tracking_uri=store, system_metrics=False, probe_batch=probe)
    trainer(max_steps=4, callbacks=[watch, rec]).fit(Classifier(net), train, val)
    assert "net.0.parametrizations.weight.original0" in rec.grad[0]
    client, run = _only_run(store)
    rid = run.info.run_id
    norms, means = _history(client, rid, "grad_norm/net.0"), _history(client, rid, "act_mean/net.0")
    assert sorted(norms) == sorted(means) == [0, 2]
    for step in (0, 2):
        assert norms[step] == pytest.approx(_module_norm(rec.grad[step], "0"), rel=1e-5)
        assert means[step] == pytest.approx(rec.acts[step]["0"].mean().item(), rel=1e-4, abs=1e-6)
    assert not any("parametrizations" in k for k in run.data.metrics)
