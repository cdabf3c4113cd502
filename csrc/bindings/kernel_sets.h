// The two sets of kernels the typed bindings are instantiated for, and the functions that
// define those bindings (one per family, bind_*.cpp, instantiated for both sets).
#pragma once
#include "arrays.h"
#include "pybn/dispatch.h"

namespace pybn::bindings {

// Which kernels the typed bindings call: by_dtype(x, name, f) calls f(S{}) with S the
// storage type of x, and typed<S>() gives the entry points for S.
//
// The kernels of the active ISA, for every dtype of PYBN_DTYPES.
struct ActiveKernels {
  template <class F>
  static void by_dtype(const py::handle& x, const char* name, F&& f) {
    size_of(x, name);
    const auto a = py::reinterpret_borrow<py::array>(x);
#define PYBN_DTYPE_CASE(S, dtype, T) \
  if (is_of<S>(a)) return f(S{});
    PYBN_DTYPES(PYBN_DTYPE_CASE)
#undef PYBN_DTYPE_CASE
    unsupported_dtype(x, name, dtype_names());
  }
  template <class S>
  static const pybn::TypedKernels<S>& typed() {
    return pybn::table().typed<S>();
  }
};

// The active ISA's float32 kernels computing in double (DiagnosticTable).
struct FloatComputingInDouble {
  template <class F>
  static void by_dtype(const py::handle& x, const char* name, F&& f) {
    size_of(x, name);
    if (is_of<float>(py::reinterpret_borrow<py::array>(x))) return f(float{});
    unsupported_dtype(x, name, "float32");
  }
  template <class S>
  static const pybn::TypedKernels<float>& typed() {
    static_assert(std::is_same_v<S, float>);
    return pybn::diagnostics().float_computing_in_double;
  }
};

// The typed bindings of each family, calling the kernels K, and all of them.
template <class K>
void def_batch_norm(py::module_& m);
template <class K>
void def_dropout_family(py::module_& m);
template <class K>
void def_fold(py::module_& m);

template <class K>
void def_typed_kernels(py::module_& m) {
  def_batch_norm<K>(m);
  def_dropout_family<K>(m);
  def_fold<K>(m);
}

// batch_norm_infer / _train / _backward's common calls taken whole (plain_calls.h), on the
// active ISA's kernels: not kernel entries, each ends in the binding of one.
void def_plain_calls(py::module_& m);

// The untyped bindings: merging statistics across workers, and the packed masks.
void def_merge_stats(py::module_& m);
void def_masks(py::module_& m);

// pybn._C.diagnostics.
void def_diagnostics(py::module_& m);

// The names of the entries of one kind (kernels, or diagnostics) in kernel_list.h, in its order.
py::tuple kernel_names(bool diagnostic);

}  // namespace pybn::bindings
