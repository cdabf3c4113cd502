// Recognising a call's common form whole, for the *_plain bindings: on the smallest arrays
// Python's argument checks cost more than the kernels, so batch_norm_infer, batch_norm_train
// and batch_norm_backward first offer their arguments to one binding that takes them only
// in the exact form the checks pass through unchanged, and returns None for any other
// (docs/architecture.md, "How a call flows"). Each helper answers yes or no and never
// raises: judging an argument, and naming it in an error, stays with the Python checks.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <initializer_list>
#include <vector>

#include "arrays.h"

namespace pybn::bindings::plain {

// A py::array holding nothing, which tests false. (py::array's default constructor makes an
// empty float64 array, which tests true.)
inline py::array no_array() { return py::reinterpret_steal<py::array>(py::handle()); }

// obj as the common call passes it, or no_array(): an exact numpy.ndarray (no subclass),
// C-contiguous and aligned.
inline py::array array(py::handle obj) {
  using api = py::detail::npy_api;
  if (Py_TYPE(obj.ptr()) != api::get().PyArray_Type_) return no_array();
  constexpr int kWanted = api::NPY_ARRAY_C_CONTIGUOUS_ | api::NPY_ARRAY_ALIGNED_;
  if ((py::detail::array_proxy(obj.ptr())->flags & kWanted) != kWanted) return no_array();
  return py::reinterpret_borrow<py::array>(obj);
}

// The channel-first view of a batch-norm call's main array: x a plain float32 or float64
// array with at least 2 dimensions and one element, its channel axis a plain int in range.
struct Channels {
  py::array x = no_array();
  i64 outer = 1, channels = 0, inner = 1;
};

inline bool channels_of(py::handle x_obj, py::handle axis_obj, Channels& c) {
  c.x = array(x_obj);
  if (!c.x || !(is_of<float>(c.x) || is_of<double>(c.x)) || c.x.ndim() < 2 || c.x.size() == 0) return false;
  if (!PyLong_CheckExact(axis_obj.ptr())) return false;
  int overflow = 0;
  long long axis = PyLong_AsLongLongAndOverflow(axis_obj.ptr(), &overflow);
  const long long ndim = c.x.ndim();
  if (overflow || axis < -ndim || axis >= ndim) return false;
  if (axis < 0) axis += ndim;
  for (long long d = 0; d < ndim; ++d) {
    if (d < axis) c.outer *= c.x.shape(d);
    if (d > axis) c.inner *= c.x.shape(d);
  }
  c.channels = c.x.shape(axis);
  return true;
}

// p is a plain array of x's dtype, writable when asked, of x's shape (like) or of shape
// (C,) (per_channel); None passes where it is optional.
inline bool of_dtype(const py::array& a, const py::array& x, bool writable) {
  return a && a.dtype().equal(x.dtype()) && (!writable || a.writeable());
}
inline bool like(py::handle p, const py::array& x, bool optional, bool writable = false) {
  if (p.is_none()) return optional;
  const py::array a = array(p);
  return of_dtype(a, x, writable) && a.ndim() == x.ndim() &&
         std::equal(x.shape(), x.shape() + x.ndim(), a.shape());
}
inline bool per_channel(py::handle p, const Channels& c, bool optional, bool writable = false) {
  if (p.is_none()) return optional;
  const py::array a = array(p);
  return of_dtype(a, c.x, writable) && a.ndim() == 1 && a.shape(0) == c.channels;
}

// A plain finite float (>= 0 when nonnegative), into v.
inline bool real(py::handle h, bool nonnegative, double& v) {
  if (!PyFloat_CheckExact(h.ptr())) return false;
  v = PyFloat_AS_DOUBLE(h.ptr());
  return std::isfinite(v) && (!nonnegative || v >= 0);
}

// True or False itself, into v.
inline bool flag(py::handle h, bool& v) {
  if (!PyBool_Check(h.ptr())) return false;
  v = h.ptr() == Py_True;
  return true;
}

// The output argument: a writable plain array like x, or None for an x small enough that
// the checks would allocate the output with np.empty_like (past STREAM_MIN_BYTES they align it).
inline bool output(py::handle out, const py::array& x) {
  return out.is_none() ? x.nbytes() < pybn::kStreamBytes : like(out, x, false, true);
}

// The first n_written of `arrays` (the ones the kernel writes) share no byte with any other
// entry (None entries skipped; every entry already recognised as plain, so C-contiguous).
// An array passed twice overlaps itself: an exact in-place call is left to the checks too.
inline bool apart(std::initializer_list<py::handle> arrays, std::size_t n_written) {
  const py::handle* a = arrays.begin();
  for (std::size_t i = 0; i < n_written; ++i) {
    if (a[i].is_none()) continue;
    const auto wa = py::reinterpret_borrow<py::array>(a[i]);
    const char* w0 = static_cast<const char*>(wa.data());
    for (std::size_t j = 0; j < arrays.size(); ++j) {
      if (j == i || a[j].is_none()) continue;
      const auto oa = py::reinterpret_borrow<py::array>(a[j]);
      const char* o0 = static_cast<const char*>(oa.data());
      if (w0 < o0 + oa.nbytes() && o0 < w0 + wa.nbytes()) return false;
    }
  }
  return true;
}

// The output array of a call output() took: out itself, or a new C-contiguous array like x.
inline py::array output_array(py::handle out, const py::array& x) {
  if (!out.is_none()) return py::reinterpret_borrow<py::array>(out);
  return py::array(x.dtype(), std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
}
// A new array of x's dtype and n elements (the per-channel results).
inline py::array empty(const py::array& x, i64 n) { return py::array(x.dtype(), std::vector<py::ssize_t>{n}); }

}  // namespace pybn::bindings::plain
