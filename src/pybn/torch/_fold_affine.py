"""Folding per-channel affine maps into the Linear or convolution next to them, in a graph.

A *step* is one node (or two, for a batch norm returning a tuple) computing ``x * s + t`` with
per-channel constants ``s`` and ``t``: a batch norm module called on ``x``, a ``batch_norm`` call
in eval mode with constant statistics (timm's BatchNormAct2d, torch.export's ATen graphs), or a
multiply, add, subtract or divide by a constant (torchvision's FrozenBatchNorm2d traces to
``x * scale + shift``). Consecutive steps of one module (its *owner*) fold together into the layer
before them (``fold_after``) or after them (``fold_before``), as one report entry.

A step is exact only where its constants broadcast along the layer's channel axis without
changing the shape of ``x``. A constant with as many dimensions as ``x`` has, and a batch norm
(which normalizes dimension 1), need the rank of ``x`` to be known: from the graph (an asserted
rank, or torch.export's shapes) or from the example call. ``FoldGraph`` is what these rules ask
of a graph; ``pybn.torch._fold_graph`` and ``_fold_export`` implement it for their dialects.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import fx, nn

from ..fold import batch_norm_fold_problem, cancellation_problem
from . import _fold_modules as mods
from ._fold_ops import ARITHMETIC, BATCH_NORMS, Constants, in_place, is_metadata_use, op, op_of, owner, value_users
from ._fold_report import Report
from ._fold_weights import Layer, affine_arrays, folded, overflow_problem


class FoldGraph:
    """A graph being folded in place: what the shared rules ask of it."""

    example = False  # ranks come from an example call (else from the graph alone)
    rank_failure = ""  # why the example call gave no ranks, if it did not

    def __init__(self, gm: fx.GraphModule, report: Report) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.report = report
        self.consts = Constants(self.leaf)
        self.folded_owners: set[str] = set()  # owners whose steps were folded (not left)
        self.affine_refused: dict[str, None] = {}  # owners of per-channel maps a layer could not take, in order
        self.erased: set[fx.Node] = set()

    # --- what each dialect provides ---------------------------------------------------------

    def leaf(self, node: fx.Node) -> Any:
        """The value of a get_attr or placeholder node, or None when it is an input."""
        raise NotImplementedError

    def layer(self, node: Any) -> Layer | None:
        """The Linear/Conv/ConvTranspose computed by `node`, if it is one."""
        raise NotImplementedError

    def layer_problem(self, layer: Layer) -> str | None:
        """Why `layer`'s weights cannot be rewritten (shared, hooked...)."""
        raise NotImplementedError

    def write(self, layer: Layer, weight: torch.Tensor, bias: torch.Tensor) -> None:
        raise NotImplementedError

    def rank(self, node: fx.Node) -> int | None:
        """The rank of `node`'s value, when the graph or the example call shows it."""
        raise NotImplementedError

    def module_step(self, node: fx.Node, x: fx.Node) -> Step | str | None:
        """A batch norm module called on `x` at `node` (graphs with module calls)."""
        return None

    # --- shared ----------------------------------------------------------------------------

    def ranks(self, node: fx.Node) -> set[int] | None:
        """The ranks known for `node` ({r}), none known from an example call (empty), or None
        when there was no example call to show them."""
        r = self.rank(node)
        if r is not None:
            return {r}
        return set() if self.example else None

    def erase(self, nodes: list[fx.Node], constants: list[Any]) -> None:
        """Erase `nodes` (users last), then the constant nodes that nothing uses any more."""
        gone = self.erased
        for n in reversed(nodes):
            self.graph.erase_node(n)
            gone.add(n)
        todo = [c for c in constants if isinstance(c, fx.Node)]
        while todo:
            n = todo.pop()
            if n in gone or n.users or n.op not in ("get_attr", "call_function", "call_method") or \
                    not self.consts.is_constant(n):
                continue
            inputs = n.all_input_nodes
            self.graph.erase_node(n)
            gone.add(n)
            todo.extend(inputs)


class Step(NamedTuple):
    """One per-channel affine computation on `x`, whose result is `out`."""

    nodes: list[fx.Node]  # what computes it, in graph order
    out: Any  # the fx.Node of the result (None for a module seen only by the example call)
    owner: str
    scale: Any = None  # p of p * x + q: a tensor, a number, or None for 1 (after `invert`: 1 / p)
    shift: Any = None  # q: a tensor, a number, or None for 0
    invert: bool = False
    bn: dict[str, Any] | None = None  # a batch norm's fold_conv_bn arguments (per channel, on dimension 1)
    accepts: str | None = None  # a batch norm that accepts several ranks: which (see mods.rank_problem)
    module: nn.Module | None = None  # the batch norm module called, if any
    constants: tuple[Any, ...] = ()  # the constant arguments, for removal once unused


_FUNCTIONAL_BN = "batch_norm takes inputs of any rank >= 2"


def read_step(g: FoldGraph, node: fx.Node, x: fx.Node) -> Step | str | None:
    """The Step computed by `node` on `x`; why `node` is a batch norm that cannot fold (str); or
    None when it is no per-channel affine map of `x`."""
    found = g.module_step(node, x)
    if found is not None:
        return found
    o = op(node)
    if o is None:
        return None
    if o.kind in BATCH_NORMS:
        return _batch_norm_step(g, node, o, x)
    if o.kind in ARITHMETIC:
        return _arithmetic_step(g, node, o, x)
    return None


def _batch_norm_step(g: FoldGraph, node: fx.Node, o: Any, x: fx.Node) -> Step | str | None:
    if o.get("input") is not x:
        return None
    if o.get("training", False) is not False:
        return "it normalizes with the batch's statistics (training is not False)"
    out, nodes = node, [node]
    if o.kind == "batch_norm_tuple":  # (out, mean, rstd): only out may be used
        items = list(node.users)
        if any(u.op != "call_function" or getattr(u.target, "__name__", "") != "getitem" for u in items):
            return "its tuple result is used as a whole"
        firsts = [u for u in items if u.args[1] == 0]
        if len(firsts) != 1 or any(u.users for u in items if u.args[1] != 0):
            return "its saved statistics are used"
        out, nodes = firsts[0], [node, *sorted(items, key=lambda u: u.args[1] if isinstance(u.args[1], int) else -1)]
    names = ("running_mean", "running_var", "weight", "bias")
    values = {k: g.consts.value(o.get(k)) for k in names}
    for k in names:
        if isinstance(o.get(k), fx.Node) and values[k] is None:
            return f"its {k} is computed from the input, not a constant"
    if values["running_mean"] is None or values["running_var"] is None:
        return "it has no running statistics: it normalizes with the batch's statistics"
    eps = g.consts.value(o.get("eps", 1e-5))
    if not isinstance(eps, (int, float)):
        return "its eps is not a constant number"
    arrays = {k: None if v is None else mods.to_numpy(v) for k, v in values.items()}
    problem = batch_norm_fold_problem(arrays, "running_var", float(eps))
    if problem:
        return problem
    bn = dict(running_mean=arrays["running_mean"], running_var=arrays["running_var"], gamma=arrays["weight"],
              beta=arrays["bias"], eps=float(eps))
    constants = tuple(o.get(k) for k in names)
    return Step(nodes, out, owner(node), bn=bn, accepts=_FUNCTIONAL_BN, constants=constants)


def _arithmetic_step(g: FoldGraph, node: fx.Node, o: Any, x: fx.Node) -> Step | None:
    a, b = o.get("input"), o.get("other")
    if (a is x) == (b is x) or o.get("rounding_mode") is not None:
        return None
    x_first = a is x
    c = b if x_first else a
    value: Any = g.consts.value(c)
    if not ((isinstance(value, (int, float)) and not isinstance(value, bool)) or isinstance(value, torch.Tensor)):
        return None
    if not x_first and in_place(node):
        return None  # an in-place operation on the constant
    alpha = g.consts.value(o.get("alpha", 1))
    if not isinstance(alpha, (int, float)):
        return None
    kind = o.kind
    p: Any
    q: Any
    if kind == "mul":
        p, q = value, None
    elif kind == "add":
        p, q = (None, _times(value, alpha)) if x_first else (alpha, value)
    elif kind == "sub":
        p, q = (None, _times(value, -alpha)) if x_first else (-alpha, value)
    elif x_first:  # div
        return Step([node], node, owner(node), value, None, True, constants=(c,))
    else:
        return None  # c / x is no affine map of x
    return Step([node], node, owner(node), p, q, constants=(c,))


def _times(value: Any, factor: float) -> Any:
    return value if factor == 1 else value * factor


# --- per-channel values --------------------------------------------------------------------

def per_channel(value: Any, channels: int, from_end: int, ranks: Ranks, min_rank: int,
                dtype: torch.dtype) -> np.ndarray | str:
    """`value` as a float64 vector over the `channels` channels of a tensor whose channel axis is
    `from_end` from its end, of rank `ranks.rank` (None: unknown, at least `min_rank`); or why it
    is not one that broadcasts along that axis alone without changing the tensor."""
    if value is None:
        return np.ones(channels)
    if not isinstance(value, torch.Tensor):
        return np.full(channels, float(value))
    if value.is_complex():
        return "its constant is complex"
    if value.is_floating_point() and value.dim() > 0 and value.dtype != dtype:
        return f"its constant is {str(value.dtype)[6:]}, the layer's output {str(dtype)[6:]} (the result would " \
               f"be {str(torch.promote_types(value.dtype, dtype))[6:]})"
    rank = ranks.rank if value.dim() > min_rank else None  # (asked only when it matters)
    if value.dim() > (min_rank if rank is None else rank):
        if rank is None:
            return (f"its constant of shape {tuple(value.shape)} would add a dimension to an output of rank "
                    f"{min_rank}, which the layer also gives: pass example_inputs to show the rank")
        return f"its constant of shape {tuple(value.shape)} has more dimensions than the layer's output"
    axis = value.dim() - from_end
    shape = tuple(value.shape)
    if any(n != 1 for i, n in enumerate(shape) if i != axis) or (axis >= 0 and shape[axis] not in (1, channels)):
        return f"its constant of shape {shape} is not one value per channel"
    v = value.detach().to("cpu", torch.float64).reshape(-1).numpy()
    v = np.full(channels, v[0]) if v.size == 1 else v.copy()
    if not np.all(np.isfinite(v)):
        return "its constant is not finite"
    return v


class Ranks:
    """What is known of the rank of a step's input, asked for only when a rule needs it (an
    example call may have to run the graph to tell): `rank` (None: unknown) and `seen` (for
    mods.rank_problem: {rank}; empty when an example call showed none; None without one)."""

    def __init__(self, rank: Any = None, seen: Any = None, failure: Any = "") -> None:
        self._rank, self._seen, self._failure = rank, seen, failure

    @classmethod
    def known(cls, rank: int) -> Ranks:
        return cls(rank, {rank})

    @classmethod
    def of(cls, g: FoldGraph, x: fx.Node) -> Ranks:
        return cls(lambda: g.rank(x), lambda: g.ranks(x), lambda: g.rank_failure)

    @staticmethod
    def _get(value: Any) -> Any:
        return value() if callable(value) else value

    @property
    def rank(self) -> int | None:
        rank: int | None = self._get(self._rank)
        return rank

    @property
    def seen(self) -> set[int] | None:
        seen: set[int] | None = self._get(self._seen)
        return seen

    @property
    def failure(self) -> str:
        return str(self._get(self._failure))


def step_arrays(step: Step, ranks: Ranks, layer: Layer, before: bool) -> tuple[np.ndarray, np.ndarray] | str:
    """(s, t) of `step` over the layer's channels (its inputs when `before`), float64; or why not."""
    channels = layer.in_channels if before else layer.out_channels
    if step.bn is not None:
        if step.module is not None:
            bn_k = mods.batch_norm_dims(step.module)
            if bn_k is not None and bn_k != max(layer.spatial, 1):
                return f"{type(step.module).__name__} does not match {layer.label}"
        n = step.bn["running_mean"].shape[0]
        if n != channels:
            return f"{layer.label} has {channels} {'inputs' if before else 'outputs'}, the batch norm {n} channels"
        problem = mods.rank_problem(step.accepts, ranks.seen, layer.spatial + 2)
        if problem:
            return ranks.failure if ranks.failure and ranks.seen == set() else problem
        bn = step.bn
        s = (1.0 if bn["gamma"] is None else bn["gamma"].astype(np.float64)) / \
            np.sqrt(bn["running_var"].astype(np.float64) + bn["eps"])
        t = (0.0 if bn["beta"] is None else bn["beta"].astype(np.float64)) - \
            bn["running_mean"].astype(np.float64) * s
        return np.broadcast_to(s, (n,)).copy(), np.broadcast_to(t, (n,)).copy()
    args = (channels, layer.channel_from_end, ranks, layer.spatial + 1, layer.weight.dtype)
    p = per_channel(step.scale, *args)
    if isinstance(p, str):
        return p
    if step.invert:
        if np.any(p == 0):
            return "it divides by 0 in some channel"
        p = 1.0 / p
    q = per_channel(step.shift, *args) if step.shift is not None else np.zeros(channels)
    return q if isinstance(q, str) else (p, q)


def folded_for(layer: Layer, steps: list[Step], ranks: Ranks, *, before: bool
               ) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The weights of `layer` with `steps` (applied in order) folded in, or why they cannot be."""
    parts = []
    for s in steps:
        got = step_arrays(s, ranks, layer, before)
        if isinstance(got, str):
            return got
        if before and s.bn is not None:
            problem = cancellation_problem(s.bn["running_mean"], s.bn["running_var"], s.bn["eps"], s.bn["gamma"],
                                           s.bn["beta"])
            if problem:
                return problem
        parts.append(got)
    bn = steps[0].bn if len(steps) == 1 and steps[0].bn is not None else affine_arrays(*_compose(parts))
    weight, bias = folded(layer, bn, before=before)
    return overflow_problem(layer, weight, bias) or (weight, bias)


def kind_of(steps: list[Step]) -> str:
    return "bn" if any(s.bn is not None for s in steps) else "affine"


# --- chains and folds ------------------------------------------------------------------------

def chain_after(g: FoldGraph, x: fx.Node) -> tuple[list[Step], fx.Node | None, str | None]:
    """The steps of one owner right after `x`, each the only value user of the one before:
    (steps, the user after them, why the first candidate is no step (noted by the caller))."""
    steps: list[Step] = []
    cur = x
    while True:
        users = value_users(cur)
        if len(users) != 1:
            return steps, None, None
        step = read_step(g, users[0], cur)
        if step is None or isinstance(step, str) or (steps and step.owner != steps[0].owner):
            return steps, users[0], step if isinstance(step, str) and not steps else None
        steps.append(step)
        cur = step.out


def continues(g: FoldGraph, steps: list[Step]) -> bool:
    """Whether the owner of `steps` computes more from their result (then they are not its whole
    computation, and folding part of it would leave the rest reading a changed value)."""
    last = steps[-1].out
    for u in value_users(last) if len(value_users(last)) != 1 else []:
        s = read_step(g, u, last)
        if isinstance(s, Step) and s.owner == steps[0].owner:
            return True
    return False


def _compose(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    s, t = parts[0]
    for p, q in parts[1:]:
        s, t = s * p, t * p + q
    return s, t


def fold_after(g: FoldGraph, layer: Layer) -> bool:
    """Fold the steps of one owner right after `layer` (or after a Linear's rows of features,
    :func:`_feature_rows`) into it. True when the graph changed."""
    x = _feature_rows(g, layer) or layer.node
    users = value_users(x)
    candidates = [(u, read_step(g, u, x)) for u in users]
    if len(users) != 1:
        for u, s in candidates:
            if s is not None:
                _note(g, u, s, s if isinstance(s, str) else
                      f"with {layer.name}: the output of {layer.name} is used {len(users)} times")
        return False
    steps, _, why = chain_after(g, x)
    if why is not None:
        _note(g, users[0], why, why)
        return False
    if not steps:
        return False
    return _fold(g, layer, steps, x, before=False)


def _feature_rows(g: FoldGraph, layer: Layer) -> fx.Node | None:
    """``y.flatten(0, ...)`` of a Linear's output y, when it is y's only reader and its rank 2
    is known (asserted, or seen in the example call): the rows of y's features, the last axis
    kept whole as axis 1, where a batch norm's channels are y's features (timm LeViT's
    ``bn(linear(x).flatten(0, 1))``); else None. The flatten stays, before the folded maps."""
    users = value_users(layer.node)
    if layer.kind != "linear" or len(users) != 1:
        return None
    f = users[0]
    if not ((f.op == "call_method" and f.target == "flatten") or
            (f.op == "call_function" and f.target in (torch.flatten, torch.ops.aten.flatten.using_ints))):
        return None
    start = f.args[1] if len(f.args) > 1 else f.kwargs.get("start_dim", 0)
    return f if f.args[0] is layer.node and start == 0 and g.rank(f) == 2 else None


def fold_before(g: FoldGraph, layer: Layer) -> bool:
    """Fold the steps of one owner right before `layer` into it (batch norm then Linear or pointwise
    conv). True when the graph changed."""
    y = layer.node.args[layer.input_index] if len(layer.node.args) > layer.input_index else None
    if not isinstance(y, fx.Node):
        return False
    steps: list[Step] = []
    cur = y
    while True:  # walk back while cur is the result of a step
        found = step_producing(g, cur)
        if found is None or (steps and found.owner != steps[0].owner):
            break
        steps.insert(0, found)
        cur = step_input(found)
    if not steps:
        return False
    name = steps[0].owner
    if len(value_users(y)) != 1:
        _note(g, steps[-1].out, steps[0], f"with {layer.name}: its output is used {len(value_users(y))} times")
        return False
    if [a for k, a in enumerate(layer.node.args) if a is y and k != layer.input_index] or \
            y in layer.node.kwargs.values():
        _note(g, steps[-1].out, steps[0], f"with {layer.name}: {layer.name} reads its output as another argument")
        return False
    if any(len(value_users(s.out)) != 1 for s in steps[:-1]):
        return False
    problem = before_problem(layer)
    if problem:
        g.report.note(name, f"with {layer.name}: {problem}")
        return False
    return _fold(g, layer, steps, cur, before=True)


def step_producing(g: FoldGraph, value: fx.Node) -> Step | None:
    """The step whose result is `value`, if it is one."""
    node: Any = value
    if value.op == "call_function" and getattr(value.target, "__name__", "") == "getitem" and value.args:
        node = value.args[0]
    if not isinstance(node, fx.Node):
        return None
    for x in node.all_input_nodes:
        s = read_step(g, node, x)
        if isinstance(s, Step) and s.out is value:
            return s
    return None


def step_input(step: Step) -> fx.Node:
    first = step.nodes[0]
    if step.module is not None:
        x = first.args[0]
    else:
        o = op_of(first)
        x, b = o.get("input"), o.get("other")
        if step.bn is None and isinstance(b, fx.Node) and b not in step.constants:
            x = b
    assert isinstance(x, fx.Node)  # (a step is read on a node's input)
    return x


def before_problem(layer: Layer) -> str | None:
    """Why a per-channel map before `layer` cannot fold into it (BN shift vs. padding...)."""
    # Not ConvTranspose: with stride > 1 some outputs get no kernel tap, so no BN shift.
    if layer.transposed:
        return "a batch norm before a ConvTranspose does not fold (outputs no kernel tap reaches miss its shift)"
    if layer.kind == "conv":
        # A grouped conv's weight (out, in/groups, 1...) is not the (out, in) fold_bn_linear takes.
        kernel = tuple(layer.weight.shape[2:])
        if any(size != 1 for size in kernel) or layer.groups != 1:
            return f"a batch norm folds only into a 1x1 conv with groups=1, not kernel {kernel} with " \
                   f"groups={layer.groups}"
        # The conv's zero padding would not get BN's shift at the border. ("same" with a 1-wide
        # kernel pads nothing; padding_mode is moot without padding.)
        padding = layer.padding
        if not (padding in ("valid", "same") or all(p == 0 for p in padding)):
            return "the conv pads its input: the zero border would not see the batch norm's shift"
    return None


def _note(g: FoldGraph, node: fx.Node, step: Step | str, reason: str) -> None:
    name = step.owner if isinstance(step, Step) else owner_of_candidate(g, node)
    g.report.note(name, reason)


def owner_of_candidate(g: FoldGraph, node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else owner(node)


def _fold(g: FoldGraph, layer: Layer, steps: list[Step], x: fx.Node, *, before: bool) -> bool:
    name = steps[0].owner
    if not before and continues(g, steps):
        g.report.note(name, f"with {layer.name}: only part of its computation follows {layer.name} alone")
        return False
    got = g.layer_problem(layer) or folded_for(layer, steps, Ranks.of(g, x), before=before)
    if isinstance(got, str):
        g.report.note(name, f"with {layer.name}: {got}")
        if kind_of(steps) == "affine":
            g.affine_refused[name] = None
        return False
    weight, bias = got
    g.write(layer, weight, bias)
    nodes = [n for s in steps for n in s.nodes]
    if before:
        layer.node.replace_input_with(steps[-1].out, x)
        for n in nodes:  # (metadata reads of the steps' values now read x: same shape)
            for u in list(n.users):
                if u not in nodes and is_metadata_use(u, n):
                    u.replace_input_with(n, x)
    else:
        for n in nodes:
            n.replace_all_uses_with(x, delete_user_cb=lambda u: u not in nodes)
    g.erase(nodes, [c for s in steps for c in s.constants])
    g.folded_owners.add(name)
    kind = kind_of(steps)
    g.report.done(f"{kind}+{layer.kind}" if before else f"{layer.kind}+{kind}",
                  *((name, layer.name) if before else (layer.name, name)))
    return True


# --- what is left ------------------------------------------------------------------------------

def batch_norm_calls_left(g: FoldGraph) -> dict[str, fx.Node]:
    """owner -> first node of every batch_norm call still in the graph (ATen or functional)."""
    left: dict[str, fx.Node] = {}
    for n in g.graph.nodes:
        o = op(n)
        if o is not None and o.kind in BATCH_NORMS:
            left.setdefault(owner(n), n)
    return left


def call_problem(node: fx.Node) -> str | None:
    """Why a batch norm call left stays whatever is next to it (None: nothing of its own)."""
    o = op(node)
    if o is not None and "fused input" in o.args:
        return "it adds a residual or applies a ReLU after normalizing (batch_norm_add_relu): no per-channel " \
               "map of its input that a layer could take"
    return None


def affine_modules_left(g: FoldGraph) -> list[str]:
    """Modules whose whole computation in the graph is still a chain of multiply/add steps by
    per-channel constants (x * scale + shift), at least one of them a tensor of several values;
    then the owners of such steps whose fold into the layer next to them was refused (a float16
    layer whose folded weights would overflow...)."""
    by_owner: dict[str, list[fx.Node]] = {}
    for n in g.graph.nodes:
        if n.op in ("call_function", "call_method") and not g.consts.is_constant(n):
            name = owner(n)
            if name != n.name:
                by_owner.setdefault(name, []).append(n)
    found = []
    for name, nodes in by_owner.items():
        if name in g.folded_owners:
            continue
        steps = []
        for n in nodes:
            inputs = [a for a in n.all_input_nodes if not g.consts.is_constant(a)]
            s = read_step(g, n, inputs[0]) if len(inputs) == 1 else None
            if not isinstance(s, Step) or s.bn is not None:  # (batch norms are reported as such)
                break
            steps.append(s)
        else:
            consts = [g.consts.value(c) for s in steps for c in s.constants]
            if any(isinstance(c, torch.Tensor) and c.numel() > 1 for c in consts):
                found.append(name)
    return found + [name for name in g.affine_refused if name not in found and name not in g.folded_owners]
