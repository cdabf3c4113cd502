"""The optional pinned Philox stream that pybn.torch's stochastic-depth, DropBlock and noise
modules share (pybn.torch.nn.Dropout keeps its stream in a tensor instead, for
torch.compile): without a seed every training call draws one from torch's default CPU
generator; with ``seed=...`` the calls walk ``(seed, offset)``, each advancing ``offset`` by
the counters it used (docs/dropout.md)."""
from typing import Optional, Tuple

import torch
from torch import Tensor

U64 = 1 << 64


def u64(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: must be an int, got {type(value).__name__}")
    if not 0 <= value < U64:
        raise ValueError(f"{name}: must be in [0, 2**64), got {value}")
    return value


def as_int64(value: int) -> int:
    """A 64-bit counter or key as the int64 torch stores it (two's complement)."""
    return value - U64 if value >= 2**63 else value


def rank_and_world_size(rank: object, world_size: object) -> Tuple[int, int]:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: must be an int in [0, world_size), got {rank!r}")
    return rank, world_size


class PinnedSeed:
    """``seed`` and ``offset`` properties and the ``[seed, offset]`` tensor of a call."""

    _offset = 0
    _seed: Optional[int] = None

    @property
    def seed(self) -> Optional[int]:
        """The pinned Philox seed, or None: a fresh seed from torch's generator per call."""
        return self._seed

    @seed.setter
    def seed(self, seed: Optional[int]) -> None:
        self._seed = None if seed is None else u64(seed, "seed")
        self._offset = 0

    @property
    def offset(self) -> Optional[int]:
        """The Philox offset of the next training call (pinned seed only, else None)."""
        return None if self._seed is None else self._offset

    @offset.setter
    def offset(self, offset: int) -> None:
        if self._seed is None:
            raise ValueError("offset: only a module built with seed=... (or given .seed) has an offset")
        self._offset = u64(offset, "offset")

    def _pinned_philox(self, skip: int = 0) -> Tensor:
        """``[seed, offset + skip]`` as int64 (a pinned seed only)."""
        assert self._seed is not None
        return torch.tensor([as_int64(self._seed), as_int64((self._offset + skip) % U64)], dtype=torch.int64)

    def _advance(self, counters: int) -> None:
        self._offset = (self._offset + counters) % U64

    def _seed_repr(self) -> str:
        return "" if self._seed is None else f", seed={self._seed}"
