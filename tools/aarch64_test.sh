#!/usr/bin/env bash
# pybn on aarch64, emulated, end to end on an x86-64 Debian/Ubuntu machine:
#   1. Debian's cross compiler (g++-aarch64-linux-gnu) and qemu-user, installed if missing;
#   2. an aarch64 sysroot: Debian bookworm's arm64 python3.11 (with its dependencies) and
#      libpython3.11-dev, downloaded with a private apt configuration (the host's dpkg and
#      apt sources are left alone) and unpacked; NumPy's aarch64 wheel and pytest beside it;
#   3. the pybn wheel cross-compiled for aarch64 (scikit-build-core with
#      tools/aarch64-linux-gnu.cmake; CMake >= 4.1 runs the target's Python under QEMU),
#      and installed for the target;
#   4. under qemu-aarch64: `python -m pybn info`, the kernel tests (tools/kernel_tests.sh)
#      on every path the wheel has (neon and scalar, the tests' `isa` fixture), and the
#      dropout masks and outputs written for step 5;
#   5. on the host: the same masks and outputs on every x86 kernel path, compared bit for bit
#      (needs pybn installed for the host's Python; skipped, saying so, otherwise).
# Downloads and the sysroot are kept in build/aarch64 (delete it to start over). About 17
# minutes of CPU time (52 of wall-clock time on 2 cores shared with other jobs), nearly all
# of it the emulated tests (each test that starts a child Python pays seconds of emulated
# start-up): .ci/run runs it only when asked
# (PYBN_CI_AARCH64=1).
#   PYTHON=python3.11 tools/aarch64_test.sh    # the host Python (default python3)
#   tools/aarch64_test.sh tests/test_philox.py  # these test files (pytest arguments) instead
#                                               # of the kernel tests, then steps 4-5 as above
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-python3}
work=$root/build/aarch64
sysroot=$work/sysroot
site=$work/site      # NumPy and pytest for aarch64
pkg=$work/pkg        # the cross-compiled pybn, installed for aarch64
mkdir -p "$work"
step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

step "host tools: cross compiler and qemu-user"
need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

step "aarch64 sysroot: bookworm's arm64 python3.11 and libpython3.11-dev"
if [ ! -x "$sysroot/usr/bin/python3.11" ]; then
  apt_root=$work/apt
  rm -rf "$apt_root" "$sysroot" && mkdir -p "$apt_root"/{lists/partial,cache/archives/partial,parts,debs} "$sysroot"
  : > "$apt_root/status"
  for suite in bookworm bookworm-updates; do
    echo "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main"
  done > "$apt_root/sources.list"
  echo "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main" \
    >> "$apt_root/sources.list"
  apt_opts=(-o "Dir::Etc::SourceList=$apt_root/sources.list" -o "Dir::Etc::SourceParts=$apt_root/parts"
            -o "Dir::State::Lists=$apt_root/lists" -o "Dir::Cache=$apt_root/cache"
            -o "Dir::State::status=$apt_root/status" -o "Debug::NoLocking=1"
            -o "APT::Architecture=arm64" -o "APT::Architectures::=arm64")
  apt-get "${apt_opts[@]}" update -qq
  # python3.11 and everything it depends on (libc6, libstdc++6 for pybn, ...); the headers alone
  mapfile -t packages < <(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
    --no-conflicts --no-breaks --no-replaces --no-enhances python3.11 libstdc++6 | grep -v '^ ' | grep -v '^<' | sort -u)
  (cd "$apt_root/debs" && apt-get "${apt_opts[@]}" download "${packages[@]}" libpython3.11-dev 2>&1 \
    | grep -v "unsandboxed" || true)
  for deb in "$apt_root"/debs/*.deb; do dpkg-deb -x "$deb" "$sysroot"; done
fi
# The target's python as a host command. The tests start child processes with sys.executable:
# qemu's -0 makes that this wrapper (Python takes sys.executable from argv[0]), so the
# children run under QEMU too, without registering QEMU with the kernel (binfmt_misc).
# The wrapper lies in the sysroot's bin, where Python finds its standard library from it.
printf '#!/bin/sh\nexec qemu-aarch64 -L "%s" -0 "$0" "%s/usr/bin/python3.11" "$@"\n' "$sysroot" "$sysroot" \
  > "$sysroot/usr/bin/python3.11-qemu"
chmod +x "$sysroot/usr/bin/python3.11-qemu"
target_python=("$sysroot/usr/bin/python3.11-qemu")
"${target_python[@]}" -c 'import platform, sys; print("target:", platform.machine(), sys.version.split()[0])'

target_pip=(--platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --abi cp311 --only-binary=:all:)
step "NumPy's aarch64 wheel, pytest, threadpoolctl and ml_dtypes (bfloat16) for the target"
if [ ! -f "$site/threadpoolctl.py" ] || [ ! -d "$site/ml_dtypes" ]; then
  rm -rf "$site"
  "$python" -m pip install --quiet --target "$site" "${target_pip[@]}" "numpy>=1.22" pytest threadpoolctl ml_dtypes
fi

step "build tools: scikit-build-core, pybind11, CMake >= 4.1, ninja, auditwheel"
if [ ! -x "$work/tools/bin/auditwheel" ]; then
  "$python" -m venv "$work/tools"
  "$work/tools/bin/python" -m pip install --quiet scikit-build-core pybind11 "cmake>=4.1" ninja auditwheel
fi

step "cross-compile the wheel for aarch64"
rm -rf "$work/dist" "$pkg"
ext_suffix=$("${target_python[@]}" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
# scikit-build-core describes the host's Python to CMake; these name the target's instead
# (_PYTHON_HOST_PLATFORM: the wheel's platform tag; SETUPTOOLS_EXT_SUFFIX: the module's suffix).
PATH="$work/tools/bin:$PATH" PYBN_AARCH64_SYSROOT=$sysroot _PYTHON_HOST_PLATFORM=linux-aarch64 \
  SETUPTOOLS_EXT_SUFFIX=$ext_suffix \
  "$work/tools/bin/python" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$work/dist" \
  -Cbuild-dir="$work/cmake" -Ccmake.define.CMAKE_TOOLCHAIN_FILE="$root/tools/aarch64-linux-gnu.cmake" \
  -Ccmake.define.CMAKE_POLICY_DEFAULT_CMP0190=NEW \
  -Ccmake.define.Python_EXECUTABLE="$sysroot/usr/bin/python3.11" \
  -Ccmake.define.Python_INCLUDE_DIR="$sysroot/usr/include/python3.11" .
wheel=$(ls "$work"/dist/*.whl)
echo "built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KB)"
"$work/tools/bin/auditwheel" show "$wheel"
"$python" -m pip install --quiet --no-deps --target "$pkg" --platform linux_aarch64 --python-version 3.11 \
  --implementation cp --abi cp311 --only-binary=:all: "$wheel"
file "$pkg"/pybn/_C*.so

export PYTHONPATH=$pkg:$site
export PYBN_TEST_EMULATED=1  # (tests that time whole bench sections narrow them: emulation is slow)
step "under qemu-aarch64: python -m pybn info"
(cd /tmp && "${target_python[@]}" -m pybn info)

step "under qemu-aarch64: the kernel tests"
tests_start=$SECONDS
if [ $# -gt 0 ]; then
  "${target_python[@]}" -m pytest -p no:cacheprovider -q "$@"
else
  tools/kernel_tests.sh "${target_python[@]}" -- -q
fi
echo "emulated kernel tests: $((SECONDS - tests_start)) s"

step "dropout bits: written under qemu-aarch64, compared on the host's x86 paths"
(cd /tmp && "${target_python[@]}" "$root/tools/dropout_bits.py" write "$work/dropout_aarch64.npz")
unset PYTHONPATH
if (cd /tmp && "$python" -c 'import pybn' 2>/dev/null); then
  (cd /tmp && "$python" "$root/tools/dropout_bits.py" compare "$work/dropout_aarch64.npz")
else
  echo "dropout bits: NOT compared: $python cannot import pybn (install it for the host first)"
fi
step "done"
