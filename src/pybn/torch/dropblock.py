"""DropBlock for PyTorch models on pybn's masks: the ``torch.ops.pybn.drop_block`` operator,
``drop_block_2d`` and the ``DropBlock2d`` module (timm's semantics, docs/dropout.md "DropBlock").

``drop_block(x, p, block_size, philox?, gamma_scale, couple_channels, batchwise, scale_by_keep)
-> (y, philox_used)`` is :func:`pybn.drop_block` on an (N, C, H, W) tensor; ``philox`` as for
``torch.ops.pybn.dropout`` (an int64 ``[seed, offset]``, None: a seed from torch's default
CPU generator). The mask is drawn over the (N, C, H, W) order, so contiguous and
channels-last tensors get the same mask, and both reach the kernels without a copy. Its
backward is the same operator on the gradient (the same mask and scale), so it is
differentiable again.
"""
from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

import pybn

from .._checks import flag
from . import _regenerated
from ._eager import direct_call
from ._capture import leaf, prepare_scriptable
from ._transforms import operator, register_autograd
from ._layout import channels_last_physical, empty, in_layout, no_real_from_meta, pybn_takes
from ._regenerated import Regenerated
from .seeded import PinnedSeed, mask_counters, rank_and_world_size
from .ops import RANDOM, _float_cpu_copy, counters, in_form_of, philox_used

__all__ = ["drop_block_2d", "DropBlock2d"]


def _kernels(p: float, block_size: int, gamma_scale: float, couple_channels: bool, batchwise: bool,
             scale_by_keep: bool) -> Regenerated:
    def kernel(a: Any, seed: int, offset: int, out: Any, last: bool) -> Any:
        return pybn.drop_block(a, p, block_size=block_size, seed=seed, offset=offset, gamma_scale=gamma_scale,
                               couple_channels=couple_channels, batchwise=batchwise, scale_by_keep=scale_by_keep,
                               axis=-1 if last else 1, out=out)

    def operator(dy: Tensor, philox: Tensor) -> Tensor:
        dx: Tensor = torch.ops.pybn.drop_block(dy, p, block_size, philox, gamma_scale, couple_channels, batchwise,
                                               scale_by_keep)[0]
        return dx

    # the gradient: the same mask and scale on dy, the same operator
    return Regenerated(kernel, kernel, operator)


def _four_dims(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x: DropBlock needs a 4-d (N, C, H, W) tensor, got {x.dim()} dimensions")


@torch.library.custom_op("pybn::drop_block", mutates_args=(), **RANDOM)
def drop_block(x: Tensor, p: float, block_size: int, philox: Optional[Tensor], gamma_scale: float,
               couple_channels: bool, batchwise: bool, scale_by_keep: bool) -> Tuple[Tensor, Tensor]:
    """DropBlock with pybn's mask of (seed, offset) (see the module docstring)."""
    _four_dims(x)
    used = philox_used(philox)
    src = x if pybn_takes(x) else _float_cpu_copy(x)
    kernel = _kernels(p, block_size, gamma_scale, couple_channels, batchwise, scale_by_keep).forward
    y = _regenerated.run(kernel, src, counters(used), channels_last_physical(src))
    return in_form_of(x, src, y), used


@drop_block.register_fake
@no_real_from_meta
def _(x: Tensor, p: float, block_size: int, philox: Optional[Tensor], gamma_scale: float, couple_channels: bool,
      batchwise: bool, scale_by_keep: bool) -> Tuple[Tensor, Tensor]:
    return empty(x, channels_last_physical(x)), torch.empty(2, dtype=torch.int64)


def _setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
    ctx.args = inputs[1:3] + inputs[4:]
    ctx.last = channels_last_physical(inputs[0])
    ctx.save_for_backward(output[1])


def _backward(ctx: Any, dy: Tensor, _dused: Tensor) -> Tuple[Optional[Tensor], ...]:
    (used,) = ctx.saved_tensors
    p, block_size, gamma_scale, couple, batchwise, scale_by_keep = ctx.args
    dx, _ = operator(drop_block)(in_layout(dy, ctx.last), p, block_size, used, gamma_scale, couple, batchwise,
                                 scale_by_keep)
    return dx, None, None, None, None, None, None, None


register_autograd(drop_block, _backward, _setup, philox_at=3)


def _refuse_timm_options(with_noise: bool, inplace: bool) -> None:
    if flag(with_noise, "with_noise"):
        raise ValueError("with_noise: timm's Gaussian noise in the dropped blocks is not supported by pybn")
    if flag(inplace, "inplace"):
        raise ValueError("inplace: pybn's DropBlock writes a new tensor (autograd regenerates the mask)")


def drop_block_2d(x: Tensor, drop_prob: float = 0.1, block_size: int = 7, gamma_scale: float = 1.0,
                  with_noise: bool = False, inplace: bool = False, couple_channels: bool = True,
                  scale_by_keep: bool = True, *, batchwise: bool = False, philox: Optional[Tensor] = None) -> Tensor:
    """timm's ``drop_block_2d`` (training mode) with pybn's masks, its arguments in timm's
    order; ``philox`` as in ``torch.ops.pybn.drop_block``. timm's ``with_noise=True`` and
    ``inplace=True`` are refused (ValueError), as :class:`DropBlock2d` refuses them."""
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob: must be in [0, 1], got {drop_prob}")
    _refuse_timm_options(with_noise, inplace)
    args = (drop_prob, block_size, gamma_scale, couple_channels, batchwise, scale_by_keep)
    if direct_call(x, philox) and pybn_takes(x):
        _four_dims(x)
        return _regenerated.call(_kernels(*args), x, philox)
    y: Tensor = operator(drop_block)(x, drop_prob, block_size, philox, *args[2:])[0]
    return y


class DropBlock2d(PinnedSeed, nn.Module):
    """timm's ``DropBlock2d(drop_prob, block_size, gamma_scale, ..., couple_channels,
    scale_by_keep)`` on pybn's masks; the identity in evaluation mode or for drop_prob 0.

    Without a seed each training call draws one from torch's default CPU generator. With
    ``seed=...`` the module keeps its own Philox stream as :class:`pybn.nn.DropBlock2d`:
    rank r of `world_size` draws at ``offset + r * counters_used(m)`` (m seed elements)
    and every rank advances ``offset`` by ``world_size * counters_used(m)``; with
    ``batchwise=True`` every rank draws the one shared mask at ``offset``.
    timm's ``with_noise=True`` and ``inplace=True`` are refused (ValueError).
    """

    __prepare_scriptable__ = prepare_scriptable  # torch.jit.script: a TypeError saying what to script instead

    def __init__(self, drop_prob: float = 0.1, block_size: int = 7, gamma_scale: float = 1.0,
                 with_noise: bool = False, inplace: bool = False, couple_channels: bool = True,
                 scale_by_keep: bool = True, *, batchwise: bool = False, seed: Optional[int] = None,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob: must be in [0, 1], got {drop_prob}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: must be an int >= 1, got {block_size!r}")
        _refuse_timm_options(with_noise, inplace)
        self.drop_prob, self.block_size, self.gamma_scale = drop_prob, block_size, gamma_scale
        self.couple_channels, self.scale_by_keep, self.batchwise = couple_channels, scale_by_keep, batchwise
        self.rank, self.world_size = rank_and_world_size(rank, world_size)
        self.seed = seed

    @leaf
    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        options: dict[str, Any] = dict(gamma_scale=self.gamma_scale, couple_channels=self.couple_channels,
                                       scale_by_keep=self.scale_by_keep, batchwise=self.batchwise)
        if self._seed is None:
            return drop_block_2d(x, self.drop_prob, self.block_size, **options)
        _four_dims(x)
        n, c, h, w = x.shape  # (pybn.dropblock.drop_block_noise_shape, on sizes compile may keep symbolic)
        used = mask_counters((1 if self.batchwise else n) * (1 if self.couple_channels else c) * h * w)
        rank, stride = (0, 1) if self.batchwise else (self.rank, self.world_size)
        return drop_block_2d(x, self.drop_prob, self.block_size, **options,
                             philox=self._take(rank * used, stride * used))

    def extra_repr(self) -> str:
        text = (f"drop_prob={self.drop_prob}, block_size={self.block_size}, gamma_scale={self.gamma_scale}, "
                f"couple_channels={self.couple_channels}, scale_by_keep={self.scale_by_keep}, "
                f"batchwise={self.batchwise}")
        return text if self._seed is None else f"{text}, seed={self._seed}"
