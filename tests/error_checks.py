"""Shared by the error tests of every array function: the check that an error names its
argument, and the bad `out=` arguments (id, array, exception)."""
import re

import numpy as np
import pytest


def misaligned(values):
    """A writeable C-contiguous copy of `values` one byte past an allocation: its elements
    are not aligned to their size (NumPy's flags.aligned is False)."""
    buf = np.empty(values.nbytes + 1, np.uint8)
    arr = buf[1:].view(values.dtype).reshape(values.shape)
    arr[...] = values
    assert not arr.flags.aligned and arr.flags.c_contiguous and arr.flags.writeable
    return arr


def bad_outs(shape, dtype, transposed=True):
    def full(shp, dt):
        return np.full(shp, 7, dt)

    ro = full(shape, dtype)
    ro.flags.writeable = False
    big = full(shape[:-1] + (2 * shape[-1],), dtype)
    cases = [
        ("wrong-shape", full(shape[:-1] + (shape[-1] + 1,), dtype), ValueError),
        ("flat", full(int(np.prod(shape)), dtype), ValueError),
        ("wrong-dtype", full(shape, np.float64 if dtype == np.float32
                                 else np.float32), TypeError),
        ("int-dtype", full(shape, np.int32), TypeError),
        ("non-contiguous", big[..., ::2], ValueError),
        ("fortran", np.asfortranarray(full(shape, dtype)), ValueError),
        ("read-only", ro, ValueError),
        ("list", np.zeros(shape, dtype).tolist(), TypeError),
        ("misaligned", misaligned(np.full(shape, 7, dtype)), ValueError),
    ]
    if transposed:
        cases.insert(1, ("transposed-shape", full(shape[::-1], dtype), ValueError))
    return cases


def name_re(name):
    # the argument's name as a word ("x" must not match "expected")
    return re.compile(r"(?<![A-Za-z0-9_])" + re.escape(name) + r"(?![A-Za-z0-9_])")


def assert_raises_naming(exc, name, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` raises `exc` (a class or tuple of classes) whose
    message names `name` (or one of a tuple of names)."""
    names = (name,) if isinstance(name, str) else name
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert any(name_re(n).search(msg) for n in names), \
        f"{' or '.join(map(repr, names))} not named in: {msg!r}"
    return msg
