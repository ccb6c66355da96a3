import mmap

import pytest
import torch

from trainwatch.probes import weight_copy
from trainwatch.probes.weight_copy import WeightCopy


def _independent(params: list[torch.Tensor], initial: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.linalg.vector_norm((p.detach() - w0).double()) for p, w0 in zip(params, initial, strict=True)])


@pytest.mark.parametrize("chunk_numel", [1, 7, 16, 1 << 20])  # many chunks per parameter, shared, one in all
def test_distances_equal_the_norm_of_the_difference_with_the_copy_taken_at_construction(chunk_numel):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in [(5, 3), (11,), (2, 2, 2), (0,)]]
    initial = [p.detach().clone() for p in params]
    store = WeightCopy(params, chunk_numel=chunk_numel)
    assert store.distances(params).tolist() == [0.0, 0.0, 0.0, 0.0]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g))  # training moves the weights in place
    got = store.distances(params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _independent(params, initial), rtol=1e-6, atol=0)
    torch.testing.assert_close(store.distances(params), got, rtol=0, atol=0)  # read back again: same answer
    distances, copy_norms = store.distances_and_norms(params)  # the norms of the copy (the weights when it was taken)
    torch.testing.assert_close(distances, got, rtol=0, atol=0)
    torch.testing.assert_close(copy_norms.double(), torch.stack([torch.linalg.vector_norm(w.double()) for w in initial]), rtol=1e-6, atol=0)
    assert all(torch.equal(p.detach(), p.detach().clone()) for p in params)
    store.close()


@pytest.mark.parametrize("map_bytes", [1, 5000, weight_copy.MAP_BYTES])
@pytest.mark.parametrize("chunk_numel", [7, 1000])
def test_the_file_is_mapped_a_window_at_a_time(monkeypatch, tmp_path, map_bytes, chunk_numel):
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


def test_the_copy_is_a_file_not_process_memory_on_the_cpu(tmp_path):
    params = [torch.ones(1000)]
    store = WeightCopy(params, directory=str(tmp_path))
    assert store._file.tell() == 4000  # written out; the process keeps no tensor of it
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing to clean up if the process dies
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


def test_the_copy_keeps_no_tensor_memory_between_reads_on_the_cpu(tmp_path):
    """Beside the CPU the copy holds only its file: a read buffer kept between logged steps would be alive at every
    training step's memory peak (4 MB for a ResNet-18)."""
    params = [torch.randn(300_000), torch.randn(1000)]
    held = _tensor_bytes_left_allocated(lambda: WeightCopy(params, directory=str(tmp_path)))
    assert held < 1024  # a per-chunk index of which parameter each segment belongs to, nothing the size of a chunk
    store = WeightCopy(params, directory=str(tmp_path))
    held = _tensor_bytes_left_allocated(lambda: (store.take(params), store.distances(params))[1])
    assert held == 4 * 2  # the two float32 distances it returned
    store.close()


def test_take_overwrites_the_copy_in_place_with_the_weights_of_now(tmp_path):
    """The pre-step copy is retaken at every logged step: the same file, no growth, and the distances measured
    from the latest take only (the update of that step, not of the steps since construction)."""
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in [(6, 5), (9,)]]
    store = WeightCopy(params, directory=str(tmp_path), chunk_numel=16)
    with torch.no_grad():
        for p in params:
            p.add_(10.0)  # an earlier step, far away
    before = [p.detach().clone() for p in params]
    store.take(params)
    size = store._file.tell()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)  # this step's small update
    torch.testing.assert_close(store.distances(params).double(), _independent(params, before), rtol=1e-6, atol=0)
    store.take(params)
    assert store._file.tell() == size == 4 * (30 + 9)  # rewritten over the same bytes
    assert store.distances(params).tolist() == [0.0, 0.0]
    assert list(tmp_path.iterdir()) == []
    store.close()


def test_parameters_with_no_elements_have_distance_zero(tmp_path):
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
    copy_norms = store.distances_and_norms(params)[1]
    torch.testing.assert_close(copy_norms.double(), torch.stack([torch.linalg.vector_norm(w.double()) for w in initial]), rtol=1e-6, atol=0)
    store.take(params)  # non-blocking copies into the same pinned buffer, ordered by the stream
    assert torch.cuda.memory_allocated() == before
    assert store.distances(params).tolist() == [0.0, 0.0]
