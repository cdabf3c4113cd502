"""The optional pinned Philox stream that pybn.torch's stochastic-depth, DropBlock and noise
modules share: without a seed every training call draws one from torch's default CPU
generator; with ``seed=...`` the calls walk ``(seed, offset)``, each advancing ``offset`` by
the counters it used (docs/dropout.md).

The offset is kept in a tensor, as pybn.torch.nn.Dropout keeps its ``[seed, offset]``, and
counted in torch's integer arithmetic: torch.compile guards on a Python int it reads (a new
graph for every offset, one per call) and fixes a size pybn's own checks read (one graph
per batch size under ``dynamic=True``), but keeps tensors and symbolic sizes as they are.
"""
from typing import Any, Optional, Tuple

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


def mask_counters(n: Any) -> Any:
    """``pybn.counters_used(n)`` for a size torch.compile may keep symbolic."""
    return 16 * ((n + 127) // 128)


def normal_counters(n: Any) -> Any:
    """``pybn.normal_counters_used(n)`` for a size torch.compile may keep symbolic."""
    return 16 * ((n + 63) // 64)


def rank_and_world_size(rank: object, world_size: object) -> Tuple[int, int]:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: must be an int in [0, world_size), got {rank!r}")
    return rank, world_size


class PinnedSeed:
    """``seed`` and ``offset`` properties and the ``[seed, offset]`` tensor of a call."""

    _offset_t: Optional[Tensor] = None  # [the next call's offset] (int64, two's complement); None: no seed
    _seed_t: Optional[Tensor] = None  # the seed as [seed] (int64), made once
    _seed: Optional[int] = None

    @property
    def seed(self) -> Optional[int]:
        """The pinned Philox seed, or None: a fresh seed from torch's generator per call."""
        return self._seed

    @seed.setter
    def seed(self, seed: Optional[int]) -> None:
        self._seed = None if seed is None else u64(seed, "seed")
        self._seed_t = None if self._seed is None else torch.tensor([as_int64(self._seed)], dtype=torch.int64)
        self._offset_t = None if seed is None else torch.zeros(1, dtype=torch.int64)

    @property
    def offset(self) -> Optional[int]:
        """The Philox offset of the next training call (pinned seed only, else None)."""
        return None if self._offset_t is None else int(self._offset_t) % U64

    @offset.setter
    def offset(self, offset: int) -> None:
        if self._seed is None:
            raise ValueError("offset: only a module built with seed=... (or given .seed) has an offset")
        self._offset_t = torch.tensor([as_int64(u64(offset, "offset"))], dtype=torch.int64)

    def _pinned_philox(self, skip: Any = 0) -> Tensor:
        """``[seed, offset + skip]`` as int64 (a pinned seed only; int64 sums wrap as the
        uint64 counters do)."""
        assert self._seed_t is not None and self._offset_t is not None
        return torch.cat([self._seed_t, self._offset_t + skip])

    def _advance(self, counters: Any) -> None:
        assert self._offset_t is not None
        self._offset_t = self._offset_t + counters

    def _seed_repr(self) -> str:
        return "" if self._seed is None else f", seed={self._seed}"
