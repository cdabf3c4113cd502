// The kernel interface: argument structs and the table of entry points that each ISA fills.
// Nothing here knows about Python; the bindings fill the structs, the kernels read them.
#pragma once
#include <cstdint>

namespace pybn {

// Every channel-wise kernel sees x as (outer, channels, inner), C-contiguous.
struct Layout {
  std::int64_t outer = 0;
  std::int64_t channels = 0;
  std::int64_t inner = 0;
  std::int64_t numel() const { return outer * channels * inner; }
  std::int64_t per_channel() const { return outer * inner; }
};

// Training forward: batch statistics, optional running-stat update, normalize.
template <class T>
struct BnTrainArgs {
  Layout layout;
  const T* x = nullptr;
  T* y = nullptr;                  // may alias x
  const T* weight = nullptr;       // (C,) or null (gamma = 1)
  const T* bias = nullptr;         // (C,) or null (beta = 0)
  T* running_mean = nullptr;       // (C,) updated in place, or null
  T* running_var = nullptr;        // (C,) updated in place, or null
  T* save_mean = nullptr;          // (C,) out
  T* save_invstd = nullptr;        // (C,) out
  double momentum = 0.1;
  double eps = 1e-5;
  bool relu = false;
};

// Inference forward: y = (x - mean) / sqrt(var + eps) * weight + bias.
template <class T>
struct BnInferArgs {
  Layout layout;
  const T* x = nullptr;
  T* y = nullptr;                  // may alias x
  const T* mean = nullptr;         // (C,)
  const T* var = nullptr;          // (C,)
  const double* invstd = nullptr;  // (C,) given instead of var: 1 / sqrt(var + eps) (eps unused)
  const T* weight = nullptr;
  const T* bias = nullptr;
  double eps = 1e-5;
  bool relu = false;
};

// Per-channel statistics of x: mean and m2 = sum of squared deviations, in double.
template <class T>
struct BnMomentsArgs {
  Layout layout;
  const T* x = nullptr;
  double* mean = nullptr;          // (C,) out
  double* m2 = nullptr;            // (C,) out
};

// Backward. training: gradient through the batch statistics (mean/invstd saved by the
// forward); otherwise dx = dy * weight * invstd. y (forward output) masks dy where y <= 0.
template <class T>
struct BnBackwardArgs {
  Layout layout;
  const T* dy = nullptr;
  const T* x = nullptr;
  const T* y = nullptr;            // non-null when the forward fused a ReLU
  const T* mean = nullptr;         // (C,)
  const T* invstd = nullptr;       // (C,)
  const T* weight = nullptr;       // (C,) or null
  T* dx = nullptr;                 // may alias dy
  T* dweight = nullptr;            // (C,) out: sum(dy * xhat)
  T* dbias = nullptr;              // (C,) out: sum(dy)
  bool training = true;
};

// The backward in two phases, for statistics all-reduced between them (SyncBatchNorm):
// reduce gives per channel sum(g) and sum(g * xhat), g = dy (masked by y > 0 when y is
// given), xhat = (x - mean) * invstd; apply takes those sums over `count` values in all
// and writes dx = weight * invstd * (g - sum_g / count - xhat * sum_gxhat / count).
template <class T>
struct BnGradSums {
  double* sum_g = nullptr;         // (C,)
  double* sum_gxhat = nullptr;     // (C,)
  double count = 0;                // apply only
};

// Inverted dropout over n elements (the mask stream of DESIGN.md): element k is kept when
// its 16-bit random word is >= threshold (floor(p * 65536)), and kept values are scaled.
template <class T>
struct DropoutArgs {
  const T* x = nullptr;
  T* y = nullptr;                  // may alias x
  std::int64_t n = 0;
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;
  std::uint16_t threshold = 0;
  double scale = 1.0;              // 1 / (1 - p)
};

struct DropoutMaskArgs {
  unsigned char* mask = nullptr;   // ceil(n / 8) bytes, bit k % 8 of byte k / 8
  std::int64_t n = 0;
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;
  std::uint16_t threshold = 0;
};

// Applying a mask drawn over a noise shape that broadcasts (Keras' noise_shape): y seen as
// (f0, b1, f2, b3), the mask as (f0, f2); element (a, b, c, d) uses mask bit a * f2 + c.
// (N, C, 1, 1) is (N*C, 1, 1, H*W); (1, C, 1, 1) is (1, N, C, H*W); (N, 1, W) is (N, C, W, 1).
struct BroadcastShape {
  std::int64_t f0 = 1, b1 = 1, f2 = 1, b3 = 1;
};

template <class T>
struct DropoutApplyArgs {
  const T* x = nullptr;
  const unsigned char* mask = nullptr;
  T* y = nullptr;                  // may alias x
  std::int64_t n = 0;
  double scale = 1.0;
  BroadcastShape broadcast;        // used by dropout_apply_broadcast only (n = f0*b1*f2*b3)
};

// The entry points for one element type.
// Batch-norm folding (DESIGN.md, "Folding batch norm"), arithmetic in double, every result
// rounded once to T. Scaling: y[g, o, c, k] = w[g, o, c, k] * scale[g * channels + c] over the
// view (groups, outer, channels, inner) of a weight (y may alias w).
template <class T>
struct FoldScaleArgs {
  const T* w = nullptr;
  T* y = nullptr;
  std::int64_t groups = 0, outer = 0, channels = 0, inner = 0;
  const double* scale = nullptr;   // (groups * channels,)
};

// out[r] = bias[r] + sum_c w[r, c] * shift[c]: the bias of a layer that absorbs a preceding BN.
template <class T>
struct FoldBiasArgs {
  const T* w = nullptr;            // (rows, cols)
  std::int64_t rows = 0, cols = 0;
  const double* shift = nullptr;   // (cols,)
  const double* bias = nullptr;    // (rows,)
  T* out = nullptr;                // (rows,)
};

template <class T>
struct TypedKernels {
  void (*bn_train)(const BnTrainArgs<T>&) = nullptr;
  void (*bn_infer)(const BnInferArgs<T>&) = nullptr;
  void (*bn_backward)(const BnBackwardArgs<T>&) = nullptr;
  void (*bn_moments)(const BnMomentsArgs<T>&) = nullptr;
  // Uses layout, dy, x, y, mean, invstd; fills sums.sum_g and sums.sum_gxhat.
  void (*bn_backward_reduce)(const BnBackwardArgs<T>&, const BnGradSums<T>&) = nullptr;
  // Uses layout, dy, x, y, mean, invstd, weight, dx, training; reads the sums and count.
  void (*bn_backward_apply)(const BnBackwardArgs<T>&, const BnGradSums<T>&) = nullptr;
  void (*dropout)(const DropoutArgs<T>&) = nullptr;
  void (*dropout_apply)(const DropoutApplyArgs<T>&) = nullptr;
  void (*dropout_apply_broadcast)(const DropoutApplyArgs<T>&) = nullptr;
  void (*fold_scale)(const FoldScaleArgs<T>&) = nullptr;
  void (*fold_bias)(const FoldBiasArgs<T>&) = nullptr;
};

// One table per ISA; dispatch picks one at import.
struct KernelTable {
  const char* isa = nullptr;
  TypedKernels<float> f32;
  TypedKernels<double> f64;
  void (*dropout_mask)(const DropoutMaskArgs&) = nullptr;
  // Philox4x32-10 of n counters (4 words each) under a 64-bit key, for known-answer tests.
  void (*philox)(const std::uint32_t* counters, std::int64_t n, std::uint64_t key, std::uint32_t* out) = nullptr;
  // The bandwidth probe of the benchmark: a vectorized sum, and a copy with non-temporal stores.
  double (*probe_read)(const float* x, std::int64_t n) = nullptr;
  void (*probe_stream)(const float* src, float* dst, std::int64_t n) = nullptr;

  template <class T>
  const TypedKernels<T>& typed() const;
};
template <>
inline const TypedKernels<float>& KernelTable::typed<float>() const { return f32; }
template <>
inline const TypedKernels<double>& KernelTable::typed<double>() const { return f64; }

// Each ISA's table, defined by kernels/table.cpp compiled for that ISA.
namespace scalar { const KernelTable& kernel_table(); }
namespace avx2 { const KernelTable& kernel_table(); }
namespace avx512 { const KernelTable& kernel_table(); }

}  // namespace pybn
