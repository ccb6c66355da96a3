"""Copies of the weights kept off the training device, and the distances of later weights from them.

Two copies use it: the initial weights, for the distance from initialisation ‖w − w₀‖ (standing for the whole run),
and, beside the CPU, the weights before a logged optimizer step, for the update ‖Δw‖ (rewritten at each logged
step). A copy beside the model would hold one more model's worth of the training process's memory. Next to a GPU
the copy lives in pinned host memory and comes back in chunks by non-blocking copies (no host sync); next to the
CPU (or another accelerator) it is an unlinked temporary file, held by the page cache rather than by the process
(the kernel can write it back and reclaim it under memory pressure, which it cannot do with the process's own
memory on a machine without swap), mapped a window of a few MB at a time while distances are computed (mapped
pages count in the process's resident size). A copy no larger than one such window stays in process memory: the
file would save nothing worth its system calls (a tenth of a millisecond per pass, a few per cent of a small
model's step). Either way the training device holds one chunk at a time, and only while the distances are computed.
"""

from __future__ import annotations

import mmap
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO

import torch
from torch import Tensor

from trainwatch.probes.gradients import norms

CHUNK_NUMEL = 1 << 20  # elements per chunk the distances take at a time: 4 MB of float32
MAP_BYTES = 4 << 20  # beside the CPU, how much of the copy's file is mapped at a time (mapped pages count in the RSS)
IN_MEMORY_BYTES = MAP_BYTES  # beside the CPU, a copy up to this size is kept in process memory, not in a file


def fits_in_memory(params: Sequence[Tensor]) -> bool:
    """Whether a copy of `params` is small enough to keep in process memory beside the CPU (`IN_MEMORY_BYTES`)."""
    return sum(p.numel() * p.element_size() for p in params) <= IN_MEMORY_BYTES


@dataclass(frozen=True)
class _Chunk:
    """A run of whole or partial parameters of one dtype that lie next to each other in the copy."""

    byte_start: int
    nbytes: int
    dtype: torch.dtype
    segments: tuple[tuple[int, int, int], ...]  # (parameter index, first element, elements)


def _plan(params: Sequence[Tensor], chunk_numel: int) -> tuple[list[_Chunk], list[int]]:
    """Cut the parameters, in order, into chunks of at most `chunk_numel` elements of one dtype: many small
    parameters share a chunk (one read, one fused subtraction), a large one spans several. Returns the chunks and
    each parameter's byte offset in the copy: where the dtype changes the offset is rounded up to a multiple of the
    new dtype's size (bytes are viewed as that dtype, which needs it: three bfloat16s, then a float32)."""
    chunks: list[_Chunk] = []
    offsets: list[int] = []
    segments: list[tuple[int, int, int]] = []
    byte_start = size = 0
    dtype = params[0].dtype

    def close() -> None:
        nonlocal segments, byte_start, size
        if segments:
            chunks.append(_Chunk(byte_start, size * dtype.itemsize, dtype, tuple(segments)))
            byte_start += size * dtype.itemsize
        segments, size = [], 0

    for i, p in enumerate(params):
        if p.dtype != dtype:
            close()
            dtype = p.dtype
            byte_start = -(-byte_start // dtype.itemsize) * dtype.itemsize
        offsets.append(byte_start + size * dtype.itemsize)
        start = 0
        while start < p.numel():
            if size == chunk_numel:
                close()
            n = min(p.numel() - start, chunk_numel - size)
            segments.append((i, start, n))
            size += n
            start += n
    close()
    return chunks, offsets


class WeightCopy:
    """A copy of `params` off the training device, retaken with `take`, and per-parameter distances of later
    weights from it."""

    def __init__(self, params: Sequence[Tensor], directory: str | None = None, chunk_numel: int = CHUNK_NUMEL) -> None:
        if not params:
            raise ValueError("WeightCopy needs at least one parameter")
        self.device = params[0].device
        self._signature = [(p.numel(), p.dtype) for p in params]
        self._chunks, self._offsets = _plan(params, chunk_numel)
        self._owners = torch.tensor([s[0] for c in self._chunks for s in c.segments], dtype=torch.long).to(self.device)  # of each segment
        nbytes = self._nbytes = self._offsets[-1] + params[-1].numel() * params[-1].dtype.itemsize
        self._file: IO[bytes] | None = None
        if self.device.type == "cuda":
            self._host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # allocated pinned: no pageable twin
        elif fits_in_memory(params):
            self._host = torch.empty(nbytes, dtype=torch.uint8)
        else:
            self._file = tempfile.TemporaryFile(dir=directory, prefix="trainwatch-weights-")  # unlinked: gone with the process
        self.take(params)
        if self._file is not None:
            try:  # now, not at the first logged step: a file system that cannot map files (ENODEV) is refused here
                mmap.mmap(self._file.fileno(), min(nbytes, MAP_BYTES), access=mmap.ACCESS_COPY).close()
            except OSError as error:
                self._file.close()
                raise OSError(error.errno, f"the temporary file cannot be mapped into memory ({error.strerror or error})") from error

    def take(self, params: Sequence[Tensor]) -> None:
        """Overwrite the copy with the current values of `params` (the ones it was built from), in place: no
        new memory or file. On CUDA non-blocking copies into the pinned buffer, ordered before the optimizer's
        kernels by the stream."""
        self._check(params, "take")
        if self._file is None:
            for p, offset in zip(params, self._offsets, strict=True):
                raw = _bytes_of(p.detach().reshape(-1))
                self._host[offset : offset + raw.numel()].copy_(raw, non_blocking=self.device.type == "cuda")  # pinned there
            return
        position = None
        for p, offset in zip(params, self._offsets, strict=True):
            if position != offset:  # the start, and after a dtype change's padding (a hole in the file at first)
                self._file.seek(offset)
            raw = _bytes_of(p.detach().reshape(-1))
            self._file.write(raw.cpu().numpy())
            position = offset + raw.numel()
        self._file.flush()

    def distances(self, params: Sequence[Tensor]) -> Tensor:
        """Per-parameter ‖w − w_copy‖ as a float32 vector on the parameters' device, one fused norm per chunk.
        Beside the CPU the file is mapped, not read (the kernel's copy into a buffer cost as much as the
        arithmetic), and w − w_copy goes to a scratch chunk that stays in the cache; elsewhere each chunk comes to
        the device and is subtracted in place."""
        return measure(params, [self]).distances[0]

    def _per_parameter(self, segment_norms: list[Tensor]) -> Tensor:
        """Per-parameter norms from the norms of their segments, as float32."""
        squares = torch.zeros(len(self._signature), dtype=torch.float64, device=self.device)
        if segment_norms:
            squares.index_add_(0, self._owners, torch.cat(segment_norms).double().square())
        return squares.sqrt().float()

    def _check(self, params: Sequence[Tensor], what: str) -> None:
        if [(p.numel(), p.dtype) for p in params] != self._signature:
            raise ValueError(f"WeightCopy.{what} needs the parameters it was built from (same sizes and dtypes)")

    def _chunk_bytes(self) -> Iterator[tuple[_Chunk, Tensor]]:
        """Each chunk with its bytes of the copy, on the parameters' device: beside the CPU a read-only view (of
        process memory, or of the file's pages, mapped `MAP_BYTES` at a time: the mapping goes with the last view
        of it); elsewhere a fresh tensor on the device (non-blocking from pinned memory on CUDA)."""
        window, window_start, window_end = torch.empty(0, dtype=torch.uint8), 0, 0
        for chunk in self._chunks:
            start, end = chunk.byte_start, chunk.byte_start + chunk.nbytes
            if self._file is None:
                raw = self._host[start:end]
            else:
                if end > window_end:
                    window_start = start - start % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a boundary
                    window_end = min(self._nbytes, max(window_start + MAP_BYTES, end))
                    # ACCESS_COPY: a private mapping, read in place from the page cache and never written; unlike
                    # ACCESS_READ a writable buffer, which torch.frombuffer takes without a warning.
                    pages = mmap.mmap(self._file.fileno(), window_end - window_start, access=mmap.ACCESS_COPY, offset=window_start)
                    window = torch.frombuffer(pages, dtype=torch.uint8)
                raw = window[start - window_start : end - window_start]
            yield chunk, raw if self.device.type == "cpu" else raw.to(self.device, non_blocking=self.device.type == "cuda")

    def close(self) -> None:
        """Drop the copy (the file is deleted when closed)."""
        self._host = torch.empty(0, dtype=torch.uint8)
        if self._file is not None:
            self._file.close()


@dataclass(frozen=True)
class Measured:
    """What `measure` found: per-parameter distances from each copy, in order, and the first copy's own norms."""

    distances: list[Tensor]
    copy_norms: Tensor | None


def measure(params: Sequence[Tensor], copies: Sequence[WeightCopy], copy_norms: bool = False) -> Measured:
    """Per-parameter ‖w − c‖ for each copy c of `params`, in one pass over the weights: each chunk of w is read
    once, and stays in the cache while every copy is subtracted from it (a logged step's update and distance from
    initialisation together: one pass over the weights saved). With `copy_norms`, ‖c‖ of the first copy too."""
    if not copies:
        raise ValueError("measure needs at least one WeightCopy")
    first = copies[0]
    first._check(params, "distances")
    if any(c._chunks != first._chunks or c.device != first.device for c in copies[1:]):
        raise ValueError("measure needs copies of the same parameters on the same device")
    flat = [p.detach().reshape(-1) for p in params]
    distance_parts: list[list[Tensor]] = [[] for _ in copies]
    norm_parts: list[Tensor] = []
    # Allocated per call, not kept: a standing chunk would be one more allocation alive at the training step's
    # memory peak, every step, for a buffer used only at logged steps.
    scratch = torch.empty(max((c.nbytes for c in first._chunks), default=0), dtype=torch.uint8) if first.device.type == "cpu" else None
    for pieces in zip(*(c._chunk_bytes() for c in copies), strict=True):
        chunk = pieces[0][0]
        weights = [flat[i][start : start + n] for i, start, n in chunk.segments]
        for k, (_, raw) in enumerate(pieces):
            copy = _segments(raw, chunk)
            if copy_norms and k == 0:
                norm_parts.append(norms(copy, 2.0))
            if scratch is None:
                torch._foreach_sub_(copy, weights)  # a fresh tensor on the device
                difference = copy
            else:
                difference = [torch.sub(w, c, out=d) for w, c, d in zip(weights, copy, _segments(scratch, chunk), strict=True)]
            distance_parts[k].append(norms(difference, 2.0))
    return Measured([first._per_parameter(parts) for parts in distance_parts], first._per_parameter(norm_parts) if copy_norms else None)


def _segments(raw: Tensor, chunk: _Chunk) -> list[Tensor]:
    """The chunk's bytes as one tensor of its dtype per segment."""
    views, offset = [], 0
    for _, _, n in chunk.segments:
        views.append(raw[offset : offset + n * chunk.dtype.itemsize].view(chunk.dtype))
        offset += n * chunk.dtype.itemsize
    return views


def _bytes_of(flat: Tensor) -> Tensor:
    """The bytes of a 1-D tensor of any dtype (bfloat16 too, which NumPy lacks)."""
    return flat.contiguous().view(torch.uint8)
