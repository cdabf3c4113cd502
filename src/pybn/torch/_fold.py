"""Fold batch norm and remove dropout in a PyTorch module for inference: :func:`fold`.

The arithmetic is :func:`pybn.fold_conv_bn` / :func:`pybn.fold_bn_linear`; the other
``_fold_*`` modules find what to fold and check that folding it is exact: ``_fold_observe``
(what the example call shows), ``_fold_trace`` (tracing), ``_fold_modules`` (which modules
qualify), ``_fold_ops`` and ``_fold_affine`` (per-channel steps in a graph and their folds),
``_fold_graph`` (the traced path), ``_fold_untraced`` (models torch.fx cannot trace),
``_fold_export`` (torch.export programs), ``_fold_branches`` (merging parallel branches) and
``_fold_report``. Imported by ``pybn.torch`` after its check that torch can be imported.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import fx, nn

from .._checks import flag
from ._fold_graph import fold_graph
from ._fold_observe import fresh, observe
from ._fold_report import Folded, NotFolded
from ._fold_trace import Tracer, copy_hooks, node_ranks, same_output, trace
from ._fold_untraced import fold_untraced

__all__ = ["fold", "Folded", "NotFolded"]

logger = logging.getLogger("pybn.torch")


def fold(module: Any, *, example_inputs: Any = None, merge_branches: bool = False,
         return_report: bool = False) -> Any:
    """A copy of `module` for inference, with batch norm folded and dropout removed.

    In eval mode a batch norm with running statistics is a per-channel affine map, so it
    can be merged into the Linear or convolution next to it, and dropout is the identity.
    The result computes the same function as ``module.eval()`` (up to float rounding) with
    fewer layers. A fold happens only where it is exact; every batch norm, per-channel affine
    module and dropout left in place is in the report with the reason.

    Parameters
    ----------
    module : torch.nn.Module or torch.export.ExportedProgram
        The model. It is not modified, nor is its train/eval mode (it is deep-copied). An
        ``ExportedProgram`` gives an ``ExportedProgram`` (see Notes). A ``torch.compile(model)``
        wrapper gives the folded ``model``, not compiled (compile the result).
    example_inputs : Tensor or tuple of Tensors, optional
        Positional arguments for one forward call (never written: the calls get copies).
        When given, that call is run once on a
        copy of the model (in eval mode, without gradients) to see how a layer subclass with
        its own ``forward`` computes and, for a model torch.fx cannot trace, which module
        feeds which; then the traced graph runs once on what forward got, to see the rank of
        every tensor (see the rank rule in Notes) and to check that it returns what forward
        returned (else it is not used, as for a model torch.fx cannot trace: torch.fx records
        ``x += y`` as ``x + y``, losing a change seen through another name). Hooks of the
        modules run in both calls. Not for an ``ExportedProgram``, whose graph has every shape.
    merge_branches : bool
        Also merge parallel conv branches that are summed (RepVGG / MobileOne blocks: a
        KxK conv, a 1x1 conv and an identity batch norm over the same input) into one conv.
        Off by default: it changes the architecture, not only the weights.
    return_report : bool
        Also return the list of what was done and what was not.

    Returns
    -------
    torch.nn.Module or torch.export.ExportedProgram
        A new module in eval mode. When `module`'s forward can be traced with torch.fx it is
        a ``torch.fx.GraphModule`` (so methods other than ``forward`` of `module`'s class are
        not there; hooks registered on `module` itself are registered on it, and are called
        with it as their module); otherwise it is a copy of `module` of the same class.
        For an ``ExportedProgram``, a new ``ExportedProgram``.
    list of Folded and NotFolded
        Only with ``return_report=True``: one :class:`Folded` per fold or removed dropout,
        in the order done, then one :class:`NotFolded` per batch norm, affine module and
        dropout left. Each is also logged at INFO level on the ``"pybn.torch"`` logger.

    Raises
    ------
    TypeError
        `module` is not a module or an ExportedProgram, or cannot be deep-copied;
        `merge_branches` is not a bool; `example_inputs` is given with an ExportedProgram.
    ValueError
        Calling the model on `example_inputs` raised (the message has that error); a lazy
        module with buffers (LazyBatchNorm) was never called.

    Notes
    -----
    What is folded (every module involved must be used exactly once, be a plain torch
    class -- a subclass overriding ``forward`` is left alone, with the exceptions below --
    and have no hooks or parametrizations; no global module hooks may be registered; with
    `example_inputs`, none of its parameters or buffers may be read outside its own call,
    by forward, another module or a hook -- without them, a hook's reads cannot be seen):

    * A ``Conv{k}d`` or ``ConvTranspose{k}d`` (any groups, depthwise included) or a
      ``Linear`` whose output goes only to a per-channel affine map of it, which is one of:
      a ``BatchNorm{k}d`` (``BatchNorm1d`` after a Linear) or ``SyncBatchNorm`` module, or
      :mod:`pybn.torch.nn`'s drop-in for one; a ``batch_norm`` call in eval mode on constant
      statistics (``torch.ops.pybn.batch_norm_infer`` too) (what torch.fx records for a
      batch norm subclass with its own forward, such as timm's ``BatchNormAct2d``: the batch
      norm folds, its activation stays); or multiplies, adds, subtracts and divides by
      constants (what torchvision's ``FrozenBatchNorm2d``, ``x * scale + shift``, traces
      to). Consecutive ones of the same module fold together. The layer gets the folded
      weight and a bias (added if it had none). A Linear's output may reach them as rows of
      its features, ``y.flatten(0, k)`` of rank 2 (shown by the example call or an exported
      program; timm LeViT's ``bn(linear(x).flatten(0, 1))``), the flatten staying.
    * The same maps right before a ``Linear``, or before a ``Conv{k}d`` with every kernel
      size 1, zero padding and ``groups=1`` (with padding, the conv's zero border would not
      see the shift, so that fold is not exact). Maps after a layer are folded first.
    * A layer subclass with its own ``forward`` (timm's ``Conv2dSame`` pads its input by an
      amount computed from the input's size) qualifies when `example_inputs` are given and
      that call showed its forward use its weight and bias only as those of one call of
      the layer's function (``torch.conv2d``...) whose result it returned.
    * A constant must be one value per channel: its shape all ones but the channel axis,
      and no more dimensions than the layer's output has (the rank rule below), the
      layer's dtype (a float64 constant would make the result float64), finite values.
    * Dropout modules and functional dropout calls whose ``training`` argument is False
      (e.g. ``F.dropout(x, p, training=self.training)``) are removed. A call with
      ``training=True`` -- ``F.dropout``'s default -- drops units in eval mode too, so it
      is kept. Plain ``nn.Identity`` calls are bypassed.
    * Only batch norms with running statistics (``track_running_stats=True``); affine or
      not; with finite parameters, a variance >= 0 and ``var + eps > 0`` in every channel
      (a batch norm holding NaN, infinities or a negative variance is left to torch,
      which computes NaN or infinities there that no folded weight reproduces); and only
      where the folded weights are finite in the layer's dtype.

    The rank rule: a batch norm normalizes dimension 1, while a Linear works on the last
    dimension. They agree only on 2-D ``(N, C)`` tensors; on a 3-D ``(N, C, L)`` tensor a
    Linear acts on ``L``. Likewise a ``Conv1d`` fed an unbatched ``(C, L)`` input gives a
    2-D output, on which ``BatchNorm1d`` normalizes ``L``. BatchNorm2d/3d check their input
    rank themselves, but ``BatchNorm1d`` (2-D and 3-D), ``SyncBatchNorm`` and a ``batch_norm``
    call (any rank >= 2) do not, and torch.fx does not know ranks: so they fold only where
    the rank is known -- asserted in the graph (timm's ``torch._assert(x.ndim == 4)``) or
    shown by `example_inputs` (rank 2 next to a Linear, k + 2 next to a ``Conv{k}d``). One
    the example does not reach is left alone. Likewise a constant with as many dimensions
    as the layer's batched output (FrozenBatchNorm2d's ``(1, C, 1, 1)``) would add a
    dimension to an unbatched one: it folds only where the rank is known.

    Modules with hooks are called as one module by the traced result (their hooks run at
    every call, nothing inside them is folded); so is a module whose own forward torch.fx
    cannot trace (timm's ``Conv2dSame``), while the rest of the model is traced. When the
    model's own forward cannot be traced (e.g. ``if x.sum() > 0:`` in it), the result is a
    copy of the model in which every dropout module is replaced by ``nn.Identity``; with
    `example_inputs`, the pairs that call showed adjacent are folded: a module whose output
    went to one other module's first argument and to nothing else (no other module, no
    torch function outside that module, not the model's output), both called once and
    registered under one name. A folded batch norm module becomes ``nn.Identity`` (so
    indices into Sequentials stay valid); a module whose traced forward starts with
    per-channel maps (BatchNormAct2d, FrozenBatchNorm2d) is replaced by its traced graph
    without them. That adjacency holds for the path the example call took: a forward whose
    module calls depend on the input's values can pair modules differently for other inputs.
    Functional dropout calls then stay.

    With ``merge_branches=True``, an add of branches over one input ``x`` -- convolutions
    of ``x`` (their batch norms folded first), a per-channel affine map of ``x`` (the
    identity branch's batch norm) or ``x`` itself -- becomes one convolution when the
    convolutions have the same stride, dilation, groups, channels and zero padding, each
    smaller kernel sitting inside the largest one at the same offset (a 1x1 kernel at the
    centre of a 3x3 with padding 1) so that every output sees the same input positions.

    An ``ExportedProgram`` (``torch.export.export(model.eval(), args)``) is folded in its
    ATen graph: ``conv*d``/``convolution``/``linear`` calls whose weights are parameters
    or buffers read by nothing else, followed or preceded by ``batch_norm`` calls in eval
    mode or arithmetic by constants; its shapes give every rank. The folded weights replace
    the parameters in its state dict, a bias parameter is added where the layer had none,
    and the parameters and buffers no longer used are dropped from the signature. The
    result runs (``.module()``), and can be saved and exported again.

    The result is for inference only: it is traced in eval mode (``self.training`` is
    False in the recorded ``forward``) and has no batch norm left to train, so calling
    ``.train()`` on it does not bring training behaviour back.

    Folded weights keep the original weight's dtype, device and ``requires_grad``
    (float16 and bfloat16 weights too: folded in float64 and rounded once, docs/dtypes.md).
    """
    flag(merge_branches, "merge_branches")
    flag(return_report, "return_report")
    exported = _exported_program_class()
    if exported is not None and isinstance(module, exported):
        from ._fold_export import fold_exported

        if example_inputs is not None:
            raise TypeError("example_inputs: an ExportedProgram has its shapes already; pass None")
        program, entries = fold_exported(module, merge_branches=merge_branches)
        return (program, entries) if return_report else program
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module or torch.export.ExportedProgram, got "
                        f"{type(module).__name__}")
    module = _uncompiled(module)
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError("module: a TorchScript module (torch.jit.script or trace) cannot be folded; fold the "
                        "Python module, then script the result")
    try:
        model = copy.deepcopy(module).eval()
    except Exception as exc:
        lazy = next((name for name, t in [*module.named_buffers(), *module.named_parameters()]
                     if nn.parameter.is_lazy(t)), None)
        if lazy is not None:  # (a lazy buffer cannot be copied; a lazy parameter can, and is reported)
            raise ValueError(f"module: {lazy} is not initialized (a lazy module never called): run the model "
                             "once, then fold it") from exc
        raise TypeError(f"module: cannot be deep-copied ({type(exc).__name__}: {exc}); fold works on a "
                        "copy") from exc
    seen = None if example_inputs is None else observe(model, example_inputs)
    report: list[Folded | NotFolded] = []
    traced, opaque, why = trace(model)
    ranks, failure = None, ""
    if traced is not None and seen is not None:
        ranks, failure = _ranks_and_check(traced, seen)
        if ranks is None:
            traced, why = None, failure
    if traced is None:
        why = f"torch.fx cannot trace {type(module).__name__} ({why})"
        logger.info("pybn.torch.fold: %s; folding the pairs the example call shows adjacent", why)
        model = copy.deepcopy(module).eval()  # the traced copy may have been changed by tracing
        seen = None if example_inputs is None else observe(model, example_inputs)
        fold_untraced(model, seen, report, why)
        result: nn.Module = model
    else:
        for name, reason in opaque.items():
            logger.info("pybn.torch.fold: %s is called as a whole: torch.fx cannot trace it (%s)", name, reason)
        fold_graph(traced, seen, report, opaque, merge_branches, ranks, failure)
        copy_hooks(model, traced)
        result = traced
    _without_pybn_tracer(result)
    result.eval()
    return (result, report) if return_report else result


def _without_pybn_tracer(result: nn.Module) -> None:
    """The graphs pybn's tracer recorded name torch.fx's tracer instead when they call nothing
    of pybn's: a GraphModule pickles a reference to its tracer's class (to trace its code
    again when loaded), so the saved model would need pybn to load. (Their augmented
    assignments are plain calls by now, :func:`as_torch_calls`, which fx's tracer records as
    they are.)"""
    for gm in result.modules():
        if not (isinstance(gm, fx.GraphModule) and gm._tracer_cls is not None and issubclass(gm._tracer_cls, Tracer)):
            continue
        if not any(str(getattr(node.target, "__module__", "")).startswith("pybn")
                   for node in gm.graph.nodes if node.op == "call_function"):
            gm._tracer_cls = gm.graph._tracer_cls = None


def _ranks_and_check(traced: Any, seen: Any) -> tuple[dict[str, int] | None, str]:
    """Run the traced graph on what forward got in the example call: (the rank of every node,
    "") when it returns what forward returned; ({}, why) when it cannot be run on them (keyword
    arguments: the folds that need ranks are then refused); (None, why) when it raises or
    returns something else -- the graph is not the model, and is not used."""
    if seen.forward_args is None:
        return {}, "the example call passed keyword arguments to forward: the traced graph was not run on it"
    ranks, failure, out = node_ranks(traced, fresh(seen.forward_args))
    if failure:  # forward ran on these arguments: a graph that cannot is not the model
        return None, failure
    if not same_output(out, seen.output):
        return None, ("its traced graph computes another result than forward on example_inputs (a change "
                      "the trace does not record)")
    return ranks, ""


def _uncompiled(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile(module)`` wrapper holds (its hooks would be compiled with
    it, and fold's example call runs hooks): that module is folded, and the caller compiles
    the result again if wanted."""
    dynamo = getattr(torch, "_dynamo", None)
    wrapper = getattr(getattr(dynamo, "eval_frame", None), "OptimizedModule", None)
    while wrapper is not None and isinstance(module, wrapper):
        module = module._orig_mod
    return module


def _exported_program_class() -> Any:
    export = getattr(torch, "export", None)
    return getattr(export, "ExportedProgram", None) if export is not None else None
