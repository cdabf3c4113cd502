"""The noise layers: AlphaDropout, GaussianDropout and GaussianNoise."""
from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import float_array, real_number
from ..dropout import counters_used
from ..noise import (alpha_dropout, alpha_dropout_backward, gaussian_dropout, gaussian_dropout_stddev, gaussian_noise,
                     normal_counters_used)
from ._layer import _PhiloxStream, _DropProbability, _U64, _check_dy, _Layer, _seed_or_entropy

class _NoiseLayer(_PhiloxStream, _Layer):
    """What AlphaDropout, GaussianDropout and GaussianNoise share with :class:`Dropout`:
    ``seed`` and ``offset`` (advanced after every training call by the counters the call
    used), the identity in evaluation mode, and a backward that regenerates the forward's
    randomness from the saved ``(seed, offset)``."""

    def __init__(self, seed: int | None) -> None:
        self.seed = _seed_or_entropy(seed)
        self.offset = 0
        self.training = True
        # (the layer's parameter, seed, offset, x's shape, x's dtype, training) of the last forward
        self._saved: tuple[float, int, int, tuple[int, ...], np.dtype, bool] | None = None

    def _parameter(self) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def _draw(self, x: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _gradient(self, dy: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _counters(self, n: int) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: Any) -> np.ndarray:
        """The noise in training mode; `x` itself (not copied) in evaluation mode.

        Parameters
        ----------
        x : array_like, float32, float64, float16 or bfloat16

        Returns
        -------
        ndarray
        """
        array = float_array(x, "x")
        value = self._parameter()
        self._saved = (value, self.seed, self.offset, array.shape, array.dtype, self.training)
        if not self.training:
            return array
        y = self._draw(array, value, self.seed, self.offset)
        self.offset = (self.offset + self._counters(array.size)) % _U64
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """Gradient of the most recent forward (dy itself after an evaluation-mode one).

        Raises
        ------
        RuntimeError
            No forward pass yet.
        ValueError, TypeError
            dy's shape or dtype differs from the forward's input.
        """
        value, seed, offset, shape, dtype, training = self._saved_or_raise(self._saved)
        grad = _check_dy(dy, shape, dtype)
        if not training:
            return grad
        return self._gradient(grad, value, seed, offset)


class AlphaDropout(_DropProbability, _NoiseLayer):
    """Alpha dropout for SELU networks (PyTorch's ``nn.AlphaDropout``) with a reproducible
    mask: :func:`pybn.alpha_dropout` in training mode, the identity in evaluation mode.
    Call i uses ``(seed, offset)`` and advances ``offset`` by ``pybn.counters_used(n)``;
    its kept elements are those ``pybn.nn.Dropout(p)`` would keep at that offset.

    Parameters
    ----------
    p : float in [0, 1], default 0.5
    seed : int in [0, 2**64), optional
        None draws one from the operating system's entropy (kept in ``seed``).
    """

    def __init__(self, p: float = 0.5, *, seed: int | None = None) -> None:
        self.p = p
        super().__init__(seed)

    def __repr__(self) -> str:
        return f"AlphaDropout(p={self.p}, seed={self.seed})"

    def _parameter(self) -> float:
        return self.p

    def _draw(self, x: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:
        return alpha_dropout(x, value, seed=seed, offset=offset)

    def _gradient(self, dy: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:
        return alpha_dropout_backward(dy, value, seed=seed, offset=offset)

    def _counters(self, n: int) -> int:
        return counters_used(n)


class GaussianDropout(_NoiseLayer):
    """Keras' ``GaussianDropout(rate)``: ``x * N(1, rate / (1 - rate))`` in training mode
    (:func:`pybn.gaussian_dropout`), the identity in evaluation mode. Call i uses
    ``(seed, offset)`` and advances ``offset`` by ``pybn.normal_counters_used(n)``.

    Parameters
    ----------
    rate : float in [0, 1)
    seed : int in [0, 2**64), optional
    """

    def __init__(self, rate: float, *, seed: int | None = None) -> None:
        self.rate = rate
        super().__init__(seed)

    @property
    def rate(self) -> float:
        """The drop rate the noise imitates, in [0, 1)."""
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        gaussian_dropout_stddev(value)  # checks it
        self._rate = float(value)

    def __repr__(self) -> str:
        return f"GaussianDropout(rate={self.rate}, seed={self.seed})"

    def _parameter(self) -> float:
        return self.rate

    def _draw(self, x: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:
        return gaussian_dropout(x, value, seed=seed, offset=offset)

    def _gradient(self, dy: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:
        return gaussian_dropout(dy, value, seed=seed, offset=offset)  # dy times the same multiplier

    def _counters(self, n: int) -> int:
        return normal_counters_used(n)


class GaussianNoise(_NoiseLayer):
    """Keras' ``GaussianNoise(stddev)``: ``x + N(0, stddev**2)`` in training mode
    (:func:`pybn.gaussian_noise`), the identity in evaluation mode; the gradient is dy.
    Call i uses ``(seed, offset)`` and advances ``offset`` by ``pybn.normal_counters_used(n)``.

    Parameters
    ----------
    stddev : float >= 0
    seed : int in [0, 2**64), optional
    """

    def __init__(self, stddev: float, *, seed: int | None = None) -> None:
        self.stddev = stddev
        super().__init__(seed)

    @property
    def stddev(self) -> float:
        """The standard deviation of the noise, >= 0."""
        return self._stddev

    @stddev.setter
    def stddev(self, value: float) -> None:
        sd = real_number(value, "stddev")
        if sd < 0:
            raise ValueError(f"stddev: must be >= 0, got {sd}")
        self._stddev = sd

    def __repr__(self) -> str:
        return f"GaussianNoise(stddev={self.stddev}, seed={self.seed})"

    def _parameter(self) -> float:
        return self.stddev

    def _draw(self, x: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:
        return gaussian_noise(x, value, seed=seed, offset=offset)

    def _gradient(self, dy: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:
        return dy

    def _counters(self, n: int) -> int:
        return normal_counters_used(n)
