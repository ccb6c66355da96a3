import mmap

import pytest
import torch

from trainwatch.probes import weight_copy
from trainwatch.probes.weight_copy import WeightCopy, measure


@pytest.fixture
def on_file(monkeypatch):
    """Copies in a file whatever their size (beside the CPU only a copy larger than `IN_MEMORY_BYTES` is)."""
    monkeypatch.setattr(weight_copy, "IN_MEMORY_BYTES", 0)


def _independent(params: list[torch.Tensor], initial: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.linalg.vector_norm((p.detach() - w0).double()) for p, w0 in zip(params, initial, strict=True)])


@pytest.mark.parametrize("in_memory_bytes", [0, weight_copy.IN_MEMORY_BYTES])  # in a file, in process memory
@pytest.mark.parametrize("chunk_numel", [1, 7, 16, 1 << 20])  # many chunks per parameter, shared, one in all
def test_distances_equal_the_norm_of_the_difference_with_the_copy_taken_at_construction(monkeypatch, chunk_numel, in_memory_bytes):
    monkeypatch.setattr(weight_copy, "IN_MEMORY_BYTES", in_memory_bytes)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in [(5, 3), (11,), (2, 2, 2), (0,)]]
    initial = [p.detach().clone() for p in params]
    store = WeightCopy(params, chunk_numel=chunk_numel)
    assert (store._file is None) == (in_memory_bytes > 0)
    assert store.distances(params).tolist() == [0.0, 0.0, 0.0, 0.0]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g))  # training moves the weights in place
    got = store.distances(params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _independent(params, initial), rtol=1e-6, atol=0)
    torch.testing.assert_close(store.distances(params), got, rtol=0, atol=0)  # read back again: same answer
    measured = measure(params, [store], copy_norms=True)  # and the norms of the copy (the weights when it was taken)
    copy_norms = measured.copy_norms
    assert copy_norms is not None
    torch.testing.assert_close(measured.distances[0], got, rtol=0, atol=0)
    torch.testing.assert_close(copy_norms.double(), torch.stack([torch.linalg.vector_norm(w.double()) for w in initial]), rtol=1e-6, atol=0)
    assert all(torch.equal(p.detach(), p.detach().clone()) for p in params)
    store.close()


@pytest.mark.parametrize("map_bytes", [1, 5000, weight_copy.MAP_BYTES])
@pytest.mark.parametrize("chunk_numel", [7, 1000])
def test_the_file_is_mapped_a_window_at_a_time(on_file, monkeypatch, tmp_path, map_bytes, chunk_numel):
    """Beside the CPU the copy's file is mapped in windows that start on the mapping granularity, not at the
    chunks (which start anywhere), and are no larger than needed for a window of `MAP_BYTES` or one chunk: mapped
    pages count in the process's resident size. Distances are the same whatever the windows."""
    monkeypatch.setattr(weight_copy, "MAP_BYTES", map_bytes)
    mapped: list[tuple[int, int]] = []
    real_mmap = mmap.mmap

    def spy(fileno: int, length: int, **kwargs: object) -> mmap.mmap:
        mapped.append((int(kwargs.get("offset", 0)), length))  # type: ignore[call-overload]
        return real_mmap(fileno, length, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mmap, "mmap", spy)
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(*shape, generator=g) for shape in [(3001,), (5,), (40, 41), (2,)]]
    initial = [p.clone() for p in params]
    store = WeightCopy(params, directory=str(tmp_path), chunk_numel=chunk_numel)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g))
    torch.testing.assert_close(store.distances(params).double(), _independent(params, initial), rtol=1e-6, atol=0)
    assert mapped and all(offset % mmap.ALLOCATIONGRANULARITY == 0 for offset, _ in mapped)
    assert max(length for _, length in mapped) <= max(map_bytes, 4 * chunk_numel) + mmap.ALLOCATIONGRANULARITY
    assert sum(length for _, length in mapped) >= 4 * (3001 + 5 + 40 * 41 + 2)  # every byte mapped
    store.close()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_distances_for_other_dtypes(dtype):
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(300, generator=g).to(dtype), torch.randn(4, 5, generator=g).to(dtype), torch.randn(7, generator=g)]
    initial = [p.clone() for p in params]
    store = WeightCopy(params, chunk_numel=64)
    for p in params:
        p.mul_(1.5)
    expect = torch.stack([torch.linalg.vector_norm((p - w0).float()) for p, w0 in zip(params, initial, strict=True)])
    torch.testing.assert_close(store.distances(params), expect, rtol=1e-6, atol=0)  # float32 results


def test_a_copy_larger_than_a_window_is_a_file_not_process_memory_on_the_cpu(tmp_path):
    params = [torch.ones(weight_copy.IN_MEMORY_BYTES // 4 + 1)]
    store = WeightCopy(params, directory=str(tmp_path))
    assert store._file is not None and store._file.tell() == weight_copy.IN_MEMORY_BYTES + 4  # the process keeps no tensor of it
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing to clean up if the process dies
    store.close()


def test_a_copy_no_larger_than_a_window_stays_in_process_memory_on_the_cpu(tmp_path):
    """A file would save nothing worth its system calls (the pass maps the whole of it at once anyway)."""
    params = [torch.ones(weight_copy.IN_MEMORY_BYTES // 8), torch.ones(weight_copy.IN_MEMORY_BYTES // 8)]
    store = WeightCopy(params, directory=str(tmp_path))
    assert store._file is None and store._host.numel() == weight_copy.IN_MEMORY_BYTES
    assert list(tmp_path.iterdir()) == []
    with torch.no_grad():
        params[1].add_(2.0)
    assert store.distances(params).tolist() == pytest.approx([0.0, 2.0 * (weight_copy.IN_MEMORY_BYTES // 8) ** 0.5], rel=1e-6)
    store.close()


def _tensor_bytes_left_allocated(work) -> int:
    """Bytes of CPU tensor memory that `work()` allocated and did not free, from the allocator's own events
    (the profiler's allocation records): exact, unlike the process's resident size."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = work()
    nodes, live = list(prof.profiler.kineto_results.experimental_event_tree()), {}
    while nodes:
        node = nodes.pop()
        nodes += node.children
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            live[fields.ptr] = live.get(fields.ptr, 0) + fields.alloc_size  # a free is a negative size
    del kept
    return sum(live.values())


def test_the_copy_keeps_no_tensor_memory_between_reads_on_the_cpu(on_file, tmp_path):
    """Beside the CPU the copy holds only its file: a read buffer kept between logged steps would be alive at every
    training step's memory peak (4 MB for a ResNet-18)."""
    params = [torch.randn(300_000), torch.randn(1000)]
    held = _tensor_bytes_left_allocated(lambda: WeightCopy(params, directory=str(tmp_path)))
    assert held < 1024  # a per-chunk index of which parameter each segment belongs to, nothing the size of a chunk
    store = WeightCopy(params, directory=str(tmp_path))
    held = _tensor_bytes_left_allocated(lambda: (store.take(params), store.distances(params))[1])
    assert held == 4 * 2  # the two float32 distances it returned
    store.close()


@pytest.mark.parametrize("in_memory_bytes", [0, weight_copy.IN_MEMORY_BYTES])
def test_take_overwrites_the_copy_in_place_with_the_weights_of_now(monkeypatch, tmp_path, in_memory_bytes):
    """The pre-step copy is retaken at every logged step: the same file, no growth, and the distances measured
    from the latest take only (the update of that step, not of the steps since construction)."""
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in [(6, 5), (9,)]]
    monkeypatch.setattr(weight_copy, "IN_MEMORY_BYTES", in_memory_bytes)
    store = WeightCopy(params, directory=str(tmp_path), chunk_numel=16)
    held = store._host if store._file is None else None
    with torch.no_grad():
        for p in params:
            p.add_(10.0)  # an earlier step, far away
    before = [p.detach().clone() for p in params]
    store.take(params)
    size = store._file.tell() if store._file else store._host.numel()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)  # this step's small update
    torch.testing.assert_close(store.distances(params).double(), _independent(params, before), rtol=1e-6, atol=0)
    store.take(params)
    assert (store._file.tell() if store._file else store._host.numel()) == size == 4 * (30 + 9)  # rewritten over the same bytes
    assert held is None or store._host is held
    assert store.distances(params).tolist() == [0.0, 0.0]
    assert list(tmp_path.iterdir()) == []
    store.close()


def test_parameters_with_no_elements_have_distance_zero(on_file, tmp_path):
    store = WeightCopy([torch.zeros(0), torch.zeros(0, 3)], directory=str(tmp_path))
    assert store.distances([torch.zeros(0), torch.zeros(0, 3)]).tolist() == [0.0, 0.0]


def test_other_parameters_are_refused():
    store = WeightCopy([torch.zeros(3)])
    with pytest.raises(ValueError, match="parameters it was built from"):
        store.distances([torch.zeros(4)])
    with pytest.raises(ValueError, match="parameters it was built from"):
        store.take([torch.zeros(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="at least one parameter"):
        WeightCopy([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copy_is_in_pinned_host_memory_and_equals_the_independent_norm():
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(1000, generator=g).cuda(), torch.randn(3, 7, generator=g).cuda()]
    initial = [p.clone() for p in params]
    before = torch.cuda.memory_allocated()
    store = WeightCopy(params, chunk_numel=128)
    assert torch.cuda.memory_allocated() == before  # nothing on the device
    assert all(h.is_pinned() for h in store._host)
    for p in params:
        p.add_(0.25)
    torch.testing.assert_close(store.distances(params).double(), _independent(params, initial), rtol=1e-6, atol=0)
    copy_norms = measure(params, [store], copy_norms=True).copy_norms
    assert copy_norms is not None
    torch.testing.assert_close(copy_norms.double(), torch.stack([torch.linalg.vector_norm(w.double()) for w in initial]), rtol=1e-6, atol=0)
    store.take(params)  # non-blocking copies into the same pinned buffer, ordered by the stream
    assert torch.cuda.memory_allocated() == before
    assert store.distances(params).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("in_memory_bytes", [0, weight_copy.IN_MEMORY_BYTES])
def test_one_pass_measures_every_copy_as_each_would_alone(monkeypatch, in_memory_bytes):
    """A logged step's update and distance from initialisation come from one pass over the weights: each copy's
    distances, and the first copy's norms, equal the independent norms."""
    monkeypatch.setattr(weight_copy, "IN_MEMORY_BYTES", in_memory_bytes)
    g = torch.Generator().manual_seed(4)
    params = [torch.randn(*shape, generator=g) for shape in [(30, 7), (3,), (500,)]]
    initial = [p.clone() for p in params]
    at_init = WeightCopy(params, chunk_numel=64)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g))
    before = [p.clone() for p in params]
    pre_step = WeightCopy(params, chunk_numel=64)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    measured = measure(params, [pre_step, at_init], copy_norms=True)
    torch.testing.assert_close(measured.distances[0].double(), _independent(params, before), rtol=1e-6, atol=0)
    torch.testing.assert_close(measured.distances[1].double(), _independent(params, initial), rtol=1e-6, atol=0)
    assert measured.copy_norms is not None
    torch.testing.assert_close(
        measured.copy_norms.double(), torch.stack([torch.linalg.vector_norm(w.double()) for w in before]), rtol=1e-6, atol=0
    )
    assert torch.equal(measured.distances[1], at_init.distances(params))  # the same arithmetic as alone
    assert measure(params, [at_init]).copy_norms is None


def test_one_pass_refuses_copies_of_other_parameters_or_cut_otherwise():
    params = [torch.zeros(10), torch.zeros(3)]
    with pytest.raises(ValueError, match="same parameters"):
        measure(params, [WeightCopy(params), WeightCopy(params, chunk_numel=4)])
    with pytest.raises(ValueError, match="parameters it was built from"):
        measure([torch.zeros(10)], [WeightCopy(params)])
    with pytest.raises(ValueError, match="at least one"):
        measure(params, [])


@pytest.mark.parametrize("in_memory_bytes", [0, weight_copy.IN_MEMORY_BYTES])
@pytest.mark.parametrize("chunk_numel", [2, 1 << 20])
def test_parameters_of_mixed_dtypes_and_odd_sizes(monkeypatch, in_memory_bytes, chunk_numel):
    """Three bfloat16s (6 bytes) then a float32: each dtype's bytes start where they can be viewed as it."""
    monkeypatch.setattr(weight_copy, "IN_MEMORY_BYTES", in_memory_bytes)
    g = torch.Generator().manual_seed(6)
    params = [
        torch.randn(3, generator=g).bfloat16(),
        torch.randn(5, generator=g),
        torch.randn(1, generator=g).half(),
        torch.randn(3, generator=g, dtype=torch.float64),
        torch.randn(0, generator=g),
        torch.randn(2, generator=g).bfloat16(),
    ]
    initial = [p.clone() for p in params]
    store = WeightCopy(params, chunk_numel=chunk_numel)
    for _ in range(2):  # taken again over the same bytes, padding included
        for p in params:
            p.add_(torch.ones_like(p))
        expect = torch.stack([torch.linalg.vector_norm((p - w0).double()) for p, w0 in zip(params, initial, strict=True)])
        torch.testing.assert_close(store.distances(params).double(), expect, rtol=1e-6, atol=0)
        store.take(params)
        initial = [p.clone() for p in params]
    assert store.distances(params).tolist() == [0.0] * len(params)
    store.close()
