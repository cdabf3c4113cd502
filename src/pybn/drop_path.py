"""Stochastic depth (drop path): dropout of whole samples, on pybn's mask stream (docs/dropout.md).

``drop_path(x, p, seed=s, offset=o, mode="row")`` is ``dropout(x, p, seed=s, offset=o,
noise_shape=(N, 1, ..., 1))``: one keep decision per sample along axis 0, drawn as mask
element ``i`` of the stream, so its keep bits are ``dropout_mask(N, p, seed=s, offset=o)``.
``mode="batch"`` is the noise shape ``(1, ..., 1)``: one decision for the whole array, the
bit ``dropout_mask(1, p, seed=s, offset=o)``. Nothing new is drawn or stored: the mask
contract, the scale and the backward (the same call on the gradient) are dropout's.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import float_array
from .dropout import dropout

__all__ = ["drop_path", "drop_path_noise_shape"]

MODES = ("row", "batch")


def drop_path_noise_shape(shape: tuple[int, ...], mode: str) -> tuple[int, ...]:
    """The dropout noise shape of stochastic depth over an array of `shape`:
    ``(N, 1, ..., 1)`` for mode "row", ``(1, ..., 1)`` for mode "batch"."""
    if not isinstance(mode, str):
        raise TypeError(f"mode: must be the string 'row' or 'batch', got {type(mode).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode: must be 'row' or 'batch' (torchvision's stochastic_depth modes), got {mode!r}")
    if mode == "batch":
        return (1,) * len(shape)
    if len(shape) == 0:
        raise ValueError("x: mode 'row' needs at least 1 dimension (the samples along axis 0), got a 0-d array")
    return (shape[0],) + (1,) * (len(shape) - 1)


def drop_path(x: Any, p: float, *, seed: int, offset: int = 0, mode: str = "row",
              out: np.ndarray | None = None) -> np.ndarray:
    """Stochastic depth (torchvision's ``stochastic_depth``, timm's ``drop_path``) with
    pybn's reproducible mask.

    Parameters
    ----------
    x : array_like, float32, float64, float16 or bfloat16
        The output of a residual branch, samples along axis 0.
    p : float in [0, 1]
        Probability of dropping a sample (mode "row") or the whole branch (mode "batch").
        0 is the identity, 1 gives zeros, as torchvision.
    seed, offset : int in [0, 2**64)
        Select the mask, as for :func:`pybn.dropout`; the decisions use
        ``pybn.counters_used(N)`` counters (16 per 128 samples) in mode "row", 16 in mode
        "batch". The backward pass is ``drop_path(dy, p, seed=seed, offset=offset, mode=mode)``.
    mode : "row" or "batch"
        "row": one keep decision per sample (element i of the mask stream for sample i);
        "batch": one decision for the whole array (element 0).
    out : ndarray, optional
        C-contiguous, x's shape and dtype; may be x itself.

    Returns
    -------
    ndarray
        Kept samples times :func:`pybn.dropout_scale` (``1/(1-p)`` for p a multiple of
        2**-16; torchvision's ``1/(1-p)`` differs from it by less than 2**-16/(1-p)
        relative otherwise), dropped ones +0.0.
    """
    noise = drop_path_noise_shape(float_array(x, "x").shape, mode)
    # x itself, not its converted array: dropout checks that `out` does not overlap it
    return dropout(x, p, seed=seed, offset=offset, noise_shape=noise, out=out)
