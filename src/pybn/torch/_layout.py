"""How tensors reach pybn's kernels: zero-copy NumPy views in one of the two fast layouts.

A tensor whose dim 1 (the channels) is its innermost dense dimension (``channels_last``,
``channels_last_3d``, or an (N, L, C) tensor transposed to (N, C, L)) goes to the kernels
as that physical array with ``axis=-1``; a contiguous tensor as itself with ``axis=1``;
any other layout is made contiguous once. Results are allocated in the layout used.
"""
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .._checks import BFLOAT16

PYBN_DTYPES = (torch.float32, torch.float64)
# 16-bit dtypes the kernels take too (float32 parameters beside them, docs/dtypes.md):
# bfloat16 when ml_dtypes gives NumPy a dtype to view it as.
HALF_DTYPES = (torch.float16,) + ((torch.bfloat16,) if BFLOAT16 is not None else ())


def channels_last_physical(x: Tensor) -> bool:
    """Dim 1 of x is its innermost dense dimension and x is not plain contiguous."""
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def pybn_takes(x: Tensor) -> bool:
    """Whether pybn's kernels take x directly (a CPU tensor of float32, float64, float16 or
    bfloat16)."""
    return x.device.type == "cpu" and (x.dtype in PYBN_DTYPES or x.dtype in HALF_DTYPES)


def _numpy(t: Tensor) -> np.ndarray:
    """The NumPy view of a contiguous CPU tensor; a bfloat16 one (which Tensor.numpy
    refuses) viewed through int16 as ml_dtypes' bfloat16, with no copy either."""
    if t.dtype == torch.bfloat16:
        assert BFLOAT16 is not None  # (pybn_takes gives bfloat16 tensors only with ml_dtypes)
        return t.view(torch.int16).numpy().view(BFLOAT16)
    return t.numpy()


def array(t: Tensor, last: bool) -> np.ndarray:
    """A NumPy view of t with the channels on axis -1 (`last`) or 1, copied only when t
    has another layout."""
    if last:
        t = t.movedim(1, -1)
    return _numpy(t.detach().contiguous())


def per_channel(t: Optional[Tensor]) -> Optional[np.ndarray]:
    return None if t is None else _numpy(t.detach().contiguous())


def empty(x: Tensor, last: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialized tensor of x's shape, channels-last physically when `last`."""
    dtype = x.dtype if dtype is None else dtype
    if last:
        return x.new_empty(x.movedim(1, -1).shape, dtype=dtype).movedim(-1, 1)
    return x.new_empty(x.shape, dtype=dtype)


def in_layout(t: Tensor, last: bool) -> Tensor:
    """t itself if it has the layout, else a copy that has it."""
    ok = channels_last_physical(t) if last else t.is_contiguous()
    return t if ok else empty(t, last).copy_(t)
