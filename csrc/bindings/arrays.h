// What every binding of pybn._C shares: the array argument types, the checks that each
// array is what its kernel will touch (dtype, C-contiguity, size, writability), errors that
// name the argument, and the GIL released around the kernel call.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cxxabi.h>
#include <unistd.h>

#include <cstdint>
#include <string>

#include "pybn/kernels.h"

namespace pybn::bindings {

namespace py = pybind11;
using i64 = std::int64_t;

// Array arguments: any object (checked below, so that a wrong one gets a message naming
// it), shown as numpy.ndarray (or None) in the signatures tests/stubgen.py reads.
class NdArray : public py::object {
 public:
  PYBIND11_OBJECT_DEFAULT(NdArray, object, PyObject_Type)
};
class OptionalNdArray : public py::object {
 public:
  PYBIND11_OBJECT_DEFAULT(OptionalNdArray, object, PyObject_Type)
};
// A tuple of arrays, or None (the *_plain bindings' results).
class OptionalArrays : public py::object {
 public:
  PYBIND11_OBJECT_DEFAULT(OptionalArrays, object, PyObject_Type)
};

}  // namespace pybn::bindings

namespace pybind11::detail {
template <>
struct handle_type_name<pybn::bindings::NdArray> {
  static constexpr auto name = const_name("numpy.ndarray");
};
template <>
struct handle_type_name<pybn::bindings::OptionalNdArray> {
  static constexpr auto name = const_name("numpy.ndarray | None");
};
template <>
struct handle_type_name<pybn::bindings::OptionalArrays> {
  static constexpr auto name = const_name("tuple[numpy.ndarray, ...] | None");
};
}  // namespace pybind11::detail

namespace pybn::bindings {

// Releases the GIL for its lifetime: each binding holds one around its kernel call.
//
// Not pybind11's gil_scoped_release: at interpreter exit CPython (before 3.14) ends a
// daemon thread that asks for the GIL back by pthread_exit, whose forced unwind out of that
// destructor is std::terminate (SIGABRT), and through the frames above would drop Python
// references without the GIL. Such a thread is parked here instead until the process ends,
// as CPython 3.14 itself does.
class GilReleased {
 public:
  GilReleased() : state_(PyEval_SaveThread()) {}
  GilReleased(const GilReleased&) = delete;
  GilReleased& operator=(const GilReleased&) = delete;
  ~GilReleased() {
    try {
      PyEval_RestoreThread(state_);
    } catch (abi::__forced_unwind&) {
      for (;;) pause();
    }
  }

 private:
  PyThreadState* state_;
};

// A ValueError "name: what".
[[noreturn]] void fail(const char* name, const std::string& what);

// Sets NumPy's float16 dtype, which is_float16 compares with (when the module is imported).
void find_float16_dtype();
// Whether a holds NumPy's float16, or ml_dtypes' bfloat16 (arrays.cpp says how it is found).
bool is_float16(const py::array& a);
bool is_bfloat16(const py::array& a);

// The array holds T: its dtype is equivalent to T's (compared by value: an unpickled array
// has an equal dtype that is another object).
template <class T>
bool is_of(const py::array& a) {
  if constexpr (std::is_same_v<T, pybn::Float16>)
    return is_float16(a);
  else if constexpr (std::is_same_v<T, pybn::BFloat16>)
    return is_bfloat16(a);
  else
    return py::isinstance<py::array_t<T>>(a);
}

template <class T>
py::array checked(const py::handle& obj, i64 size, const char* name, bool writable) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + ": expected a numpy.ndarray");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!is_of<T>(a))
    throw py::type_error(std::string(name) + ": dtype " + std::string(py::str(a.dtype())) + " does not match x");
  if (!(a.flags() & py::array::c_style)) fail(name, "must be C-contiguous");
  // (the kernels' vector loops align element pointers, and their streaming stores fault on
  // a pointer no whole number of elements brings to a line)
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) fail(name, "must be aligned to its element size");
  if (a.size() != size) fail(name, "has " + std::to_string(a.size()) + " elements, expected " + std::to_string(size));
  if (writable && !a.writeable()) fail(name, "is read-only");
  return a;
}

template <class T>
const T* in(const py::handle& obj, i64 size, const char* name) {
  if (obj.is_none()) return nullptr;
  return static_cast<const T*>(checked<T>(obj, size, name, false).data());
}

template <class T>
T* inout(const py::handle& obj, i64 size, const char* name) {
  if (obj.is_none()) return nullptr;
  return static_cast<T*>(checked<T>(obj, size, name, true).mutable_data());
}

template <class T>
const T* required(const py::handle& obj, i64 size, const char* name) {
  if (obj.is_none()) fail(name, "is required");
  return in<T>(obj, size, name);
}

template <class T>
T* required_out(const py::handle& obj, i64 size, const char* name) {
  if (obj.is_none()) fail(name, "is required");
  return inout<T>(obj, size, name);
}

// The number of elements of obj, an ndarray (else a TypeError naming it).
i64 size_of(const py::handle& obj, const char* name);

// The (outer, channels, inner) layout of a batch-norm call (a ValueError when negative).
Layout make_layout(i64 outer, i64 channels, i64 inner);

// "float32, float64": the dtypes of PYBN_DTYPES.
std::string dtype_names();

// A TypeError: the dtype of x (argument `name`) is not among `supported`.
[[noreturn]] void unsupported_dtype(const py::handle& x, const char* name, const std::string& supported);

}  // namespace pybn::bindings
