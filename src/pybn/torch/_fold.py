"""Fold batch norm and remove dropout in a PyTorch module for inference.

``import pybn.torch`` needs PyTorch (``pip install 'pybn-kernels[torch]'``); ``import pybn`` does not.
The arithmetic is :func:`pybn.fold_conv_bn` / :func:`pybn.fold_bn_linear`; this module only
finds the pairs, checks that folding them is exact, and writes the new weights back.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Iterator, NamedTuple, Sequence

try:
    import torch
    from torch import fx, nn
    from torch.nn.utils import parametrize
except ImportError as exc:  # torch is an optional dependency of pybn
    raise ImportError("pybn.torch needs PyTorch, which could not be imported; "
                      "install it with: pip install 'pybn-kernels[torch]' (the CPU-only build: add "
                      "--extra-index-url https://download.pytorch.org/whl/cpu)") from exc

import numpy as np

from ..fold import batch_norm_fold_problem, fold_bn_linear, fold_conv_bn

__all__ = ["fold", "Folded", "NotFolded"]

logger = logging.getLogger("pybn.torch")


_CONVS: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_TRANSPOSES: dict[type[nn.Module], int] = {
    nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_BATCH_NORMS: dict[type[nn.Module], int] = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout)

# functional dropout -> (name of its `training` argument, its position, its default)
_FUNCTIONAL_DROPOUTS: dict[Callable[..., Any], tuple[str, int, bool | None]] = {
    nn.functional.dropout: ("training", 2, True),
    nn.functional.dropout1d: ("training", 2, True),
    nn.functional.dropout2d: ("training", 2, True),
    nn.functional.dropout3d: ("training", 2, True),
    nn.functional.alpha_dropout: ("training", 2, False),
    nn.functional.feature_alpha_dropout: ("training", 2, False),
    torch.dropout: ("train", 2, None),
    torch.alpha_dropout: ("train", 2, None),
    torch.feature_dropout: ("train", 2, None),
    torch.feature_alpha_dropout: ("train", 2, None),
}


class Folded(NamedTuple):
    """One simplification made by :func:`fold`.

    Attributes
    ----------
    kind : str
        ``"conv+bn"`` (a Conv or ConvTranspose followed by a batch norm), ``"linear+bn"``,
        ``"bn+linear"`` (a batch norm followed by a Linear), ``"bn+conv"`` (a batch norm
        followed by a pointwise conv), ``"dropout"`` (a dropout module) or
        ``"functional dropout"`` (a ``torch.nn.functional`` dropout call).
    names : tuple of str
        The qualified module names involved, in data-flow order (the first one of a pair
        is kept and holds the folded weights; the batch norm is gone). For a functional
        dropout, the name of its torch.fx node (e.g. ``"dropout_1"``).
    """

    kind: str
    names: tuple[str, ...]


class NotFolded(NamedTuple):
    """A batch norm or dropout that :func:`fold` left in the model, and why.

    Attributes
    ----------
    kind : str
        ``"batch norm"``, ``"dropout"`` (a dropout module) or ``"functional dropout"``.
    names : tuple of str
        The module's qualified name (a functional dropout: its torch.fx node name).
    reason : str
        Why it stays: what makes folding or removing it inexact, or what is unknown
        (and, where an argument of :func:`fold` would tell, which one).
    """

    kind: str
    names: tuple[str, ...]
    reason: str


_BATCH_NORM_BASE = nn.modules.batchnorm._BatchNorm  # every batch norm class, for the report
_LAYER_CLASSES = (nn.Linear, *_CONVS, *_CONV_TRANSPOSES)
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def fold(module: nn.Module, *, example_inputs: Any = None,
         return_report: bool = False) -> nn.Module | tuple[nn.Module, list[Folded | NotFolded]]:
    """A copy of `module` for inference, with batch norm folded and dropout removed.

    In eval mode a batch norm with running statistics is a per-channel affine map, so it
    can be merged into the Linear or convolution next to it, and dropout is the identity.
    The result computes the same function as ``module.eval()`` (up to float rounding) with
    fewer layers. A fold happens only where it is exact; every batch norm and dropout left
    in place is in the report with the reason.

    Parameters
    ----------
    module : torch.nn.Module
        The model. It is not modified, nor is its train/eval mode (it is deep-copied).
    example_inputs : Tensor or tuple of Tensors, optional
        Positional arguments for one forward call. When given, that call is run once (in
        eval mode, without gradients) to see the rank of every batch norm's input (see
        the rank rule in Notes) and, for a module torch.fx cannot trace, which module
        calls which. ``BatchNorm1d`` folds only with it.
    return_report : bool
        Also return the list of what was done and what was not.

    Returns
    -------
    torch.nn.Module
        A new module in eval mode. When `module` can be traced with torch.fx it is a
        ``torch.fx.GraphModule`` (so methods other than ``forward`` of `module`'s class are
        not there; hooks registered on `module` itself are registered on it, and are called
        with it as their module); otherwise it is a copy of `module` of the same class.
    list of Folded and NotFolded
        Only with ``return_report=True``: one :class:`Folded` per fold or removed dropout,
        in the order done, then one :class:`NotFolded` per batch norm and dropout left.
        Each is also logged at INFO level on the ``"pybn.torch"`` logger.

    Raises
    ------
    TypeError
        `module` is not a module, or cannot be deep-copied.
    ValueError
        Calling the model on `example_inputs` raised (the message has that error).

    Notes
    -----
    What is folded (every module involved must be used exactly once, be a plain torch
    class -- a subclass overriding ``forward`` is left alone -- and have no hooks or
    parametrizations; no global module hooks may be registered):

    * ``Conv{k}d`` or ``ConvTranspose{k}d`` (any groups, depthwise included) whose output
      goes only to a ``BatchNorm{k}d``; ``Linear`` whose output goes only to a
      ``BatchNorm1d``. The batch norm is removed and the layer gets the folded weight and
      a bias (added if it had none).
    * A ``BatchNorm1d`` whose output goes only to a ``Linear`` with ``in_features ==
      num_features``, and a ``BatchNorm{k}d`` whose output goes only to a ``Conv{k}d``
      with every kernel size 1, zero padding and ``groups=1`` (with padding, the conv's
      zero border would not see the batch norm's shift, so that fold is not exact).
      Pairs where the batch norm follows a layer are folded first.
    * Dropout modules and functional dropout calls whose ``training`` argument is False
      (e.g. ``F.dropout(x, p, training=self.training)``) are removed. A call with
      ``training=True`` -- ``F.dropout``'s default -- drops units in eval mode too, so it
      is kept.
    * Only batch norms with running statistics (``track_running_stats=True``); affine or
      not; with finite parameters, a variance >= 0 and ``var + eps > 0`` in every channel
      (a batch norm holding NaN, infinities or a negative variance is left to torch,
      which computes NaN or infinities there that no folded weight reproduces); and only
      where the folded weights are finite in the layer's dtype.

    The rank rule: a batch norm normalizes dimension 1, while a Linear works on the last
    dimension. They agree only on 2-D ``(N, C)`` tensors; on a 3-D ``(N, C, L)`` tensor a
    Linear acts on ``L``. Likewise a ``Conv1d`` fed an unbatched ``(C, L)`` input gives a
    2-D output, on which ``BatchNorm1d`` normalizes ``L``. BatchNorm2d/3d check their input
    rank themselves, but BatchNorm1d accepts 2-D and 3-D inputs, and torch.fx does not know
    ranks: so a ``BatchNorm1d`` is folded only when `example_inputs` are given, and only
    where its input had rank 2 in that call (next to a Linear) or 3 (next to a Conv1d).
    One the example does not reach, or reaches with several ranks, is left alone.

    Modules with hooks are called as one module by the traced result (their hooks run at
    every call, nothing inside them is folded). When torch.fx cannot trace the model (e.g.
    ``if x.sum() > 0:`` in ``forward``), the result is a copy of the model in which every
    dropout module is replaced by ``nn.Identity``; with `example_inputs`, pairs of adjacent
    children of an ``nn.Sequential`` (``nn.Identity`` between them ignored) are folded too,
    where the example call showed both children called by that Sequential alone (the folded
    batch norm becomes ``nn.Identity``, so indices stay valid). Functional dropout calls
    then stay.

    The result is for inference only: it is traced in eval mode (``self.training`` is
    False in the recorded ``forward``) and has no batch norm left to train, so calling
    ``.train()`` on it does not bring training behaviour back.

    Folded weights keep the original weight's dtype, device and ``requires_grad``
    (float16 and bfloat16 weights are folded in float32 and rounded back).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError("module: a TorchScript module (torch.jit.script or trace) cannot be folded; fold the "
                        "Python module, then script the result")
    try:
        model = copy.deepcopy(module).eval()
    except Exception as exc:  # noqa: BLE001 - whatever the model holds that cannot be copied
        raise TypeError(f"module: cannot be deep-copied ({type(exc).__name__}: {exc}); fold works on a "
                        "copy") from exc
    seen = None if example_inputs is None else _observe(model, example_inputs)
    report: list[Folded | NotFolded] = []
    traced, why = _trace(model)
    if traced is None:
        why = f"torch.fx cannot trace {type(module).__name__} ({why})"
        logger.info("pybn.torch.fold: %s; folding inside nn.Sequential containers only", why)
        model = copy.deepcopy(module).eval()  # the traced copy may have been changed by tracing
        seen = None if example_inputs is None else _observe(model, example_inputs)
        _fold_untraced(model, seen, report, why)
        result = model
    else:
        _fold_graph(traced, seen, report)
        _copy_hooks(model, traced)
        result = traced
    result.eval()
    return (result, report) if return_report else result


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


# ---------------------------------------------------------------------------------------
# What one example call shows


class _Seen(NamedTuple):
    """What one forward call on the example inputs showed."""

    ranks: dict[int, set[int]]  # id(batch norm) -> the ranks of its input
    callers: dict[int, set[int | None]]  # id(module) -> ids of the modules whose forward called it


def _observe(model: nn.Module, example_inputs: Any) -> _Seen:
    """Run a copy of `model` once on `example_inputs` (eval mode, no gradients) with recording
    hooks; what it shows, keyed by the ids of `model`'s own modules.

    A copy, because forward may change state (a counter, a cache) that the result must not get.
    """
    scratch = copy.deepcopy(model)
    seen = _record_call(scratch, example_inputs)
    # deepcopy keeps the structure: the k-th module of the copy is the k-th of `model`
    ids: dict[int | None, int | None] = {None: None}
    pairs = zip(scratch.named_modules(remove_duplicate=False), model.named_modules(remove_duplicate=False))
    for (_, a), (_, b) in pairs:
        ids[id(a)] = id(b)
    return _Seen({ids[k]: v for k, v in seen.ranks.items()},
                 {ids[k]: {ids[c] for c in v} for k, v in seen.callers.items()})


def _record_call(model: nn.Module, example_inputs: Any) -> _Seen:
    seen = _Seen({}, {})
    active: list[nn.Module] = []

    def before(m: nn.Module, args: tuple[Any, ...]) -> None:
        seen.callers.setdefault(id(m), set()).add(id(active[-1]) if active else None)
        active.append(m)
        if isinstance(m, _BATCH_NORM_BASE) and args and isinstance(args[0], torch.Tensor):
            seen.ranks.setdefault(id(m), set()).add(args[0].dim())

    def after(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        active.pop()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(before))
        handles.append(m.register_forward_hook(after, always_call=True))
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # noqa: BLE001 - the model's own error, passed on with the argument's name
        raise ValueError(f"example_inputs: calling the model on them raised {type(exc).__name__}: "
                         f"{_first_line(exc)}") from exc
    finally:
        for handle in handles:
            handle.remove()
    return seen


# ---------------------------------------------------------------------------------------
# Tracing, and the hooks of the traced module


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping every module with hooks, and pybn.torch.nn's drop-ins, as one call.

    Traced through, a module's hooks would run once, at trace time, on proxies: their side
    effects would be lost and their results frozen into the graph.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # global hooks: every module call must stay a call for them to run
        return (_has_hooks(m) or _global_hooks() or getattr(type(m), "drop_in_for", None) is not None
                or super().is_leaf_module(m, module_qualified_name))


def _trace(model: nn.Module) -> tuple[fx.GraphModule | None, str]:
    """(the traced module, "") or (None, why torch.fx cannot trace `model` faithfully).

    Tracing runs forward once on proxies; an in-place change of a tensor that is not proxied, or
    an attribute assigned, happens then, once, for real, and is not in the graph: the traced
    module would lack it (a call counter that never counts). So state changed by tracing is a
    failure to trace.
    """
    before = _state(model)
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        traced = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # noqa: BLE001 - any failure to trace means: use the fallback
        return None, f"{type(exc).__name__}: {_first_line(exc)}"
    changed = [name for name, value in _state(model).items() if before.get(name) != value]
    if changed:
        return None, f"forward changes {', '.join(sorted(changed)[:3])}, which a traced graph would not"
    return traced, ""


def _state(model: nn.Module) -> dict[str, Any]:
    """What identifies the state of every module: its tensors (object and in-place version) and
    its plain Python attributes."""
    plain = (int, float, bool, str, bytes, type(None))
    state: dict[str, Any] = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            state[_join(prefix, name)] = (id(t), t._version)
        for name, value in vars(m).items():
            if isinstance(value, plain):
                state[_join(prefix, name)] = repr(value)  # (a NaN equals itself as text)
    return state


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOKS)


def _global_hooks() -> bool:
    """Module hooks registered for every module (torch.nn.modules.module.register_module_*)."""
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, f"_global{name}", None) for name in _HOOKS)


def _copy_hooks(source: nn.Module, target: nn.Module) -> None:
    """Register `source`'s own hooks on `target`, in their order and with their options.

    torch.fx traces ``forward`` itself, so the traced module would lose them.
    """
    for key, hook in source._forward_pre_hooks.items():
        target.register_forward_pre_hook(hook, with_kwargs=key in source._forward_pre_hooks_with_kwargs)
    for key, hook in source._forward_hooks.items():
        target.register_forward_hook(hook, with_kwargs=key in source._forward_hooks_with_kwargs,
                                     always_call=key in source._forward_hooks_always_called)
    for hook in source._backward_pre_hooks.values():
        target.register_full_backward_pre_hook(hook)
    for hook in source._backward_hooks.values():
        if source._is_full_backward_hook:
            target.register_full_backward_hook(hook)
        else:
            target.register_backward_hook(hook)


# ---------------------------------------------------------------------------------------
# Which modules may be folded: each check returns why not (None: it may)


def _plain_problem(module: nn.Module, classes: Sequence[type[nn.Module]]) -> str | None:
    """Why `module` is not one of `classes` (or a subclass keeping its forward), unhooked.

    A subclass with its own forward (e.g. weight standardization) computes something
    else; hooks and parametrizations would be lost or broken by changing the weights.
    """
    name = type(module).__name__
    matching = [c for c in classes if isinstance(module, c)]
    if not matching:
        return f"{name} is not {' or '.join(c.__name__ for c in classes)}"
    # pybn.torch.nn's drop-ins compute the same function as the class they replace
    if not any(type(module).forward is c.forward or getattr(type(module), "drop_in_for", None) is c
               for c in matching):
        return f"{name} has its own forward"
    if any(isinstance(t, nn.parameter.UninitializedTensorMixin) for t in _tensors(module)):
        return f"{name} is not initialized (a lazy module never called)"
    if _has_hooks(module):
        return f"{name} has hooks, which would no longer run"
    if _global_hooks():
        return "global module hooks are registered (torch.nn.modules.module.register_module_*), which would " \
               "no longer run for it"
    if parametrize.is_parametrized(module):
        return f"{name} has parametrizations"
    if any(t.is_meta for t in _tensors(module)):
        return f"{name} is on the meta device (no values to fold)"
    return None


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)


def _layer(module: nn.Module) -> tuple[str, int] | None:
    """("linear", 0), ("conv", k) or ("conv_transpose", k) for a layer class; else None."""
    tables = (("linear", {nn.Linear: 0}), ("conv", _CONVS), ("conv_transpose", _CONV_TRANSPOSES))
    for kind, table in tables:
        for cls, k in table.items():
            if isinstance(module, cls):
                return kind, k
    return None


def _layer_problem(layer: nn.Module) -> str | None:
    found = _layer(layer)
    problem = _plain_problem(layer, _LAYER_CLASSES)
    if problem or found is None:
        return problem
    if not _finite(layer.weight) or (layer.bias is not None and not _finite(layer.bias)):
        return f"the weights of {type(layer).__name__} are not finite"
    return None


def _batch_norm_dims(module: nn.Module) -> int | None:
    """k of a BatchNorm{k}d (or subclass); else None."""
    for cls, k in _BATCH_NORMS.items():
        if isinstance(module, cls):
            return k
    return None


def _bn_problem(bn: nn.Module) -> str | None:
    """Why this batch norm cannot be folded into any layer (None: it can, with a partner)."""
    problem = _plain_problem(bn, list(_BATCH_NORMS))
    if problem:
        return problem
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False): it normalizes with the batch's " \
               "statistics in eval mode too"
    arrays = _bn_arrays(bn)
    params = {"running_mean": arrays["running_mean"], "running_var": arrays["running_var"],
              "weight": arrays["gamma"], "bias": arrays["beta"]}
    return batch_norm_fold_problem(params, "running_var", float(bn.eps))


def _rank_problem(bn: nn.Module, expected: int, seen: _Seen | None) -> str | None:
    """The rank rule of fold's Notes."""
    if seen is None:
        if isinstance(bn, nn.BatchNorm1d):
            return (f"BatchNorm1d takes 2-D and 3-D inputs and this fold is exact only for {expected}-D ones, "
                    "which torch.fx cannot see: pass example_inputs to fold it")
        return None  # BatchNorm2d/3d raise on any other rank
    ranks = seen.ranks.get(id(bn))
    if not ranks:
        return "the example call did not reach it"
    if ranks != {expected}:
        got = " and ".join(str(r) for r in sorted(ranks))
        return f"its input had rank {got} in the example call; this fold is exact only for rank {expected}"
    return None


# In both checks a layer with k spatial dims (Linear: 0) pairs with BatchNorm{max(k, 1)}d
# on tensors of rank k + 2: (N, C) for a Linear, (N, C, *spatial) for a conv.


def _layer_then_bn_problem(layer: nn.Module, bn: nn.Module, seen: _Seen | None) -> str | None:
    found, bn_k = _layer(layer), _batch_norm_dims(bn)
    if bn_k != max(found[1], 1):
        return f"{type(bn).__name__} does not match {type(layer).__name__}"
    out = layer.out_features if found[0] == "linear" else layer.out_channels
    if out != bn.num_features:
        return f"{type(layer).__name__} has {out} outputs, the batch norm {bn.num_features} channels"
    return _rank_problem(bn, found[1] + 2, seen)


def _bn_then_layer_problem(bn: nn.Module, layer: nn.Module, seen: _Seen | None) -> str | None:
    found, bn_k = _layer(layer), _batch_norm_dims(bn)
    # Not ConvTranspose: with stride > 1 some outputs get no kernel tap, so no BN shift.
    if found[0] == "conv_transpose":
        return "a batch norm before a ConvTranspose does not fold (outputs no kernel tap reaches miss its shift)"
    if bn_k != max(found[1], 1):
        return f"{type(bn).__name__} does not match {type(layer).__name__}"
    inputs = layer.in_features if found[0] == "linear" else layer.in_channels
    if inputs != bn.num_features:
        return f"{type(layer).__name__} has {inputs} inputs, the batch norm {bn.num_features} channels"
    if found[0] == "conv":
        # A grouped conv's weight (out, in/groups, 1...) is not the (out, in) fold_bn_linear takes.
        if any(size != 1 for size in layer.kernel_size) or layer.groups != 1:
            return (f"a batch norm folds only into a 1x1 conv with groups=1, not kernel {tuple(layer.kernel_size)} "
                    f"with groups={layer.groups}")
        # The conv's zero padding would not get BN's shift at the border. ("same" with a 1-wide
        # kernel pads nothing; padding_mode is moot without padding.)
        if not (layer.padding in ("valid", "same") or all(p == 0 for p in layer.padding)):
            return "the conv pads its input: the zero border would not see the batch norm's shift"
    return _rank_problem(bn, found[1] + 2, seen)


def _dropout_problem(module: nn.Module) -> str | None:
    return _plain_problem(module, _DROPOUTS)


# ---------------------------------------------------------------------------------------
# Computing and writing the folded weights


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor.detach()).all())


def _to_numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    if tensor is None:
        return None
    t = tensor.detach().cpu()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()  # pybn folds float32/float64; half types are rounded back afterwards
    return t.numpy()


def _bn_arrays(bn: nn.Module) -> dict[str, Any]:
    return dict(running_mean=_to_numpy(bn.running_mean), running_var=_to_numpy(bn.running_var),
                gamma=_to_numpy(bn.weight), beta=_to_numpy(bn.bias), eps=bn.eps)


def _folded(first: nn.Module, second: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(the layer, its folded weight, its folded bias) for the pair; weights like its old ones."""
    if isinstance(first, _BATCH_NORM_BASE):
        bn, layer = first, second
        w, b = fold_bn_linear(_to_numpy(layer.weight), _to_numpy(layer.bias), **_bn_arrays(bn))
    else:
        layer, bn = first, second
        w, b = fold_conv_bn(_to_numpy(layer.weight), _to_numpy(layer.bias), **_bn_arrays(bn),
                            transposed=_layer(layer)[0] == "conv_transpose", groups=getattr(layer, "groups", 1))
    old = layer.weight
    return layer, *(torch.from_numpy(a).to(device=old.device, dtype=old.dtype) for a in (w, b))


def _set_weights(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Give `layer` the folded weights, with its old weight's requires_grad."""
    grad = layer.weight.requires_grad
    layer.weight = nn.Parameter(weight, requires_grad=grad)
    layer.bias = nn.Parameter(bias, requires_grad=grad)  # a layer without bias now has one: BN's shift lives there


def _fold_pair(first: nn.Module, second: nn.Module) -> str | None:
    """Fold the pair, or say why not (the folded weights would not be finite)."""
    layer, weight, bias = _folded(first, second)
    if not (_finite(weight) and _finite(bias)):
        return f"the folded weights of {type(layer).__name__} overflow {str(weight.dtype).replace('torch.', '')}"
    _set_weights(layer, weight, bias)
    return None


def _pair_kind(first: nn.Module, second: nn.Module) -> str:
    """The Folded.kind of a folded pair ("conv" covers ConvTranspose)."""
    if isinstance(first, _BATCH_NORM_BASE):
        return "bn+linear" if _layer(second)[0] == "linear" else "bn+conv"
    return "linear+bn" if _layer(first)[0] == "linear" else "conv+bn"


def _fold_or_problem(first: nn.Module, second: nn.Module, seen: _Seen | None) -> str | None:
    """Why the pair (layer -> BN, or BN -> layer) cannot be folded; None: it was folded."""
    bn_first = isinstance(first, _BATCH_NORM_BASE)
    bn, layer = (first, second) if bn_first else (second, first)
    problem = _bn_problem(bn) or _layer_problem(layer) or \
        (_bn_then_layer_problem(bn, layer, seen) if bn_first else _layer_then_bn_problem(layer, bn, seen))
    return problem or _fold_pair(first, second)


# ---------------------------------------------------------------------------------------
# The report


class _Report:
    """The report under construction: the changes, and why each batch norm was not folded."""

    def __init__(self, report: list[Folded | NotFolded]) -> None:
        self.entries = report
        self.why: dict[str, list[str]] = {}  # batch norm name -> reasons, in the order found

    def done(self, kind: str, *names: str) -> None:
        self.entries.append(Folded(kind, names))
        logger.info("pybn.torch.fold: %s: %s", kind, " -> ".join(names))

    def note(self, bn_name: str, reason: str) -> None:
        reasons = self.why.setdefault(bn_name, [])
        if reason not in reasons:
            reasons.append(reason)

    def left(self, kind: str, name: str, reason: str) -> None:
        self.entries.append(NotFolded(kind, (name,), reason))
        logger.info("pybn.torch.fold: not folded: %s %s: %s", kind, name, reason)

    def batch_norm_left(self, name: str, bn: nn.Module, default: str) -> None:
        reason = _bn_problem(bn) or "; ".join(self.why.get(name, ())) or default
        self.left("batch norm", name, reason)


# ---------------------------------------------------------------------------------------
# The torch.fx path


def _fold_graph(gm: fx.GraphModule, seen: _Seen | None, entries: list[Folded | NotFolded]) -> None:
    """Fold in place in `gm`'s graph and submodules (which belong to our copy)."""
    report = _Report(entries)
    # Dropout first: "Linear -> Dropout -> BN" becomes the foldable "Linear -> BN".
    _remove_graph_dropout(gm, report)
    # Layer -> BN before BN -> layer: a BN between two layers goes into the one before.
    _fold_graph_pairs(gm, seen, report, bn_first=False)
    _fold_graph_pairs(gm, seen, report, bn_first=True)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    _report_graph_leftovers(gm, report)


def _fold_graph_pairs(gm: fx.GraphModule, seen: _Seen | None, report: _Report, *, bn_first: bool) -> None:
    """Fold every "layer -> BN" pair (bn_first: "BN -> layer") of single-use modules."""
    modules = dict(gm.named_modules())
    uses = _module_uses(gm)

    def module_of(node: Any) -> nn.Module | None:
        return modules[str(node.target)] if isinstance(node, fx.Node) and node.op == "call_module" else None

    def is_layer_call(node: Any) -> bool:
        m = module_of(node)
        return m is not None and _layer(m) is not None

    def call_problem(node: fx.Node) -> str | None:
        """Why folding would change another use of the module `node` calls."""
        name, count = str(node.target), uses(str(node.target))
        if count != 1:
            return f"{name} is used {count} times in forward (a fold would change every use)"
        if len(node.args) != 1 or node.kwargs:
            return f"{name} is not called with its input alone"
        return None

    for bn_node in list(gm.graph.nodes):
        bn = module_of(bn_node)
        if not isinstance(bn, _BATCH_NORM_BASE):
            continue
        if len(bn_node.args) != 1 or bn_node.kwargs:
            report.note(str(bn_node.target), "it is not called with its input alone")
            continue
        if bn_first:
            users = list(bn_node.users)
            layer_nodes = [u for u in users if is_layer_call(u)]
            if not layer_nodes:
                continue
            layer_node = layer_nodes[0]
            problem = f"its output is used {len(users)} times" if len(users) != 1 else None
            if layer_node.args and layer_node.args[0] is not bn_node:
                problem = problem or f"{layer_node.target} reads its output as another argument"
            first_node, second_node = bn_node, layer_node
        else:
            layer_node = bn_node.args[0]
            if not is_layer_call(layer_node):
                continue
            users = len(layer_node.users)
            problem = f"the output of {layer_node.target} is used {users} times" if users != 1 else None
            first_node, second_node = layer_node, bn_node
        problem = problem or call_problem(first_node) or call_problem(second_node) or \
            _fold_or_problem(module_of(first_node), module_of(second_node), seen)
        if problem:
            report.note(str(bn_node.target), f"with {layer_node.target}: {problem}")
            continue
        if bn_first:  # the layer now reads the BN's input
            layer_node.replace_input_with(bn_node, bn_node.args[0])
        else:  # the layer's output replaces the BN's
            bn_node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(bn_node)
        report.done(_pair_kind(module_of(first_node), module_of(second_node)), str(first_node.target),
                    str(second_node.target))


def _module_uses(gm: fx.GraphModule) -> Callable[[str], int]:
    """name -> how many graph nodes use that submodule.

    A module called twice, or one whose parameters the graph also reads directly
    (get_attr of ``conv.weight``), or one inside a called parent module, must keep its
    weights: folding one use would change the others.
    """
    targets = [str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")]

    def uses(name: str) -> int:
        return sum(t == name or t.startswith(name + ".") or name.startswith(t + ".") for t in targets)
    return uses


def _remove_graph_dropout(gm: fx.GraphModule, report: _Report) -> None:
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules[node.target], _DROPOUTS):
            problem = _dropout_problem(modules[node.target])
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
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        report.done(kind, name)


def _functional_dropout(node: fx.Node) -> bool:
    try:
        return node.target in _FUNCTIONAL_DROPOUTS
    except TypeError:  # an unhashable target is no dropout function
        return False


def _functional_dropout_problem(node: fx.Node) -> str | None:
    """Why a dropout function call is not the identity: its training argument is not a literal False."""
    name, position, default = _FUNCTIONAL_DROPOUTS[node.target]
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


def _report_graph_leftovers(gm: fx.GraphModule, report: _Report) -> None:
    """One NotFolded for every batch norm module still in `gm`."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for name, m in gm.named_modules():
        if not isinstance(m, _BATCH_NORM_BASE):
            continue
        if name in called:
            report.batch_norm_left(name, m, "no Linear or convolution next to it")
            continue
        holder = max((t for t in called if name.startswith(t + ".")), key=len, default=None)
        if holder is not None:
            why = "it has hooks" if _has_hooks(gm.get_submodule(holder)) else \
                "global module hooks are registered" if _global_hooks() else "torch.fx treats it as one operation"
            report.left("batch norm", name, f"inside {holder}, which is called as a whole ({why})")
        else:
            report.left("batch norm", name, "not called as a module in forward (its tensors are read directly)")


# ---------------------------------------------------------------------------------------
# The fallback for modules torch.fx cannot trace


def _fold_untraced(model: nn.Module, seen: _Seen | None, entries: list[Folded | NotFolded], why: str) -> None:
    """Replace dropout modules by nn.Identity; with `seen`, fold adjacent pairs in nn.Sequentials.

    Folded batch norms become nn.Identity too, so the Sequentials keep their indices.
    """
    report = _Report(entries)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, _DROPOUTS):
                continue
            name = _join(parent_name, child_name)
            problem = _dropout_problem(child)
            if problem:
                report.left("dropout", name, problem)
            else:  # the identity in eval mode, however it is called
                setattr(parent, child_name, nn.Identity())
                report.done("dropout", name)
    if seen is None:
        default = f"{why}: pass example_inputs to fold pairs inside nn.Sequential containers"
    else:
        default = f"{why}: only pairs inside an nn.Sequential are folded then"
        registrations: dict[int, int] = {}
        for _, m in model.named_modules(remove_duplicate=False):
            registrations[id(m)] = registrations.get(id(m), 0) + 1
        for seq_name, seq in list(model.named_modules()):
            if isinstance(seq, nn.Sequential) and type(seq).forward is nn.Sequential.forward:
                _fold_sequential(seq_name, seq, registrations, seen, report)
    for name, m in model.named_modules():
        if isinstance(m, _BATCH_NORM_BASE):
            report.batch_norm_left(name, m, default)


def _fold_sequential(seq_name: str, seq: nn.Sequential, registrations: dict[int, int], seen: _Seen,
                     report: _Report) -> None:
    def call_problem(name: str, m: nn.Module) -> str | None:
        if registrations.get(id(m)) != 1:
            return f"{name} is registered more than once"
        callers = seen.callers.get(id(m))
        if not callers:
            return f"the example call did not reach {name}"
        if callers != {id(seq)}:
            return f"{name} is also called outside {seq_name or 'the model'}"
        return None

    def children() -> list[tuple[str, nn.Module]]:
        return [(name, m) for name, m in seq.named_children() if type(m) is not nn.Identity]

    # Layer -> BN first (as on the fx path); a BN folded there is no longer a candidate.
    for bn_first in (False, True):
        for (name_a, a), (name_b, b) in zip(children(), children()[1:]):
            bn_name, bn, layer = (name_a, a, b) if bn_first else (name_b, b, a)
            if not isinstance(bn, _BATCH_NORM_BASE) or _layer(layer) is None:
                continue
            full_a, full_b = _join(seq_name, name_a), _join(seq_name, name_b)
            problem = call_problem(full_a, a) or call_problem(full_b, b) or _fold_or_problem(a, b, seen)
            if problem:
                report.note(_join(seq_name, bn_name), f"with {full_b if bn_first else full_a}: {problem}")
                continue
            setattr(seq, bn_name, nn.Identity())
            report.done(_pair_kind(a, b), full_a, full_b)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
