// Bindings of the dropout family on the counter stream: dropout and its packed-mask apply,
// alpha dropout, Gaussian noise, and the packed masks of dropout and DropBlock.
#include "kernel_sets.h"

#include <algorithm>

namespace pybn::bindings {
namespace {

template <class K>
void dropout(const NdArray& x, const NdArray& y, std::uint64_t seed, std::uint64_t offset, std::uint32_t threshold,
             double scale, bool relu) {
  if (threshold > 0xFFFFu) throw py::value_error("threshold: must be < 65536 (p == 1 gives zeros without a mask)");
  K::by_dtype(x, "x", [&](auto zero) {
    using S = decltype(zero);
    pybn::DropoutArgs<S> a;
    a.n = size_of(x, "x");
    a.x = required<S>(x, a.n, "x");
    a.y = required_out<S>(y, a.n, "out");
    a.seed = seed;
    a.offset = offset;
    a.threshold = static_cast<std::uint16_t>(threshold);
    a.scale = scale;
    a.relu = relu;
    GilReleased nogil;
    K::template typed<S>().dropout(a);
  });
}

// y = x * scale (relu(x) * scale) where the packed mask's bit is set, 0 elsewhere; one bit
// per element.
template <class K>
void dropout_apply(const NdArray& x, const NdArray& mask, const NdArray& y, double scale, bool relu) {
  K::by_dtype(x, "x", [&](auto zero) {
    using S = decltype(zero);
    pybn::DropoutApplyArgs<S> a;
    a.n = size_of(x, "x");
    a.x = required<S>(x, a.n, "x");
    a.mask = required<unsigned char>(mask, (a.n + 7) / 8, "mask");
    a.y = required_out<S>(y, a.n, "out");
    a.scale = scale;
    a.relu = relu;
    GilReleased nogil;
    K::template typed<S>().dropout_apply(a);
  });
}

// As dropout_apply, with a mask over a noise shape that broadcasts: x seen as (f0, b1, f2,
// b3), the mask as (f0, f2) (kernels.h, BroadcastShape).
template <class K>
void dropout_apply_broadcast(const NdArray& x, const NdArray& mask, const NdArray& y, double scale, bool relu, i64 f0,
                             i64 b1, i64 f2, i64 b3) {
  if (f0 < 0 || b1 < 0 || f2 < 0 || b3 < 0) fail("broadcast", "sizes must be >= 0");
  K::by_dtype(x, "x", [&](auto zero) {
    using S = decltype(zero);
    pybn::DropoutApplyArgs<S> a;
    a.broadcast = {f0, b1, f2, b3};
    a.n = f0 * b1 * f2 * b3;
    a.x = required<S>(x, a.n, "x");
    a.mask = required<unsigned char>(mask, (f0 * f2 + 7) / 8, "mask");
    a.y = required_out<S>(y, a.n, "out");
    a.scale = scale;
    a.relu = relu;
    GilReleased nogil;
    K::template typed<S>().dropout_apply_broadcast(a);
  });
}

// dx = dy * scale, 0 where y <= 0: the gradient of y = dropout(relu(x)) (kernels.h).
template <class K>
void relu_dropout_backward(const NdArray& dy, const NdArray& y, const NdArray& dx, double scale) {
  K::by_dtype(dy, "dy", [&](auto zero) {
    using S = decltype(zero);
    pybn::ReluDropoutBackwardArgs<S> a;
    a.n = size_of(dy, "dy");
    a.dy = required<S>(dy, a.n, "dy");
    a.y = required<S>(y, a.n, "y");
    a.dx = required_out<S>(dx, a.n, "out");
    a.scale = scale;
    GilReleased nogil;
    K::template typed<S>().relu_dropout_backward(a);
  });
}

// y = keep ? x * a + b : b - c on dropout's keep bits (kernels.h, AlphaDropoutArgs).
template <class K>
void alpha_dropout(const NdArray& x, const NdArray& y, std::uint64_t seed, std::uint64_t offset,
                   std::uint32_t threshold, double a, double b, double c) {
  if (threshold > 0xFFFFu) throw py::value_error("threshold: must be < 65536");
  K::by_dtype(x, "x", [&](auto zero) {
    using S = decltype(zero);
    pybn::AlphaDropoutArgs<S> args;
    args.n = size_of(x, "x");
    args.x = required<S>(x, args.n, "x");
    args.y = required_out<S>(y, args.n, "out");
    args.seed = seed;
    args.offset = offset;
    args.threshold = static_cast<std::uint16_t>(threshold);
    args.a = a, args.b = b, args.c = c;
    GilReleased nogil;
    K::template typed<S>().alpha_dropout(args);
  });
}

// y = x * (1 + sigma * z) (multiply) or x + sigma * z on the normal stream.
template <class K>
void gaussian_noise(const NdArray& x, const NdArray& y, std::uint64_t seed, std::uint64_t offset, double sigma,
                    bool multiply) {
  K::by_dtype(x, "x", [&](auto zero) {
    using S = decltype(zero);
    pybn::GaussianNoiseArgs<S> a;
    a.n = size_of(x, "x");
    a.x = required<S>(x, a.n, "x");
    a.y = required_out<S>(y, a.n, "out");
    a.seed = seed;
    a.offset = offset;
    a.sigma = sigma;
    a.multiply = multiply;
    GilReleased nogil;
    K::template typed<S>().gaussian_noise(a);
  });
}

void dropout_mask(const NdArray& mask, i64 n, std::uint64_t seed, std::uint64_t offset, std::uint32_t threshold) {
  if (threshold > 0xFFFFu) throw py::value_error("threshold: must be < 65536");
  if (n < 0) throw py::value_error("n: must be >= 0");
  pybn::DropoutMaskArgs a;
  a.n = n;
  a.mask = required_out<unsigned char>(mask, (n + 7) / 8, "mask");
  a.seed = seed;
  a.offset = offset;
  a.threshold = static_cast<std::uint16_t>(threshold);
  GilReleased nogil;
  pybn::table().dropout_mask(a);
}

// DropBlock's keep mask from its packed seed mask (0 bits are seeds); returns the count kept.
i64 drop_block_mask(const NdArray& seeds, const NdArray& keep, i64 planes, i64 rows, i64 cols, i64 block_rows,
                    i64 block_cols) {
  if (planes < 0 || rows < 0 || cols < 0) fail("planes", "sizes must be >= 0");
  if (block_rows < 1 || block_rows > std::max<i64>(rows, 1) || block_cols < 1 || block_cols > std::max<i64>(cols, 1))
    fail("block_rows", "the block must be at least 1 and at most the plane in each dimension");
  pybn::DropBlockMaskArgs a;
  const i64 n = planes * rows * cols;
  a.seeds = required<unsigned char>(seeds, (n + 7) / 8, "seeds");
  a.keep = required_out<unsigned char>(keep, (n + 7) / 8, "keep");
  a.planes = planes;
  a.rows = rows;
  a.cols = cols;
  a.block_rows = block_rows;
  a.block_cols = block_cols;
  i64 kept = 0;
  a.kept = &kept;
  {
    GilReleased nogil;
    pybn::table().drop_block_mask(a);
  }
  return kept;
}

}  // namespace

template <class K>
void def_dropout_family(py::module_& m) {
  m.def("dropout", &dropout<K>, py::arg("x"), py::arg("y"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"), py::arg("scale"), py::arg("relu") = false);
  m.def("dropout_apply", &dropout_apply<K>, py::arg("x"), py::arg("mask"), py::arg("y"), py::arg("scale"),
        py::arg("relu") = false);
  m.def("dropout_apply_broadcast", &dropout_apply_broadcast<K>, py::arg("x"), py::arg("mask"), py::arg("y"),
        py::arg("scale"), py::arg("relu"), py::arg("f0"), py::arg("b1"), py::arg("f2"), py::arg("b3"));
  m.def("relu_dropout_backward", &relu_dropout_backward<K>, py::arg("dy"), py::arg("y"), py::arg("dx"),
        py::arg("scale"));
  m.def("alpha_dropout", &alpha_dropout<K>, py::arg("x"), py::arg("y"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"), py::arg("a"), py::arg("b"), py::arg("c"));
  m.def("gaussian_noise", &gaussian_noise<K>, py::arg("x"), py::arg("y"), py::arg("seed"), py::arg("offset"),
        py::arg("sigma"), py::arg("multiply"));
}

template void def_dropout_family<ActiveKernels>(py::module_&);
template void def_dropout_family<FloatComputingInDouble>(py::module_&);

void def_masks(py::module_& m) {
  m.def("dropout_mask", &dropout_mask, py::arg("mask"), py::arg("n"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"));
  m.def("drop_block_mask", &drop_block_mask, py::arg("seeds"), py::arg("keep"), py::arg("planes"), py::arg("rows"),
        py::arg("cols"), py::arg("block_rows"), py::arg("block_cols"));
}

}  // namespace pybn::bindings
