"""TrainWatch: the Lightning callback. It decides *when* (hooks, cadence, rank zero, setup checks, resume state).

No maths (that is `capture` and `probes`) and no MLflow calls (that is the sink, on its own thread).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytorch_lightning as pl
import torch
from mlflow.exceptions import MlflowException
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from typing_extensions import override

from trainwatch._version import __version__
from trainwatch.capture import Capture
from trainwatch.diagnose import Diagnosis, Thresholds, model_facts
from trainwatch.groups import (
    GroupPlan,
    HeldBy,
    Trained,
    activation_modules,
    bind,
    param_modules,
    plan_groups,
    requires_grad,
    resolve_names,
    untrained_subtrees,
    within,
)
from trainwatch.landscape import export
from trainwatch.landscape.compute import LandscapeSpec, batches_of, compute_landscape
from trainwatch.landscape.job import artifacts as landscape_artifacts
from trainwatch.landscape.job import module_loss
from trainwatch.ops import ArtifactOp, MetricsOp, ParamsOp, TagsOp
from trainwatch.probes import dynamics
from trainwatch.probes._scope import preserved_rng
from trainwatch.probes.cam_probe import CamProbe, balanced_probes
from trainwatch.probes.model_inputs import ModelInputs
from trainwatch.probes.nonfinite import NonfiniteWatch
from trainwatch.probes.probe_batch import check_forward, draw_inputs, first_loader
from trainwatch.publish import ARTIFACT_ROOT, TABLES, Publisher, earlier_snapshots, groups_artifact, next_parts
from trainwatch.record import Packer
from trainwatch.report import ARCHITECTURE
from trainwatch.runs import RunStore, artifact_paths
from trainwatch.sink import (
    MlflowSink,
    MlflowWriter,
    Spool,
    absolute_sqlite_uri,
    create_run,
    end_run,
    open_client,
    start_system_metrics,
    tracking_uri_of,
    without_password,
)
from trainwatch.writer_process import ProcessWriter

log = logging.getLogger(__name__)
T = TypeVar("T")
WEIGHTS = "the gradient and weight statistics"  # the measurements `TrainWatch._guarded` can turn off
CAM = "the CAM snapshot"
NONFINITE = "the non-finite gradient check"

ActivationSource = Literal["probe", "live", "off"]
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RESERVED_KEYS = 20  # run-wide keys under train/ (losses, lr, timing, findings) kept out of the per-group budget
SYSTEM_KEYS, SYSTEM_KEYS_PER_GPU = 8, 6  # MLflow's system-metrics monitor: CPU, RAM, disk, network; per GPU
LANDSCAPE_KEYS = 5  # landscape/<name>/...: centre loss, sharpness, three curvatures


def _probe_home(inputs: ModelInputs, device: torch.device) -> ModelInputs:
    """Where the probe batch waits between snapshots: beside a GPU in pinned host memory, each part copied over
    (non-blocking) only while it is forwarded, so the device holds one part, not the whole batch, for the run;
    elsewhere on the device itself."""
    return inputs.map(lambda t: t.cpu().pin_memory() if device.type == "cuda" else t.to(device))


def _like_module(module: nn.Module, inputs: T) -> T:
    """Floating-point inputs (a tensor or ModelInputs) in the module's floating dtype, for the dry runs before training:
    in `setup` Lightning has not yet converted the module (`precision="64-true"`, `"bf16-true"`), nor its batches."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    cast = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return inputs.map(cast) if isinstance(inputs, ModelInputs) else cast(inputs)


def _builds_late(module: pl.LightningModule) -> bool:
    """Whether the module has hooks Lightning calls after the callbacks' `setup`, in which it may build, wrap or
    compile its layers: its own `setup`, `configure_model` (and its older name, `configure_sharded_model`)."""
    return any(is_overridden(hook, module, pl.LightningModule) for hook in ("setup", "configure_model", "configure_sharded_model"))


def _data_sources(trainer: pl.Trainer) -> list[tuple[str, Iterable | None]]:
    """Where probes are drawn from, in order: the first validation loader, then the first training loader."""
    return [("validation data", first_loader(trainer.val_dataloaders)), ("training data", first_loader(trainer.train_dataloader))]


def _held_by(trainer: pl.Trainer) -> frozenset[int]:
    """Ids of the parameters the trainer's optimizers hold (one held twice, or by two optimizers, counts once)."""
    return frozenset(id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"])


def _modules_of(parameter_names: Iterable[str], shown: int = 6) -> str:
    """The modules of some parameters, for a log line: the first `shown` names, and how many more."""
    modules = list(dict.fromkeys(n.rpartition(".")[0] or n for n in parameter_names))
    return ", ".join(modules[:shown]) + (f" and {len(modules) - shown} more modules" if len(modules) > shown else "")


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"`TrainWatch({name}={value!r})` must be a positive integer (steps between logged steps).")


class TrainWatch(pl.Callback):
    """Capture gradients, updates, activations and training dynamics into MLflow while a model trains.

    Args:
        every_n_steps: log every n optimizer steps (at `global_step % n == 0`); default: the trainer's
            `log_every_n_steps`.
        activations: "probe" forwards a fixed probe batch in eval mode; "live" hooks the training forward
            on logged steps; "off" skips activations.
        activations_every_n_steps: cadence of activation snapshots; default `every_n_steps`, but no more often than
            the trainer's `log_every_n_steps` (the first multiple of `every_n_steps` at or above it): a snapshot is
            a forward of the probe batch, a third of a training step or more, so `every_n_steps=1` alone logs
            gradients and updates at every step and activations at the trainer's cadence. Set it to 1 for both.
        probe_batch: inputs for the activation probe; default: the first `probe_samples` validation inputs
            (or training inputs when there is no validation data). Forwarded in parts no larger than the fit's
            first training batch, so the probe never holds activations for more samples than a step does.
        modules: watch only these modules (names or name prefixes from `named_modules()`); default all.
        max_metric_keys: budget of metric keys for the whole run (the MLflow UI slows down with many); the keys
            outside the groups (train/, CAM, system, landscape) are set aside and large models grouped into blocks.
        tracking_uri, experiment_name, run_name: where trainwatch opens its own run when the trainer has no
            `MLFlowLogger` (URI: argument, then MLFLOW_TRACKING_URI, then sqlite:///mlflow.db). A fit resumed from a
            checkpoint (`fit(ckpt_path=...)`) goes on in the checkpoint's run when that run is at the same URI and
            not deleted.
        distance_from_init: keep a copy of the initial weights for `weight_dist_init`, off the training device (in
            pinned host memory beside a GPU, in an unlinked temporary file beside the CPU).
        system_metrics: start MLflow's system-metrics monitor (CPU, RAM, GPU) on the run.
        spool_dir: where records wait on disk while MLflow is unreachable; default `.trainwatch/spool/<run>`.
        writer: "process" runs MLflow's client in a child process, so its Python (SQLAlchemy for a local store)
            never holds the training process's interpreter lock; "thread" runs it in the sink thread (no extra
            process: 170-230 MB less RAM).
        cam_every_n_epochs, cam_every_n_steps: CAM snapshot cadence (off when both are None).
        cam_methods: names from `trainwatch.cam.METHODS`; default ["grad_cam"].
        cam_layer: `named_modules()` name of the CAM layer; default the last module with a spatial output.
        cam_probes: probe inputs (a tensor, with `cam_targets`) or indices into the validation dataset;
            default the first `cam_samples` validation samples, balanced over classes.
        landscape_samples: (input, target) pairs kept with the run for `trainwatch landscape` (the first ones of
            the validation data, else the training data); 0 keeps none. At the end of `fit` the module class and a
            weights-only checkpoint are logged too, so the job needs nothing but the run id.
        landscape_data: explicit (inputs, targets) for the landscape instead of drawing them.
        landscape_at_end: compute the loss landscape (random directions, `landscape_steps` points per axis) in
            this process at the end of `fit` and log it to the run, instead of running `trainwatch landscape` later.
        report: build the run dashboard (`trainwatch/report.html`, see docs/dashboard.md) at the end of `fit`.
        report_every_n_epochs: also rebuild it every n epochs, on a background thread (never the training one).
        diagnose: run the diagnosis rules (docs/diagnosis.md) on every record: `trainwatch/diagnosis.json`, the
            run tags `trainwatch.health` and `trainwatch.findings`, a console warning per new finding.
        diagnosis_thresholds: `trainwatch.diagnose.Thresholds` to change when the rules fire.
        on_nonfinite: "warn" records the first step and layer with a NaN/Inf gradient (no sync); "skip_step" drops
            that step's gradients so the optimizer leaves the weights alone; "stop" also ends training cleanly. The
            last two read one flag per step (one host sync per step). Under fp16 AMP a GradScaler skips such steps
            itself: "skip_step" leaves it to the scaler, and "stop" waits for a loss scale below `min_loss_scale`.
        trajectory_every_n_epochs: log the parameters before training and every n epochs, for landscapes on
            the principal directions of the training path (`trainwatch landscape RUN --directions pca`).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        activations: ActivationSource = "probe",
        activations_every_n_steps: int | None = None,
        probe_batch: Tensor | tuple | list | dict | None = None,
        probe_samples: int = 64,
        modules: list[str] | None = None,
        max_metric_keys: int = 300,
        tracking_uri: str | None = None,
        experiment_name: str = "trainwatch",
        run_name: str | None = None,
        distance_from_init: bool = True,
        system_metrics: bool = True,
        system_metrics_interval_s: float = 10.0,
        spool_dir: str | None = None,
        queue_size: int = 1000,
        writer: Literal["process", "thread"] = "process",
        cam_every_n_epochs: int | None = None,
        cam_every_n_steps: int | None = None,
        cam_methods: list[str] | None = None,
        cam_layer: str | None = None,
        cam_probes: Tensor | list[int] | None = None,
        cam_targets: Tensor | None = None,
        cam_samples: int = 8,
        landscape_samples: int = 512,
        landscape_data: tuple[Tensor, Tensor] | None = None,
        trajectory_every_n_epochs: int | None = None,
        landscape_at_end: bool = False,
        landscape_steps: int = 51,
        report: bool = True,
        report_every_n_epochs: int | None = None,
        diagnose: bool = True,
        diagnosis_thresholds: Thresholds | None = None,
        on_nonfinite: Literal["warn", "skip_step", "stop"] = "warn",
    ) -> None:
        _positive("every_n_steps", every_n_steps)
        _positive("activations_every_n_steps", activations_every_n_steps)
        _positive("probe_samples", probe_samples)
        _positive("queue_size", queue_size)
        _positive("cam_every_n_epochs", cam_every_n_epochs)
        _positive("cam_every_n_steps", cam_every_n_steps)
        _positive("cam_samples", cam_samples)
        _positive("trajectory_every_n_epochs", trajectory_every_n_epochs)
        if isinstance(cam_probes, Tensor) and cam_targets is None:
            raise ValueError("`TrainWatch(cam_probes=<tensor>)` needs `cam_targets=`: one true class index per probe.")
        if writer not in ("process", "thread"):
            raise ValueError(f"`TrainWatch(writer={writer!r})` must be 'process' (MLflow's client in a child process) or 'thread'.")
        if activations not in ("probe", "live", "off"):
            raise ValueError(f"`TrainWatch(activations={activations!r})` must be one of 'probe', 'live', 'off'.")
        try:
            self._given_probe = None if probe_batch is None else ModelInputs.of(probe_batch)
        except ValueError as error:
            raise ValueError(f"`TrainWatch(probe_batch=...)` {error}") from error
        min_keys = RESERVED_KEYS + 11
        if not isinstance(max_metric_keys, int) or max_metric_keys < min_keys:
            raise ValueError(f"`TrainWatch(max_metric_keys={max_metric_keys!r})` must be an integer >= {min_keys}.")
        self.every_n_steps = every_n_steps
        self.activations = activations
        self.activations_every_n_steps = activations_every_n_steps
        self.probe_batch = probe_batch
        self.probe_samples = probe_samples
        self.modules = modules
        self.max_metric_keys = max_metric_keys
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.distance_from_init = distance_from_init
        self.system_metrics = system_metrics
        self.system_metrics_interval_s = system_metrics_interval_s
        self.spool_dir = spool_dir
        self.queue_size = queue_size
        self.writer = writer
        self.cam_every_n_epochs = cam_every_n_epochs
        self.cam_every_n_steps = cam_every_n_steps
        self.cam_methods = list(CamProbe.check_methods(cam_methods or ["grad_cam"]))
        self.cam_layer = cam_layer
        self.cam_probes = cam_probes
        self.cam_targets = cam_targets
        self.cam_samples = cam_samples
        if not isinstance(landscape_samples, int) or landscape_samples < 0:
            raise ValueError(f"`TrainWatch(landscape_samples={landscape_samples!r})` must be an integer >= 0 (0 keeps no data).")
        self.landscape_samples = landscape_samples
        self.landscape_data = landscape_data
        self.trajectory_every_n_epochs = trajectory_every_n_epochs
        self.landscape_at_end = landscape_at_end
        if on_nonfinite not in ("warn", "skip_step", "stop"):
            raise ValueError(f"`TrainWatch(on_nonfinite={on_nonfinite!r})` must be one of 'warn', 'skip_step', 'stop'.")
        self.diagnose, self.diagnosis_thresholds, self.on_nonfinite = diagnose, diagnosis_thresholds, on_nonfinite
        self.report = report
        _positive("report_every_n_epochs", report_every_n_epochs)
        self.report_every_n_epochs = report_every_n_epochs
        self.landscape_spec = LandscapeSpec(steps=landscape_steps) if landscape_at_end else None  # checks the grid now
        self._reset()

    def _reset(self) -> None:
        self.plan: GroupPlan | None = None
        self._trained: Trained = requires_grad  # narrowed to what the optimizers hold at on_fit_start
        self._idle: list[tuple[str, nn.Parameter]] = []  # require grad, held by no optimizer: checked at the first step
        self._held: frozenset[int] | None = None  # ids of what the optimizers held at on_fit_start (None: changed, warned)
        self._landscape_eval: tuple[Tensor, Tensor] | None = None
        self.run_id: str | None = None
        self.sink: MlflowSink | None = None
        self._capture: Capture | None = None
        self._own_run = False
        self._resume_run: dict[str, str] | None = None  # the run of the checkpoint this fit resumes from
        self._resumed = False  # this fit goes on in a run an earlier fit wrote to
        self._uri: str | None = None
        self._client: Any = None
        self._monitor: Any = None
        self._probe_inputs: ModelInputs | None = None
        self._probe_part: int | None = None  # samples per probe forward: the first training batch's size
        self._packer: Packer | None = None
        self._due_step: int | None = None  # the logged optimizer step whose record is open
        self._due_at = 0  # global_step at the start of that step's batch, which the cadence is tested on
        self._batch_at = 0  # global_step at the start of the current batch
        self._live_at: int | None = None  # the batch whose training forward the live hooks summarised
        self._val_values: dict[str, Any] = {}  # what each validation produced: forwarded then, not again at logged steps
        self._metrics_before_eval: dict[str, Any] = {}
        self._throughput = dynamics.Throughput()
        self._status = "FINISHED"
        self._nonfinite: NonfiniteWatch | None = None
        self._publisher: Publisher | None = None
        self._report_thread: threading.Thread | None = None
        self._cam: CamProbe | None = None
        self._off: set[str] = set()  # measurements that raised, off for the rest of the fit
        self._dev_run = False  # `fast_dev_run`: checks only, nothing measured or logged
        self._scaler: torch.amp.GradScaler | None = None  # fp16 AMP's: its skipped steps are not faults
        self._fitted_by: weakref.ref[pl.Trainer] | None = None  # whose validate/test go to our run (weak: no cycle)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (`ddp_spawn` sends the callback to its processes): without the weak reference to a trainer."""
        return {**self.__dict__, "_fitted_by": None}

    @property
    def _cam_on(self) -> bool:
        return self.cam_every_n_epochs is not None or self.cam_every_n_steps is not None

    # --- cadence ----------------------------------------------------------------------------------------
    def _n(self, trainer: pl.Trainer) -> int:
        return self.every_n_steps or trainer.log_every_n_steps

    def _due(self, trainer: pl.Trainer, step: int) -> bool:
        return step % self._n(trainer) == 0

    def _cam_due(self, step: int) -> bool:
        return self._cam is not None and self.cam_every_n_steps is not None and step % self.cam_every_n_steps == 0

    def _act_n(self, trainer: pl.Trainer) -> int:
        if self.activations_every_n_steps is not None:
            return self.activations_every_n_steps
        n = self._n(trainer)
        return n * max(1, -(-trainer.log_every_n_steps // n))  # the first multiple of n at or above log_every_n_steps

    def _act_due(self, trainer: pl.Trainer, step: int) -> bool:
        return self.activations != "off" and step % self._act_n(trainer) == 0

    # --- setup and teardown -----------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset()
        self._dev_run = bool(trainer.fast_dev_run)
        if self._n(trainer) < 1:  # barebones=True or log_every_n_steps=0: the trainer logs nothing, so has no cadence to lend
            raise MisconfigurationException(
                f"`TrainWatch` takes its cadence from the trainer's `log_every_n_steps`, which is {trainer.log_every_n_steps} "
                "here (not a positive number of steps): pass `TrainWatch(every_n_steps=N)`."
            )
        if not _builds_late(pl_module):
            self._check_model(pl_module, dry_runs=True)
        if trainer.is_global_zero and not self._dev_run:
            self._connect(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Plan again, now that the optimizers exist and any callback's `setup` has frozen what it freezes; a module
        that builds its layers after the callbacks' `setup` gets its dry runs only now."""
        self._watch_what_the_optimizers_train(trainer, pl_module)
        self._check_model(pl_module, dry_runs=_builds_late(pl_module))

    def _watch_what_the_optimizers_train(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The parameters trained at the start of the fit: those that require grad now and that an optimizer holds.
        One that requires grad but that no optimizer holds (an EMA copy, a distillation teacher, a target network) is
        not trained by this fit: not watched, where its absent gradients would read as a fault. The optimizers'
        holdings are not applied when they hold none of the module's parameters (DeepSpeed's flattened copies)."""
        held = _held_by(trainer)
        wanted = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        idle = [(n, p) for n, p in wanted if id(p) not in held]
        if idle and len(idle) < len(wanted):
            self._trained, self._idle = HeldBy(held), idle
            if trainer.is_global_zero:
                log.info(
                    "trainwatch: not watching %s: parameters that require grad but that no optimizer holds (not trained by this fit).",
                    _modules_of(n for n, _ in idle),
                )
        self._held = held

    def _check_held(self, trainer: pl.Trainer) -> None:
        """At a logged step on rank zero: whether the optimizers hold other parameters than at the start (a fine-tuning
        schedule unfreezes layers); warned once, since the groups stay those of the start. No sync."""
        held = _held_by(trainer)
        if self._held is not None and held != self._held:
            log.warning(
                "trainwatch: the optimizers now hold %d parameters, %d at the start of the fit (a fine-tuning schedule "
                "unfreezing layers?); TrainWatch watches the layers trained at the start, so the others are not watched.",
                len(held), len(self._held),
            )  # fmt: skip
            self._held = None

    def _check_idle_gradients(self, trainer: pl.Trainer) -> None:
        """At the first optimizer step: parameters no optimizer holds that get gradients all the same are a model
        whose optimizer was given too few parameters (an EMA copy or a teacher gets none). Warned once; no sync."""
        fed, self._idle = [n for n, p in self._idle if p.grad is not None], []
        if fed and trainer.is_global_zero:
            log.warning(
                "trainwatch: %s get gradients, but no optimizer holds their parameters, so they are never trained: pass "
                "them to the optimizer in `configure_optimizers` (or set `requires_grad=False` if they are meant to stay fixed).",
                _modules_of(fed),
            )

    def _check_model(self, pl_module: pl.LightningModule, dry_runs: bool = True) -> None:
        """The model-dependent checks and the group plan, before the first step; with `dry_runs`, a forward of a given
        `probe_batch` and a CAM snapshot of given `cam_probes` (once per fit: in `setup`, or in `on_fit_start` for a
        module that may build, wrap or compile its layers in hooks Lightning calls after the callbacks' `setup`)."""
        # where the weights are: in `setup`, Lightning's `pl_module.device` already names the device they will move to
        device = next((p.device for p in pl_module.parameters()), pl_module.device)
        try:
            self._setup_model(pl_module)
            if dry_runs and self._given_probe is not None:
                check_forward(pl_module, _like_module(pl_module, self._given_probe), "the `probe_batch` argument", device)
            if dry_runs and self._cam_on and isinstance(self.cam_probes, Tensor):
                assert self.cam_targets is not None
                probes = _like_module(pl_module, self.cam_probes).to(device)
                CamProbe.build(pl_module, self.cam_methods, self.cam_layer, probes, self.cam_targets)
        except ValueError as error:
            raise MisconfigurationException(str(error)) from error

    def _setup_model(self, model: pl.LightningModule) -> None:
        lazy = sorted({n.rpartition(".")[0] or n for n, p in model.named_parameters() if is_lazy(p)})
        if lazy:  # a probe forward would initialise them outside the training's random stream: training would change
            raise ValueError(
                f"`TrainWatch` needs the model's parameters before training starts, but {', '.join(lazy)} "
                f"{'has' if len(lazy) == 1 else 'have'} uninitialised (lazy) parameters: initialise them before `fit`, e.g. "
                "by calling the model once on an example batch after building it."
            )
        params, acts = param_modules(model, self._trained), activation_modules(model) if self.activations != "off" else []
        untrained = untrained_subtrees(model, self._trained)
        acts = [a for a in acts if not within(a, untrained)]
        if self.modules is not None:
            wanted = resolve_names(model, self.modules, "modules")
            params, acts = [n for n in params if within(n, wanted)], [n for n in acts if within(n, wanted)]
        if not params and not acts:
            raise ValueError(
                "`TrainWatch` found nothing to watch in the selected `modules`: no parameter there requires grad (or, once "
                "the optimizers exist, none that requires grad is held by one)."
            )
        self.plan = plan_groups(params, acts, self.max_metric_keys, self._reserved_keys(), order=[n for n, _ in model.named_modules()])

    def _reserved_keys(self) -> int:
        """Metric keys outside the per-group families, kept out of the group budget so that the run's total stays
        within `max_metric_keys`: run-wide `train/` keys, CAM keys per probe image, system metrics, the landscape."""
        keys = RESERVED_KEYS
        if self._cam_on:
            probes = len(self.cam_probes) if self.cam_probes is not None else self.cam_samples  # a tensor or indices
            keys += probes * (2 + len(self.cam_methods))  # confidence, true-class probability, raw max per method
        if self.system_metrics:
            keys += SYSTEM_KEYS + SYSTEM_KEYS_PER_GPU * torch.cuda.device_count()
        if self.landscape_at_end:
            keys += LANDSCAPE_KEYS
        return keys

    def _connect(self, trainer: pl.Trainer) -> None:
        """In setup, before training: the MLflow client, checked to answer (an unreachable or refusing server fails
        here), and the logger's run if the trainer has an `MLFlowLogger`."""
        logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        try:
            if logger is not None:
                self._client, self.run_id = logger.experiment, logger.run_id
                self._uri = absolute_sqlite_uri(tracking_uri_of(self._client))
                open_client(self._uri)  # the same reachability check as for our own run
            else:
                self._uri = absolute_sqlite_uri(self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
                self._client = open_client(self._uri)
        except Exception as error:
            raise MisconfigurationException(str(error)) from error

    def _start_run(self, trainer: pl.Trainer) -> None:
        """At the start of training, once Lightning has restored this callback's state from a checkpoint: our own run
        (new, or the resumed checkpoint's), then the spool, the publisher and the sink."""
        uri = self._uri
        assert uri is not None and self.plan is not None
        self._resumed = self.run_id is not None  # the logger's run may hold a first fit
        if self.run_id is None:
            try:
                self.run_id, self._resumed = self._own_run_id(uri)
            except Exception as error:
                raise MisconfigurationException(str(error)) from error
            self._own_run = True
        try:
            self._open_sink(trainer, uri)
        except BaseException:
            if self._own_run and self.sink is None:  # created or reopened above: not left RUNNING
                with contextlib.suppress(Exception):
                    end_run(self._client, self.run_id, "FAILED")
            raise

    def _open_sink(self, trainer: pl.Trainer, uri: str) -> None:
        """The spool (an earlier fit's delivered first), the publisher (its diagnosis and table parts going on from
        an earlier fit's) and the sink, with the run's tags, params and group mapping."""
        assert self.plan is not None and self.run_id is not None
        spool = Spool(Path(self.spool_dir or Path(".trainwatch") / "spool") / self.run_id)
        waiting: list[str] = []  # artifact paths an earlier fit's undelivered ops will still write
        if self._resumed and len(spool):
            waiting = self._deliver_earlier_spool(spool)
        spool.write_meta(uri, self.run_id, report=self.report)
        b = bind(self.plan, trainer.lightning_module, self._trained)
        module = trainer.lightning_module
        facts = model_facts(module, b.param_keys, b.act_names, grad_scaler=self._scaler is not None)
        diagnosis = Diagnosis(facts, self.diagnosis_thresholds) if self.diagnose else None
        if diagnosis is not None and self._resumed and (earlier := self._earlier_diagnosis()) is not None:
            carried = diagnosis.carry(earlier, trainer.global_step)  # the first fit's findings stay in the run's diagnosis
            if carried is not None:
                log.warning("trainwatch: the run's earlier diagnosis.json is not usable (%s); its findings are not carried over.", carried)
        if diagnosis is not None and self._resumed:
            diagnosis.carry_baseline(self._earlier_history("train/grad_norm_total"), trainer.global_step)

        # a fit resumed into a run continues its tables' part numbers instead of overwriting them
        def paths_in(folder: str) -> list[str]:
            return artifact_paths(self._client, self.run_id, folder) + [p for p in waiting if p.startswith(folder + "/")]

        parts = next_parts({t: paths_in(f"{ARTIFACT_ROOT}/{t}") for t in TABLES}) if self._resumed else {}
        publisher = Publisher(list(b.param_names), list(b.act_names), diagnosis=diagnosis, first_parts=parts)
        if self._resumed:  # the histogram image and CAM filmstrips begin with the earlier fit's snapshots
            run, at, names = self.run_id, trainer.global_step, list(b.act_names)
            publisher.go_on_from_read(lambda: earlier_snapshots(RunStore(run, uri), at, names), at)
        self._publisher = publisher
        writer = ProcessWriter(uri, self.run_id) if self.writer == "process" else MlflowWriter(self._client, self.run_id)
        self.sink = MlflowSink(writer, spool, publisher, self.queue_size, describe=f"MLflow at {uri}")
        self.sink.start()
        self.sink.submit(TagsOp((("trainwatch.version", __version__),)))
        params = {f"trainwatch.{k}": str(v) for k, v in self._params(trainer).items()}
        self.sink.submit(ParamsOp(tuple(self._new_params(params).items())))
        self.sink.submit(groups_artifact(self.plan.to_json()))
        if self.system_metrics:
            self._monitor = start_system_metrics(self.run_id, uri, self.system_metrics_interval_s, resume=self._resumed)

    def _deliver_earlier_spool(self, spool: Spool) -> list[str]:
        """Deliver what an earlier fit of this run left in its spool (its server was unreachable), before this fit
        writes anything. What the server still does not take is moved aside, for `trainwatch sync`, with the run's
        end status removed (this fit ends the run); returns the artifact paths it will write, whose part numbers
        this fit must not reuse."""
        writer = MlflowWriter(self._client, self.run_id)
        try:
            spool.replay(writer)
        except Exception as error:  # noqa: BLE001 - the rest stays in the spool
            log.warning("trainwatch: MLflow did not take the earlier fit's spooled operations (%s: %s).", type(error).__name__, error)
        if not len(spool):
            return []
        aside = Spool(spool.directory.with_name(f"{spool.directory.name}-{int(time.time() * 1000)}"))
        spool.directory.rename(aside.directory)
        meta = aside.read_meta()
        aside.write_meta(meta["tracking_uri"], meta["run_id"])
        log.warning(
            "trainwatch: %d operations of an earlier fit of run %s could not be delivered; they wait in %s: deliver them "
            "with `trainwatch sync %s`.", len(aside), self.run_id, aside.directory, aside.directory,
        )  # fmt: skip
        return aside.artifact_paths()

    def _earlier_diagnosis(self) -> dict[str, Any] | None:
        """The run's `diagnosis.json` from an earlier fit, if it has one."""
        try:
            with tempfile.TemporaryDirectory() as tmp:
                return json.loads(Path(self._client.download_artifacts(self.run_id, f"{ARTIFACT_ROOT}/diagnosis.json", tmp)).read_text())
        except (MlflowException, OSError, ValueError):
            return None

    def _earlier_history(self, key: str) -> list[tuple[int, int, float]]:
        """(step, timestamp, value) of a metric the run holds from earlier fits; none if the store does not answer."""
        try:
            return [(m.step, m.timestamp, m.value) for m in self._client.get_metric_history(self.run_id, key)]
        except (MlflowException, OSError, ValueError):
            return []

    def _own_run_id(self, uri: str) -> tuple[str, bool]:
        """(run id, resumed): the run of the checkpoint this fit resumes from, reopened, when it is at this tracking
        URI, in this experiment, not deleted and (with `run_name=`) so named; otherwise a new run, with a warning
        that says why when there was one. A different `experiment_name` or `run_name` thus starts a new run."""
        resume, self._resume_run = self._resume_run, None
        if resume is None:
            return create_run(self._client, self.experiment_name, self.run_name), False
        run_id = resume["run_id"]
        why = self._why_not_continued(resume, uri)
        if why is None:
            self._client.update_run(run_id, status="RUNNING")
            log.info("trainwatch: the resumed fit goes on in run %s.", run_id)
            return run_id, True
        new = create_run(self._client, self.experiment_name, self.run_name)
        log.warning("trainwatch: the checkpoint's run %s is not continued (%s); this fit logs to a new run, %s.", run_id, why, new)
        return new, False

    def _why_not_continued(self, resume: dict[str, str], uri: str) -> str | None:
        """None if the checkpoint's run can go on; else why not."""
        then, now = resume["tracking_uri"], without_password(uri)
        if then != now:
            return f"it was logged to {then!r}, and this fit logs to {now!r}"
        try:
            run = self._client.get_run(resume["run_id"])
            experiment = self._client.get_experiment(run.info.experiment_id).name
        except MlflowException as error:
            return f"{now!r} does not have it ({str(error)[:200]})"
        if run.info.lifecycle_stage != "active":
            return f"it is {run.info.lifecycle_stage} at {now!r}"
        if experiment != self.experiment_name:
            return f"it is in the experiment {experiment!r}, and this TrainWatch logs to {self.experiment_name!r}"
        if self.run_name is not None and run.info.run_name != self.run_name:
            return f"it is named {run.info.run_name!r}, and this TrainWatch names its run {self.run_name!r}"
        return None

    def _new_params(self, params: dict[str, str]) -> dict[str, str]:
        """The params a resumed run does not hold yet. MLflow refuses to change a param: a changed setting (say,
        `every_n_steps`) keeps the first fit's value, with a warning."""
        if not self._resumed:
            return params
        held = self._client.get_run(self.run_id).data.params
        for key in sorted(k for k in params if k in held and held[k] != params[k]):
            log.warning(
                "trainwatch: run %s keeps the param %s=%s of its first fit (MLflow does not change params); this fit uses %s.",
                self.run_id, key, held[key], params[key],
            )  # fmt: skip
        return {k: v for k, v in params.items() if k not in held}

    def _params(self, trainer: pl.Trainer) -> dict[str, Any]:
        return {
            "every_n_steps": self._n(trainer),
            "activations": self.activations,
            "activations_every_n_steps": self._act_n(trainer),
            "max_metric_keys": self.max_metric_keys,
            "grouping": self.plan.to_json()["grouping"] if self.plan else None,
        }

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.plan is not None
        try:  # drawn from the data, which exist only now, and checked before a run is created for them
            if self.activations == "probe" and self._probe_inputs is None:  # not restored from a checkpoint
                self._probe_inputs = self._draw_probe(trainer, pl_module)
            if self._cam_on and trainer.is_global_zero:
                self._cam = self._build_cam(trainer, pl_module)
        except ValueError as error:
            raise MisconfigurationException(str(error)) from error
        if self._dev_run:  # Lightning's loggers log nothing in a development run, and neither does TrainWatch
            self._cam = None
            if trainer.is_global_zero:
                log.info(
                    "trainwatch: `fast_dev_run`: the configuration, the model and the probes are checked; nothing is measured or logged."
                )
            return
        self._scaler = dynamics.grad_scaler(trainer.precision_plugin)
        if self._scaler is not None and trainer.is_global_zero:
            log.info(
                "trainwatch: a GradScaler scales the loss (fp16 mixed precision): steps with NaN/Inf gradients are the ones it "
                "skips, counted in train/nonfinite_steps and not diagnosed as faults; a loss scale that falls below %g is.",
                self._thresholds.min_loss_scale,
            )
        if trainer.is_global_zero:
            with preserved_rng():  # MLflow names a new run with Python's global `random`, which training may draw from
                self._start_run(trainer)
            self._fitted_by = weakref.ref(trainer)
        binding = bind(self.plan, pl_module, self._trained)
        self._capture = Capture(
            binding,
            pl_module.device,
            distance_from_init=self.distance_from_init and trainer.is_global_zero,  # only rank zero measures weights
        )
        if self.distance_from_init and trainer.global_step > 0 and self.sink is not None:
            # the initial weights are not in the checkpoint (a second copy of the model): after a resume,
            # weight_dist_init measures from the weights the fit resumed with, and the run says so
            self.sink.submit(TagsOp((("trainwatch.weight_dist_init_from_step", str(trainer.global_step)),)))
            log.info("trainwatch: resumed at step %d; weight_dist_init measures from the weights at that step.", trainer.global_step)
        if self.diagnose or self.on_nonfinite != "warn":  # every rank: "stop" and "skip_step" act on all of them
            self._nonfinite = NonfiniteWatch(binding.params, self._capture.param_index, len(binding.param_keys), pl_module.device)
        if self._probe_inputs is not None:
            self._probe_inputs = _probe_home(self._probe_inputs, pl_module.device)
        if self._cam is not None:
            self._cam = self._cam.to(pl_module.device)
            self._start_cam(trainer, pl_module)
        if trainer.is_global_zero:
            self._export_eval_data(trainer)
            if self.sink is not None:
                sample = self._probe_inputs.head(2) if self._probe_inputs is not None else None
                self.sink.submit(ArtifactOp(ARCHITECTURE, export.architecture(pl_module, sample, pl_module.device)))
            if self.trajectory_every_n_epochs and trainer.current_epoch == 0:
                self._snapshot_trajectory(pl_module, 0)
        self._throughput = dynamics.Throughput()

    def _snapshot_trajectory(self, pl_module: pl.LightningModule, epochs_done: int) -> None:
        """Parameters for PCA trajectories: one device→host copy per snapshot (once per n epochs)."""
        if self.sink is not None:
            self.sink.submit(ArtifactOp(*export.trajectory_snapshot(pl_module, epochs_done)))

    def _export_eval_data(self, trainer: pl.Trainer) -> None:
        """Ship the landscape's evaluation subset once; a run without one only loses the landscape (a warning)."""
        if self.sink is None or (self.landscape_samples == 0 and self.landscape_data is None):
            return
        try:
            if self.landscape_data is not None:
                source, (inputs, targets) = "`landscape_data`", self.landscape_data
            else:
                source, inputs, targets = export.draw_pairs(_data_sources(trainer), self.landscape_samples)
            self.sink.submit(ArtifactOp(export.EVAL_DATA, export.eval_bytes(inputs, targets, source)))
            self._landscape_eval = (inputs, targets) if self.landscape_at_end else None
        except ValueError as error:
            log.warning("trainwatch: no evaluation data for `trainwatch landscape`: %s", error)

    def _landscape(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The landscape job, in this process, on the trained module and the evaluation subset kept at setup."""
        if self._landscape_eval is None or self.sink is None or self.landscape_spec is None:
            log.warning("trainwatch: landscape_at_end found no evaluation data (see the warning at setup); skipped.")
            return
        spec = self.landscape_spec
        batches = batches_of(*self._landscape_eval, spec.batch_size, pl_module.device)
        # rank zero alone (under DDP the other ranks have no evaluation data and may have left `fit` already)
        landscape = compute_landscape(pl_module, batches, spec, module_loss(pl_module, spec.loss), shard=False)
        for name, data in landscape_artifacts(landscape).items():
            self.sink.submit(ArtifactOp(f"trainwatch/landscape/{spec.name}/{name}", data))
        packer = Packer(trainer.global_step)
        metrics = landscape.metrics(spec.sharpness_radius).items()
        packer.host_metrics.update({f"landscape/{spec.name}/{k}": v for k, v in metrics if math.isfinite(v)})  # as the job does
        self.sink.submit(packer.ship())
        self.sink.submit(
            ParamsOp(tuple(self._new_params({f"landscape/{spec.name}/{k}": str(v) for k, v in spec.settings().items()}).items()))
        )

    def _export_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the module class and a weights-only checkpoint (every rank calls: saving is a collective)."""
        if self.landscape_samples == 0 and self.landscape_data is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "last.ckpt"
            trainer.save_checkpoint(path, weights_only=True)
            if trainer.is_global_zero and self.sink is not None:
                if not export.model_json_importable(pl_module):
                    log.warning(
                        "trainwatch: %s is defined in __main__, so `trainwatch landscape` cannot import it; move it into a module.",
                        export.class_path(pl_module),
                    )
                self.sink.submit(ArtifactOp(export.MODEL_JSON, export.model_json(pl_module)))
                self.sink.submit(ArtifactOp(export.CHECKPOINT, path.read_bytes()))

    def _draw_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ModelInputs:
        """The activation probe's inputs (`probe_batch`, or drawn from the data), as the fit's batches are."""
        source, inputs = (
            ("`probe_batch`", self._given_probe)
            if self._given_probe is not None
            else draw_inputs(_data_sources(trainer), self.probe_samples, pl_module.example_input_array)
        )
        inputs = _like_module(pl_module, inputs.map(trainer.precision_plugin.convert_input))  # as batches ("64-true")
        check_forward(pl_module, inputs, source, pl_module.device)
        return inputs

    def _build_cam(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> CamProbe:
        """The CAM probe set, fixed for the run and validated by one dry snapshot."""
        if isinstance(self.cam_probes, Tensor):
            assert self.cam_targets is not None
            inputs, targets = self.cam_probes, self.cam_targets
        else:
            # not `or`: bool() of a DataLoader calls len(), which a loader of an IterableDataset may not have
            loader = next((found for _, found in _data_sources(trainer) if found is not None), None)
            if self.cam_probes is not None:
                dataset = loader.dataset  # type: ignore[union-attr]
                with preserved_rng():  # a dataset that augments draws from the global RNG
                    pairs = [dataset[i] for i in self.cam_probes]
                inputs, targets = torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs])
            else:
                inputs, targets = balanced_probes(loader if loader is not None else [], self.cam_samples)
        inputs = _like_module(pl_module, trainer.precision_plugin.convert_input(inputs.to(pl_module.device)))
        return CamProbe.build(pl_module, self.cam_methods, self.cam_layer, inputs, targets.to(pl_module.device))

    def _start_cam(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Ship the probe set once; in epoch mode, also the snapshot of the untrained model at step 0."""
        assert self._cam is not None and self.sink is not None
        packer = Packer(trainer.global_step)
        packer.array("cam_inputs", self._cam.inputs)
        packer.array("cam_targets", self._cam.targets)
        if self.cam_every_n_epochs is not None and trainer.global_step == 0:
            self._cam.snapshot(pl_module, packer)
        self.sink.submit(packer.ship())

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._dev_run:
            return
        k = self.report_every_n_epochs
        if k and self.report and self.sink is not None and (trainer.current_epoch + 1) % k == 0:
            self._report_in_background()
        n = self.trajectory_every_n_epochs
        if n and trainer.is_global_zero and (trainer.current_epoch + 1) % n == 0:
            self._snapshot_trajectory(pl_module, trainer.current_epoch + 1)
        if self._cam is None or self.sink is None or self.cam_every_n_epochs is None:
            return
        if (trainer.current_epoch + 1) % self.cam_every_n_epochs == 0:
            packer = Packer(trainer.global_step)
            self._cam.snapshot(pl_module, packer)
            self.sink.submit(packer.ship())

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._status = "KILLED" if isinstance(exception, KeyboardInterrupt) else "FAILED"
        self._finish()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finish()

    def _finish(self) -> None:
        """Remove hooks, deliver everything (or leave it spooled), close our own run. Idempotent."""
        if self._capture is not None:
            self._capture.close()
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        ended_ms = int(time.time() * 1000)  # the run's end time: now, not after the deliveries below
        if self.sink is not None:
            if self._report_thread is not None:
                self._report_thread.join(timeout=300)  # an in-between dashboard finishes before the final one
            self.sink.close()
            if self.report and not len(self.sink.spool):
                self._log_report(final_status=self._status)  # the run ends right after this page is logged
            if self._own_run:
                self._end_own_run(ended_ms)
            self.sink = None

    def _report_in_background(self) -> None:
        """Flush the sink and rebuild the dashboard on a thread of its own; one at a time, skipped while busy."""
        if self._report_thread is not None and self._report_thread.is_alive():
            return
        sink = self.sink

        def build() -> None:
            if sink is not None and sink.flush(timeout=300):
                self._log_report()

        self._report_thread = threading.Thread(target=build, name="trainwatch-report", daemon=True)
        self._report_thread.start()

    def _log_report(self, final_status: str | None = None) -> None:
        """Build the run dashboard from what reached MLflow and log it as trainwatch/report.html."""
        from trainwatch.report import REPORT_PATH, build_report

        try:
            html = build_report([self.run_id], tracking_uri_of(self._client), final_status)  # type: ignore[list-item]
            self._client.log_text(self.run_id, html, REPORT_PATH)
        except Exception as error:  # noqa: BLE001 - the report must never fail a finished training
            log.warning("trainwatch: the run dashboard was not built (%s); `trainwatch report %s` builds it later.", error, self.run_id)

    def _end_own_run(self, ended_ms: int) -> None:
        """End our run with its status, or leave the status in the spool for `trainwatch sync` to set once
        the spooled ops are delivered (also when the server went away after the last op)."""
        assert self.sink is not None
        spool = self.sink.spool
        if not len(spool):
            try:
                end_run(self._client, self.run_id, self._status, ended_ms)
                return
            except Exception as error:  # noqa: BLE001 - any client error: the status must not be lost
                log.warning("trainwatch: could not end run %s (%s); its status waits in %s.", self.run_id, error, spool.directory)
        spool.write_meta(tracking_uri_of(self._client), self.run_id, self._status, ended_ms, report=self.report)
        log.warning("trainwatch: run %s is not complete on the server; deliver it with `trainwatch sync %s`.", self.run_id, spool.directory)

    # --- training hooks ---------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._dev_run:
            return
        samples = dynamics.batch_size(batch)
        self._throughput.add_samples(samples)
        if self._probe_part is None and samples:
            self._probe_part = samples
        self._batch_at = trainer.global_step
        first_micro_batch = batch_idx % trainer.accumulate_grad_batches == 0
        if self.activations == "live" and first_micro_batch and self._act_due(trainer, trainer.global_step):
            assert self._capture is not None
            self._capture.activations.arm(samples or None)
            self._live_at = trainer.global_step

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._capture is not None:
            self._capture.activations.disarm()  # live hooks see the forward only, not checkpoint recomputes

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """Gradients of a logged step. The cadence is tested on the batch's first global_step, so a batch that
        steps several optimizers (each one a global_step) logs all of them or none."""
        if self._dev_run:
            return
        step, at = trainer.global_step, self._batch_at
        if self._idle:
            self._check_idle_gradients(trainer)
        if self._due_step is not None and step > self._due_step:
            self._complete(trainer, pl_module, batch_end=False)  # several optimizers per batch: the previous step is done
        # under a GradScaler, "skip_step" is what the scaler does itself, and "stop" waits for a collapsed loss scale
        acting = self.on_nonfinite == "stop" if self._scaler is not None else self.on_nonfinite != "warn"
        watch = self._nonfinite if (acting or trainer.is_global_zero) else None  # "warn" needs it on rank zero only
        grads_logged, grad_norms = False, None
        if self._due_step != step and (self._due(trainer, at) or self._act_due(trainer, at) or self._cam_due(at)):
            self._due_step, self._due_at = step, at
            if trainer.is_global_zero:
                assert self._capture is not None
                self._check_held(trainer)
                self._packer = Packer(step)
                if self._due(trainer, at):
                    capture, packer = self._capture, self._packer
                    grad_norms = self._guarded(WEIGHTS, step, lambda: capture.gradients(packer))  # the check reuses them
                    grads_logged = True
                    # read now: Lightning steps "step"-interval schedulers before on_train_batch_end
                    self._packer.host_metrics.update(dynamics.learning_rates(trainer.optimizers))
                    scale = dynamics.loss_scale(self._scaler) if self._scaler is not None else None
                    if scale is not None:
                        self._packer.metric("train/loss_scale", scale)
        bad = self._guarded(NONFINITE, step, lambda: watch.check(step, grad_norms)) if watch is not None else None
        if grads_logged and watch is not None:
            assert self._packer is not None
            watch.pack(self._packer)  # after this step's check
        if acting and bad is not None and bool(bad) and not self._scaler_copes():  # the one host sync per step these modes cost
            self._act_on_nonfinite(trainer, step, packed=grads_logged)

    @property
    def _thresholds(self) -> Thresholds:
        return self.diagnosis_thresholds or Thresholds()

    def _scaler_copes(self) -> bool:
        """Whether a GradScaler will skip this step with non-finite gradients and go on at a lower scale: the
        normal overflow of fp16 training, unless the scale it used already fell below `min_loss_scale`."""
        return self._scaler is not None and self._scaler.get_scale() >= self._thresholds.min_loss_scale

    def _act_on_nonfinite(self, trainer: pl.Trainer, step: int, packed: bool) -> None:
        """Skip this optimizer step (and stop, with "stop"). The evidence goes with this step's record, or is shipped
        now when no record is open (`packed`: the logged step's record holds it already)."""
        assert self._nonfinite is not None
        scale = dynamics.loss_scale(self._scaler) if self._scaler is not None else None
        if trainer.is_global_zero and self.sink is not None and not packed:
            packer = self._packer or Packer(step)  # a record open for activations or CAM only, or none
            self._nonfinite.pack(packer)
            if scale is not None:
                packer.metric("train/loss_scale", scale)
            if packer is not self._packer:
                self.sink.submit(packer.ship())
        self._nonfinite.skip_step()
        if self.on_nonfinite == "stop":
            trainer.should_stop = True
            at_scale = f" at a GradScaler loss scale of {float(scale):g}" if scale is not None else ""
            log.error(
                "trainwatch: non-finite gradients at step %d%s; this step was skipped and training stops (on_nonfinite='stop').",
                step, at_scale,
            )  # fmt: skip
        else:
            log.warning("trainwatch: non-finite gradients at step %d; the optimizer step was skipped (on_nonfinite='skip_step').", step)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._capture is not None and self.activations == "live":
            self._capture.activations.disarm()  # a training_step that returned None ran no backward
        if self._due_step is not None and trainer.global_step > self._due_step:
            self._complete(trainer, pl_module, batch_end=True)

    def _complete(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_end: bool) -> None:
        """After the logged optimizer step: updates, activations, CAM and, with the batch's last record, its
        throughput; then hand the record over."""
        at = self._due_at
        self._due_step = None
        capture, packer = self._capture, self._packer
        assert capture is not None
        if packer is not None:
            self._guarded(WEIGHTS, at, lambda: capture.updates(packer))
        if self._act_due(trainer, at):
            reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")
            if self.activations == "probe":
                capture.probe_activations(pl_module, self._probe_inputs, reduce, packer, self._probe_part)
            elif self._live_at == at:  # the batch's one training forward goes with its first optimizer step
                self._live_at = None
                capture.pack_activations(reduce(capture.activations.collect(pl_module.device)), packer)
        if self._cam_due(at) and packer is not None:
            cam = self._cam
            assert cam is not None
            self._guarded(CAM, at, lambda: cam.snapshot(pl_module, packer))
        if packer is None or self.sink is None:
            return
        self._packer = None
        if self._due(trainer, at) and batch_end:  # timing and samples are per batch: measured once it is over
            self._dynamics(trainer, pl_module, packer)
        self.sink.submit(packer.ship())

    def _guarded(self, what: str, step: int, measure: Callable[[], T]) -> T | None:
        """A measurement with no collective inside (the ranks stay in step without it): if it raises, the error and
        its traceback are logged once and that measurement is off for the rest of the fit. A bug in a monitor must
        not stop the training it watches; what was measured so far stays in the run."""
        if what in self._off:
            return None
        try:
            return measure()
        except Exception:
            self._off.add(what)
            log.exception(
                "trainwatch: %s raised an error at step %d and is off for the rest of this fit; training goes on. Please "
                "report the error (traceback below) to the trainwatch issue tracker.", what, step,
            )  # fmt: skip
            return None

    def _dynamics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, packer: Packer) -> None:
        """Throughput since the last logged batch, device memory, and (our own run) the module's training metrics."""
        packer.host_metrics.update(self._throughput.lap(trainer.global_step, trainer.world_size))
        peak = dynamics.peak_memory_mb(pl_module.device)
        if peak is not None:
            packer.host_metrics["train/peak_memory_mb"] = peak
        if self._own_run:  # with an MLFlowLogger, Lightning already logs the module's metrics to this run
            for name, value in trainer.callback_metrics.items():  # skip what the last validation produced, as is
                if value is not self._val_values.get(name) and isinstance(value, Tensor) and value.numel() == 1:
                    packer.metric(name, value)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics_before_eval = dict(trainer.callback_metrics)  # the tensors themselves: compared by identity, no sync

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Forward what this validation produced (our own run only); training metrics go with the logged steps."""
        if trainer.state.fn == "validate":
            self._log_evaluation(trainer)
        if not (self._own_run and self.sink is not None and not trainer.sanity_checking):
            return
        packer = Packer(trainer.global_step)
        for name, value in self._produced(trainer).items():
            self._val_values[name] = value
            packer.metric(name, value)
        self.sink.submit(packer.ship())

    def _produced(self, trainer: pl.Trainer) -> dict[str, Tensor]:
        """The scalar metrics the module logged since `on_validation_start`/`on_test_start` (compared by identity)."""
        before = self._metrics_before_eval
        return {n: v for n, v in trainer.callback_metrics.items() if before.get(n) is not v and isinstance(v, Tensor) and v.numel() == 1}

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics_before_eval = dict(trainer.callback_metrics)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_evaluation(trainer)

    def _log_evaluation(self, trainer: pl.Trainer) -> None:
        """`trainer.validate` or `trainer.test` on the trainer of a fit whose run TrainWatch opened: what the module
        logged goes to that run, at the trainer's `global_step`. Sent now (no training waits)."""
        fitted_by = self._fitted_by() if self._fitted_by is not None else None
        if not (fitted_by is trainer and trainer.is_global_zero and self._own_run and self.sink is None and self.run_id):
            return
        values = {name: float(value) for name, value in self._produced(trainer).items()}
        if not values:
            return
        stamp = int(time.time() * 1000)
        try:
            MlflowWriter(self._client, self.run_id)(MetricsOp(tuple((k, v, stamp, trainer.global_step) for k, v in values.items())))
        except Exception as error:  # noqa: BLE001 - say what was not logged, with the values, rather than fail the evaluation
            stage = getattr(trainer.state.fn, "value", trainer.state.fn)
            log.warning("trainwatch: the %s metrics were not logged to run %s (%s): %s", stage, self.run_id, error, values)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._dev_run:
            return
        if self._publisher is not None:
            self._publisher.final = True
        self._export_model(trainer, pl_module)
        if self.landscape_spec is not None and trainer.is_global_zero:
            self._landscape(trainer, pl_module)
        if self.sink is not None:
            self.sink.flush()

    # --- resume -----------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """The probe batch, and our own run (a resumed fit goes on in it)."""
        state: dict[str, Any] = {"probe_inputs": None if self._probe_inputs is None else self._probe_inputs.state()}
        if self._own_run:
            state["run"] = {"tracking_uri": without_password(self._uri or ""), "run_id": self.run_id}
        elif self._resume_run is not None:  # loaded, not used yet (say, a learning-rate finder saved in between)
            state["run"] = self._resume_run
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed fit forwards the probe batch of the first one (comparable numbers), unless `probe_batch=` is given,
        and goes on in the first one's own run."""
        if self.probe_batch is None:
            self._probe_inputs = ModelInputs.from_state(state_dict.get("probe_inputs"))
        run = state_dict.get("run")
        self._resume_run = run if isinstance(run, dict) and {"run_id", "tracking_uri"} <= run.keys() else None
