"""The landscape engine against closed forms and invariants: directions, grid arithmetic, restore, engines."""

import numpy as np
import pytest
import torch
from torch import nn

from trainwatch.landscape import directions as D
from trainwatch.landscape.compute import LandscapeSpec, compute_landscape
from trainwatch.landscape.surface import Surface, grid_axis, grid_points


def _evaluate(surface: Surface, points: np.ndarray, mode: str, chunk: int = 8) -> np.ndarray:
    out = np.full(len(points), np.nan)
    for part, loss, _ in surface.evaluate(points, mode, chunk):
        out[part] = loss
    return out


def test_quadratic_oracle_linear_regression_non_square_grid():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randn(40, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(4, 1).double()
    d1 = {"weight": torch.randn(1, 4, generator=g, dtype=torch.float64), "bias": torch.randn(1, generator=g, dtype=torch.float64)}
    d2 = {"weight": torch.randn(1, 4, generator=g, dtype=torch.float64), "bias": torch.randn(1, generator=g, dtype=torch.float64)}
    a, b = grid_axis(5, 0.7), grid_axis(7, 1.3)
    points = grid_points([a, b])
    # closed form: L(a, b) = mean((X(w0 + a u + b v) + (c0 + a s + b t) - y)^2) with numpy in float64
    X, Y = x.numpy(), y.numpy()[:, 0]
    w0, c0 = model.weight.detach().numpy()[0], model.bias.detach().numpy()[0]
    expect = [
        np.mean(
            (
                X @ (w0 + p * d1["weight"].numpy()[0] + q * d2["weight"].numpy()[0])
                + c0
                + p * d1["bias"].numpy()[0]
                + q * d2["bias"].numpy()[0]
                - Y
            )
            ** 2
        )
        for p, q in points
    ]
    surface = Surface(model, [d1, d2], [(x[:16], y[:16]), (x[16:], y[16:])], torch.nn.functional.mse_loss)
    for mode in ("loop", "vmap"):
        np.testing.assert_allclose(_evaluate(surface, points, mode), expect, rtol=1e-10, atol=0)
    assert points.shape == (35, 2) and np.count_nonzero((points == 0).all(1)) == 1


def _bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 3),
    )  # fmt: skip


def _data(n: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [(x[:32], y[:32]), (x[32:], y[32:])]


def _trained_bn_cnn() -> nn.Module:
    model = _bn_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _data() * 3:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_filter_normalisation_zero_bias_bn_and_transposed_filters():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 5, 3), nn.Flatten(), nn.Linear(5 * 8 * 8, 3))
    model.add_module("emb", nn.Embedding(7, 6))
    (d,) = D.directions_for(model, 1, seed=3)
    for name, w in model.named_parameters():
        if w.dim() <= 1:
            assert torch.count_nonzero(d[name]) == 0, name  # biases and BN scale/shift: zero direction
            continue
        dim = 1 if name in ("2.weight", "emb.weight") else 0
        wn = torch.linalg.vector_norm(w.detach().movedim(dim, 0).reshape(w.shape[dim], -1), dim=1)
        dn = torch.linalg.vector_norm(d[name].movedim(dim, 0).reshape(w.shape[dim], -1), dim=1)
        torch.testing.assert_close(dn, wn, rtol=1e-5, atol=1e-7)
    (same,) = D.directions_for(model, 1, seed=3)
    assert all(torch.equal(d[n], same[n]) for n in d)
    (keep,) = D.directions_for(model, 1, seed=3, ignore="none")
    assert torch.equal(keep["0.bias"], model[0].bias.detach())


def test_rescaling_filters_before_batchnorm_leaves_the_landscape_unchanged():
    data = _data()
    base = _trained_bn_cnn().eval()
    scaled = _trained_bn_cnn().eval()
    with torch.no_grad():  # the same function: conv filters x10, BN running statistics rescaled to match
        scaled[0].weight.mul_(10)
        scaled[1].running_mean.mul_(10)
        scaled[1].running_var.mul_(100)
        scaled[1].eps *= 100
    spec = LandscapeSpec(steps=5, span=0.5, mode="loop")
    a = compute_landscape(base, data, spec)
    b = compute_landscape(scaled, data, spec)
    np.testing.assert_allclose(b.loss, a.loss, rtol=1e-4)


def test_centre_restore_repeatability_and_engines_agree():
    data = _data()
    model = _trained_bn_cnn()
    model.train()  # the job must not depend on, nor change, the mode it finds
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = LandscapeSpec(steps=5, span=0.4, mode="loop", seed=7)
    loop = compute_landscape(model, data, spec)
    vmap = compute_landscape(model, data, LandscapeSpec(steps=5, span=0.4, mode="vmap", seed=7))
    auto = compute_landscape(model, data, LandscapeSpec(steps=5, span=0.4, mode="auto", seed=7, chunk=12))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise, buffers included
    model.eval()
    with torch.no_grad():
        expect = sum(nn.functional.cross_entropy(model(x), y, reduction="sum").item() for x, y in data) / 48
    assert loop.centre == pytest.approx(expect, rel=1e-6)
    np.testing.assert_allclose(vmap.loss, loop.loss, rtol=1e-5)
    np.testing.assert_allclose(auto.loss, loop.loss, rtol=1e-5)
    np.testing.assert_allclose(loop.loss[:, 2], loop.curve, rtol=1e-6)  # the β=0 column is the 1-D curve
    again = compute_landscape(model, data, spec)
    np.testing.assert_array_equal(again.loss, loop.loss)
    assert loop.accuracy is not None and 0 <= loop.accuracy.min() <= loop.accuracy.max() <= 1
    m = loop.metrics(0.2)
    assert m["centre_loss"] == loop.centre and m["sharpness"] >= 0
    assert np.isnan(loop.metrics(0.05)["sharpness"])  # spacing 0.2: no point but the centre within 0.05


def test_bn_batch_statistics_mode_uses_batch_stats_and_restores_buffers():
    data = _data()
    model = _trained_bn_cnn().eval()
    buffers = [b.clone() for b in model.buffers()]
    train_bn = compute_landscape(model, data, LandscapeSpec(steps=3, span=0.2, bn_mode="train", mode="auto"))
    eval_bn = compute_landscape(model, data, LandscapeSpec(steps=3, span=0.2))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert not np.allclose(train_bn.loss, eval_bn.loss)
    with pytest.raises(ValueError, match="bn_mode='eval'"):
        next(Surface(model, D.directions_for(model, 1, 0), data, bn_mode="train").evaluate(np.zeros((1, 1)), "vmap"))


def test_interrupted_job_resumes_from_partial_results(tmp_path):
    data = _data()
    model = _trained_bn_cnn()
    spec = LandscapeSpec(steps=5, span=0.4, mode="loop", chunk=4)
    full = compute_landscape(model, data, spec)
    # interrupt: evaluate only the curve and 2 chunks of the surface, then resume
    from trainwatch.landscape import compute as job

    class Stop(Exception):
        pass

    real = job._evaluate

    def interrupted(surface, points, spec, partial, key, label=""):
        if partial is not None and partial.name == "surface.npz":
            seen = 0
            gen = surface.evaluate

            def limited(points, mode, chunk):
                nonlocal seen
                for item in gen(points, mode, chunk):
                    yield item
                    seen += 1
                    if seen == 2:
                        raise Stop

            surface.evaluate = limited
        return real(surface, points, spec, partial, key, label)

    job._evaluate = interrupted
    try:
        with pytest.raises(Stop):
            compute_landscape(model, data, spec, partial_dir=tmp_path)
    finally:
        job._evaluate = real
    saved = np.load(tmp_path / "surface.npz")
    assert saved["done"].sum() == 8
    resumed_points = []
    orig = Surface.evaluate

    def spy(self, points, mode="auto", chunk=64):
        resumed_points.append(len(points))
        return orig(self, points, mode, chunk)

    Surface.evaluate = spy
    try:
        resumed = compute_landscape(model, data, spec, partial_dir=tmp_path)
    finally:
        Surface.evaluate = orig
    assert resumed_points == [0, 25 - 8]  # the curve was complete; the surface resumes after its 8 points
    np.testing.assert_array_equal(resumed.loss, full.loss)


@pytest.mark.parametrize(
    "steps, span, match",
    [(4, 1.0, "odd number"), (5, 0.0, "span must be > 0"), (5, -1.0, "span must be > 0"), (5, float("inf"), "finite")],
)
def test_bad_grid_settings_fail_before_any_work(steps, span, match):
    with pytest.raises(ValueError, match=match):
        LandscapeSpec(steps=steps, span=span)


@pytest.mark.parametrize("name", ["../../escape", "/abs", "a/b", "", ".hidden", "x" * 65])
def test_landscape_names_cannot_leave_their_folder(name):
    with pytest.raises(ValueError, match="must not leave it"):
        LandscapeSpec(name=name)


class _Recurrent(nn.Module):
    """An LSTM classifier: vmap cannot batch its parameters, so "auto" must fall back to the loop."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(20, 8), nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(x))[0][:, -1])


@pytest.mark.parametrize(("make", "steps", "chunk"), [(_Recurrent, 5, 64), (_Recurrent, 1, 64), (_trained_bn_cnn, 5, 1)])
def test_auto_mode_falls_back_to_the_loop_when_vmap_cannot_serve(make, steps, chunk):
    torch.manual_seed(0)
    model = make()
    if make is _Recurrent:
        g = torch.Generator().manual_seed(1)
        data = [(torch.randint(0, 20, (16, 6), generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    else:
        data = _data()
    auto = compute_landscape(model, data, LandscapeSpec(steps=steps, span=0.4, mode="auto", seed=3, chunk=chunk))
    loop = compute_landscape(model, data, LandscapeSpec(steps=steps, span=0.4, mode="loop", seed=3, chunk=chunk))
    assert np.isfinite(auto.loss).all()
    np.testing.assert_allclose(auto.loss, loop.loss, rtol=1e-5)
