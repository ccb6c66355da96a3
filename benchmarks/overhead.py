"""Step-time and memory overhead of training with TrainWatch, against bare training and common alternatives.

Every arm is a real `pl.Trainer.fit` of the same model, from the same seed, on the same batches. The arms of
one model are interleaved in one process (repeat r runs every arm once, in an order rotated by r), so drift
on the machine (other processes, thermal, allocator state) is shared between them.

Arms:
  bare                plain training, no logger
  trainwatch-default  TrainWatch() at the trainer's log_every_n_steps (50), own run in a SQLite store
  trainwatch-every1   TrainWatch(every_n_steps=1): gradients and updates every step, activation snapshots at the
                      trainer's log_every_n_steps (50)
  trainwatch-every1-act1    TrainWatch(every_n_steps=1, activations_every_n_steps=1): activations every step too
                      (not run unless named in --arms)
  trainwatch-every1-actoff  TrainWatch(every_n_steps=1, activations="off") (not run unless named)
  trainwatch-thread, trainwatch-every1-thread  the same with writer="thread": MLflow's client in the sink
                      thread instead of a child process (not run unless named)
  trainwatch-nodiagnose     TrainWatch(diagnose=False): no per-step non-finite check (not run unless named)
  trainwatch-stop           TrainWatch(on_nonfinite="stop"): the per-step check plus one host sync per step (not run unless named)
  naive-mlflow        what users write today: mlflow.log_metric(grad norm) for every parameter, every step,
                      on the training thread, into a SQLite store
  wandb-default       wandb.watch(model, log="all", log_freq=50) in offline mode (+ wandb.log of the loss at
                      those steps, which commits the histograms); wandb's own default log_freq is 1000
  wandb-every1        the same with log_freq=1

Step time is the interval between consecutive `on_train_batch_start` calls (data, forward, backward,
optimizer, every callback hook and the Lightning loop), after `--warmup` discarded steps (they cover the
sink's start-up: the first record and the first histogram image). The measured window of an arm whose work repeats
every 50 steps (the default cadence, and `every_n_steps=1` with its activation snapshots every 50 steps) is a
multiple of 50 steps, so it holds exactly steps/50 of them; arms that do all their work at every step are in
steady state sooner and measure `--per-step-steps` steps after at most 10 warm-up steps. A "logged" step is
one where the arm does its full work (global_step % cadence == 0); "+ms/logged" is its median minus the
bare median (the steps right after a logged step also slow down while the sink thread works: see "mean").

CPU time: `time.process_time()` per step, all threads of this process (the training thread, trainwatch's
sink thread, MLflow's SQLite writes); it is far less sensitive than wall time to other processes on a
shared machine. wandb's writer is a separate process (wandb-core), so its CPU is not counted.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` above what was allocated at `on_train_start`; on CPU,
the peak resident set size above the RSS at `on_train_start` (the kernel's VmHWM, reset through
/proc/self/clear_refs after malloc_trim, so freed memory does not hide new allocations). The watched minus
bare difference is the extra memory; on CPU it is noisy at the MB level.

Run: .venv/bin/python benchmarks/overhead.py [--models small-cnn resnet18] [--steps N] [--repeats R]
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytorch_lightning as pl
import torch
from _models import MODELS, Batches, loader, n_parameters

from trainwatch import TrainWatch

ALL_ARMS = (
    "bare", "trainwatch-default", "trainwatch-every1", "trainwatch-every1-act1", "trainwatch-every1-actoff", "trainwatch-nodiagnose", "trainwatch-stop",
    "trainwatch-thread", "trainwatch-every1-thread",
    "naive-mlflow", "wandb-default", "wandb-every1",
)  # fmt: skip
OPT_IN_ARMS = (
    "trainwatch-every1-act1",
    "trainwatch-every1-actoff",
    "trainwatch-nodiagnose",
    "trainwatch-stop",
    "trainwatch-thread",
    "trainwatch-every1-thread",
)  # run only when named in --arms
DEFAULT_ARMS = tuple(a for a in ALL_ARMS if a not in OPT_IN_ARMS)
LOG_EVERY_N_STEPS = 50
DEFAULT_STEPS = {"small-cnn": 250, "resnet18": 50}  # measured steps: a multiple of 50, so the window holds steps/50 logged steps
PER_STEP_WARMUP = 10
DEFAULT_WARMUP = {"small-cnn": 50, "resnet18": 25}  # discarded steps: the sink's start-up (first record, first image render)


# --- measurement ------------------------------------------------------------------------------------------
def _rss_kb() -> int:
    return psutil.Process().memory_info().rss // 1024


def _hwm_kb() -> int | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
        return int(match.group(1)) if match else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def writer_process_usage() -> tuple[float, float] | None:
    """(CPU seconds so far, peak RSS MB) of trainwatch's writer child process, if one runs: its work is not in
    this process's CPU time or RSS, so it is reported beside them."""
    for child in psutil.Process().children(recursive=True):
        try:
            if "trainwatch.writer_process" in " ".join(child.cmdline()):
                cpu = child.cpu_times()
                status = Path(f"/proc/{child.pid}/status").read_text()
                hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
                return cpu.user + cpu.system, hwm / 1024
        except (psutil.Error, OSError):
            continue
    return None


class StepTimer(pl.Callback):
    """Put first in `callbacks`: its `on_train_start` runs before any other callback allocates memory."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.cpu_marks: list[float] = []  # process CPU time (all threads of this process)
        self.peak_mb: float | None = None
        self.writer: tuple[float, float] | None = None  # the writer process's (CPU s, peak MB) at the end
        self._base = 0
        self._cuda = False
        self._hwm_ok = False

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for callback in trainer.callbacks:  # measure the steady state: trainwatch's writer process is up
            ready = getattr(getattr(getattr(callback, "sink", None), "_deliver_op", None), "ready", None)
            if ready is not None:
                ready.wait(60)
        self._cuda = pl_module.device.type == "cuda"
        self.marks, self.cpu_marks = [], []
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._hwm_ok = _reset_hwm()
            self._base = _rss_kb()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync()
        self.marks.append(time.perf_counter())
        self.cpu_marks.append(time.process_time())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync()
        self.writer = writer_process_usage()
        if self._cuda:
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            hwm = _hwm_kb() if self._hwm_ok else None
            self.peak_mb = None if hwm is None else (hwm - self._base) / 1024

    def step_times(self) -> list[float]:
        """Seconds per step i (from batch i's start to batch i+1's start); the last batch has no interval."""
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]

    def cpu_times(self) -> list[float]:
        return [b - a for a, b in zip(self.cpu_marks, self.cpu_marks[1:], strict=False)]


# --- the alternatives -------------------------------------------------------------------------------------
class NaiveGradNorms(pl.Callback):
    """`mlflow.log_metric(f"grad_norm/{name}", p.grad.norm().item())` for every parameter, every step."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_experiment("naive")
        mlflow.start_run()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        import mlflow

        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                mlflow.log_metric(f"grad_norm/{name}", p.grad.norm().item(), step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import mlflow

        mlflow.end_run()


class WandbWatch(pl.Callback):
    """`wandb.watch(model, log="all", log_freq=n)` offline, with `wandb.log` of the loss every n steps (which
    commits the gradient/parameter histograms the watch hooks computed)."""

    def __init__(self, directory: str, log_freq: int) -> None:
        self.directory, self.log_freq = directory, log_freq

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import wandb

        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True, save_code=False)
        wandb.init(project="trainwatch-bench", mode="offline", dir=self.directory, settings=settings)
        wandb.watch(pl_module, log="all", log_freq=self.log_freq)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        import wandb

        step = trainer.global_step - 1
        if step % self.log_freq == 0:
            wandb.log({"train_loss": float(outputs["loss"])}, step=step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import wandb

        wandb.unwatch(pl_module)
        wandb.finish()


def wandb_available() -> str | None:
    """None if wandb imports, else the reason it does not."""
    try:
        import wandb  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"
    return None


@dataclass
class Arm:
    name: str
    cadence: int | None  # steps between logged steps, None for bare
    make: Callable[[Path], list[pl.Callback]]
    period: int | None = None  # steps after which the arm's work repeats (its longest cadence); default `cadence`

    def __post_init__(self) -> None:
        self.period = self.period or self.cadence


def arms(tmp: Path) -> dict[str, Arm]:
    def tw(every: int | None, activations: str = "probe", **extra: Any) -> Callable[[Path], list[pl.Callback]]:
        uri = f"sqlite:///{tmp}/tw-{every or 'default'}-{activations}-{'-'.join(map(str, extra.values()))}.db"
        return lambda d: [
            TrainWatch(
                every_n_steps=every, activations=activations, tracking_uri=uri, system_metrics=False, spool_dir=str(d / "spool"), **extra
            )
        ]

    return {
        "bare": Arm("bare", None, lambda d: []),
        "trainwatch-default": Arm("trainwatch-default", LOG_EVERY_N_STEPS, tw(None)),
        "trainwatch-every1": Arm("trainwatch-every1", 1, tw(1), period=LOG_EVERY_N_STEPS),  # activations every 50 steps
        "trainwatch-every1-act1": Arm("trainwatch-every1-act1", 1, tw(1, activations_every_n_steps=1)),
        "trainwatch-every1-actoff": Arm("trainwatch-every1-actoff", 1, tw(1, "off")),
        "trainwatch-thread": Arm("trainwatch-thread", LOG_EVERY_N_STEPS, tw(None, writer="thread")),
        "trainwatch-every1-thread": Arm("trainwatch-every1-thread", 1, tw(1, writer="thread"), period=LOG_EVERY_N_STEPS),
        "trainwatch-nodiagnose": Arm("trainwatch-nodiagnose", LOG_EVERY_N_STEPS, tw(None, diagnose=False)),
        "trainwatch-stop": Arm("trainwatch-stop", LOG_EVERY_N_STEPS, tw(None, on_nonfinite="stop")),
        "naive-mlflow": Arm("naive-mlflow", 1, lambda d: [NaiveGradNorms(f"sqlite:///{tmp}/naive.db")]),
        "wandb-default": Arm("wandb-default", LOG_EVERY_N_STEPS, lambda d: [WandbWatch(str(d), LOG_EVERY_N_STEPS)]),
        "wandb-every1": Arm("wandb-every1", 1, lambda d: [WandbWatch(str(d), 1)]),
    }


# --- one training -----------------------------------------------------------------------------------------
@dataclass
class Result:
    steps: list[list[float]] = field(default_factory=list)  # per repeat: measured step times (s)
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per measured step, all repeats
    logged: list[float] = field(default_factory=list)  # measured step times of logged steps, all repeats
    outside_s: list[float] = field(default_factory=list)  # fit wall time outside the timed step intervals
    peak_mb: list[float] = field(default_factory=list)
    writer: list[tuple[float, float, int]] = field(default_factory=list)  # writer process: CPU s, peak MB, steps of that fit


def fit_once(
    model_name: str, data: Batches, max_steps: int, arm: Arm, workdir: Path, accelerator: str, seed: int
) -> tuple[StepTimer, float]:
    make_module = MODELS[model_name][0]
    workdir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, verbose=False)
    module = make_module()
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=max_steps,
        max_epochs=1,
        logger=False,
        callbacks=[timer, *arm.make(workdir)],
        log_every_n_steps=LOG_EVERY_N_STEPS,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=str(workdir),
    )
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader(data))
    return timer, time.perf_counter() - t0


def window(arm: Arm, steps: int, warmup: int, per_step_steps: int) -> tuple[int, int]:
    """(warm-up, measured) steps of an arm: arms that do all their work at every step are in steady state sooner
    and need fewer steps for a stable median."""
    if arm.period == 1:
        return min(warmup, PER_STEP_WARMUP), min(steps, per_step_steps)
    return warmup, steps


def run_model(model_name: str, arm_names: list[str], args: argparse.Namespace, accelerator: str, tmp: Path) -> dict[str, Result]:
    _, shape, batch_size = MODELS[model_name]
    steps = args.steps or DEFAULT_STEPS[model_name]
    warmup = DEFAULT_WARMUP[model_name] if args.warmup is None else args.warmup
    data = Batches(warmup + steps + 1, batch_size, shape, classes=10, seed=args.seed)  # +1: the last batch has no interval
    table = arms(tmp)
    # An untimed bare training first, so one-time costs (kernel selection, lazy imports) hit no arm.
    fit_once(model_name, data, min(len(data), 10), table["bare"], tmp / f"{model_name}-warm", accelerator, args.seed)
    results = {a: Result() for a in arm_names}
    for r in range(args.repeats):
        order = arm_names[r % len(arm_names) :] + arm_names[: r % len(arm_names)]
        for a in order:
            workdir = tmp / f"{model_name}-{a}-{r}"
            skip, n = window(table[a], steps, warmup, args.per_step_steps)
            timer, fit_s = fit_once(model_name, data, skip + n + 1, table[a], workdir, accelerator, args.seed)
            times = timer.step_times()
            measured = times[skip : skip + n]
            res = results[a]
            res.steps.append(measured)
            res.cpu += timer.cpu_times()[skip : skip + n]
            cadence = table[a].cadence
            if cadence is not None:
                res.logged += [t for i, t in enumerate(times[: skip + n]) if i >= skip and i % cadence == 0]
            res.outside_s.append(fit_s - sum(times))
            if timer.peak_mb is not None:
                res.peak_mb.append(timer.peak_mb)
            if timer.writer is not None:
                res.writer.append((*timer.writer, len(times) + 1))
            print(
                f"  [{model_name} r{r}] {a:<24} median {1000 * statistics.median(measured):8.2f} ms  "
                f"mean {1000 * statistics.fmean(measured):8.2f} ms  fit {fit_s:6.1f} s",
                flush=True,
            )
    return results


# --- report -----------------------------------------------------------------------------------------------
def _ms(x: float) -> str:
    return f"{1000 * x:.2f}"


def report(model_name: str, results: dict[str, Result]) -> list[str]:
    bare = results["bare"]
    bare_all = [t for rep in bare.steps for t in rep]
    bare_med, bare_mean = statistics.median(bare_all), statistics.fmean(bare_all)
    bare_cpu = statistics.fmean(bare.cpu)
    bare_peak = statistics.median(bare.peak_mb) if bare.peak_mb else None
    header = (
        f"{'model':<10} {'arm':<24} {'median ms':>10} {'mean ms':>9} {'logged ms':>10} {'+ms/logged':>11} {'x median':>9} "
        f"{'x mean':>7} {'x mean/rep':>11} {'cpu ms':>8} {'x cpu':>6} {'outside s':>10} {'peak MB':>8} {'extra MB':>9}"
    )
    print()
    print(header)
    print("-" * len(header))
    headlines: list[str] = []
    writer_lines: list[str] = []
    for a, res in results.items():
        steps = [t for rep in res.steps for t in rep]
        med, mean = statistics.median(steps), statistics.fmean(steps)
        per_rep = [statistics.fmean(w) / statistics.fmean(b) for w, b in zip(res.steps, bare.steps, strict=True)]
        logged, added = ("-", "-")
        if res.logged:
            logged_med = statistics.median(res.logged)
            logged, added = _ms(logged_med), f"{1000 * (logged_med - bare_med):+.2f}"
        peak = statistics.median(res.peak_mb) if res.peak_mb else None
        extra = "-" if peak is None or bare_peak is None or a == "bare" else f"{peak - bare_peak:+.1f}"
        peak_s = "-" if peak is None else f"{peak:.1f}"
        spread = f"{min(per_rep):.2f}-{max(per_rep):.2f}"
        outside = statistics.median(res.outside_s)
        cpu = statistics.fmean(res.cpu)
        print(
            f"{model_name:<10} {a:<24} {_ms(med):>10} {_ms(mean):>9} {logged:>10} {added:>11} {med / bare_med:>8.2f}x "
            f"{mean / bare_mean:>6.2f}x {spread:>11} {_ms(cpu):>8} {cpu / bare_cpu:>5.2f}x {outside:>10.2f} {peak_s:>8} {extra:>9}"
        )
        if res.writer:
            cpu_s = statistics.fmean(w[0] for w in res.writer)
            fit_steps = statistics.fmean(w[2] for w in res.writer)
            writer_lines.append(
                f"  {a}: writer process {cpu_s:.2f} s CPU per fit of {fit_steps:.0f} steps (its start-up included), "
                f"peak RSS {statistics.median(w[1] for w in res.writer):.0f} MB; not in 'cpu ms' or 'peak MB'"
            )
        if a != "bare":
            headlines.append(
                f"overhead {model_name} {a}: {mean / bare_mean:.2f}x (mean step time; median step {med / bare_med:.2f}x, "
                f"process CPU per step {cpu / bare_cpu:.2f}x)"
            )
    for line in writer_lines:
        print(line)
    return headlines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--arms", nargs="+", choices=ALL_ARMS, default=list(DEFAULT_ARMS), help="'bare' is always run")
    parser.add_argument("--steps", type=int, default=None, help=f"measured steps per training, after warm-up (default {DEFAULT_STEPS})")
    parser.add_argument(
        "--per-step-steps", type=int, default=20, help="measured steps of the arms that log every step (after at most 10 warm-up steps)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="trainings per arm, interleaved")
    parser.add_argument("--warmup", type=int, default=None, help=f"steps discarded at the start of each run (default {DEFAULT_WARMUP})")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: CPU cores - 1, at least 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    arm_names = ["bare"] + [a for a in args.arms if a != "bare"]
    if any(a.startswith("wandb") for a in arm_names):
        missing = wandb_available()
        if missing:
            print(f"wandb arms skipped: wandb is not importable ({missing})")
            arm_names = [a for a in arm_names if not a.startswith("wandb")]
        else:
            os.environ["WANDB_MODE"] = "offline"
            os.environ.setdefault("WANDB_SILENT", "true")

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    device = torch.cuda.get_device_name() if accelerator == "cuda" else f"CPU, {os.cpu_count()} cores, {threads} torch thread(s)"
    print(f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, python {sys.version.split()[0]}; device: {device}")
    print(f"arms: {', '.join(arm_names)}; repeats {args.repeats}; load average {os.getloadavg()}")

    headlines: list[str] = []
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="trainwatch-bench-") as tmp:
        # MLflow's SQLite stores put artifacts under ./mlruns by default: keep them in the temporary directory.
        os.chdir(tmp)
        try:
            headlines += run_all(args, arm_names, accelerator, Path(tmp))
        finally:
            os.chdir(cwd)
    print(f"\nload average at the end {os.getloadavg()}")
    print("\n".join(headlines))


def run_all(args: argparse.Namespace, arm_names: list[str], accelerator: str, tmp: Path) -> list[str]:
    headlines: list[str] = []
    for model_name in args.models:
        steps = args.steps or DEFAULT_STEPS[model_name]
        warmup = DEFAULT_WARMUP[model_name] if args.warmup is None else args.warmup
        n_tensors, n_params = n_parameters(MODELS[model_name][0]())
        print(
            f"\n{model_name}: {n_tensors} parameter tensors, {n_params / 1e6:.2f}M parameters, batch {MODELS[model_name][2]}; "
            f"{steps} measured steps after {warmup} warm-up steps "
            f"(per-step arms: {min(steps, args.per_step_steps)} after {min(warmup, PER_STEP_WARMUP)})"
        )
        results = run_model(model_name, arm_names, args, accelerator, tmp)
        headlines += report(model_name, results)
    return headlines


if __name__ == "__main__":
    main()
