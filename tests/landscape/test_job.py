"""`trainwatch landscape RUN_ID` end to end: a real Lightning run logged to a real MLflow store, then the job."""

import json

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


def test_two_process_sharded_job_equals_the_single_process_job(store):
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
