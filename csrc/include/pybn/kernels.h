// The kernel interface: argument structs and the table of entry points that each ISA fills.
// Nothing here knows about Python; the bindings fill the structs, the kernels read them.
#pragma once
#include <cstdint>
#include <type_traits>

#include "pybn/kernel_list.h"

namespace pybn {

// The type of the per-channel parameters and statistics (weight, bias, running and saved
// statistics, their gradients) beside arrays of storage S: S itself, or float for 16-bit
// storage, as PyTorch's mixed precision keeps them.
template <class S>
using param_t = std::conditional_t<is_16bit<S>, float, S>;

// The least output size written with non-temporal stores; the kernels' threshold,
// stream_min_bytes() (cache_sizes.h), is this or a quarter of the L3. Past it an output
// would not stay in cache with its inputs, and streaming skips reading the destination
// lines first. The Python layer allocates outputs of this size aligned to
// kAlignmentBytes, so that every vector store of the streaming loops is aligned without a
// head of partial vectors.
constexpr std::int64_t kStreamBytes = std::int64_t(4) << 20;
// The widest vector of any path (AVX-512) and one cache line.
constexpr std::int64_t kAlignmentBytes = 64;

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
  using P = param_t<T>;
  Layout layout;
  const T* x = nullptr;
  T* y = nullptr;                  // may alias x
  const P* weight = nullptr;       // (C,) or null (gamma = 1)
  const P* bias = nullptr;         // (C,) or null (beta = 0)
  P* running_mean = nullptr;       // (C,) updated in place, or null
  P* running_var = nullptr;        // (C,) updated in place, or null
  P* save_mean = nullptr;          // (C,) out
  P* save_invstd = nullptr;        // (C,) out
  double momentum = 0.1;
  double eps = 1e-5;
  bool relu = false;
  const T* residual = nullptr;     // x's shape, added before the ReLU, or null; may alias y
};

// Inference forward with the running statistics: y = (x - mean) / sqrt(var + eps) * weight + bias.
template <class T>
struct BnInferArgs {
  using P = param_t<T>;
  Layout layout;
  const T* x = nullptr;
  T* y = nullptr;                  // may alias x
  const P* mean = nullptr;         // (C,)
  const P* var = nullptr;          // (C,)
  const P* weight = nullptr;       // (C,) or null
  const P* bias = nullptr;         // (C,) or null
  double eps = 1e-5;
  bool relu = false;
  const T* residual = nullptr;     // x's shape, added before the ReLU, or null; may alias y
};

// Normalization with given statistics (those of a split-phase training forward):
// y = (x - mean) * invstd * weight + bias, invstd * weight taken in double.
template <class T>
struct BnApplyArgs {
  using P = param_t<T>;
  Layout layout;
  const T* x = nullptr;
  T* y = nullptr;                  // may alias x
  const P* mean = nullptr;         // (C,)
  const double* invstd = nullptr;  // (C,)
  const P* weight = nullptr;       // (C,) or null
  const P* bias = nullptr;         // (C,) or null
  bool relu = false;
  const T* residual = nullptr;     // x's shape, added before the ReLU, or null; may alias y
};

// Per-channel statistics of x: mean and m2 = sum of squared deviations, in double.
template <class T>
struct BnMomentsArgs {
  Layout layout;
  const T* x = nullptr;
  double* mean = nullptr;          // (C,) out
  double* m2 = nullptr;            // (C,) out
};

// What every backward reads: g = dy (masked by y > 0 when y, the forward's output, is
// given: the forward fused a ReLU) and xhat = (x - mean) * invstd.
template <class T>
struct BnGradInputs {
  using P = param_t<T>;
  Layout layout;
  const T* dy = nullptr;
  const T* x = nullptr;
  const T* y = nullptr;            // non-null when the forward fused a ReLU
  const P* mean = nullptr;         // (C,)
  const P* invstd = nullptr;       // (C,)
};

// Backward. training: gradient through the batch statistics (mean/invstd saved by the
// forward); otherwise dx = g * weight * invstd.
template <class T>
struct BnBackwardArgs : BnGradInputs<T> {
  using P = param_t<T>;
  const P* weight = nullptr;       // (C,) or null
  T* dx = nullptr;                 // may alias dy
  P* dweight = nullptr;            // (C,) out: sum(g * xhat)
  P* dbias = nullptr;              // (C,) out: sum(g)
  bool training = true;
  T* d_residual = nullptr;         // out, or null: g, the gradient of a residual the forward added; may alias dy
};

// The training backward in two phases, for sums all-reduced between them (SyncBatchNorm).
// The reduction: per channel sum(g) and sum(g * xhat).
template <class T>
struct BnGradReduceArgs : BnGradInputs<T> {
  double* sum_g = nullptr;         // (C,) out
  double* sum_gxhat = nullptr;     // (C,) out
};

// The dx pass from those sums over `count` values in all:
// dx = weight * invstd * (g - sum_g / count - xhat * sum_gxhat / count).
template <class T>
struct BnGradApplyArgs : BnGradInputs<T> {
  using P = param_t<T>;
  const P* weight = nullptr;       // (C,) or null
  const double* sum_g = nullptr;   // (C,)
  const double* sum_gxhat = nullptr;  // (C,)
  double count = 0;                // > 0
  T* dx = nullptr;                 // may alias dy
  T* d_residual = nullptr;         // out, or null: g (see BnBackwardArgs); may alias dy
};

// The running statistics' update from a batch's statistics, as PyTorch does it:
// running = (1 - momentum) * running + momentum * batch, the batch variance unbiased
// (m2 / (count - 1)); in double, rounded once to P.
template <class T>
struct BnRunningStatsArgs {
  using P = param_t<T>;
  std::int64_t channels = 0;
  P* running_mean = nullptr;       // (C,) updated in place, or null
  P* running_var = nullptr;        // (C,) updated in place, or null
  const double* mean = nullptr;    // (C,)
  const double* m2 = nullptr;      // (C,)
  double count = 0;                // values per channel in the batch, > 1
  double momentum = 0.1;
};

// The statistics of W sets of values (workers) merged per channel (Chan et al.): a
// worker with count 0 is skipped; m2 is NaN where the merged mean is not finite.
struct BnMergeArgs {
  std::int64_t workers = 0, channels = 0;
  const double* count = nullptr;   // (W, C)
  const double* mean = nullptr;    // (W, C)
  const double* m2 = nullptr;      // (W, C)
  double* merged_mean = nullptr;   // (C,) out
  double* merged_m2 = nullptr;     // (C,) out
};

// Inverted dropout over n elements (the mask stream of docs/dropout.md): element k is kept when
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
  bool relu = false;               // y = dropout(relu(x)): ReLU's pass fused
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
  bool relu = false;               // y = relu(x) * scale where kept
  BroadcastShape broadcast;        // read by dropout_apply_broadcast only (n = f0*b1*f2*b3)
};

// The gradient of y = dropout(relu(x)) from its output: dx = dy * scale where y > 0 (or is
// NaN, as torch's ReLU gradient), 0 where y <= 0 (y > 0 exactly where the mask kept a
// positive x), with no mask to regenerate.
template <class T>
struct ReluDropoutBackwardArgs {
  const T* dy = nullptr;
  const T* y = nullptr;
  T* dx = nullptr;                 // may alias dy
  std::int64_t n = 0;
  double scale = 1.0;
};

// Alpha dropout (docs/dropout.md) on dropout's keep bits (the same seed, offset and threshold
// keep the same elements): y = keep ? x * a + b : b - c, each operation in the compute
// type T with a, b, c rounded to T first (torch's order, so that float32 results match its
// AlphaDropout's bit for bit given the same mask).
template <class T>
struct AlphaDropoutArgs {
  const T* x = nullptr;
  T* y = nullptr;                  // may alias x
  std::int64_t n = 0;
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;
  std::uint16_t threshold = 0;
  double a = 1.0;                  // the scale of kept values
  double b = 0.0;                  // the shift of kept values
  double c = 0.0;                  // dropped values are b - c
};

// Gaussian noise on the normal stream (docs/dropout.md): z_k, the float normal variate of
// element k; multiply: y = x * (1 + sigma * z) (Gaussian dropout), else y = x + sigma * z.
template <class T>
struct GaussianNoiseArgs {
  const T* x = nullptr;
  T* y = nullptr;                  // may alias x
  std::int64_t n = 0;
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;
  double sigma = 0.0;
  bool multiply = false;
};

// The normal stream's arithmetic on n pairs of 32-bit words (w1, w2), for accuracy tests:
// out[5i ..] = u, ln u (from w1), phi, cos phi, sin phi (the reduced angle of w2).
struct NormalMathArgs {
  const std::uint32_t* words = nullptr;  // (n, 2)
  std::int64_t n = 0;
  float* out = nullptr;                  // (n, 5)
};

// DropBlock's keep mask (docs/dropout.md): `planes` planes of rows x cols elements, the block
// seeds given as a packed mask whose 0 bits are seeds (dropout's keep bits drawn at gamma). An
// element (r, c) is dropped when a seed lies in rows [r - (block_rows - 1) / 2, r + block_rows / 2]
// and columns [c - (block_cols - 1) / 2, c + block_cols / 2] of its plane.
struct DropBlockMaskArgs {
  const unsigned char* seeds = nullptr;  // ceil(n / 8) bytes, n = planes * rows * cols
  unsigned char* keep = nullptr;         // ceil(n / 8) bytes out: bit k set where element k is kept
  std::int64_t planes = 0, rows = 0, cols = 0;
  std::int64_t block_rows = 1, block_cols = 1;  // in [1, rows] and [1, cols]
  std::int64_t* kept = nullptr;          // out: the number of elements kept
};

// Batch-norm folding (docs/folding.md), arithmetic in double, every result
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

// Philox4x32-10 of n counters (4 words each) under a 64-bit key (known-answer tests).
struct PhiloxArgs {
  const std::uint32_t* counters = nullptr;  // (n, 4)
  std::int64_t n = 0;
  std::uint64_t key = 0;
  std::uint32_t* out = nullptr;             // (n, 4)
};

// The benchmark's bandwidth probes: a vectorized sum of x, and a copy with non-temporal stores.
struct ProbeReadArgs {
  const float* x = nullptr;
  std::int64_t n = 0;
  double* sum = nullptr;           // out
};

// The 16-bit conversions of the active path's loads and stores (half.h), over n values:
// from float16 or bfloat16 bits to float (widen), or from float to them.
struct Convert16Args {
  const void* src = nullptr;
  void* dst = nullptr;
  std::int64_t n = 0;
  bool bfloat16 = false;           // else float16
  bool widen = false;              // 16-bit to float, else float to 16-bit
};

struct ProbeStreamArgs {
  const float* src = nullptr;
  float* dst = nullptr;
  std::int64_t n = 0;
};

// ---------------------------------------------------------------------------------------
// The tables, one of each per ISA, with a field per entry of kernel_list.h.

// The typed entry points for one storage type.
template <class T>
struct TypedKernels {
#define PYBN_TYPED_FIELD(name, Args) void (*name)(const Args<T>&) = nullptr;
  PYBN_KERNELS(PYBN_TYPED_FIELD, PYBN_SKIP, PYBN_SKIP)
#undef PYBN_TYPED_FIELD
};

template <class T>
struct DtypeTag {
  using type = T;
};

struct KernelTable {
  const char* isa = nullptr;
#define PYBN_DTYPE_FIELD(S, name, C) TypedKernels<S> name;
  PYBN_DTYPES(PYBN_DTYPE_FIELD)
#undef PYBN_DTYPE_FIELD
#define PYBN_UNTYPED_FIELD(name, Args) void (*name)(const Args&) = nullptr;
  PYBN_KERNELS(PYBN_SKIP, PYBN_UNTYPED_FIELD, PYBN_SKIP)
#undef PYBN_UNTYPED_FIELD

  template <class S>
  const TypedKernels<S>& typed() const { return typed_field(this, DtypeTag<S>{}); }
  template <class S>
  TypedKernels<S>& typed() { return typed_field(this, DtypeTag<S>{}); }

 private:
#define PYBN_DTYPE_ACCESS(S, name, C)                    \
  template <class Self>                                  \
  static auto& typed_field(Self* self, DtypeTag<S>) {    \
    return self->name;                                   \
  }
  PYBN_DTYPES(PYBN_DTYPE_ACCESS)
#undef PYBN_DTYPE_ACCESS
};

// Calls f(DtypeTag<S>{}) for each storage type S of PYBN_DTYPES.
template <class F>
void for_each_dtype(F&& f) {
#define PYBN_DTYPE_CALL(S, name, C) f(DtypeTag<S>{});
  PYBN_DTYPES(PYBN_DTYPE_CALL)
#undef PYBN_DTYPE_CALL
}

// The compute type of storage type S (PYBN_DTYPES).
template <class S>
struct ComputeType;
#define PYBN_COMPUTE_TYPE(S, name, C) \
  template <>                        \
  struct ComputeType<S> {            \
    using type = C;                  \
  };
PYBN_DTYPES(PYBN_COMPUTE_TYPE)
#undef PYBN_COMPUTE_TYPE
template <class S>
using compute_t = typename ComputeType<S>::type;

// Entry points for tests and benchmarks only, kept out of the kernel table.
struct DiagnosticTable {
#define PYBN_DIAGNOSTIC_FIELD(name, Args) void (*name)(const Args&) = nullptr;
  PYBN_KERNELS(PYBN_SKIP, PYBN_SKIP, PYBN_DIAGNOSTIC_FIELD)
#undef PYBN_DIAGNOSTIC_FIELD
  // The typed kernels with float storage computing in double: the storage and compute
  // types of the loops are independent, and this instantiation shows they stay so.
  TypedKernels<float> float_computing_in_double;
};

// Each ISA's tables, defined by kernels/table.cpp compiled for that ISA.
#define PYBN_DECLARE_ISA_TABLES(isa, can_run, features) \
  namespace isa {                                       \
  const KernelTable& kernel_table();                    \
  const DiagnosticTable& diagnostic_table();            \
  }
PYBN_ISAS(PYBN_DECLARE_ISA_TABLES)
#undef PYBN_DECLARE_ISA_TABLES

}  // namespace pybn
