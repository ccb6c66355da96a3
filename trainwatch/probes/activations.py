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

    Slot layout (see `histogram_labels`): negative magnitudes from the largest down, the exact zero at E+1,
    positive magnitudes from the smallest up, then NaN, +Inf, −Inf. A magnitude v is in bin m = #{edges < v}.
    Values are binned as float32 (float64 values are rounded to float32 first).
    """
    return _histogram_from_bits(x.detach().reshape(-1).to(torch.float32).view(torch.int32), edges)


def _histogram_from_bits(bits: Tensor, edges: Tensor) -> Tensor:
    """Bin search by table lookup on the float's top 13 bits (sign, 8 exponent and 4 mantissa bits: 8192 cells,
    each holding at most one edge) and one comparison with that edge: exact, all int32, no host sync, and about
    four passes over the data (a logarithm or `torch.bucketize` is several times slower on the CPU).

    The comparison is on the raw bits read as int32: within one sign, larger magnitudes have larger bits (for
    negative floats too, as both sides carry the sign bit). Each element lands in fine slot 2·cell + above;
    a 16384-slot count folds into the public slots through a fixed map.
    """
    threshold, fold = _cell_tables(edges, bits.device)
    cell = torch.bitwise_right_shift(bits, _CELL_SHIFT).bitwise_and_(_CELLS - 1)
    above = torch.gt(bits, torch.index_select(threshold, 0, cell))
    fine = cell.add_(cell).add_(above)
    if fine.device.type == "cpu":  # bincount is ~4x faster than histc on CPU but synchronises on CUDA
        counts = torch.bincount(fine, minlength=2 * _CELLS)  # int64
    elif torch.are_deterministic_algorithms_enabled():  # histc has no deterministic CUDA kernel: it would raise
        counts = _indexed_counts(fine, 2 * _CELLS)
    else:
        counts = _histc_counts(fine, 2 * _CELLS)
    folded = torch.zeros(num_bins(edges), dtype=counts.dtype, device=bits.device).index_add_(0, fold, counts)
    return folded.to(torch.float64)


def _histc_counts(slots: Tensor, n: int, chunk: int = 1 << 24) -> Tensor:
    """Exact float64 counts of the integers 0..n-1 in `slots`, without a host sync (`torch.bincount` on CUDA
    reads the input's max first). `histc` counts in float32, exact only up to 2^24 per bin, so it sees at most
    that many elements per call: ReLU outputs of a large probe batch put more than half of them in one bin."""
    counts = torch.zeros(n, dtype=torch.float64, device=slots.device)
    for part in slots.split(chunk):
        counts += torch.histc(part.to(torch.float32), bins=n, min=0, max=n)
    return counts


def _indexed_counts(slots: Tensor, n: int, chunk: int = 1 << 22) -> Tensor:
    """Exact int64 counts of the integers 0..n-1 in `slots` by `index_add_`, without a host sync, for deterministic
    mode (`torch.use_deterministic_algorithms`, Lightning's `deterministic=True`), in which `histc` raises on CUDA and
    `index_add_` runs a slower, deterministic kernel. In parts: the ones it adds are an int32 tensor as long as a part."""
    counts = torch.zeros(n, dtype=torch.int64, device=slots.device)
    ones = torch.ones(min(chunk, slots.numel()), dtype=torch.int32, device=slots.device)
    for part in slots.split(chunk):
        counts += torch.zeros(n, dtype=torch.int32, device=slots.device).index_add_(0, part, ones[: len(part)])
    return counts


_CELL_SHIFT = 19  # bits >> 19: 13 bits, the sign, the 8 exponent bits and the top 4 mantissa bits
_CELLS = 1 << (32 - _CELL_SHIFT)
_TABLES: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}


def _public_slot(negative: bool, k: int, n_edges: int) -> int:
    """Public slot of magnitude class k (0: zero, 1+m: magnitude bin m, E+2: Inf, E+3: NaN) with a sign."""
    if k == 0:
        return n_edges + 1
    if k <= n_edges + 1:
        return n_edges - (k - 1) if negative else n_edges + 1 + k
    if k == n_edges + 2:
        return 2 * n_edges + 5 if negative else 2 * n_edges + 4
    return 2 * n_edges + 3


def _cell_tables(edges: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per signed cell, the int32 bits of the edge inside it (never exceeded where it holds none); and the public
    slot of each fine slot 2·cell + above.

    Edge e is compared as the largest float32 ≤ e, so that `v > e` holds in float32 exactly when it holds in
    float64. Built once per edges and device (a host→device copy per call would synchronise on CUDA)."""
    key = (id(edges), device)
    if key not in _TABLES:
        n_edges, half = len(edges), _CELLS // 2
        e32 = edges.to(torch.float32)
        e32 = torch.where(e32.double() > edges.double(), torch.nextafter(e32, torch.zeros_like(e32)), e32)
        edge_bits = e32.view(torch.int32).long()  # ascending, at most one per cell (cells are 6 % wide, edges 78 %)
        low = torch.arange(half, dtype=torch.long) << _CELL_SHIFT
        below = torch.searchsorted(edge_bits, low)  # edges below the cell; the next one may lie inside it
        candidate = edge_bits[below.clamp(max=n_edges - 1)]
        never = (1 << 31) - 1
        inside = (below < n_edges) & (candidate < low + (1 << _CELL_SHIFT))
        edge_in = torch.where(inside, candidate, never)  # magnitude bits of the edge
        base = 1 + below  # k of the cell's lowest magnitude
        base[0], edge_in[0] = 0, 0  # the zero cell: ±0 is k=0; subnormals (bits above it) are magnitude bin 0
        inf_cell = 0x7F800000 >> _CELL_SHIFT
        base[inf_cell], edge_in[inf_cell] = n_edges + 2, 0x7F800000  # Inf; NaN bits lie above it
        base[inf_cell + 1 :], edge_in[inf_cell + 1 :] = n_edges + 3, never  # NaN only
        # Negative cells (sign bit set: the upper half) compare against the edge's bits with the sign bit set,
        # read as int32 (magnitude − 2^31); their "never" is −1, above every negative float's bits.
        threshold = torch.cat([edge_in, torch.where(edge_in == never, -1, edge_in - (1 << 31))])
        fold = [
            _public_slot(cell >= half, min(int(base[cell % half]) + above, n_edges + 3), n_edges)
            for cell in range(_CELLS)
            for above in (0, 1)
        ]
        _TABLES[key] = (threshold.to(torch.int32).to(device), torch.tensor(fold, dtype=torch.long).to(device))
    return _TABLES[key]


def saturation_mask(x: Tensor, kind: str) -> Tensor:
    """Where a tanh output is beyond ±0.99 or a sigmoid output outside [0.01, 0.99]."""
    if kind == "tanh":
        return x.abs() > 0.99
    if kind == "sigmoid":
        return (x < 0.01) | (x > 0.99)
    raise ValueError(f"saturation kind must be 'tanh' or 'sigmoid', got {kind!r}")


SUMMARY_CHUNK_NUMEL = 1 << 18  # elements per pass of a summary: its int32 temporaries stay near 2.5 MB


def activation_summary(x: Tensor, kind: str | None = None, edges: Tensor = EDGES) -> Tensor:
    """One float64 vector: STAT_COLUMNS then the histogram counts. Counts add across batches and ranks.

    `dead` counts per-sample positions (all dims but the batch) that are exactly zero for every sample:
    a unit that never fires on the probe batch. Sums are float32 reductions (pairwise, ~1e-6 relative) kept
    as float64; the zero, NaN and Inf counts come from the histogram rather than from extra passes.
    """
    return summary_and_fired(x, kind, edges)[0]


def summary_and_fired(x: Tensor, kind: str | None = None, edges: Tensor = EDGES, batch_dim: int = 0) -> tuple[Tensor, Tensor | None]:
    """`activation_summary`, and for a batch (2+ dims) the per-position mask of units that fired (non-zero, or
    NaN, for some sample): masks of several batches of the same activation OR together, so that the dead units of
    a probe forwarded in parts are those of the whole probe (`with_units` counts them).

    The tensor is summarised a run of samples at a time, at most `SUMMARY_CHUNK_NUMEL` elements each, so the
    temporaries (about 2.25 bytes per byte of float32 activation, converted a run at a time) stay small whatever
    the activation's size. `batch_dim`: where the samples are (1 for a sequence-first RNN or transformer output).
    """
    x = x.detach()
    f64 = torch.float64
    batched = x.dim() >= 2 and x.shape[batch_dim] > 0
    if batched and batch_dim:
        x = x.movedim(batch_dim, 0)  # a view: the units are every position but the sample's
    if x.numel() <= SUMMARY_CHUNK_NUMEL:
        parts: Sequence[Tensor] = [x]
    else:
        parts = x.split(max(1, SUMMARY_CHUNK_NUMEL // max(1, x[0].numel()))) if batched else x.reshape(-1).split(SUMMARY_CHUNK_NUMEL)
    acc: list[Tensor] = []  # counts, non-finite count, sum, sum of squares[, saturated], added over the parts
    fired = None
    for part in parts:
        part = part.to(torch.float32)  # float16/bfloat16/float64: converted a run at a time
        bits = part.view(torch.int32)
        counts = _histogram_from_bits(bits.reshape(-1), edges)
        nonfinite = counts[num_bins(edges) - 3 :].sum()
        # On the CPU reading a count costs no sync: a clean part (the usual case) skips the NaN/Inf-free copy.
        dirty = part.device.type != "cpu" or bool(nonfinite)
        clean = torch.nan_to_num(part, nan=0.0, posinf=0.0, neginf=0.0) if dirty else part
        values = [counts, nonfinite, clean.sum().to(f64), torch.linalg.vector_norm(clean).to(f64).square()]
        if kind is not None:
            values.append(saturation_mask(part, kind).sum().to(f64))
        acc = values if not acc else [a + v for a, v in zip(acc, values, strict=True)]
        if batched:
            part_fired = (bits & 0x7FFFFFFF).amax(0) != 0  # magnitude bits, ordered like |x|: a NaN fires too
            fired = part_fired if fired is None else fired.logical_or_(part_fired)
    counts, nonfinite, total, squares = acc[:4]
    zeros = counts[len(edges) + 1]
    n = x.numel()
    const = lambda v: torch.full((), float(v), dtype=f64, device=x.device)  # a fill kernel, not a copy
    dead, positions = (fired.numel() - fired.sum().to(f64), const(fired.numel())) if fired is not None else (zeros, const(n))
    sat_numel, saturated = (const(n), acc[4]) if kind is not None else (const(0), const(0))
    stats = torch.stack([const(n), const(n) - nonfinite, total, squares, zeros, sat_numel, saturated, nonfinite, dead, positions])
    return torch.cat([stats, counts]), fired


_DEAD, _POSITIONS = STAT_COLUMNS.index("dead"), STAT_COLUMNS.index("positions")


def with_units(summary: Tensor, fired: Sequence[Tensor]) -> Tensor:
    """`summary` with its unit columns recounted from fired-masks: their positions, and those that never fired as
    dead (the summaries of several passes add their dead units pass by pass; the masks say which fired in any)."""
    out = summary.clone()
    out[_POSITIONS] = sum(mask.numel() for mask in fired)
    out[_DEAD] = sum(mask.numel() - mask.sum().to(summary.dtype) for mask in fired)
    return out


def pool_summaries(summaries: Tensor, group_index: Tensor, num_groups: int) -> dict[str, Tensor]:
    """Pool module summary vectors [M, K] into per-group activation metrics (mean, std, zero and saturated
    fractions over all elements of the group's modules). Mean and std are over the finite outputs: NaN where
    there are outputs but none is finite (weights gone NaN), not a 0 that would read as a quiet layer."""
    col = {name: i for i, name in enumerate(STAT_COLUMNS)}
    pooled = torch.zeros(num_groups, summaries.shape[1], dtype=summaries.dtype, device=summaries.device)
    pooled.index_add_(0, group_index, summaries)
    finite = pooled[:, col["finite"]]
    finite = torch.where((finite == 0) & (pooled[:, col["numel"]] > 0), torch.nan, finite.clamp_min(1))
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
    """ "tanh" or "sigmoid" for the saturating activations (hard variants included), else None."""
    if isinstance(module, nn.ReLU6):  # a Hardtanh subclass in torch, but a ReLU: 0.99 means nothing to it
        return None
    for cls, kind in SATURATING.items():
        if isinstance(module, cls):
            return kind
    return None


class ActivationProbe:
    """Forward hooks on a fixed list of modules; each firing adds the module's summary to a buffer.

    `arm(samples)` starts a pass (one forward of that many samples) and registers the hooks, `disarm()` removes
    them. Summaries add over the passes until `collect`; so do fired units, matched by the order of a module's
    firings within a pass, so that a probe batch forwarded in parts counts the dead units of the whole batch. An
    output whose first dimension is not the `samples` of the pass but whose second is (a sequence-first LSTM or
    transformer layer) has its samples there.
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        self.names = [name for name, _ in modules]
        self._modules = [module for _, module in modules]
        self._kinds = [saturation_kind(m) for m in self._modules]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._buffer: list[Tensor | None] = [None] * len(self._modules)
        self._fired: list[dict[tuple, Tensor]] = [{} for _ in self._modules]  # (firing in the pass, shape) -> mask
        self._firings = [0] * len(self._modules)
        self._passes = 0
        self._samples: int | None = None

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self, samples: int | None = None) -> None:
        if self.armed:
            return
        self._samples = samples
        self._firings = [0] * len(self._modules)
        self._passes += 1
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
            samples_second = x.dim() >= 3 and self._samples not in (None, x.shape[0]) and x.shape[1] == self._samples
            with torch.no_grad():
                summary, fired = summary_and_fired(x, self._kinds[i], batch_dim=1 if samples_second else 0)
            prev = self._buffer[i]
            # A module that fires several times in one forward (one ReLU instance reused after several convs, a
            # cell in a loop) sees a different activation each time: every column adds, dead units and positions
            # too, so dead / positions is the dead fraction over all of its outputs.
            self._buffer[i] = summary if prev is None else prev + summary
            if fired is not None:
                key = (self._firings[i], tuple(fired.shape))
                seen = self._fired[i].get(key)
                self._fired[i][key] = fired if seen is None else seen.logical_or_(fired)
            self._firings[i] += 1

        return hook

    def collect(self, device: torch.device) -> Tensor:
        """Summaries [M, K] of everything seen since the last collect (zeros for modules that did not fire)."""
        width = len(STAT_COLUMNS) + num_bins()
        rows = []
        for buffer, fired in zip(self._buffer, self._fired, strict=True):
            row = buffer if buffer is not None else torch.zeros(width, dtype=torch.float64, device=device)
            if self._passes > 1 and fired:  # one pass: its summaries already count its units
                row = with_units(row, list(fired.values()))
            rows.append(row.to(device))
        self._buffer = [None] * len(self._modules)
        self._fired = [{} for _ in self._modules]
        self._passes = 0
        return torch.stack(rows)
