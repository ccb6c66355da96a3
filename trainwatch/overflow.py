"""The sink's overflow: records its full queue had no room for, kept in order, on disk past a few in memory.

The training thread parks an item with one `deque.append` (atomic: no lock, no I/O). A tracking server slower than
training for hours would grow that deque without bound, so a spill thread moves all but the newest `in_memory`
parked items to an unlinked temporary file while the sink's worker is busy delivering; the worker takes them back
in order, the file's first. Memory then holds the queue and `in_memory` items, whatever the backlog.

Order: the spill thread only moves the oldest parked item, and only while more than `in_memory` wait, so the
deque is never empty while an item waits in the file or in transit; the sink can therefore keep testing
`bool(overflow)` (the deque) to decide whether a new item may overtake the overflow through the queue.
"""

from __future__ import annotations

import collections
import itertools
import logging
import pickle
import shutil
import tempfile
import threading
from typing import IO, Any

from trainwatch.ops import ArtifactOp, ImageOp, MetricsOp, ParamsOp, TagsOp

log = logging.getLogger(__name__)

IN_MEMORY = 64  # parked items kept in memory before the spill thread moves the older ones to disk
COMPACT_BYTES = 8 << 20  # once this much of the file is read and it is at least half the file, the rest moves to a new one
SPILL_EVERY_S = 0.05  # how often the spill thread looks while anything is parked


class _Kept:
    """Stands in the file for an item that must stay the same object (the sink's flush and stop markers)."""

    def __init__(self, key: int) -> None:
        self.key = key


class Overflow:
    """A FIFO of parked items: a deque the training thread appends to, and a file for all but the newest ones."""

    def __init__(self, in_memory: int = IN_MEMORY, spill_every_s: float = SPILL_EVERY_S) -> None:
        if in_memory < 1:
            raise ValueError(f"in_memory must be at least 1, got {in_memory}")
        self._parked: collections.deque = collections.deque()
        self._in_memory, self._spill_every_s = in_memory, spill_every_s
        self._lock = threading.Lock()  # the spill thread's move and the worker's take, never the training thread
        self._file: IO[bytes] | None = None
        self._read_at = 0  # file offset of the oldest item on disk
        self._size = 0  # bytes in the file
        self._on_disk = 0
        self._kept: dict[int, object] = {}
        self._keys = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.spilled = 0  # items that went through the file
        self.most_on_disk = 0

    def __bool__(self) -> bool:
        """True while any item waits (in memory, in transit or on disk): the deque is never empty then."""
        return bool(self._parked)

    def __len__(self) -> int:
        return len(self._parked) + self._on_disk

    def in_memory(self) -> int:
        return len(self._parked)

    # --- training thread -------------------------------------------------------------------------------
    def park(self, item: object) -> None:
        """Append `item` behind every parked one; never blocks (the first call starts the spill thread)."""
        self._parked.append(item)
        if self._thread is None:
            self._thread = threading.Thread(target=self._spill_loop, name="trainwatch-overflow", daemon=True)
            self._thread.start()

    # --- the sink's worker -----------------------------------------------------------------------------
    def take(self) -> object:
        """The oldest parked item; IndexError if none waits."""
        with self._lock:
            if not self._on_disk:
                return self._parked.popleft()
            assert self._file is not None
            self._file.seek(self._read_at)
            item = pickle.load(self._file)
            self._read_at = self._file.tell()
            self._on_disk -= 1
            if not self._on_disk:
                self._file.seek(0)
                self._file.truncate()
                self._read_at = self._size = 0
            elif self._read_at >= COMPACT_BYTES and 2 * self._read_at >= self._size:
                self._compact()
        return self._kept.pop(item.key) if isinstance(item, _Kept) else item

    def _compact(self) -> None:
        """Move the unread items to a new file: a backlog that never empties would otherwise keep every item
        ever spilled on disk. Costs at most as many bytes as were read since the last compaction."""
        assert self._file is not None
        fresh = tempfile.TemporaryFile(prefix="trainwatch-backlog-")
        self._file.seek(self._read_at)
        shutil.copyfileobj(self._file, fresh)
        self._file.close()
        self._file, self._size, self._read_at = fresh, self._size - self._read_at, 0

    def close(self) -> None:
        """Stop the spill thread and drop the file (items still in it are gone: call once the worker took them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._file is not None:
            self._file.close()
            self._file = None

    # --- spill thread ----------------------------------------------------------------------------------
    def _spill_loop(self) -> None:
        while not self._stop.wait(self._spill_every_s):
            try:
                self.spill()
            except Exception:
                log.exception("trainwatch: could not move the sink's backlog to disk; it stays in memory")
                return

    def spill(self) -> int:
        """Move every parked item but the newest `in_memory` to the file, oldest first; the number moved."""
        moved = 0
        while len(self._parked) > self._in_memory:
            with self._lock:
                if len(self._parked) <= self._in_memory:
                    break
                item = self._parked[0]
                frame = pickle.dumps(self._storable(item), protocol=pickle.HIGHEST_PROTOCOL)
                if self._file is None:
                    self._file = tempfile.TemporaryFile(prefix="trainwatch-backlog-")  # unlinked: gone with the process
                self._file.seek(0, 2)
                self._file.write(frame)
                self._file.flush()
                self._size += len(frame)
                self._on_disk += 1
                self.spilled += 1
                self.most_on_disk = max(self.most_on_disk, self._on_disk)
                self._parked.popleft()  # last, once it is on disk and counted: the deque stays non-empty meanwhile
            moved += 1
        return moved

    def _storable(self, item: Any) -> object:
        """What goes in the file: records as plain values (waiting for an in-flight device copy here, off the
        training thread), ops as they are, anything else by reference."""
        # here, not at the top: `record` imports torch, which the writer process (it imports the sink) does without
        from trainwatch.record import PendingRecord, Record

        if isinstance(item, PendingRecord):
            return item.resolve()
        if isinstance(item, (Record, MetricsOp, ArtifactOp, ImageOp, TagsOp, ParamsOp)):
            return item
        key = next(self._keys)
        self._kept[key] = item
        return _Kept(key)
