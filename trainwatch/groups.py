"""The metric-key contract: which modules form which group, under the metric-key budget.

Owns `<family>/<group>` naming and `groups.json`; it never computes statistics or talks to MLflow.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils import parametrize

PARAM_FAMILIES = ("grad_norm", "grad_max", "grad_nonfinite", "grad_zero_frac", "weight_norm", "update_ratio", "weight_dist_init")
ACT_FAMILIES = ("act_mean", "act_std", "act_zero_frac", "act_saturated_frac")
ROOT_GROUP = "_root"

# MLflow accepts alphanumerics, `_ - . space : /` in metric keys; we keep `/` for the family separator only.
_INVALID = re.compile(r"[^A-Za-z0-9_\-. ]")  # what every MLflow server accepts in a key (Windows ones reject `:`)
_SKIPPED_LEAVES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten, nn.Unflatten)
_CALLS_CHILDREN_WEIGHTS = (nn.MultiheadAttention,)  # passes out_proj.weight to a functional call, never out_proj()


@dataclass(frozen=True)
class Group:
    """One metric-key group: its key segment and the module names it pools."""

    key: str
    param_modules: tuple[str, ...] = ()
    act_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroupPlan:
    """All groups of a model, and how they were chosen."""

    groups: tuple[Group, ...]
    depth: int | None  # None: one group per module; otherwise the name-prefix depth (ranges may pool siblings)
    budget: int
    keys: int = field(default=0)
    reserved: int = 0  # keys set aside for what is logged outside the groups

    def to_json(self) -> dict:
        return {
            "version": 1,
            "grouping": "module" if self.depth is None else f"prefix_depth_{self.depth}",
            "max_metric_keys": self.budget,
            "metric_keys": self.keys,
            "reserved_keys": self.reserved,
            "param_families": list(PARAM_FAMILIES),
            "activation_families": list(ACT_FAMILIES),
            "groups": [
                {"key": g.key, "param_modules": list(g.param_modules), "activation_modules": list(g.act_modules)} for g in self.groups
            ],
        }


def key_segment(module_name: str) -> str:
    """A module name as a metric-key segment: the root module is `_root`; a character MLflow rejects (or `/`,
    which would nest chart sections, or `:`) becomes `_` and its UTF-8 bytes in hex (`a[0]` -> `a_5b0_5d`).
    Keys stay readable; `trainwatch/groups.json` maps every key back to its exact module names."""
    if module_name == "":
        return ROOT_GROUP
    segment = _INVALID.sub(lambda m: "_" + m.group(0).encode().hex(), module_name)
    return segment.replace(".", "_2e") if set(segment) == {"."} else segment  # `..` would resolve as a path


Trained = Callable[[nn.Parameter], bool]  # which parameters the fit trains; by default those that require grad


def requires_grad(p: nn.Parameter) -> bool:
    return p.requires_grad


@dataclass(frozen=True)
class HeldBy:
    """`Trained`: a parameter that requires grad and is one of `ids` (those the optimizers hold). A class, not a
    closure, so that the callback pickles (`ddp_spawn` sends it to its processes)."""

    ids: frozenset[int]

    def __call__(self, p: nn.Parameter) -> bool:
        return p.requires_grad and id(p) in self.ids


def param_modules(model: nn.Module, trained: Trained = requires_grad) -> list[str]:
    """Names of modules that own trained parameters directly, in `named_modules()` order. A parameter shared by
    several modules (tied weights) belongs to the first of them, as in `named_parameters()`: counted once. The
    parameters of a parametrized tensor (`torch.nn.utils.parametrize`: weight norm, spectral norm) belong to the
    module the tensor is a weight of, not to its `parametrizations` container."""
    seen: set[int] = set()
    names: list[str] = []
    modules = dict(model.named_modules())
    for name, m in modules.items():
        own = [p for p in m.parameters(recurse=False) if trained(p) and id(p) not in seen]
        seen.update(id(p) for p in m.parameters(recurse=False))
        owner = _parametrized_owner(name, modules)
        key = name if owner is None else owner
        if own and key not in names:
            names.append(key)
    return names


def within(name: str, modules: Iterable[str]) -> bool:
    """Whether module `name` is one of `modules` or lies inside one of them."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def untrained_subtrees(model: nn.Module, trained: Trained) -> list[str]:
    """The outermost modules all of whose parameters that require grad (one at least) `trained` rejects: copies the
    fit does not train, such as an EMA of the model. Their activations are not watched either: the probe's forward of
    the model seldom runs them, and their keys would take the budget, and so the detail, from the model that trains."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or within(name, found):
            continue
        wanted = [p for p in module.parameters() if p.requires_grad]
        if wanted and not any(trained(p) for p in wanted):
            found.append(name)
    return found


def _parametrized_owner(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The parametrized module `name` lies inside the `parametrizations` container of, if any."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        owner = ".".join(parts[:i])
        if part == "parametrizations" and owner in modules and parametrize.is_parametrized(modules[owner]):
            return owner
    return None


def owned_parameters(module_name: str, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(full name, parameter) of what `param_modules` counts as `module`'s own: its direct parameters and those of its
    parametrized tensors."""
    prefix = f"{module_name}." if module_name else ""
    own = [(prefix + n, p) for n, p in module.named_parameters(recurse=False)]
    if parametrize.is_parametrized(module):
        own += [(f"{prefix}parametrizations.{n}", p) for n, p in module.parametrizations.named_parameters()]
    return own


def activation_modules(model: nn.Module) -> list[str]:
    """Default modules whose outputs are watched: leaves, minus dropout, identity and reshapes; a module that uses
    its children's weights without calling them (`nn.MultiheadAttention` and its `out_proj`) counts as a leaf, its
    output watched instead of children whose forward never runs (they would log zeros); so does a leaf whose
    weights are parametrized (`torch.nn.utils.parametrize`), whose `parametrizations` compute weights."""
    names, opaque = [], ()
    modules = dict(model.named_modules())
    for name, m in modules.items():
        # a parametrized module's `parametrizations` compute its weights (weight norm, ...), not activations
        if not name or name.startswith(opaque) or _parametrized_owner(name, modules) is not None:
            continue
        parametrized = parametrize.is_parametrized(m)
        children = [n for n, _ in m.named_children() if not (parametrized and n == "parametrizations")]
        if isinstance(m, _CALLS_CHILDREN_WEIGHTS):
            opaque += (name + ".",)
            names.append(name)
        elif not children and not isinstance(m, _SKIPPED_LEAVES):
            names.append(name)
    return names


def resolve_names(model: nn.Module, requested: Iterable[str], argument: str) -> list[str]:
    """Check user-given module names (exact names or prefixes) against `named_modules()`.

    Raises ValueError naming the unknown entry, the closest valid names and the argument to fix.
    """
    names = [n for n, _ in model.named_modules()]
    for want in requested:
        if want in names or any(n.startswith(want + ".") for n in names):
            continue
        close = difflib.get_close_matches(want, names, n=3) or names[1:6]
        raise ValueError(
            f"`TrainWatch({argument}=...)` names module {want!r}, which is not in `model.named_modules()`. "
            f"Closest names: {close}. Use a name (or name prefix) printed by `[n for n, _ in model.named_modules()]`."
        )
    return list(requested)


def _prefix(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth]) if name else ""


def _count_keys(groups: Sequence[Group]) -> int:
    return sum(len(PARAM_FAMILIES) * bool(g.param_modules) + len(ACT_FAMILIES) * bool(g.act_modules) for g in groups)


def _group_by(keys_of: dict[str, str], params: Sequence[str], acts: Sequence[str]) -> list[Group]:
    order: dict[str, tuple[list[str], list[str]]] = {}
    for name in keys_of:
        order.setdefault(keys_of[name], ([], []))
    for name in params:
        order[keys_of[name]][0].append(name)
    for name in acts:
        order[keys_of[name]][1].append(name)
    return [Group(k, tuple(p), tuple(a)) for k, (p, a) in order.items()]


def _keys_for(label_of: dict[str, str]) -> dict[str, str]:
    """Map each module to the key of its label (module name, prefix or range); labels that sanitise to the
    same key get `-2`, `-3`, ... so two groups never share a key."""
    key_of_label: dict[str, str] = {}
    used: set[str] = set()
    for label in dict.fromkeys(label_of.values()):
        key, n = key_segment(label), 1
        while key in used:
            n += 1
            key = f"{key_segment(label)}-{n}"
        used.add(key)
        key_of_label[label] = key
    return {name: key_of_label[label] for name, label in label_of.items()}


def plan_groups(params: Sequence[str], acts: Sequence[str], budget: int, reserved: int = 0, order: Sequence[str] = ()) -> GroupPlan:
    """The finest grouping whose keys fit `budget - reserved`: one group per module, else blocks by name
    prefix, refined by ranges of consecutive sibling blocks where that gives more groups. Groups follow `order`
    (the model's `named_modules()`)."""
    room = budget - reserved
    rank = {name: i for i, name in enumerate(order)}
    names = sorted(dict.fromkeys([*params, *acts]), key=lambda n: rank.get(n, len(rank)))
    per_module = _group_by(_keys_for({n: n for n in names}), params, acts)
    if _count_keys(per_module) <= room:
        return GroupPlan(tuple(per_module), None, budget, _count_keys(per_module), reserved)
    max_depth = max((n.count(".") + 1 for n in names if n), default=1)
    best: GroupPlan | None = None
    for depth in range(max_depth - 1, 0, -1):
        groups = _group_by(_keys_for({n: _prefix(n, depth) for n in names}), params, acts)
        if _count_keys(groups) <= room:
            best = GroupPlan(tuple(groups), depth, budget, _count_keys(groups), reserved)
            break
    # Blocks one level finer than `best` did not fit; ranges of them may still beat `best`
    # (e.g. 60 residual blocks: 20 ranges of 3 rather than one group for all of them).
    finer = _range_plan(names, params, acts, budget, room, (best.depth if best else 0) + 1)
    if finer is not None and (best is None or len(finer.groups) > len(best.groups)):
        return finer
    if best is None:
        raise ValueError(
            f"`TrainWatch(max_metric_keys={budget})` leaves room for {room} per-group keys, too few for one group; "
            f"use at least {budget - room + len(PARAM_FAMILIES) + len(ACT_FAMILIES)}."
        )
    return best


def _range_plan(names: list[str], params: Sequence[str], acts: Sequence[str], budget: int, room: int, depth: int) -> GroupPlan | None:
    """Pool runs of consecutive sibling blocks at `depth` into ranges `first..last`, with the smallest run
    length that fits the budget; None if even one range per parent does not fit."""
    blocks = list(dict.fromkeys(_prefix(n, depth) for n in names))
    for size in range(2, len(blocks) + 1):
        range_of: dict[str, str] = {}
        run: list[str] = []
        for block in [*blocks, None]:
            if run and (block is None or len(run) == size or _prefix(block, depth - 1) != _prefix(run[0], depth - 1)):
                label = run[0] if len(run) == 1 else f"{run[0]}..{run[-1].rsplit('.', 1)[-1]}"
                range_of.update({b: label for b in run})
                run = []
            if block is not None:
                run.append(block)
        groups = _group_by(_keys_for({n: range_of[_prefix(n, depth)] for n in names}), params, acts)
        if _count_keys(groups) <= room:
            return GroupPlan(tuple(groups), depth, budget, _count_keys(groups), budget - room)
    return None


@dataclass(frozen=True)
class Binding:
    """A plan applied to a model: the tensors to read and, for each, the index of its group.

    `param_keys[g]` is the key of the g-th group that owns parameters; `param_index[i]` the group of
    `params[i]`. Likewise for watched activation modules.
    """

    param_names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    param_index: tuple[int, ...]
    param_keys: tuple[str, ...]
    act_names: tuple[str, ...]
    act_modules: tuple[nn.Module, ...]
    act_index: tuple[int, ...]
    act_keys: tuple[str, ...]


def bind(plan: GroupPlan, model: nn.Module, trained: Trained = requires_grad) -> Binding:
    modules = dict(model.named_modules())
    param_groups = [g for g in plan.groups if g.param_modules]
    act_groups = [g for g in plan.groups if g.act_modules]
    p_names, params, p_index = [], [], []
    bound: set[int] = set()  # a tied parameter is bound once, with the first module that owns it
    for gi, group in enumerate(param_groups):
        for module_name in group.param_modules:
            for pname, p in owned_parameters(module_name, modules[module_name]):
                if trained(p) and id(p) not in bound:
                    bound.add(id(p))
                    p_names.append(pname)
                    params.append(p)
                    p_index.append(gi)
    a_names, a_modules, a_index = [], [], []
    for gi, group in enumerate(act_groups):
        for module_name in group.act_modules:
            a_names.append(module_name)
            a_modules.append(modules[module_name])
            a_index.append(gi)
    return Binding(
        tuple(p_names), tuple(params), tuple(p_index), tuple(g.key for g in param_groups),
        tuple(a_names), tuple(a_modules), tuple(a_index), tuple(g.key for g in act_groups),
    )  # fmt: skip
