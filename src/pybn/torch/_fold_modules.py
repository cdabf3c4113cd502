"""Which modules :func:`pybn.torch.fold` may fold or remove: each check returns why not (None: it may).

A module qualifies when it is one of the torch classes a fold knows (or a subclass keeping their
``forward``, or the :mod:`pybn.torch.nn` drop-in that computes like one), has no hooks or
parametrizations, is initialized and holds real values. Two
exceptions are made on evidence: ``nn.SyncBatchNorm``, whose eval-mode ``forward`` is exactly
``F.batch_norm``; and a Linear/Conv/ConvTranspose subclass with its own ``forward`` (timm's
``Conv2dSame`` pads its input first), when the example call showed that forward use the weight
and bias only as those of one call of the layer's function, whose result it returned.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .._checks import float32_rounded_to_odd
from ..fold import batch_norm_fold_problem
from . import nn as pnn

CONVS: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
CONV_TRANSPOSES: dict[type[nn.Module], int] = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
BATCH_NORMS: dict[type[nn.Module], int] = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
BATCH_NORM_BASE = nn.modules.batchnorm._BatchNorm  # every batch norm class, for the report
# the identity in eval mode: torch's dropout classes, and pybn's that are no drop-in for one
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
            pnn.StochasticDepth, pnn.DropBlock2d, pnn.GaussianNoise, pnn.GaussianDropout)
LAYER_CLASSES: tuple[type[nn.Module], ...] = (nn.Linear, *CONVS, *CONV_TRANSPOSES)
HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")

# functional dropout -> (name of its `training` argument, its position, its default)
FUNCTIONAL_DROPOUTS: dict[Callable[..., Any], tuple[str, int, bool | None]] = {
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

# kind of layer -> the torch functions a layer class of that kind calls in forward
LAYER_FUNCTIONS: dict[str, tuple[Callable[..., Any], ...]] = {
    "linear": (nn.functional.linear,),
    "conv": (torch.conv1d, torch.conv2d, torch.conv3d),
    "conv_transpose": (torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d),
}


def has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in HOOKS)


def global_hooks() -> bool:
    """Module hooks registered for every module (torch.nn.modules.module.register_module_*)."""
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, f"_global{name}", None) for name in HOOKS)


def tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)


def finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite. A float64 sum is finite exactly when every element is
    (a NaN or an infinity makes it NaN or infinite, and finite float32 values cannot overflow
    it); one pass without a mask, the element check only for a float64 sum that overflowed."""
    t = tensor.detach()
    if bool(torch.isfinite(t.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(t).all())


def copy_sharing_parameters(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters are the same tensors (not copies): for a scratch
    run of forward, which may change buffers and attributes but not the weights."""
    memo = {id(p): p for p in module.parameters()}
    return copy.deepcopy(module, memo)


def drop_in_target(module: nn.Module) -> type[nn.Module] | None:
    """The torch class whose function a :mod:`pybn.torch.nn` drop-in computes (its ``drop_in_for``);
    None for any other module, and for a subclass of a drop-in that has its own forward."""
    for klass in type(module).__mro__:
        if "drop_in_for" in vars(klass):
            target: type[nn.Module] = getattr(klass, "drop_in_for")  # noqa: B009 - a class attribute, for mypy
            return target if type(module).forward is getattr(klass, "forward", None) else None
    return None


def stands_for(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether `module` is a `cls` (or subclass), or the drop-in for one."""
    return isinstance(module, cls) or drop_in_target(module) is cls


def computes_like(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether `module` computes `cls`'s forward: its own class's, or as the drop-in for `cls`."""
    return type(module).forward is cls.forward or drop_in_target(module) is cls


def plain_problem(module: nn.Module, classes: Sequence[type[nn.Module]], own_forward: str | None = "") -> str | None:
    """Why `module` is not one of `classes` (or a subclass keeping its forward, or the drop-in for
    one), unhooked.

    A subclass with its own forward (e.g. weight standardization) computes something else,
    unless `own_forward` is None (the caller has evidence that it does not); hooks and
    parametrizations would be lost or broken by changing the weights.
    """
    name = type(module).__name__
    matching = [c for c in classes if stands_for(module, c)]
    if not matching:
        return f"{name} is not {' or '.join(c.__name__ for c in classes)}"
    if own_forward is not None and not any(computes_like(module, c) for c in matching):
        return f"{name} has its own forward{own_forward}"
    if any(nn.parameter.is_lazy(t) for t in tensors(module)):
        return f"{name} is not initialized (a lazy module never called)"
    if has_hooks(module):
        return f"{name} has hooks, which would no longer run"
    if global_hooks():
        return "global module hooks are registered (torch.nn.modules.module.register_module_*), which would " \
               "no longer run for it"
    if parametrize.is_parametrized(module):
        return f"{name} has parametrizations"
    if any(t.is_meta for t in tensors(module)):
        return f"{name} is on the meta device (no values to fold)"
    return None


# ---------------------------------------------------------------------------------------
# Layers


def layer(module: nn.Module) -> tuple[str, int] | None:
    """("linear", 0), ("conv", k) or ("conv_transpose", k) for a layer class; else None."""
    tables = (("linear", {nn.Linear: 0}), ("conv", CONVS), ("conv_transpose", CONV_TRANSPOSES))
    for kind, table in tables:
        for cls, k in table.items():
            if isinstance(module, cls):
                return kind, k
    return None


def layer_problem(module: Any, seen: Any) -> str | None:
    """Why `module` cannot take folded weights. `seen`: what the example call showed (or None)."""
    own: str | None = ": pass example_inputs to have the example call show whether it computes like its base class"
    if seen is not None and layer(module) is not None and not keeps_forward(module):
        why = seen.layer_calls.get(id(module), "the example call did not reach it")
        own = None if why is None else f", and {why}"
    problem = plain_problem(module, LAYER_CLASSES, own) or read_outside_problem(module, seen)
    if problem:
        return problem
    if not finite(module.weight) or (module.bias is not None and not finite(module.bias)):
        return f"the weights of {type(module).__name__} are not finite"
    return None


def keeps_forward(module: nn.Module) -> bool:
    return any(type(module).forward is c.forward for c in LAYER_CLASSES if isinstance(module, c))


def channels_out(module: Any) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


# ---------------------------------------------------------------------------------------
# Batch norm modules


def batch_norm_dims(module: nn.Module) -> int | None:
    """k of a BatchNorm{k}d (or subclass); else None (SyncBatchNorm: any rank)."""
    for cls, k in BATCH_NORMS.items():
        if isinstance(module, cls):
            return k
    return None


def is_batch_norm_module(module: nn.Module) -> bool:
    """A batch norm class whose forward fold knows: BatchNorm{1,2,3}d (or a subclass keeping
    its forward), SyncBatchNorm, or the drop-in for one of them."""
    return isinstance(module, BATCH_NORM_BASE) and _bn_class_problem(module) is None


_BN_CLASSES = (*BATCH_NORMS, nn.SyncBatchNorm)


def _bn_class_problem(module: nn.Module) -> str | None:
    name = type(module).__name__
    matching = [c for c in _BN_CLASSES if stands_for(module, c)]
    if not matching:
        return f"{name} is not BatchNorm1d or BatchNorm2d or BatchNorm3d or SyncBatchNorm"
    if not any(computes_like(module, c) for c in matching):
        return f"{name} has its own forward"
    return None


def read_outside_problem(module: nn.Module, seen: Any) -> str | None:
    """Why the example call forbids folding `module`: a tensor of its own was read outside its
    calls (by forward, another module or a hook), which would then see the folded values or
    none. `seen`: what the example call showed (None: nothing known, nothing refused)."""
    name = None if seen is None else seen.read_outside.get(id(module))
    if name is None:
        return None
    return f"its {name} is read outside its own call (by forward, another module or a hook)"


def bn_problem(bn: Any, seen: Any = None) -> str | None:
    """Why this batch norm module cannot be folded into any layer (None: it can, with a partner).
    `seen`: what the example call showed (or None).

    SyncBatchNorm qualifies: in eval mode (fold's result is for inference) its forward is
    F.batch_norm with the running statistics, on any input rank >= 2.
    """
    problem = _bn_class_problem(bn) or plain_problem(bn, _BN_CLASSES) or read_outside_problem(bn, seen)
    if problem:
        return problem
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False): it normalizes with the batch's " \
               "statistics in eval mode too"
    arrays = bn_arrays(bn)
    params = {"running_mean": arrays["running_mean"], "running_var": arrays["running_var"],
              "weight": arrays["gamma"], "bias": arrays["beta"]}
    return batch_norm_fold_problem(params, "running_var", float(bn.eps))


_WIDE = (torch.float32, torch.float64)


def to_numpy(tensor: torch.Tensor | None) -> Any:
    """`tensor` as a CPU NumPy array: float32 and float64 as they are, any other dtype (float16,
    bfloat16) widened exactly to float64, where the fold computes, to be rounded once by
    `rounded_like`."""
    if tensor is None:
        return None
    t = tensor.detach().cpu()
    if t.dtype not in _WIDE:
        t = t.double()
    return t.numpy()


def rounded_like(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """`values` (float64, or `like`'s dtype already) as a tensor of `like`'s dtype and device,
    rounded once to nearest even. torch converts float64 to float16 and bfloat16 through
    float32, rounding twice; a float32 rounded to odd first makes its second rounding the
    correct one."""
    if like.dtype in _WIDE:
        t = torch.from_numpy(np.ascontiguousarray(values))
    else:
        t = torch.from_numpy(float32_rounded_to_odd(values))
    return t.to(device=like.device, dtype=like.dtype)


def bn_arrays(bn: Any) -> dict[str, Any]:
    """The keyword arguments of pybn.fold_conv_bn / fold_bn_linear for this batch norm module."""
    return dict(running_mean=to_numpy(bn.running_mean), running_var=to_numpy(bn.running_var),
                gamma=to_numpy(bn.weight), beta=to_numpy(bn.bias), eps=bn.eps)


# ---------------------------------------------------------------------------------------
# The rank rule (see fold's Notes)


def several_ranks(bn: nn.Module) -> str | None:
    """How a batch norm module that accepts inputs of several ranks says so; None: one rank only."""
    if stands_for(bn, nn.SyncBatchNorm):
        return "SyncBatchNorm takes inputs of any rank >= 2"
    for cls in BATCH_NORMS:  # (a subclass's own check may take more ranks than its class's)
        if isinstance(bn, cls) and type(bn)._check_input_dim is not cls._check_input_dim:  # type: ignore[attr-defined]
            return f"{type(bn).__name__} has its own _check_input_dim, which may take inputs of other ranks"
    if isinstance(bn, nn.BatchNorm1d):
        return "BatchNorm1d takes 2-D and 3-D inputs"
    return None  # BatchNorm2d/3d raise on any other rank


def rank_problem(accepts: str | None, ranks: set[int] | None, expected: int) -> str | None:
    """The rank rule: a normalization over dimension 1 that accepts inputs of several ranks
    (`accepts` says which; None: one rank only, checked by the module itself) folds only where
    the example call showed its input with rank `expected`. `ranks`: the ranks seen (None: no
    example call)."""
    if accepts is None:
        return None
    if ranks is None:
        return (f"{accepts} and this fold is exact only for {expected}-D ones, which torch.fx cannot see: "
                "pass example_inputs to fold it")
    if not ranks:
        return "the example call did not reach it"
    if ranks != {expected}:
        got = " and ".join(str(r) for r in sorted(ranks))
        return f"its input had rank {got} in the example call; this fold is exact only for rank {expected}"
    return None


# ---------------------------------------------------------------------------------------
# Dropout


def dropout_problem(module: nn.Module) -> str | None:
    return plain_problem(module, DROPOUTS)


def takes_relu(module: nn.Module) -> bool:
    """Whether the dropout module's forward also takes ``relu`` (pybn.torch's Dropout*: with
    relu=True it is relu(x) in eval mode, not the identity)."""
    return "relu" in inspect.signature(type(module).forward).parameters
