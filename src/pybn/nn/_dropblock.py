"""DropBlock2d, the layer (docs/dropout.md, \"DropBlock\")."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._checks import flag, float_array, integer, real_number
from ..dropblock import drop_block, drop_block_noise_shape, noise_shape_of
from ..dropout import counters_used
from ._layer import _PhiloxStream, _DropProbability, _U64, _check_dy, _Layer, _rank_and_world_size, _seed_or_entropy

class DropBlock2d(_DropProbability, _PhiloxStream, _Layer):
    """DropBlock (timm's ``DropBlock2d``) with a reproducible counter-based mask
    (docs/dropout.md, "DropBlock").

    In training mode :func:`pybn.drop_block` drops square blocks of each (N, C, H, W)
    feature map and rescales by ``mask elements / kept``; in evaluation mode, or with
    ``p == 0``, the layer is the identity. Each training call draws its seeds at
    ``(seed, offset)`` and then advances ``offset`` by the counters they used, as
    :class:`Dropout`.

    Parameters
    ----------
    p : float in [0, 1], default 0.1
        timm's ``drop_prob``.
    block_size : int >= 1, default 7
    seed : int in [0, 2**64), optional
        Key of the random stream; None draws one from the operating system's entropy.
    gamma_scale : float >= 0, default 1.0
    couple_channels, batchwise, scale_by_keep : bool
        As :func:`pybn.drop_block` (defaults True, False, True: timm's).
    rank, world_size : int, default 0 and 1
        Data parallelism, as :class:`DropPath` mode "row": rank r draws at
        ``offset + r * counters_used(m)`` (m seed elements) and every rank advances
        ``offset`` by ``world_size * counters_used(m)``. With ``batchwise=True`` the mask is
        one shared decision: every rank draws at ``offset``. The rescaling counts the local
        mask only (as timm on each process).

    Attributes
    ----------
    seed, offset : int
    training : bool
    """

    def __init__(self, p: float = 0.1, block_size: int = 7, *, seed: int | None = None, gamma_scale: float = 1.0,
                 couple_channels: bool = True, batchwise: bool = False, scale_by_keep: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        self.p = p
        self.block_size = integer(block_size, "block_size")
        if self.block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {self.block_size}")
        self.gamma_scale = real_number(gamma_scale, "gamma_scale", minimum=0.0)
        drop_block_noise_shape((1, 1, 1, 1), couple_channels=couple_channels, batchwise=batchwise)  # checks
        self.couple_channels, self.batchwise = bool(couple_channels), bool(batchwise)  # (checked above)
        self.scale_by_keep = flag(scale_by_keep, "scale_by_keep")
        self.seed = _seed_or_entropy(seed)
        self.rank, self.world_size = _rank_and_world_size(rank, world_size)
        self.offset = 0
        self.training = True
        # (keyword arguments of drop_block, x's shape, x's dtype) of the last forward; None
        # arguments for an identity forward
        self._saved: tuple[dict[str, Any] | None, tuple[int, ...], np.dtype] | None = None

    def __repr__(self) -> str:
        return (f"DropBlock2d(p={self.p}, block_size={self.block_size}, seed={self.seed}, "
                f"gamma_scale={self.gamma_scale}, couple_channels={self.couple_channels}, "
                f"batchwise={self.batchwise}, scale_by_keep={self.scale_by_keep}, rank={self.rank}, "
                f"world_size={self.world_size})")

    def forward(self, x: Any) -> np.ndarray:
        """Drop blocks in training mode; return `x` itself in evaluation mode or for p == 0."""
        array = float_array(x, "x")
        if not self.training or self.p == 0.0:
            self._saved = (None, array.shape, array.dtype)
            return array
        noise = noise_shape_of(array.shape, self.couple_channels, self.batchwise, "x")
        used = counters_used(math.prod(noise))
        offset, stride = (self.offset, used) if self.batchwise else \
            ((self.offset + self.rank * used) % _U64, self.world_size * used)
        kwargs: dict[str, Any] = dict(p=self.p, block_size=self.block_size, seed=self.seed, offset=offset,
                      gamma_scale=self.gamma_scale, couple_channels=self.couple_channels,
                      batchwise=self.batchwise, scale_by_keep=self.scale_by_keep)
        y = drop_block(array, **kwargs)
        self._saved = (kwargs, array.shape, array.dtype)
        self.offset = (self.offset + stride) % _U64
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """Gradient of the most recent forward: dy through the same mask and scale."""
        kwargs, shape, dtype = self._saved_or_raise(self._saved)
        grad = _check_dy(dy, shape, dtype)
        if kwargs is None:
            return grad
        return drop_block(grad, **kwargs)
