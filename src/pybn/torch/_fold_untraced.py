"""The path of :func:`pybn.torch.fold` for a model whose own forward torch.fx cannot trace.

The result is a copy of the model (same class) in which every dropout module becomes
``nn.Identity``. With ``example_inputs``, the pairs the example call showed adjacent are folded:
a module whose output went to a second module's first argument and nowhere else (see
``pybn.torch._fold_observe``), each called once in the call and registered under one name.

* Layer -> batch norm module (BatchNorm{1,2,3}d, SyncBatchNorm): the batch norm becomes
  ``nn.Identity``; batch norm module -> Linear or pointwise conv: likewise.
* Layer -> a module whose forward torch.fx can trace alone and which starts with per-channel
  steps on its input (timm's BatchNormAct2d: ``batch_norm`` then an activation; torchvision's
  FrozenBatchNorm2d: ``x * scale + shift``): the steps fold into the layer and the module is
  replaced by its traced graph without them (``nn.Identity`` when nothing is left).

What adjacency the example call shows holds for the path that call took: a forward whose module
calls depend on the input's values can pair modules differently for other inputs. Where a layer
or batch norm did not run in the example call, other paths exist, and nothing is folded.
"""
from __future__ import annotations

from typing import Any

from torch import fx, nn

from . import _fold_modules as mods
from ._fold_affine import Ranks, Step, affine_modules_left, before_problem, chain_after, continues, folded_for, kind_of
from ._fold_graph import FxGraph, drop_unused_tensors, remove_identities
from ._fold_ops import as_torch_calls
from ._fold_report import Report
from ._fold_trace import Tracer, join, state
from ._fold_weights import Layer, set_module_weights


def fold_untraced(model: nn.Module, seen: Any, entries: list[Any], why: str) -> None:
    """Replace dropout modules by nn.Identity; with `seen`, fold the pairs the example call showed."""
    report = Report(entries)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, mods.DROPOUTS):
                continue
            name = join(parent_name, child_name)
            problem = mods.dropout_problem(child) or _relu_problem(child, seen)
            if problem:
                report.left("dropout", name, problem)
            else:  # the identity in eval mode, however it is called
                setattr(parent, child_name, nn.Identity())
                report.done("dropout", name)
    not_run = [] if seen is None else _not_run(model, seen)
    if seen is None:
        default = f"{why}: pass example_inputs to fold the pairs the example call shows adjacent"
    elif not_run:
        # another input takes another path, on which a folded layer may meet another batch
        # norm, or a folded batch norm another layer: no pair is known to hold for it
        default = (f"{why}, and {', '.join(not_run[:3])} did not run in the example call: another "
                   "input may take another path, on which the pairs it shows need not hold (nothing is folded; an "
                   "example that runs every layer and batch norm folds the pairs it shows)")
    else:
        default = f"{why}: only the pairs the example call shows adjacent are folded then"
        _Pairs(model, seen, report).fold()
    for name, m in model.named_modules():
        if isinstance(m, mods.BATCH_NORM_BASE):
            report.batch_norm_left(name, _bn_problem(m, seen) if mods.is_batch_norm_module(m) else None, default)
        elif _affine_module(m):
            report.batch_norm_left(name, None, default, "affine")


def _bn_problem(bn: nn.Module, seen: Any) -> str | None:
    """mods.bn_problem, and a call with more than the input (a block tail, bn(x, residual,
    relu=True)), for which nn.Identity cannot stand in (fx's path sees the call itself)."""
    if seen is not None and id(bn) in seen.extra_args:
        return "it is not called with its input alone"
    return mods.bn_problem(bn, seen)


def _relu_problem(dropout: nn.Module, seen: Any) -> str | None:
    """Why nn.Identity cannot stand in for this dropout module: a call with more than its
    input (pybn's relu=True, relu(x) in eval mode) would fail on nn.Identity. Only the example
    call tells: pybn's dropouts that it did not run (or none ran) stay."""
    if seen is not None and id(dropout) in seen.extra_args:
        return "it was called with more than its input (as relu=True), left to compute it"
    if mods.takes_relu(dropout) and (seen is None or not seen.calls.get(id(dropout))):
        return "it takes relu=..., and no example call showed it called with its input alone: left to compute it"
    return None


def _not_run(model: nn.Module, seen: Any) -> list[str]:
    """The layers and per-channel modules that the example call neither called nor read."""
    return [name for name, m in model.named_modules()
            if (mods.layer(m) is not None or isinstance(m, mods.BATCH_NORM_BASE) or _affine_module(m))
            and not seen.calls.get(id(m)) and id(m) not in seen.read_outside]


class _Pairs:
    """The pairs of modules the example call showed adjacent, folded in `model`."""

    def __init__(self, model: nn.Module, seen: Any, report: Report) -> None:
        self.model, self.seen, self.report = model, seen, report
        self.by_id: dict[int, tuple[str, nn.Module]] = {}
        self.registrations: dict[int, int] = {}
        self.places: dict[int, tuple[nn.Module, str]] = {}  # id(module) -> (parent, attribute name)
        for _, parent in model.named_modules(remove_duplicate=False):
            for child_name, child in parent.named_children():
                self.places[id(child)] = (parent, child_name)
        for name, m in model.named_modules(remove_duplicate=False):
            self.by_id.setdefault(id(m), (name, m))
            self.registrations[id(m)] = self.registrations.get(id(m), 0) + 1

    def fold(self) -> None:
        # Layer -> BN first (as on the fx path); a BN folded there is no longer a candidate.
        for before in (False, True):
            for m in list(self.model.modules()):
                target = self.seen.feeds.get(id(m))
                if target is not None and id(m) in self.by_id and target[0] in self.by_id:
                    self._pair(m, self.by_id[target[0]][1], target[1], before)

    def _pair(self, a: nn.Module, b: nn.Module, rank: int, before: bool) -> None:
        layer_module, other = (b, a) if before else (a, b)
        if mods.layer(layer_module) is None or self.places.get(id(other)) is None:
            return
        if mods.is_batch_norm_module(other):
            self._fold_batch_norm_module(layer_module, other, rank, before)
        elif not before and type(other).__module__.split(".")[0] != "torch":
            self._fold_leading_steps(layer_module, other, rank)

    def _name(self, m: nn.Module) -> str:
        return self.by_id[id(m)][0]

    def _common_problem(self, layer_module: nn.Module, other: nn.Module) -> str | None:
        for m in (layer_module, other):
            if self.registrations.get(id(m)) != 1:
                return f"{self._name(m)} is registered more than once"
        return mods.layer_problem(layer_module, self.seen)

    def _layer(self, m: Any) -> Layer:
        found = mods.layer(m)
        assert found is not None  # (a pair's layer passed mods.layer)
        kind, k = found
        return Layer(None, "linear" if kind == "linear" else "conv", kind == "conv_transpose", k,
                     getattr(m, "groups", 1), m.weight, m.bias, self._name(m), type(m).__name__,
                     getattr(m, "padding", 0), m)

    def _fold_batch_norm_module(self, layer_module: nn.Module, bn: nn.Module, rank: int, before: bool) -> None:
        bn_name, layer_name = self._name(bn), self._name(layer_module)
        layer = self._layer(layer_module)
        step = Step([], None, bn_name, bn=mods.bn_arrays(bn), accepts=mods.several_ranks(bn), module=bn)
        problem = _bn_problem(bn, self.seen) or self._common_problem(layer_module, bn) or \
            (before_problem(layer) if before else None)
        got = problem or folded_for(layer, [step], Ranks.known(rank), before=before)
        if isinstance(got, str):
            self.report.note(bn_name, f"with {layer_name}: {got}")
            return
        set_module_weights(layer_module, *got)
        parent, attr = self.places[id(bn)]
        setattr(parent, attr, nn.Identity())
        kind = "bn+linear" if before and layer.kind == "linear" else "bn+conv" if before else f"{layer.kind}+bn"
        self.report.done(kind, *((bn_name, layer_name) if before else (layer_name, bn_name)))

    def _fold_leading_steps(self, layer_module: nn.Module, other: nn.Module, rank: int) -> None:
        name, layer_name = self._name(other), self._name(layer_module)
        g = _trace_alone(other, name, rank, self.report)
        if g is None:
            return
        x = next(n for n in g.graph.nodes if n.op == "placeholder")
        steps, _, why = chain_after(g, x)
        if not steps:
            if why is not None:
                self.report.note(name, f"with {layer_name}: {why}")
            return
        layer = self._layer(layer_module)
        problem = self._common_problem(layer_module, other) or \
            ("only part of its computation follows the layer alone" if continues(g, steps) else None)
        got = problem or folded_for(layer, steps, Ranks.known(rank), before=False)
        if isinstance(got, str):
            self.report.note(name, f"with {layer_name}: {got}")
            return
        set_module_weights(layer_module, *got)
        nodes = [n for s in steps for n in s.nodes]
        for n in nodes:
            n.replace_all_uses_with(x, delete_user_cb=lambda u: u not in nodes)
        g.erase(nodes, [c for s in steps for c in s.constants])
        as_torch_calls(g.graph)
        g.graph.lint()
        g.gm.recompile()
        drop_unused_tensors(g)
        g.gm.delete_all_unused_submodules()
        rest = [n for n in g.graph.nodes if n.op not in ("placeholder", "output")]
        output = next(n for n in g.graph.nodes if n.op == "output")
        parent, attr = self.places[id(other)]
        identity = not rest and output.args == (x,)
        setattr(parent, attr, nn.Identity() if identity else g.gm)
        self.report.done(f"{layer.kind}+{kind_of(steps)}", layer_name, name)


def _trace_alone(module: nn.Module, name: str, rank: int | None, report: Report) -> FxGraph | None:
    """`module`'s forward traced by itself (on a copy sharing its weights), its own calls marked
    as made by `module` (so that its steps have one owner), with `rank` as the rank of its first
    input; None if it does not trace faithfully to a graph of one tensor input."""
    if mods.has_hooks(module) or mods.global_hooks():
        return None
    scratch = mods.copy_sharing_parameters(module)  # (tracing runs forward: what it changes stays there)
    before = state(scratch)
    tracer = Tracer()
    try:
        graph = tracer.trace(scratch)
        gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    except Exception:  # noqa: BLE001 - not traceable alone: no steps to fold from it
        return None
    if state(scratch) != before:
        return None  # forward changes state, which its traced graph would not
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    for n in gm.graph.nodes:
        if not n.meta.get("nn_module_stack"):
            n.meta["nn_module_stack"] = {name: (name, type(module))}
    remove_identities(gm)
    return FxGraph(gm, report, None, None if rank is None else {placeholders[0].name: rank})


def _affine_module(m: nn.Module) -> bool:
    """Whether `m` (no torch class, no children, holding tensors) computes a per-channel affine map."""
    if type(m).__module__.split(".")[0] == "torch" or any(True for _ in m.children()) or \
            not any(True for _ in mods.tensors(m)):
        return False
    g = _trace_alone(m, "m", None, Report([]))
    return g is not None and affine_modules_left(g) == ["m"]
