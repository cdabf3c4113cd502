"""Dropout masks and outputs as bytes, to compare across machines bit for bit.

    python tools/dropout_bits.py write FILE.npz     # on one machine (aarch64 under QEMU)
    python tools/dropout_bits.py compare FILE.npz   # on another (x86-64): every kernel path here

Every case is computed on every kernel path the running pybn supports; the paths must agree
with each other, and `compare` requires them to equal the file's bytes. Inputs are exact
small multiples of 1/8 (no libm call), so they are the same on every machine; for the 16-bit
dtypes also every bit pattern (each value's rounding of x * scale, infinities and NaNs).
bfloat16 needs ml_dtypes on both machines.
"""
from __future__ import annotations

import sys

import numpy as np

import pybn
import pybn._runtime

try:
    import ml_dtypes
    BITS16 = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
except ImportError:
    BITS16 = [np.dtype(np.float16)]

U64 = 2**64 - 1
MASK_CASES = [  # (n, p, seed, offset): tails, a long stream, extreme and wrapping counters
    (1, 0.5, 0, 0), (7, 0.1, 1, 3), (100, 0.9, 42, 5), (4099, 0.5, U64, 0),
    (4099, 0.3, 0x0123_4567_89AB_CDEF, U64 - 7), ((1 << 20) + 13, 0.5, 7, 2**32 - 3),
]
DROPOUT_CASES = [  # (shape, noise_shape, p, seed, offset)
    ((3, 5, 7, 11), None, 0.2, 1234, 0), ((2, 64, 33), (2, 64, 1), 0.5, U64, 17),
    (((1 << 16) + 5,), None, 0.7, 99, U64 - 100),
]


def exact_input(shape, dtype):
    n = int(np.prod(shape))
    return ((np.arange(n) % 251 - 125) / 8).astype(dtype).reshape(shape)


def compute() -> dict[str, np.ndarray]:
    out = {}
    for i, (n, p, seed, offset) in enumerate(MASK_CASES):
        out[f"mask{i}"] = pybn.dropout_mask(n, p, seed=seed, offset=offset)
    for i, (shape, noise, p, seed, offset) in enumerate(DROPOUT_CASES):
        for dtype in [np.dtype(np.float32), np.dtype(np.float64), *BITS16]:
            x = exact_input(shape, dtype)
            y = pybn.dropout(x, p, seed=seed, offset=offset, noise_shape=noise)
            out[f"dropout{i}_{dtype.name}"] = y.view(np.uint8).reshape(-1)
    every_pattern = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    for dtype in BITS16:
        for p in (0.3, 0.7):
            y = pybn.dropout(every_pattern.view(dtype), p, seed=3, offset=11)
            out[f"dropout_every16_{p}_{dtype.name}"] = y.view(np.uint8)
    return out


def on_every_path() -> dict[str, np.ndarray]:
    """The cases on each supported path; they must agree bit for bit."""
    results = {}
    for isa in pybn.supported_isas():
        with pybn._runtime.use_isa(isa):
            results[isa] = compute()
    first, *others = results
    for isa in others:
        for key, value in results[first].items():
            if not np.array_equal(value, results[isa][key]):
                sys.exit(f"dropout_bits: {key} differs between the {first} and {isa} paths")
    print(f"dropout_bits: {len(results[first])} cases agree on {', '.join(results)} "
          f"({sum(v.size for v in results[first].values())} bytes)")
    return results[first]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("write", "compare"):
        print(__doc__, file=sys.stderr)
        return 2
    mine = on_every_path()
    if argv[0] == "write":
        np.savez(argv[1], **mine)
        return 0
    with np.load(argv[1]) as theirs:
        if sorted(theirs.files) != sorted(mine):
            sys.exit(f"dropout_bits: the file has cases {sorted(theirs.files)}, expected {sorted(mine)}")
        differ = [key for key in mine if not np.array_equal(mine[key], theirs[key])]
    if differ:
        sys.exit(f"dropout_bits: differ from {argv[1]}: {', '.join(differ)}")
    print(f"dropout_bits: all {len(mine)} cases bitwise identical to {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
