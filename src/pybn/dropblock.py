"""DropBlock (Ghiasi, Lin, Le, NeurIPS 2018) on pybn's mask stream (docs/dropout.md).

On an NCHW array, block seeds are drawn with probability gamma over the noise shape
``(N, 1, H, W)`` (``couple_channels=True``, the paper's and timm's default: one spatial mask
per sample, shared by its channels) or ``(N, C, H, W)``; ``batchwise=True`` draws one mask
for the whole batch (noise shape ``(1, ., H, W)``). Element k of the noise shape (C order)
is a seed when its 16-bit word of the stream is below ``floor(gamma * 65536)``: the seeds
are the *dropped* bits of ``dropout_mask(noise_shape, gamma, seed=s, offset=o)``. Each seed
at (r, c) drops rows ``r - kh // 2 .. r + (kh - 1) // 2`` and columns
``c - kw // 2 .. c + (kw - 1) // 2`` of its plane (clipped), ``kh = min(block_size, H)``,
``kw = min(block_size, W)``: timm's ``max_pool2d`` dilation, even sizes included. Kept
elements are multiplied by ``numel / kept`` over the mask (timm's ``scale_by_keep``), an
integer ratio divided once in float64; when nothing is kept the result is zeros.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _C
from ._checks import contiguous_float_array, flag, integer, output, real_number
from .dropout import _counter_arg, _probability, apply_mask, dropout_mask

__all__ = ["drop_block", "drop_block_mask", "drop_block_gamma", "drop_block_noise_shape"]


def _block_size(value: Any) -> int:
    size = integer(value, "block_size")
    if size < 1:
        raise ValueError(f"block_size: must be >= 1, got {size}")
    return size


def _nchw(shape: Any, name: str) -> tuple[int, int, int, int]:
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__"):
        raise TypeError(f"{name}: must be a sequence of 4 ints (N, C, H, W), got {type(shape).__name__}")
    shape = tuple(shape)
    if len(shape) != 4:
        raise ValueError(f"{name}: DropBlock needs a 4-d (N, C, H, W) array, got {len(shape)} dimensions "
                         f"(shape {shape})")
    n, c, h, w = (integer(d, name) for d in shape)
    if min(n, c, h, w) < 0:
        raise ValueError(f"{name}: negative extent in {shape}")
    return n, c, h, w


def _channels_last(axis: Any) -> bool:
    a = integer(axis, "axis")
    if a not in (1, -3, 3, -1):
        raise ValueError(f"axis: the channel axis of a 4-d array must be 1 (N, C, H, W) or -1 (N, H, W, C), got {a}")
    return a in (3, -1)


def _to_channels_last(keep: np.ndarray, noise: tuple[int, int, int, int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """The packed mask over `noise` (N, C, H, W order) as a mask over (N, H, W, C)."""
    moved = (noise[0], noise[2], noise[3], noise[1])
    if noise[1] == 1:  # the same bits in either order
        return keep, moved
    bits = np.unpackbits(keep, count=math.prod(noise), bitorder="little").reshape(noise)
    return np.packbits(bits.transpose(0, 2, 3, 1), bitorder="little"), moved


def drop_block_gamma(p: float, block_size: int, height: int, width: int, gamma_scale: float = 1.0) -> float:
    """The seed probability of DropBlock as timm computes it:
    ``gamma_scale * p * H * W / (kh * kw) / ((H - kh + 1) * (W - kw + 1))`` with
    ``kh = min(block_size, H)``, ``kw = min(block_size, W)``, capped at 1. The stream draws
    seeds with probability ``floor(gamma * 65536) / 65536``."""
    p = _probability(p)
    block_size = _block_size(block_size)
    gamma_scale = real_number(gamma_scale, "gamma_scale", minimum=0.0)
    h, w = integer(height, "height"), integer(width, "width")
    if h < 1 or w < 1:
        return 0.0
    kh, kw = min(block_size, h), min(block_size, w)
    gamma = gamma_scale * p * h * w / (kh * kw) / ((h - kh + 1) * (w - kw + 1))
    return min(gamma, 1.0)


def drop_block_noise_shape(shape: Any, *, couple_channels: bool = True,
                           batchwise: bool = False) -> tuple[int, int, int, int]:
    """The shape the seeds are drawn over for an (N, C, H, W) array: ``(N, 1, H, W)`` with
    coupled channels, ``(N, C, H, W)`` without; N becomes 1 when ``batchwise``. The draw uses
    ``pybn.counters_used(prod(noise shape))`` counters from ``offset``."""
    return noise_shape_of(shape, couple_channels, batchwise, "shape")


def noise_shape_of(shape: Any, couple_channels: Any, batchwise: Any, name: str) -> tuple[int, int, int, int]:
    """:func:`drop_block_noise_shape`, naming the shape `name` in errors."""
    n, c, h, w = _nchw(shape, name)
    couple_channels = flag(couple_channels, "couple_channels")
    batchwise = flag(batchwise, "batchwise")
    return (1 if batchwise else n, 1 if couple_channels else c, h, w)


def _keep_mask(noise: tuple[int, int, int, int], p: float, block_size: int, seed: int, offset: int,
               gamma_scale: float) -> tuple[np.ndarray, int]:
    """The packed keep mask over `noise` and the number of elements it keeps."""
    _, _, h, w = noise
    gamma = drop_block_gamma(p, block_size, h, w, gamma_scale)
    seeds = dropout_mask(noise, gamma, seed=seed, offset=offset)  # its 0 bits are the seeds
    n = math.prod(noise)
    if n == 0:
        return seeds, 0
    keep = np.empty_like(seeds)
    kept = _C.drop_block_mask(seeds, keep, noise[0] * noise[1], h, w, min(block_size, h), min(block_size, w))
    return keep, kept


def drop_block_mask(shape: Any, p: float, *, block_size: int, seed: int, offset: int = 0,
                    gamma_scale: float = 1.0, couple_channels: bool = True,
                    batchwise: bool = False) -> np.ndarray:
    """The packed keep mask DropBlock applies to an array of `shape` (N, C, H, W): over
    :func:`drop_block_noise_shape`, bit k % 8 of byte k // 8 for element k in C order, as
    :func:`pybn.dropout_mask`. ``drop_block(x, ...)`` is x times the unpacked mask (broadcast)
    times ``mask_elements / kept``, +0.0 where dropped."""
    noise = drop_block_noise_shape(shape, couple_channels=couple_channels, batchwise=batchwise)
    p, block_size = _probability(p), _block_size(block_size)
    seed, offset = _counter_arg(seed, "seed"), _counter_arg(offset, "offset")
    gamma_scale = real_number(gamma_scale, "gamma_scale", minimum=0.0)
    return _keep_mask(noise, p, block_size, seed, offset, gamma_scale)[0]


def drop_block(x: Any, p: float, *, block_size: int, seed: int, offset: int = 0, gamma_scale: float = 1.0,
               couple_channels: bool = True, batchwise: bool = False, scale_by_keep: bool = True,
               axis: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """DropBlock on an (N, C, H, W) array: contiguous square blocks of each feature map
    dropped, timm's ``drop_block_2d`` semantics on pybn's reproducible mask stream.

    Parameters
    ----------
    x : array_like, float32, float64, float16 or bfloat16, 4-d (N, C, H, W), C order
    p : float in [0, 1]
        timm's ``drop_prob``: the fraction of units meant to be dropped, from which the seed
        probability gamma follows (:func:`drop_block_gamma`).
    block_size : int >= 1
        The side of a dropped block, clipped to H and W.
    seed, offset : int in [0, 2**64)
        Select the mask, as for :func:`pybn.dropout`; the seeds use
        ``pybn.counters_used(prod(drop_block_noise_shape(x.shape)))`` counters. The backward
        pass is the same call on the gradient.
    gamma_scale : float >= 0
        timm's factor on gamma (gamma is capped at 1).
    couple_channels : bool
        One spatial mask per sample shared by all channels (True, the paper's), or one per
        channel.
    batchwise : bool
        One mask for the whole batch (older timm's ``batchwise``).
    scale_by_keep : bool
        Multiply kept values by ``mask_elements / kept`` (timm's normalization; float64
        division, rounded once to x's dtype), else leave them as they are.
    axis : 1 or -1, default 1
        The channel axis: 1 for (N, C, H, W), -1 (or 3) for a channels-last (N, H, W, C)
        array. The mask is the same in both layouts (drawn over the (N, C, H, W) order); a
        per-channel mask (``couple_channels=False``) is transposed for channels-last, which
        costs a pass over it.
    out : ndarray, optional
        C-contiguous, x's shape and dtype; may be x itself.
    """
    x = contiguous_float_array(x, "x")
    _nchw(x.shape, "x")
    channels_last = _channels_last(axis)
    logical = (x.shape[0], x.shape[3], x.shape[1], x.shape[2]) if channels_last else x.shape
    noise = noise_shape_of(logical, couple_channels, batchwise, "x")
    p, block_size = _probability(p), _block_size(block_size)
    seed, offset = _counter_arg(seed, "seed"), _counter_arg(offset, "offset")
    gamma_scale = real_number(gamma_scale, "gamma_scale", minimum=0.0)
    scale_by_keep = flag(scale_by_keep, "scale_by_keep")
    y = output(out, x, (("x", x),))
    if x.size == 0:  # (before the mask: the noise shape's other extents may be huge)
        return y
    keep, kept = _keep_mask(noise, p, block_size, seed, offset, gamma_scale)
    scale = (math.prod(noise) / kept if kept else 0.0) if scale_by_keep else 1.0
    mask_shape: tuple[int, ...] = noise
    if channels_last:
        keep, mask_shape = _to_channels_last(keep, noise)
    apply_mask(x, keep, mask_shape, scale, y)
    return y
