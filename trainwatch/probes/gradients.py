"""Per-parameter gradient, weight and update statistics, reduced per group on the device.

Pure tensor functions: fused `torch._foreach_*` reductions, no `.item()`, no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

# Temporary buffers (the non-finite mask) are built in chunks of at most this many elements, so a logged step
# never allocates a second copy of a large model at once.
CHUNK_NUMEL = 1 << 24
# Zeros are counted on the CPU in pieces of this many elements (a larger tensor) through one buffer.
CPU_COUNT_CHUNK = 1 << 18
_SMALL = 1 << 15
# The integer type whose values are a float type's bits.
_SAME_SIZE_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


class TensorStats(NamedTuple):
    """Per-tensor statistics, each a float32 vector with one entry per input tensor."""

    sq_norm: Tensor  # squared L2 norm
    max_abs: Tensor  # max |x| (NaN if the tensor holds a NaN)
    nonfinite: Tensor  # count of NaN and ±Inf entries
    zeros: Tensor  # count of exact zeros
    numel: Tensor  # number of entries


class GroupGradStats(NamedTuple):
    """Gradient statistics per group, each a vector of length `num_groups`."""

    norm: Tensor
    max_abs: Tensor
    nonfinite: Tensor
    zero_frac: Tensor


def _chunks(tensors: Sequence[Tensor], max_numel: int = CHUNK_NUMEL) -> Iterator[list[Tensor]]:
    chunk: list[Tensor] = []
    size = 0
    for t in tensors:
        if chunk and size + t.numel() > max_numel:
            yield chunk
            chunk, size = [], 0
        chunk.append(t)
        size += t.numel()
    if chunk:
        yield chunk


def norms(tensors: Sequence[Tensor], ord: float) -> Tensor:
    """Norms as a float32 vector, accumulated in float32 (float64 tensors, e.g. `precision="64-true"`, in float64,
    and complex ones in their own precision: torch refuses to narrow those inside the norm)."""
    tensors = list(tensors)
    if not any(_wide(t) for t in tensors):
        return torch.stack(torch._foreach_norm(tensors, ord, dtype=torch.float32))
    return torch.stack([torch.linalg.vector_norm(t, ord, dtype=None if _wide(t) else torch.float32).float() for t in tensors])


def _wide(t: Tensor) -> bool:
    return t.dtype == torch.float64 or t.is_complex()


def max_abs(tensors: Sequence[Tensor]) -> Tensor:
    """max |x| of each tensor as float32, NaN where a tensor holds a NaN. On CUDA one fused inf-norm kernel; on
    the CPU (where torch's inf-norm is a scalar loop, 29 ms for ResNet-18's gradients on one core) see
    `nonzero_and_max_abs`."""
    if tensors[0].device.type != "cpu":  # an empty tensor has no inf-norm: a zero stand-in gives it 0
        return norms([t if t.numel() else t.new_zeros(1) for t in tensors], float("inf"))
    return nonzero_and_max_abs(tensors)[1]


def count_nonzero(tensors: Sequence[Tensor]) -> Tensor:
    """Entries that are not exactly zero (NaN counts as non-zero, -0.0 as zero) of each tensor, as float32: the
    L0 "norm", one fused kernel on CUDA. On the CPU see `nonzero_and_max_abs`."""
    if tensors[0].device.type != "cpu":
        return norms(tensors, 0.0)
    return nonzero_and_max_abs(tensors)[0]


def nonzero_and_max_abs(tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """`count_nonzero` and `max_abs` together. On the CPU from one pass over the bits of |x| read as integers (|x|
    turns -0.0 into 0.0; with the sign bit clear, integers order as the floats they encode, and NaN's bits lie
    above Inf's): the L0 norm and `torch.count_nonzero` on floats slow down tenfold when zeros are scattered (ReLU
    gradients, dead units: 30 ms instead of 2.6 ms for ResNet-18's gradients), the inf-norm is a scalar loop, and
    a separate `aminmax` pass is one more read of every gradient."""
    if tensors[0].device.type != "cpu":
        return count_nonzero(tensors), max_abs(tensors)
    stats = _abs_pass(tensors, largest=True)
    assert stats.largest is not None
    return stats.nonzero, stats.largest


def count_nonfinite(tensors: Sequence[Tensor], max_abs: Tensor | None = None) -> Tensor:
    """Number of NaN/Inf entries of each tensor: x·0 (on the CPU x − x) is ±0 where x is finite and NaN elsewhere,
    and the entries that are not zero are counted.

    With `max_abs` (per-tensor max |x|) on the CPU, where reading a value costs no device sync, the counting is
    skipped when every max is finite: then no entry can be NaN or Inf.
    """
    if tensors[0].device.type == "cpu":
        if max_abs is not None and bool(max_abs.isfinite().all()):
            return torch.zeros(len(tensors), dtype=torch.float32)
        return _abs_pass(tensors, op=lambda x, out=None: torch.sub(x, x, out=out)).nonzero
    return torch.cat([norms(torch._foreach_mul(chunk, 0.0), 0.0) for chunk in _chunks(tensors)])


class _PassStats(NamedTuple):
    nonzero: Tensor  # float32 per tensor: entries whose result has bits that are not all zero
    largest: Tensor | None  # float32 per tensor: the largest result (0 for an empty tensor)
    l2: Tensor | None  # float32 per tensor: the L2 norm of the results


def _abs_pass(tensors: Sequence[Tensor], op: Callable[..., Tensor] = torch.abs, largest: bool = False, l2: bool = False) -> _PassStats:
    """One pass on the CPU over each tensor's elementwise `op(x, out=None)` (by default |x|): the entries whose
    result is not all zero bits, and optionally the largest result, read as an integer and returned in the float
    type, and the results' L2 norm. A large tensor goes in pieces through one buffer of at most 2 MB: no large
    temporary, and each piece stays in the cache while it is reduced. Gradients that track autograd
    (`create_graph=True`) are read detached; an integer tensor's values are counted and maximised as they are."""
    buffers: dict[torch.dtype, Tensor] = {}
    counts: list[Tensor] = []
    tops: list[Tensor] = []  # per tensor, the largest result's bits
    squares: list[Tensor] = []  # per tensor, the sum of the squared results, float64
    for t in tensors:
        t = t.detach()
        bits = _SAME_SIZE_INT.get(t.dtype, t.dtype)
        if t.numel() <= _SMALL:  # a temporary on the heap costs less than slicing a buffer
            pieces = [op(t)]
        else:
            buffer = buffers.get(t.dtype)
            if buffer is None:
                buffer = buffers[t.dtype] = torch.empty(CPU_COUNT_CHUNK, dtype=t.dtype)
            flat = _flat(t)
            pieces = (op(part, out=buffer[: part.numel()]) for part in flat.split(CPU_COUNT_CHUNK))
        count = top = square = None
        for piece in pieces:  # each reduced while it is in the cache
            values = piece.view(bits)
            n = torch.count_nonzero(values)
            count = n if count is None else count + n
            if largest and piece.numel():
                m = values.amax()
                top = m if top is None else torch.maximum(top, m)
            if l2:
                q = torch.linalg.vector_norm(piece, dtype=None if piece.dtype == torch.float64 else torch.float32).double().square()
                square = q if square is None else square + q
        assert count is not None and (square is not None or not l2)  # every tensor has at least one piece
        counts.append(count)
        tops.append(top if top is not None else torch.zeros((), dtype=bits))  # an empty tensor's max is 0
        if square is not None:
            squares.append(square)
    return _PassStats(
        torch.stack(counts).float(),
        _floats_of(tops, tensors) if largest else None,
        torch.stack(squares).sqrt().float() if l2 else None,
    )


def _floats_of(bits: list[Tensor], like: Sequence[Tensor]) -> Tensor:
    """The float32 values of per-tensor scalars held as the bits of each tensor's float type (or as integers)."""
    dtypes = {t.dtype for t in like}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) in _SAME_SIZE_INT:
        return torch.stack(bits).view(dtype).float()  # the usual case: one conversion
    return torch.stack([(b.view(t.dtype) if t.dtype in _SAME_SIZE_INT else b).float() for b, t in zip(bits, like, strict=True)])


def _flat(t: Tensor) -> Tensor:
    """All of `t`'s entries as one 1-D view, in storage order, when they fill one block of its storage (contiguous,
    or dense in another layout such as channels_last); otherwise a flat copy."""
    if t.is_contiguous():
        return t.view(-1)
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n != 1):
        if stride != expected:
            return t.reshape(-1)
        expected *= size
    return t.as_strided((t.numel(),), (1,))


def numels(tensors: Sequence[Tensor]) -> Tensor:
    """Element counts as a float32 vector on the tensors' device. Build it once per run: creating it from a
    Python list is a host→device copy, which would synchronise on CUDA."""
    return torch.tensor([float(t.numel()) for t in tensors]).to(tensors[0].device)


def tensor_stats(tensors: Sequence[Tensor], numel: Tensor | None = None) -> TensorStats:
    """Norm, max |x|, non-finite and zero counts of every tensor, with a handful of fused kernels (on the CPU the
    first three from one pass over |x|).

    `numel` (from `numels`) may describe larger tensors than given: a 1-element zero stand-in for a missing
    gradient then counts as `numel` zeros.
    """
    if not tensors:
        raise ValueError("tensor_stats needs at least one tensor, got an empty sequence")
    numel = numels(tensors) if numel is None else numel
    if tensors[0].device.type == "cpu":
        stats = _abs_pass(tensors, largest=True, l2=True)
        nonzero, largest, l2 = stats.nonzero, stats.largest, stats.l2
        assert largest is not None and l2 is not None
    else:
        l2 = norms(tensors, 2.0)
        nonzero, largest = count_nonzero(tensors), max_abs(tensors)  # NaN counts as non-zero: zeros are exact zeros
    return TensorStats(
        sq_norm=l2.square(),
        max_abs=largest,
        nonfinite=count_nonfinite(tensors, largest),
        zeros=numel - nonzero,
        numel=numel,
    )


def group_sum(values: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """Sum of `values` per group; `group_index[i]` is the group of `values[i]`."""
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, group_index, values)


def group_max(values: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """Max of `values` per group (NaN propagates, so a group holding a NaN reports NaN)."""
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    out = out.scatter_reduce(0, group_index, values, "amax", include_self=False)
    has_nan = group_sum(values.isnan().to(values.dtype), group_index, num_groups) > 0
    return torch.where(has_nan, torch.nan, out)


def group_grad_stats(stats: TensorStats, group_index: Tensor, num_groups: int) -> GroupGradStats:
    """Pool per-parameter gradient statistics into groups: the group norm is the L2 norm of the
    concatenation of its parameters' gradients."""
    zeros = group_sum(stats.zeros, group_index, num_groups)
    numel = group_sum(stats.numel, group_index, num_groups)
    return GroupGradStats(
        norm=group_sum(stats.sq_norm, group_index, num_groups).sqrt(),
        max_abs=group_max(stats.max_abs, group_index, num_groups),
        nonfinite=group_sum(stats.nonfinite, group_index, num_groups),
        zero_frac=zeros / numel.clamp_min(1.0),
    )


def total_norm(stats: TensorStats) -> Tensor:
    """L2 norm of all tensors as if they were concatenated into a single vector."""
    return stats.sq_norm.sum().sqrt()


def snapshot(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Detached copies, for the weights before an optimizer step or at initialisation."""
    return [t.detach().clone() for t in tensors]


def update_norms(params: Sequence[Tensor], before: list[Tensor]) -> Tensor:
    """Per-parameter ‖w_after − w_before‖ of an optimizer step; consumes `before` (overwritten in place)."""
    torch._foreach_sub_(before, [p.detach() for p in params])
    return norms(before, 2.0)


def pooled_norm(per_tensor_norms: Tensor, group_index: Tensor, num_groups: int) -> Tensor:
    """Group L2 norm from per-tensor L2 norms."""
    return group_sum(per_tensor_norms.square(), group_index, num_groups).sqrt()


def grad_stats(params: Sequence[Tensor], numel: Tensor | None = None) -> TensorStats:
    """`tensor_stats` of every parameter's `.grad`; a parameter without a gradient counts as all zeros
    (through a 1-element zero stand-in, so no index has to be built on the host)."""
    numel = numels(params) if numel is None else numel
    return tensor_stats(gradients(params, numel.new_zeros(1)), numel)


def gradients(params: Sequence[Tensor], stand_in: Tensor) -> list[Tensor]:
    """Each parameter's gradient as a dense real tensor whose norms, max |g| and non-zero and non-finite counts are
    the gradient's: `stand_in` where there is none; for a sparse gradient (`nn.Embedding(sparse=True)`) its stored
    values, coalesced (duplicate indices summed; every other entry is zero); for a complex one its modulus."""
    grads = []
    for p in params:
        g = p.grad
        if g is None:
            g = stand_in
        elif g.layout == torch.sparse_coo:
            g = g.coalesce().values()
        grads.append(g.abs() if g.is_complex() else g)
    return grads
