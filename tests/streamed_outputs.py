"""Shared by the tests of outputs past the streaming threshold (test_streamed_rows.py,
test_streamed_16bit.py): the threshold of this machine, array sizes past it, outputs at an
element offset of their buffer, and bit views for exact comparisons."""
import numpy as np

import pybn

STREAM_BYTES = pybn._C.stream_min_bytes()   # this machine's threshold (a quarter of its L3, or 4 MiB)
OFFSETS = [0, 1, 3]


def streamed_batch(sample):
    """Samples of this shape that make a 16-bit output past the streaming threshold."""
    return STREAM_BYTES // (int(np.prod(sample)) * 2) + 1


def out_at(offset, shape, dtype):
    """An output array starting `offset` elements into its buffer."""
    n = int(np.prod(shape))
    return np.empty(n + offset, dtype)[offset:].reshape(shape)


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint16 if a.itemsize == 2 else np.uint32)
