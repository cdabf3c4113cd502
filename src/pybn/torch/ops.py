"""pybn's kernels as PyTorch operators: ``torch.ops.pybn.*``, with autograd and fake tensors.

Operators (all take and return tensors of any device and floating dtype):

``batch_norm_train(x, weight?, bias?, running_mean!?, running_var!?, momentum, eps) -> (y, save_mean, save_invstd)``
    Training forward over every dimension but 1; the running statistics are updated in
    place (declared as mutated in the schema), PyTorch's formula.
``batch_norm_infer(x, running_mean, running_var, weight?, bias?, eps) -> y``
    Inference forward with the given statistics.
``batch_norm_backward(dy, x, mean, invstd, weight?, training) -> (dx, dweight, dbias)``
    The backward of both (``training=False``: mean and invstd are the running ones);
    dweight and dbias in the dtype of save_mean.
``dropout(x, p, philox?, noise_shape?) -> (y, philox_used)``
    Inverted dropout; ``philox`` is an int64 tensor ``[seed, offset]`` (the uint64 values'
    two's complement); None draws a seed from torch's default CPU generator (one
    ``torch.randint(2**63 - 1, ())``), offset 0; ``philox_used`` says which was used. The
    mask is ``pybn.dropout_mask(shape, p, seed=, offset=)`` over the elements in memory
    order: ``shape`` is x's for a contiguous x, ``x.movedim(1, -1)``'s for a channels-last
    one (other layouts are made contiguous); a ``noise_shape`` mask (Keras semantics) is
    drawn over that shape in C order, so ``(N, C, 1, 1)`` gives the same (N, C) mask in
    both layouts.
``relu_dropout(x, p, philox?) -> (y, philox_used)``
    ``dropout(relu(x))`` in one pass: dropout's mask (element-wise), the ReLU fused.
``relu_dropout_backward(dy, y, p) -> dx``
    Its gradient from the output: ``dy * scale`` where ``y > 0`` (or NaN), no mask drawn again.

Why ``torch.library.custom_op`` (Python) and not ``TORCH_LIBRARY`` (C++): the kernels are
reached through pybn's own Python functions on zero-copy NumPy views of CPU tensors
(``tensor.numpy()``), so the compiled extension links no libtorch and one wheel serves
every torch version (a C++ registration would tie the wheel to one torch ABI). The cost
is the Python dispatch: on the Zen 4 machine of docs/pytorch.md a call of
``torch.ops.pybn.batch_norm_train`` on a tiny tensor takes about 72 us (27 us of it in the
implementation below, 4 us in pybn's NumPy function), against 19 us for the forward of
torch's own ``nn.BatchNorm1d``: nothing beside the passes over tensors of some MB, a few
percent of a step of small layers (docs/pytorch.md, "Where the time goes"). So in plain
eager mode :mod:`pybn.torch.nn`'s modules skip the dispatcher (``*_call`` below,
:mod:`pybn.torch._eager`) and call the same implementations through an autograd Function;
compiling, tracing, dispatch and function modes and tensor subclasses still see the
operators. Fake implementations give shapes, dtypes and
strides without running anything, so ``torch.compile(fullgraph=True)`` and
``torch.export`` keep the operators in the graph; at run time the compiled graph calls the
same kernels (and the same seed draw) as eager mode.

Layouts: contiguous and channels-last tensors reach the kernels without a copy
(:mod:`pybn.torch._layout`); results have torch's layout (dropout's keep x's; batch
norm's are channels-last where torch's are, ``batch_norm_last``). float16 and bfloat16 CPU tensors go
to the kernels without a copy too (bfloat16 when ml_dtypes is installed), with float32
statistics and gradients of the parameters (docs/dtypes.md). Tensors pybn cannot take
directly (other devices and dtypes) go to torch's own batch-norm kernels; dropout computes
them on a float32/float64 CPU copy, so that the mask is the same on every device and dtype.

Autograd: ``batch_norm_infer``, ``dropout``, ``relu_dropout`` and ``relu_dropout_backward``
with ``torch.library.register_autograd``;
``batch_norm_train`` mutates its running statistics, which ``register_autograd`` does not
allow, so its Autograd kernel is a ``torch.autograd.Function`` registered directly (what
``register_autograd`` does for functional operators). Double backward: dropout's
backward is dropout with the same mask, so it is differentiable again (relu_dropout's
backward is linear in dy, its own gradient the same operator); for batch norm,
a backward taken with ``create_graph=True`` uses torch's ``native_batch_norm_backward``,
whose own derivative torch provides.
"""
import inspect
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import pybn

from ._eager import direct_call
from ._transforms import operator, register_autograd
from .seeded import as_int64
from ._layout import (PYBN_DTYPES, array, batch_norm_last, channels_last_physical, empty, in_layout, no_real_from_meta,
                      per_channel, pybn_takes)

__all__ = ["batch_norm_train", "batch_norm_infer", "batch_norm_backward", "dropout", "relu_dropout",
           "relu_dropout_backward", "draw_philox"]

_aten = torch.ops.aten


def backend(ctx: Any, dy: Tensor, impl: Callable[..., Any], op: Any) -> Callable[..., Any]:
    """What an autograd backward calls: the implementation itself after a direct forward
    (ctx.direct, pybn.torch._eager) when dy may skip the dispatcher too, else the operator."""
    return impl if ctx.direct and direct_call(dy) else op


def _stats_dtype(x: Tensor) -> torch.dtype:
    """The dtype of save_mean / save_invstd: x's for float32/64, float32 for 16-bit types
    (as torch's own kernels)."""
    return x.dtype if x.dtype in PYBN_DTYPES else torch.float32


def _channels(x: Tensor) -> int:
    if x.dim() < 2:
        raise ValueError(f"x: needs at least 2 dimensions (batch and channels), got shape {tuple(x.shape)}")
    return x.shape[1]


def _forward_channels(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                      running_var: Optional[Tensor]) -> int:
    """x's channels, after a shape check and torch's dtype rule for the tensors pybn's kernels take: weight,
    bias and the running statistics all of x's dtype, or all float32 beside a 16-bit x
    (torch's mixed precision); pybn's kernels could widen any float mix, but a model that
    runs only with pybn must also run without it (other devices and dtypes: torch's own
    kernel decides)."""
    c = _channels(x)
    tensors = (weight, bias, running_mean, running_var)
    if all(t is None or (t.dtype == x.dtype and t.shape == (c,)) for t in tensors):  # (the common call)
        return c
    if pybn_takes(x):
        given = [(n, t) for n, t in zip(("weight", "bias", "running_mean", "running_var"), tensors) if t is not None]
        for name, t in given:  # (in the fake implementations too: compile's error names the tensor)
            if t.dim() != 1 or t.shape[0] != c:
                raise ValueError(f"{name}: expected shape ({c},), one value per channel of x (shape "
                                 f"{tuple(x.shape)}), got {tuple(t.shape)}")
        allowed = (x.dtype,) if x.dtype in PYBN_DTYPES else (x.dtype, torch.float32)
        for dtype in allowed:
            if all(t.dtype == dtype for _, t in given):
                return c
        first, first_t = given[0]
        name, t = next((n, t) for n, t in given if t.dtype != first_t.dtype or t.dtype not in allowed)
        beside = f"x of {x.dtype}" if name == first else f"{first} of {first_t.dtype} (x {x.dtype})"
        mixed = "" if x.dtype in PYBN_DTYPES else " or all float32 (torch's mixed precision)"
        raise TypeError(f"{name}: dtype {t.dtype} beside {beside}: weight, bias and the running statistics "
                        f"must all be of x's dtype{mixed}, as torch's batch norm requires")
    return c


def _widened_for(mean: Tensor, weight: Optional[Tensor]) -> Optional[Tensor]:
    """weight as torch's backward takes it beside save_mean / save_invstd: float32 when they
    are (a 16-bit x whose parameters are 16-bit too: pybn's statistics stay float32, torch's
    mixed precision); the cast is differentiable, so gradients of any order reach weight."""
    return weight.to(mean.dtype) if weight is not None and weight.dtype != mean.dtype else weight


# --------------------------------------------------------------------------- batch norm: forward

def _train_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], momentum: float, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm over every dimension but 1 (see the module docstring)."""
    _forward_channels(x, weight, bias, running_mean, running_var)
    last = batch_norm_last(x)
    if not _can_train_in_place(x, running_mean, running_var):
        y, mean, invstd = _aten.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        return in_layout(y, last), mean.to(_stats_dtype(x)), invstd.to(_stats_dtype(x))
    y = empty(x, last)
    _, mean, invstd = pybn.batch_norm_train(array(x, last), per_channel(weight), per_channel(bias),
                                            running_mean=per_channel(running_mean),
                                            running_var=per_channel(running_var), momentum=momentum, eps=eps,
                                            axis=-1 if last else 1, out=array(y, last))
    return y, torch.from_numpy(mean), torch.from_numpy(invstd)


batch_norm_train = torch.library.custom_op("pybn::batch_norm_train",
                                           mutates_args=("running_mean", "running_var"))(_train_impl)


def _can_train_in_place(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> bool:
    """pybn updates the running statistics through NumPy views: CPU tensors of x's dtype
    (or float32 beside 16-bit x)."""
    if not pybn_takes(x):
        return False
    return all(t is None or (t.device.type == "cpu" and t.dtype in (x.dtype, _stats_dtype(x)) and t.is_contiguous())
               for t in (running_mean, running_var))


@batch_norm_train.register_fake
@no_real_from_meta
def _(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
      running_var: Optional[Tensor], momentum: float, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    c = _forward_channels(x, weight, bias, running_mean, running_var)
    dtype = _stats_dtype(x)
    return empty(x, batch_norm_last(x)), x.new_empty((c,), dtype=dtype), x.new_empty((c,), dtype=dtype)


def _infer_impl(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], eps: float) -> Tensor:
    """Inference-mode batch norm with the given statistics (see the module docstring)."""
    _forward_channels(x, weight, bias, running_mean, running_var)
    last = batch_norm_last(x)
    if not pybn_takes(x):
        y = _aten.native_batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps)[0]
        return in_layout(y, last)
    y = empty(x, last)
    pybn.batch_norm_infer(array(x, last), per_channel(running_mean), per_channel(running_var),
                          per_channel(weight), per_channel(bias), eps=eps, axis=-1 if last else 1,
                          out=array(y, last))
    return y


batch_norm_infer = torch.library.custom_op("pybn::batch_norm_infer", mutates_args=())(_infer_impl)


@batch_norm_infer.register_fake
@no_real_from_meta
def _(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
      eps: float) -> Tensor:
    _forward_channels(x, weight, bias, running_mean, running_var)
    return empty(x, batch_norm_last(x))


# --------------------------------------------------------------------------- batch norm: backward

def _backward_impl(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                   training: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """dx, dweight = sum(dy * xhat), dbias = sum(dy) (see the module docstring)."""
    _channels(x)
    last = batch_norm_last(x)
    if not (pybn_takes(x) and dy.dtype == x.dtype and dy.device == x.device):
        dx, dw, db = _torch_backward(dy, x, mean, invstd, weight, training)
        return in_layout(dx, last), dw, db
    dx = empty(x, last)
    grads = pybn.batch_norm_backward(array(dy, last), array(x, last), per_channel(mean), per_channel(invstd),
                                     per_channel(weight), training=training, axis=-1 if last else 1,
                                     out=array(dx, last))
    return dx, torch.from_numpy(grads.dweight), torch.from_numpy(grads.dbias)


batch_norm_backward = torch.library.custom_op("pybn::batch_norm_backward", mutates_args=())(_backward_impl)


def _torch_backward(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                    training: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The backward with torch's operations, for what pybn's kernels do not take."""
    if training:
        dx, dw, db = _aten.native_batch_norm_backward(dy, x, _widened_for(mean, weight), None, None, mean, invstd,
                                                     True, 0.0, [True, True, True])
        return dx, dw.to(_stats_dtype(x)), db.to(_stats_dtype(x))
    shape = [1] * x.dim()
    shape[1] = x.shape[1]
    dims = [d for d in range(x.dim()) if d != 1]
    scale = invstd if weight is None else invstd * weight
    dx = dy * scale.to(dy.dtype).reshape(shape)
    xhat = (x.to(invstd.dtype) - mean.reshape(shape)) * invstd.reshape(shape)
    stats = _stats_dtype(x)
    return dx, (dy.to(stats) * xhat.to(stats)).sum(dims), dy.sum(dims, dtype=stats)


@batch_norm_backward.register_fake
@no_real_from_meta
def _(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
      training: bool) -> Tuple[Tensor, Tensor, Tensor]:
    c = _channels(x)
    stats = _stats_dtype(x)
    return empty(x, batch_norm_last(x)), x.new_empty((c,), dtype=stats), x.new_empty((c,), dtype=stats)


# --------------------------------------------------------------------------- batch norm: autograd

class _BatchNormTrain(torch.autograd.Function):
    """The Autograd kernel of pybn::batch_norm_train (a mutating operator)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                eps: float, direct: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        # direct: called by batch_norm_train_call in plain eager mode (pybn.torch._eager).
        # Otherwise below the Autograd key, so the call reaches the operator's implementation
        # (or, when tracing, its fake one) instead of this kernel again: what register_autograd does
        if direct:
            # (the running statistics' version counters stay, as torch's own batch norm leaves them)
            y, mean, invstd = _train_impl(x, weight, bias, running_mean, running_var, momentum, eps)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                y, mean, invstd = torch.ops.pybn.batch_norm_train(x, weight, bias, running_mean, running_var,
                                                                  momentum, eps)
        ctx.direct = direct
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _dmean: Tensor, _dinvstd: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: torch's formula, which torch can differentiate
            dx, dw, db = _aten.native_batch_norm_backward(dy, x, _widened_for(mean, weight), None, None, mean,
                                                         invstd, True, 0.0,
                                                         [True, weight is not None, weight is not None])
        else:
            dx, dw, db = backend(ctx, dy, _backward_impl, torch.ops.pybn.batch_norm_backward)(dy, x, mean, invstd,
                                                                                              weight, True)
        needs = ctx.needs_input_grad
        return dx, dw if needs[1] else None, db if needs[2] else None, None, None, None, None, None


def _batch_norm_train_autograd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                               running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                               eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    outputs: Tuple[Tensor, Tensor, Tensor] = _BatchNormTrain.apply(  # type: ignore[no-untyped-call]
        x, weight, bias, running_mean, running_var, momentum, eps)
    return outputs


_LIB = torch.library.Library("pybn", "FRAGMENT")
_LIB.impl("batch_norm_train", _batch_norm_train_autograd, "Autograd")


def batch_norm_train_call(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                          eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.pybn.batch_norm_train(...)``, without the dispatcher in plain eager mode."""
    if direct_call(x, weight, bias, running_mean, running_var) and _can_train_in_place(x, running_mean, running_var):
        outputs: Tuple[Tensor, Tensor, Tensor] = _BatchNormTrain.apply(  # type: ignore[no-untyped-call]
            x, weight, bias, running_mean, running_var, momentum, eps, True)
        return outputs
    return torch.ops.pybn.batch_norm_train(x, weight, bias, running_mean, running_var,  # type: ignore[no-any-return]
                                           momentum, eps)


def batch_norm_infer_call(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                          bias: Optional[Tensor], eps: float) -> Tensor:
    """``torch.ops.pybn.batch_norm_infer(...)``, without the dispatcher in plain eager mode
    (through an autograd Function when a gradient is wanted)."""
    tensors = (x, running_mean, running_var, weight, bias)
    # direct_call first: it alone looks at what may be a tracer's proxy rather than a tensor
    if not direct_call(*tensors):
        return torch.ops.pybn.batch_norm_infer(x, running_mean, running_var, weight,  # type: ignore[no-any-return]
                                               bias, eps)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        # eval-mode batch norm inside a model being trained (frozen statistics)
        y: Tensor = _BatchNormInferDirect.apply(x, running_mean, running_var, weight, bias,  # type: ignore[no-untyped-call]
                                                eps)
        return y
    return _infer_impl(x, running_mean, running_var, weight, bias, eps)


def _infer_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
    x, running_mean, running_var, weight, _, eps = inputs
    ctx.save_for_backward(x, running_mean, running_var, weight)
    ctx.eps, ctx.direct = eps, False  # (True after _BatchNormInferDirect's forward)


def _infer_backward(ctx: Any, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
    x, running_mean, running_var, weight = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: torch's formula, which torch can differentiate
        want = [True, weight is not None, weight is not None]
        dx, dw, db = _aten.native_batch_norm_backward(dy, x, weight, running_mean, running_var, None, None, False,
                                                     ctx.eps, want)
    else:
        invstd = torch.rsqrt(running_var.double() + ctx.eps).to(_stats_dtype(x))
        dx, dw, db = backend(ctx, dy, _backward_impl, torch.ops.pybn.batch_norm_backward)(dy, x, running_mean,
                                                                                          invstd, weight, False)
    needs = ctx.needs_input_grad
    return dx, None, None, dw if needs[3] else None, db if needs[4] else None, None


batch_norm_infer.register_autograd(_infer_backward, setup_context=_infer_setup)


class _BatchNormInferDirect(torch.autograd.Function):
    """pybn::batch_norm_infer's plain eager calls that need a gradient (pybn.torch._eager):
    the same implementation and backward as the operator's."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], eps: float) -> Tensor:
        y = _infer_impl(x, running_mean, running_var, weight, bias, eps)
        _infer_setup(ctx, (x, running_mean, running_var, weight, bias, eps), y)
        ctx.direct = True
        return y

    backward = staticmethod(_infer_backward)


# --------------------------------------------------------------------------- dropout

def _dropout_impl(x: Tensor, p: float, philox: Optional[Tensor],
                  noise_shape: Optional[List[int]]) -> Tuple[Tensor, Tensor]:
    """Inverted dropout with pybn's mask of (seed, offset) (see the module docstring)."""
    used = philox_used(philox)
    return _dropout_with(x, p, counters(used), noise_shape, relu=False), used


def _dropout_with(x: Tensor, p: float, counters: Tuple[int, int], noise_shape: Optional[List[int]],
                  relu: bool) -> Tensor:
    """dropout(x) or dropout(relu(x)) with the mask of counters = (seed, offset)."""
    seed, offset = counters
    noise = None if noise_shape is None else tuple(noise_shape)
    src = x if pybn_takes(x) else _float_cpu_copy(x)
    last = channels_last_physical(src) and _order_kept(noise, x.dim())
    if last and noise is not None:
        noise = noise[:1] + noise[2:] + noise[1:2]
    y = empty(src, last)
    pybn.dropout(array(src, last), p, seed=seed, offset=offset, noise_shape=noise, relu=relu, out=array(y, last))
    return in_form_of(x, src, y)


# The operators that draw a seed from torch's default generator when philox is None are tagged
# random: torch.compile then never recomputes them freely, and where it must (activation
# checkpointing) it replays torch's generator state around the recomputation, which so draws
# the forward's seed again (untagged, the backward used another mask: wrong gradients).
RANDOM: Any = {"tags": (torch.Tag.nondeterministic_seeded,)} \
    if "tags" in inspect.signature(torch.library.custom_op).parameters else {}  # (torch >= 2.5)

dropout = torch.library.custom_op("pybn::dropout", mutates_args=(), **RANDOM)(_dropout_impl)


def _float_cpu_copy(x: Tensor) -> Tensor:
    """A float32 (float64 stays float64) CPU copy of x in its layout, for pybn's kernels."""
    if not x.is_floating_point():
        raise TypeError(f"x: dropout needs a floating-point tensor, got {x.dtype}")
    return x.detach().to("cpu", torch.float64 if x.dtype == torch.float64 else torch.float32)


def in_form_of(x: Tensor, src: Tensor, y: Tensor) -> Tensor:
    """y, computed from src (x itself, or its _float_cpu_copy), in x's device, dtype and layout."""
    if src is not x:
        return empty(x, channels_last_physical(x)).copy_(y)
    return in_layout(y, channels_last_physical(x))


def _draw_seed() -> Tensor:
    """A seed from torch's default CPU generator (so that ``torch.manual_seed`` reproduces the
    masks): one ``torch.randint(2**63 - 1, ())``."""
    return torch.randint(2**63 - 1, (), dtype=torch.int64)


def draw_philox() -> Tensor:
    """A fresh ``[seed, 0]`` (int64), the seed from torch's default CPU generator."""
    return torch.stack([_draw_seed(), torch.zeros((), dtype=torch.int64)])


def philox_used(philox: Optional[Tensor]) -> Tensor:
    """The [seed, offset] an operator call uses and returns: a fresh one, or a CPU int64 copy
    of the given one."""
    return draw_philox() if philox is None else philox.detach().to("cpu", torch.int64).clone()


def counters(philox: Tensor) -> Tuple[int, int]:
    """The uint64 (seed, offset) of an int64 ``[seed, offset]`` (their two's complement)."""
    seed, offset = philox.tolist()
    return seed % 2**64, offset % 2**64


def _philox_of(pair: Tuple[int, int]) -> Tensor:
    """The int64 ``[seed, offset]`` of uint64 counters (counters' inverse)."""
    return torch.tensor([as_int64(v) for v in pair], dtype=torch.int64)


def _direct_counters(philox: Optional[Tensor]) -> Tuple[int, int]:
    """(seed, offset) of a direct call: the given ones, or the same seed draw as draw_philox
    without the tensor around it."""
    if philox is None:
        return int(_draw_seed()), 0
    return counters(philox.detach().to(torch.int64))


def _order_kept(noise: Optional[Sequence[int]], ndim: int) -> bool:
    """Whether the mask may be drawn in the channels-last physical order: always for a mask
    over x itself (drawn in memory order), and for a channel-wise mask when moving dim 1
    last keeps the C order of its drawn entries (then it is the same mask either way)."""
    if noise is None:
        return True
    drawn = [d for d in range(ndim) if noise[d] != 1]
    moved = [d for d in [0, *range(2, ndim), 1] if noise[d] != 1]
    return drawn == moved


@dropout.register_fake
@no_real_from_meta
def _(x: Tensor, p: float, philox: Optional[Tensor], noise_shape: Optional[List[int]]) -> Tuple[Tensor, Tensor]:
    return empty(x, channels_last_physical(x)), torch.empty(2, dtype=torch.int64)


def _keep_dropout_args(ctx: Any, x: Tensor, p: float, noise_shape: Optional[List[int]], direct: bool) -> None:
    """What dropout's backward needs besides the mask's counters (direct: after _DropoutDirect's
    forward, which keeps them as ctx.counters; else the operator's, which saves the tensor)."""
    ctx.p, ctx.noise_shape, ctx.last, ctx.direct = p, noise_shape, channels_last_physical(x), direct


def _dropout_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
    x, p, _, noise_shape = inputs
    _keep_dropout_args(ctx, x, p, noise_shape, direct=False)
    ctx.save_for_backward(output[1])


def _dropout_backward(ctx: Any, dy: Tensor, _dused: Optional[Tensor] = None) -> Tuple[Optional[Tensor], ...]:
    # the same mask and scale: dy in the layout x had, since the mask follows memory order
    dy = in_layout(dy, ctx.last)
    if ctx.direct and not torch.is_grad_enabled() and direct_call(dy):
        dx = _dropout_with(dy, ctx.p, ctx.counters, ctx.noise_shape, relu=False)
    else:  # the operator: differentiable when create_graph=True (dropout's derivative is dropout with the same mask)
        used = _philox_of(ctx.counters) if ctx.direct else ctx.saved_tensors[0]
        dx = operator(dropout)(dy, ctx.p, used, ctx.noise_shape)[0]
    return dx, None, None, None


register_autograd(dropout, _dropout_backward, _dropout_setup, philox_at=2)


class _DropoutDirect(torch.autograd.Function):
    """pybn::dropout's plain eager calls (pybn.torch._eager): the same implementation, mask
    and backward, with (seed, offset) kept as ints: no [seed, offset] tensor is made."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float, philox: Optional[Tensor],
                noise_shape: Optional[List[int]]) -> Tensor:
        _keep_dropout_args(ctx, x, p, noise_shape, direct=True)
        ctx.counters = _direct_counters(philox)
        return _dropout_with(x, p, ctx.counters, noise_shape, relu=False)

    backward = staticmethod(_dropout_backward)


def dropout_call(x: Tensor, p: float, philox: Optional[Tensor], noise_shape: Optional[List[int]]) -> Tensor:
    """``torch.ops.pybn.dropout(...)[0]``, without the dispatcher in plain eager mode."""
    if noise_shape is not None and torch._C._get_tracing_state() is not None:
        # torch.jit.trace: sizes read from x are traced values, the schema takes ints (torch
        # warns that the traced graph keeps these sizes)
        noise_shape = [int(d) for d in noise_shape]
    if direct_call(x, philox) and pybn_takes(x):
        y: Tensor = _DropoutDirect.apply(x, p, philox, noise_shape)  # type: ignore[no-untyped-call]
        return y
    return operator(dropout)(x, p, philox, noise_shape)[0]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- dropout(relu(x))

def _relu_dropout_impl(x: Tensor, p: float, philox: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """dropout(relu(x)) in one pass, pybn's element-wise mask of (seed, offset)."""
    used = philox_used(philox)
    return _dropout_with(x, p, counters(used), None, relu=True), used


relu_dropout = torch.library.custom_op("pybn::relu_dropout", mutates_args=(), **RANDOM)(_relu_dropout_impl)


@relu_dropout.register_fake
@no_real_from_meta
def _(x: Tensor, p: float, philox: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return empty(x, channels_last_physical(x)), torch.empty(2, dtype=torch.int64)


def _relu_dropout_backward_impl(dy: Tensor, y: Tensor, p: float) -> Tensor:
    """dy * scale where y > 0 or NaN, +0 where y <= 0 (torch's ReLU gradient), in y's layout."""
    if pybn_takes(dy) and dy.dtype == y.dtype and y.device == dy.device:
        last = channels_last_physical(y)
        dy = in_layout(dy, last)
        dx = empty(dy, last)
        pybn.relu_dropout_backward(array(dy, last), array(y, last), p, out=array(dx, last))
        return dx
    dx = torch.where(y <= 0, torch.zeros((), dtype=dy.dtype, device=dy.device), dy * pybn.dropout_scale(p))
    return in_layout(dx, channels_last_physical(y))


relu_dropout_backward = torch.library.custom_op("pybn::relu_dropout_backward",
                                                mutates_args=())(_relu_dropout_backward_impl)


@relu_dropout_backward.register_fake
@no_real_from_meta
def _(dy: Tensor, y: Tensor, p: float) -> Tensor:
    return empty(dy, channels_last_physical(y))


def _relu_dropout_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
    ctx.p = inputs[1]
    ctx.direct = False  # (True after _ReluDropoutDirect's forward)
    ctx.save_for_backward(output[0])


def _relu_dropout_backward(ctx: Any, dy: Tensor, _dused: Optional[Tensor] = None) -> Tuple[Optional[Tensor], ...]:
    (y,) = ctx.saved_tensors
    # the operator when the backward must be differentiable (create_graph=True)
    op = operator(relu_dropout_backward)
    backward_fn = op if torch.is_grad_enabled() else backend(ctx, dy, _relu_dropout_backward_impl, op)
    return backward_fn(dy, y, ctx.p), None, None


register_autograd(relu_dropout, _relu_dropout_backward, _relu_dropout_setup, philox_at=2)


def _backward_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
    ctx.p = inputs[2]
    ctx.save_for_backward(inputs[1])


def _backward_backward(ctx: Any, ddx: Tensor) -> Tuple[Optional[Tensor], ...]:
    # linear in dy with the same mask; y's gradient is 0 almost everywhere (a step function)
    (y,) = ctx.saved_tensors
    return operator(relu_dropout_backward)(ddx, y, ctx.p), None, None


register_autograd(relu_dropout_backward, _backward_backward, _backward_setup)


class _ReluDropoutDirect(torch.autograd.Function):
    """pybn::relu_dropout's plain eager calls (pybn.torch._eager), as _DropoutDirect."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float, philox: Optional[Tensor]) -> Tensor:
        y = _dropout_with(x, p, _direct_counters(philox), None, relu=True)
        ctx.p, ctx.direct = p, True
        ctx.save_for_backward(y)
        return y

    backward = staticmethod(_relu_dropout_backward)


def relu_dropout_call(x: Tensor, p: float, philox: Optional[Tensor]) -> Tensor:
    """``torch.ops.pybn.relu_dropout(...)[0]``, without the dispatcher in plain eager mode."""
    if direct_call(x, philox) and pybn_takes(x):
        y: Tensor = _ReluDropoutDirect.apply(x, p, philox)  # type: ignore[no-untyped-call]
        return y
    return operator(relu_dropout)(x, p, philox)[0]  # type: ignore[no-any-return]
