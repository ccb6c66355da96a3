"""The sink's overflow: order kept across memory and the file, markers kept as the same objects, memory bounded."""

from __future__ import annotations

import pickle
import random
import threading

import numpy as np
import pytest
import torch

import trainwatch.overflow as overflow_module
from trainwatch.ops import ArtifactOp, MetricsOp
from trainwatch.overflow import Overflow
from trainwatch.record import Packer, PendingRecord, Record


def _metrics(step: int) -> MetricsOp:
    return MetricsOp((("loss", float(step), 0, step),))


def test_all_but_the_newest_go_to_the_file_and_come_back_in_order_with_markers_as_the_same_objects():
    overflow = Overflow(in_memory=3, spill_every_s=3600)  # spilled by hand below, not by the thread
    marker = threading.Event()
    packer = Packer(step=7)
    packer.metrics("grad_norm", ["a", "b"], torch.tensor([1.5, 2.5]))
    packer.array("table", torch.arange(6.0).reshape(2, 3))
    items = [_metrics(0), packer.ship(), marker, ArtifactOp("x/y.txt", b"hello"), _metrics(1), _metrics(2), _metrics(3)]
    for item in items:
        overflow.park(item)
    assert overflow.spill() == 4
    assert overflow.in_memory() == 3 and len(overflow) == 7 and overflow.spilled == 4
    got = [overflow.take() for _ in range(7)]
    with pytest.raises(IndexError):
        overflow.take()
    assert not overflow and len(overflow) == 0
    assert got[0] == items[0] and got[3] == items[3] and got[4:] == items[4:]
    assert got[2] is marker  # a flush marker is the object the sink waits on, not a copy
    record = got[1]
    assert isinstance(record, Record) and record.step == 7  # resolved in the spill thread, stored as plain values
    assert record.metrics == {"grad_norm/a": 1.5, "grad_norm/b": 2.5}
    np.testing.assert_array_equal(record.arrays["table"], np.arange(6.0).reshape(2, 3))
    assert overflow._file is not None and overflow._file.seek(0, 2) == 0  # emptied: the file is truncated
    overflow.close()


def test_park_take_and_spill_at_once_keep_the_order_and_bound_memory():
    """The training thread parks, the spill thread moves and the worker takes, all at the same time: every item
    comes out once, in order, with flush markers as the same objects and device records resolved on the way."""
    overflow = Overflow(in_memory=8, spill_every_s=0.001)
    n = 5000
    markers = {step: threading.Event() for step in range(0, n, 97)}
    taken: list[object] = []

    def worker() -> None:
        rng = random.Random(0)
        while len(taken) < n:
            try:
                item = overflow.take()
            except IndexError:
                item = None
            if isinstance(item, MetricsOp):
                taken.append(item.values[0][3])
            elif isinstance(item, (Record, PendingRecord)):  # resolved if it went through the file
                taken.append(item.step)
            elif item is not None:
                taken.append(item)  # a marker
            if rng.random() < 0.01:
                threading.Event().wait(0.002)  # a slow delivery now and then

    consumer = threading.Thread(target=worker)
    consumer.start()
    expected: list[object] = []
    for step in range(n):
        if step in markers:
            overflow.park(markers[step])
            expected.append(markers[step])
        elif step % 10 == 3:
            packer = Packer(step)
            packer.metric("loss", torch.tensor(float(step)))
            overflow.park(packer.ship())
            expected.append(step)
        else:
            overflow.park(_metrics(step))
            expected.append(step)
        if step % 50 == 0:
            threading.Event().wait(0.003)  # let the spill thread run, as training steps take time
    consumer.join(120)
    assert not consumer.is_alive(), "the worker did not get every item"
    assert len(taken) == n and all(a is b if isinstance(b, threading.Event) else a == b for a, b in zip(taken, expected, strict=True))
    assert overflow.spilled > 0  # some went through the file
    assert not overflow and overflow._kept == {}
    overflow.close()


def test_in_memory_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        Overflow(in_memory=0)


def test_a_backlog_that_never_empties_keeps_a_bounded_file(monkeypatch):
    """A server that roughly keeps pace: a standing backlog on disk, never empty. The file is compacted as it is
    read, so it holds about the unread items, not every item ever spilled; the order holds."""
    monkeypatch.setattr(overflow_module, "COMPACT_BYTES", 4096)
    overflow = Overflow(in_memory=1, spill_every_s=3600)
    taken: list[int] = []
    sizes: list[int] = []
    step = 0
    for _ in range(200):
        for _ in range(25):
            overflow.park(_metrics(step))
            step += 1
        overflow.spill()
        for _ in range(25):
            taken.append(overflow.take().values[0][3])
        sizes.append(overflow._size)
    while overflow:
        taken.append(overflow.take().values[0][3])
    assert taken == list(range(step))
    frame = len(pickle.dumps(_metrics(0), protocol=pickle.HIGHEST_PROTOCOL))
    assert max(sizes) < 4096 * 2 + 30 * frame  # without compaction it would reach 5000 frames
    overflow.close()
