"""Argument checks shared by every array function (docs/conventions.md).

Each check raises TypeError (wrong kind or dtype) or ValueError (wrong shape, layout or
value) with a message that starts with the argument's name, and never copies an array
that the caller expects to be updated in place. Arrays whose conversion would lose what
they mean are refused, not converted: numpy masked arrays (pybn does not honour masks)
and torch tensors that require grad (pybn is not recorded by autograd).
"""
from __future__ import annotations

import importlib.util
import math
import numbers
import operator
import sys
from typing import Any

import numpy as np

from . import _C

# bfloat16 is ml_dtypes' NumPy dtype, an optional dependency (docs/dtypes.md). Importing
# ml_dtypes costs several times NumPy's own import, so pybn never imports it to check an
# argument: an array can hold bfloat16 only after something imported ml_dtypes, and the
# checks look for the dtype then. pybn imports it only to make bfloat16 arrays itself (from
# bfloat16 torch tensors or ONNX initializers).
HAS_BFLOAT16 = importlib.util.find_spec("ml_dtypes") is not None
_bfloat16: list[np.dtype | None] = []  # the dtype, once looked up


def bfloat16() -> np.dtype | None:
    """ml_dtypes' bfloat16 dtype, importing ml_dtypes; None when it is not installed."""
    if not _bfloat16:
        try:
            import ml_dtypes
            _bfloat16.append(np.dtype(ml_dtypes.bfloat16))
        except ImportError:
            _bfloat16.append(None)
    return _bfloat16[0]


def _is_bfloat16(dtype: np.dtype) -> bool:
    """dtype is ml_dtypes' bfloat16 (without importing ml_dtypes: no array has it before)."""
    return "ml_dtypes" in sys.modules and dtype == bfloat16()


def finfo(dtype: Any) -> Any:
    """np.finfo of a float dtype, bfloat16 included (NumPy 1.x refuses ml_dtypes' types; ml_dtypes.finfo knows them)."""
    if _is_bfloat16(np.dtype(dtype)):
        import ml_dtypes
        return ml_dtypes.finfo(dtype)  # type: ignore[no-untyped-call]
    return np.finfo(dtype)


#: The names of the dtypes the kernels take (the list the C++ is built from) that arrays can
#: hold here: bfloat16 only when ml_dtypes is installed.
DTYPE_NAMES = tuple(name for name in _C.DTYPES if name != "bfloat16" or HAS_BFLOAT16)
_DTYPE_NAMES = " or ".join(DTYPE_NAMES)
# NumPy's own ones, for the fast path (a byte-swapped '>f4' is not in it)
_NUMPY_FLOAT_DTYPES = frozenset(np.dtype(name) for name in DTYPE_NAMES if name != "bfloat16")


def is_float_dtype(dtype: np.dtype) -> bool:
    """Whether the kernels take arrays of `dtype`."""
    return dtype in _NUMPY_FLOAT_DTYPES or _is_bfloat16(dtype)


def float_dtype(name: str) -> np.dtype | None:
    """The NumPy dtype of one of DTYPE_NAMES (importing ml_dtypes for bfloat16)."""
    return bfloat16() if name == "bfloat16" else np.dtype(name)


_FLOAT32 = np.dtype(np.float32)


def param_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of the per-channel parameters and statistics beside activations of `dtype`:
    float32 for the 16-bit dtypes (as PyTorch's mixed precision), else the dtype itself."""
    return _FLOAT32 if dtype.itemsize == 2 else dtype


def round_to(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 `values` rounded once to `dtype`, to nearest even. NumPy's float64 to float16
    cast rounds once; ml_dtypes releases have rounded float64 to bfloat16 through float32
    (twice), so for bfloat16 the float32 is taken rounded to odd (`float32_rounded_to_odd`),
    after which any release's second rounding is the correct one."""
    values = np.asarray(values, np.float64)
    if not _is_bfloat16(dtype):
        with np.errstate(over="ignore"):
            return values.astype(dtype)
    rounded: np.ndarray = float32_rounded_to_odd(values).astype(dtype)
    return rounded


def float32_rounded_to_odd(values: np.ndarray) -> np.ndarray:
    """float64 `values` rounded to float32 toward zero, the last bit set when inexact (NaN and
    infinities kept). Rounding this once more, to nearest even, to a type of at most 22
    significant bits (float16, bfloat16) gives the correct rounding of `values`: the odd bit
    stands for everything the float32 dropped, so it cannot make a false tie."""
    values = np.asarray(values, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        f = values.astype(np.float32)
        back = f.astype(np.float64)
        inexact = (back != values) & ~np.isnan(values)
        bits = f.view(np.uint32).copy()
        bits[inexact & (np.abs(back) > np.abs(values))] -= 1
        bits[inexact] |= 1
        odd: np.ndarray = bits.view(np.float32)
        return odd


def float_array(value: Any, name: str) -> np.ndarray:
    """`value` as a float32/float64 ndarray (array-likes accepted; no copy when possible)."""
    if type(value) is np.ndarray and value.dtype in _NUMPY_FLOAT_DTYPES:
        return value  # the common case, checked first: small calls are dominated by checks
    arr = as_array(value, name)
    if not is_float_dtype(arr.dtype):
        if arr.dtype.kind == "f" and arr.dtype.newbyteorder("=") in _NUMPY_FLOAT_DTYPES:
            return arr.astype(arr.dtype.newbyteorder("="))  # '>f4' is float32 in the other byte order
        raise TypeError(f"{name}: dtype {arr.dtype} is not supported (pybn takes {_DTYPE_NAMES})")
    return arr


def as_array(value: Any, name: str) -> np.ndarray:
    """np.asarray(value), with NumPy's own conversion errors (a ragged list...) naming `name`."""
    not_silently_converted(value, name)
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: cannot be converted to an array ({e})") from None
    except (RuntimeError, NotImplementedError) as e:  # torch's __array__ (a meta tensor has no data)
        raise TypeError(f"{name}: cannot be converted to an array ({e})") from None


def not_silently_converted(value: Any, name: str) -> None:
    """Refuses the arrays whose conversion would drop what they mean: a masked array's mask
    (NumPy's asarray keeps the data under it) and a torch tensor's autograd graph."""
    if type(value) is np.ndarray:  # the common case, checked first
        return
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{name}: numpy masked arrays are not supported (the mask would be ignored); "
                        f"pass {name}.filled(value) or np.ma.getdata({name}) to say which values to use")
    if getattr(value, "requires_grad", False) is True:
        raise TypeError(f"{name}: a torch tensor that requires grad; pass {name}.detach() "
                        "(pybn's functions are not recorded by autograd)")


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a and b share memory, without np.may_share_memory in the common cases: two
    distinct arrays that each own their memory (flags.owndata: NumPy allocated it for them;
    an array a C extension made over its own pointer has no base yet does not own it)
    cannot overlap, nor can an array that owns its memory and a contiguous one larger than
    it (only a view of it could)."""
    if a is b:
        return True
    a_owns, b_owns = a.flags.owndata, b.flags.owndata
    if a_owns and (b_owns or (b.nbytes > a.nbytes and b.flags.c_contiguous)):
        return False
    if b_owns and a.nbytes > b.nbytes and a.flags.c_contiguous:
        return False
    return np.may_share_memory(a, b)


def written_apart(written: tuple[tuple[str, np.ndarray | None], ...],
                  read: tuple[tuple[str, np.ndarray | None], ...]) -> None:
    """The arrays a kernel updates in place share memory neither with each other nor with
    the arrays it reads (as checked and converted: what the kernel sees)."""
    for i, (name, arr) in enumerate(written):
        if arr is None:
            continue
        for other, o in written[:i]:
            if o is not None and _overlap(arr, o):
                raise ValueError(f"{name}: shares memory with {other} (each is updated in place)")
        for other, o in read:
            if isinstance(o, np.ndarray) and _overlap(arr, o):
                raise ValueError(f"{name}: shares memory with {other} ({name} is updated in place while "
                                 f"{other} is read)")


def contiguous_float_array(value: Any, name: str) -> np.ndarray:
    """`value` as a C-contiguous float32/float64 ndarray whose elements are aligned to their
    size (a copy only when needed: an array viewed at an odd offset of a byte buffer is not)."""
    arr = float_array(value, name)
    flags = arr.flags
    return arr if flags.carray or (flags.c_contiguous and flags.aligned) else np.array(arr, order="C")


_LAYOUTS: dict[tuple[tuple[int, ...], Any], tuple[int, int, int, int]] = {}


def channel_layout(shape: tuple[int, ...], axis: Any, name: str = "x") -> tuple[int, int, int, int]:
    """The canonical view around the channel axis: (axis, outer, C, inner), axis >= 0."""
    if type(axis) is int:  # networks call with a few shapes over and over: remember them
        known = _LAYOUTS.get((shape, axis))
        if known is not None:
            return known
    layout = _channel_layout(shape, axis, name)
    if type(axis) is int:
        if len(_LAYOUTS) >= 1024:
            _LAYOUTS.clear()
        _LAYOUTS[shape, axis] = layout
    return layout


def _channel_layout(shape: tuple[int, ...], axis: Any, name: str) -> tuple[int, int, int, int]:
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"{name}: needs at least 2 dimensions (batch and channels), got shape {shape}")
    if type(axis) is not int:
        axis = integer(axis, "axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis: {axis} is out of range for {name} with {ndim} dimensions")
    axis %= ndim
    return axis, math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def per_channel(value: Any, name: str, channels: int, dtype: np.dtype) -> np.ndarray | None:
    """A read-only per-channel input: shape (C,), converted to `dtype` (None stays None)."""
    if value is None:
        return None
    if type(value) is np.ndarray and value.dtype is dtype and value.shape == (channels,) and value.flags.carray:
        return value  # carray: C-contiguous, aligned (and writeable), one flags lookup
    arr = float_array(value, name)
    if arr.shape != (channels,):
        raise ValueError(f"{name}: expected shape ({channels},) (one value per channel), got {arr.shape}")
    return np.require(arr, dtype=dtype, requirements=["C", "A"])


def updated_array(value: Any, name: str) -> np.ndarray:
    """`value`, which must be an ndarray where an array is updated in place (a copy would take the update)."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: must be a numpy.ndarray (it is updated in place), got {type(value).__name__}")
    return value


def in_place(value: Any, name: str, channels: int, dtype: np.dtype,
             also: np.dtype | None = None) -> np.ndarray | None:
    """An array updated in place: must already be exactly right (of `dtype`, or of `also`
    when given), or the update would be lost."""
    if value is None:
        return None
    arr = updated_array(value, name)
    not_silently_converted(arr, name)
    if arr.dtype != dtype and (also is None or arr.dtype != also):
        want = dtype.name if also is None else f"{dtype.name} or {also.name}"
        raise TypeError(f"{name}: dtype {arr.dtype} is not {want} (the running statistics' dtype for this x); "
                        f"it is updated in place, so pybn will not convert it{_byte_order_hint(arr.dtype, dtype)}")
    if arr.shape != (channels,):
        raise ValueError(f"{name}: expected shape ({channels},) (one value per channel), got {arr.shape}")
    if not arr.flags.carray:
        _not_writable_carray(arr, name, " (it is updated in place)")
    return arr


def _not_writable_carray(arr: np.ndarray, name: str, why: str = "") -> None:
    """Raises the ValueError saying which of C-contiguous, writeable and aligned (numpy's
    flags.carray, checked by the caller) `arr`, an array written to, is not."""
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous{why}")
    if not arr.flags.writeable:
        raise ValueError(f"{name}: is read-only{why}")
    raise ValueError(f"{name}: its elements are not aligned to their size (a view at an odd offset of a byte "
                     f"buffer); pass a copy, e.g. np.array({name}), and copy the result back{why}")


def _byte_order_hint(got: np.dtype, want: np.dtype) -> str:
    return " (it is in non-native byte order)" if got.newbyteorder("=") == want else ""


def integer(value: Any, name: str) -> int:
    """An int argument (NumPy integers too; bool and float are TypeErrors naming it)."""
    if type(value) is int:
        return value
    not_silently_converted(value, name)  # (operator.index reads a masked 0-d array's data)
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: must be an int, got {type(value).__name__}") from None


def flag(value: Any, name: str) -> bool:
    """A bool argument: True/False (or NumPy's), nothing merely truthy."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: must be a bool, got {type(value).__name__}")
    return bool(value)


def scalar_value(value: Any) -> Any:
    """The number a 0-d array or tensor (or a NumPy scalar) holds, as torch's float arguments
    take them (a momentum schedule's ``torch.linspace(0.1, 0.01, epochs)[epoch]``); anything
    else as it is: a Python number, a symbolic float under torch.compile, a tensor needing
    gradients (which torch refuses too) or one without a value (meta), for the checks to judge.
    pybn.torch's modules hand their operators the number: under torch.compile a 0-d tensor is
    a FakeTensor, which no float argument takes."""
    if isinstance(value, (int, float)):  # (first: torch.compile traces no attribute query of a symbolic float)
        return value
    if getattr(value, "ndim", None) == 0 and not getattr(value, "requires_grad", False) and \
            not isinstance(value, np.ma.MaskedArray):  # (item() reads the data under the mask)
        try:
            return value.item()
        except (RuntimeError, ValueError, TypeError):
            return value
    return value


def real_number(value: Any, name: str, *, minimum: float | None = None) -> float:
    """A finite real argument: a Python or NumPy number, or a 0-d array or tensor holding one
    (scalar_value)."""
    if type(value) is float and math.isfinite(value) and (minimum is None or value >= minimum):
        return value
    not_silently_converted(value, name)
    value = scalar_value(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {v}")
    return v


def output(out: Any, like: np.ndarray, inputs: tuple[tuple[str, Any], ...] = (), name: str = "out") -> np.ndarray:
    """The result array, of like's shape and dtype: `out` (the argument `name`) checked, or a
    new one. `out` may be exactly one of the (name, array) `inputs` (in place), but must not
    overlap any of them partially."""
    shape, dtype = like.shape, like.dtype
    if out is None:
        return np.empty_like(like) if like.nbytes < ALIGNED_MIN_BYTES else empty_aligned(shape, dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name}: must be a numpy.ndarray, got {type(out).__name__}")
    not_silently_converted(out, name)
    if out.dtype != dtype:
        raise TypeError(f"{name}: dtype {out.dtype} does not match the result ({dtype})"
                        f"{_byte_order_hint(out.dtype, dtype)}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name}: shape {out.shape} does not match the result {tuple(shape)}")
    if not out.flags.carray:
        _not_writable_carray(out, name)
    owner = out.flags.owndata  # (then _overlap's first rule, inline for the common case: an
    for other, arr in inputs:  # input that owns its memory too cannot overlap it)
        if arr is None or arr is out or (owner and type(arr) is np.ndarray and arr.flags.owndata):
            continue
        if isinstance(arr, np.ndarray) and _overlap(out, arr) and not _same_buffer(out, arr):
            allowed = f"only exact in-place, {name}={other}, is allowed" if arr.shape == out.shape else \
                f"of another shape, {other} may not share memory with {name}"
            raise ValueError(f"{name}: overlaps {other} without being the same array ({allowed})")
    return out


def shares_memory(a: np.ndarray, b: np.ndarray | None) -> bool:
    """Whether two arrays share memory (b may be None)."""
    return b is not None and _overlap(a, b)


def same_shape_array(value: Any, name: str, like: np.ndarray, like_name: str) -> np.ndarray:
    """`value` as a C-contiguous float array of like's shape and dtype. A different float
    dtype is a TypeError, not a conversion: mixing dtypes is more often a mistake than a
    wish, and the conversion would cost a pass over memory the caller did not ask for."""
    arr = contiguous_float_array(value, name)
    if arr.dtype != like.dtype:
        raise TypeError(f"{name}: dtype {arr.dtype} does not match {like_name} ({like.dtype})")
    if arr.shape != like.shape:
        raise ValueError(f"{name}: shape {arr.shape} does not match {like_name} {like.shape}")
    return arr


# The kernels write outputs of _C.stream_min_bytes() or more (never less than
# ALIGNED_MIN_BYTES) with non-temporal stores, which need no unaligned head when the output
# starts on an ALIGNMENT-byte boundary (both decided by the kernels).
ALIGNMENT: int = _C.ALIGNMENT
ALIGNED_MIN_BYTES: int = _C.STREAM_MIN_BYTES


def empty_aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty, but starting on a 64-byte boundary (NumPy only promises 16), so the
    kernels' non-temporal stores need no unaligned head."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.__array_interface__["data"][0] % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _same_buffer(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides)
