"""The landscape engine against the reference library loss-landscapes (3.0.6) at the same parameter points.

Both evaluate the loss of a real model (an MLP and a small CNN, float32, no BatchNorm or dropout, so train/eval
mode does not matter) on real data (scikit-learn's `load_digits`, 1797 8x8 images). The points are made the
same from loss-landscapes' own source (loss_landscapes/main.py):

* `linear_interpolation(start, end, metric, steps)`: `direction = (end - start) / steps`, then `steps` times
  `start.add_(direction)` *before* each evaluation, so the points are θ_start + t·(θ_end − θ_start) at
  t = 1/steps, 2/steps, …, 1 (t = 0 is never evaluated), accumulated in float32.
* `random_plane(model, metric, distance, steps, 'filter')`: two directions drawn with `torch.rand` from the
  global RNG (uniform in [0, 1], the second made orthogonal to the first *before* normalisation), filter-normalised,
  scaled to a step of ‖θ‖/(distance·steps)/‖d‖, then the walk starts at θ − (steps/2)·(d₁ + d₂) and moves
  along d₂ in a boustrophedon whose odd columns are shifted by one step (see `_random_plane_coords`).
  Seeding the RNG and replaying those operations recovers its directions and its exact lattice.

The first check is the evaluation arithmetic (within 1e-5 relative, both engines); the last documents a measured
difference: its plane has no centre point, ours does.
"""

from __future__ import annotations

import copy

import loss_landscapes
import loss_landscapes.metrics
import numpy as np
import pytest
import torch
from loss_landscapes.model_interface.model_parameters import ModelParameters, orthogonal_to, rand_u_like
from sklearn.datasets import load_digits
from torch import nn

from trainwatch.landscape.surface import Surface, grid_axis, grid_points

RTOL = 1e-5
PLANE_SEED = 123


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


MODELS = {"mlp": (_mlp, 40), "cnn": (_cnn, 15)}  # (constructor, full-batch Adam steps)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Intra-op threads waiting on a busy core make these tiny forwards ~50x slower on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = load_digits(return_X_y=True)
    return torch.tensor(inputs / 16.0, dtype=torch.float32), torch.tensor(targets, dtype=torch.long)


@pytest.fixture(scope="module", params=sorted(MODELS))
def trained(request, digits) -> tuple[str, nn.Module, nn.Module]:
    """(kind, model at initialisation, the same model after a few full-batch Adam steps)."""
    make, steps = MODELS[request.param]
    x, y = digits
    with torch.random.fork_rng():
        torch.manual_seed(0)
        start = make()
        end = copy.deepcopy(start)
        opt = torch.optim.Adam(end.parameters(), lr=2e-2)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(end(x), y).backward()
            opt.step()
    return request.param, start, end


def _evaluate(surface: Surface, points: np.ndarray, mode: str) -> np.ndarray:
    out = np.full(len(points), np.nan)
    for part, losses, _ in surface.evaluate(points, mode, chunk=16):
        out[part] = losses
    assert surface.engine == mode
    return out


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_bitwise(model: nn.Module, saved: list[torch.Tensor]) -> None:
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), saved, strict=True))


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_linear_interpolation_same_points_same_loss(trained, digits, mode):
    kind, start, end = trained
    x, y = digits
    steps = 11
    metric = loss_landscapes.metrics.Loss(nn.CrossEntropyLoss(), x, y)
    reference = loss_landscapes.linear_interpolation(start, end, metric, steps, deepcopy_model=True)

    direction = {name: e.detach() - s.detach() for (name, s), e in zip(start.named_parameters(), end.parameters(), strict=True)}
    t = np.arange(1, steps + 1) / steps  # its points: start + t·(end − start), t = 1/steps … 1
    # three unequal batches: ours is the sample-weighted mean of per-batch means, theirs one mean over all 1797
    batches = [(x[:500], y[:500]), (x[500:1300], y[500:1300]), (x[1300:], y[1300:])]
    saved = _snapshot(start)
    ours = _evaluate(Surface(start, [direction], batches), t[:, None], mode)

    assert reference.shape == (steps,)
    assert reference[0] > 5 * reference[-1], f"{kind}: the line should span a real drop in loss"
    np.testing.assert_allclose(ours, reference, rtol=RTOL, atol=0)
    _assert_bitwise(start, saved)


def _random_plane_directions(model: nn.Module, seed: int, distance: float, steps: int) -> list[dict[str, torch.Tensor]]:
    """loss-landscapes' two random_plane step vectors for `model`, replayed with its own ops from `seed`."""
    start = ModelParameters([p.detach().clone() for p in model.parameters()])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        one = rand_u_like(start)
        two = orthogonal_to(one)
    out = []
    for d in (one, two):
        d.filter_normalize_(start)
        d.mul_(((start.model_norm() / distance) / steps) / d.model_norm())
        out.append(dict(zip([n for n, _ in model.named_parameters()], d.parameters, strict=True)))
    return out


def _random_plane_coords(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The coordinates (in step vectors d₁, d₂) of random_plane's result[i, j].

    It starts at θ − (steps/2)(d₁ + d₂); column i is at (i − steps/2)·d₁; an even column adds d₂ *before* each
    evaluation (offsets 1 … steps), an odd one subtracts d₂ before each and inserts at the front (offsets
    steps−1 … 0). So result[i, j] lies at j + 1 − steps/2 along d₂ for even i and at j − steps/2 for odd i.
    """
    i, j = np.meshgrid(np.arange(steps), np.arange(steps), indexing="ij")
    return i - steps / 2, np.where(i % 2 == 0, j + 1 - steps / 2, j - steps / 2)


@pytest.fixture(scope="module")
def plane(digits) -> tuple[nn.Module, np.ndarray, float]:
    """(trained MLP, loss-landscapes' random_plane(distance=1, steps=21, 'filter') grid, its loss at θ itself)."""
    make, steps = MODELS["mlp"]
    x, y = digits
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = make()
        opt = torch.optim.Adam(model.parameters(), lr=2e-2)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        metric = loss_landscapes.metrics.Loss(nn.CrossEntropyLoss(), x, y)
        torch.manual_seed(PLANE_SEED)
        grid = loss_landscapes.random_plane(model, metric, distance=1, steps=21, normalization="filter", deepcopy_model=True)
        centre = loss_landscapes.point(copy.deepcopy(model), metric)
    return model, grid, centre


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_random_plane_replayed_points_same_loss(plane, digits, mode):
    model, grid, _ = plane
    x, y = digits
    steps = 21
    c1, c2 = _random_plane_coords(steps)
    surface = Surface(model, _random_plane_directions(model, PLANE_SEED, 1.0, steps), [(x, y)])
    saved = _snapshot(model)
    ours = _evaluate(surface, np.stack([c1.ravel(), c2.ravel()], axis=1), mode).reshape(steps, steps)
    np.testing.assert_allclose(ours, grid, rtol=RTOL, atol=0)
    _assert_bitwise(model, saved)
    # the odd-column shift is real: a uniform lattice (offset j + 1 − steps/2 in every column) does not match
    uniform = _evaluate(surface, np.stack([c1.ravel(), (c2 + (c1 + steps / 2) % 2).ravel()], axis=1), mode).reshape(steps, steps)
    assert np.allclose(uniform[0::2], grid[0::2], rtol=RTOL, atol=0)
    assert not np.allclose(uniform[1::2], grid[1::2], rtol=1e-2, atol=0)


def test_random_plane_has_no_centre_point_ours_does(plane, digits):
    """Measured difference: with odd steps=21, distance=1, loss-landscapes' plane spans [−0.5, +0.452]·‖θ‖ along
    d₁ in half-integer steps, so the trained model is not on its grid; grid_axis(21, 1.0) has the exact 0 at 10."""
    model, grid, centre = plane
    x, y = digits
    assert grid.shape == (21, 21)
    assert not np.any(grid == centre)
    assert grid.min() > centre  # here the trained model is below every point of its plane: the minimum is missed
    c1, c2 = _random_plane_coords(21)
    assert np.all(c1 % 1 == 0.5) and np.all(c2 % 1 == 0.5)  # no coordinate is 0
    assert (c1.min() / 21, c1.max() / 21) == (-0.5, 9.5 / 21)

    axis = grid_axis(21, 1.0)
    assert axis.shape == (21,) and axis[10] == 0.0 and axis[0] == -1.0 and axis[-1] == 1.0
    points = grid_points([axis, axis])
    assert np.array_equal(points[10 * 21 + 10], [0.0, 0.0])
    directions = _random_plane_directions(model, PLANE_SEED, 1.0, 21)
    (_, losses, _), *_ = Surface(model, directions, [(x, y)]).evaluate(points[10 * 21 + 10 : 10 * 21 + 11], "loop")
    assert losses[0] == centre  # bitwise: the loop writes θ₀ itself at the centre
