"""Record: the host-side numbers of one logged step, and the one device→host copy that produces them.

`Packer` gathers device tensors on the training thread and starts a single non-blocking copy; the sink's
thread calls `PendingRecord.resolve()`, so the training thread never waits for the device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Record:
    """Everything measured at one logged `global_step`, as plain Python and NumPy values."""

    step: int
    timestamp_ms: int
    metrics: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Entry:
    name: str  # metric family ("grad_norm") or array name ("activations")
    keys: tuple[str, ...] | None  # metric keys per element, or None for an array
    shape: tuple[int, ...]
    masked: bool = False  # metrics followed by as many flags: a key whose flag is 0 is not logged


class Packer:
    """Collect named device tensors for one step, then ship them to the host in one copy."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.timestamp_ms = int(time.time() * 1000)
        self._entries: list[_Entry] = []
        self._tensors: list[Tensor] = []
        self.host_metrics: dict[str, float] = {}

    def metrics(self, family: str, keys: Sequence[str], values: Tensor, present: Tensor | None = None) -> None:
        """`values[i]` becomes metric `<family>/<keys[i]>`; with `present` (a device bool per key, read with the rest
        of the record: no sync), only where `present[i]` holds (e.g. a module that produced no output: no value)."""
        if values.numel() != len(keys) or (present is not None and present.numel() != len(keys)):
            flags = "" if present is None else f" and {present.numel()} flags"
            raise ValueError(f"{family}: {values.numel()} values{flags} for {len(keys)} keys")
        if present is None:
            self._add(_Entry(family, tuple(keys), tuple(values.shape)), values)
        else:  # the flags travel after the values, in the same copy
            self._add(
                _Entry(family, tuple(keys), (len(keys),), masked=True),
                torch.cat([values.reshape(-1), present.reshape(-1).to(values.dtype)]),
            )

    def metric(self, key: str, value: Tensor) -> None:
        self._add(_Entry(key, ("",), (1,)), value.reshape(1))

    def array(self, name: str, values: Tensor) -> None:
        self._add(_Entry(name, None, tuple(values.shape)), values)

    def _add(self, entry: _Entry, values: Tensor) -> None:
        self._entries.append(entry)
        self._tensors.append(values.detach().reshape(-1).to(torch.float64))

    def ship(self) -> PendingRecord:
        """Start the one device→host copy; non-blocking into pinned memory on CUDA."""
        if not self._tensors:
            return PendingRecord(self, None, None)
        flat = torch.cat([t.to(self._tensors[0].device) for t in self._tensors])
        if flat.device.type == "cuda":
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return PendingRecord(self, host, event)
        return PendingRecord(self, flat.cpu(), None)


class PendingRecord:
    """A record whose numbers may still be in flight from the device."""

    def __init__(self, packer: Packer, host: Tensor | None, event: torch.cuda.Event | None) -> None:
        self._packer, self._host, self._event = packer, host, event

    @property
    def step(self) -> int:
        return self._packer.step

    def resolve(self) -> Record:
        """Wait for the copy (off the training thread) and unpack into a Record."""
        if self._event is not None:
            self._event.synchronize()
        values = self._host.numpy() if self._host is not None else np.empty(0)
        metrics: dict[str, float] = dict(self._packer.host_metrics)
        arrays: dict[str, np.ndarray] = {}
        offset = 0
        for entry in self._packer._entries:
            n = int(np.prod(entry.shape)) * (2 if entry.masked else 1)
            chunk = values[offset : offset + n]
            offset += n
            if entry.masked:
                assert entry.keys is not None
                flags = chunk[n // 2 :]
                metrics.update({f"{entry.name}/{k}": float(v) for k, v, f in zip(entry.keys, chunk[: n // 2], flags, strict=True) if f})
            elif entry.keys is None:
                arrays[entry.name] = chunk.reshape(entry.shape).copy()
            elif entry.keys == ("",):
                metrics[entry.name] = float(chunk[0])
            else:
                metrics.update({f"{entry.name}/{k}": float(v) for k, v in zip(entry.keys, chunk, strict=True)})
        return Record(self._packer.step, self._packer.timestamp_ms, metrics, arrays)
