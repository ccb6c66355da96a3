"""Copies of the weights kept off the training device, and the distances of later weights from them.

Two copies use it: the initial weights, for the distance from initialisation ‖w − w₀‖ (standing for the whole run),
and, beside the CPU, the weights before a logged optimizer step, for the update ‖Δw‖ (rewritten at each logged
step). A copy beside the model would hold one more model's worth of the training process's memory. Next to a GPU
the copy lives in pinned host memory and comes back in chunks by non-blocking copies (no host sync); next to the
CPU (or another accelerator) it is an unlinked temporary file, held by the page cache rather than by the process
(the kernel can write it back and reclaim it under memory pressure, which it cannot do with the process's own
memory on a machine without swap), mapped a window of a few MB at a time while distances are computed (mapped
pages count in the process's resident size). Either way the training device holds one chunk at a time, and only
while the distances are computed.
"""

from __future__ import annotations

import mmap
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from trainwatch.probes.gradients import norms

CHUNK_NUMEL = 1 << 20  # elements per chunk the distances take at a time: 4 MB of float32
MAP_BYTES = 4 << 20  # beside the CPU, how much of the copy's file is mapped at a time (mapped pages count in the RSS)


@dataclass(frozen=True)
class _Chunk:
    """A run of whole or partial parameters of one dtype that lie next to each other in the copy."""

    byte_start: int
    nbytes: int
    dtype: torch.dtype
    segments: tuple[tuple[int, int, int], ...]  # (parameter index, first element, elements)


def _plan(params: Sequence[Tensor], chunk_numel: int) -> list[_Chunk]:
    """Cut the parameters, in order, into chunks of at most `chunk_numel` elements of one dtype: many small
    parameters share a chunk (one read, one fused subtraction), a large one spans several."""
    chunks: list[_Chunk] = []
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
        self._chunks = _plan(params, chunk_numel)
        self._owners = torch.tensor([s[0] for c in self._chunks for s in c.segments], dtype=torch.long).to(self.device)  # of each segment
        nbytes = self._nbytes = sum(p.numel() * p.dtype.itemsize for p in params)
        if self.device.type == "cuda":
            self._host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # allocated pinned: no pageable twin
        else:
            self._file = tempfile.TemporaryFile(dir=directory, prefix="trainwatch-weights-")  # unlinked: gone with the process
        self.take(params)
        if self.device.type != "cuda" and nbytes:
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
        """Per-parameter ‖w − w_copy‖ as a float32 vector on the parameters' device, one fused norm per chunk.
        Beside the CPU the file is mapped, not read (the kernel's copy into a buffer cost as much as the
        arithmetic), and w − w_copy goes to a scratch chunk that stays in the cache; elsewhere each chunk comes to
        the device and is subtracted in place."""
        return self._measure(params, with_norms=False)[0]

    def distances_and_norms(self, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """`distances`, and the per-parameter norms ‖w_copy‖ of the copy itself, read while its chunk is in the
        cache (the weights before the step, for the pre-step copy: a pass over the weights saved)."""
        distances, copy_norms = self._measure(params, with_norms=True)
        assert copy_norms is not None
        return distances, copy_norms

    def _measure(self, params: Sequence[Tensor], with_norms: bool) -> tuple[Tensor, Tensor | None]:
        self._check(params, "distances")
        flat = [p.detach().reshape(-1) for p in params]
        distance_parts, norm_parts = [], []
        # Allocated per call, not kept: a standing chunk would be one more allocation alive at the training
        # step's memory peak, every step, for a buffer used only at logged steps.
        scratch = torch.empty(max((c.nbytes for c in self._chunks), default=0), dtype=torch.uint8) if self.device.type == "cpu" else None
        for chunk, raw in self._chunk_bytes():
            weights = [flat[i][start : start + n] for i, start, n in chunk.segments]
            copy = _segments(raw, chunk)
            if with_norms:
                norm_parts.append(norms(copy, 2.0))
            if scratch is None:
                torch._foreach_sub_(copy, weights)  # a fresh tensor on the device
                difference = copy
            else:
                difference = [torch.sub(w, c, out=d) for w, c, d in zip(weights, copy, _segments(scratch, chunk), strict=True)]
            distance_parts.append(norms(difference, 2.0))
        return self._per_parameter(distance_parts), self._per_parameter(norm_parts) if with_norms else None

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
        """Each chunk with its bytes of the copy. On CUDA a fresh tensor on the device; otherwise a read-only
        view of the file's pages, mapped `MAP_BYTES` at a time (the mapping goes with the last view of it), and
        moved to the device if that is not the CPU (e.g. Apple's "mps")."""
        window, window_start, window_end = torch.empty(0, dtype=torch.uint8), 0, 0
        for chunk in self._chunks:
            start, end = chunk.byte_start, chunk.byte_start + chunk.nbytes
            if self.device.type == "cuda":
                yield (
                    chunk,
                    torch.empty(chunk.nbytes, dtype=torch.uint8, device=self.device).copy_(self._host[start:end], non_blocking=True),
                )
                continue
            if end > window_end:
                window_start = start - start % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a boundary
                window_end = min(self._nbytes, max(window_start + MAP_BYTES, end))
                # ACCESS_COPY: a private mapping, read in place from the page cache and never written; unlike
                # ACCESS_READ a writable buffer, which torch.frombuffer takes without a warning.
                pages = mmap.mmap(self._file.fileno(), window_end - window_start, access=mmap.ACCESS_COPY, offset=window_start)
                window = torch.frombuffer(pages, dtype=torch.uint8)
            raw = window[start - window_start : end - window_start]
            yield chunk, raw if self.device.type == "cpu" else raw.to(self.device)

    def close(self) -> None:
        """Drop the copy (the file is deleted when closed)."""
        if self.device.type == "cuda":
            self._host = torch.empty(0, dtype=torch.uint8)
        else:
            self._file.close()


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
