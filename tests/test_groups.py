import pytest
import torch
from torch import nn

from trainwatch.capture import Capture
from trainwatch.groups import (
    ACT_FAMILIES,
    PARAM_FAMILIES,
    activation_modules,
    bind,
    key_segment,
    param_modules,
    plan_groups,
    resolve_names,
    untrained_subtrees,
)
from trainwatch.record import Packer


def _bottleneck(c: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c, c, 1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, c, 3),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, c, 1),
        nn.BatchNorm2d(c),
    )


def resnet50_like() -> nn.Module:
    """ResNet-50's module structure (3-4-6-3 bottlenecks, stem, fc), with 4 channels everywhere."""
    layers = {f"layer{i + 1}": nn.Sequential(*[_bottleneck(4) for _ in range(n)]) for i, n in enumerate((3, 4, 6, 3))}
    return nn.Sequential(nn.ModuleDict({"conv1": nn.Conv2d(3, 4, 7), "bn1": nn.BatchNorm2d(4), **layers}), nn.Linear(4, 10))


def test_small_model_gets_one_group_per_module_named_as_in_named_modules():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    plan = plan_groups(param_modules(model), activation_modules(model), 300, 20, order=[n for n, _ in model.named_modules()])
    assert plan.depth is None
    assert [g.key for g in plan.groups] == ["0", "1", "2"]
    assert plan.groups[1].param_modules == () and plan.groups[1].act_modules == ("1",)


def test_resnet50_sized_model_fits_the_key_budget_by_blocks():
    model = resnet50_like()
    params, acts = param_modules(model), activation_modules(model)
    assert len(params) > 90
    plan = plan_groups(params, acts, 300, 20)
    assert plan.keys <= 280 and plan.depth is not None
    covered = [m for g in plan.groups for m in g.param_modules]
    assert sorted(covered) == sorted(params)  # every module is in exactly one group
    assert len({g.key for g in plan.groups}) == len(plan.groups)
    # the finest grouping that fits is chosen: one level deeper would not fit
    assert plan.to_json()["grouping"].startswith("prefix_depth_")


def test_flat_model_with_too_many_blocks_is_grouped_in_ranges():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(200)])
    plan = plan_groups(param_modules(model), [], 300, 20)
    assert plan.keys <= 280
    assert plan.groups[0].key == "0..4" and plan.groups[0].param_modules == tuple(str(i) for i in range(5))
    assert sum(len(g.param_modules) for g in plan.groups) == 200


def test_key_segments_are_valid_mlflow_keys_and_unique():
    assert key_segment("") == "_root"
    assert key_segment("a[0]=b#c") == "a_5b0_5d_3db_23c"
    assert key_segment("x,y+z@w%v//u/t:s") == "x_2cy_2bz_40w_25v_2f_2fu_2ft_3as"
    assert key_segment("ünï") == "_c3bcn_c3af" and key_segment("..") == "_2e_2e"
    import re

    from mlflow.utils.validation import _validate_metric_name

    for name in ["a[0]", "/lead", "a//b", "x,y=z", "p#q@r%s", "..", "tab\tname"]:
        segment = key_segment(name)
        assert re.fullmatch(r"[A-Za-z0-9_\-. ]+", segment)
        _validate_metric_name(f"grad_norm/{segment}")  # raises on a key MLflow rejects
    plan = plan_groups(["a[0]", "a_5b0_5d"], [], 300, 20)
    assert [g.key for g in plan.groups] == ["a_5b0_5d", "a_5b0_5d-2"]  # a clash gets a suffix; groups.json maps back
    assert plan.to_json()["groups"][0]["param_modules"] == ["a[0]"]


def test_bind_maps_parameters_to_their_group():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    model[2].bias.requires_grad_(False)
    b = bind(plan_groups(param_modules(model), activation_modules(model), 300, 20, order=[n for n, _ in model.named_modules()]), model)
    assert b.param_names == ("0.weight", "0.bias", "2.weight")
    assert b.param_index == (0, 0, 1) and b.param_keys == ("0", "2")
    assert b.act_keys == ("0", "1", "2") and b.act_modules[1] is model[1]


def test_unknown_module_name_says_what_to_use():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    assert resolve_names(model, ["0"], "modules") == ["0"]
    with pytest.raises(ValueError, match=r"`TrainWatch\(modules=...\)` names module 'O'.*named_modules"):
        resolve_names(model, ["O"], "modules")


def test_family_counts_are_the_documented_ones():
    assert len(PARAM_FAMILIES) == 7 and len(ACT_FAMILIES) == 4


class TiedLM(nn.Module):
    """Input embedding and output head share one weight (GPT-2/T5 style weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict({"emb": nn.Embedding(50, 16), "body": nn.Linear(16, 16)})
        self.dec = nn.ModuleDict({"head": nn.Linear(16, 50, bias=False)})
        self.dec.head.weight = self.enc.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dec.head(torch.tanh(self.enc.body(self.enc.emb(tokens))))


@pytest.mark.parametrize("budget", [300, 31])  # one group per module; then everything in one block
def test_a_tied_parameter_is_counted_once_with_its_first_owner(budget):
    torch.manual_seed(0)
    model = TiedLM()
    tokens = torch.randint(0, 50, (4, 7))
    nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    assert param_modules(model) == ["enc.emb", "enc.body"]  # dec.head owns nothing of its own
    binding = bind(plan_groups(param_modules(model), [], budget, 20), model)
    assert binding.param_names == ("enc.emb.weight", "enc.body.weight", "enc.body.bias")
    packer = Packer(0)
    Capture(binding, torch.device("cpu"), distance_from_init=False).gradients(packer)
    metrics = packer.ship().resolve().metrics
    expect = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()])).item()
    assert metrics["train/grad_norm_total"] == pytest.approx(expect, rel=1e-6)


def test_attention_is_watched_as_a_whole_not_through_its_never_called_out_proj():
    """`nn.MultiheadAttention` passes `out_proj.weight` to a functional call: `out_proj`'s forward never runs, so its
    hook would log zeros. The attention's own output is watched instead."""
    model = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 8, batch_first=True), 1), nn.Linear(4, 2))
    acts = activation_modules(model)
    assert "0.layers.0.self_attn" in acts and not any(n.startswith("0.layers.0.self_attn.") for n in acts)
    assert {"0.layers.0.linear1", "0.layers.0.norm1", "1"} <= set(acts)
    fired: list[str] = []
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: fired.append(n)) for n in acts]
    model.eval()
    model(torch.randn(3, 5, 4))
    assert set(fired) == set(acts)  # every watched module's forward runs
    fired.clear()
    with torch.no_grad():  # as the probe forwards: eval mode, no autograd
        model(torch.randn(3, 5, 4))
    for h in handles:
        h.remove()
    assert set(fired) == set(acts)


def test_parametrized_weights_belong_to_their_module():
    """Weight norm and spectral norm (`torch.nn.utils.parametrize`) move a weight into a `parametrizations`
    container whose modules compute it: their parameters count as the layer's, the layer's output is watched, and
    the parametrization modules are not (their output is a weight, not an activation)."""
    from torch.nn.utils import parametrizations

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    parametrizations.weight_norm(model[0])
    parametrizations.spectral_norm(model[2])
    assert param_modules(model) == ["0", "2"]
    assert activation_modules(model) == ["0", "1", "2"]
    binding = bind(plan_groups(param_modules(model), activation_modules(model), 300, 20), model)
    assert set(binding.param_names) == {
        "0.bias", "0.parametrizations.weight.original0", "0.parametrizations.weight.original1",
        "2.bias", "2.parametrizations.weight.original",
    }  # fmt: skip
    assert len(binding.params) == len(list(model.parameters()))


def test_a_trained_predicate_leaves_out_what_it_rejects_from_plan_and_binding():
    """The callback narrows `trained` to what the optimizers hold: a module all of whose parameters it rejects has no
    group, and a module with some rejected keeps only the others."""
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1))
    held = {id(model[0].weight), id(model[0].bias), id(model[2].weight)}
    trained = lambda p: p.requires_grad and id(p) in held
    assert param_modules(model, trained) == ["0", "2"]
    plan = plan_groups(param_modules(model, trained), [], 300, 20, order=[n for n, _ in model.named_modules()])
    binding = bind(plan, model, trained)
    assert binding.param_names == ("0.weight", "0.bias", "2.weight")


def test_untrained_subtrees_are_the_outermost_copies_the_optimizers_do_not_hold():
    """An EMA copy (parameters requiring grad, none held) is one subtree; a frozen layer (requires_grad=False) is
    no untrained copy, and a module with one held parameter is trained."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    model = nn.ModuleDict({"net": net, "ema": nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), "frozen": nn.Linear(1, 1)})
    model["frozen"].requires_grad_(False)
    held = {id(p) for p in net.parameters()} - {id(net[2].bias)}
    assert untrained_subtrees(model, lambda p: p.requires_grad and id(p) in held) == ["ema"]
    assert untrained_subtrees(model, lambda p: p.requires_grad) == []
