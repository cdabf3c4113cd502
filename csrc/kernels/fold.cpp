// Batch-norm folding (docs/folding.md): scaling a weight along one axis and the bias of a
// layer that absorbs a preceding BN. The arithmetic is in double whatever the compute type
// of the dtype (storage is widened on load) and every result is rounded once to the
// weight's dtype, so a folded float32 weight is the correctly rounded product of the
// float32 weight and the exact scale. Each output element is computed by one thread in a
// fixed order: results do not depend on the thread count.
#include <algorithm>

#include "kernels_isa.h"
#include "pybn/parallel.h"
#include "pybn/vec/vec.h"

namespace pybn {
namespace PYBN_ISA {
namespace {

using i64 = std::int64_t;
using VD = Vec<double>;
constexpr i64 W = VD::W;

// y[i] = x[i] * s for i < n (one scale for a whole run).
template <class S>
inline void scale_run(const S* x, S* y, i64 n, double s) {
  const VD vs = VD::set1(s);
  i64 i = 0;
  for (; i + W <= n; i += W) store_as(load_as<double>(x + i) * vs, y + i);
  if (i < n) store_as(load_as<double>(x + i, n - i) * vs, y + i, n - i);
}

// y[i] = x[i] * s[i] for i < n (a scale per element).
template <class S>
inline void scale_each(const S* x, S* y, i64 n, const double* s) {
  i64 i = 0;
  for (; i + W <= n; i += W) store_as(load_as<double>(x + i) * VD::load(s + i), y + i);
  if (i < n) store_as(load_as<double>(x + i, n - i) * VD::load(s + i, n - i), y + i, n - i);
}

}  // namespace

// T, the compute type of the other kernels, is not used: folding computes in double.
template <class S, class T>
void fold_scale(const FoldScaleArgs<S>& a) {
  const i64 C = a.channels, K = a.inner, n = a.groups * a.outer * C * K;
  if (K == 1) {
    // Channels are contiguous (a Linear weight scaled along its input): one row per (g, o).
    parallel_for(a.groups * a.outer, n, [&](i64 rb, i64 re) {
      for (i64 r = rb; r < re; ++r) {
        const double* s = a.scale + (r / a.outer) * C;
        scale_each(a.w + r * C, a.y + r * C, C, s);
      }
    });
    return;
  }
  // One run of K elements (a kernel, or a Linear row) per (g, o, c), all with one scale.
  parallel_for(a.groups * a.outer * C, n, [&](i64 rb, i64 re) {
    for (i64 r = rb; r < re; ++r) {
      const i64 g = r / (a.outer * C), c = r % C;
      scale_run(a.w + r * K, a.y + r * K, K, a.scale[g * C + c]);
    }
  });
}

template <class S, class T>
void fold_bias(const FoldBiasArgs<S>& a) {
  const i64 cols = a.cols;
  parallel_for(a.rows, a.rows * cols, [&](i64 rb, i64 re) {
    for (i64 r = rb; r < re; ++r) {
      const S* w = a.w + r * cols;
      VD acc[2] = {VD::zero(), VD::zero()};  // two chains: the adds' latency, not their count, bounds a row
      i64 c = 0;
      for (; c + 2 * W <= cols; c += 2 * W) {
        acc[0] = fma(load_as<double>(w + c), VD::load(a.shift + c), acc[0]);
        acc[1] = fma(load_as<double>(w + c + W), VD::load(a.shift + c + W), acc[1]);
      }
      for (; c < cols; c += W) {
        const i64 m = std::min(W, cols - c);
        acc[0] = fma(load_as<double>(w + c, m), VD::load(a.shift + c, m), acc[0]);
      }
      a.out[r] = static_cast<S>(a.bias[r] + (acc[0] + acc[1]).reduce_add());
    }
  });
}

PYBN_FILL_FAMILY(fold)

}  // namespace PYBN_ISA
}  // namespace pybn
