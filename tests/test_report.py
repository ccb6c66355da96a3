"""The run dashboard: payload arithmetic, escaping, and the page in a real Chromium (Debian's, driven by Playwright)."""

import json
import shutil
import urllib.parse
from pathlib import Path

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import MLFlowLogger

from trainwatch import TrainWatch
from trainwatch.cli import main as cli
from trainwatch.demo import DigitsCNN, DigitsData
from trainwatch.landscape.job import LandscapeSpec, run_landscape
from trainwatch.report import REPORT_PATH, downsample, render

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
VIEWS = ["overview", "dynamics", "gradients", "activations", "cam", "landscape"]


def test_downsample_keeps_extremes_and_bounds_the_size():
    steps = np.arange(100_000)
    values = np.sin(steps / 500.0)
    values[73_123] = 50.0  # a spike
    values[10] = np.nan
    s, v = downsample(steps, values, 1000)
    assert len(s) <= 1000 and s == sorted(s)
    assert 50.0 in v and 73_123 in s
    assert min(x for x in v if x is not None) == pytest.approx(-1.0, abs=1e-4)
    short_s, short_v = downsample([3, 1, 2], [0.3, float("inf"), 0.2], 1000)
    assert short_s == [1, 2, 3] and short_v == [None, 0.2, 0.3]


def test_payload_cannot_close_its_script_element():
    page = render([{"id": "r1", "name": "</script><script>alert(1)</script>", "params": {"<b>": "<img src=x onerror=alert(2)>"}}])
    data = page.split('id="trainwatch-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data and ">" not in data
    assert json.loads(data)["runs"][0]["name"] == "</script><script>alert(1)</script>"
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # no remote requests


def test_non_finite_numbers_reach_the_page_as_null():
    run = {"id": "r1", "series": {"train_loss": {"step": [0, 1, 2], "value": [0.5, float("nan"), float("inf")]}}}
    run["findings"] = [{"kind": "nonfinite_loss", "evidence": {"value": float("-inf")}}]
    page = render([run])
    payload = json.loads(page.split('id="trainwatch-data">', 1)[1].split("</script>", 1)[0])
    assert payload["runs"][0]["series"]["train_loss"]["value"] == [0.5, None, None]
    assert payload["runs"][0]["findings"][0]["evidence"]["value"] is None


class Diverges(DigitsCNN):
    """The demo's CNN whose loss turns NaN from step 4 on: the run a user most wants a dashboard of."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 4 else loss


@pytest.mark.slow
def test_a_diverged_run_still_gets_its_dashboard(store, tmp_path):
    sync_api = _browser()
    pl.seed_everything(0, verbose=False)
    logger = MLFlowLogger(experiment_name="dashboard", tracking_uri=store, run_name="diverged")
    watch = TrainWatch(every_n_steps=2, system_metrics=False, cam_every_n_steps=2, cam_methods=["grad_cam"], landscape_samples=0)
    trainer = pl.Trainer(
        max_steps=10, logger=logger, callbacks=[watch], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_train_batches=10, limit_val_batches=2,
    )  # fmt: skip
    trainer.fit(Diverges(), DigitsData())
    client = mlflow.MlflowClient(store)
    out = Path(client.download_artifacts(logger.run_id, REPORT_PATH, str(tmp_path)))  # built at the end of fit
    assert "nonfinite" in out.read_text()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = _open(page, out.as_uri())
        assert "nonfinite" in (page.text_content("#view-overview") or "")
        for view in VIEWS:
            page.click(f"button.tab[data-view='{view}']")
        browser.close()
    assert errors == []


def _train(store: str, name: str, epochs: int = 2) -> str:
    pl.seed_everything(0, verbose=False)
    logger = MLFlowLogger(experiment_name="dashboard", tracking_uri=store, run_name=name)
    watch = TrainWatch(
        every_n_steps=3, system_metrics=False, cam_every_n_epochs=1, cam_methods=["grad_cam", "layer_cam"], landscape_samples=64
    )
    trainer = pl.Trainer(
        max_epochs=epochs, logger=logger, callbacks=[watch], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_train_batches=8,
    )  # fmt: skip
    trainer.fit(DigitsCNN(), DigitsData())
    return logger.run_id


def _browser():
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (`.ci/run` installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    return sync_api


def _open(page, url: str) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
    # the page itself may be fetched; anything else it asks for would be a remote request
    page.on("request", lambda r: errors.append(f"request: {r.url}") if r.url != url and not r.url.startswith(("data:", "about:")) else None)
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=15_000)
    return errors


def _canvas_has_ink(page, section: str) -> bool:
    return page.evaluate(
        """(id) => [...document.querySelectorAll(`#view-${id} canvas`)].some(c => {
            if (!c.width || !c.height) return false;
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            for (let i = 0; i < d.length; i += 4) if (d[i + 3] && (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250)) return true;
            return false; })""",
        section,
    )


@pytest.mark.slow
def test_dashboard_of_a_real_run_in_chromium(store, tmp_path):
    sync_api = _browser()
    run_id = _train(store, "<script>alert(1)</script>")
    client = mlflow.MlflowClient(store)
    assert any(f.path == REPORT_PATH for f in client.list_artifacts(run_id, "trainwatch"))  # built at the end of fit
    logged = Path(client.download_artifacts(run_id, REPORT_PATH, str(tmp_path / "logged"))).read_text()
    payload = json.loads(logged.split('id="trainwatch-data">', 1)[1].split("</script>", 1)[0])
    assert payload["runs"][0]["status"] == "FINISHED" == client.get_run(run_id).info.status  # not "RUNNING"
    run_landscape(LandscapeSpec(run_id=run_id, tracking_uri=store, steps=5), progress=None)
    out = tmp_path / "report.html"
    assert cli(["report", run_id, "--tracking-uri", store, "--out", str(out)]) == 0
    size_mb = out.stat().st_size / 1e6
    assert size_mb < 3
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = _open(page, out.as_uri())
        assert page.text_content("#run-name") == "<script>alert(1)</script>"  # text, not markup
        for view in VIEWS:
            page.click(f"button.tab[data-view='{view}']")
            assert page.is_visible(f"#view-{view}"), view
            if view in ("gradients", "activations", "landscape"):
                assert _canvas_has_ink(page, view), f"blank canvas in {view}"
            page.screenshot(path=str(ARTIFACTS / f"dashboard-{view}.png"))
        assert "vanishing" not in (page.text_content("#view-overview") or "")  # a healthy run
        # interactions: another layer, another CAM snapshot
        page.click("button.tab[data-view='gradients']")
        options = page.eval_on_selector_all("#layer-select option", "os => os.map(o => o.value)")
        assert len(options) >= 2
        before = page.inner_html("#view-gradients")
        page.select_option("#layer-select", options[-1])
        assert page.inner_html("#view-gradients") != before
        page.click("button.tab[data-view='cam']")
        slider = page.locator("#cam-step-slider").first
        first_src = page.eval_on_selector("#view-cam img[data-kind='cam']", "i => i.src")
        slider.fill("0")
        slider.dispatch_event("input")
        assert page.eval_on_selector("#view-cam img[data-kind='cam']", "i => i.src") != first_src
        page.screenshot(path=str(ARTIFACTS / "dashboard-cam-step0.png"))
        browser.close()
    assert errors == []


@pytest.mark.slow
def test_dashboard_through_a_real_mlflow_server_and_compare(tmp_path, monkeypatch):
    from tests.servers import MlflowServer

    sync_api = _browser()
    monkeypatch.chdir(tmp_path)
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        first, second = _train(server.url, "first", epochs=1), _train(server.url, "second", epochs=1)
        experiment = mlflow.MlflowClient(server.url).get_run(first).info.experiment_id
        ui = f"{server.url}/#/experiments/{experiment}/runs/{first}/artifacts/{urllib.parse.quote(REPORT_PATH)}"
        compare = tmp_path / "compare.html"
        assert cli(["report", first, second, "--tracking-uri", server.url, "--out", str(compare)]) == 0
        own = mlflow.MlflowClient(server.url).download_artifacts(first, REPORT_PATH, str(tmp_path / "own"))
        assert cli(["report", first, second, "--tracking-uri", server.url]) == 0  # logged beside, not over, the run's own
        assert (
            Path(own).read_text()
            == Path(mlflow.MlflowClient(server.url).download_artifacts(first, REPORT_PATH, str(tmp_path / "again"))).read_text()
        )
        assert any(
            f.path == f"trainwatch/compare-{second}.html" for f in mlflow.MlflowClient(server.url).list_artifacts(first, "trainwatch")
        )
        assert cli(["report", first, first, "--tracking-uri", server.url]) == 2  # a run against itself is no comparison
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(ui)  # the MLflow UI itself, its artifact viewer showing the page in its sandboxed iframe
            frame = page.frame_locator("iframe").first
            frame.locator("body[data-ready='1']").wait_for(timeout=60_000)
            assert frame.locator("#run-name").text_content() == "first"
            frame.locator("button.tab[data-view='gradients']").click()
            assert frame.locator("#view-gradients canvas.chart").count() >= 1
            page.screenshot(path=str(ARTIFACTS / "dashboard-in-mlflow-ui.png"))
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors += _open(page, compare.as_uri())
            page.click("button.tab[data-view='compare']")
            text = page.text_content("#view-compare") or ""
            assert "first" in text and "second" in text
            page.screenshot(path=str(tmp_path / "compare.png"))
            browser.close()
        assert errors == []
    finally:
        server.stop()


@pytest.mark.slow
def test_dashboard_is_rebuilt_every_k_epochs_off_the_training_thread(store):
    import time

    seen: list[bool] = []

    class Peek(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:  # the rebuild started at the end of epoch 0 runs on its own thread
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not seen:
                    paths = [f.path for f in mlflow.MlflowClient(store).list_artifacts(watch.run_id, "trainwatch")]
                    seen.append(REPORT_PATH in paths) if REPORT_PATH in paths else time.sleep(0.5)

    pl.seed_everything(0, verbose=False)
    watch = TrainWatch(tracking_uri=store, every_n_steps=4, system_metrics=False, landscape_samples=0, report_every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=2, logger=False, callbacks=[watch, Peek()], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_train_batches=6,
    )  # fmt: skip
    trainer.fit(DigitsCNN(), DigitsData())
    assert seen == [True]
    assert watch._report_thread is not None and not watch._report_thread.is_alive()
