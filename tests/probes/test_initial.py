import pytest
import torch

from trainwatch.probes.initial import InitialWeights


def _independent(params: list[torch.Tensor], initial: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.linalg.vector_norm((p.detach() - w0).double()) for p, w0 in zip(params, initial, strict=True)])


@pytest.mark.parametrize("chunk_numel", [1, 7, 16, 1 << 20])  # many chunks per parameter, shared, one in all
def test_distances_equal_the_norm_of_the_difference_with_the_copy_taken_at_construction(chunk_numel):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in [(5, 3), (11,), (2, 2, 2), (0,)]]
    initial = [p.detach().clone() for p in params]
    store = InitialWeights(params, chunk_numel=chunk_numel)
    assert store.distances(params).tolist() == [0.0, 0.0, 0.0, 0.0]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g))  # training moves the weights in place
    got = store.distances(params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _independent(params, initial), rtol=1e-6, atol=0)
    torch.testing.assert_close(store.distances(params), got, rtol=0, atol=0)  # read back again: same answer
    assert all(torch.equal(p.detach(), p.detach().clone()) for p in params)
    store.close()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_distances_for_other_dtypes(dtype):
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(300, generator=g).to(dtype), torch.randn(4, 5, generator=g).to(dtype), torch.randn(7, generator=g)]
    initial = [p.clone() for p in params]
    store = InitialWeights(params, chunk_numel=64)
    for p in params:
        p.mul_(1.5)
    expect = torch.stack([torch.linalg.vector_norm((p - w0).float()) for p, w0 in zip(params, initial, strict=True)])
    torch.testing.assert_close(store.distances(params), expect, rtol=1e-6, atol=0)  # float32 results


def test_the_copy_is_a_file_not_process_memory_on_the_cpu(tmp_path):
    params = [torch.ones(1000)]
    store = InitialWeights(params, directory=str(tmp_path))
    assert store._file.tell() == 4000  # written out; the process keeps no tensor of it
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing to clean up if the process dies
    store.close()


def test_other_parameters_are_refused():
    store = InitialWeights([torch.zeros(3)])
    with pytest.raises(ValueError, match="parameters it was built from"):
        store.distances([torch.zeros(4)])
    with pytest.raises(ValueError, match="at least one parameter"):
        InitialWeights([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copy_is_in_pinned_host_memory_and_equals_the_independent_norm():
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(1000, generator=g).cuda(), torch.randn(3, 7, generator=g).cuda()]
    initial = [p.clone() for p in params]
    before = torch.cuda.memory_allocated()
    store = InitialWeights(params, chunk_numel=128)
    assert torch.cuda.memory_allocated() == before  # nothing on the device
    assert all(h.is_pinned() for h in store._host)
    for p in params:
        p.add_(0.25)
    torch.testing.assert_close(store.distances(params).double(), _independent(params, initial), rtol=1e-6, atol=0)
