"""Stochastic depth for PyTorch models on pybn's masks: ``stochastic_depth`` and the
``StochasticDepth`` / ``DropPath`` module (torchvision's and timm's semantics).

Built on the ``torch.ops.pybn.dropout`` operator (:mod:`pybn.torch.ops`) with the noise
shape ``(N, 1, ..., 1)`` (mode "row") or ``(1, ..., 1)`` (mode "batch"), so autograd,
``torch.compile`` and the layouts are dropout's, and the decisions are
``pybn.dropout_mask(N, p, seed=, offset=)`` (docs/dropout.md, "Stochastic depth").
"""
from typing import List, Optional

import torch
from torch import Tensor, nn

import pybn

from . import ops as _ops  # noqa: F401  (registers the operators torch.ops.pybn.*)

__all__ = ["stochastic_depth", "StochasticDepth", "DropPath"]

_U64 = 2**64


def _noise_shape(input: Tensor, mode: str) -> List[int]:
    if mode not in ("row", "batch"):
        raise ValueError(f"mode: must be 'row' or 'batch', got {mode!r}")
    if mode == "batch":
        return [1] * input.dim()
    if input.dim() == 0:
        raise ValueError("input: mode 'row' needs at least 1 dimension (the samples along dim 0)")
    return [input.shape[0]] + [1] * (input.dim() - 1)


def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True, *,
                     philox: Optional[Tensor] = None) -> Tensor:
    """torchvision's ``stochastic_depth(input, p, mode, training)`` with pybn's masks;
    ``philox`` as in :func:`pybn.torch.ops.dropout` (None: a seed from torch's default
    CPU generator)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: drop probability has to be between 0 and 1, got {p}")
    noise = _noise_shape(input, mode)
    if not training or p == 0.0:
        return input
    y: Tensor = torch.ops.pybn.dropout(input, p, philox, noise)[0]
    return y


def _u64(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: must be an int, got {type(value).__name__}")
    if not 0 <= value < _U64:
        raise ValueError(f"{name}: must be in [0, 2**64), got {value}")
    return value


def _as_int64(value: int) -> int:
    return value - _U64 if value >= 2**63 else value


class StochasticDepth(nn.Module):
    """``torchvision.ops.StochasticDepth(p, mode)`` on pybn's masks.

    Without a seed each training call draws one from torch's default CPU generator
    (``torch.manual_seed`` reproduces a run). With ``seed=...`` the module keeps its own
    Philox stream as :class:`pybn.nn.DropPath` does: rank r of `world_size` draws mode
    "row" decisions at ``offset + r * counters_used(N)`` and every rank advances
    ``offset`` by ``world_size * counters_used(N)``; mode "batch" draws the one shared
    decision at ``offset`` on every rank and advances it by 16.
    """

    def __init__(self, p: float, mode: str = "row", *, seed: Optional[int] = None, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: drop probability has to be between 0 and 1, got {p}")
        if mode not in ("row", "batch"):
            raise ValueError(f"mode: must be 'row' or 'batch', got {mode!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: must be an int in [0, world_size), got {rank!r}")
        self.p, self.mode, self.rank, self.world_size = p, mode, rank, world_size
        self.seed = seed
        self.offset_ = 0

    @property
    def seed(self) -> Optional[int]:
        """The pinned Philox seed, or None: a fresh seed from torch's generator per call."""
        return self._seed

    @seed.setter
    def seed(self, seed: Optional[int]) -> None:
        self._seed = None if seed is None else _u64(seed, "seed")
        self.offset_ = 0

    @property
    def offset(self) -> Optional[int]:
        """The Philox offset of the next training call (pinned seed only, else None)."""
        return None if self._seed is None else self.offset_

    @offset.setter
    def offset(self, offset: int) -> None:
        if self._seed is None:
            raise ValueError("offset: only a module built with seed=... (or given .seed) has an offset")
        self.offset_ = _u64(offset, "offset")

    def forward(self, input: Tensor) -> Tensor:
        noise = _noise_shape(input, self.mode)
        if not self.training or self.p == 0.0:
            return input
        if self._seed is None:
            return stochastic_depth(input, self.p, self.mode, True)
        used = pybn.counters_used(noise[0] if self.mode == "row" else 1)
        rank, stride = (self.rank, self.world_size) if self.mode == "row" else (0, 1)
        offset = (self.offset_ + rank * used) % _U64
        philox = torch.tensor([_as_int64(self._seed), _as_int64(offset)], dtype=torch.int64)
        y = stochastic_depth(input, self.p, self.mode, True, philox=philox)
        self.offset_ = (self.offset_ + stride * used) % _U64
        return y

    def extra_repr(self) -> str:
        text = f"p={self.p}, mode={self.mode}"
        return text if self._seed is None else f"{text}, seed={self._seed}"


class DropPath(StochasticDepth):
    """timm's ``DropPath(drop_prob)``: :class:`StochasticDepth` in mode "row"."""

    def __init__(self, drop_prob: float = 0.0, *, seed: Optional[int] = None, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(drop_prob, "row", seed=seed, rank=rank, world_size=world_size)
