# CMake toolchain: pybn for aarch64 Linux with Debian's cross compiler (g++-aarch64-linux-gnu),
# against an aarch64 Python in the sysroot named by the environment variable
# PYBN_AARCH64_SYSROOT (tools/aarch64_test.sh makes one). CMake runs that Python (to ask it
# for its headers and extension suffix) under qemu-aarch64: FindPython does so from CMake 4.1
# (policy CMP0190).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

set(PYBN_AARCH64_SYSROOT "$ENV{PYBN_AARCH64_SYSROOT}")
if(NOT PYBN_AARCH64_SYSROOT)
  message(FATAL_ERROR "set PYBN_AARCH64_SYSROOT to the aarch64 root with python3.11 and libpython3.11-dev")
endif()
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L "${PYBN_AARCH64_SYSROOT}")
set(Python_EXECUTABLE "${PYBN_AARCH64_SYSROOT}/usr/bin/python3.11" CACHE FILEPATH "the target's Python")

# Debian's Python.h includes <aarch64-linux-gnu/python3.11/pyconfig.h>: the sysroot's include
# folder goes last, after the cross compiler's own (C/C++ runtime) headers.
set(CMAKE_CXX_FLAGS_INIT "-idirafter ${PYBN_AARCH64_SYSROOT}/usr/include")

# The C/C++ runtime comes with the cross compiler; Python's headers from the sysroot;
# CMake packages (pybind11's config) from the host.
set(CMAKE_FIND_ROOT_PATH "${PYBN_AARCH64_SYSROOT}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

# pybind11 takes the extension suffix from FindPython's answer instead of running Python itself.
set(PYBIND11_USE_CROSSCOMPILING ON)
