"""Bad `out=` arguments shared by the error tests of every array function: (id, array, exception)."""
import numpy as np


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
    ]
    if transposed:
        cases.insert(1, ("transposed-shape", full(shape[::-1], dtype), ValueError))
    return cases
