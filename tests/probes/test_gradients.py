import math

import pytest
import torch

from trainwatch.probes import gradients as G
from trainwatch.probes.nonfinite import NonfiniteWatch


def _tensors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=g)
    a[0, :3] = 0
    b = torch.randn(11, generator=g)
    b[2], b[5], b[7] = float("nan"), float("inf"), float("-inf")
    c = torch.zeros(3, 3)
    return [a, b, c]


def test_tensor_stats_match_independent_computation():
    ts = _tensors()
    s = G.tensor_stats(ts)
    for i, t in enumerate(ts):
        finite_norm = torch.linalg.vector_norm(t)
        if torch.isfinite(t).all():
            assert s.sq_norm[i].sqrt().item() == pytest.approx(finite_norm.item(), rel=1e-6)
            assert s.max_abs[i].item() == pytest.approx(t.abs().max().item())
        assert s.nonfinite[i].item() == (~torch.isfinite(t)).sum().item()
        assert s.zeros[i].item() == (t == 0).sum().item()
        assert s.numel[i].item() == t.numel()
    assert math.isnan(s.sq_norm[1].item())  # non-finite values are counted and visible, never dropped


@pytest.mark.parametrize("small", [4, 1 << 15], ids=["in-pieces", "whole"])
def test_count_nonfinite(monkeypatch, small):
    monkeypatch.setattr(G, "_SMALL", small)
    monkeypatch.setattr(G, "CPU_COUNT_CHUNK", 4)
    extremes = torch.tensor([3e38, -3e38, 1e-45, -1e-45, -0.0, float("nan"), -float("nan")])
    ts = [*_tensors(), extremes, extremes.to(torch.bfloat16), extremes.double().t()]
    assert G.count_nonfinite(ts).tolist() == [0.0, 3.0, 0.0, 2.0, 2.0, 2.0]


def test_count_nonfinite_skips_only_when_every_max_is_finite():
    ts = _tensors()
    finite = [ts[0], ts[2]]
    assert G.count_nonfinite(finite, G.tensor_stats(finite).max_abs).tolist() == [0.0, 0.0]
    only_inf = [torch.tensor([1.0, float("inf"), -float("inf")]), torch.tensor([float("nan"), 1e30])]
    max_abs = G.tensor_stats(only_inf).max_abs
    assert G.count_nonfinite(only_inf, max_abs).tolist() == [2.0, 1.0]


def test_group_norm_is_norm_of_concatenation():
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(4, 3, generator=g), torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    index = torch.tensor([0, 0, 1])
    grouped = G.group_grad_stats(G.tensor_stats(ts), index, 2)
    expect0 = torch.linalg.vector_norm(torch.cat([ts[0].reshape(-1), ts[1]]))
    assert grouped.norm[0].item() == pytest.approx(expect0.item(), rel=1e-6)
    assert grouped.norm[1].item() == pytest.approx(torch.linalg.vector_norm(ts[2]).item(), rel=1e-6)
    assert grouped.max_abs[0].item() == pytest.approx(max(ts[0].abs().max().item(), ts[1].abs().max().item()))
    total = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in ts]))
    assert G.total_norm(G.tensor_stats(ts)).item() == pytest.approx(total.item(), rel=1e-6)


def test_group_max_propagates_nan():
    values = torch.tensor([1.0, float("nan"), 3.0])
    out = G.group_max(values, torch.tensor([0, 0, 1]), 2)
    assert math.isnan(out[0].item()) and out[1].item() == 3.0


def test_grad_stats_treats_missing_grad_as_zero():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))
    b.grad = torch.tensor([[3.0, 0.0], [4.0, 0.0]])
    s = G.grad_stats([a, b])
    assert s.sq_norm.tolist() == [0.0, 25.0]
    assert s.zeros.tolist() == [3.0, 2.0]
    assert s.numel.tolist() == [3.0, 4.0]


def test_update_and_distance_norms():
    p = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([3.0]))]
    before = G.snapshot(p)
    with torch.no_grad():
        p[0].add_(torch.tensor([3.0, 4.0]))
    assert G.update_norms(p, before).tolist() == [5.0, 0.0]


def test_empty_input_is_an_error():
    with pytest.raises(ValueError, match="at least one tensor"):
        G.tensor_stats([])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
def test_cpu_max_abs_and_nonzero_equal_the_fused_norms_used_on_cuda(dtype):
    """The CPU path (the bits of |x| counted and maximised as integers) gives exactly what the fused inf/L0 norms
    give, including NaN of either sign (max is NaN; NaN counts as non-zero), ±Inf, -0.0, subnormals, all-negative
    and empty tensors (max 0)."""
    g = torch.Generator().manual_seed(2)
    cases = [
        *_tensors(),
        -torch.rand(6, generator=g) - 1,  # all negative: |min| is the max
        torch.tensor([-0.0, 0.0, -0.0]),
        torch.tensor([float("nan")]),
        -torch.tensor([3.0, float("nan")]),  # a NaN with its sign bit set
        torch.tensor([1.0, float("-inf")]),
        torch.tensor([-0.0, -torch.finfo(dtype).tiny / 4, torch.finfo(dtype).tiny / 8]),  # subnormals only
        torch.empty(0),
        torch.randn(3, 4, 5, generator=g),
    ]
    ts = [t.to(dtype) for t in cases]
    stand_ins = [t if t.numel() else t.new_zeros(1) for t in ts]  # the fused inf-norm refuses empty tensors
    expected_max = torch.stack([n.float() for n in torch._foreach_norm(stand_ins, float("inf"))])
    expected_nonzero = torch.stack([n.float() for n in torch._foreach_norm(ts, 0.0)])
    torch.testing.assert_close(G.max_abs(ts), expected_max, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(G.count_nonzero(ts), expected_nonzero, rtol=0, atol=0)
    assert G.max_abs(ts).dtype == G.count_nonzero(ts).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
def test_cpu_zero_count_in_pieces_equals_the_fused_l0_norm(monkeypatch, dtype):
    """Tensors larger than the buffer are counted piece by piece: scattered +0.0 and -0.0 are zeros, NaN and ±Inf
    are not, a transposed (non-contiguous) tensor and a last short piece are counted whole."""
    monkeypatch.setattr(G, "_SMALL", 4)
    monkeypatch.setattr(G, "CPU_COUNT_CHUNK", 5)
    g = torch.Generator().manual_seed(3)
    scattered = torch.randn(9, 7, generator=g) * (torch.rand(9, 7, generator=g) > 0.4)
    scattered[scattered == 0] = torch.tensor([-0.0, 0.0]).repeat(40)[: int((scattered == 0).sum())]
    with_inf = scattered.clone()
    with_inf[6, 1], with_inf[8, 0] = float("inf"), float("-inf")  # Inf in the middle and in the last, short piece
    with_nan = with_inf.clone()
    with_nan[1, 2] = float("nan")
    largest = scattered.abs().max().item()
    scattered[5, 5] = -2 * largest  # the largest |x| is negative and in a piece of its own
    ts = [t.to(dtype) for t in (scattered, scattered.t(), with_inf, with_nan, with_nan.t())]
    ts += [torch.tensor([-0.0, 1.0, 0.0], dtype=dtype), torch.zeros(6, dtype=dtype)]
    expected = torch.stack([n.float() for n in torch._foreach_norm(ts, 0.0)])
    assert torch.equal(G.count_nonzero(ts), expected)
    assert expected[0].item() == (scattered != 0).sum().item() < scattered.numel() - 10  # the case holds many zeros
    expected_max = torch.stack([n.float() for n in torch._foreach_norm(ts, float("inf"))])
    torch.testing.assert_close(G.max_abs(ts), expected_max, equal_nan=True, rtol=0, atol=0)
    top = ts[0].abs().max().item()
    assert G.max_abs(ts)[:3].tolist() == [top, top, float("inf")]
    assert G.max_abs(ts)[3:5].isnan().all()
    counts, maxes = G.nonzero_and_max_abs(ts)
    assert torch.equal(counts, expected) and torch.equal(maxes.nan_to_num(), expected_max.nan_to_num())
    stats = G.tensor_stats(ts)  # the L2 norms from the same pass, in pieces (float64 sums of float32 piece norms)
    torch.testing.assert_close(stats.sq_norm.sqrt(), G.norms(ts, 2.0), equal_nan=True, rtol=2e-6, atol=0)
    assert torch.equal(stats.zeros, stats.numel - expected) and torch.equal(stats.max_abs.nan_to_num(), expected_max.nan_to_num())
    assert stats.nonfinite.tolist() == [0.0, 0.0, 2.0, 3.0, 3.0, 0.0, 0.0]


@pytest.mark.parametrize("small", [4, 1 << 15], ids=["in-pieces", "whole"])
def test_statistics_of_gradients_that_track_autograd(monkeypatch, small):
    """`backward(create_graph=True)` (gradient penalties, second-order methods) leaves gradients that require grad:
    they are read detached, with the same counts."""
    monkeypatch.setattr(G, "_SMALL", small)
    layer = torch.nn.Linear(16, 16)
    (layer(torch.randn(8, 16)).relu() ** 2).sum().backward(create_graph=True)
    grads = [p.grad for p in layer.parameters()]
    grads[0].data[0, 3] = float("nan")
    assert all(g.requires_grad for g in grads)
    stats = G.grad_stats(list(layer.parameters()))
    assert stats.zeros.tolist() == [float((g == 0).sum()) for g in grads]
    assert stats.nonfinite.tolist() == [1.0, 0.0]


def test_a_dense_non_contiguous_tensor_is_counted_in_place(monkeypatch):
    """channels_last, transposed and permuted tensors are read through a flat view of their storage (no copy); one
    with gaps or one that overlaps itself (expanded) through a copy; the counts are the same."""
    monkeypatch.setattr(G, "_SMALL", 4)
    monkeypatch.setattr(G, "CPU_COUNT_CHUNK", 7)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 3, 4, 5, generator=g).masked_fill_(torch.rand(2, 3, 4, 5, generator=g) > 0.5, 0.0)
    dense = [base.to(memory_format=torch.channels_last), base[0, 0].t(), base.permute(3, 1, 0, 2)]
    for t in dense:
        assert G._flat(t).untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    gappy, expanded = base[:, 1], base[0, :, :1].expand(3, 4, 5)  # the latter overlaps itself
    ts = [*dense, gappy, expanded]
    assert G.count_nonzero(ts).tolist() == [float((t != 0).sum()) for t in ts]
    assert G.max_abs(ts).tolist() == [t.abs().max().item() for t in ts]


def test_cpu_zero_count_and_max_of_integer_tensors():
    ts = [torch.tensor([0, 3, -5, 0]), torch.tensor([1.0, 0.0]), torch.tensor([], dtype=torch.long)]
    assert G.count_nonzero(ts).tolist() == [2.0, 1.0, 0.0]
    assert G.max_abs(ts).tolist() == [5.0, 1.0, 0.0]


def test_float64_tensors_get_float32_statistics():
    """`precision="64-true"` trains in float64: its statistics are computed (in float64) and reported as float32."""
    ts = [t.double() for t in _tensors()] + [torch.randn(3)]
    s = G.tensor_stats(ts)
    assert s.sq_norm.dtype == s.max_abs.dtype == torch.float32
    assert s.sq_norm[0].sqrt().item() == pytest.approx(torch.linalg.vector_norm(ts[0]).item(), rel=1e-6)
    assert s.max_abs[3].item() == pytest.approx(ts[3].abs().max().item())


def test_sparse_gradients_count_as_their_dense_values():
    """A sparse COO gradient (`nn.Embedding(sparse=True)`) with an index stored twice (summed when dense), and a
    NaN among the stored values: statistics and the non-finite check equal the dense gradient's."""
    coo, dense = torch.nn.Parameter(torch.zeros(6, 2)), torch.nn.Parameter(torch.zeros(3))
    coo.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1, 4]]), torch.tensor([[1.0, -2.0], [3.0, 0.5], [0.0, 7.0]]), (6, 2))
    dense.grad = torch.tensor([0.0, -5.0, 1.0])
    stats = G.grad_stats([coo, dense])
    for got, want in zip(stats, G.tensor_stats([coo.grad.to_dense(), dense.grad]), strict=True):
        torch.testing.assert_close(got, want)
    assert stats.zeros.tolist() == [12 - 3, 1] and stats.max_abs.tolist() == [7.0, 5.0]
    coo.grad = torch.sparse_coo_tensor(torch.tensor([[2]]), torch.tensor([[float("nan"), 1.0]]), (6, 2))
    watch = NonfiniteWatch([coo, dense], torch.tensor([0, 1]), 2, torch.device("cpu"))
    assert bool(watch.check(7)) and watch.first_groups.tolist() == [True, False]
    assert G.grad_stats([coo, dense]).nonfinite.tolist() == [1, 0]


def test_complex_tensors_have_the_norms_of_their_complex_values():
    """Complex weights and gradients: L2, max and zero count of the moduli (torch's norms refuse a float32
    accumulator for them)."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 3, generator=g, dtype=torch.cfloat)
    z[0, :] = 0
    p = torch.nn.Parameter(torch.zeros_like(z))
    p.grad = z
    torch.testing.assert_close(G.norms([z, z.real], 2.0), torch.stack([torch.linalg.vector_norm(z), torch.linalg.vector_norm(z.real)]))
    stats = G.grad_stats([p])
    torch.testing.assert_close(stats.sq_norm.sqrt(), torch.linalg.vector_norm(z).reshape(1))
    assert stats.max_abs.item() == z.abs().max().item() and stats.zeros.item() == 3
