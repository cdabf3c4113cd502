"""Dropout, the layer (docs/layers.md)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._checks import flag, float_array, integer
from ..dropout import counters_used, dropout, relu_dropout_backward, relu_of
from ._layer import _PhiloxStream, _DropProbability, _U64, _check_dy, _Layer, _seed_or_entropy

class Dropout(_DropProbability, _PhiloxStream, _Layer):
    """Inverted dropout with a reproducible counter-based mask (PyTorch's ``nn.Dropout``).

    In training mode each element is dropped with probability `p` and the kept ones are
    scaled by ``pybn.dropout_scale(p)`` (``1/(1-p)`` for p a multiple of 2**-16, so that
    ``E[y] = x`` for every p); in evaluation mode the layer is the identity. Call i draws its
    mask with ``pybn.dropout(x, p, seed=seed, offset=offset)`` and then advances
    ``offset`` by ``pybn.counters_used(n)`` (n mask elements), so no two calls share
    random counters and a run is reproduced exactly from its seed.

    Parameters
    ----------
    p : float in [0, 1], default 0.5
        Probability of dropping an element (PyTorch's ``p``, Keras' ``rate``).
    seed : int in [0, 2**64), optional
        Key of the random stream. None draws one from the operating system's entropy
        (as ``np.random.SeedSequence()``); it is kept in the ``seed`` attribute, so log
        it to reproduce the run.
    noise_shape : sequence of int or None, optional
        Keras semantics: the mask is drawn over this shape and broadcast over the axes
        where it is 1, e.g. ``(N, C, 1, 1)`` is PyTorch's ``Dropout2d``. A None entry
        takes x's extent on that axis (handy for the batch axis).

    Attributes
    ----------
    seed : int
    offset : int
        The first Philox counter of the next training-mode mask (starts at 0). Set it
        together with `seed` to resume a stream.
    training : bool

    Notes
    -----
    Only ``(seed, offset)`` of the last forward is kept: :meth:`backward` regenerates
    the mask, so no mask is stored. Backward after an evaluation-mode forward passes
    the gradient through. An MLP's hidden tail ``dropout(relu(x))`` is one call and one
    pass: ``layer(x, relu=True)``; the layer then keeps its output, whose backward needs
    no mask (``pybn.relu_dropout_backward``): do not modify it in place before
    :meth:`backward`.
    """

    def __init__(self, p: float = 0.5, *, seed: int | None = None, noise_shape: Any = None) -> None:
        self.p = p
        self.seed = _seed_or_entropy(seed)
        self.noise_shape = _noise_shape(noise_shape)
        self.offset = 0
        self.training = True
        # (p, seed, offset, mask shape or None for identity, x's shape, x's dtype) of the last
        # forward: attributes changed in between must not change its gradient
        self._saved: tuple[float, int, int, tuple[int, ...] | None, tuple[int, ...], np.dtype] | None = None
        self._relu_output: np.ndarray | None = None  # the last output of a forward with relu=True

    def __repr__(self) -> str:
        return f"Dropout(p={self.p}, seed={self.seed}, noise_shape={self.noise_shape})"

    def forward(self, x: Any, *, relu: bool = False) -> np.ndarray:
        """Drop and scale in training mode; return `x` itself in evaluation mode.

        Parameters
        ----------
        x : array_like, float32, float64, float16 or bfloat16
        relu : bool, default False
            ``dropout(relu(x))`` in one pass (in evaluation mode ``relu(x)``, as
            ``torch.relu``).

        Returns
        -------
        ndarray
            A new C-contiguous array in training mode; x unchanged (not copied) in
            evaluation mode, as PyTorch.
        """
        array = float_array(x, "x")
        relu = flag(relu, "relu")
        mask_shape = self._mask_shape(array.shape) if self.training else None
        self._saved = (self.p, self.seed, self.offset, mask_shape, array.shape, array.dtype)
        if mask_shape is None:
            y = relu_of(array) if relu else array
        else:
            y = dropout(array, self.p, seed=self.seed, offset=self.offset, noise_shape=mask_shape, relu=relu)
            self.offset = (self.offset + counters_used(math.prod(mask_shape))) % _U64
        self._relu_output = y if relu else None
        return y

    def _mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The noise shape with None entries filled in from x (x's shape without one)."""
        if self.noise_shape is None:
            return shape
        if len(self.noise_shape) != len(shape):
            raise ValueError(f"noise_shape: {self.noise_shape} has {len(self.noise_shape)} entries, "
                             f"x has {len(shape)} dimensions (shape {shape})")
        return tuple(s if d is None else d for d, s in zip(self.noise_shape, shape))

    def backward(self, dy: Any) -> np.ndarray:
        """Gradient of the most recent forward: dy through the same mask and scale.

        Parameters
        ----------
        dy : array_like
            Same shape and dtype as the forward's input.

        Returns
        -------
        ndarray
            dx; after an evaluation-mode forward, dy itself.

        Raises
        ------
        RuntimeError
            No forward pass yet.
        ValueError, TypeError
            dy's shape or dtype differs from the forward's input.
        """
        p, seed, offset, mask_shape, shape, dtype = self._saved_or_raise(self._saved)
        grad = _check_dy(dy, shape, dtype)
        if self._relu_output is not None:  # y > 0 exactly where the ReLU and the mask pass dy
            return relu_dropout_backward(grad, self._relu_output, 0.0 if mask_shape is None else p)
        if mask_shape is None:
            return grad
        return dropout(grad, p, seed=seed, offset=offset, noise_shape=mask_shape)


def _noise_shape(noise_shape: Any) -> tuple[int | None, ...] | None:
    if noise_shape is None:
        return None
    try:
        entries = tuple(noise_shape)
    except TypeError:
        raise TypeError(f"noise_shape: must be a sequence of ints (or None entries), got {noise_shape!r}") from None
    ns = tuple(None if d is None else integer(d, "noise_shape") for d in entries)
    if any(d is not None and d < 0 for d in ns):
        raise ValueError(f"noise_shape: negative extent in {ns}")
    return ns
