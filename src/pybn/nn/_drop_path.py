"""DropPath, the stochastic-depth layer (docs/dropout.md, \"Stochastic depth\")."""
from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import float_array
from ..drop_path import drop_path, drop_path_noise_shape
from ..dropout import counters_used
from ._layer import _PhiloxStream, _DropProbability, _U64, _check_dy, _Layer, _rank_and_world_size, _seed_or_entropy

class DropPath(_DropProbability, _PhiloxStream, _Layer):
    """Stochastic depth (torchvision's ``StochasticDepth``, timm's ``DropPath``) with a
    reproducible counter-based mask (docs/dropout.md, "Stochastic depth").

    In training mode :func:`pybn.drop_path` drops whole samples of a residual branch
    (mode "row") or the whole branch (mode "batch") with probability `p` and scales the
    kept ones by ``pybn.dropout_scale(p)``; in evaluation mode the layer is the identity.
    Like :class:`Dropout`, each training call uses ``(seed, offset)`` and then advances
    ``offset`` by the counters its decisions used, so the masks of a run follow from its
    seed.

    Parameters
    ----------
    p : float in [0, 1]
        Probability of dropping a sample (or the branch).
    mode : "row" or "batch", default "row"
    seed : int in [0, 2**64), optional
        Key of the random stream; None draws one from the operating system's entropy.
        Under data parallelism give every rank the same seed.
    rank, world_size : int, default 0 and 1
        For data-parallel training with mode "row": rank r draws its decisions at
        ``offset + r * counters_used(N)`` and every rank advances ``offset`` by
        ``world_size * counters_used(N)``, so the ranks' samples get distinct decisions
        from one seed while ``offset`` stays the same on every rank (the local batch size
        N must be the same on every rank). Mode "batch" ignores them: every rank draws the
        one shared decision at ``offset``.

    Attributes
    ----------
    seed, offset : int
    training : bool
    """

    def __init__(self, p: float, mode: str = "row", *, seed: int | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        self.p = p
        drop_path_noise_shape((1,), mode)  # checks mode
        self.mode = mode
        self.seed = _seed_or_entropy(seed)
        self.rank, self.world_size = _rank_and_world_size(rank, world_size)
        self.offset = 0
        self.training = True
        # (p, seed, offset, mode, x's shape, x's dtype, training) of the last forward
        self._saved: tuple[float, int, int, str, tuple[int, ...], np.dtype, bool] | None = None

    def __repr__(self) -> str:
        return (f"DropPath(p={self.p}, mode={self.mode!r}, seed={self.seed}, rank={self.rank}, "
                f"world_size={self.world_size})")

    def forward(self, x: Any) -> np.ndarray:
        """Drop samples (or the branch) in training mode; return `x` itself in evaluation mode."""
        array = float_array(x, "x")
        if not self.training:
            self._saved = (self.p, self.seed, self.offset, self.mode, array.shape, array.dtype, False)
            return array
        offset, stride = self._counters(array.shape)
        y = drop_path(array, self.p, seed=self.seed, offset=offset, mode=self.mode)
        self._saved = (self.p, self.seed, offset, self.mode, array.shape, array.dtype, True)
        self.offset = (self.offset + stride) % _U64
        return y

    def _counters(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(this rank's offset for this call, the advance of `offset` on every rank)."""
        if self.mode == "batch":
            return self.offset, counters_used(1)
        used = counters_used(shape[0] if shape else 1)
        return (self.offset + self.rank * used) % _U64, self.world_size * used

    def backward(self, dy: Any) -> np.ndarray:
        """Gradient of the most recent forward: dy through the same decisions and scale."""
        p, seed, offset, mode, shape, dtype, training = self._saved_or_raise(self._saved)
        grad = _check_dy(dy, shape, dtype)
        if not training:
            return grad
        return drop_path(grad, p, seed=seed, offset=offset, mode=mode)
