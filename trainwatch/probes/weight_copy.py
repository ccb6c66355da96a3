"""Copies of the weights kept off the training device, and the distances of later weights from them.

Two copies use it: the initial weights, for the distance from initialisation ‖w − w₀‖ (standing for the whole run),
and, beside the CPU, the weights before a logged optimizer step, for the update ‖Δw‖ (rewritten at each logged
step). A copy beside the model would hold one more model's worth of the training process's memory. Next to a GPU
the copy lives in pinned host memory and comes back in chunks by non-blocking copies (no host sync); next to the
CPU (or another accelerator) it is an unlinked temporary file, held by the page cache rather than by the process
(the kernel can write it back and reclaim it under memory pressure, which it cannot do with the process's own
memory on a machine without swap), read back chunk by chunk. Either way the training device holds one chunk at a
time, and only while the distances are computed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from trainwatch.probes.gradients import norms

CHUNK_NUMEL = 1 << 20  # elements per read-back chunk: 4 MB of float32


@dataclass(frozen=True)
class _Chunk:
    """A run of whole or partial parameters of one dtype that lie next to each other in the copy."""

    byte_start: int
    nbytes: int
    dtype: torch.dtype
    segments: tuple[tuple[int, int, int], ...]  # (parameter index, first element, elements)
    owners: Tensor  # parameter index of each segment, on the device


def _plan(params: Sequence[Tensor], chunk_numel: int, device: torch.device) -> list[_Chunk]:
    """Cut the parameters, in order, into chunks of at most `chunk_numel` elements of one dtype: many small
    parameters share a chunk (one read, one fused subtraction), a large one spans several."""
    chunks: list[_Chunk] = []
    segments: list[tuple[int, int, int]] = []
    byte_start = size = 0
    dtype = params[0].dtype

    def close() -> None:
        nonlocal segments, byte_start, size
        if segments:
            owners = torch.tensor([s[0] for s in segments], dtype=torch.long).to(device)
            chunks.append(_Chunk(byte_start, size * dtype.itemsize, dtype, tuple(segments), owners))
            byte_start += size * dtype.itemsize
        segments, size = [], 0

    for i, p in enumerate(params):
        if p.dtype != dtype:
            close()
            dtype = p.dtype
        start = 0
        while start < p.numel():
            if size == chunk_numel:
                close()
            n = min(p.numel() - start, chunk_numel - size)
            segments.append((i, start, n))
            size += n
            start += n
    close()
    return chunks


class WeightCopy:
    """A copy of `params` off the training device, retaken with `take`, and per-parameter distances of later
    weights from it."""

    def __init__(self, params: Sequence[Tensor], directory: str | None = None, chunk_numel: int = CHUNK_NUMEL) -> None:
        if not params:
            raise ValueError("WeightCopy needs at least one parameter")
        self.device = params[0].device
        self._signature = [(p.numel(), p.dtype) for p in params]
        self._chunks = _plan(params, chunk_numel, self.device)
        nbytes = sum(p.numel() * p.dtype.itemsize for p in params)
        if self.device.type == "cuda":
            self._host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # allocated pinned: no pageable twin
        else:
            self._file = tempfile.TemporaryFile(dir=directory, prefix="trainwatch-weights-")  # unlinked: gone with the process
        self.take(params)

    def take(self, params: Sequence[Tensor]) -> None:
        """Overwrite the copy with the current values of `params` (the ones it was built from), in place: no
        new memory or file. On CUDA non-blocking copies into the pinned buffer, ordered before the optimizer's
        kernels by the stream."""
        self._check(params, "take")
        if self.device.type == "cuda":
            offset = 0
            for p in params:
                raw = _bytes_of(p.detach().reshape(-1))
                self._host[offset : offset + raw.numel()].copy_(raw, non_blocking=True)
                offset += raw.numel()
            return
        self._file.seek(0)
        for p in params:
            self._file.write(_bytes_of(p.detach().reshape(-1)).cpu().numpy())
        self._file.flush()

    def distances(self, params: Sequence[Tensor]) -> Tensor:
        """Per-parameter ‖w − w_copy‖ as a float32 vector on the parameters' device; each chunk costs one read (or
        one non-blocking host→device copy), one fused subtraction and one fused norm."""
        self._check(params, "distances")
        flat = [p.detach().reshape(-1) for p in params]
        squares = torch.zeros(len(params), dtype=torch.float64, device=self.device)
        buffer = None
        if self.device.type != "cuda":
            self._file.seek(0)
            # Allocated per call, not kept: a standing chunk would be one more allocation alive at the training
            # step's memory peak, every step, for a buffer used only at logged steps.
            buffer = torch.empty(max((c.nbytes for c in self._chunks), default=0), dtype=torch.uint8)
        for chunk in self._chunks:
            raw = self._read(chunk, buffer)
            copy, offset = [], 0
            for _, _, n in chunk.segments:
                copy.append(raw[offset : offset + n * chunk.dtype.itemsize].view(chunk.dtype))
                offset += n * chunk.dtype.itemsize
            torch._foreach_sub_(copy, [flat[i][start : start + n] for i, start, n in chunk.segments])
            squares.index_add_(0, chunk.owners, norms(copy, 2.0).double().square())
        return squares.sqrt().float()

    def _check(self, params: Sequence[Tensor], what: str) -> None:
        if [(p.numel(), p.dtype) for p in params] != self._signature:
            raise ValueError(f"WeightCopy.{what} needs the parameters it was built from (same sizes and dtypes)")

    def _read(self, chunk: _Chunk, buffer: Tensor | None) -> Tensor:
        """The chunk's bytes of the copy on the training device, in a buffer the caller may overwrite (beside the
        CPU, read from the file into `buffer`)."""
        if buffer is None:
            part = self._host[chunk.byte_start : chunk.byte_start + chunk.nbytes]
            return torch.empty(chunk.nbytes, dtype=torch.uint8, device=self.device).copy_(part, non_blocking=True)
        raw = buffer[: chunk.nbytes]
        self._file.readinto(raw.numpy())  # the chunks are read in file order
        return raw if self.device.type == "cpu" else raw.to(self.device)  # e.g. Apple's "mps"

    def close(self) -> None:
        """Drop the copy (the file is deleted when closed)."""
        if self.device.type == "cuda":
            self._host = torch.empty(0, dtype=torch.uint8)
        else:
            self._file.close()


def _bytes_of(flat: Tensor) -> Tensor:
    """The bytes of a 1-D tensor of any dtype (bfloat16 too, which NumPy lacks)."""
    return flat.contiguous().view(torch.uint8)
