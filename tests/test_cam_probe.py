"""CAM snapshots inside real training: artifacts, images over steps, no effect on training, setup errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.models import Classifier, cnn, images, loaders, trainer
from trainwatch import TrainWatch, cam
from trainwatch.probes.cam_probe import balanced_probes

pytestmark = pytest.mark.slow


def blob_data(n: int = 256, size: int = 16, seed: int = 0) -> TensorDataset:
    """Class 0: a bright blob in the left half; class 1: in the right half. Where to look is known."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    cy = torch.randint(3, size - 3, (n,), generator=g).float()
    cx = torch.where(
        y == 0, torch.randint(2, size // 2 - 2, (n,), generator=g), torch.randint(size // 2 + 2, size - 2, (n,), generator=g)
    ).float()
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    x = torch.exp(-((yy - cy.view(-1, 1, 1)) ** 2 + (xx - cx.view(-1, 1, 1)) ** 2) / 4)
    return TensorDataset((x + 0.05 * torch.randn(n, size, size, generator=g)).unsqueeze(1), y)


def blob_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 2),
    )  # fmt: skip


def _run(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("trainwatch").experiment_id])
    assert len(runs) == 1
    return client, runs[0].info.run_id


def test_cam_snapshots_every_epoch_land_as_artifacts_images_and_metrics(store):
    pl.seed_everything(0)
    train, val = loaders(blob_data(), batch_size=32)
    watch = TrainWatch(
        every_n_steps=4,
        tracking_uri=store,
        system_metrics=False,
        cam_every_n_epochs=1,
        cam_methods=["grad_cam", "layer_cam"],
        cam_samples=4,
    )
    trainer(max_epochs=3, callbacks=[watch]).fit(Classifier(blob_net(), lr=0.01), train, val)
    client, rid = _run(store)
    steps = [m.step for m in client.get_metric_history(rid, "cam_confidence/p0")]
    assert steps == [0, 8, 16, 24]  # the untrained model, then each epoch end (8 steps per epoch)
    assert len(client.get_metric_history(rid, "cam_raw_max_layer_cam/p3")) == 4
    probes = np.load(io.BytesIO(Path(client.download_artifacts(rid, "trainwatch/cam/probes.npz")).read_bytes()))
    assert probes["inputs"].shape == (4, 1, 16, 16) and sorted(probes["targets"].tolist()) == [0, 0, 1, 1]  # balanced
    for method in ("grad_cam", "layer_cam"):
        files = sorted(a.path for a in client.list_artifacts(rid, f"trainwatch/cam/{method}"))
        assert [f.rsplit("/", 1)[1] for f in files] == [f"step-{s:08d}.npz" for s in steps]
        snap = np.load(io.BytesIO(Path(client.download_artifacts(rid, files[-1])).read_bytes()))
        assert snap["maps"].shape == (4, 16, 16) and snap["maps"].max() <= 1 and (snap["raw_max"] > 0).all()
    pngs = [a.path for a in client.list_artifacts(rid, "images") if a.path.endswith(".png") and "cam~grad_cam" in a.path]
    drawn = {int(p.split("+step+")[1].split("+")[0]) for p in pngs}
    assert {steps[0], steps[-1]} <= drawn <= set(steps)  # the filmstrip: first snapshot, at most every 30 s, the last


def test_trained_maps_look_at_the_blob_and_differ_from_random_weights():
    """The sanity check of Adebayo et al. 2018: maps must depend on the learned weights."""
    pl.seed_everything(0)
    data = blob_data(n=512)
    model = Classifier(blob_net(), lr=0.01)
    trainer(max_epochs=4).fit(model, DataLoader(data, batch_size=32, shuffle=True))
    x, y = data.tensors[0][:64], data.tensors[1][:64]
    net = model.net.eval()
    # HiResCAM: with a 2×2 pool before the head, gradients depend on position, which Grad-CAM's spatial
    # average discards (Draelos & Carin 2020); HiResCAM keeps them and must find the blob.
    trained = cam.hires_cam(net, x, "3", y)
    pl.seed_everything(1)
    random_maps = cam.hires_cam(blob_net().eval(), x, "3", y)
    assert (trained - random_maps).abs().mean() > 0.15
    peak_x = trained.flatten(1).argmax(1) % 16
    blob_x = x[:, 0].flatten(1).argmax(1) % 16
    assert ((peak_x - blob_x).abs() <= 2).float().mean() >= 0.9


def test_training_is_bit_identical_with_cam_every_step(store):
    def run(callbacks):
        pl.seed_everything(5)
        model = Classifier(cnn(), lr=0.05)
        train, val = loaders(images(n=64, size=8), batch_size=8)
        trainer(max_steps=8, accumulate_grad_batches=2, callbacks=callbacks).fit(model, train, val)
        return model

    bare = run([])
    watch = TrainWatch(
        every_n_steps=1, tracking_uri=store, system_metrics=False, cam_every_n_steps=1, cam_methods=list(cam.METHODS), cam_samples=3
    )
    watched = run([watch])
    for (name, a), b in zip(bare.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert all(not m._forward_hooks and not m._backward_hooks for m in watched.modules())
    client, rid = _run(store)
    assert [m.step for m in client.get_metric_history(rid, "cam_confidence/p0")] == list(range(8))


def test_balanced_probes_round_robin_over_classes():
    x = torch.arange(10.0).view(10, 1, 1, 1)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2, 2, 1])
    inputs, targets = balanced_probes(DataLoader(TensorDataset(x, y), batch_size=4), 5)
    assert targets.tolist() == [0, 1, 2, 0, 1]
    assert inputs.view(-1).tolist() == [0, 6, 7, 1, 9]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cam_layer": "net.99"}, r"'net.99' is not in `model.named_modules\(\)`"),
        ({"cam_layer": "net.9"}, r"'net.9' \(Linear\).*no spatial dimensions"),  # the Linear head
        (
            {"cam_probes": torch.zeros(2, 3, 8, 8), "cam_targets": torch.tensor([0, 1])},
            r"shape \(2, 3, 8, 8\).*fail in `Classifier.forward`",
        ),
        ({"cam_probes": torch.zeros(2, 1, 8, 8, dtype=torch.long), "cam_targets": torch.tensor([0, 1])}, r"must be float images"),
        (
            {"cam_probes": torch.zeros(2, 1, 8, 8), "cam_targets": torch.tensor([0, 5])},
            r"targets must be class indices in \[0, 3\), got \[0, 5\]",
        ),
        ({"cam_probes": torch.zeros(2, 1, 8, 8), "cam_targets": torch.tensor([0])}, r"one class index per probe"),
    ],
)
def test_bad_cam_configuration_fails_before_training(store, kwargs, match):
    train, val = loaders(images(n=32, size=8), batch_size=8)
    with pytest.raises(MisconfigurationException, match=match):
        trainer(max_steps=2, callbacks=[TrainWatch(tracking_uri=store, cam_every_n_steps=1, **kwargs)]).fit(Classifier(cnn()), train, val)


def test_bad_cam_arguments_fail_at_construction():
    with pytest.raises(ValueError, match=r"cam_methods=\['gradcam'\]\)`: unknown \['gradcam'\]; choose from"):
        TrainWatch(cam_methods=["gradcam"])
    with pytest.raises(ValueError, match="needs `cam_targets=`"):
        TrainWatch(cam_every_n_epochs=1, cam_probes=torch.zeros(2, 1, 8, 8))


def test_cam_filmstrip_is_drawn_first_then_throttled_then_at_the_flush():
    """Publisher on its own: with a long interval only the first snapshot's filmstrip is drawn while training,
    the latest one at the flush; with no interval, every snapshot's."""
    from trainwatch.ops import ImageOp
    from trainwatch.publish import Publisher
    from trainwatch.record import Record
    from trainwatch.sink import _FLUSH

    g = np.random.default_rng(0)
    probes = Record(0, 0, arrays={"cam_inputs": g.random((2, 1, 8, 8)), "cam_targets": np.array([0.0, 1.0])})

    def snapshot(step: int) -> Record:
        arrays = {"cam/grad_cam": g.random((2, 8, 8)), "cam_raw_max/grad_cam": np.ones(2)}
        arrays |= {"cam_predicted": np.array([0.0, 1.0]), "cam_confidence": np.array([0.9, 0.8])}
        return Record(step, 0, arrays=arrays)

    for interval, expected in ((3600.0, [0]), (0.0, [0, 5, 10])):
        publisher = Publisher([], [], render_interval_s=interval)
        publisher(probes)
        images = [op.step for s in (0, 5, 10) for op in publisher(snapshot(s)) if isinstance(op, ImageOp)]
        assert images == expected
        at_flush = [op.step for op in publisher(_FLUSH) if isinstance(op, ImageOp)]
        assert at_flush == ([10] if interval else [])  # the latest snapshot is always drawn by the end


class DictOutput(Classifier):
    """A forward that returns `{"logits": ...}`, as many models do."""

    def forward(self, x):
        return {"logits": self.net(x)}

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0])["logits"], batch[1])

    def validation_step(self, batch, batch_idx):
        pass


def test_a_model_returning_a_dict_of_logits_gets_its_cam_snapshots(store):
    """The snapshot's confidence is the softmax of the dict's logits, as for a plain classifier."""
    pl.seed_everything(0)
    train, val = loaders(blob_data(), batch_size=32)
    watch = TrainWatch(every_n_steps=4, tracking_uri=store, system_metrics=False, cam_every_n_steps=4, cam_samples=4)
    model = DictOutput(blob_net(), lr=0.01)
    trainer(max_steps=5, callbacks=[watch]).fit(model, train, val)
    client, rid = _run(store)
    confidence = {m.step: m.value for m in client.get_metric_history(rid, "cam_confidence/p0")}
    assert sorted(confidence) == [0, 4]
    probes = np.load(io.BytesIO(Path(client.download_artifacts(rid, "trainwatch/cam/probes.npz")).read_bytes()))
    model.eval()
    with torch.no_grad():
        expect = model(torch.as_tensor(probes["inputs"][:1]).float())["logits"].softmax(1).max().item()
    assert confidence[4] == pytest.approx(expect, rel=1e-5)  # the weights after the last step are those of step 4's snapshot


class Stream(torch.utils.data.IterableDataset):
    """A stream without `__len__` (as from a web or database reader): `bool(DataLoader)` would call `len()`."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self):
        return iter(self.data)


def test_cam_probes_are_drawn_from_a_stream_without_a_length(store):
    pl.seed_everything(0)
    data = blob_data(n=64)
    watch = TrainWatch(
        every_n_steps=2, tracking_uri=store, system_metrics=False, cam_every_n_steps=2, cam_samples=2, landscape_samples=0, writer="thread"
    )
    trainer(max_steps=3, callbacks=[watch]).fit(Classifier(blob_net()), DataLoader(Stream(data), batch_size=16))
    client, rid = _run(store)
    probes = np.load(io.BytesIO(Path(client.download_artifacts(rid, "trainwatch/cam/probes.npz")).read_bytes()))
    first = {int(y): x for x, y in reversed(list(zip(data.tensors[0], data.tensors[1], strict=True)))}  # first of each class
    assert np.array_equal(probes["inputs"], torch.stack([first[0], first[1]]).numpy())  # balanced: one per class, in order
    assert [m.step for m in client.get_metric_history(rid, "cam_confidence/p0")] == [0, 2]
