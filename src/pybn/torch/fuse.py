"""Fusing an existing model's batch-norm tails for training: :func:`fuse_tails`.

A ResNet block ends in ``relu(bn(x) + identity)``, and its first half in ``relu(bn(x))``:
two or three passes over the activation in torch (each again in the backward), one in
pybn's fused kernel (docs/pytorch.md, "The fused block tail"). A model's forward calls them
as separate operations, which swapping modules (:func:`accelerate`) cannot join, so this
traces the forward with torch.fx and rewrites each tail into one call of the batch-norm
module with ``residual=`` and ``relu=``.
"""
from __future__ import annotations

import collections
import logging
import operator
import warnings
from typing import Any, Callable, List, Literal, NamedTuple, Tuple, overload

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from . import nn as pnn
from ._fold_modules import global_hooks, has_hooks
from ._fold_trace import copy_hooks, trace
from .accelerate import accelerate

__all__ = ["fuse_tails", "Fused", "block_tail"]

logger = logging.getLogger("pybn.torch")

_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class Fused(NamedTuple):
    """One tail rewritten by :func:`fuse_tails`."""

    name: str
    """The batch-norm module's qualified name."""
    tail: str
    """What became one call: "relu(bn(x))", "bn(x) + r" or "relu(bn(x) + r)"."""


def block_tail(bn: nn.Module, x: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
    """``relu(bn(x) + residual)`` (without the add for ``residual=None``, without the ReLU for
    ``relu=False``): one fused call of `bn` when the residual has x's shape, dtype and device,
    else what the unfused operations compute (a residual that broadcasts, say)."""
    if residual is None or (isinstance(residual, Tensor) and residual.shape == x.shape
                            and residual.dtype == x.dtype and residual.device == x.device):
        y: Tensor = bn(x, residual, relu=relu)
        return y
    y = bn(x) + residual
    return torch.relu(y) if relu else y


@overload
def fuse_tails(model: nn.Module, *, return_report: Literal[False] = ...) -> nn.Module: ...
@overload
def fuse_tails(model: nn.Module, *, return_report: Literal[True]) -> Tuple[nn.Module, List[Fused]]: ...
def fuse_tails(model: nn.Module, *, return_report: bool = False) -> nn.Module | Tuple[nn.Module, List[Fused]]:
    """`model` with each ``relu(bn(x))``, ``bn(x) + r`` and ``relu(bn(x) + r)`` of its forward
    computed by one call of pybn's fused batch norm (forward and backward).

    The model is first accelerated (:func:`accelerate`, in place), then traced with torch.fx;
    the result is a ``torch.fx.GraphModule`` that shares the model's modules, parameters and
    buffers (an optimizer built on the model still updates it) and has the same ``state_dict``
    keys, in the same order. A tail is left as it is when the batch norm's output is used
    elsewhere too, or the module has hooks (they would see the fused output). A residual
    that turns out not to have x's shape, dtype and device at run time is added unfused
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
    model = accelerate(model)
    gm, why = _traced(model) if not global_hooks() else (None, "global module hooks would see the fused outputs")
    report: List[Fused] = []
    if gm is not None:
        report = _rewrite(gm)
        why = _same_state_order(gm, model)
    if gm is None or why:
        warnings.warn(f"pybn.torch.fuse_tails: the model is left unfused: {why}", stacklevel=2)
        return (model, []) if return_report else model
    copy_hooks(model, gm)
    gm.training = model.training
    for fused in report:
        logger.info("pybn.torch.fuse_tails: %s: %s", fused.name, fused.tail)
    return (gm, report) if return_report else gm


def _traced(model: nn.Module) -> Tuple[fx.GraphModule | None, str]:
    """The model traced with its modules' modes as they are, or (None, why not). Traced in
    training and in evaluation mode: a forward that reads ``self.training`` outside the
    modules kept whole gives two graphs, and one graph would freeze one of the modes."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        graphs = []
        for training in (True, False):
            model.train(training)
            gm, _, why = trace(model)
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
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(module, pnn._BatchNormForward) or has_hooks(module) or len(node.args) != 1 or node.kwargs \
                or len(node.users) != 1:
            continue
        (user,) = node.users
        residual = _other_addend(user, node)
        if residual is None and not _is_relu(user, node, gm):
            continue
        last = user
        relu = residual is None
        if residual is not None and len(user.users) == 1:
            (after,) = user.users
            relu = _is_relu(after, user, gm)
            last = after if relu else user
        with gm.graph.inserting_before(node):
            bn = gm.graph.get_attr(node.target)
        with gm.graph.inserting_after(last):
            fused = gm.graph.call_function(block_tail, (bn, node.args[0], residual, relu))
        last.replace_all_uses_with(fused)
        for gone in dict.fromkeys((last, user, node)):  # the tail's nodes, users first
            gm.graph.erase_node(gone)
        tail = ("relu(bn(x) + r)" if relu else "bn(x) + r") if residual is not None else "relu(bn(x))"
        report.append(Fused(str(node.target), tail))
    gm.graph.lint()
    gm.recompile()
    return report


def _is_relu(node: fx.Node, source: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether node is relu(source), by any of torch's spellings."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) is nn.ReLU and node.args == (source,) and not node.kwargs
    if node.op == "call_method":
        return node.target in _RELU_METHODS and node.args == (source,) and not node.kwargs
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        inplace = node.args[1:] + tuple(node.kwargs.values())
        return node.args[:1] == (source,) and set(node.kwargs) <= {"inplace"} and len(inplace) <= 1 and \
            all(type(v) is bool for v in inplace)
    return False


def _other_addend(node: fx.Node, source: fx.Node) -> fx.Node | None:
    """The other operand when node is source + other (or other + source; no alpha, no out)."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or \
        (node.op == "call_method" and node.target == "add")
    if not is_add or node.kwargs or len(node.args) != 2 or node.args[0] is node.args[1]:
        return None
    a, b = node.args
    other = b if a is source else a if b is source else None
    return other if isinstance(other, fx.Node) else None


def _same_state_order(gm: fx.GraphModule, model: nn.Module) -> str:
    """Puts gm's modules, parameters and buffers in model's order (torch.fx registers them in
    the order the graph uses them; optimizers and their saved state go by that order), then
    "" when the names agree, else why not."""
    def order_like(original: nn.Module, new: nn.Module) -> None:
        for attr in ("_modules", "_parameters", "_buffers"):
            rank = {name: i for i, name in enumerate(getattr(original, attr))}
            items = sorted(getattr(new, attr).items(), key=lambda kv: rank.get(kv[0], len(rank)))
            setattr(new, attr, collections.OrderedDict(items))

    for name, original in model.named_modules(remove_duplicate=False):
        try:
            new = gm.get_submodule(name)
        except AttributeError:
            continue
        if new is not original:  # (the modules torch.fx made for the path to the shared ones)
            order_like(original, new)
    names: Callable[[Any], List[str]] = lambda m: list(m.state_dict().keys())  # noqa: E731
    if names(gm) != names(model):
        missing = sorted(set(names(model)) - set(names(gm)))
        return f"the traced graph leaves out {', '.join(missing[:3])}" if missing else \
            "its state_dict order differs after tracing"
    return ""
