"""Diagnosis: rules that turn captured numbers into findings a user can act on.

Pure and host-side: `Diagnosis.observe(step, metrics, arrays)` reads the numbers of one Record (the metric keys
of docs/metrics.md and the per-module activation summaries), keeps a little state per rule, and returns the
findings that appeared for the first time. No tensors, no MLflow; the sink's thread calls it. Thresholds live in
`Thresholds` and are justified in docs/diagnosis.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from trainwatch.probes.activations import STAT_COLUMNS

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
KINDS = (
    "vanishing_gradients",
    "exploding_gradients",
    "nonfinite_gradients",
    "nonfinite_loss",
    "loss_scale_collapse",
    "no_gradient",
    "dead_units",
    "saturated_activations",
    "update_ratio_high",
    "update_ratio_low",
)
# Conditions of the whole model: their patience counts records whatever group they name, and they are one finding
# each (named after the group at the first record), so a worst layer that changes does not restart the count.
MODEL_WIDE = ("vanishing_gradients", "exploding_gradients", "loss_scale_collapse")
# The rules each kind of record input feeds: a streak breaks only on a record that fed its rule and did not hit
# (a record of activations alone says nothing about gradients).
FED_BY = {
    "grad_norm/": ("vanishing_gradients", "exploding_gradients", "no_gradient"),
    "update_ratio/": ("update_ratio_high", "update_ratio_low"),
}


@dataclass(frozen=True)
class Thresholds:
    """When a rule fires; see docs/diagnosis.md for why each default is what it is."""

    vanishing_ratio: float = 1e-4  # grad norm of the input-side group / the output-side group
    exploding_factor: float = 100.0  # total grad norm / its median over the first `baseline_records` records
    exploding_norm: float = 1e4  # or an absolute total grad norm
    baseline_records: int = 5
    dead_fraction: float = 0.5  # ReLU-family outputs: fraction of units that never fire on the probe batch
    saturated_fraction: float = 0.5  # tanh/sigmoid outputs beyond 0.99 (tanh) or outside [0.01, 0.99]
    update_ratio_high: float = 0.1  # ‖Δw‖/‖w‖ of one step; the usual healthy range is around 1e-3
    update_ratio_low: float = 1e-7
    min_loss_scale: float = 1.0  # a GradScaler's loss scale below this: gradients overflow even unscaled
    patience: int = 3  # consecutive records a condition must hold (non-finite values: 1)

    def __post_init__(self) -> None:
        if self.patience < 1 or self.baseline_records < 1:
            raise ValueError("Thresholds: patience and baseline_records must be >= 1")


ADVICE = {
    "vanishing_gradients": "gradients shrink toward the input: add normalisation (BatchNorm/LayerNorm) or residual connections, "
    "prefer ReLU-family activations to sigmoid/tanh in deep stacks, check the initialisation (Kaiming/Xavier).",
    "exploding_gradients": "lower the learning rate, clip gradients (Trainer(gradient_clip_val=1.0)), check the initialisation scale "
    "and add normalisation.",
    "nonfinite_gradients": "a NaN/Inf appeared in backward at this layer: lower the learning rate, clip gradients, check for log(0), "
    "division by zero or sqrt of negatives, and use bf16 or a GradScaler with fp16.",
    "loss_scale_collapse": "the GradScaler keeps skipping steps: the gradients are NaN/Inf even at this loss scale, so this is no "
    "fp16 overflow it can absorb and the weights no longer change: look for a NaN/Inf source in the forward or the loss (log(0), "
    "division by zero, sqrt at 0 or of negatives), lower the learning rate, or train in bf16.",
    "nonfinite_loss": "the loss is NaN/Inf: check the data for NaN/Inf, the loss for log(0) or division by zero, and lower the learning rate.",
    "no_gradient": "this trainable layer gets no gradient: look for a .detach(), torch.no_grad() or .data in the forward, an unused "
    "branch, or requires_grad=False set by mistake.",
    "dead_units": "ReLU units that never fire get no gradient: lower the learning rate, check for a large negative bias, use "
    "LeakyReLU/GELU or normalisation before the activation.",
    "saturated_activations": "tanh/sigmoid outputs are pinned at their limits, so their gradients vanish: normalise or scale the "
    "inputs, add normalisation before the activation, lower the initialisation scale.",
    "update_ratio_high": "each step changes the weights by more than 10% of their norm: the learning rate is likely too high.",
    "update_ratio_low": "the weights barely move: the learning rate is likely too low, or the gradients vanish.",
}


@dataclass
class Finding:
    kind: str
    severity: str
    group: str
    first_step: int
    last_step: int
    evidence: dict[str, object] = field(default_factory=dict)
    advice: str = ""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ModelFacts:
    """What the rules need to know about the model, fixed at setup."""

    param_groups: Sequence[str]  # in forward (definition) order
    act_names: Sequence[str] = ()  # watched activation modules, rows of the activation summaries
    act_kinds: Mapping[str, str] = field(default_factory=dict)  # module name -> "relu" | "tanh" | "sigmoid"
    # modules whose parameters all have requires_grad=False, and whether trainable modules come both before and
    # after them (a frozen layer in the middle is likely a mistake; a frozen prefix, a backbone, likely deliberate)
    frozen: Sequence[tuple[str, bool]] = ()
    loss_keys_hint: str = "loss"  # metric keys containing this are losses
    # a GradScaler scales the loss (fp16 AMP): a step with NaN/Inf gradients is one it skips, not a fault
    grad_scaler: bool = False


class Diagnosis:
    """Online rules over the Records of one run."""

    def __init__(self, facts: ModelFacts, thresholds: Thresholds | None = None) -> None:
        self.facts, self.t = facts, thresholds or Thresholds()
        self.findings: dict[tuple[str, str], Finding] = {}
        self._streak: dict[tuple[str, str], int] = {}
        self._since: dict[tuple[str, str], int] = {}  # the step of each streak's first record
        self._norms: list[float] = []
        self._frozen_seen = False

    # --- driver -----------------------------------------------------------------------------------------------
    def observe(self, step: int, metrics: Mapping[str, float], arrays: Mapping[str, np.ndarray] | None = None) -> list[Finding]:
        """Apply every rule to one record; returns the findings seen for the first time."""
        arrays = arrays or {}
        hits: list[tuple[str, str, str, dict[str, object], int]] = []  # kind, severity, group, evidence, patience
        hits += self._nonfinite(metrics, arrays)
        hits += self._gradient_flow(metrics)
        hits += self._updates(metrics)
        hits += self._activations(arrays)
        if not self._frozen_seen:
            self._frozen_seen = True
            for module, sandwiched in self.facts.frozen:
                evidence = {"requires_grad": False, "between_trainable_layers": sandwiched}
                hits.append(("no_gradient", "warning" if sandwiched else "info", module, evidence, 1))
        fresh = []
        seen_now = set()
        for kind, severity, group, evidence, patience in hits:
            key = (kind, "") if kind in MODEL_WIDE else (kind, group)
            if key in seen_now:
                continue
            seen_now.add(key)
            self._streak[key] = self._streak.get(key, 0) + 1
            if self._streak[key] == 1:
                self._since[key] = step
            if key in self.findings:
                finding = self.findings[key]
                finding.last_step = step
                finding.evidence = {**evidence, "records": self._streak[key]}
            elif self._streak[key] >= patience:
                # from the record that began the streak; a non-finite gradient knows the exact optimizer step
                first = int(evidence.get("first_step", self._since[key]))  # type: ignore[call-overload]
                finding = Finding(kind, severity, group, first, step, {**evidence, "records": self._streak[key]}, ADVICE[kind])
                self.findings[key] = finding
                fresh.append(finding)
        fed = self._fed(metrics, arrays)
        for key in list(self._streak):
            if key not in seen_now and key[0] in fed:
                self._streak[key] = 0
        return fresh

    def carry(self, report: object, before_step: int) -> str | None:
        """Take over the findings of an earlier fit of this run (its `diagnosis.json`) that began before
        `before_step`, the step a resumed fit starts at: a finding of the first fit stays in the run's diagnosis,
        and the same finding seen again extends it. Streaks start afresh. Returns what was wrong with `report`
        when it is not a diagnosis (nothing is taken over then), else None."""
        items = report.get("findings") if isinstance(report, dict) else None
        if not isinstance(items, list):
            return "no list of findings"
        carried = []
        for item in items:
            try:
                finding = Finding(
                    kind=str(item["kind"]), severity=str(item["severity"]), group=str(item["group"]),
                    first_step=int(item["first_step"]), last_step=int(item["last_step"]),
                    evidence=dict(item.get("evidence") or {}), advice=str(item.get("advice") or ""),
                )  # fmt: skip
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                return f"a finding without a valid {error}"
            if finding.kind not in KINDS or finding.severity not in SEVERITY_RANK:
                return f"a finding of unknown kind or severity: {finding.kind!r}, {finding.severity!r}"
            if finding.first_step < before_step:
                finding.last_step = min(finding.last_step, before_step - 1)  # later steps were logged by a fit now undone
                carried.append(finding)
        for finding in carried:
            key = (finding.kind, "") if finding.kind in MODEL_WIDE else (finding.kind, finding.group)
            self.findings.setdefault(key, finding)
        return None

    def carry_baseline(self, history: Sequence[tuple[int, int, float]], before_step: int) -> None:
        """Take the exploding rule's baseline from an earlier fit of this run: the first finite records of
        `train/grad_norm_total` before `before_step` (`history`: (step, timestamp, value); of a step logged twice,
        by a fit and a later resumed one, the later value), so that a resumed fit goes on comparing with the start
        of the run, not with its own first records (which may have grown already)."""
        latest: dict[int, tuple[int, float]] = {}
        for step, timestamp, value in history:
            if step < before_step and (step not in latest or timestamp >= latest[step][0]):
                latest[step] = (timestamp, value)
        finite = [value for _, (_, value) in sorted(latest.items()) if math.isfinite(value)]
        self._norms = finite[: self.t.baseline_records]

    @staticmethod
    def _fed(metrics: Mapping[str, float], arrays: Mapping[str, np.ndarray]) -> set[str]:
        """The kinds whose rules this record had numbers for."""
        kinds = {kind for prefix, fed in FED_BY.items() if any(k.startswith(prefix) for k in metrics) for kind in fed}
        if "activations" in arrays:
            kinds |= {"dead_units", "saturated_activations"}
        return kinds | {"nonfinite_gradients", "nonfinite_loss", "loss_scale_collapse"}

    @property
    def health(self) -> str:
        worst = max((SEVERITY_RANK[f.severity] for f in self.findings.values()), default=0)
        return {0: "ok", 1: "warning", 2: "critical"}[worst]

    def to_json(self, final: bool) -> dict[str, object]:
        items = sorted(self.findings.values(), key=lambda f: (-SEVERITY_RANK[f.severity], f.first_step, f.kind, f.group))
        baseline = {"grad_norm_total_median": float(np.median(self._norms)) if self._norms else None, "records": len(self._norms)}
        return {
            "health": self.health, "final": final, "thresholds": asdict(self.t), "exploding_baseline": baseline,
            "findings": [f.to_json() for f in items],
        }  # fmt: skip

    def counts(self) -> dict[str, float]:
        """`train/findings/<kind>` counts (groups with that finding) and `train/findings_total`."""
        out = {f"train/findings/{kind}": 0.0 for kind in KINDS}
        for finding in self.findings.values():
            out[f"train/findings/{finding.kind}"] += 1
        out["train/findings_total"] = float(len(self.findings))
        return out

    # --- rules ------------------------------------------------------------------------------------------------
    def _nonfinite(self, metrics: Mapping[str, float], arrays: Mapping[str, np.ndarray]) -> list:
        hits = []
        for key, value in metrics.items():
            if self.facts.loss_keys_hint in key and key.split("/", 1)[0] not in ("grad_norm", "landscape") and not math.isfinite(value):
                hits.append(("nonfinite_loss", "critical", key, {"value": value}, 1))
        if self.facts.grad_scaler:  # its calibration overflows are skipped steps; a scale that keeps falling is not
            scale = metrics.get("train/loss_scale")
            if scale is not None and scale < self.t.min_loss_scale:
                flagged = _flagged_groups(metrics, self.facts.param_groups)
                evidence = {
                    "loss_scale": scale,
                    "threshold": self.t.min_loss_scale,
                    "nonfinite_steps": metrics.get("train/nonfinite_steps"),
                }
                hits.append(("loss_scale_collapse", "critical", flagged[-1] if flagged else "model", evidence, 1))
            return hits
        origin = _nonfinite_origin(metrics, arrays, self.facts.param_groups)
        if origin is not None:
            group, evidence = origin
            hits.append(("nonfinite_gradients", "critical", group, evidence, 1))
        return hits

    def _gradient_flow(self, metrics: Mapping[str, float]) -> list:
        norms = [(g, metrics.get(f"grad_norm/{g}")) for g in self.facts.param_groups]
        norms = [(g, v) for g, v in norms if v is not None]
        hits = [("no_gradient", "warning", g, {"grad_norm": 0.0}, self.t.patience) for g, v in norms if v == 0.0]
        flowing = [(g, v) for g, v in norms if v is not None and math.isfinite(v) and v > 0]
        if len(flowing) >= 2:
            (first, g_in), (last, g_out) = flowing[0], flowing[-1]
            ratio = g_in / g_out
            if ratio < self.t.vanishing_ratio:
                # the deepest group (nearest the output) whose gradient is already below the threshold
                onset = next(g for g, v in reversed(flowing) if v / g_out < self.t.vanishing_ratio)
                evidence = {"ratio_input_to_output": ratio, "threshold": self.t.vanishing_ratio, first: g_in, last: g_out}
                hits.append(("vanishing_gradients", "warning", onset, evidence, self.t.patience))
        total = metrics.get("train/grad_norm_total")
        if total is not None and math.isfinite(total):
            if len(self._norms) < self.t.baseline_records:
                self._norms.append(total)
            baseline = float(np.median(self._norms))
            grown = len(self._norms) >= self.t.baseline_records and total > self.t.exploding_factor * baseline
            if total > self.t.exploding_norm or grown:
                worst = max(flowing, key=lambda gv: gv[1], default=("model", total))[0]
                evidence = {"grad_norm_total": total, "baseline_median": baseline, "factor": self.t.exploding_factor}
                # above the absolute bound once is enough (the next record is often NaN already); growth must persist
                hits.append(("exploding_gradients", "critical", worst, evidence, 1 if total > self.t.exploding_norm else 2))
        return hits

    def _updates(self, metrics: Mapping[str, float]) -> list:
        if metrics.get("train/grad_nonfinite_total", 0.0) != 0.0:  # a step skipped (GradScaler, "skip_step") or gone NaN
            return []  # says nothing about the learning rate
        hits = []
        for g in self.facts.param_groups:
            ratio = metrics.get(f"update_ratio/{g}")
            if ratio is None or not math.isfinite(ratio) or metrics.get(f"grad_norm/{g}") == 0.0:
                continue
            if ratio > self.t.update_ratio_high:
                hits.append(
                    ("update_ratio_high", "warning", g, {"update_ratio": ratio, "threshold": self.t.update_ratio_high}, self.t.patience)
                )
            elif ratio < self.t.update_ratio_low:
                hits.append(
                    ("update_ratio_low", "warning", g, {"update_ratio": ratio, "threshold": self.t.update_ratio_low}, self.t.patience)
                )
        return hits

    def _activations(self, arrays: Mapping[str, np.ndarray]) -> list:
        summaries = arrays.get("activations")
        if summaries is None or len(summaries) != len(self.facts.act_names):
            return []
        col = {c: i for i, c in enumerate(STAT_COLUMNS)}
        hits = []
        for name, row in zip(self.facts.act_names, summaries, strict=True):
            kind = self.facts.act_kinds.get(name)
            if kind == "relu" and row[col["positions"]] > 0:
                dead = row[col["dead"]] / row[col["positions"]]
                if dead > self.t.dead_fraction:
                    hits.append(
                        ("dead_units", "warning", name, {"dead_fraction": float(dead), "threshold": self.t.dead_fraction}, self.t.patience)
                    )
            if kind in ("tanh", "sigmoid") and row[col["sat_numel"]] > 0:
                saturated = row[col["saturated"]] / row[col["sat_numel"]]
                if saturated > self.t.saturated_fraction:
                    evidence = {"saturated_fraction": float(saturated), "threshold": self.t.saturated_fraction}
                    hits.append(("saturated_activations", "warning", name, evidence, self.t.patience))
        return hits


def _nonfinite_origin(metrics: Mapping[str, float], arrays: Mapping[str, np.ndarray], groups: Sequence[str]) -> tuple[str, dict] | None:
    """Where backward first produced a NaN/Inf: the flagged group nearest the output (backward runs from the
    output side, so the deepest flagged group is where it started), at the first step it was seen."""
    flags = arrays.get("nonfinite_first_groups")
    first = float(arrays["nonfinite_first_step"][0]) if "nonfinite_first_step" in arrays else -1.0
    if flags is not None and first >= 0 and flags.any():
        flagged = [g for g, f in zip(groups, flags, strict=False) if f]
        return flagged[-1], {"first_step": int(first), "groups_nonfinite_at_onset": flagged[-8:]}
    flagged = _flagged_groups(metrics, groups)
    if flagged:
        return flagged[-1], {"groups_nonfinite": flagged[-8:], "count": metrics.get(f"grad_nonfinite/{flagged[-1]}")}
    return None


def _flagged_groups(metrics: Mapping[str, float], groups: Sequence[str]) -> list[str]:
    """The groups (in forward order) with NaN/Inf gradient entries in this record."""
    return [g for g in groups if (metrics.get(f"grad_nonfinite/{g}") or 0.0) > 0]


def model_facts(model: object, param_groups: Sequence[str], act_names: Sequence[str], grad_scaler: bool = False) -> ModelFacts:
    """ModelFacts from a module: activation kinds of the watched modules and frozen parameter modules."""
    from torch import nn

    from trainwatch.probes.activations import saturation_kind

    modules = dict(model.named_modules())  # type: ignore[attr-defined]
    relu = (nn.ReLU, nn.ReLU6)
    kinds = {}
    for name in act_names:
        module = modules.get(name)
        kind = "relu" if isinstance(module, relu) else saturation_kind(module) if module is not None else None
        if kind:
            kinds[name] = kind
    owners = [(n, [p.requires_grad for p in m.parameters(recurse=False)]) for n, m in modules.items()]
    owners = [(n, flags) for n, flags in owners if flags]
    trainable = [i for i, (_, flags) in enumerate(owners) if any(flags)]
    frozen = [(n, bool(trainable) and trainable[0] < i < trainable[-1]) for i, (n, flags) in enumerate(owners) if not any(flags)]
    return ModelFacts(list(param_groups), list(act_names), kinds, frozen, grad_scaler=grad_scaler)
