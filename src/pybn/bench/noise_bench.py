"""Alpha dropout, Gaussian dropout and Gaussian noise rows of the dropout section
(:mod:`.dropout_bench` times them, on its case: float32 x, out= preallocated).

pybn's calls against torch's ``nn.AlphaDropout`` and the ``torch.randn``-based recipes
Keras' layers amount to (``x * (1 + s * randn_like(x))``, ``x + s * randn_like(x)``), and
NumPy's ``rng.standard_normal``. Every result is checked before it is timed: pybn's alpha
dropout value for value against its mask, the others by their statistics.
"""
from __future__ import annotations

import math

import numpy as np

from .dropout_bench import SEED, DropoutCase
from .schema import Timed, WrongResult

P = 0.5            # alpha dropout's p, as the dropout rows
RATE = 0.5         # Gaussian dropout: multiplier N(1, rate / (1 - rate)) = N(1, 1)
STDDEV = 0.5       # Gaussian noise
ALPHA = 1.7580993408473766


def _fail_unless(ok: bool, what: str) -> None:
    if not ok:
        raise WrongResult(f"noise bench: {what}")


def _alpha_values() -> tuple[np.float32, np.float32, np.float32]:
    """(a, kept shift, dropped value) of alpha dropout at p = 0.5 in float32, as torch
    computes them (p a multiple of 2**-16: pybn's coefficients are torch's)."""
    a = 1 / math.sqrt((ALPHA * ALPHA * P + 1) * (1 - P))
    shift = np.float32(ALPHA * a * P)
    return np.float32(a), shift, shift - np.float32(ALPHA * a)


def _check_alpha_fraction(what: str, y: np.ndarray) -> None:
    dropped = y == _alpha_values()[2]
    n = y.size
    _fail_unless(abs(dropped.mean() - P) <= 6 * math.sqrt(P * (1 - P) / n), f"{what} drops {dropped.mean():.4f}")


def _check_noise(what: str, noise: np.ndarray, sd: float) -> None:
    """noise should be N(0, sd**2): mean and standard deviation within 6 standard errors."""
    n = noise.size
    noise = noise.astype(np.float64)
    _fail_unless(abs(noise.mean()) <= 6 * sd / math.sqrt(n) and abs(noise.std() / sd - 1) <= 6 / math.sqrt(2 * n),
                 f"{what}: noise mean {noise.mean():.3g}, std {noise.std():.3g}, not 0 and {sd}")


def _multiplier_sd() -> float:
    return math.sqrt(RATE / (1 - RATE))


def _multiplier_noise(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y / x - 1 where x is not 0: the multiplier's noise."""
    nonzero = x != 0
    ratio: np.ndarray = np.asarray(y)[nonzero] / x[nonzero] - 1
    return ratio


# ----------------------------------------------------------------------------- pybn

def pybn_alpha(case: DropoutCase) -> Timed:
    import pybn

    x, y = case.x, case.y
    a, b, dropped = _alpha_values()
    want = np.where(case.keep, x * a + b, dropped)

    def check(r: np.ndarray) -> None:
        _fail_unless(np.array_equal(np.asarray(r), want), "pybn.alpha_dropout differs from its mask")
    return Timed(lambda: pybn.alpha_dropout(x, P, seed=SEED, out=y), check)


def pybn_gaussian_dropout(case: DropoutCase) -> Timed:
    import pybn

    x, y = case.x, case.y
    return Timed(lambda: pybn.gaussian_dropout(x, RATE, seed=SEED, out=y),
                 lambda r: _check_noise("pybn.gaussian_dropout", _multiplier_noise(r, x), _multiplier_sd()))


def pybn_gaussian_noise(case: DropoutCase) -> Timed:
    import pybn

    x, y = case.x, case.y
    return Timed(lambda: pybn.gaussian_noise(x, STDDEV, seed=SEED, out=y),
                 lambda r: _check_noise("pybn.gaussian_noise", np.asarray(r) - x, STDDEV))


# ----------------------------------------------------------------------------- torch

def torch_alpha(case: DropoutCase) -> Timed:
    import torch

    xt, drop = torch.from_numpy(case.x), torch.nn.AlphaDropout(P).train()
    return Timed(lambda: drop(xt), lambda r: _check_alpha_fraction("torch nn.AlphaDropout", r.numpy()))


def torch_gaussian_dropout(case: DropoutCase) -> Timed:
    import torch

    xt, s = torch.from_numpy(case.x), _multiplier_sd()
    return Timed(lambda: xt * (1 + s * torch.randn_like(xt)),
                 lambda r: _check_noise("torch x * (1 + s * randn)", _multiplier_noise(r.numpy(), case.x), s))


def torch_gaussian_noise(case: DropoutCase) -> Timed:
    import torch

    xt = torch.from_numpy(case.x)
    return Timed(lambda: xt + STDDEV * torch.randn_like(xt),
                 lambda r: _check_noise("torch x + s * randn", r.numpy() - case.x, STDDEV))


# ----------------------------------------------------------------------------- NumPy

def numpy_gaussian_dropout(case: DropoutCase) -> Timed:
    x, rng, s = case.x, case.rng, np.float32(_multiplier_sd())
    return Timed(lambda: x * (1 + s * rng.standard_normal(x.shape, dtype=np.float32)),
                 lambda r: _check_noise("numpy x * (1 + s * standard_normal)", _multiplier_noise(r, x), float(s)))


def numpy_gaussian_noise(case: DropoutCase) -> Timed:
    x, rng = case.x, case.rng
    return Timed(lambda: x + np.float32(STDDEV) * rng.standard_normal(x.shape, dtype=np.float32),
                 lambda r: _check_noise("numpy x + s * standard_normal", r - x, STDDEV))
