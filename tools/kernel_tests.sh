#!/usr/bin/env bash
# The kernel tests that need only NumPy and pytest, against the pybn that PYTHON imports:
# what a wheel is checked with (tools/build_wheels.sh, cibuildwheel's test-command) and
# what runs under QEMU (tools/aarch64_test.sh).
#
#   tools/kernel_tests.sh PYTHON... [-- PYTEST-ARGS...]
#
# PYTHON may be a command with arguments (qemu-aarch64 -L SYSROOT SYSROOT/usr/bin/python3.11).
# The selection is by file: these modules import nothing but NumPy, pytest and pybn at the
# top, and their few tests that compare with torch (or need threadpoolctl) skip, with the
# reason, where it is not installed. The test modules that import torch at the top
# (test_batchnorm.py, test_fold.py, ...) are left out: they need the test extra.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do python+=("$1"); shift; done
[ $# -gt 0 ] && shift
[ ${#python[@]} -gt 0 ] || { echo "usage: $0 PYTHON... [-- PYTEST-ARGS...]" >&2; exit 2; }

KERNEL_TESTS=(
  tests/test_tails.py          # every kernel, lengths 1..67 at every alignment, vs float64 NumPy
  tests/test_philox.py         # the dropout streams vs the Philox reference
  tests/test_dropout_api.py    # dropout, masks and their reference bits
  tests/test_relu_dropout.py   # dropout(relu(x)) and its gradient from the output
  tests/test_errors.py         # bad input: the argument's name in the message
  tests/test_runtime.py        # ISA choice, PYBN_ISA, threads
  tests/test_threadpoolctl.py  # threadpoolctl's view of pybn's pool
  tests/test_half_conversions.py  # 16-bit loads and stores bit for bit (ml_dtypes' bfloat16)
  tests/test_memory_order.py   # batch norm on transposed and channels-last views, without a copy
  tests/test_scratch.py        # the kernels' scratch kept between calls
)

# From the repository root, so that pytest reads pyproject.toml's settings (markers, warnings
# as errors); the src layout keeps the source tree off sys.path: the installed pybn is tested.
cd "$root"
exec "${python[@]}" -m pytest -p no:cacheprovider "${KERNEL_TESTS[@]}" "$@"
