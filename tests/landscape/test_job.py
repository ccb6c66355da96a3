"""`trainwatch landscape RUN_ID` end to end: a real Lightning run logged to a real MLflow store, then the job."""

import json
import tempfile

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import MLFlowLogger
from safetensors.torch import load_file

from trainwatch import TrainWatch
from trainwatch.cli import main as cli
from trainwatch.demo import DigitsCNN, DigitsData
from trainwatch.landscape.job import LandscapeSpec, load_module, run_landscape

pytestmark = pytest.mark.slow


def _train(store: str, **watch) -> str:
    pl.seed_everything(0, verbose=False)
    logger = MLFlowLogger(experiment_name="landscape", tracking_uri=store)
    trainer = pl.Trainer(
        max_epochs=1, logger=logger, callbacks=[TrainWatch(every_n_steps=5, system_metrics=False, **watch)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, limit_train_batches=10,
    )  # fmt: skip
    trainer.fit(DigitsCNN(), DigitsData())
    return logger.run_id


def test_job_logs_the_landscape_to_the_run(store, tmp_path):
    run_id = _train(store, landscape_samples=100)
    landscape = run_landscape(LandscapeSpec(run_id=run_id, tracking_uri=store, steps=5, span=0.5), progress=None)
    client = mlflow.MlflowClient(store)
    names = {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(run_id, "trainwatch/landscape/random")}
    assert names == {"surface.npz", "directions.safetensors", "meta.json", "curve.png", "contour.png", "surface.png", "surface.html"}
    # independent: the checkpoint's model on the logged evaluation data, in eval mode
    local = client.download_artifacts(run_id, "trainwatch/landscape/eval.safetensors", str(tmp_path))
    data = load_file(local)
    assert len(data["inputs"]) == 100
    ckpt = client.download_artifacts(run_id, "trainwatch/model/last.ckpt", str(tmp_path))
    model = DigitsCNN.load_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        expect = torch.nn.functional.cross_entropy(model(data["inputs"]), data["targets"]).item()
    metrics = client.get_run(run_id).data.metrics
    assert metrics["landscape/random/centre_loss"] == pytest.approx(expect, rel=1e-5)
    assert landscape.centre == pytest.approx(expect, rel=1e-5)
    params = client.get_run(run_id).data.params
    assert params["landscape/random/steps"] == "5" and params["landscape/random/norm"] == "filter"
    surface = np.load(client.download_artifacts(run_id, "trainwatch/landscape/random/surface.npz", str(tmp_path)))
    assert surface["loss"].shape == (5, 5) and surface["alphas"][2] == 0.0
    meta = json.loads(open(client.download_artifacts(run_id, "trainwatch/landscape/random/meta.json", str(tmp_path))).read())
    assert meta["seed"] == 0 and meta["samples"] == 100 and meta["device"] == "cpu"
    directions = load_file(client.download_artifacts(run_id, "trainwatch/landscape/random/directions.safetensors", str(tmp_path)))
    assert {k.split("/", 1)[1] for k in directions} == {n for n, _ in model.named_parameters()}
    # params are immutable: the same name with other settings fails before any work, with the fix
    with pytest.raises(ValueError, match="another name"):
        run_landscape(LandscapeSpec(run_id=run_id, tracking_uri=store, steps=3, span=0.5), progress=None)
    assert cli(["landscape", run_id, "--tracking-uri", store, "--steps", "3", "--name", "coarse"]) == 0


def test_clear_errors_for_runs_the_job_cannot_use(store, capsys):
    run_id = _train(store, landscape_samples=0)
    with pytest.raises(FileNotFoundError, match="has no landscape evaluation data"):
        run_landscape(LandscapeSpec(run_id=run_id, tracking_uri=store, steps=3), progress=None)
    assert cli(["landscape", run_id, "--tracking-uri", store]) == 1
    assert "has no landscape evaluation data" in capsys.readouterr().err
    assert cli(["landscape", "0123456789abcdef", "--tracking-uri", store]) == 1
    assert "no run '0123456789abcdef'" in capsys.readouterr().err
    assert cli(["landscape", run_id, "--tracking-uri", store, "--steps", "4"]) == 1
    assert "odd number" in capsys.readouterr().err
    with pytest.raises(ValueError, match="__main__"):
        load_module({"class": "__main__:Net"}, b"", torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot import"):
        load_module({"class": "nowhere.models:Net"}, b"", torch.device("cpu"))


def test_two_process_sharded_job_equals_the_single_process_job(store, tmp_path, monkeypatch):
    """Two processes meet in a temporary directory whose path needs escaping in a URI (a space, a non-ASCII letter)."""
    awkward = tmp_path / "tmp dir é"
    awkward.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(awkward))
    run_id = _train(store, landscape_samples=64)
    single = run_landscape(LandscapeSpec(run_id=run_id, tracking_uri=store, steps=5, span=0.5, name="one", device="cpu"), progress=None)
    sharded = run_landscape(
        LandscapeSpec(run_id=run_id, tracking_uri=store, steps=5, span=0.5, name="two", device="cpu", devices=2), progress=None
    )
    assert sharded.meta["processes"] == 2 and single.meta["processes"] == 1
    np.testing.assert_allclose(sharded.loss, single.loss, rtol=1e-6)
    np.testing.assert_allclose(sharded.curve, single.curve, rtol=1e-6)
    metrics = mlflow.MlflowClient(store).get_run(run_id).data.metrics
    assert metrics["landscape/two/centre_loss"] == pytest.approx(metrics["landscape/one/centre_loss"], rel=1e-6)


def test_pca_trajectory_landscape(store, tmp_path):
    pl.seed_everything(0, verbose=False)
    logger = MLFlowLogger(experiment_name="landscape", tracking_uri=store)
    watch = TrainWatch(every_n_steps=5, system_metrics=False, landscape_samples=64, trajectory_every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=3, logger=logger, callbacks=[watch], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_train_batches=4,
    )  # fmt: skip
    module = DigitsCNN()
    trainer.fit(module, DigitsData())
    run_id = logger.run_id
    landscape = run_landscape(LandscapeSpec(run_id=run_id, tracking_uri=store, steps=5, directions="pca"), progress=None)
    client = mlflow.MlflowClient(store)
    snapshots = sorted(f.path for f in client.list_artifacts(run_id, "trainwatch/trajectory"))
    assert [s.rsplit("/", 1)[1] for s in snapshots] == [f"epoch-{e:05d}.safetensors" for e in range(4)]
    # independent PCA of the path around the final weights (weights with more than one dimension only)
    loaded = [load_file(client.download_artifacts(run_id, s, str(tmp_path))) for s in snapshots]
    names = [n for n, p in module.named_parameters() if p.dim() > 1]
    final = np.concatenate([module.state_dict()[n].numpy().ravel() for n in names]).astype(np.float64)
    diffs = np.stack([np.concatenate([snap[n].numpy().ravel() for n in names]) - final for snap in loaded])
    _, _, vt = np.linalg.svd(diffs - diffs.mean(0), full_matrices=False)
    expect = diffs @ vt[:2].T
    for j in range(2):  # principal directions are defined up to sign
        sign = np.sign(expect[0, j]) * np.sign(landscape.trajectory[0, j])
        np.testing.assert_allclose(landscape.trajectory[:, j], sign * expect[:, j], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(landscape.trajectory[-1], 0.0, atol=1e-9)  # the last snapshot is the trained model
    d1, d2 = (torch.cat([d[n].reshape(-1).double() for n in names]) for d in landscape.directions)
    assert d1.norm().item() == pytest.approx(1.0) and abs(torch.dot(d1, d2).item()) < 1e-9
    assert landscape.alphas[-1] == pytest.approx(1.25 * np.abs(landscape.trajectory).max())
    files = {f.path.rsplit("/", 1)[1] for f in client.list_artifacts(run_id, "trainwatch/landscape/pca")}
    assert {"contour.png", "surface.npz", "surface.html"} <= files
    saved = np.load(client.download_artifacts(run_id, "trainwatch/landscape/pca/surface.npz", str(tmp_path)))
    np.testing.assert_allclose(saved["trajectory"], landscape.trajectory)
    assert client.get_run(run_id).data.params["landscape/pca/directions"] == "pca"
    ratio = landscape.meta["explained_variance_ratio"]
    assert 0 < ratio[1] <= ratio[0] and sum(ratio) <= 1 + 1e-9


def test_pca_without_snapshots_says_how_to_get_them(store):
    run_id = _train(store, landscape_samples=32)
    with pytest.raises(FileNotFoundError, match="trajectory_every_n_epochs=1"):
        run_landscape(LandscapeSpec(run_id=run_id, tracking_uri=store, steps=3, directions="pca"), progress=None)


def test_landscape_at_end_of_fit_lands_in_the_run(store):
    pl.seed_everything(0, verbose=False)
    watch = TrainWatch(tracking_uri=store, system_metrics=False, landscape_samples=48, landscape_at_end=True, landscape_steps=3)
    trainer = pl.Trainer(
        max_epochs=1, logger=False, callbacks=[watch], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_train_batches=5,
    )  # fmt: skip
    module, data = DigitsCNN(), DigitsData()
    trainer.fit(module, data)
    client = mlflow.MlflowClient(store)
    run = client.get_run(watch.run_id)
    assert run.info.status == "FINISHED"
    x, y = next(iter(data.val_dataloader()))
    module.eval()
    with torch.no_grad():
        expect = torch.nn.functional.cross_entropy(module(x[:48]), y[:48]).item()
    assert run.data.metrics["landscape/random/centre_loss"] == pytest.approx(expect, rel=1e-5)
    assert run.data.params["landscape/random/steps"] == "3"
    files = {f.path.rsplit("/", 1)[1] for f in client.list_artifacts(watch.run_id, "trainwatch/landscape/random")}
    assert {"surface.npz", "contour.png", "surface.html", "meta.json", "directions.safetensors"} <= files
    with pytest.raises(ValueError, match="odd number"):
        TrainWatch(landscape_at_end=True, landscape_steps=4)
