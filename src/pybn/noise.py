"""Alpha dropout, Gaussian dropout and Gaussian noise on pybn's counter stream (docs/dropout.md).

``alpha_dropout`` keeps exactly the elements :func:`pybn.dropout` keeps for the same
``(p, seed, offset)`` (its keep bits are ``pybn.dropout_mask``), and maps kept values to
``a * x + b`` and dropped ones to the constant ``b - c`` (PyTorch's ``AlphaDropout``: SELU's
fixed point mean 0 and variance 1 is kept). ``gaussian_dropout`` and ``gaussian_noise`` use
normal variates made from the same Philox stream (Box-Muller on two 32-bit words, in
float, docs/dropout.md "Normal variates"): variate k depends only on ``(seed, offset, k)``,
the same bits on every ISA path, thread count and dtype; n variates use
:func:`normal_counters_used` counters.

The backward passes regenerate what the forward drew: ``alpha_dropout_backward`` is
``a * dy`` where kept and 0 elsewhere, ``gaussian_dropout(dy, rate, ...)`` with the
forward's arguments is the gradient of ``gaussian_dropout``, and the gradient of
``gaussian_noise`` is ``dy`` itself.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _C
from ._checks import contiguous_float_array, integer, output, real_number
from .dropout import _counter_arg, _probability, _threshold

__all__ = ["alpha_dropout", "alpha_dropout_backward", "alpha_dropout_coefficients", "gaussian_dropout",
           "gaussian_noise", "gaussian_dropout_stddev", "normal_counters_used"]

# -alpha' = lambda * alpha of SELU (Klambauer et al. 2017): the value SELU tends to for
# large negative inputs is -SELU_NEGATIVE_SATURATION; PyTorch's constant.
SELU_NEGATIVE_SATURATION = 1.7580993408473766


def normal_counters_used(n: int) -> int:
    """Philox counters n normal variates use: ``16 * ceil(n / 64)`` (4 words per counter, 2
    per pair of variates); advance ``offset`` by this for the next draw."""
    n = integer(n, "n")
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    return 16 * ((n + 63) // 64)


def alpha_dropout_coefficients(p: float) -> tuple[float, float, float]:
    """``(a, b, c)`` of :func:`alpha_dropout`: kept values become ``a * x + b``, dropped
    ones ``b - c``, with ``c = alpha * a``, ``b = c * p_eff``,
    ``a = 1 / sqrt((alpha**2 * p_eff + 1) * (1 - p_eff))`` (``alpha`` =
    ``SELU_NEGATIVE_SATURATION``), in float64. ``p_eff = floor(p * 65536) / 65536`` is the
    probability that the 16-bit test drops an element, so the output keeps mean 0 and
    variance 1 exactly for SELU-normalised input; it is PyTorch's p for p a multiple of
    2**-16 (0.5, 0.25, ...), within 2**-16 of it otherwise. p must be in [0, 1)."""
    prob = _probability(p)
    if prob == 1.0:
        raise ValueError("p: alpha dropout's coefficients need p < 1 (p == 1 gives zeros)")
    p_eff = _threshold(prob) / 65536
    alpha = SELU_NEGATIVE_SATURATION
    a = 1.0 / math.sqrt((alpha * alpha * p_eff + 1.0) * (1.0 - p_eff))
    return a, alpha * a * p_eff, alpha * a


def alpha_dropout(x: Any, p: float, *, seed: int, offset: int = 0, training: bool = True,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Alpha dropout (PyTorch's ``F.alpha_dropout``) with pybn's reproducible mask.

    Parameters
    ----------
    x : array_like, float32, float64, float16 or bfloat16
        Typically the output of a SELU.
    p : float in [0, 1]
        Probability of dropping an element. 0 (or ``training=False``) is the identity
        (a copy, or `out` filled with x), 1 gives zeros, as PyTorch.
    seed, offset : int in [0, 2**64)
        Select the mask: the kept elements are those :func:`pybn.dropout` keeps for the
        same arguments, ``pybn.dropout_mask(x.shape, p, seed=seed, offset=offset)``; they
        use ``pybn.counters_used(x.size)`` counters.
    out : ndarray, optional
        C-contiguous, x's shape and dtype; may be x itself.

    Returns
    -------
    ndarray
        ``a * x + b`` where kept, ``b - c`` where dropped (:func:`alpha_dropout_coefficients`),
        each operation rounded in the compute type (float for the 16-bit dtypes, then one
        rounding to them), in PyTorch's order: for float32 the bits of
        ``torch.nn.functional.alpha_dropout`` given the same mask. A dropped NaN or
        infinity gives ``b - c`` (PyTorch's ``x * 0`` gives NaN).
    """
    x = contiguous_float_array(x, "x")
    prob = _probability(p)
    seed, offset = _counter_arg(seed, "seed"), _counter_arg(offset, "offset")
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training: must be a bool, got {type(training).__name__}")
    y = output(out, x, (("x", x),))
    if not training or _threshold(prob) == 0:
        if y is not x:
            np.copyto(y, x)
    elif prob == 1.0:
        y.fill(0)
    else:
        a, b, c = alpha_dropout_coefficients(prob)
        _C.alpha_dropout(x, y, seed, offset, _threshold(prob), a, b, c)
    return y


def alpha_dropout_backward(dy: Any, p: float, *, seed: int, offset: int = 0,
                           out: np.ndarray | None = None) -> np.ndarray:
    """The gradient of :func:`alpha_dropout` (training mode) with the forward's arguments:
    ``a * dy`` where the mask keeps, +0.0 elsewhere; the mask regenerated, not stored."""
    dy = contiguous_float_array(dy, "dy")
    prob = _probability(p)
    seed, offset = _counter_arg(seed, "seed"), _counter_arg(offset, "offset")
    y = output(out, dy, (("dy", dy),))
    if _threshold(prob) == 0:
        if y is not dy:
            np.copyto(y, dy)
    elif prob == 1.0:
        y.fill(0)
    else:  # dropout's kernel with a instead of dropout's scale: the same keep bits
        _C.dropout(dy, y, seed, offset, _threshold(prob), alpha_dropout_coefficients(prob)[0])
    return y


def gaussian_dropout_stddev(rate: float) -> float:
    """Keras' ``sqrt(rate / (1 - rate))``: the standard deviation of the multiplicative
    noise of :func:`gaussian_dropout`. rate must be in [0, 1)."""
    r = real_number(rate, "rate")
    if not 0.0 <= r < 1.0:
        raise ValueError(f"rate: must be in [0, 1) (the drop rate Gaussian dropout imitates), got {r}")
    return math.sqrt(r / (1.0 - r))


def gaussian_dropout(x: Any, rate: float, *, seed: int, offset: int = 0,
                     out: np.ndarray | None = None) -> np.ndarray:
    """Keras' ``GaussianDropout(rate)`` in training mode: ``x * (1 + s * z)`` with
    ``s = gaussian_dropout_stddev(rate)`` and z the normal variates of ``(seed, offset)``.

    Parameters
    ----------
    x : array_like, float32, float64, float16 or bfloat16
    rate : float in [0, 1)
        0 is the identity.
    seed, offset : int in [0, 2**64)
        Select the variates (``normal_counters_used(x.size)`` counters from `offset`).
    out : ndarray, optional
        C-contiguous, x's shape and dtype; may be x itself.

    Returns
    -------
    ndarray
        ``1 + s * z`` is taken in the compute type (float32 for float32 and the 16-bit
        dtypes, float64 for float64, z being a float32 value in both) and the product
        with x rounded once to x's dtype. The backward pass is the same call on dy.
    """
    s = gaussian_dropout_stddev(rate)
    return _noise(x, s, True, seed, offset, out)


def gaussian_noise(x: Any, stddev: float, *, seed: int, offset: int = 0,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Keras' ``GaussianNoise(stddev)`` in training mode: ``x + stddev * z`` with z the
    normal variates of ``(seed, offset)``; in x's dtype (float32 for the 16-bit dtypes,
    then one rounding to them). Its gradient is dy itself. stddev must be finite and >= 0;
    0 is the identity."""
    sd = real_number(stddev, "stddev")
    if sd < 0:
        raise ValueError(f"stddev: must be >= 0, got {sd}")
    return _noise(x, sd, False, seed, offset, out)


def _noise(x: Any, sigma: float, multiply: bool, seed: int, offset: int, out: np.ndarray | None) -> np.ndarray:
    x = contiguous_float_array(x, "x")
    seed, offset = _counter_arg(seed, "seed"), _counter_arg(offset, "offset")
    y = output(out, x, (("x", x),))
    if sigma == 0.0:
        if y is not x:
            np.copyto(y, x)
    else:
        _C.gaussian_noise(x, y, seed, offset, sigma, multiply)
    return y
