"""The fused tail of a ResNet block as PyTorch operators: ``relu(bn(x) + residual)`` in one pass.

``batch_norm_add_relu(x, residual?, weight?, bias?, running_mean!?, running_var!?, training, momentum, eps,
relu) -> (y, save_mean, save_invstd)``
    ``y = bn(x) + residual`` (no add when residual is None), then ``max(y, 0)`` when ``relu``. ``training=True``: batch
    statistics (the running statistics, when given, updated in place as
    ``pybn::batch_norm_train`` does); ``training=False``: the running statistics normalize,
    and save_mean / save_invstd are the mean and ``1/sqrt(var + eps)`` used.
``batch_norm_add_relu_backward(dy, x, y, mean, invstd, weight?, training) -> (dx, dweight, dbias,
d_residual)``
    The backward of the ReLU case: g = dy masked where ``y <= 0``; d_residual = g, written in
    the same pass as dx. (Without the ReLU, d_residual is dy itself: autograd passes it on
    without an operator call.)

Autograd gives gradients for x, weight, bias and residual; a backward taken with
``create_graph=True`` uses torch's ``native_batch_norm_backward`` on the masked dy, which
torch can differentiate again. Tensors pybn's kernels do not take (other devices and
dtypes) run torch's batch norm, add and relu. The residual reaches the kernels in x's
layout (copied once when its own layout differs). ``pybn.torch.fold`` folds the BN of such a
block in an exported graph, where the add and relu stay (docs/batchnorm.md).
"""
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

import pybn

from ._eager import direct_call
from ._layout import array, batch_norm_last, empty, in_layout, no_real_from_meta, per_channel, pybn_takes
from .ops import (_backward_impl, _can_train_in_place, _channels, _forward_channels, _stats_dtype, _torch_backward,
                  backend)

__all__ = ["batch_norm_add_relu", "batch_norm_add_relu_backward"]

_aten = torch.ops.aten


def _check_residual(x: Tensor, residual: Optional[Tensor]) -> None:
    if residual is None:
        return
    if residual.shape != x.shape:
        raise ValueError(f"residual: shape {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual: dtype {residual.dtype} does not match x ({x.dtype})")
    if residual.device != x.device:
        raise ValueError(f"residual: on {residual.device}, x on {x.device}")


def _add_relu_impl(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                   momentum: float, eps: float, relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """relu(bn(x) + residual) in one pass (see the module docstring)."""
    _forward_channels(x, weight, bias, running_mean, running_var)
    _check_residual(x, residual)
    last = batch_norm_last(x)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean: running_mean and running_var are required when training=False")
    if not (_can_train_in_place(x, running_mean, running_var) and (residual is None or pybn_takes(residual))):
        return _torch_forward(x, residual, weight, bias, running_mean, running_var, training, momentum, eps, relu)
    y = empty(x, last)
    axis = -1 if last else 1
    r = None if residual is None else array(residual, last)
    if training:
        _, mean, invstd = pybn.batch_norm_train(array(x, last), per_channel(weight), per_channel(bias),
                                                running_mean=per_channel(running_mean),
                                                running_var=per_channel(running_var), momentum=momentum, eps=eps,
                                                axis=axis, relu=relu, residual=r,
                                                out=array(y, last))
        return y, torch.from_numpy(mean), torch.from_numpy(invstd)
    assert running_mean is not None and running_var is not None
    pybn.batch_norm_infer(array(x, last), per_channel(running_mean), per_channel(running_var), per_channel(weight),
                          per_channel(bias), eps=eps, axis=axis, relu=relu, residual=r,
                          out=array(y, last))
    return y, *_running_invstd(x, running_mean, running_var, eps)


batch_norm_add_relu = torch.library.custom_op("pybn::batch_norm_add_relu",
                                              mutates_args=("running_mean", "running_var"))(_add_relu_impl)


def _running_invstd(x: Tensor, running_mean: Tensor, running_var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """The mean and invstd an evaluation-mode forward normalized with, for its backward."""
    stats = _stats_dtype(x)
    return running_mean.detach().to(stats, copy=True), torch.rsqrt(running_var.double() + eps).to(stats)


def _torch_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, momentum: float,
                   eps: float, relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """torch's batch norm, add and relu, for what pybn's kernels do not take."""
    last = batch_norm_last(x)
    y, mean, invstd = _aten.native_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps)
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    if not training:
        assert running_mean is not None and running_var is not None
        mean, invstd = _running_invstd(x, running_mean, running_var, eps)
    return in_layout(y, last), mean.to(_stats_dtype(x)), invstd.to(_stats_dtype(x))


@batch_norm_add_relu.register_fake
@no_real_from_meta
def _(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
      running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, momentum: float, eps: float,
      relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    c = _forward_channels(x, weight, bias, running_mean, running_var)
    _check_residual(x, residual)
    dtype = _stats_dtype(x)
    return empty(x, batch_norm_last(x)), x.new_empty((c,), dtype=dtype), x.new_empty((c,), dtype=dtype)


def _add_relu_backward_impl(dy: Tensor, x: Tensor, y: Tensor, mean: Tensor, invstd: Tensor,
                            weight: Optional[Tensor], training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """dx, dweight, dbias and d_residual = dy masked where y <= 0 (see the module docstring)."""
    _channels(x)
    last = batch_norm_last(x)
    if not (pybn_takes(x) and dy.dtype == x.dtype == y.dtype and dy.device == x.device == y.device):
        g = dy.masked_fill(y <= 0, 0)  # (a NaN y passes dy, as torch.relu's gradient)
        dx, dw, db = _torch_backward(g, x, mean, invstd, weight, training)
        return in_layout(dx, last), dw, db, in_layout(g, last)
    dx, dr = empty(x, last), empty(x, last)
    grads = pybn.batch_norm_backward(array(dy, last), array(x, last), per_channel(mean), per_channel(invstd),
                                     per_channel(weight), training=training, axis=-1 if last else 1,
                                     y=array(y, last), out=array(dx, last), residual=True,
                                     d_residual_out=array(dr, last))
    return dx, torch.from_numpy(grads.dweight), torch.from_numpy(grads.dbias), dr


batch_norm_add_relu_backward = torch.library.custom_op("pybn::batch_norm_add_relu_backward",
                                                       mutates_args=())(_add_relu_backward_impl)


@batch_norm_add_relu_backward.register_fake
@no_real_from_meta
def _(dy: Tensor, x: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
      training: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    c = _channels(x)
    stats = _stats_dtype(x)
    last = batch_norm_last(x)
    return empty(x, last), x.new_empty((c,), dtype=stats), x.new_empty((c,), dtype=stats), empty(x, last)


class _BatchNormAddRelu(torch.autograd.Function):
    """The Autograd kernel of pybn::batch_norm_add_relu (a mutating operator, as
    pybn::batch_norm_train's)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, momentum: float,
                eps: float, relu: bool, direct: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        # direct: called by batch_norm_add_relu_call in plain eager mode (pybn.torch._eager)
        if direct:
            # (the running statistics' version counters stay, as torch's own batch norm leaves them)
            y, mean, invstd = _add_relu_impl(x, residual, weight, bias, running_mean, running_var, training,
                                             momentum, eps, relu)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                y, mean, invstd = torch.ops.pybn.batch_norm_add_relu(x, residual, weight, bias, running_mean,
                                                                     running_var, training, momentum, eps, relu)
        ctx.save_for_backward(x, weight, mean, invstd, y if relu else None)
        ctx.training, ctx.relu, ctx.direct = training, relu, direct
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _dmean: Tensor, _dinvstd: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, weight, mean, invstd, y = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: torch's operations, which torch can differentiate
            dr = dy.masked_fill(y <= 0, 0) if ctx.relu else dy
            dx, dw, db = _torch_backward(dr, x, mean, invstd, weight, ctx.training)
        elif ctx.relu:
            masked_backward = backend(ctx, dy, _add_relu_backward_impl, torch.ops.pybn.batch_norm_add_relu_backward)
            dx, dw, db, dr = masked_backward(dy, x, y, mean, invstd, weight, ctx.training)
        else:  # d_residual is dy itself
            bn_backward = backend(ctx, dy, _backward_impl, torch.ops.pybn.batch_norm_backward)
            dx, dw, db = bn_backward(dy, x, mean, invstd, weight, ctx.training)
            dr = dy
        needs = ctx.needs_input_grad
        return (dx if needs[0] else None, dr if needs[1] else None, dw if needs[2] else None,
                db if needs[3] else None, None, None, None, None, None, None, None)


def _batch_norm_add_relu_autograd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                                  bias: Optional[Tensor], running_mean: Optional[Tensor],
                                  running_var: Optional[Tensor], training: bool,
                                  momentum: float, eps: float, relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    outputs: Tuple[Tensor, Tensor, Tensor] = _BatchNormAddRelu.apply(  # type: ignore[no-untyped-call]
        x, residual, weight, bias, running_mean, running_var, training, momentum, eps, relu)
    return outputs


_LIB = torch.library.Library("pybn", "FRAGMENT")
_LIB.impl("batch_norm_add_relu", _batch_norm_add_relu_autograd, "Autograd")


def batch_norm_add_relu_call(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                             bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                             training: bool, momentum: float, eps: float,
                             relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.pybn.batch_norm_add_relu(...)``, without the dispatcher in plain eager mode."""
    if (direct_call(x, residual, weight, bias, running_mean, running_var)
            and _can_train_in_place(x, running_mean, running_var) and (residual is None or pybn_takes(residual))):
        outputs: Tuple[Tensor, Tensor, Tensor] = _BatchNormAddRelu.apply(  # type: ignore[no-untyped-call]
            x, residual, weight, bias, running_mean, running_var, training, momentum, eps, relu, True)
        return outputs
    return torch.ops.pybn.batch_norm_add_relu(x, residual, weight, bias,  # type: ignore[no-any-return]
                                              running_mean, running_var, training, momentum, eps, relu)
