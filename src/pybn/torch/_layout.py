"""How tensors reach pybn's kernels: zero-copy NumPy views in one of the two fast layouts.

A tensor whose dim 1 (the channels) is its innermost dense dimension (``channels_last``,
``channels_last_3d``, or for dropout an (N, L, C) tensor transposed to (N, C, L)) goes to
the kernels as that physical array with ``axis=-1``; a contiguous tensor as itself with ``axis=1``;
any other layout is made contiguous once. Results are allocated in the layout used, those
of 4 MiB or more advised for transparent huge pages as NumPy advises its own arrays
(docs/pytorch.md, "Memory allocator").
"""
import functools
import inspect
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import torch
from torch import Tensor

from .. import _C
from .._checks import HAS_BFLOAT16, bfloat16

PYBN_DTYPES = (torch.float32, torch.float64)
# 16-bit dtypes the kernels take too (float32 parameters beside them, docs/dtypes.md):
# bfloat16 when ml_dtypes gives NumPy a dtype to view it as.
HALF_DTYPES = (torch.float16,) + ((torch.bfloat16,) if HAS_BFLOAT16 else ())


# torch's memory formats that put dim 1 innermost, by tensor rank. For these ranks
# x.is_contiguous(memory_format=...) is x.movedim(1, -1).is_contiguous(): both walk the
# dims from the innermost of that order, sizes of 1 skipped, each stride the product of the
# sizes inside it; it costs a tenth of the movedim (a few us a call, several calls a layer).
_LAST_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


_functorch = torch._C._functorch
# whether a tensor is one of torch.func's wrappers (a transform's view of a tensor)
is_wrapped: Callable[[Tensor], bool] = _functorch.is_functorch_wrapped_tensor


def _one_sample(x: Tensor) -> Tensor:
    """x without torch.func's wrappers: under vmap, the memory of one sample (functorch
    answers no layout query of a batched tensor but the contiguous one)."""
    while is_wrapped(x):
        bdim = _functorch.maybe_get_bdim(x) if _functorch.is_batchedtensor(x) else None
        x = _functorch.get_unwrapped(x)
        if bdim is not None and bdim >= 0:
            x = x.select(bdim, 0)
    return x


def channels_last_physical(x: Tensor) -> bool:
    """Dim 1 of x is its innermost dense dimension and x is not plain contiguous (under
    vmap: in each sample's memory)."""
    if x.dim() <= 2 or x.is_contiguous():
        return False
    if is_wrapped(x):  # (after the common case: a call per query costs)
        x = _one_sample(x)
        if x.dim() <= 2 or x.is_contiguous():
            return False
    memory_format = _LAST_FORMATS.get(x.dim())
    if memory_format is not None:
        return x.is_contiguous(memory_format=memory_format)
    return x.movedim(1, -1).is_contiguous()


def batch_norm_last(x: Tensor) -> bool:
    """Whether batch norm takes x channels-last: where torch's batch norm returns that layout,
    the channels-last memory formats of 4-D and 5-D tensors, slices of them included (copied
    once into the format). A 3-D (N, C, L) view of an (N, L, C) tensor is made contiguous once
    and normalized so, as torch's result is contiguous there (code after a BatchNorm1d may
    ``view`` it). Dropout keeps every layout."""
    if x.dim() not in _LAST_FORMATS or x.is_contiguous():  # (the common case, asked first)
        return False
    if channels_last_physical(x):
        return True
    return not is_wrapped(x) and _strides_read_as_channels_last(x)  # (a copy either way: into the layout torch gives)


def _strides_read_as_channels_last(x: Tensor) -> bool:
    """How torch reads a 4-D or 5-D tensor's strides as channels-last (its memory-format
    suggestion, which its batch norm's result follows): walking C, then the spatial dims
    from the last, then N, each stride is at least the extent of those walked before it;
    an empty dim or a C stride of 0 is not, nor an N whose stride equals C's (a layout of
    sizes 1 that torch reads as contiguous)."""
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return False
    extent = 0
    for d in (1, *range(x.dim() - 1, 1, -1), 0):
        if sizes[d] == 0 or strides[d] < extent or (d == 0 and extent == strides[1]):
            return False
        extent = strides[d] * max(sizes[d], 1)
    return True


def pybn_takes(x: Tensor) -> bool:
    """Whether pybn's kernels take x directly (a CPU tensor of float32, float64, float16 or
    bfloat16)."""
    return x.device.type == "cpu" and (x.dtype in PYBN_DTYPES or x.dtype in HALF_DTYPES)


def numpy_view(t: Tensor) -> np.ndarray:
    """The NumPy view of a contiguous CPU tensor; a bfloat16 one (which Tensor.numpy
    refuses) viewed through int16 as ml_dtypes' bfloat16, with no copy either."""
    if t.dtype == torch.bfloat16:
        dtype = bfloat16()  # (imports ml_dtypes the first time)
        assert dtype is not None  # (pybn_takes gives bfloat16 tensors only with ml_dtypes)
        return t.view(torch.int16).numpy().view(dtype)
    return t.numpy()


def array(t: Tensor, last: bool) -> np.ndarray:
    """A NumPy view of t with the channels on axis -1 (`last`) or 1, copied (by NumPy) only
    when t has another layout. (The axes move in NumPy: a transpose there costs a fraction
    of torch's movedim.)"""
    a = numpy_view(t.detach())
    if last:
        a = a.transpose((0, *range(2, a.ndim), 1))
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def per_channel(t: Optional[Tensor]) -> Optional[np.ndarray]:
    return None if t is None else array(t, False)


# NumPy's threshold for the same advice, and its switch (on where the kernel has
# transparent huge pages; numpy._core.multiarray._set_madvise_hugepage turns it off), which
# turns pybn's off too. (Private to NumPy: where it is missing the advice stays on.)
HUGE_PAGE_MIN_BYTES = 1 << 22
_numpy_advises = getattr((np._core if hasattr(np, "_core") else np.core).multiarray,
                         "_get_madvise_hugepage", lambda: True)


def empty(x: Tensor, last: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialized tensor of x's shape, channels-last physically when `last`.

    A large one is advised for huge pages before its first write: torch's allocator maps
    such tensors afresh on every call, and their first writes would otherwise take one page
    fault per 4 KiB (csrc/include/pybn/huge_pages.h)."""
    dtype = x.dtype if dtype is None else dtype
    memory_format = _LAST_FORMATS.get(x.dim()) if last else torch.contiguous_format
    if memory_format is not None:  # (for channels last, the strides of the movedim below, from one call)
        t = torch.empty_like(x, dtype=dtype, memory_format=memory_format)
    else:
        t = x.new_empty(x.movedim(1, -1).shape, dtype=dtype).movedim(-1, 1)
    # (type(t) is Tensor: not the fake tensors of torch.compile's tracing, which own no memory)
    # (and checked first: a fake tensor's nbytes raises when its sizes are symbolic)
    if type(t) is Tensor and t.device.type == "cpu" and t.nbytes >= HUGE_PAGE_MIN_BYTES and _numpy_advises():
        _C.advise_huge_pages(array(t, last))
    return t


def in_layout(t: Tensor, last: bool) -> Tensor:
    """t itself if it has the layout, else a copy that has it (under vmap, in each sample's
    memory: made by views and contiguous, which functorch batches)."""
    ok = channels_last_physical(t) if last else t.is_contiguous()
    if ok:
        return t
    if is_wrapped(t):
        return t.movedim(1, -1).contiguous().movedim(-1, 1) if last else t.contiguous()
    return empty(t, last).copy_(t)


_Fake = TypeVar("_Fake", bound=Callable[..., Any])


def no_real_from_meta(fake: _Fake) -> _Fake:
    """A fake implementation that refuses a real first tensor (x, or dy) beside a meta one. The
    fake runs for FakeTensors (tracing) and whenever one argument is a meta tensor: its results
    follow the first tensor, so beside a real one they would be real tensors left
    uninitialized (and running statistics not updated). All meta (shapes only), or a meta x
    beside real counters, is fine."""
    names = [n for n, p in inspect.signature(fake).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]

    @functools.wraps(fake)
    def checked(*args: Any, **kwargs: Any) -> Any:
        named = [*zip(names + [f"argument {i}" for i in range(len(names), len(args))], args), *kwargs.items()]
        tensors = [(n, a) for n, a in named if isinstance(a, Tensor)]
        if tensors and tensors[0][1].device.type != "meta":
            meta = next((n for n, t in tensors if t.device.type == "meta"), None)
            if meta is not None:
                first, t = tensors[0]
                raise ValueError(f"{meta}: a meta tensor (shapes without values) beside {first} on {t.device}: "
                                 f"give every tensor on one device")
        return fake(*args, **kwargs)

    return checked  # type: ignore[return-value]
