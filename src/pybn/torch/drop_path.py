"""Stochastic depth for PyTorch models on pybn's masks: ``stochastic_depth`` and the
``StochasticDepth`` / ``DropPath`` module (torchvision's and timm's semantics).

Built on the ``torch.ops.pybn.dropout`` operator (:mod:`pybn.torch.ops`) with the noise
shape ``(N, 1, ..., 1)`` (mode "row") or ``(1, ..., 1)`` (mode "batch"), so autograd,
``torch.compile`` and the layouts are dropout's, and the decisions are
``pybn.dropout_mask(N, p, seed=, offset=)`` (docs/dropout.md, "Stochastic depth").
"""
from typing import List, Optional

from torch import Tensor, nn

from .._checks import flag, scalar_value
from . import ops as _ops
from ._capture import leaf, prepare_scriptable
from .seeded import PinnedSeed, mask_counters, rank_and_world_size

__all__ = ["stochastic_depth", "StochasticDepth", "DropPath"]


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
    p = scalar_value(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: drop probability has to be between 0 and 1, got {p}")
    noise = _noise_shape(input, mode)
    if not flag(training, "training") or p == 0.0:
        return input
    return _ops.dropout_call(input, p, philox, noise)


class StochasticDepth(PinnedSeed, nn.Module):
    """``torchvision.ops.StochasticDepth(p, mode)`` on pybn's masks.

    Without a seed each training call draws one from torch's default CPU generator
    (``torch.manual_seed`` reproduces a run). With ``seed=...`` the module keeps its own
    Philox stream as :class:`pybn.nn.DropPath` does: rank r of `world_size` draws mode
    "row" decisions at ``offset + r * counters_used(N)`` and every rank advances
    ``offset`` by ``world_size * counters_used(N)``; mode "batch" draws the one shared
    decision at ``offset`` on every rank and advances it by 16.
    """

    __prepare_scriptable__ = prepare_scriptable  # torch.jit.script: a TypeError saying what to script instead

    def __init__(self, p: float, mode: str = "row", *, seed: Optional[int] = None, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: drop probability has to be between 0 and 1, got {p}")
        if mode not in ("row", "batch"):
            raise ValueError(f"mode: must be 'row' or 'batch', got {mode!r}")
        self.rank, self.world_size = rank_and_world_size(rank, world_size)
        self.p, self.mode = p, mode
        self.seed = seed

    @leaf
    def forward(self, input: Tensor) -> Tensor:
        noise = _noise_shape(input, self.mode)
        if not self.training or self.p == 0.0:
            return input
        if self._seed is None:
            return stochastic_depth(input, self.p, self.mode, True)
        used = mask_counters(noise[0] if self.mode == "row" else 1)
        rank, stride = (self.rank, self.world_size) if self.mode == "row" else (0, 1)
        return stochastic_depth(input, self.p, self.mode, True, philox=self._take(rank * used, stride * used))

    def extra_repr(self) -> str:
        text = f"p={self.p}, mode={self.mode}"
        return text if self._seed is None else f"{text}, seed={self._seed}"


class DropPath(StochasticDepth):
    """timm's ``DropPath(drop_prob)``: :class:`StochasticDepth` in mode "row"."""

    def __init__(self, drop_prob: float = 0.0, *, seed: Optional[int] = None, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(drop_prob, "row", seed=seed, rank=rank, world_size=world_size)
