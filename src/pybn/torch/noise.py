"""Alpha dropout, Gaussian dropout and Gaussian noise for PyTorch on pybn's kernels
(docs/dropout.md): the operators ``torch.ops.pybn.alpha_dropout``,
``alpha_dropout_backward``, ``gaussian_dropout`` and ``gaussian_noise``, and the modules
``AlphaDropout`` (a drop-in for ``torch.nn.AlphaDropout``), ``GaussianDropout`` and
``GaussianNoise`` (Keras' layers, which torch.nn does not have).

Each operator takes ``philox``, an int64 tensor ``[seed, offset]`` or None (a seed drawn from
torch's default CPU generator, offset 0), and returns ``(y, philox_used)``, as
``torch.ops.pybn.dropout``. The elements are taken in memory order (a channels-last tensor as
``x.movedim(1, -1)``), so the mask or the variates are ``pybn``'s for that array. Tensors
pybn's kernels do not take (other devices and dtypes) are computed on a float32 (float64
stays float64) CPU copy, so the values are the same on every device. The backward passes
regenerate what the forward drew: alpha dropout's gradient is ``a * dy`` where kept,
Gaussian dropout's is the same operator on dy (which is then differentiable again), and
Gaussian noise's is dy.
"""
import math
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pybn
from .._checks import flag, real_number

from . import _regenerated
from ._eager import direct_call
from ._capture import exporting_onnx, leaf, prepare_scriptable
from ._transforms import operator, register_autograd
from ._layout import channels_last_physical, empty, in_layout, no_real_from_meta, pybn_takes
from ._regenerated import Kernel, Regenerated
from .ops import RANDOM, _float_cpu_copy, counters, in_form_of, philox_used
from .seeded import PinnedSeed, mask_counters, normal_counters

__all__ = ["alpha_dropout", "gaussian_dropout", "gaussian_noise", "AlphaDropout", "GaussianDropout",
           "GaussianNoise"]


def _alpha_kernel(p: float, backward: bool) -> Kernel:
    fn = pybn.alpha_dropout_backward if backward else pybn.alpha_dropout
    return lambda a, s, o, out, _: fn(a, p, seed=s, offset=o, out=out)


def _alpha(p: float) -> Regenerated:
    return Regenerated(_alpha_kernel(p, False), _alpha_kernel(p, True),
                       lambda dy, philox: torch.ops.pybn.alpha_dropout_backward(dy, p, philox))


def _gaussian_dropout(rate: float) -> Regenerated:
    def kernel(a: Any, seed: int, offset: int, out: Any, _: bool) -> Any:
        return pybn.gaussian_dropout(a, rate, seed=seed, offset=offset, out=out)

    # y = x * n: the gradient is dy times the same n, the same operator on dy
    return Regenerated(kernel, kernel, lambda dy, philox: torch.ops.pybn.gaussian_dropout(dy, rate, philox)[0])


def _gaussian_noise(stddev: float) -> Regenerated:
    return Regenerated(lambda a, s, o, out, _: pybn.gaussian_noise(a, stddev, seed=s, offset=o, out=out))


def _elementwise(x: Tensor, philox: Optional[Tensor], kernel: Kernel) -> Tuple[Tensor, Tensor]:
    """An operator's kernel over x's elements in memory order; (y, philox used)."""
    used = philox_used(philox)
    src = x if pybn_takes(x) else _float_cpu_copy(x)
    y = _regenerated.run(kernel, src, counters(used), channels_last_physical(src))
    return in_form_of(x, src, y), used


def _fake(x: Tensor, value: float, philox: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(p, rate or stddev: `value`)"""
    return empty(x, channels_last_physical(x)), torch.empty(2, dtype=torch.int64)


# --------------------------------------------------------------------------- operators

@torch.library.custom_op("pybn::alpha_dropout", mutates_args=(), **RANDOM)
def _alpha_dropout_op(x: Tensor, p: float, philox: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``pybn.alpha_dropout`` (training mode) of x in memory order."""
    return _elementwise(x, philox, _alpha(p).forward)


@torch.library.custom_op("pybn::alpha_dropout_backward", mutates_args=())
def _alpha_dropout_backward_op(dy: Tensor, p: float, philox: Tensor) -> Tensor:
    """``pybn.alpha_dropout_backward``: ``a * dy`` where the mask of philox keeps, 0 elsewhere."""
    return _elementwise(dy, philox, _alpha_kernel(p, True))[0]


@torch.library.custom_op("pybn::gaussian_dropout", mutates_args=(), **RANDOM)
def _gaussian_dropout_op(x: Tensor, rate: float, philox: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``pybn.gaussian_dropout`` of x in memory order."""
    return _elementwise(x, philox, _gaussian_dropout(rate).forward)


@torch.library.custom_op("pybn::gaussian_noise", mutates_args=(), **RANDOM)
def _gaussian_noise_op(x: Tensor, stddev: float, philox: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``pybn.gaussian_noise`` of x in memory order."""
    return _elementwise(x, philox, _gaussian_noise(stddev).forward)


_alpha_dropout_op.register_fake(no_real_from_meta(_fake))
_gaussian_dropout_op.register_fake(no_real_from_meta(_fake))
_gaussian_noise_op.register_fake(no_real_from_meta(_fake))


@_alpha_dropout_backward_op.register_fake
@no_real_from_meta
def _(dy: Tensor, p: float, philox: Tensor) -> Tensor:
    return empty(dy, channels_last_physical(dy))


def _setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
    ctx.value, ctx.last = inputs[1], channels_last_physical(inputs[0])
    ctx.save_for_backward(output[1])


def _alpha_backward(ctx: Any, dy: Tensor, _dused: Tensor) -> Tuple[Optional[Tensor], ...]:
    (used,) = ctx.saved_tensors
    # dy in the layout x had: the mask follows memory order
    return operator(_alpha_dropout_backward_op)(in_layout(dy, ctx.last), ctx.value, used), None, None


def _alpha_backward_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
    ctx.value, ctx.last = inputs[1], channels_last_physical(inputs[0])
    ctx.save_for_backward(inputs[2])


def _alpha_backward_backward(ctx: Any, ddx: Tensor) -> Tuple[Optional[Tensor], ...]:
    (philox,) = ctx.saved_tensors  # linear in dy: the same map again
    return operator(_alpha_dropout_backward_op)(in_layout(ddx, ctx.last), ctx.value, philox), None, None


def _gaussian_dropout_backward(ctx: Any, dy: Tensor, _dused: Tensor) -> Tuple[Optional[Tensor], ...]:
    (used,) = ctx.saved_tensors  # y = x * n: dy * the same n
    return operator(_gaussian_dropout_op)(in_layout(dy, ctx.last), ctx.value, used)[0], None, None


def _gaussian_noise_backward(ctx: Any, dy: Tensor, _dused: Tensor) -> Tuple[Optional[Tensor], ...]:
    return dy, None, None


register_autograd(_alpha_dropout_op, _alpha_backward, _setup, philox_at=2)
register_autograd(_alpha_dropout_backward_op, _alpha_backward_backward, _alpha_backward_setup)
register_autograd(_gaussian_dropout_op, _gaussian_dropout_backward, _setup, philox_at=2)
register_autograd(_gaussian_noise_op, _gaussian_noise_backward, _setup, philox_at=2)


def _call(kernels: Regenerated, op: Any, x: Tensor, value: float, philox: Optional[Tensor]) -> Tensor:
    """``op(x, value, philox)[0]`` (op: one of the operators above), without the dispatcher in
    plain eager mode."""
    if direct_call(x, philox) and pybn_takes(x):
        return _regenerated.call(kernels, x, philox)
    y: Tensor = operator(op)(x, value, philox)[0]
    return y


# --------------------------------------------------------------------------- functions

def _number(value: object, name: str) -> float:
    # (an int or a float as they are: under torch.compile a symbolic float, which the range
    # checks compare but math.isfinite, in real_number, would break the graph on)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return real_number(value, name)


def _probability(value: object, name: str, upper_closed: bool) -> float:
    v = _number(value, name)
    if not (0.0 <= v <= 1.0 if upper_closed else 0.0 <= v < 1.0):  # NaN fails both
        raise ValueError(f"{name}: must be in [0, {'1]' if upper_closed else '1)'}, got {v}")
    return v


def _stddev(value: object) -> float:
    v = _number(value, "stddev")
    if not 0.0 <= v < math.inf:  # NaN fails (and a symbolic float under torch.compile compares)
        raise ValueError(f"stddev: must be finite and >= 0, got {v}")
    return v


def alpha_dropout(input: Tensor, p: float = 0.5, training: bool = False, inplace: bool = False, *,
                  philox: Optional[Tensor] = None) -> Tensor:
    """``torch.nn.functional.alpha_dropout`` with pybn's masks (``philox`` as for
    :func:`pybn.torch.ops.dropout`; None: a seed from torch's default CPU generator)."""
    p = _probability(p, "p", True)
    inplace = flag(inplace, "inplace")
    if not flag(training, "training") or p == 0.0:
        return input
    if philox is None and exporting_onnx():  # (torch's function, for torch's exporter to export or refuse)
        return F.alpha_dropout(input, p, True, inplace)
    # p == 1 gives torch's zeros (there is no affine map to keep the moments)
    y = input * input.new_zeros(()) if p == 1.0 else _call(_alpha(p), _alpha_dropout_op, input, p, philox)
    return input.copy_(y) if inplace else y


def gaussian_dropout(input: Tensor, rate: float, training: bool = True, *, philox: Optional[Tensor] = None) -> Tensor:
    """Keras' ``GaussianDropout(rate)``: ``input * N(1, rate / (1 - rate))`` in training mode."""
    rate = _probability(rate, "rate", False)
    if not flag(training, "training") or rate == 0.0:
        return input
    return _call(_gaussian_dropout(rate), _gaussian_dropout_op, input, rate, philox)


def gaussian_noise(input: Tensor, stddev: float, training: bool = True, *, philox: Optional[Tensor] = None) -> Tensor:
    """Keras' ``GaussianNoise(stddev)``: ``input + N(0, stddev**2)`` in training mode."""
    sd = _stddev(stddev)
    if not flag(training, "training") or sd == 0.0:
        return input
    return _call(_gaussian_noise(sd), _gaussian_noise_op, input, sd, philox)


# --------------------------------------------------------------------------- modules

class _SeededNoise(PinnedSeed):
    """The optional pinned Philox stream of the noise modules, as pybn.torch.nn.Dropout's:
    without a seed each training call draws one from torch's default CPU generator; with
    ``seed=...`` call i uses ``(seed, offset)`` and advances ``offset`` by the counters it
    used (``pybn.counters_used(n)`` for alpha dropout, ``pybn.normal_counters_used(n)``
    for the Gaussian modules)."""

    __prepare_scriptable__ = prepare_scriptable  # torch.jit.script: a TypeError saying what to script instead

    def _philox(self, n: int, counters: Any) -> Optional[Tensor]:
        """This call's [seed, offset] (None without a pinned seed); advances offset."""
        if self._seed is None:
            return None
        return self._take(stride=counters(n))


class AlphaDropout(_SeededNoise, nn.AlphaDropout):
    """``torch.nn.AlphaDropout(p, inplace)`` with pybn's masks (``pybn.alpha_dropout``);
    ``seed=`` pins a Philox stream. Other devices and dtypes run on a CPU copy. As torch's
    module, it never writes its input: ``inplace`` is kept but not used (the functional
    :func:`alpha_dropout` takes it)."""

    drop_in_for = nn.AlphaDropout

    def __init__(self, p: float = 0.5, inplace: bool = False, *, seed: Optional[int] = None) -> None:
        super().__init__(p, inplace)
        self.seed = seed

    @leaf
    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return input
        # not in place, whatever `inplace` says: torch's module ignores it too
        return alpha_dropout(input, self.p, True, philox=self._philox(input.numel(), mask_counters))

    def extra_repr(self) -> str:
        return super().extra_repr() + self._seed_repr()


class GaussianDropout(_SeededNoise, nn.Module):
    """Keras' ``GaussianDropout(rate)``: ``x * N(1, rate / (1 - rate))`` in training mode,
    the identity in evaluation mode (``pybn.gaussian_dropout``)."""

    def __init__(self, rate: float, *, seed: Optional[int] = None) -> None:
        super().__init__()
        self.rate = _probability(rate, "rate", False)
        self.seed = seed

    @leaf
    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return input
        return gaussian_dropout(input, self.rate, philox=self._philox(input.numel(), normal_counters))

    def extra_repr(self) -> str:
        return f"rate={self.rate}" + self._seed_repr()


class GaussianNoise(_SeededNoise, nn.Module):
    """Keras' ``GaussianNoise(stddev)``: ``x + N(0, stddev**2)`` in training mode, the
    identity in evaluation mode (``pybn.gaussian_noise``)."""

    def __init__(self, stddev: float, *, seed: Optional[int] = None) -> None:
        super().__init__()
        self.stddev = _stddev(stddev)
        self.seed = seed

    @leaf
    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self.stddev == 0.0:
            return input
        return gaussian_noise(input, self.stddev, philox=self._philox(input.numel(), normal_counters))

    def extra_repr(self) -> str:
        return f"stddev={self.stddev}" + self._seed_repr()
