// Bindings of the folding kernels: weights scaled per output channel, biases shifted.
#include "kernel_sets.h"

namespace pybn::bindings {
namespace {

template <class K>
void fold_scale(const NdArray& w, const NdArray& scale, const NdArray& y, i64 groups, i64 outer, i64 channels,
                i64 inner) {
  if (groups < 0 || outer < 0 || channels < 0 || inner < 0) fail("weight", "negative dimension");
  K::by_dtype(w, "weight", [&](auto zero) {
    using S = decltype(zero);
    pybn::FoldScaleArgs<S> a;
    const i64 n = groups * outer * channels * inner;
    a.groups = groups, a.outer = outer, a.channels = channels, a.inner = inner;
    a.w = required<S>(w, n, "weight");
    a.y = required_out<S>(y, n, "out");
    a.scale = required<double>(scale, groups * channels, "scale");
    GilReleased nogil;
    K::template typed<S>().fold_scale(a);
  });
}

template <class K>
void fold_bias(const NdArray& w, const NdArray& shift, const NdArray& bias, const NdArray& out, i64 rows, i64 cols) {
  if (rows < 0 || cols < 0) fail("weight", "negative dimension");
  K::by_dtype(w, "weight", [&](auto zero) {
    using S = decltype(zero);
    pybn::FoldBiasArgs<S> a;
    a.rows = rows, a.cols = cols;
    a.w = required<S>(w, rows * cols, "weight");
    a.shift = required<double>(shift, cols, "shift");
    a.bias = required<double>(bias, rows, "bias");
    a.out = required_out<S>(out, rows, "out");
    GilReleased nogil;
    K::template typed<S>().fold_bias(a);
  });
}

}  // namespace

template <class K>
void def_fold(py::module_& m) {
  m.def("fold_scale", &fold_scale<K>, py::arg("weight"), py::arg("scale"), py::arg("out"), py::arg("groups"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"));
  m.def("fold_bias", &fold_bias<K>, py::arg("weight"), py::arg("shift"), py::arg("bias"), py::arg("out"),
        py::arg("rows"), py::arg("cols"));
}

template void def_fold<ActiveKernels>(py::module_&);
template void def_fold<FloatComputingInDouble>(py::module_&);

}  // namespace pybn::bindings
