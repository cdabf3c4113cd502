#!/usr/bin/env bash
# The oldest NumPy pybn declares (numpy>=1.22: NumPy 1.x, before NEP 50's promotion rules,
# and an ml_dtypes whose bfloat16 np.finfo refuses): a virtual environment with NumPy 1.26
# and ml_dtypes 0.5, pybn built and installed into it from this checkout, then the kernel
# tests (tools/kernel_tests.sh) and a bench run that checks every result.
#
#   tools/numpy1_test.sh [PYTHON]      (default: python; 3.9 to 3.12, which NumPy 1.26 supports)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${1:-python}"
venv="$(mktemp -d)/numpy1"
trap 'rm -rf "$(dirname "$venv")"' EXIT
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "numpy>=1.26,<2" "ml_dtypes>=0.5,<0.6" pytest hypothesis threadpoolctl
"$venv/bin/python" -m pip install --quiet "$root"
"$venv/bin/python" -c 'import numpy; assert numpy.__version__ < "2", numpy.__version__'
"$root/tools/kernel_tests.sh" "$venv/bin/python" -- -q
# the bench's result checks over every dtype (bfloat16's tolerance read with np.finfo failed here)
(cd "$(dirname "$venv")" && "$venv/bin/python" -m pybn bench --quick --shapes T --peers numpy >/dev/null)
echo "numpy1_test: NumPy 1.x passed"
