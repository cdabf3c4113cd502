"""The torch.fx path of :func:`pybn.torch.fold`: folding in the traced graph of a module.

In order: dropout modules and inactive functional dropout are removed; plain ``nn.Identity``
calls are bypassed; every layer absorbs the per-channel steps right after it, then the ones
right before it (so a batch norm between two layers goes into the one before); with
``merge_branches``, parallel conv branches summed are merged; unused tensors and modules are
dropped; and every batch norm, affine module and dropout left is reported with the reason.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from . import _fold_modules as mods
from ._fold_affine import (FoldGraph, Step, affine_modules_left, batch_norm_calls_left, call_problem, fold_after,
                           fold_before)
from ._fold_ops import as_torch_calls, asserted_rank, layer_shape, op, op_of, owner
from ._fold_report import Report
from ._fold_weights import Layer, set_module_weights


class FxGraph(FoldGraph):
    """A module's traced graph: layers are module calls (Linear, Conv...) or calls of their
    functions on weights read with get_attr; ranks come from asserted ranks and the example call."""

    def __init__(self, gm: fx.GraphModule, report: Report, seen: Any, ranks: dict[str, int] | None = None,
                 rank_failure: str = "") -> None:
        super().__init__(gm, report)
        self.seen = seen
        self.rank_failure = rank_failure
        self._ranks = ranks or {}
        self.example = ranks is not None
        self.dropped: set[str] = set()  # get_attr targets whose last reader a fold removed
        self.refresh()

    def refresh(self) -> None:
        self.modules = dict(self.gm.named_modules())
        self.uses = module_uses(self.gm)

    def leaf(self, node: fx.Node) -> Any:
        if node.op != "get_attr":
            return None
        try:
            value = _get(self.gm, str(node.target))
        except AttributeError:
            return None
        return value if isinstance(value, torch.Tensor) and not value.is_meta else None

    def rank(self, node: fx.Node) -> int | None:
        found = asserted_rank(node)
        return found if found is not None else self._ranks.get(node.name)

    def layer(self, node: Any) -> Layer | None:
        if not isinstance(node, fx.Node):
            return None
        if node.op == "call_module":
            m: Any = self.modules.get(str(node.target))
            found = mods.layer(m) if m is not None else None
            if found is None:
                return None
            kind, k = found
            return Layer(node, "linear" if kind == "linear" else "conv", kind == "conv_transpose", k,
                         getattr(m, "groups", 1), m.weight, m.bias, str(node.target), type(m).__name__,
                         getattr(m, "padding", 0), m)
        return functional_layer(self, node, ("get_attr",))

    def layer_problem(self, layer: Layer) -> str | None:
        if layer.module is None:
            return functional_layer_problem(self, layer, lambda n: self.uses(str(n.target)))
        name = str(layer.node.target)
        count = self.uses(name)
        if count != 1:
            return f"{name} is used {count} times in forward (a fold would change every use)"
        if len(layer.node.args) != 1 or layer.node.kwargs:
            return f"{name} is not called with its input alone"
        return mods.layer_problem(layer.module, self.seen)

    def write(self, layer: Layer, weight: torch.Tensor, bias: torch.Tensor) -> None:
        if layer.module is not None:
            set_module_weights(layer.module, weight, bias)
            return
        o = op_of(layer.node)
        self._set(str(o.get("weight").target), weight)
        b = o.get("bias")
        if isinstance(b, fx.Node):
            self._set(str(b.target), bias)
        else:
            name = self._new_bias(str(o.get("weight").target), bias)
            with self.graph.inserting_before(layer.node):
                set_arg(layer.node, 2, "bias", self.graph.get_attr(name))
        self.consts = type(self.consts)(self.leaf)  # the cached values of the weights changed

    def _set(self, target: str, value: torch.Tensor) -> None:
        parent, _, name = target.rpartition(".")
        owner_module = self.gm.get_submodule(parent)
        old = getattr(owner_module, name)
        if isinstance(old, nn.Parameter):
            setattr(owner_module, name, nn.Parameter(value, requires_grad=old.requires_grad))
        elif name in owner_module._buffers:
            owner_module._buffers[name] = value
        else:
            setattr(owner_module, name, value)

    def _new_bias(self, weight_target: str, value: torch.Tensor) -> str:
        parent, _, _ = weight_target.rpartition(".")
        owner_module = self.gm.get_submodule(parent)
        name, k = "bias", 1
        while hasattr(owner_module, name) and getattr(owner_module, name) is not None:
            name, k = f"bias_folded{k if k > 1 else ''}", k + 1
        if name in owner_module._parameters:
            del owner_module._parameters[name]
        owner_module.register_parameter(name, nn.Parameter(value, requires_grad=False))
        return f"{parent}.{name}" if parent else name

    def module_step(self, node: fx.Node, x: fx.Node) -> Step | str | None:
        if node.op != "call_module":
            return None
        m = self.modules.get(str(node.target))
        if not isinstance(m, mods.BATCH_NORM_BASE) or not (x in node.args or x in node.kwargs.values()):
            return None
        problem = mods.bn_problem(m, self.seen)
        if problem:
            return problem
        if node.args != (x,) or node.kwargs:
            return "it is not called with its input alone"
        count = self.uses(str(node.target))
        if count != 1:
            return f"{node.target} is used {count} times in forward (a fold would change every use)"
        return Step([node], node, str(node.target), bn=mods.bn_arrays(m), accepts=mods.several_ranks(m), module=m)

    def erase(self, nodes: list[fx.Node], constants: list[Any]) -> None:
        targets = {str(n.target) for n in self.graph.nodes if n.op == "get_attr"}
        super().erase(nodes, constants)
        self.dropped |= targets - {str(n.target) for n in self.graph.nodes if n.op == "get_attr"}


def _get(root: nn.Module, target: str) -> Any:
    value: Any = root
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def set_arg(node: fx.Node, position: int, name: str, value: Any) -> None:
    """Give the call `node` the argument `name` (at `position` when passed positionally)."""
    if len(node.args) > position:
        node.update_arg(position, value)
    elif name in node.kwargs or len(node.args) < position:
        node.update_kwarg(name, value)
    else:
        node.args = (*node.args, value)


def functional_layer(g: FoldGraph, node: fx.Node, leaves: tuple[str, ...]) -> Layer | None:
    """The layer computed by a call of a layer function (torch.conv2d, aten.linear...) whose weight
    and bias are graph constants read by `leaves` nodes (get_attr, or torch.export's placeholders)."""
    o = op(node)
    shape = None if o is None else layer_shape(o)
    if o is None or shape is None:
        return None
    w_node, b_node = o.get("weight"), o.get("bias")
    if not (isinstance(w_node, fx.Node) and w_node.op in leaves) or \
            not (b_node is None or (isinstance(b_node, fx.Node) and b_node.op in leaves)):
        return None
    weight = g.leaf(w_node)
    bias = None if b_node is None else g.leaf(b_node)
    groups = o.get("groups", 1)
    if weight is None or (b_node is not None and bias is None) or not isinstance(groups, int) or weight.dim() < 2:
        return None
    kind, transposed = shape
    stack = node.meta.get("nn_module_stack") or {}
    cls = list(stack.values())[-1][1] if stack else None
    label = (cls if isinstance(cls, str) else getattr(cls, "__name__", "")).rpartition(".")[2] or \
        getattr(node.target, "__name__", str(node.target))
    padding = o.get("padding", 0)
    return Layer(node, kind, transposed, weight.dim() - 2 if kind == "conv" else 0, groups, weight, bias,
                 owner(node), label, (padding,) if isinstance(padding, int) else padding)


def functional_layer_problem(g: FoldGraph, layer: Layer, uses: Callable[[fx.Node], int]) -> str | None:
    """Why a layer function call's weights cannot be rewritten: another node reads them."""
    o = op_of(layer.node)
    for role in ("weight", "bias"):
        n = o.get(role)
        if isinstance(n, fx.Node) and (list(n.users) != [layer.node] or uses(n) != 1):
            return f"its {role} {n.target} is also read elsewhere"
    if not (mods.finite(layer.weight) and (layer.bias is None or mods.finite(layer.bias))):
        return f"the weights of {layer.label} are not finite"
    return None


def module_uses(gm: fx.GraphModule) -> Callable[[str], int]:
    """name -> how many graph nodes use that submodule or attribute.

    A module called twice, or one whose parameters the graph also reads directly (get_attr of
    ``conv.weight``), or one inside a called parent module, must keep its weights: folding one
    use would change the others.
    """
    exact: dict[str, int] = {}
    below: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            t = str(n.target)
            exact[t] = exact.get(t, 0) + 1
            parts = t.split(".")
            for i in range(1, len(parts)):
                prefix = ".".join(parts[:i])
                below[prefix] = below.get(prefix, 0) + 1

    def uses(name: str) -> int:
        parts = name.split(".")
        above = sum(exact.get(".".join(parts[:i]), 0) for i in range(1, len(parts)))
        return exact.get(name, 0) + below.get(name, 0) + above
    return uses


# ---------------------------------------------------------------------------------------
# The pass


def fold_graph(gm: fx.GraphModule, seen: Any, entries: list[Any], opaque: dict[str, str], merge_branches: bool,
               ranks: dict[str, int] | None = None, rank_failure: str = "") -> None:
    """Fold in place in `gm`'s graph and submodules (which belong to our copy). `ranks`: those
    of the example call through the graph (None: no example call; `rank_failure`: why it gave
    none)."""
    report = Report(entries)
    # Dropout first: "Linear -> Dropout -> BN" becomes the foldable "Linear -> BN".
    remove_graph_dropout(gm, report)
    remove_identities(gm)
    g = FxGraph(gm, report, seen, ranks, rank_failure)
    fold_layers(g)
    if merge_branches:
        from ._fold_branches import merge_branches as merge

        merge(g)
    as_torch_calls(gm.graph, set(ranks) if ranks else None)  # (the example run showed the tensors)
    gm.graph.lint()
    gm.recompile()
    drop_unused_tensors(g)
    gm.delete_all_unused_submodules()
    report_graph_leftovers(g, opaque)


def fold_layers(g: FoldGraph) -> None:
    """Layer -> steps first, then steps -> layer: a batch norm between two layers goes into the
    one before."""
    for fold in (fold_after, fold_before):
        if hasattr(g, "refresh"):
            g.refresh()
        for node in list(g.graph.nodes):
            layer = g.layer(node)
            while layer is not None and fold(g, layer):
                layer = g.layer(node)


def remove_identities(gm: fx.GraphModule) -> None:
    """Bypass calls of a plain, unhooked nn.Identity: they compute nothing and hide pairs."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        m = modules.get(str(node.target)) if node.op == "call_module" else None
        if type(m) is nn.Identity and not mods.has_hooks(m) and not mods.global_hooks() and \
                len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def remove_graph_dropout(gm: fx.GraphModule, report: Report) -> None:
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules[node.target], mods.DROPOUTS):
            problem = mods.dropout_problem(modules[node.target]) or _dropout_call_problem(node, modules[node.target])
            kind, name = "dropout", str(node.target)
        elif node.op == "call_function" and _functional_dropout(node):
            problem = _functional_dropout_problem(node)
            kind, name = "functional dropout", node.name
        else:
            continue
        source = node.args[0] if node.args else node.kwargs.get("input")
        if problem is None and not isinstance(source, fx.Node):
            problem = "its input is not a tensor computed in forward"
        if problem:
            report.left(kind, name, problem)
            continue
        if _relu_asked(node):  # pybn's dropout(x, relu=True): relu(x) in eval mode
            with gm.graph.inserting_after(node):
                relu = gm.graph.call_function(torch.relu, (source,))
            node.replace_all_uses_with(relu)
        else:
            node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        report.done(kind, name)


def _relu_asked(node: fx.Node) -> bool:
    """Whether a dropout module's call passes relu=True (a literal; see _dropout_call_problem)."""
    return bool(node.args[1] if len(node.args) > 1 else node.kwargs.get("relu", False))


def _dropout_call_problem(node: fx.Node, module: nn.Module) -> str | None:
    """Why a dropout module's call is not its input (or relu of it) in eval mode: arguments
    besides the input other than pybn's literal relu=True/False."""
    extra = dict(node.kwargs)
    extra.pop("input", None)
    if len(node.args) > 1:
        extra["relu"] = node.args[1]
    if len(node.args) > 2 or set(extra) - {"relu"}:
        return "it is called with more arguments than its input"
    if extra and (not mods.takes_relu(module) or not isinstance(extra["relu"], bool)):
        return "its relu argument is computed in forward, not a literal True or False"
    return None


def _functional_dropout(node: fx.Node) -> bool:
    try:
        return node.target in mods.FUNCTIONAL_DROPOUTS
    except TypeError:  # an unhashable target is no dropout function
        return False


def _functional_dropout_problem(node: fx.Node) -> str | None:
    """Why a dropout function call is not the identity: its training argument is not a literal False."""
    target: Any = node.target  # (a call_function's: one of the dropout functions)
    name, position, default = mods.FUNCTIONAL_DROPOUTS[target]
    if name in node.kwargs:
        training = node.kwargs[name]
    elif len(node.args) > position:
        training = node.args[position]
    else:
        training = default
    if training is False:
        return None
    if training is True:
        return f"{name}=True{' (the default)' if training is default else ''}: it drops units in eval mode too"
    return f"{name} is computed in forward, not a constant"


def drop_unused_tensors(g: FxGraph) -> None:
    """Delete the tensors whose last reader a fold removed (the statistics of a batch norm whose
    forward was traced through), unless the module holding them is still called."""
    called = {str(n.target) for n in g.graph.nodes if n.op == "call_module"}
    read = {str(n.target) for n in g.graph.nodes if n.op == "get_attr"}
    targets = set(g.dropped)
    for name in g.folded_owners:
        try:
            m = g.gm.get_submodule(name)
        except AttributeError:
            continue
        targets.update(f"{name}.{t}" for t, _ in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)])
    for target in sorted(targets - read):
        parent, _, attr = target.rpartition(".")
        parts = parent.split(".") if parent else []
        if any(".".join(parts[:i]) in called for i in range(1, len(parts) + 1)):
            continue
        try:
            holder = g.gm.get_submodule(parent)
        except AttributeError:
            continue
        if attr in holder._parameters:
            del holder._parameters[attr]
        elif attr in holder._buffers:
            del holder._buffers[attr]
        elif attr in vars(holder) and isinstance(vars(holder)[attr], torch.Tensor):
            delattr(holder, attr)


def report_graph_leftovers(g: FxGraph, opaque: dict[str, str]) -> None:
    """One NotFolded for every batch norm (module or call) and per-channel affine module left."""
    report, gm = g.report, g.gm
    default = "no Linear or convolution next to it"
    calls = batch_norm_calls_left(g)
    affine = set(affine_modules_left(g))
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    done: set[str] = set()
    for name, m in gm.named_modules():
        if name in calls or name in affine:
            problem = call_problem(calls[name]) if name in calls else None
            report.batch_norm_left(name, problem, default, "batch norm" if name in calls else "affine")
            done.add(name)
            continue
        if not isinstance(m, mods.BATCH_NORM_BASE) or name in g.folded_owners:
            continue
        if name in called:
            report.batch_norm_left(name, mods.bn_problem(m, g.seen), default)
            continue
        holder = max((t for t in called if name.startswith(t + ".")), key=len, default=None)
        if holder is not None:
            why = "it has hooks" if mods.has_hooks(gm.get_submodule(holder)) else \
                "global module hooks are registered" if mods.global_hooks() else \
                f"torch.fx cannot trace it: {opaque[holder]}" if holder in opaque else \
                "torch.fx treats it as one operation"
            report.left("batch norm", name, f"inside {holder}, which is called as a whole ({why})")
        elif any(n.op == "get_attr" and str(n.target).startswith(name + ".") for n in gm.graph.nodes):
            report.left("batch norm", name, "not called as a module in forward (its tensors are read directly)")
    for name in [*calls, *affine]:
        if name not in done:
            report.batch_norm_left(name, None, default, "batch norm" if name in calls else "affine")
