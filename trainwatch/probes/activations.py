"""Activation statistics and fixed-bin histograms per module, computed on the device.

The functional core reduces one activation tensor to a fixed-length vector (no min/max, no host sync);
`ActivationProbe` arms forward hooks on chosen modules and collects those vectors. No MLflow, no `.item()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

# Log-spaced magnitude edges, 4 per decade from 1e-6 to 1e4: wide enough for activations of any sane
# network, fixed so that histograms from different steps (and ranks) add up bin by bin.
EDGES = torch.logspace(-6, 4, 41, dtype=torch.float64)

# Columns of a module's summary vector; the histogram counts follow them.
STAT_COLUMNS = ("numel", "finite", "sum", "sumsq", "zeros", "sat_numel", "saturated", "nonfinite", "dead", "positions")

DEAD, POSITIONS = STAT_COLUMNS.index("dead"), STAT_COLUMNS.index("positions")

SATURATING = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Hardtanh: "tanh", nn.Hardsigmoid: "sigmoid"}


def histogram_labels(edges: Tensor = EDGES) -> list[str]:
    """Human-readable names of the histogram slots, in `histogram_counts` order."""
    e = [f"{v:.0e}" for v in edges.tolist()]
    mags = [f"<={e[0]}"] + [f"({e[i]},{e[i + 1]}]" for i in range(len(e) - 1)] + [f">{e[-1]}"]
    return [f"-{m}" for m in reversed(mags)] + ["0"] + [f"+{m}" for m in mags] + ["nan", "+inf", "-inf"]


def num_bins(edges: Tensor = EDGES) -> int:
    """Slots of a histogram: 2·(E+1) signed magnitude bins, the exact zero, then NaN, +Inf and −Inf."""
    return 2 * (len(edges) + 1) + 1 + 3


def histogram_counts(x: Tensor, edges: Tensor = EDGES) -> Tensor:
    """Counts of `x` in signed log-magnitude bins plus explicit zero/NaN/±Inf slots; sums to `x.numel()`.

    Bin index: zero at Z = E+1; a finite non-zero value of magnitude in bin m sits at Z±(1+m).
    """
    x = x.detach().reshape(-1)
    e = len(edges)
    zero_slot = e + 1
    mag = torch.bucketize(x.abs().to(edges.dtype), _on_device(edges, x.device))
    idx = torch.where(x > 0, zero_slot + 1 + mag, zero_slot - 1 - mag)
    idx = torch.where(x == 0, zero_slot, idx)
    nan_slot = 2 * zero_slot + 1
    idx = torch.where(x.isnan(), nan_slot, idx)
    idx = torch.where(x == float("inf"), nan_slot + 1, idx)
    idx = torch.where(x == float("-inf"), nan_slot + 2, idx)
    n = num_bins(edges)
    return torch.histc(idx.to(torch.float32), bins=n, min=0, max=n).to(torch.float64)


_EDGES_ON: dict[tuple[int, torch.device], Tensor] = {}


def _on_device(edges: Tensor, device: torch.device) -> Tensor:
    """`edges` on `device`, copied once (a host→device copy per call would synchronise on CUDA)."""
    key = (id(edges), device)
    if key not in _EDGES_ON:
        _EDGES_ON[key] = edges.to(device)
    return _EDGES_ON[key]


def saturation_mask(x: Tensor, kind: str) -> Tensor:
    """Where a tanh output is beyond ±0.99 or a sigmoid output outside [0.01, 0.99]."""
    if kind == "tanh":
        return x.abs() > 0.99
    if kind == "sigmoid":
        return (x < 0.01) | (x > 0.99)
    raise ValueError(f"saturation kind must be 'tanh' or 'sigmoid', got {kind!r}")


def activation_summary(x: Tensor, kind: str | None = None, edges: Tensor = EDGES) -> Tensor:
    """One float64 vector: STAT_COLUMNS then the histogram counts. Counts add across batches and ranks.

    `dead` counts per-sample positions (all dims but the batch) that are exactly zero for every sample:
    a unit that never fires on the probe batch.
    """
    x = x.detach()
    f64 = torch.float64
    const = lambda v: torch.full((), float(v), dtype=f64, device=x.device)  # a fill kernel, not a copy
    finite = x.isfinite()
    clean = torch.where(finite, x, 0).to(f64)
    zeros = (x == 0).sum()
    if x.dim() >= 2:
        positions = x[0].numel()
        dead = (~(x != 0).reshape(x.shape[0], -1).any(0)).sum()
    else:
        positions, dead = x.numel(), (x == 0).sum()
    if kind is None:
        sat_numel, saturated = const(0), const(0)
    else:
        sat_numel, saturated = const(x.numel()), saturation_mask(x, kind).sum()
    stats = torch.stack(
        [
            const(x.numel()),
            finite.sum().to(f64),
            clean.sum(),
            clean.square().sum(),
            zeros.to(f64),
            sat_numel,
            saturated.to(f64),
            (x.numel() - finite.sum()).to(f64),
            dead.to(f64),
            const(positions),
        ]
    )
    return torch.cat([stats, histogram_counts(x, edges)])


def pool_summaries(summaries: Tensor, group_index: Tensor, num_groups: int) -> dict[str, Tensor]:
    """Pool module summary vectors [M, K] into per-group activation metrics (mean, std, zero and saturated
    fractions over all elements of the group's modules)."""
    col = {name: i for i, name in enumerate(STAT_COLUMNS)}
    pooled = torch.zeros(num_groups, summaries.shape[1], dtype=summaries.dtype, device=summaries.device)
    pooled.index_add_(0, group_index, summaries)
    finite = pooled[:, col["finite"]].clamp_min(1)
    mean = pooled[:, col["sum"]] / finite
    var = (pooled[:, col["sumsq"]] / finite - mean.square()).clamp_min(0)
    return {
        "act_mean": mean,
        "act_std": var.sqrt(),
        "act_zero_frac": pooled[:, col["zeros"]] / pooled[:, col["numel"]].clamp_min(1),
        "act_saturated_frac": pooled[:, col["saturated"]] / pooled[:, col["sat_numel"]].clamp_min(1),
    }


def first_tensor(output: object) -> Tensor | None:
    """The activation a module produced: the output itself, or the first tensor of a tuple (e.g. LSTM)."""
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    return None


def saturation_kind(module: nn.Module) -> str | None:
    for cls, kind in SATURATING.items():
        if isinstance(module, cls):
            return kind
    return None


class ActivationProbe:
    """Forward hooks on a fixed list of modules; each firing adds the module's summary to a buffer.

    Hooks are registered by `arm()` and removed by `disarm()`; summaries accumulate across micro-batches.
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        self.names = [name for name, _ in modules]
        self._modules = [module for _, module in modules]
        self._kinds = [saturation_kind(m) for m in self._modules]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._buffer: list[Tensor | None] = [None] * len(self._modules)

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        if self.armed:
            return
        for i, module in enumerate(self._modules):
            self._handles.append(module.register_forward_hook(self._hook(i)))

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, i: int):
        def hook(module: nn.Module, args: object, output: object) -> None:
            x = first_tensor(output)
            if x is None:
                return
            with torch.no_grad():
                summary = activation_summary(x, self._kinds[i])
            prev = self._buffer[i]
            if prev is not None:
                # A module that fires twice (shared, or over micro-batches): counts add, but a position is
                # dead only if dead both times, so min() of the two dead counts is the tightest bound we keep.
                dead = torch.minimum(prev[DEAD], summary[DEAD])
                summary = prev + summary
                summary[DEAD], summary[POSITIONS] = dead, prev[POSITIONS]
            self._buffer[i] = summary

        return hook

    def collect(self, device: torch.device) -> Tensor:
        """Summaries [M, K] of everything seen since the last collect (zeros for modules that did not fire)."""
        width = len(STAT_COLUMNS) + num_bins()
        rows = [b if b is not None else torch.zeros(width, dtype=torch.float64, device=device) for b in self._buffer]
        self._buffer = [None] * len(self._modules)
        return torch.stack([r.to(device) for r in rows])
