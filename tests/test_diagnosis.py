"""Diagnosis: each rule on synthetic numbers, the fault zoo end to end, NaN localisation and on_nonfinite."""

import json
import math
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from tests.models import Classifier, blobs, loaders, trainer
from trainwatch import TrainWatch
from trainwatch.diagnose import KINDS, Diagnosis, ModelFacts, Thresholds
from trainwatch.probes.activations import STAT_COLUMNS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "faults"))
import zoo

GROUPS = ["in", "mid", "out"]


def _feed(d: Diagnosis, records: list[dict], arrays: list[dict] | None = None) -> list:
    fresh = []
    for i, metrics in enumerate(records):
        fresh += d.observe(2 * i, metrics, (arrays or [{}] * len(records))[i])
    return fresh


def test_vanishing_needs_patience_and_names_the_deepest_vanished_group():
    d = Diagnosis(ModelFacts(GROUPS))
    m = {"grad_norm/in": 1e-9, "grad_norm/mid": 1e-6, "grad_norm/out": 1.0}
    assert _feed(d, [m, m]) == []  # patience 3
    (f,) = d.observe(4, m, {})
    # from the first record of the streak (step 0), confirmed at the third (step 4)
    assert (f.kind, f.group, f.first_step, f.last_step, f.severity) == ("vanishing_gradients", "mid", 0, 4, "warning")
    assert f.evidence["ratio_input_to_output"] == pytest.approx(1e-9)
    healthy = Diagnosis(ModelFacts(GROUPS))
    assert _feed(healthy, [{"grad_norm/in": 1e-3, "grad_norm/mid": 1e-2, "grad_norm/out": 1.0}] * 5) == []
    lenient = Diagnosis(ModelFacts(GROUPS), Thresholds(vanishing_ratio=1e-12, patience=1))
    assert _feed(lenient, [m] * 3) == []


def test_exploding_by_growth_over_the_baseline_and_by_absolute_norm():
    d = Diagnosis(ModelFacts(GROUPS))
    calm = [{"train/grad_norm_total": v, "grad_norm/out": v} for v in (1.0, 2.0, 1.5, 1.0, 2.0)]
    grown = {"train/grad_norm_total": 300.0, "grad_norm/out": 300.0}
    assert _feed(d, [*calm, grown]) == []  # 200x the median 1.5, once: growth must persist for 2 records
    (f,) = d.observe(20, grown, {})
    assert f.kind == "exploding_gradients" and f.severity == "critical" and f.evidence["baseline_median"] == 1.5
    first = Diagnosis(ModelFacts(GROUPS))
    (g,) = first.observe(0, {"train/grad_norm_total": 5e4, "grad_norm/mid": 5e4, "grad_norm/out": 1.0}, {})
    assert g.group == "mid" and g.first_step == 0  # absolute bound: at once, on the group with the largest norm


def test_nonfinite_origin_is_the_deepest_group_flagged_at_the_first_step():
    d = Diagnosis(ModelFacts(GROUPS))
    arrays = {"nonfinite_first_step": np.array([7.0]), "nonfinite_first_groups": np.array([1.0, 1.0, 0.0])}
    found = d.observe(8, {"train/nonfinite_steps": 1.0, "train_loss": math.nan}, arrays)
    kinds = {(f.kind, f.group) for f in found}
    assert kinds == {("nonfinite_gradients", "mid"), ("nonfinite_loss", "train_loss")}
    grads = next(f for f in found if f.kind == "nonfinite_gradients")
    assert grads.evidence["first_step"] == grads.first_step == 7 and d.health == "critical"  # the step it happened, not 8
    counts = d.counts()
    assert counts["train/findings_total"] == 2 and set(counts) == {f"train/findings/{k}" for k in KINDS} | {"train/findings_total"}


def test_under_a_grad_scaler_nonfinite_gradients_are_skipped_steps_until_the_scale_collapses():
    """fp16 AMP: a step with Inf gradients is one the GradScaler skips (its update is 0, which says nothing about
    the learning rate); a loss scale below 1 is the fault."""
    arrays = {"nonfinite_first_step": np.array([0.0]), "nonfinite_first_groups": np.array([1.0, 1.0, 1.0])}
    overflow = {
        "train/loss_scale": 65536.0, "train/nonfinite_steps": 1.0, "train/grad_nonfinite_total": 5.0,
        "grad_nonfinite/in": 3.0, "grad_nonfinite/mid": 2.0, "grad_nonfinite/out": 0.0,
        **{f"update_ratio/{g}": 0.0 for g in GROUPS}, **{f"grad_norm/{g}": math.inf for g in GROUPS},
    }  # fmt: skip
    d = Diagnosis(ModelFacts(GROUPS, grad_scaler=True))
    assert _feed(d, [overflow] * 4, [arrays] * 4) == [] and d.health == "ok"
    (f,) = d.observe(10, {**overflow, "train/loss_scale": 0.5}, arrays)
    assert (f.kind, f.group, f.severity, f.first_step) == ("loss_scale_collapse", "mid", "critical", 10)
    plain = Diagnosis(ModelFacts(GROUPS))  # no scaler: the same record is a fault
    assert {x.kind for x in _feed(plain, [overflow] * 4, [arrays] * 4)} == {"nonfinite_gradients"}


def test_a_resumed_fit_carries_the_findings_of_the_steps_before_it():
    """Resumed at step 6: the first fit's findings from before step 6 stay (a later one was logged by steps that are
    trained again and is dropped); the same finding seen again extends the carried one instead of starting a new one."""
    first = Diagnosis(ModelFacts(GROUPS))
    arrays = {"nonfinite_first_step": np.array([3.0]), "nonfinite_first_groups": np.array([0.0, 1.0, 0.0])}
    first.observe(4, {"train/nonfinite_steps": 1.0}, arrays)
    first.observe(8, {"train_loss": math.nan}, {})
    report = json.loads(json.dumps(first.to_json(final=False)))
    assert {f["kind"] for f in report["findings"]} == {"nonfinite_gradients", "nonfinite_loss"}

    resumed = Diagnosis(ModelFacts(GROUPS))
    resumed.carry(report, before_step=6)
    assert [(f.kind, f.group, f.first_step) for f in resumed.findings.values()] == [("nonfinite_gradients", "mid", 3)]
    assert resumed.health == "critical" and resumed.counts()["train/findings_total"] == 1
    again = {"nonfinite_first_step": np.array([9.0]), "nonfinite_first_groups": np.array([0.0, 1.0, 0.0])}
    assert resumed.observe(10, {"train/nonfinite_steps": 1.0}, again) == []  # not new: the carried finding goes on
    (carried,) = resumed.findings.values()
    assert (carried.first_step, carried.last_step) == (3, 10)


@pytest.mark.parametrize(
    ("report", "why"),
    [
        ([], "no list of findings"),
        ({"findings": None}, "no list of findings"),
        ({"findings": [{"kind": "nonfinite_loss", "severity": "critical"}]}, "without a valid 'group'"),
        ({"findings": [{"kind": "nonfinite_loss", "severity": "dire", "group": "g", "first_step": 1, "last_step": 1}]}, "unknown"),
    ],
)
def test_carry_refuses_what_is_not_a_diagnosis_and_takes_nothing_from_it(report, why):
    d = Diagnosis(ModelFacts(GROUPS))
    assert why in d.carry(report, before_step=6)
    assert d.findings == {} and d.health == "ok"


def test_exploding_counts_records_whatever_layer_is_worst():
    """A model-wide condition: the worst layer alternating between two layers must not restart the count."""
    d = Diagnosis(ModelFacts(GROUPS))
    calm = [{"train/grad_norm_total": 1.0, "grad_norm/out": 1.0}] * 5
    a = {"train/grad_norm_total": 1000.0, "grad_norm/mid": 900.0, "grad_norm/out": 400.0}
    b = {"train/grad_norm_total": 1000.0, "grad_norm/mid": 400.0, "grad_norm/out": 900.0}
    assert _feed(d, [*calm, a]) == []  # growth must persist for 2 records
    (f,) = d.observe(12, b, {})
    assert (f.kind, f.group, f.first_step, f.last_step) == ("exploding_gradients", "out", 10, 12)
    assert d.observe(14, a, {}) == [] and len(d.findings) == 1  # one finding; it goes on
    assert d.findings[("exploding_gradients", "")].last_step == 14


def test_a_resumed_fit_compares_gradient_norms_with_the_runs_first_records():
    """Resumed at step 8 when the norm has grown from 1 to 150: with the first fit's records as baseline, two
    records of 150 are exploding; a baseline taken afresh from the resumed fit's records would find nothing."""
    # (step, timestamp, value): 4 was logged again by an earlier resumed fit (the later value holds); 8 and 10 are
    # trained again by this fit
    history = [(0, 0, 1.0), (2, 1, math.nan), (4, 2, 50.0), (6, 3, 70.0), (4, 9, 1.2), (6, 10, 0.8), (8, 11, 150.0), (10, 12, 999.0)]
    resumed, afresh = Diagnosis(ModelFacts(GROUPS)), Diagnosis(ModelFacts(GROUPS))
    resumed.carry_baseline(history, before_step=8)
    assert resumed.to_json(final=False)["exploding_baseline"] == {"grad_norm_total_median": 1.0, "records": 3}
    grown = [{"train/grad_norm_total": 150.0, "grad_norm/out": 150.0}] * 6
    found = [f.kind for f in _feed(resumed, grown)]
    assert found == ["exploding_gradients"] and resumed.findings[("exploding_gradients", "")].first_step == 2
    assert _feed(afresh, grown) == []
    assert afresh.to_json(final=False)["exploding_baseline"] == {"grad_norm_total_median": 150.0, "records": 5}
    assert resumed.to_json(final=False)["exploding_baseline"]["records"] == 5  # topped up by the resumed records


def test_streaks_hold_across_records_that_do_not_feed_the_rule():
    """activations_every_n_steps != every_n_steps: records of gradients alone neither count nor break the
    activation rules' streaks, and records of activations alone do the same for the gradient rules."""
    facts = ModelFacts(GROUPS, act_names=["relu"], act_kinds={"relu": "relu"})
    d = Diagnosis(facts)
    row = dict.fromkeys(STAT_COLUMNS, 0.0)
    dead = {"activations": np.array([[{**row, "dead": 90.0, "positions": 100.0}[c] for c in STAT_COLUMNS]])}
    vanishing = {"grad_norm/in": 1e-9, "grad_norm/mid": 1e-6, "grad_norm/out": 1.0}
    fired = {}  # kind -> (first_step, the step it fired at)
    for step in range(0, 50, 5):  # gradients every 5 steps, activations every 20 (0, 20, 40)
        for f in d.observe(step, vanishing, dead if step % 20 == 0 else {}):
            fired[f.kind] = (f.first_step, step)
        for f in d.observe(step + 1, {}, {}):  # a record of neither (a CAM snapshot): breaks nothing
            fired[f.kind] = (f.first_step, step + 1)
    assert fired == {"dead_units": (0, 40), "vanishing_gradients": (0, 10)}  # the third record that fed each rule
    healthy = {"grad_norm/in": 0.5, "grad_norm/mid": 0.7, "grad_norm/out": 1.0}
    d2 = Diagnosis(facts)
    records = [(0, vanishing), (5, vanishing), (10, healthy), (15, vanishing), (20, vanishing)]
    assert [f for step, m in records for f in d2.observe(step, m, {})] == []  # a fed record that does not hit breaks it


def test_activation_and_update_rules_and_the_json():
    facts = ModelFacts(GROUPS, act_names=["relu", "tanh"], act_kinds={"relu": "relu", "tanh": "tanh"})
    d = Diagnosis(facts, Thresholds(patience=1))
    row = dict.fromkeys(STAT_COLUMNS, 0.0)
    relu = {**row, "dead": 80.0, "positions": 100.0}
    tanh = {**row, "saturated": 90.0, "sat_numel": 100.0}
    summaries = np.array([[r[c] for c in STAT_COLUMNS] for r in (relu, tanh)])
    metrics = {"update_ratio/in": 0.5, "grad_norm/in": 1.0, "update_ratio/out": 1e-9, "grad_norm/out": 1.0}
    found = d.observe(0, metrics, {"activations": summaries})
    assert {(f.kind, f.group) for f in found} == {
        ("dead_units", "relu"), ("saturated_activations", "tanh"), ("update_ratio_high", "in"), ("update_ratio_low", "out"),
    }  # fmt: skip
    report = json.loads(json.dumps(d.to_json(final=True)))
    assert report["health"] == "warning" and report["final"] and len(report["findings"]) == 4
    assert all(f["advice"] and f["evidence"] for f in report["findings"])


def test_a_frozen_layer_between_trainable_ones_is_a_warning_a_frozen_prefix_is_info():
    d = Diagnosis(ModelFacts(GROUPS, frozen=[("backbone", False), ("middle", True)]))
    found = {f.group: f.severity for f in d.observe(0, {}, {})}
    assert found == {"backbone": "info", "middle": "warning"} and d.health == "warning"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(zoo.SCENARIOS))
def test_fault_zoo(name, store):
    scenario = zoo.SCENARIOS[name]
    report = zoo.run(name, store)
    findings = report["findings"]
    if not scenario.expect:
        assert findings == [], f"false alarm on a healthy {name}: {findings}"
        assert report["health"] == "ok"
        return
    for kind, group in scenario.expect:
        matching = [f for f in findings if zoo.matches(f, kind, group)]
        assert matching, f"{name}: expected {kind} at {group}, got {[(f['kind'], f['group']) for f in findings]}"
        assert min(f["first_step"] for f in matching) <= scenario.onset + scenario.within
    unexplained = [f for f in findings if not any(zoo.matches(f, k, g) for k, g in scenario.expect + scenario.also)]
    assert unexplained == []
    assert zoo.score(name, report)["found"] == len(scenario.expect)
    run = mlflow.MlflowClient(store).search_runs([mlflow.MlflowClient(store).get_experiment_by_name("fault-zoo").experiment_id])[0]
    assert run.data.tags["trainwatch.health"] == report["health"] != "ok"
    assert set(run.data.tags["trainwatch.findings"].split(",")) == {f["kind"] for f in findings}
    assert run.data.metrics["train/findings_total"] == len(findings)


class NanAt(torch.autograd.Function):
    """Identity forward; in backward, NaN gradients from the chosen step on (a fault inside one layer's backward)."""

    step = -1
    at = 5

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan if NanAt.step >= NanAt.at else grad


class Planted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = NanAt.apply(torch.relu(self.b(h)))  # NaN enters backward after c, before b
        return self.c(h)


class StepClock(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        NanAt.step = trainer.global_step


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "act_every"), [("warn", None), ("skip_step", None), ("stop", None), ("stop", NanAt.at)]
)  # the last: the stop step's record is open for activations only, and must carry the evidence too
def test_nan_is_located_at_its_step_and_layer_and_on_nonfinite_acts(mode, act_every, store, caplog):
    torch.manual_seed(0)
    train, _ = loaders(blobs(n=256), batch_size=16)
    module = Classifier(Planted(), lr=1e-2)
    watch = TrainWatch(
        every_n_steps=4, tracking_uri=store, system_metrics=False, landscape_samples=0, on_nonfinite=mode,
        activations_every_n_steps=act_every,
    )  # fmt: skip
    t = trainer(max_steps=12, callbacks=[StepClock(), watch])
    t.fit(module, train)
    client = mlflow.MlflowClient(store)
    report = json.loads(Path(client.download_artifacts(watch.run_id, "trainwatch/diagnosis.json", str(Path.cwd()))).read_text())
    nan = next(f for f in report["findings"] if f["kind"] == "nonfinite_gradients")
    assert nan["group"] == "net.b" and nan["evidence"]["first_step"] == NanAt.at
    weights_finite = all(torch.isfinite(p).all() for p in module.parameters())
    if mode == "warn":
        assert t.global_step == 12 and not weights_finite  # warned, not acted on: the NaN step reached the weights
    elif mode == "skip_step":
        assert t.global_step == 12 and weights_finite
        assert client.get_run(watch.run_id).data.metrics["train/nonfinite_steps"] >= 12 - NanAt.at - 4
    else:
        # the step at NanAt.at ran without gradients (Lightning still counts it), then training stopped cleanly
        assert t.global_step == NanAt.at + 1 and weights_finite
        assert client.get_run(watch.run_id).info.status == "FINISHED"
    assert report["final"] and report["health"] == "critical"


class ScalerLog(pl.Callback):
    """Beside TrainWatch (and before it): the loss scale each step's backward used, and whether the step's
    gradients held a NaN/Inf (a step the GradScaler then skips)."""

    def __init__(self) -> None:
        self.scale: dict[int, float] = {}
        self.skipped: dict[int, bool] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        self.scale[step] = trainer.precision_plugin.scaler.get_scale()
        self.skipped[step] = not all(torch.isfinite(p.grad).all() for p in pl_module.parameters() if p.grad is not None)


def _amp_fit(store: str | None, mode: str = "warn", nan_at: int = 10**9) -> tuple[pl.Trainer, Classifier, ScalerLog, TrainWatch | None]:
    """fp16 mixed precision on the CPU with a real GradScaler starting at 2^24, far above what the model's
    gradients allow: its first steps overflow and are skipped, as at the start of AMP runs on GPUs."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    planted, NanAt.at = NanAt.at, nan_at
    train, _ = loaders(blobs(n=256), batch_size=16)
    module, log = Classifier(Planted(), lr=1e-2), ScalerLog()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, backoff_factor=0.125)  # 8x down per skipped step
    watch = (
        TrainWatch(every_n_steps=2, tracking_uri=store, system_metrics=False, landscape_samples=0, report=False, on_nonfinite=mode)
        if store is not None
        else None
    )
    callbacks = [StepClock(), log] + ([watch] if watch is not None else [])
    t = trainer(max_steps=24, callbacks=callbacks, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    try:
        t.fit(module, train)
    finally:
        NanAt.at = planted  # the other tests plant theirs at 5
    return t, module, log, watch


@pytest.mark.slow
def test_the_grad_scalers_skipped_steps_are_counted_not_diagnosed_and_training_is_unchanged(store):
    """A healthy fp16 AMP run: its overflowing first steps are the GradScaler's business (it skips them and lowers
    the scale). They once made a critical nonfinite_gradients finding, update_ratio_low warnings (a skipped step
    moves nothing), and `on_nonfinite="stop"` ended the run at step 0."""
    t, module, log, watch = _amp_fit(store, mode="stop")
    assert t.global_step == 24 and sum(log.skipped.values()) >= 2 and not log.skipped[23]  # it calibrated, then trained
    client = mlflow.MlflowClient(store)
    report = json.loads(Path(client.download_artifacts(watch.run_id, "trainwatch/diagnosis.json", str(Path.cwd()))).read_text())
    assert report["findings"] == [] and report["health"] == "ok"
    scales = {m.step: m.value for m in client.get_metric_history(watch.run_id, "train/loss_scale")}
    assert scales == {s: log.scale[s] for s in range(0, 24, 2)}
    skipped = {m.step: m.value for m in client.get_metric_history(watch.run_id, "train/nonfinite_steps")}
    assert skipped == {s: sum(log.skipped[i] for i in range(s + 1)) for s in range(0, 24, 2)}
    _, bare, _, _ = _amp_fit(None)
    for name, value in bare.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["warn", "stop"])
def test_a_loss_scale_that_keeps_falling_is_a_critical_finding_and_stops_a_stop_run(store, mode):
    """NaN gradients at every step from step 12: the scaler skips each one and the scale falls 8x per step."""
    t, module, log, watch = _amp_fit(store, mode=mode, nan_at=12)
    collapsed = min(s for s in log.scale if s >= 12 and log.scale[s] < 1.0)  # the first NaN step at a scale below 1
    client = mlflow.MlflowClient(store)
    report = json.loads(Path(client.download_artifacts(watch.run_id, "trainwatch/diagnosis.json", str(Path.cwd()))).read_text())
    (finding,) = report["findings"]
    assert (finding["kind"], finding["severity"]) == ("loss_scale_collapse", "critical")
    assert finding["evidence"]["loss_scale"] < 1.0 and finding["first_step"] in (collapsed, collapsed + 1)
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the scaler skipped every NaN step
    if mode == "stop":
        assert t.global_step == collapsed + 1 and client.get_run(watch.run_id).info.status == "FINISHED"
    else:
        assert t.global_step == 24 and finding["group"] == "net.b"  # the deepest group with NaN gradients
