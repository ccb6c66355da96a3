import numpy as np
import pytest
import torch
from torch import nn

from trainwatch.probes import activations as A


def _independent_histogram(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The same binning, written with NumPy loops: zero in the middle, magnitude bins mirrored by sign."""
    e = len(edges)
    counts = np.zeros(A.num_bins(torch.tensor(edges)))
    zero = e + 1
    for v in x.ravel():
        if np.isnan(v):
            counts[2 * zero + 1] += 1
        elif v == np.inf:
            counts[2 * zero + 2] += 1
        elif v == -np.inf:
            counts[2 * zero + 3] += 1
        elif v == 0:
            counts[zero] += 1
        else:
            m = int(np.searchsorted(edges, abs(v), side="left"))
            counts[zero + 1 + m if v > 0 else zero - 1 - m] += 1
    return counts


def test_histogram_matches_independent_binning_and_sums_to_numel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * torch.logspace(-8, 6, 1000)
    x[::97] = 0
    x[5], x[6], x[7] = float("nan"), float("inf"), float("-inf")
    counts = A.histogram_counts(x)
    assert counts.sum().item() == x.numel()
    expect = _independent_histogram(x.numpy().astype(np.float64), A.EDGES.numpy())
    np.testing.assert_array_equal(counts.numpy(), expect)
    assert len(A.histogram_labels()) == A.num_bins()


def test_histogram_is_exact_at_edges_subnormals_signed_zero_and_signed_nan():
    e = A.EDGES.to(torch.float32)
    near = [e, torch.nextafter(e, torch.tensor(np.inf)), torch.nextafter(e, torch.tensor(0.0))]
    negative_nan = torch.from_numpy(np.array([0xFFC00000], dtype=np.uint32).view(np.float32))
    specials = torch.tensor([0.0, -0.0, 1e-40, -1e-41, np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-7, 2e4])
    x = torch.cat([*near, *(-t for t in near), specials, negative_nan])
    expect = _independent_histogram(x.numpy().astype(np.float64), A.EDGES.numpy())
    np.testing.assert_array_equal(A.histogram_counts(x).numpy(), expect)
    # float16 and float64 inputs are binned as their float32 values
    half = torch.randn(500, generator=torch.Generator().manual_seed(3)).half()
    np.testing.assert_array_equal(A.histogram_counts(half).numpy(), A.histogram_counts(half.float()).numpy())
    np.testing.assert_array_equal(A.histogram_counts(x.double()).numpy(), expect)


def test_sync_free_slot_counts_stay_exact_beyond_float32_integers():
    """The CUDA counting path (histc, run here on the CPU) with more than 2^24 elements in one slot, as the zero
    slot of a large probe's ReLU outputs: one histc call would count 2^24 + 3 as 2^24 + 4."""
    slots = torch.cat([torch.tensor([1, 2, 2, 6, 7]), torch.zeros((1 << 24) + 3, dtype=torch.int64)])
    expect = torch.bincount(slots, minlength=8).double()
    assert torch.histc(slots.float(), bins=8, min=0, max=8)[0].item() != expect[0].item()  # the float32 limit is real
    assert torch.equal(A._histc_counts(slots, 8), expect)
    assert torch.equal(A._histc_counts(slots[:1000], 8, chunk=7), torch.bincount(slots[:1000], minlength=8).double())


def test_deterministic_mode_counts_are_exact_in_parts():
    """The counting path for `torch.use_deterministic_algorithms(True)` on CUDA (histc raises there), run on the CPU:
    parts with a remainder, one slot holding nearly all, and no slots at all."""
    slots = torch.cat([torch.tensor([1, 2, 2, 6, 7], dtype=torch.int32), torch.zeros(1000, dtype=torch.int32)])
    torch.use_deterministic_algorithms(True)
    try:
        counts = A._indexed_counts(slots, 8, chunk=7)
        empty = A._indexed_counts(slots[:0], 8)
    finally:
        torch.use_deterministic_algorithms(False)
    assert counts.dtype == torch.int64 and torch.equal(counts, torch.bincount(slots, minlength=8))
    assert torch.equal(empty, torch.zeros(8, dtype=torch.int64))


def test_summary_columns_match_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(16, 4, 5, generator=g))
    x[:, 2] = 0  # a dead channel: zero for every sample
    s = A.activation_summary(x)
    col = {c: s[i].item() for i, c in enumerate(A.STAT_COLUMNS)}
    assert col["numel"] == x.numel() and col["finite"] == x.numel()
    assert col["sum"] / col["finite"] == pytest.approx(x.mean().item(), rel=1e-6)
    assert col["zeros"] == (x == 0).sum().item()
    never_active = (~(x != 0).any(0)).sum().item()
    assert col["dead"] == never_active >= 5
    assert col["positions"] == 20
    assert s[len(A.STAT_COLUMNS) :].sum().item() == x.numel()


def test_summary_with_non_finite_values_counts_them_and_sums_only_finite_ones():
    g = torch.Generator().manual_seed(4)
    x = torch.relu(torch.randn(8, 3, 4, generator=g))
    x[:, 0] = 0  # dead channel
    x[:, 1] = 0
    x[2, 1, 0] = float("nan")  # otherwise dead, but a NaN fires
    x[5, 2, 3], x[6, 2, 3] = float("inf"), float("-inf")
    col = {c: v.item() for c, v in zip(A.STAT_COLUMNS, A.activation_summary(x), strict=False)}
    finite = x[torch.isfinite(x)]
    assert col["nonfinite"] == 3 and col["finite"] == x.numel() - 3
    assert col["sum"] == pytest.approx(finite.sum().item(), rel=1e-6)
    assert col["sumsq"] == pytest.approx(finite.square().sum().item(), rel=1e-6)
    assert col["zeros"] == (x == 0).sum().item()
    assert col["dead"] == 4 + 3  # channel 0 (4 positions) and channel 1 except its NaN position
    clean = torch.relu(torch.randn(8, 3, 4, generator=g))
    assert A.activation_summary(clean)[A.STAT_COLUMNS.index("sum")].item() == pytest.approx(clean.sum().item(), rel=1e-6)


def test_saturating_modules_are_tanh_and_sigmoid_families_not_relu6():
    kinds = [A.saturation_kind(m) for m in (nn.Tanh(), nn.Hardtanh(), nn.Sigmoid(), nn.Hardsigmoid(), nn.ReLU6(), nn.ReLU())]
    assert kinds == ["tanh", "tanh", "sigmoid", "sigmoid", None, None]


def test_saturation_per_kind():
    x = torch.tensor([[-0.995, 0.0, 0.5, 0.999]])
    assert A.saturation_mask(x, "tanh").sum().item() == 2
    assert A.saturation_mask(torch.tensor([0.001, 0.5, 0.995]), "sigmoid").sum().item() == 2
    with pytest.raises(ValueError, match="'tanh' or 'sigmoid'"):
        A.saturation_mask(x, "relu")


def test_pooled_group_stats_equal_stats_of_concatenation():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(8, 3, generator=g), torch.tanh(3 * torch.randn(8, 5, generator=g))
    summaries = torch.stack([A.activation_summary(a), A.activation_summary(b, "tanh")])
    pooled = A.pool_summaries(summaries, torch.tensor([0, 0]), 1)
    both = torch.cat([a.reshape(-1), b.reshape(-1)]).double()
    assert pooled["act_mean"].item() == pytest.approx(both.mean().item(), rel=1e-5)  # float32 sums
    assert pooled["act_std"].item() == pytest.approx(both.std(unbiased=False).item(), rel=1e-5)
    assert pooled["act_saturated_frac"].item() == pytest.approx((b.abs() > 0.99).float().mean().item())


def test_a_module_that_fires_twice_counts_the_dead_units_of_both_outputs():
    """One ReLU instance reused after two layers (as torchvision's BasicBlock does): two different activations."""
    relu = nn.ReLU()
    a, b = nn.Linear(3, 6), nn.Linear(6, 4)
    with torch.no_grad():
        a.bias[:2], b.bias[:1] = -100.0, -100.0  # 2 units of the first output and 1 of the second never fire
    probe = A.ActivationProbe([("relu", relu)])
    probe.arm()
    x = torch.randn(8, 3)
    first = relu(a(x))
    second = relu(b(first))
    probe.disarm()
    row = dict(zip(A.STAT_COLUMNS, probe.collect(torch.device("cpu"))[0].tolist(), strict=False))
    dead = sum(int((out == 0).all(0).sum()) for out in (first, second))
    assert (row["dead"], row["positions"], row["numel"]) == (dead, 6 + 4, 8 * (6 + 4))
    assert dead >= 3


def test_probe_hooks_fire_and_are_removed():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LSTM(4, 2, batch_first=True))
    probe = A.ActivationProbe([("0", net[0]), ("1", net[1])])
    probe.arm()
    x = torch.randn(5, 3)
    net[1](net[0](x))
    probe.disarm()
    assert all(not m._forward_hooks for m in net.modules())
    out = probe.collect(torch.device("cpu"))
    assert out.shape == (2, len(A.STAT_COLUMNS) + A.num_bins())
    assert out[0, 0].item() == 20 and out[1, 4].item() == (net[1](net[0](x)) == 0).sum().item()
    assert A.first_tensor((torch.ones(2), torch.zeros(1))) is not None
    assert A.first_tensor(torch.ones(2, dtype=torch.long)) is None


def _independent_summary(x: torch.Tensor) -> dict[str, float]:
    finite = x[torch.isfinite(x)].double()
    return {
        "numel": x.numel(),
        "finite": finite.numel(),
        "sum": finite.sum().item(),
        "sumsq": finite.square().sum().item(),
        "zeros": (x == 0).sum().item(),
        "nonfinite": (~torch.isfinite(x)).sum().item(),
        "dead": (x == 0).all(0).sum().item(),
        "positions": x[0].numel(),
    }


@pytest.mark.parametrize("chunk", [1, 7, 60, 1 << 18])  # below one sample, a few samples, uneven, all at once
def test_a_summary_taken_in_parts_equals_the_independent_one(monkeypatch, chunk):
    """Large activations are summarised a run of samples at a time (bounded temporaries): the parts must add up
    to exactly the summary of the whole, dead units (zero for every sample of every part) included."""
    monkeypatch.setattr(A, "SUMMARY_CHUNK_NUMEL", chunk)
    g = torch.Generator().manual_seed(5)
    x = torch.relu(torch.randn(13, 4, 5, generator=g))
    x[:, 1] = 0  # a dead channel
    x[12, 1, 3] = 1.0  # ... except one position, alive only in the last sample (the last part)
    x[3, 2, 2], x[9, 0, 0] = float("nan"), float("inf")
    got = dict(zip(A.STAT_COLUMNS, A.activation_summary(x).tolist(), strict=False))
    expect = _independent_summary(x)
    assert {k: got[k] for k in ("numel", "finite", "zeros", "nonfinite", "dead", "positions")} == {
        k: expect[k] for k in ("numel", "finite", "zeros", "nonfinite", "dead", "positions")
    }
    assert expect["dead"] == 4  # channel 1 but its last-sample position
    assert got["sum"] == pytest.approx(expect["sum"], rel=1e-6) and got["sumsq"] == pytest.approx(expect["sumsq"], rel=1e-6)
    np.testing.assert_array_equal(A.activation_summary(x)[len(A.STAT_COLUMNS) :].numpy(), A.histogram_counts(x).numpy())
    flat = torch.randn(301, generator=g)  # an unbatched activation in parts
    assert A.activation_summary(flat)[: len(A.STAT_COLUMNS)].tolist()[0] == 301
    np.testing.assert_array_equal(A.activation_summary(flat)[len(A.STAT_COLUMNS) :].numpy(), A.histogram_counts(flat).numpy())


def _peak_tensor_bytes(work) -> int:
    """Peak CPU tensor memory that `work()` allocated above what was allocated when it started, from the allocator's
    events (exact, unlike the process's resident size)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    nodes, events = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while nodes:
        node = nodes.pop()
        nodes += node.children
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    now = peak = 0
    for _, size in sorted(events):
        now += size
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # mixed precision: converted a run at a time
def test_a_large_activation_is_summarised_in_bounded_memory(dtype):
    """A probe's largest activation (here 16 M values) must not need twice its size again in temporaries: on a GPU
    that can be the difference between a probe and an out-of-memory error."""
    x = torch.relu(torch.randn(64, 64, 64, 64)).to(dtype)
    peak = _peak_tensor_bytes(lambda: A.activation_summary(x))
    assert peak < 6 * A.SUMMARY_CHUNK_NUMEL * 4  # a few chunk-sized temporaries (6 MB), not activation-sized ones (64 MB)
    assert peak > 0


def test_dead_units_of_a_probe_forwarded_in_parts_are_those_of_the_whole_batch():
    """Forwarding the probe batch in micro-batches must not turn a unit that fires in one of them into a dead one,
    and must keep the two firings of a reused module apart."""
    relu = nn.ReLU()
    a, b = nn.Linear(3, 6), nn.Linear(6, 6)
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(6)).clamp(-0.4, 0.4)
    x[8, 0] = 1.0  # unit 2 of the first output fires for this sample only: in the last micro-batch
    with torch.no_grad():
        a.bias[:2], b.bias[:1] = -100.0, -100.0  # never fire
        a.weight[2], a.bias[2] = torch.tensor([1.0, 0.0, 0.0]), -0.5
        expect = sum(int((out == 0).all(0).sum()) for out in (relu(a(x)), relu(b(relu(a(x))))))
        assert relu(a(x))[:, 2].nonzero().flatten().tolist() == [8]  # alive, in the third part of four only
    whole, parts = A.ActivationProbe([("relu", relu)]), A.ActivationProbe([("relu", relu)])
    with torch.no_grad():
        for probe, batches in ((whole, [x]), (parts, list(x.split(3)))):
            for batch in batches:
                probe.arm()  # a pass: firings are matched by their order within it
                relu(b(relu(a(batch))))
                probe.disarm()
    row_whole = dict(zip(A.STAT_COLUMNS, whole.collect(torch.device("cpu"))[0].tolist(), strict=False))
    row_parts = dict(zip(A.STAT_COLUMNS, parts.collect(torch.device("cpu"))[0].tolist(), strict=False))
    assert expect >= 3  # units 0, 1 of the first output and unit 0 of the second at least
    assert row_whole["dead"] == row_parts["dead"] == expect
    assert row_whole["positions"] == row_parts["positions"] == 6 + 6
    assert row_whole["numel"] == row_parts["numel"] == 10 * 12
    assert row_parts["sum"] == pytest.approx(row_whole["sum"], rel=1e-6)


def test_a_sequence_first_output_has_its_samples_in_the_second_dimension():
    """An LSTM with batch_first=False outputs [time, samples, features]: its units are the (time, feature) positions,
    and a probe forwarded in parts must count the same units as one forward of the whole batch."""
    torch.manual_seed(7)
    lstm = nn.LSTM(3, 4)
    relu = nn.ReLU()
    x = torch.randn(5, 10, 3)  # 5 time steps, 10 samples
    whole, parts = A.ActivationProbe([("relu", relu)]), A.ActivationProbe([("relu", relu)])
    with torch.no_grad():
        for probe, batches in ((whole, [x]), (parts, list(x.tensor_split(3, dim=1)))):
            for batch in batches:
                probe.arm(batch.shape[1])
                relu(lstm(batch)[0] - 0.1)
                probe.disarm()
        out = relu(lstm(x)[0] - 0.1)
    expect_dead = int((out == 0).all(1).sum())  # zero for every sample, per (time, feature)
    for probe in (whole, parts):
        row = dict(zip(A.STAT_COLUMNS, probe.collect(torch.device("cpu"))[0].tolist(), strict=False))
        assert (row["dead"], row["positions"], row["numel"]) == (expect_dead, 5 * 4, 5 * 10 * 4)
    assert 0 < expect_dead < 20


def test_a_group_with_no_finite_output_has_nan_mean_and_std_not_zeros():
    """Weights gone NaN make every output NaN: a mean of 0 would read as a quiet layer. A group that produced no
    output at all is 0 (it logs nothing: the callback leaves such groups out)."""
    nan, fine = torch.full((4, 3), torch.nan), torch.tensor([[1.0, 3.0]])
    summaries = torch.stack([A.activation_summary(nan), A.activation_summary(fine)])
    pooled = A.pool_summaries(summaries, torch.tensor([0, 1]), 3)
    assert pooled["act_mean"][0].isnan() and pooled["act_std"][0].isnan()
    assert (pooled["act_mean"][1].item(), pooled["act_std"][1].item()) == pytest.approx((2.0, 1.0))
    assert (pooled["act_mean"][2].item(), pooled["act_std"][2].item()) == (0.0, 0.0)
    assert pooled["act_zero_frac"][0].item() == 0.0
