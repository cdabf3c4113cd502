"""Fusing an existing model's batch-norm tails for training: :func:`fuse_tails`.

A ResNet block ends in ``relu(bn(x) + identity)``, and its first half in ``relu(bn(x))``:
two or three passes over the activation in torch (each again in the backward), one in
pybn's fused kernel (docs/pytorch.md, "The fused block tail"). An MLP's hidden layers end in
``dropout(relu(x))``: two passes, one in pybn's dropout with the ReLU fused, whose backward
needs no mask. A model's forward calls them as separate operations, which swapping modules
(:func:`accelerate`) cannot join, so this traces the forward with torch.fx and rewrites
each tail into one call of the batch-norm module with ``residual=`` and ``relu=``, or of
the dropout module with ``relu=True``.
"""
from __future__ import annotations

import collections
import copy
import logging
import operator
import warnings
from typing import Any, Callable, Iterator, List, Literal, NamedTuple, Set, Tuple, overload

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .._checks import flag
from . import nn as pnn
from ._fold_modules import global_hooks, has_hooks
from ._fold_ops import in_place, operator_of
from ._fold_trace import copy_hooks, trace
from .accelerate import accelerate

__all__ = ["fuse_tails", "Fused", "block_tail", "relu_dropout_tail"]

logger = logging.getLogger("pybn.torch")

_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_FUSED_FORWARDS = (pnn._BatchNormForward.forward, pnn.SyncBatchNorm.forward)


class Fused(NamedTuple):
    """One tail rewritten by :func:`fuse_tails`."""

    name: str
    """The batch-norm (or dropout) module's qualified name."""
    tail: str
    """What became one call: "relu(bn(x))", "bn(x) + r", "relu(bn(x) + r)" or "dropout(relu(x))"."""


class FusedTracer(fx.Tracer):
    """The tracer a fused model records as its own (``GraphModule._tracer_cls``): torch.fx
    rebuilds an unpickled GraphModule (``torch.save`` / ``torch.load``, a spawned process)
    by tracing its code with it, which then keeps the fused calls. Other tracers (pybn.torch.fold's)
    see the tails unfused: the folds look for a batch norm called with its input alone."""


def _kept(function: Callable[..., Tensor], x: Tensor | fx.Proxy, *args: Any) -> fx.Proxy | None:
    """The call `function(*args)` recorded whole, when `x` is a proxy of a FusedTracer."""
    if isinstance(x, fx.Proxy) and isinstance(x.tracer, FusedTracer):
        return x.tracer.create_proxy("call_function", function, args, {})
    return None


def block_tail(bn: nn.Module, x: Tensor | fx.Proxy, residual: Tensor | None, relu: bool) -> Tensor:
    """``relu(bn(x) + residual)`` (without the add for ``residual=None``, without the ReLU for
    ``relu=False``): one fused call of `bn` when the residual has x's shape, dtype and device,
    else what the unfused operations compute (a residual that broadcasts, say)."""
    kept = _kept(block_tail, x, bn, x, residual, relu)
    if kept is not None:
        return kept  # type: ignore[return-value]  # (a proxy, in a graph being rebuilt)
    # (unfused when another tracer traces the fused model, as pybn.torch.fold's does)
    if not isinstance(x, fx.Proxy) and (residual is None or (
            isinstance(residual, Tensor) and residual.shape == x.shape and residual.dtype == x.dtype
            and residual.device == x.device)):
        y: Tensor = bn(x, residual, relu=relu)
        return y
    y = bn(x) if residual is None else bn(x) + residual
    return torch.relu(y) if relu else y


def relu_dropout_tail(dropout: nn.Module, x: Tensor | fx.Proxy) -> Tensor:
    """``dropout(relu(x))``: one call of pybn's dropout module with the ReLU fused."""
    kept = _kept(relu_dropout_tail, x, dropout, x)
    if kept is not None:
        return kept  # type: ignore[return-value]
    if isinstance(x, fx.Proxy):  # (unfused when another tracer traces the fused model, as for block_tail)
        y: Tensor = dropout(x.relu())
        return y
    y = dropout(x, relu=True)
    return y


@overload
def fuse_tails(model: nn.Module, *, return_report: Literal[False] = ...) -> nn.Module: ...
@overload
def fuse_tails(model: nn.Module, *, return_report: Literal[True]) -> Tuple[nn.Module, List[Fused]]: ...
def fuse_tails(model: nn.Module, *, return_report: bool = False) -> nn.Module | Tuple[nn.Module, List[Fused]]:
    """`model` with each ``relu(bn(x))``, ``bn(x) + r`` and ``relu(bn(x) + r)`` of its forward
    computed by one call of pybn's fused batch norm (forward and backward), and each
    ``dropout(relu(x))`` (an element-wise ``Dropout``) by one call of pybn's dropout.

    The model is first accelerated (:func:`accelerate`, in place), then traced with torch.fx;
    the result is a ``torch.fx.GraphModule`` that shares the model's modules, parameters and
    buffers (an optimizer built on the model still updates it) and has the same ``state_dict``
    keys, in the same order, or the accelerated model itself when no tail can be fused. A
    tail is left as it is when fusing could change what the model computes or what a hook
    sees (docs/pytorch.md, "The fused block tail", lists the cases). A residual that turns
    out not to have x's shape, dtype and device at run time is added unfused
    (:func:`block_tail`). When the forward cannot be traced faithfully (torch.fx fails, it
    changes state, or it depends on ``self.training``, which tracing would freeze) the
    accelerated model is returned unfused with a warning saying why.

    Parameters
    ----------
    model : torch.nn.Module
    return_report : bool
        Also return the list of :class:`Fused` (each is logged at INFO level on the
        ``"pybn.torch"`` logger too).
    """
    flag(return_report, "return_report")
    model = accelerate(model)
    gm, why = _traced(model) if not global_hooks() else (None, "global module hooks would see the fused outputs")
    report: List[Fused] = []
    if gm is not None:
        report = _rewrite(gm)
        why = _same_state_order(gm, model)
    if gm is None or why:
        warnings.warn(f"pybn.torch.fuse_tails: the model is left unfused: {why}", stacklevel=2)
        return (model, []) if return_report else model
    if not report:  # nothing to fuse: the model itself, not a traced copy of its forward
        return (model, []) if return_report else model
    copy_hooks(model, gm)
    gm.training = model.training
    ignored = model.__dict__.get("_ddp_params_and_buffers_to_ignore")  # (offsets_per_rank's: the same names)
    if ignored is not None:
        gm.__dict__["_ddp_params_and_buffers_to_ignore"] = list(ignored)
    _keep_through_copies(gm)
    for fused in report:
        logger.info("pybn.torch.fuse_tails: %s: %s", fused.name, fused.tail)
    return (gm, report) if return_report else gm


# --------------------------------------------------------------------------- copies

# What torch.fx's rebuild of a GraphModule (unpickling, copy.deepcopy) does not keep: the
# order of each module's children, parameters and buffers and which buffers are not
# persistent (it registers them as used, all persistent: a copy's state_dict gained keys and
# stopped loading the model's checkpoints), the modules' modes, and the root's own hooks
# (fuse_tails copied the model's onto it).
_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook",
          "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
          "_ddp_params_and_buffers_to_ignore")  # (the last: pybn.torch.offsets_per_rank's, for DDP)
_ORDERED = ("_modules", "_parameters", "_buffers")


_Layout = Tuple[List[List[str]], Set[str], bool]


def _layout_of(m: nn.Module) -> _Layout:
    """The order of m's children, parameters and buffers, its non-persistent buffers, its mode."""
    return [list(getattr(m, attr)) for attr in _ORDERED], set(m._non_persistent_buffers_set), m.training


def _give_layout(m: nn.Module, layout: _Layout) -> None:
    """Put m's children, parameters and buffers in `layout`'s order (names it lacks last), and
    its non-persistent buffers and mode (torch.fx registers every buffer as persistent, and
    its containers in training mode)."""
    orders, non_persistent, training = layout
    for attr, order in zip(_ORDERED, orders):
        rank = {key: i for i, key in enumerate(order)}
        items = sorted(getattr(m, attr).items(), key=lambda kv: rank.get(kv[0], len(rank)))
        setattr(m, attr, collections.OrderedDict(items))
    m._non_persistent_buffers_set = non_persistent & set(m._buffers)
    m.training = training


def _kept_state(gm: fx.GraphModule) -> Tuple[dict[str, _Layout], dict[str, Any]]:
    layout = {name: _layout_of(m) for name, m in gm.named_modules()}
    return layout, {attr: getattr(gm, attr) for attr in _HOOKS if hasattr(gm, attr)}


def _restore_state(gm: fx.GraphModule, state: Tuple[dict[str, _Layout], dict[str, Any]]) -> None:
    layout, hooks = state
    for name, kept in layout.items():
        try:
            m = gm.get_submodule(name)
        except AttributeError:
            continue
        _give_layout(m, kept)
    for attr, value in hooks.items():
        setattr(gm, attr, value)


def _keep_through_copies(gm: fx.GraphModule) -> None:
    """Make pickles and deep copies of the fused model keep what torch.fx's rebuild loses.
    torch gives every GraphModule a class of its own, so this changes no other module."""
    cls = type(gm)
    cls.__reduce__ = _reduce_fused  # type: ignore[method-assign]
    cls.__deepcopy__ = _deepcopy_fused  # type: ignore[method-assign]
    cls.__copy__ = _copy_fused  # type: ignore[method-assign]


def _reduce_fused(self: fx.GraphModule) -> Tuple[Any, ...]:
    rebuild, args = fx.GraphModule.__reduce__(self)
    return (_rebuilt_fused, (rebuild, args, _kept_state(self)))


# (named in every pickle of a fused model: renaming it breaks the checkpoints saved before)
def _rebuilt_fused(rebuild: Callable[..., fx.GraphModule], args: Tuple[Any, ...],
                   state: Tuple[dict[str, Any], dict[str, Any]]) -> fx.GraphModule:
    gm = rebuild(*args)
    _restore_state(gm, state)
    _keep_through_copies(gm)
    return gm


def _copy_fused(self: fx.GraphModule) -> fx.GraphModule:
    copied = fx.GraphModule.__copy__(self)
    _restore_state(copied, _kept_state(self))
    _keep_through_copies(copied)
    return copied


def _deepcopy_fused(self: fx.GraphModule, memo: dict[int, Any]) -> fx.GraphModule:
    copied = fx.GraphModule.__deepcopy__(self, memo)
    _restore_state(copied, copy.deepcopy(_kept_state(self), memo))
    _keep_through_copies(copied)
    return copied


def unfuse_tails(model: nn.Module) -> int:
    """Every fused tail in the GraphModules of `model` (made by :func:`fuse_tails`) written
    back as separate calls, in place: torch's modules, which :func:`revert` swaps in, take no
    ``residual=`` or ``relu=``. Returns how many."""
    count = 0
    for gm in model.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        graph, before = gm.graph, count
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (block_tail, relu_dropout_tail):
                continue
            module, x, *rest = node.args
            assert isinstance(module, fx.Node) and module.op == "get_attr"  # (as _rewrite wrote it)
            with graph.inserting_before(node):
                # (F.relu: torch.ao's fusion patterns know it, not torch.relu)
                if node.target is block_tail:
                    residual, relu = rest
                    y = graph.call_module(str(module.target), (x,))
                    y = y if residual is None else graph.call_function(operator.add, (y, residual))
                    y = graph.call_function(F.relu, (y,)) if relu else y
                else:
                    y = graph.call_module(str(module.target), (graph.call_function(F.relu, (x,)),))
            node.replace_all_uses_with(y)
            graph.erase_node(node)
            if not module.users:
                graph.erase_node(module)
            count += 1
        if count > before:
            graph.lint()
            gm.recompile()
    return count


def _traced(model: nn.Module) -> Tuple[fx.GraphModule | None, str]:
    """The model traced with its modules' modes as they are, or (None, why not). Traced in
    training and in evaluation mode: a forward that reads ``self.training`` outside the
    modules kept whole gives two graphs, and one graph would freeze one of the modes."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        graphs = []
        for training in (True, False):
            model.train(training)
            gm, _, why = trace(model, restore=True)  # (the user's own model, not a copy)
            if gm is None:
                return None, f"torch.fx cannot trace its forward ({why})"
            graphs.append(gm)
    finally:
        for m, training in modes:
            m.training = training
    if graphs[0].code != graphs[1].code:
        return None, "its forward depends on self.training, which a traced graph would freeze"
    return graphs[0], ""


def _rewrite(gm: fx.GraphModule) -> List[Fused]:
    report = []
    for node in list(gm.graph.nodes):
        tail = _tail_at(node, gm)
        if tail is None:
            continue
        residual, relu, user, last = tail
        # the fused call goes where the last of its inputs is ready: after the residual when
        # that is computed after the batch norm (a downsampling shortcut)
        at = residual if residual is not None and _comes_after(residual, node) else node
        if at is not node and not _may_defer(node, at, gm):
            continue
        # and the residual is read there, where the add read it later: nothing in between
        # may touch it, nor write in place at all (it may write a view of the residual, or the
        # tensor the residual views: the fused call would miss the write)
        if residual is not None and any(residual in n.all_input_nodes or _writes_in_place(n, gm)
                                        for n in _between(at, user)):
            continue
        with gm.graph.inserting_before(node):
            bn = gm.graph.get_attr(node.target)
        with gm.graph.inserting_after(at):
            fused = gm.graph.call_function(block_tail, (bn, node.args[0], residual, relu))
        last.replace_all_uses_with(fused)
        for gone in reversed(list(dict.fromkeys((node, user, last)))):  # the tail's nodes, users first
            gm.graph.erase_node(gone)
        name = ("relu(bn(x) + r)" if relu else "bn(x) + r") if residual is not None else "relu(bn(x))"
        report.append(Fused(str(node.target), name))
    for node in list(gm.graph.nodes):  # then dropout(relu(x)), with the ReLUs the tails left
        dropout = _dropout_of_relu(node, gm)
        if dropout is None:
            continue
        with gm.graph.inserting_before(dropout):
            module = gm.graph.get_attr(str(dropout.target))
            fused = gm.graph.call_function(relu_dropout_tail, (module, node.args[0]))
        dropout.replace_all_uses_with(fused)
        gm.graph.erase_node(dropout)
        gm.graph.erase_node(node)
        report.append(Fused(str(dropout.target), "dropout(relu(x))"))
    gm.graph.lint()
    gm.graph._tracer_cls = gm._tracer_cls = FusedTracer  # (what rebuilds it when unpickled)
    gm.recompile()
    return report


def _dropout_of_relu(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The call of a pybn Dropout module (element-wise, no hooks) right after node when node
    is relu(x) and that call is its only user, else None. Left alone, because the fused call
    would compute something else:
    - a node between the two (the fused call reads x where the dropout was);
    - an in-place ReLU, unless x is the fresh output of a layer (a Linear, a convolution, a
      normalization) that nothing else reads: the unfused ReLU writes x, and through x any
      tensor x views, which the fused call leaves unchanged;
    - an output that a user may write in place: the fused call saves its output for the
      backward (the unfused dropout saves nothing), so only layers that read their input
      may use it, and the forward's result."""
    if not node.args or not isinstance(node.args[0], fx.Node) or len(node.users) != 1:
        return None
    source, (user,) = node.args[0], node.users
    if user is not node.next or user.op != "call_module" or user.args != (node,) or user.kwargs or \
            not _is_relu(node, source, gm):
        return None
    module = gm.get_submodule(str(user.target))
    if type(module) is not pnn.Dropout or has_hooks(module):
        return None
    if _writes_in_place(node, gm) and not (len(source.users) == 1 and _is_layer(source, gm)):
        return None
    if not all(u.op == "output" or _is_layer(u, gm) for u in user.users):
        return None
    return user


# Modules whose forward returns a fresh tensor and does not write its input.
_LAYERS = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm,
           nn.GroupNorm)


def _is_layer(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op != "call_module":
        return False
    module = gm.get_submodule(str(node.target))
    return isinstance(module, _LAYERS) and not getattr(module, "inplace", False)


def _tail_at(node: fx.Node, gm: fx.GraphModule) -> Tuple[fx.Node | None, bool, fx.Node, fx.Node] | None:
    """(residual, relu, the batch norm's one user, the tail's last node) when node is a batch
    norm that starts a tail to fuse, else None."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or len(node.users) != 1:
        return None
    module = gm.get_submodule(str(node.target))
    # pybn's own forward only (a subclass's forward may not take residual= and relu=), no
    # hooks (they would see the fused output)
    if type(module).forward not in _FUSED_FORWARDS or has_hooks(module):
        return None
    (user,) = node.users
    if _is_relu(user, node, gm):
        return None, True, user, user
    residual = _other_addend(user, node)
    if residual is None:
        return None
    if len(user.users) == 1:
        (after,) = user.users
        if _is_relu(after, user, gm):
            return residual, True, user, after
    return residual, False, user, user


def _is_relu(node: fx.Node, source: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether node is relu(source), by any of torch's spellings (a ReLU module without hooks)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return type(module) is nn.ReLU and not has_hooks(module) and node.args == (source,) and not node.kwargs
    if node.op == "call_method":
        return node.target in _RELU_METHODS and node.args == (source,) and not node.kwargs
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        inplace = node.args[1:] + tuple(node.kwargs.values())
        return node.args[:1] == (source,) and set(node.kwargs) <= {"inplace"} and len(inplace) <= 1 and \
            all(type(v) is bool for v in inplace)
    return False


def _other_addend(node: fx.Node, source: fx.Node) -> fx.Node | None:
    """The other operand when node is source + other or other + source (no alpha, no out;
    for an in-place add, source must be the operand written: `other += bn(x)` changes
    other, which a fused call would not)."""
    target = operator_of(node.target) if node.op == "call_function" else None
    is_add = target in _ADD_FUNCTIONS or (node.op == "call_method" and node.target == "add")
    if not is_add or node.kwargs or len(node.args) != 2 or node.args[0] is node.args[1]:
        return None
    a, b = node.args
    if target is operator.iadd and a is not source:
        return None
    other = b if a is source else a if b is source else None
    return other if isinstance(other, fx.Node) else None


def _comes_after(a: fx.Node, b: fx.Node) -> bool:
    for n in b.graph.nodes:
        if n is a:
            return False
        if n is b:
            return True
    return False


def _between(first: fx.Node, stop: fx.Node) -> Iterator[fx.Node]:
    """The nodes after `first` and before `stop`."""
    n = first.next
    while n is not stop and n.op != "root":
        yield n
        n = n.next


def _may_defer(node: fx.Node, at: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the batch norm `node` may run right after `at` instead: no node up to `at`
    calls the same module (the running statistics' updates would change order), reads the
    batch norm's input (and so might change it in place first) or writes in place at all
    (it may write through a view of that input, or into the tensor the input views)."""
    x = node.args[0]
    return not any((n.op == "call_module" and n.target == node.target) or x in n.all_input_nodes or
                   _writes_in_place(n, gm) for n in _between(node, at.next))


def _writes_in_place(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether `node` may write one of its inputs in place: a method or function whose name
    ends in "_", a function given ``True`` after its input (``F.relu(x, True)``,
    ``inplace=True``; other flags count too), ``out=``, an augmented assignment, a module
    built with ``inplace=True``. (Any such write counts, not only one into the tensor at hand:
    which nodes view which others is not recorded in the graph, and such writes are rare
    between a tail's nodes.)"""
    if node.op in ("call_method", "call_function") and in_place(node):
        return True
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (name.endswith("_") and not name.endswith("__")) or \
            any(v is True for v in (*node.args[1:], *node.kwargs.values())) or "out" in node.kwargs
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    return False


def _same_state_order(gm: fx.GraphModule, model: nn.Module) -> str:
    """Puts gm's modules, parameters and buffers in model's order (torch.fx registers them in
    the order the graph uses them; optimizers and their saved state go by that order), then
    "" when the names agree, else why not."""
    for name, original in model.named_modules(remove_duplicate=False):
        try:
            new = gm.get_submodule(name)
        except AttributeError:
            continue
        if new is not original:  # (the modules torch.fx made for the path to the shared ones)
            _give_layout(new, _layout_of(original))
    names: Callable[[Any], List[str]] = lambda m: list(m.state_dict().keys())  # noqa: E731
    if names(gm) != names(model):
        missing, extra = (sorted(set(names(a)) - set(names(b)))[:3] for a, b in ((model, gm), (gm, model)))
        return f"the traced graph leaves out {', '.join(missing)}" if missing else \
            f"the traced graph's state_dict has {', '.join(extra)} too" if extra else \
            "its state_dict order differs after tracing"
    return ""
