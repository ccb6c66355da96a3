"""The CAM functional core against oracles that need no other CAM library."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainwatch import cam


class GapNet(nn.Module):
    """conv → ReLU → global average pool → linear: the architecture of Zhou et al.'s CAM."""

    def __init__(self, inplace: bool = False, channels: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def _net(inplace: bool = False) -> GapNet:
    torch.manual_seed(0)
    return GapNet(inplace).eval()


def test_grad_cam_equals_closed_form_cam_on_gap_architecture():
    net = _net()
    x = torch.randn(3, 3, 10, 12)
    targets = torch.tensor([0, 2, 3])
    raw = cam.grad_cam(net, x, "relu", targets, normalize=False)
    a = net.relu(net.conv(x))
    closed = torch.einsum("bk,bkhw->bhw", net.fc.weight[targets], a) / (10 * 12)  # α_k = w_ck / HW
    torch.testing.assert_close(raw, F.relu(closed), atol=1e-5, rtol=1e-5)
    norm = cam.grad_cam(net, x, "relu", targets)
    torch.testing.assert_close(norm, cam.normalize_maps(F.relu(closed)), atol=1e-5, rtol=1e-5)
    assert norm.amin().item() >= 0 and norm.amax().item() <= 1 + 1e-6


def test_blob_detector_peak_follows_the_blob():
    conv = nn.Conv2d(1, 1, 5, padding=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1 / 25)
    fc = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    net = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval()
    for cy, cx in [(6, 6), (20, 10), (12, 25)]:
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        x = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8)[None, None]
        for method in ("grad_cam", "grad_cam_pp", "hires_cam", "layer_cam"):
            m = cam.METHODS[method](net, x, "1", torch.tensor([0]))[0]
            py, px = divmod(int(m.argmax()), 32)
            assert abs(py - cy) <= 1 and abs(px - cx) <= 1, (method, (py, px), (cy, cx))


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_pp", "hires_cam", "layer_cam", "saliency", "guided_backprop", "guided_grad_cam"])
def test_batched_equals_one_at_a_time_and_inplace_relu_changes_nothing(method):
    x = torch.randn(4, 3, 8, 8)
    targets = torch.tensor([1, 0, 3, 2])
    fn = cam.METHODS[method]
    batched = fn(_net(), x, "conv", targets)
    single = torch.cat([fn(_net(), x[i : i + 1], "conv", targets[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fn(_net(inplace=True), x, "conv", targets), batched, atol=1e-6, rtol=1e-5)
    assert batched.shape == (4, 8, 8)


def test_model_is_left_untouched():
    net = _net()
    net.train()
    (net(torch.randn(2, 3, 8, 8)).sum()).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    for fn in cam.METHODS.values():
        fn(net, torch.randn(2, 3, 8, 8), "conv", torch.tensor([0, 1]))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters(), strict=True))
    assert net.training
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())


def test_works_under_no_grad_and_inference_mode():
    net, x, t = _net(), torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    expect = cam.grad_cam(net, x, "conv", t)
    with torch.no_grad():
        torch.testing.assert_close(cam.grad_cam(net, x, "conv", t), expect)
    with torch.inference_mode():
        x_inf = x.clone()
        torch.testing.assert_close(cam.grad_cam(net, x_inf, "conv", t), expect)


def test_saliency_is_the_input_gradient():
    net, x, t = _net(), torch.randn(2, 3, 8, 8), torch.tensor([3, 1])
    xr = x.clone().requires_grad_(True)
    net(xr).gather(1, t[:, None]).sum().backward()
    expect = xr.grad.abs().amax(1)
    torch.testing.assert_close(cam.saliency(net, x, None, t, normalize=False), expect)


def test_guided_backprop_zeroes_negative_gradients_at_relus():
    torch.manual_seed(1)
    lin1, lin2 = nn.Linear(6, 5), nn.Linear(5, 2)
    net = nn.Sequential(nn.Flatten(), lin1, nn.ReLU(), lin2).eval()
    x = torch.randn(1, 1, 6)
    # by hand: the gradient at the ReLU output is w2[c]; keep it where it is > 0 and the ReLU was active
    g = lin2.weight[1] * (lin1(x[:, 0])[0] > 0) * (lin2.weight[1] > 0)
    expect = (g @ lin1.weight).abs()
    got = cam.guided_backprop(net, x, None, torch.tensor([1]), normalize=False)
    torch.testing.assert_close(got.reshape(-1), expect.reshape(-1), atol=1e-6, rtol=1e-5)
    plain = cam.saliency(net, x, None, torch.tensor([1]), normalize=False)
    assert not torch.allclose(got, plain)  # the guided rule changed something


def test_occlusion_on_a_linear_model_is_weight_times_input():
    w = torch.randn(1, 1, 6, 6)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 1, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(w.reshape(1, 36))
    x = torch.randn(2, 1, 6, 6)
    got = cam.occlusion(net, x, torch.tensor([0, 0]), window=1, stride=1, normalize=False)
    torch.testing.assert_close(got, F.relu(w[0, 0] * x[:, 0]), atol=1e-5, rtol=1e-5)


def test_occlusion_covers_the_trailing_positions_a_stride_would_skip():
    """9 wide, window 4, stride 2: starts 0, 2, 4 and then 5, flush with the edge; a linear model's drop is w·x."""
    w = torch.rand(1, 1, 9, 9) + 0.5
    net = nn.Sequential(nn.Flatten(), nn.Linear(81, 1, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(w.reshape(1, 81))
    x = torch.rand(1, 1, 9, 9) + 0.5  # w·x > 0 everywhere, so every covered position has a drop
    got = cam.occlusion(net, x, torch.tensor([0]), window=4, stride=2, normalize=False)
    assert (got[0, -1, :] > 0).all() and (got[0, :, -1] > 0).all()


def test_grad_cam_pp_is_the_papers_formula():
    """Against Chattopadhay et al.'s closed form written out on activations and gradients taken with autograd
    directly: α = g² / (2g² + (Σ_ab A_ab)·g³), 0 where g = 0; weights Σ_ij α·ReLU(g); map ReLU(Σ_k w_k A_k)."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()  # fmt: skip
    x, targets = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    a = net[:1](x).detach().requires_grad_(True)  # the first conv's output: the ReLU after it zeroes gradients
    score = net[1:](a).gather(1, targets[:, None]).sum()
    (g,) = torch.autograd.grad(score, a)
    a, g = a.detach().double(), g.double()
    alpha = torch.where(g != 0, g**2 / (2 * g**2 + a.sum((2, 3), keepdim=True) * g**3), 0.0)
    weights = (alpha * g.clamp_min(0)).sum((2, 3), keepdim=True)
    expect = F.relu((weights * a).sum(1)).float()
    assert (g < 0).any() and (g == 0).any()  # gradients of both signs, and zeros from the ReLU after the layer
    torch.testing.assert_close(cam.grad_cam_pp(net, x, "0", targets, normalize=False), expect, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_pp", "hires_cam", "layer_cam"])
def test_a_frozen_backbone_still_gets_maps(method):
    """Fine-tuning: nothing up to the CAM layer requires grad, so the layer's output has no graph of its own."""
    net = _net()
    for p in net.conv.parameters():
        p.requires_grad_(False)
    x, targets = torch.randn(2, 3, 10, 12), torch.tensor([1, 3])
    frozen = getattr(cam, method)(net, x, "relu", targets, normalize=False)
    for p in net.conv.parameters():
        p.requires_grad_(True)
    torch.testing.assert_close(frozen, getattr(cam, method)(net, x, "relu", targets, normalize=False))
    assert net.conv.weight.grad is None and net.fc.weight.grad is None  # nothing accumulated on the model


def test_conv1d_time_series_and_token_reshape():
    torch.manual_seed(0)
    net1d = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 2, 20)
    maps = cam.grad_cam(net1d, x, None, torch.tensor([0, 2]))
    assert maps.shape == (2, 20)
    assert cam.default_layer_name(net1d, x) == "1"  # the ReLU: the pool's [B, C, 1] has nothing to localise

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            tokens = self.embed(x).flatten(2).transpose(1, 2)  # [B, 16, 8]
            return self.head(self.mix(tokens).mean(1))

    to_grid = lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], 4, 4)
    maps = cam.grad_cam(Tokens().eval(), torch.randn(2, 3, 16, 16), "mix", torch.tensor([0, 1]), reshape=to_grid)
    assert maps.shape == (2, 16, 16)


def test_bad_input_is_explained():
    net, x = _net(), torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"'convv' is not in `model.named_modules\(\)`; closest names: \['conv'\]"):
        cam.grad_cam(net, x, "convv", torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no spatial dimensions"):
        cam.grad_cam(net, x, "fc", torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 4\), got \[0, 7\]"):
        cam.grad_cam(net, x, "conv", torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="one class index per input"):
        cam.grad_cam(net, x, "conv", torch.tensor([0]))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    with pytest.raises(ValueError, match="has a spatial output"):
        cam.default_layer_name(mlp, x)


@pytest.mark.parametrize("method", ["grad_cam", "guided_backprop"])
def test_a_compiled_model_gets_the_maps_of_its_eager_self(method):
    """The functional API on a `torch.compile`d module: its hooks must fire, so it runs eagerly."""
    net = _net()
    x, targets = torch.randn(2, 3, 10, 12), torch.tensor([1, 3])
    eager = getattr(cam, method)(net, x, "relu", targets)
    compiled = torch.compile(net, backend="eager")
    compiled(x)  # compiled once, as in training
    torch.testing.assert_close(getattr(cam, method)(compiled, x, "_orig_mod.relu", targets), eager)
    torch.testing.assert_close(cam.grad_cam(compiled, x, None, targets), cam.grad_cam(net, x, None, targets))  # default layer


def test_normalised_maps_of_a_small_head_reach_one_and_a_constant_map_is_zero():
    """A head initialised small (timm's head_init_scale) gives maps of 1e-9: min-max must not squash them."""
    net = _net()
    with torch.no_grad():
        net.fc.weight.mul_(1e-6)
    maps = cam.grad_cam(net, torch.randn(2, 3, 10, 12), "relu", torch.tensor([0, 1]))
    torch.testing.assert_close(maps.amax((1, 2)), torch.ones(2))
    assert torch.equal(cam.normalize_maps(torch.full((1, 4, 4), 3.0)), torch.zeros(1, 4, 4))
    flat = torch.full((1, 4, 4), 3.0)
    flat[0, 0, 0] = 3.0 + 1e-7  # float rounding of a constant, not a map
    assert torch.equal(cam.normalize_maps(flat), torch.zeros(1, 4, 4))


class _Outputs(nn.Module):
    """The GAP net with its scores wrapped as other forwards return them."""

    def __init__(self, net: nn.Module, form: str) -> None:
        super().__init__()
        self.net, self.form = net, form

    def forward(self, x):
        logits = self.net(x)
        if self.form == "dict":
            return {"loss": logits.sum(), "logits": logits}
        if self.form == "output_object":  # an object with a `logits` attribute, as outputs of many libraries are
            from types import SimpleNamespace

            return SimpleNamespace(logits=logits, hidden_states=None)
        return logits, logits.detach() * 0  # (logits, aux)


@pytest.mark.parametrize("form", ["dict", "output_object", "tuple"])
@pytest.mark.parametrize("method", ["grad_cam", "saliency"])
def test_scores_in_a_dict_or_tuple_give_the_maps_of_the_plain_scores(form, method):
    net = _net()
    x, targets = torch.randn(2, 3, 10, 12), torch.tensor([1, 3])
    wrapped = _Outputs(net, form)
    plain = getattr(cam, method)(net, x, "relu", targets)
    torch.testing.assert_close(getattr(cam, method)(wrapped, x, "net.relu", targets), plain)


def test_outputs_without_class_scores_say_what_cam_needs():
    with pytest.raises(ValueError, match=r"it returned a dict with keys 'loss', 'hidden'"):
        cam.class_scores({"loss": torch.zeros(()), "hidden": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match=r"shape \[batch, classes\]; the model's forward gave shape \(2, 4, 8, 8\)"):
        cam.class_scores(torch.zeros(2, 4, 8, 8))  # a segmentation map
