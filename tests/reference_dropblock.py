"""Float64 NumPy reference of pybn.drop_block (docs/dropout.md, "DropBlock"), on the seeds of
the independent NumPy Philox reference (reference_dropout.py). Nothing here calls pybn.

The seeds: the elements of the noise shape whose 16-bit word is below floor(gamma * 65536),
gamma from timm's formula written out here. The blocks: timm's dilation (a stride-1 max pool
of the block size with padding block // 2, cropped by one at the start for even sizes),
written with NumPy's sliding windows. The scale: numel / kept in float64, rounded once.
"""
import math

import numpy as np

import reference_dropout as rd
from reference import nearest_even


def gamma_ref(p, block_size, h, w, gamma_scale=1.0):
    kh, kw = min(block_size, h), min(block_size, w)
    return min(1.0, gamma_scale * p * h * w / (kh * kw) / ((h - kh + 1) * (w - kw + 1)))


def noise_shape_ref(shape, couple_channels, batchwise):
    n, c, h, w = shape
    return (1 if batchwise else n, 1 if couple_channels else c, h, w)


def seeds_ref(noise, p, block_size, seed, offset, gamma_scale=1.0):
    """Boolean seeds over `noise`: the stream's words below floor(gamma * 65536)."""
    gamma = gamma_ref(p, block_size, noise[2], noise[3], gamma_scale)
    return ~rd.mask_bits(math.prod(noise), gamma, seed, offset).reshape(noise)


def max_pool_like_timm(seeds, kh, kw):
    """timm's dilation: max_pool2d(kernel (kh, kw), stride 1, padding (kh // 2, kw // 2)), then
    for an even size the first row (column) of the output dropped."""
    padded = np.pad(seeds, ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)))
    pooled = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3)).max(axis=(-2, -1))
    return pooled[..., (kh + 1) % 2:, (kw + 1) % 2:]


def keep_ref(shape, p, block_size, seed, offset=0, gamma_scale=1.0, couple_channels=True, batchwise=False):
    noise = noise_shape_ref(shape, couple_channels, batchwise)
    kh, kw = min(block_size, shape[2]), min(block_size, shape[3])
    return ~max_pool_like_timm(seeds_ref(noise, p, block_size, seed, offset, gamma_scale), kh, kw)


def drop_block_ref(x, p, block_size, seed, offset=0, gamma_scale=1.0, couple_channels=True, batchwise=False,
                   scale_by_keep=True):
    keep = keep_ref(x.shape, p, block_size, seed, offset, gamma_scale, couple_channels, batchwise)
    kept = int(keep.sum())
    scale = (keep.size / kept if kept else 0.0) if scale_by_keep else 1.0   # float64, rounded once below
    keep = np.broadcast_to(keep, x.shape)
    if x.dtype.itemsize == 2:   # the exact product with the float32 scale, rounded once
        kept_values = nearest_even(x.astype(np.float64) * np.float64(np.float32(scale)), x.dtype)
    else:
        kept_values = x * x.dtype.type(scale)
    return np.where(keep, kept_values, x.dtype.type(0))
