// Batch normalization: training forward, inference forward, backward.
//
// Structured as ATen does it: the per-channel work (statistics, coefficients, running
// stats) is O(C) in double; the per-element work is one fused pass
// y = (x - mean_c) * alpha_c + beta_c (training adds one reduction pass before it;
// backward is one reduction pass and one dx pass).
//
// Statistics are accurate to the input's precision in one pass over memory. Values are
// taken in blocks; a block's sums of deviations d = x - shift give its mean and M2 as
// shift + sum(d)/n and sum(d^2) - sum(d)^2/n, which lose nothing as long as the shift is
// near the block's values. The first block of a group (short, still in L1) takes its own
// mean as the shift (a second, cached pass); every later block takes the group's running
// mean. Blocks merge with Chan et al.'s pairwise formula in double.
//
// The sums are taken in the compute type (the input's type, for float and double). Where
// one comes out non-finite (an overflow, an infinity or a NaN in the input), or a sum of
// squares or products so small that its terms lost bits to underflow, the block or group
// it belongs to is summed again in double, without overflow or underflow (exact_sums.h):
// a check per block, off the vector loops.
//
// Throughout, S is the storage type of the arrays and T the compute type (channel_loops.h).
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "channel_loops.h"
#include "exact_sums.h"
#include "kernels_isa.h"

namespace pybn {
namespace PYBN_ISA {
namespace {

// Sums of x - shift and (x - shift)^2 over one segment of channel values.
template <class S, class T>
void deviation_sums(const S* x, i64 len, T shift, double (&dev)[2]) {
  using V = Vec<T>;
  const V s = V::set1(shift);
  segment_accumulate<T, 2>(len, dev, [&](i64 i, i64 n, V* a) {
    V d = load_n<T>(x + i, n) - s;
    if (n < V::W) d = keep_first(d, n);
    a[0] = a[0] + d;
    a[1] = fma(d, d, a[1]);
  });
}

// Below this shift, deviations from it may be non-zero and still square below T's normal
// range: a non-zero d = x - shift is at least about |shift| * 2^-(digits + 1), and its
// square is normal once d is past sqrt(min).
template <class T>
double underflow_shift() {
  using Limits = std::numeric_limits<T>;
  return std::ldexp(1.0, Limits::digits + 2 + (Limits::min_exponent - 1) / 2);
}

// Whether the fast sums of n deviations d = x - shift (s1 of d, s2 of d^2, in T) hold their
// moments: finite, and s2 not the sum of squares that lost bits to underflow. s2 below n
// times the smallest normal number is trusted only for a shift large enough that no
// square underflows, or for a block of zeros.
template <class T>
bool moments_fit(double s1, double s2, double n, double shift) {
  return std::isfinite(s1 + s2) && (s2 >= n * std::numeric_limits<T>::min() ||
                                    std::abs(shift) >= underflow_shift<T>() || (s2 == 0 && s1 == 0 && shift == 0));
}

// Whether a fast sum of n products (in T) holds its value: finite, and not so small (but
// non-zero) that its terms lost bits to underflow.
template <class T>
bool product_sum_fits(double s, double n) {
  return std::isfinite(s) & ((s == 0) | (std::abs(s) >= n * std::numeric_limits<T>::min()));  // (vectorizes)
}

// Merges one block of channel values into m (see the top of this file for the shift).
template <class S, class T>
void merge_segment(const S* x, i64 len, Moments& m) {
  using V = Vec<T>;
  T shift = static_cast<T>(m.mean);
  if (m.n == 0) {
    double sum[1];
    segment_accumulate<T, 1>(len, sum, [&](i64 i, i64 n, V* a) { a[0] = a[0] + load_n<T>(x + i, n); });
    shift = static_cast<T>(sum[0] / static_cast<double>(len));
  }
  double dev[2];
  deviation_sums(x, len, shift, dev);
  const double nb = static_cast<double>(len);
  if (moments_fit<T>(dev[0], dev[1], nb, shift)) {
    m.merge(nb, shift + dev[0] / nb, std::max(0.0, dev[1] - dev[0] * (dev[0] / nb)));
  } else {
    const Moments e = exact_moments<S>(nb, [&](const auto& f) {
      for (i64 i = 0; i < len; ++i) f(static_cast<double>(x[i]));
    });
    m.merge(e.n, e.mean, e.m2);
  }
}

// Per-channel mean and M2 (sum of squared deviations), NCHW-like layouts.
template <class S, class T>
void moments_rows(const Layout& L, const S* x, double* mean, double* m2) {
  const RowGroups rg = RowGroups::make(L, sizeof(Moments), sizeof(S));
  Buffer<Moments> part = make_buffer<Moments>(rg.total());  // each starts empty (n = 0)
  parallel_for(rg.count, L.numel(), [&](i64 gbegin, i64 gend) {
    for (i64 g = gbegin; g < gend; ++g) {
      Moments* m = part.get() + rg.offset[g];
      rg.for_each_segment(L, g,
                          [&](i64 slot, i64, i64 off, i64 len) { merge_segment<S, T>(x + off, len, m[slot]); });
    }
  });
  // Each channel's states merge in group order.
  Buffer<Moments> merged = make_buffer<Moments>(L.channels);  // each starts empty
  for (i64 g = 0; g < rg.count; ++g) {
    rg.for_each_slot(L, g, [&](i64 slot, i64 c) {
      const Moments& p = part[rg.offset[g] + slot];
      merged[c].merge(p.n, p.mean, p.m2);
    });
  }
  for (i64 c = 0; c < L.channels; ++c) {
    mean[c] = merged[c].mean;
    m2[c] = merged[c].m2;
  }
}

// Adds the per-position sums of a period-mode row (len a multiple of the period) into
// per-channel sums: s[c] += acc[j] over the positions j of channel c.
// A channel's positions are summed in double vectors, then across lanes: added one after
// another they were a chain of dependent adds per channel, which left this loop at a
// quarter of a (16, 512, 4, 4) training forward (perf).
template <class T>
void fold_period(const Layout& L, const T* acc, i64 len, double* s) {
  using D = Vec<double>;
  const i64 P = L.channels * L.inner;
  for (i64 base = 0; base < len; base += P) {
    const T* a = acc + base;
    if (L.inner == 1) {
      for (i64 c = 0; c < L.channels; ++c) s[c] += a[c];
    } else {
      for (i64 c = 0; c < L.channels; ++c) {
        const T* q = a + c * L.inner;
        D t = D::zero();
        i64 k = 0;
        for (; k + D::W <= L.inner; k += D::W) t = t + load_as<double>(q + k);
        if (k < L.inner) t = t + load_as<double>(q + k, L.inner - k);
        s[c] += t.reduce_add();
      }
    }
  }
}

// Working buffers of one slice of a period-mode reduction: rows of a chunk's length and
// values per chunk channel.
template <class T>
struct PeriodScratch {
  T* sums;
  T* dsum;
  T* dsq;
  T* shift_row;
  T* shift;
  double* s1;
  double* s2;
};

// Mean and M2 of the channels of group g (Lc, see PeriodBlocks::chunk_layout) over its
// range of rows, into gm and g2 (Lc.channels values each). `n` elements of x are readable;
// kReadAhead: x is far past the L3, its lines are requested ahead (kStreamAheadBytes; a
// template argument because behind a run-time bool GCC 12 compiled the requests out).
template <class S, class T, bool kReadAhead>
void moments_period_group(const Layout& Lc, const PeriodBlocks& pb, i64 g, const S* x, i64 n,
                          const PeriodScratch<T>& w, double* gm, double* g2) {
  using V = Vec<T>;
  const i64 C = Lc.channels, RL = pb.row_len;
  double gn = 0;
  std::fill(gm, gm + C, 0.0);
  std::fill(g2, g2 + C, 0.0);
  pb.for_each(g, [&](i64 off, i64 nrows, i64 len) {
    const S* xb = x + off;
    const auto ahead = [xb, limit = n - off] {
      if constexpr (kReadAhead)
        return [xb, limit](i64 i, i64 k) { prefetch_lines(xb, i + kStreamAheadBytes / i64(sizeof(S)), k, limit); };
      else
        return NoReadAhead{};
    }();
    const double nb = static_cast<double>(nrows) * static_cast<double>(len / C), inv_nb = 1.0 / nb;
    if (gn == 0) {  // first block: shift by its own mean
      T* const acc1[1] = {w.sums};
      column_accumulate<T, 1>(
          nrows, RL, len, acc1, [&](i64 o, i64, i64 k, V* a) { a[0] = a[0] + load_n<T>(xb + o, k); }, ahead);
      std::fill(w.s1, w.s1 + C, 0.0);
      fold_period(Lc, w.sums, len, w.s1);
      for (i64 c = 0; c < C; ++c) w.shift[c] = static_cast<T>(w.s1[c] * inv_nb);
    } else {  // later blocks: shift by the group's running mean
      for (i64 c = 0; c < C; ++c) w.shift[c] = static_cast<T>(gm[c]);
    }
    fill_period(Lc, w.shift, len, w.shift_row);

    T* const acc2[2] = {w.dsum, w.dsq};
    column_accumulate<T, 2>(
        nrows, RL, len, acc2,
        [&](i64 o, i64 col, i64 k, V* a) {
          const V d = load_n<T>(xb + o, k) - load_n<T>(w.shift_row + col, k);
          a[0] = a[0] + d;
          a[1] = fma(d, d, a[1]);
        },
        ahead);
    std::fill(w.s1, w.s1 + C, 0.0);
    std::fill(w.s2, w.s2 + C, 0.0);
    fold_period(Lc, w.dsum, len, w.s1);
    fold_period(Lc, w.dsq, len, w.s2);
    // Merge the block into the group; every channel has the same counts. A non-finite
    // block sum leaves gm or g2 non-finite, and one that underflowed sets g2 to NaN, for
    // the slow path below.
    const MergeWeights merge(gn, nb);
    const double tiny = nb * std::numeric_limits<T>::min(), small_shift = underflow_shift<T>();
    for (i64 c = 0; c < C; ++c) {
      const double bmean = w.shift[c] + w.s1[c] * inv_nb;
      const double bm2 = std::max(0.0, w.s2[c] - w.s1[c] * (w.s1[c] * inv_nb));
      merge.apply(gm[c], g2[c], bmean, bm2);
      // moments_fit, in a form the loop vectorizes with
      const double shift = w.shift[c];
      if (w.s2[c] < tiny && std::abs(shift) < small_shift && (w.s2[c] != 0 || w.s1[c] != 0 || shift != 0))
        g2[c] = std::numeric_limits<double>::quiet_NaN();
    }
    gn += nb;
  });
  // The slow path, for the channels whose sums left the type's range. The group's M2 adds
  // its blocks' and the squared differences of their means (in double): a block that
  // lost bits to underflow leaves a small non-zero total; zero is a constant channel.
  const double least_m2 = gn * std::numeric_limits<T>::min();
  const auto fit = [&](i64 c) {  // (& and |, not && and ||: the counting loop below vectorizes)
    return std::isfinite(gm[c]) & std::isfinite(g2[c]) & ((g2[c] == 0) | (g2[c] >= least_m2));
  };
  i64 misfits = 0;
  for (i64 c = 0; c < C; ++c) misfits += !fit(c);
  if (misfits == 0) return;
  for (i64 c = 0; c < C; ++c) {
    if (fit(c)) continue;
    const Moments e = exact_moments<S>(gn, [&](const auto& f) {
      pb.for_each_index(Lc, g, c, [&](i64 i) { f(static_cast<double>(x[i])); });
    });
    gm[c] = e.mean;
    g2[c] = e.m2;
  }
}

// Per-channel mean and M2, channels-last-like layouts (see PeriodBlocks).
template <class S, class T>
void moments_period(const Layout& L, const S* x, double* mean, double* m2) {
  const PeriodBlocks pb = PeriodBlocks::make<S, T>(L);
  const i64 C = L.channels, R = pb.ranges, CL = pb.chunk_len, CC = pb.chunk_channels;
  // Per range of rows: the mean and M2 of every channel (one range: the results).
  Buffer<double> gmean_buf = make_buffer<double>(R > 1 ? R * C : 0), gm2_buf = make_buffer<double>(R > 1 ? R * C : 0);
  double* const gmean = R > 1 ? gmean_buf.get() : mean;
  double* const gm2 = R > 1 ? gm2_buf.get() : m2;
  const i64 slices = slice_count(pb.groups, L.numel());
  SliceBuffers<T> tbuf(slices, 4 * CL + CC);
  SliceBuffers<double> dbuf(slices, 2 * CC);
  const auto run = [&](auto read_ahead) {
    parallel_slices(pb.groups, L.numel(), slices, [&](i64 s, i64 gbegin, i64 gend) {
      T* const t = tbuf[s];
      const PeriodScratch<T> w{t, t + CL, t + 2 * CL, t + 3 * CL, t + 4 * CL, dbuf[s], dbuf[s] + CC};
      for (i64 g = gbegin; g < gend; ++g) {
        const i64 at = g / pb.chunks * C + pb.first_channel(L, g);
        moments_period_group<S, T, decltype(read_ahead)::value>(pb.chunk_layout(L, g), pb, g, x, L.numel(), w,
                                                                gmean + at, gm2 + at);
      }
    });
  };
  if (L.numel() * i64(sizeof(S)) >= kReadAheadL3Multiple * cache_sizes().l3_bytes)
    run(std::true_type{});
  else
    run(std::false_type{});
  if (R == 1) return;
  Buffer<double> counts = make_buffer<double>(R);
  for (i64 r = 0; r < R; ++r) counts[r] = static_cast<double>(pb.range_count(L, r));
  merge_equal_counts(R, C, counts.get(), gmean, gm2, mean, m2);
}

template <class S, class T>
void channel_moments(const Layout& L, const S* x, double* mean, double* m2) {
  if (L.numel() == 0) {
    std::fill(mean, mean + L.channels, 0.0);
    std::fill(m2, m2 + L.channels, 0.0);
  } else if (use_period_mode(L))
    moments_period<S, T>(L, x, mean, m2);
  else
    moments_rows<S, T>(L, x, mean, m2);
}

// ---------------------------------------------------------------------------------------
// Backward reduction: per channel, sum(g) and sum(g * xhat), g = dy masked by y > 0 when
// y is given, xhat = (x - mean) * invstd. The vector loops sum g * (x - mean); each block's
// sum is multiplied by invstd once.

template <class S, class T, bool kMask>
struct GradTerms {
  const S* dy;
  const S* x;
  const S* y;
  const param_t<S>* mean;
  const param_t<S>* invstd;
  double g_at(i64 i) const { return kMask && static_cast<double>(y[i]) <= 0 ? 0.0 : static_cast<double>(dy[i]); }
  // Adds lanes [i, i + n): a[0] += g, a[1] += g * (x - m). Padding lanes load as 0, so g
  // is 0 there and contributes nothing.
  void operator()(i64 i, i64 n, const Vec<T>& m, Vec<T>* a) const {
    Vec<T> g = load_n<T>(dy + i, n);
    if (kMask) g = keep_unless_nonpositive(load_n<T>(y + i, n), g);
    a[0] = a[0] + g;
    a[1] = fma(g, load_n<T>(x + i, n) - m, a[1]);
  }
  // Adds one segment of channel c (len values from off) into sum_g and sum_gxhat.
  void add_segment(i64 c, i64 off, i64 len, double& sum_g, double& sum_gxhat) const {
    const Vec<T> m = Vec<T>::set1(static_cast<T>(mean[c]));
    double b[2];
    segment_accumulate<T, 2>(len, b, [&](i64 i, i64 n, Vec<T>* a) { (*this)(off + i, n, m, a); });
    const bool fits = std::isfinite(b[0]) && product_sum_fits<T>(b[1], static_cast<double>(len));
    b[1] *= static_cast<double>(invstd[c]);
    if (!fits || !std::isfinite(b[1])) {
      exact_grad_sums<S>(mean[c], invstd[c], [&](const auto& f) {
        for (i64 i = off; i < off + len; ++i) f(g_at(i), static_cast<double>(x[i]));
      }, b);
    }
    sum_g += b[0];
    sum_gxhat += b[1];
  }
};

// Adds the ranges' partial sums in order: part holds, per range, C sums of g then C sums
// of g * xhat.
inline void sum_ranges(const double* part, i64 R, i64 C, double* sum_g, double* sum_gx) {
  for (i64 c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (i64 r = 0; r < R; ++r) {
      a += part[2 * r * C + c];
      b += part[2 * r * C + C + c];
    }
    sum_g[c] = a;
    sum_gx[c] = b;
  }
}

template <class S, class T, bool kMask>
void grad_sums_rows(const Layout& L, const GradTerms<S, T, kMask>& terms, double* sum_g, double* sum_gx) {
  const RowGroups rg = RowGroups::make(L, 2 * sizeof(double), sizeof(S));
  // Per group: its slots' sums of g, then their sums of g * xhat.
  Buffer<double> part = make_buffer<double>(2 * rg.total());
  parallel_for(rg.count, L.numel(), [&](i64 gbegin, i64 gend) {
    for (i64 g = gbegin; g < gend; ++g) {
      double* s0 = part.get() + 2 * rg.offset[g];
      double* s1 = s0 + rg.slots[g];
      std::fill(s0, s0 + 2 * rg.slots[g], 0.0);
      rg.for_each_segment(L, g, [&](i64 slot, i64 c, i64 off, i64 len) {
        terms.add_segment(c, off, len, s0[slot], s1[slot]);
      });
    }
  });
  // Each channel's sums add in group order.
  std::fill(sum_g, sum_g + L.channels, 0.0);
  std::fill(sum_gx, sum_gx + L.channels, 0.0);
  for (i64 g = 0; g < rg.count; ++g) {
    const double* s0 = part.get() + 2 * rg.offset[g];
    const double* s1 = s0 + rg.slots[g];
    rg.for_each_slot(L, g, [&](i64 slot, i64 c) {
      sum_g[c] += s0[slot];
      sum_gx[c] += s1[slot];
    });
  }
}

template <class S, class T, bool kMask>
void grad_sums_period(const Layout& L, const GradTerms<S, T, kMask>& terms, double* sum_g, double* sum_gx) {
  using V = Vec<T>;
  const PeriodBlocks pb = PeriodBlocks::make<S, T>(L);
  const i64 C = L.channels, RL = pb.row_len, CL = pb.chunk_len;
  Buffer<T> mean_row = make_buffer<T>(RL);
  fill_period(L, terms.mean, RL, mean_row.get());
  // Per range of rows: C sums of g, then C sums of g * xhat (one range: the results).
  const i64 R = pb.ranges;
  Buffer<double> part = make_buffer<double>(R > 1 ? 2 * R * C : 0);
  const i64 slices = slice_count(pb.groups, L.numel());
  SliceBuffers<T> acc_buf(slices, 2 * CL);

  parallel_slices(pb.groups, L.numel(), slices, [&](i64 s, i64 gbegin, i64 gend) {
    T* const acc[2] = {acc_buf[s], acc_buf[s] + CL};
    for (i64 g = gbegin; g < gend; ++g) {
      const Layout Lc = pb.chunk_layout(L, g);
      const T* const chunk_mean = mean_row.get() + g % pb.chunks * CL;
      const i64 r = g / pb.chunks, c0 = pb.first_channel(L, g);
      double* s0 = (R > 1 ? part.get() + 2 * r * C : sum_g) + c0;
      double* s1 = (R > 1 ? part.get() + 2 * r * C + C : sum_gx) + c0;
      std::fill(s0, s0 + Lc.channels, 0.0);
      std::fill(s1, s1 + Lc.channels, 0.0);
      pb.for_each(g, [&](i64 off, i64 nrows, i64 len) {
        column_accumulate<T, 2>(nrows, RL, len, acc, [&](i64 o, i64 col, i64 n, V* a) {
          terms(off + o, n, load_n<T>(chunk_mean + col, n), a);
        });
        fold_period(Lc, acc[0], len, s0);
        fold_period(Lc, acc[1], len, s1);
      });
      // To sums of g * xhat; then the slow path, for the channels whose sums left the
      // type's range.
      const double count = static_cast<double>(pb.range_count(L, r));
      i64 misfits = 0;
      for (i64 c = 0; c < Lc.channels; ++c) {
        const bool fits = std::isfinite(s0[c]) & product_sum_fits<T>(s1[c], count);
        s1[c] *= static_cast<double>(terms.invstd[c0 + c]);
        // a NaN marks the channel for the slow path
        if (!fits) s1[c] = std::numeric_limits<double>::quiet_NaN();
        misfits += !std::isfinite(s1[c]);
      }
      if (misfits == 0) continue;
      for (i64 c = 0; c < Lc.channels; ++c) {
        if (std::isfinite(s1[c])) continue;
        double b[2];
        exact_grad_sums<S>(terms.mean[c0 + c], terms.invstd[c0 + c], [&](const auto& f) {
          pb.for_each_index(Lc, g, c, [&](i64 i) { f(terms.g_at(i), static_cast<double>(terms.x[i])); });
        }, b);
        s0[c] = b[0];
        s1[c] = b[1];
      }
    }
  });
  if (R > 1) sum_ranges(part.get(), R, C, sum_g, sum_gx);
}

template <class S, class T, bool kMask>
void grad_sums(const Layout& L, const GradTerms<S, T, kMask>& terms, double* sum_g, double* sum_gx) {
  if (L.numel() == 0) {
    std::fill(sum_g, sum_g + L.channels, 0.0);
    std::fill(sum_gx, sum_gx + L.channels, 0.0);
  } else if (use_period_mode(L))
    grad_sums_period(L, terms, sum_g, sum_gx);
  else
    grad_sums_rows(L, terms, sum_g, sum_gx);
}

// ---------------------------------------------------------------------------------------
// Elementwise passes.

// xhat_scale is 1 for every invstd whose exponent is within kXhatLimit of 0.
template <class T>
constexpr int kXhatLimit = std::numeric_limits<T>::max_exponent / 4;

// ilogb(invstd) in [-kXhatLimit, kXhatLimit], decided without the call (a libm call per
// channel took most of a small array's training call: 1024 channels, about 10 us).
template <class T>
bool in_unit_range(double invstd) {
  return invstd >= std::ldexp(1.0, -kXhatLimit<T>) && invstd < std::ldexp(1.0, kXhatLimit<T> + 1);
}

// The power of two by which the elementwise passes scale x - mean for a channel of this
// invstd: 1, unless invstd is so far from 1 that x - mean may overflow (a float32 channel
// spread past about 1e9: values near 3e38 and -3e38 have a difference past the range
// where y is small), lose its low bits to underflow (a channel of subnormal values, with
// a tiny eps), or invstd^2 in the backward's coefficients leave the normal range; then
// the power of two nearest invstd, which brings x - mean to the scale of xhat.
template <class T>
double xhat_scale(double invstd) {
  using Limits = std::numeric_limits<T>;
  constexpr int kLimit = kXhatLimit<T>;
  if (in_unit_range<T>(invstd)) return 1.0;
  if (!std::isfinite(invstd)) return 1.0;
  const int e = invstd == 0 ? INT_MIN / 2 : std::ilogb(invstd);
  if (std::abs(e) <= kLimit) return 1.0;
  return std::ldexp(1.0, std::clamp(e, Limits::min_exponent - Limits::digits, Limits::max_exponent - 1));
}

// How the elementwise passes scale x - mean by a power of two s (xhat_scale, Affine::set):
// as fma(x, before, -mean * before) * after, s = before * after. Both forms give s * (x -
// mean) rounded once where nothing overflows; each overflows where the other does not. For
// s < 1 (a channel spread across the range) x - mean may overflow and x * s does not; for
// s > 1 (a tiny variance) x * s overflows for large x (a constant channel of 1e30 with eps
// 1e-30) while x - mean is small, and exact where it is tiny.
struct ScaledDeviation {
  double before, after;
  explicit ScaledDeviation(double s) : before(s > 1 ? 1.0 : s), after(s > 1 ? s : 1.0) {}
  // Channel c's entries of the three coefficient rows, for a channel of this mean.
  template <class T>
  void store(i64 c, double mean, T* before_row, T* shift_row, T* after_row) const {
    before_row[c] = static_cast<T>(before);
    shift_row[c] = static_cast<T>(-mean * before);
    after_row[c] = static_cast<T>(after);
  }
};

// The mean as a table of T, for the coefficient tables of the elementwise passes: the
// mean array itself when it holds T, else a copy (Mean::set fills channel c) in `spare`,
// which the caller allocates when P, the parameters' type (param_t), is not T.
template <class P, class T>
struct MeanTable {
  const P* source;
  T* copy;
  MeanTable(const P* mean, T* spare) : source(mean), copy(spare) {}
  static constexpr bool kCopy = !std::is_same_v<P, T>;
  // Channel c's mean, once source[c] is set.
  T set(i64 c) const {
    const T m = static_cast<T>(source[c]);
    if constexpr (kCopy) copy[c] = m;
    return m;
  }
  const T* table() const {
    if constexpr (kCopy)
      return copy;
    else
      return source;
  }
};

// p[c] in double, or `fallback` where p is null (an optional weight or bias).
template <class S>
double value_or(const S* p, i64 c, double fallback) {
  return p ? static_cast<double>(p[c]) : fallback;
}

// Per-channel coefficients of y = (x - mean) * alpha + beta (see normalize), for
// parameters of type P.
template <class P, class T>
struct Affine {
  static constexpr i64 kArrays = MeanTable<P, T>::kCopy ? 7 : 6;
  Buffer<T> data;                  // one allocation for the arrays of C below
  T *alpha, *beta;                 // alpha and beta, each rounded once from double
  // x - mean is taken as fma(x, scale, shift) * post, which is s * (x - mean), s = scale *
  // post (a power of two, see set), rounded once; and alpha / s multiplies it
  T *scale, *shift, *post, *scaled_alpha;
  MeanTable<P, T> mean;

  Affine(i64 C, const P* mean_)
      : data(make_buffer<T>(kArrays * C)), alpha(data.get()), beta(alpha + C), scale(beta + C),
        shift(scale + C), post(shift + C), scaled_alpha(post + C), mean(mean_, scaled_alpha + C) {}

  // Channel c, once the mean of channel c is set. An alpha past T's range (a weight near
  // the largest T) moves its excess into s too: only elements whose y overflows anyway
  // overflow x * s.
  static constexpr double kSmallProduct = 0x1p120;

  void set(i64 c, double invstd, double weight, double bias) const {
    constexpr int kAlphaExponent = std::numeric_limits<T>::max_exponent - 3;
    // (s_invstd and s_weight are 1 but for extreme channels: no division then, which
    // otherwise set the pace of the per-channel loops of small arrays)
    const double s_invstd = xhat_scale<T>(invstd), scaled_invstd = s_invstd == 1 ? invstd : invstd / s_invstd;
    double s_weight = 1;
    // |weight * scaled_invstd| < kSmallProduct (rounded, so the exact product is too) leaves
    // the exponents' sum below kAlphaExponent: no ilogb calls in the common case (a NaN or
    // an overflowing product takes the checks below)
    static_assert(std::numeric_limits<T>::max_exponent - 3 >= 120, "the shortcut implies e <= kAlphaExponent");
    const bool small = std::abs(weight * scaled_invstd) < kSmallProduct;
    if (!small && weight != 0 && std::isfinite(weight) && scaled_invstd != 0 && std::isfinite(scaled_invstd)) {
      const int e = std::ilogb(weight) + std::ilogb(scaled_invstd);
      if (e > kAlphaExponent) s_weight = std::ldexp(1.0, e - kAlphaExponent);
    }
    const double s = s_invstd * s_weight;
    alpha[c] = static_cast<T>(weight * invstd);
    beta[c] = static_cast<T>(bias);
    ScaledDeviation(s).store(c, static_cast<double>(mean.set(c)), scale, shift, post);
    scaled_alpha[c] = static_cast<T>((s_weight == 1 ? weight : weight / s_weight) * scaled_invstd);
  }

  // set(c, invstd[c], weight[c] or 1, bias[c] or 0) for channels [0, C), once their means
  // are set. Where every channel takes set's common case (s = 1: invstd in xhat_scale's
  // unit range, |weight * invstd| < kSmallProduct), the same values come from loops over one
  // array at a time, which vectorize; set's scalar loop was a seventh of a (16, 1024)
  // inference.
  void set_all(i64 C, const double* invstd, const P* weight, const P* bias) const {
    i64 uncommon = 0;
    for (i64 c = 0; c < C; ++c)
      uncommon += !(in_unit_range<T>(invstd[c]) && std::abs(value_or(weight, c, 1.0) * invstd[c]) < kSmallProduct);
    if (uncommon) {
      for (i64 c = 0; c < C; ++c) set(c, invstd[c], value_or(weight, c, 1.0), value_or(bias, c, 0.0));
      return;
    }
    for (i64 c = 0; c < C; ++c) alpha[c] = static_cast<T>(value_or(weight, c, 1.0) * invstd[c]);
    std::copy_n(alpha, C, scaled_alpha);
    for (i64 c = 0; c < C; ++c) beta[c] = static_cast<T>(value_or(bias, c, 0.0));
    std::fill_n(scale, C, T(1));
    std::fill_n(post, C, T(1));
    for (i64 c = 0; c < C; ++c) shift[c] = -mean.set(c);  // -mean * s, s = 1: exact
  }
};

// Whether any of v[0, n) is not 1 (NaN included). Compared as bits, which is the same test
// (1 has one encoding): GCC left the OR of float comparisons a scalar loop, a sixth of a
// (16, 1024) inference call.
template <class T>
bool any_not_one(const T* v, i64 n) {
  using Bits = std::conditional_t<sizeof(T) == 8, std::uint64_t, std::uint32_t>;
  static_assert(sizeof(Bits) == sizeof(T), "one word per value");
  const T one = 1;
  Bits one_bits, differ = 0;
  std::memcpy(&one_bits, &one, sizeof one_bits);
  for (i64 i = 0; i < n; ++i) {
    Bits b;
    std::memcpy(&b, v + i, sizeof b);
    differ |= b ^ one_bits;
  }
  return differ != 0;
}

// y = (x - mean) * alpha + beta, plus the residual when given, optionally max(., 0).
// Subtracting the mean first keeps y exact where x is near the mean even for large offsets
// (x * alpha + (beta - mean * alpha) would cancel two large products); in a memory-bound
// pass it costs nothing. The residual's add and the ReLU happen in T, so y is rounded to
// S once; y may be the residual itself, since each lane is read before it is written.
// When some channel's scale (Affine::set) is not 1, x - mean is taken as s * (x - mean)
// (ScaledDeviation) and alpha divided by s (for the other channels s = 1: the same results
// to the bit).
// Over the whole array, or over the channels of *range on the calling thread.
// After each sample's rows of a range, after_sample(o) (pipelined_channel_blocks).
template <class S, class T, class AfterSample = NoSampleHook>
void normalize(const Layout& L, const S* x, const S* residual, const Affine<param_t<S>, T>& k, bool fuse_relu, S* y,
               bool after_reduction, const ChannelRange* range = nullptr, const AfterSample& after_sample = {}) {
  using V = Vec<T>;
  const ChannelRange r = range ? *range : ChannelRange{0, L.channels};
  const bool scaled =
      any_not_one(k.scale + r.begin, r.end - r.begin) || any_not_one(k.post + r.begin, r.end - r.begin);
  const auto finish = [&](const auto& coef, const auto& op) {
    constexpr int K = std::extent_v<std::remove_reference_t<decltype(coef)>>;
    if (fuse_relu)
      channel_apply_to<S, T, K>(L, coef, y, [op](i64 i, i64 n, const V* c) { return relu(op(i, n, c)); }, range,
                                after_reduction, after_sample);
    else
      channel_apply_to<S, T, K>(L, coef, y, op, range, after_reduction, after_sample);
  };
  const auto apply = [&](const auto& coef, const auto& affine) {
    if (residual)
      finish(coef,
             [affine, residual](i64 i, i64 n, const V* c) { return affine(i, n, c) + load_n<T>(residual + i, n); });
    else
      finish(coef, affine);
  };
  if (scaled) {
    const T* const coef[5] = {k.shift, k.scale, k.post, k.scaled_alpha, k.beta};
    apply(coef,
          [x](i64 i, i64 n, const V* c) { return fma(fma(load_n<T>(x + i, n), c[1], c[0]) * c[2], c[3], c[4]); });
  } else {
    const T* const coef[3] = {k.mean.table(), k.alpha, k.beta};
    apply(coef, [x](i64 i, i64 n, const V* c) { return fma(load_n<T>(x + i, n) - c[0], c[1], c[2]); });
  }
}

// The running statistics' update of channel c (BnRunningStatsArgs), from the batch's mean
// and m2 over n values. The fused multiply-add is written out so that every path (and every
// process of a SyncBatchNorm, whatever its CPU) rounds the same way: left to the compiler,
// the AVX2 path would contract the expression and the scalar path would not.
inline double running_update(double running, double batch, double momentum) {
  return std::fma(momentum, batch, (1.0 - momentum) * running);
}

template <class S>
void update_running(S* running_mean, S* running_var, i64 c, double mean, double m2, double n, double momentum) {
  if (running_mean) running_mean[c] = static_cast<S>(running_update(running_mean[c], mean, momentum));
  if (running_var) running_var[c] = static_cast<S>(running_update(running_var[c], m2 / (n - 1.0), momentum));
}

// The normalization of x with the given mean and, per channel c, invstd_of(c) (in double).
template <class S, class T, class Invstd>
void normalize_with(const Layout& L, const S* x, const S* residual, S* y, const param_t<S>* mean,
                    const param_t<S>* weight, const param_t<S>* bias, bool relu, const Invstd& invstd_of) {
  Affine<param_t<S>, T> k(L.channels, mean);
  {
    Buffer<double> invstd = make_buffer<double>(L.channels);
    for (i64 c = 0; c < L.channels; ++c) invstd[c] = invstd_of(c);  // (a loop of its own: it vectorizes)
    k.set_all(L.channels, invstd.get(), weight, bias);
  }
  normalize(L, x, residual, k, relu, y, false);
}

}  // namespace

template <class S, class T>
void bn_train(const BnTrainArgs<S>& a) {
  const Layout& L = a.layout;
  const i64 C = L.channels;
  const double n = static_cast<double>(L.per_channel());
  using P = param_t<S>;
  Affine<P, T> k(C, a.save_mean);
  const auto invstd_of = [n, eps = a.eps](double m2) {
    const double var = m2 / n;
    // eps = 0 and a constant channel: 0/0 normalizes to 0 (PyTorch's kernels do the same)
    return var + eps == 0.0 ? 0.0 : 1.0 / std::sqrt(var + eps);
  };
  // Channel c's outputs from its statistics: saved mean and invstd, running stats (record),
  // and the normalization's coefficients (finish).
  const auto record = [&](i64 c, double mean, double m2, double invstd) {
    a.save_mean[c] = static_cast<P>(mean);
    a.save_invstd[c] = static_cast<P>(invstd);
    update_running(a.running_mean, a.running_var, c, mean, m2, n, a.momentum);
  };
  const auto finish = [&](i64 c, double mean, double m2, double invstd) {
    record(c, mean, m2, invstd);
    k.set(c, invstd, value_or(a.weight, c, 1.0), value_or(a.bias, c, 0.0));
  };
  if (const ChannelBlocks blocks = channel_block(L, sizeof(S), a.residual ? sizeof(S) : 0)) {
    const i64 slices = channel_block_slices(L, blocks);
    SliceBuffers<Moments> moments(slices, blocks.channels);
    pipelined_channel_blocks(
        L, blocks, slices,
        [&](i64 s, ChannelRange r, i64 o) {
          Moments* const m = moments[s];
          if (o == 0) std::fill(m, m + (r.end - r.begin), Moments{});
          for_each_channel_segment(L, r, o, [&](i64 c, i64 off, i64 len) {
            merge_segment<S, T>(a.x + off, len, m[c - r.begin]);
          });
        },
        [x = a.x, limit = L.numel()](i64 i, i64 len) { prefetch_lines(x, i, len, limit); },
        [&](i64 s, ChannelRange r) {
          const Moments* const m = moments[s];
          for (i64 c = r.begin; c < r.end; ++c) {
            const Moments& mc = m[c - r.begin];
            finish(c, mc.mean, mc.m2, invstd_of(mc.m2));
          }
        },
        [&](i64, ChannelRange r, const auto& after_sample) {
          normalize(L, a.x, a.residual, k, a.relu, a.y, true, &r, after_sample);
        });
    return;
  }
  {  // freed before normalize allocates its tables
    Buffer<double> mean = make_buffer<double>(C), m2 = make_buffer<double>(C), invstd = make_buffer<double>(C);
    channel_moments<S, T>(L, a.x, mean.get(), m2.get());
    // the square roots and divisions in a loop of their own, which vectorizes
    for (i64 c = 0; c < C; ++c) invstd[c] = invstd_of(m2[c]);
    for (i64 c = 0; c < C; ++c) record(c, mean[c], m2[c], invstd[c]);
    k.set_all(C, invstd.get(), a.weight, a.bias);
  }
  normalize(L, a.x, a.residual, k, a.relu, a.y, true);
}

template <class S, class T>
void bn_infer(const BnInferArgs<S>& a) {
  normalize_with<S, T>(a.layout, a.x, a.residual, a.y, a.mean, a.weight, a.bias, a.relu, [&](i64 c) {
    return 1.0 / std::sqrt(static_cast<double>(a.var[c]) + a.eps);
  });
}

template <class S, class T>
void bn_apply(const BnApplyArgs<S>& a) {
  normalize_with<S, T>(a.layout, a.x, a.residual, a.y, a.mean, a.weight, a.bias, a.relu,
                       [&](i64 c) { return a.invstd[c]; });
}

template <class S, class T>
void bn_moments(const BnMomentsArgs<S>& a) {
  channel_moments<S, T>(a.layout, a.x, a.mean, a.m2);
}

template <class S, class T>
void bn_update_running_stats(const BnRunningStatsArgs<S>& a) {
  for (i64 c = 0; c < a.channels; ++c)
    update_running(a.running_mean, a.running_var, c, a.mean[c], a.m2[c], a.count, a.momentum);
}

void bn_merge_stats(const BnMergeArgs& a) {
  const i64 C = a.channels;
  for (i64 c = 0; c < C; ++c) {
    Moments m;
    for (i64 w = 0; w < a.workers; ++w) m.merge(a.count[w * C + c], a.mean[w * C + c], a.m2[w * C + c]);
    a.merged_mean[c] = m.mean;
    // what sum((x - mean)**2) gives over values whose mean is an infinity or NaN
    a.merged_m2[c] = std::isfinite(m.mean) ? m.m2 : std::numeric_limits<double>::quiet_NaN();
  }
}

namespace {

// The per-channel sums of the backward's reduction and the values they are over.
struct GradSums {
  const double* sum_g;
  const double* sum_gxhat;
  double count;
};

// sum(g) and sum(g * xhat) per channel.
template <class S, class T, bool kMask>
void backward_reduce_impl(const BnGradInputs<S>& a, double* sum_g, double* sum_gxhat) {
  const GradTerms<S, T, kMask> terms{a.dy, a.x, a.y, a.mean, a.invstd};
  grad_sums(a.layout, terms, sum_g, sum_gxhat);
}

template <class S, class T>
void backward_reduce(const BnGradInputs<S>& a, double* sum_g, double* sum_gxhat) {
  if (a.y)
    backward_reduce_impl<S, T, true>(a, sum_g, sum_gxhat);
  else
    backward_reduce_impl<S, T, false>(a, sum_g, sum_gxhat);
}

// The exponent from which a per-channel coefficient moves its excess into s: 2^-4 of T's
// largest power of two, so that its products with values near 1 stay in range.
template <class T>
constexpr int kLargeCoefficientExponent = std::numeric_limits<T>::max_exponent - 5;

constexpr double power_of_two(int e) {
  double p = 1;
  for (; e > 0; --e) p *= 2;
  return p;
}

// k_x = a * (invstd / sx) * b, whose excess past 2^kLargeCoefficientExponent moves into sx
// (updated) by a power of two, as far as sx stays within T; computed from the factors'
// exponents there, since in float64 the product itself may overflow. The same value as the
// plain product wherever that is finite: scaling by powers of two commutes with rounding.
template <class T>
double x_coefficient(double a, double invstd, double b, double& sx) {
  const double f[3] = {a, invstd / sx, b};
  const double plain = f[0] * f[1] * f[2];
  // the common case, without the libm calls below (a per-channel cost that showed in small
  // arrays' backward); NaN goes on, and is returned below
  if (std::abs(plain) < power_of_two(kLargeCoefficientExponent<T>)) return plain;
  if (!(std::isfinite(f[0]) && std::isfinite(f[1]) && std::isfinite(f[2]))) return plain;
  // exactly 0 (the plain product is NaN where f[0] * f[1] overflowed: inf * 0)
  if (f[0] == 0 || f[1] == 0 || f[2] == 0) return 0.0;
  // (also where f[0] * f[1] overflowed though the product is in range: from the exponents)
  const int e[3] = {std::ilogb(f[0]), std::ilogb(f[1]), std::ilogb(f[2])};
  const int excess = e[0] + e[1] + e[2] - kLargeCoefficientExponent<T>;  // (the product is within 8x of 2^sum)
  const int room = std::numeric_limits<T>::max_exponent - 1 - std::ilogb(sx);
  const int moved = std::max(0, std::min(excess, room));
  sx = std::ldexp(sx, moved);
  const double mantissas = std::scalbn(f[0], -e[0]) * std::scalbn(f[1], -e[1]) * std::scalbn(f[2], -e[2]);
  return std::ldexp(mantissas, e[0] + e[1] + e[2] - moved);
}

// The dx pass's coefficients of channels [r.begin, r.end) where no channel needs a
// power-of-two scale (every invstd in xhat_scale's unit range and every k_x below
// x_coefficient's limit; or not training, where k_dy alone is used): the values of the
// per-channel loop in backward_apply_impl, from loops over one array at a time, which
// vectorize. That loop, scalar, took half of a (2, 4096) backward (perf). Returns false
// when some channel needs the scale (or is NaN): that loop then sets every row again.
template <class T, class P>
bool common_dx_coefficients(const P* invstd, const P* weight, bool training, const GradSums& s, ChannelRange r,
                            T* k_dy, T* k_x, T* k_0, const MeanTable<P, T>& mean) {
  constexpr double kLimit = power_of_two(kLargeCoefficientExponent<T>);
  const double n = s.count;
  i64 uncommon = 0;
  for (i64 c = r.begin; c < r.end; ++c) {
    const double v = invstd[c];
    const double scale = value_or(weight, c, 1.0) * v;
    k_dy[c] = static_cast<T>(scale);
    if (!training) continue;  // (loop-invariant: unswitched)
    const double kx = -scale * v * (s.sum_gxhat[c] / n);  // (x_coefficient's product, for s = 1)
    uncommon += !(in_unit_range<T>(v) && std::abs(kx) < kLimit);
    k_x[c] = static_cast<T>(kx);  // (written either way: the scalar loop rewrites every row)
    k_0[c] = static_cast<T>(-scale * (s.sum_g[c] / n));
  }
  if (uncommon) return false;
  if constexpr (MeanTable<P, T>::kCopy)
    for (i64 c = r.begin; c < r.end; ++c) mean.set(c);
  return true;
}

// Scratch of the dx pass: 6 rows of C coefficients, and a seventh for the mean when it is
// not held in T.
template <class S, class T>
constexpr i64 kDxRows = MeanTable<param_t<S>, T>::kCopy ? 7 : 6;

// dx = k_dy * g + k_x * (x - mean) + k_0 from the reduced sums (see BnGradApplyArgs), over
// the whole array, or over the channels of *range on the calling thread; k holds kDxRows
// rows of C. With `training` false the statistics are constants: dx = k_dy * g. When some
// channel's scale is not 1, x - mean is taken as s * (x - mean) (ScaledDeviation) and k_x
// divided by s (for the other channels s = 1: the same results to the bit). s is
// xhat_scale(invstd), times the power of two that brings k_x into T's range where it is
// not (a large dy: k_x past float32's range where every dx is within it).
// With kResidual, the same pass writes g to dr, the gradient of a residual the forward
// added before its ReLU; dr may be dy itself (each lane is read before it is written). Its
// stores are ordinary ones: dr's alignment relative to dx's, which the loops align for
// streaming, is arbitrary.
// After each sample's rows of a range, after_sample(o) (pipelined_channel_blocks).
template <class S, class T, bool kMask, bool kResidual, class AfterSample = NoSampleHook>
void backward_apply_impl(const BnGradInputs<S>& a, const param_t<S>* weight, bool training, const GradSums& s, S* dx,
                         S* dr, T* k, const ChannelRange* range = nullptr, const AfterSample& after_sample = {}) {
  using V = Vec<T>;
  const Layout& L = a.layout;
  const i64 C = L.channels;
  const double n = s.count;
  T* const k_dy = k;
  T* const k_x = k + C;
  T* const k_0 = k + 2 * C;
  T* const scale_x = k + 3 * C;
  T* const shift_x = k + 4 * C;
  T* const post_x = k + 5 * C;
  const MeanTable<param_t<S>, T> mean(a.mean, k + 6 * C);
  const ChannelRange r = range ? *range : ChannelRange{0, C};
  bool scaled = false;
  if (!common_dx_coefficients<T>(a.invstd, weight, training, s, r, k_dy, k_x, k_0, mean)) {
    for (i64 c = r.begin; c < r.end; ++c) {
      const double invstd = a.invstd[c];
      const double scale = value_or(weight, c, 1.0) * invstd;
      double sx = xhat_scale<T>(invstd);
      const double kx = x_coefficient<T>(-scale, invstd, s.sum_gxhat[c] / n, sx);
      scaled |= sx != 1.0;
      k_dy[c] = static_cast<T>(scale);
      k_x[c] = static_cast<T>(kx);
      k_0[c] = static_cast<T>(-scale * (s.sum_g[c] / n));
      ScaledDeviation(sx).store(c, static_cast<double>(mean.set(c)), scale_x, shift_x, post_x);
    }
  }
  const S* dy = a.dy;
  const S* x = a.x;
  const S* y = a.y;
  auto grad = [dy, y, dr](i64 i, i64 n) {
    V g = load_n<T>(dy + i, n);
    if (kMask) g = keep_unless_nonpositive(load_n<T>(y + i, n), g);
    if constexpr (kResidual) store_lanes(g, dr + i, n);
    return g;
  };
  if (training && scaled) {
    const T* const coef[6] = {k_dy, k_x, shift_x, scale_x, k_0, post_x};
    channel_apply_to<S, T, 6>(
        L, coef, dx,
        [=](i64 i, i64 n, const V* c) {
          return fma(c[1], fma(load_n<T>(x + i, n), c[3], c[2]) * c[5], fma(c[0], grad(i, n), c[4]));
        },
        range, true, after_sample);
  } else if (training) {
    const T* const coef[4] = {k_dy, k_x, mean.table(), k_0};
    channel_apply_to<S, T, 4>(
        L, coef, dx,
        [=](i64 i, i64 n, const V* c) { return fma(c[1], load_n<T>(x + i, n) - c[2], fma(c[0], grad(i, n), c[3])); },
        range, true, after_sample);
  } else {
    const T* const coef[1] = {k_dy};
    channel_apply_to<S, T, 1>(L, coef, dx, [=](i64 i, i64 n, const V* c) { return c[0] * grad(i, n); }, range,
                              true, after_sample);
  }
}

// Calls f(kMask, kResidual) with the backward's variant as compile-time constants: g masked
// by y (the forward fused a ReLU), and g written to dr (the forward added a residual).
template <class S, class F>
void with_grad_variant(const BnGradInputs<S>& a, const S* dr, const F& f) {
  const auto with_residual = [&](auto mask) {
    if (dr)
      f(mask, std::true_type{});
    else
      f(mask, std::false_type{});
  };
  if (a.y)
    with_residual(std::true_type{});
  else
    with_residual(std::false_type{});
}

template <class S, class T>
void backward_apply(const BnGradInputs<S>& a, const param_t<S>* weight, bool training, const GradSums& s, S* dx,
                    S* dr) {
  Buffer<T> k = make_buffer<T>(kDxRows<S, T> * a.layout.channels);
  with_grad_variant(a, dr, [&](auto mask, auto residual) {
    backward_apply_impl<S, T, decltype(mask)::value, decltype(residual)::value>(a, weight, training, s, dx, dr,
                                                                                  k.get());
  });
}

// The single-process backward's parameter gradients: dweight = sum(g * xhat), dbias = sum(g).
template <class S>
void store_param_grads(const BnBackwardArgs<S>& a, const GradSums& s, ChannelRange r) {
  for (i64 c = r.begin; c < r.end; ++c) {
    a.dweight[c] = static_cast<param_t<S>>(s.sum_gxhat[c]);
    a.dbias[c] = static_cast<param_t<S>>(s.sum_g[c]);
  }
}

// The single-process backward per block of channels (see channel_block): each block's
// sums, then its dx while dy and x are still in the cache, the next block's sums read in
// between (pipelined_channel_blocks).
template <class S, class T, bool kMask, bool kResidual>
void backward_blocked(const BnBackwardArgs<S>& a, double* sum_g, double* sum_gxhat, ChannelBlocks blocks) {
  const Layout& L = a.layout;
  const GradTerms<S, T, kMask> terms{a.dy, a.x, a.y, a.mean, a.invstd};
  const GradSums s{sum_g, sum_gxhat, static_cast<double>(L.per_channel())};
  Buffer<T> k = make_buffer<T>(kDxRows<S, T> * L.channels);
  pipelined_channel_blocks(
      L, blocks, channel_block_slices(L, blocks),
      [&](i64, ChannelRange r, i64 o) {
        if (o == 0) {
          std::fill(sum_g + r.begin, sum_g + r.end, 0.0);
          std::fill(sum_gxhat + r.begin, sum_gxhat + r.end, 0.0);
        }
        for_each_channel_segment(L, r, o, [&](i64 c, i64 off, i64 len) {
          terms.add_segment(c, off, len, sum_g[c], sum_gxhat[c]);
        });
      },
      [x = a.x, dy = a.dy, y = a.y, limit = L.numel()](i64 i, i64 len) {
        prefetch_lines(x, i, len, limit);
        prefetch_lines(dy, i, len, limit);
        if (kMask) prefetch_lines(y, i, len, limit);
      },
      [&](i64, ChannelRange r) { store_param_grads(a, s, r); },
      [&](i64, ChannelRange r, const auto& after_sample) {
        backward_apply_impl<S, T, kMask, kResidual>(a, a.weight, a.training, s, a.dx, a.d_residual, k.get(), &r,
                                                    after_sample);
      });
}

}  // namespace

template <class S, class T>
void bn_backward_reduce(const BnGradReduceArgs<S>& a) {
  backward_reduce<S, T>(a, a.sum_g, a.sum_gxhat);
}

template <class S, class T>
void bn_backward_apply(const BnGradApplyArgs<S>& a) {
  backward_apply<S, T>(a, a.weight, true, GradSums{a.sum_g, a.sum_gxhat, a.count}, a.dx, a.d_residual);
}

// The single-process backward: both phases, with this process's sums and count; for large
// NCHW-like arrays, both per block of channels.
template <class S, class T>
void bn_backward(const BnBackwardArgs<S>& a) {
  const i64 C = a.layout.channels;
  Buffer<double> sum_g = make_buffer<double>(C), sum_gxhat = make_buffer<double>(C);
  if (a.training) {
    if (const ChannelBlocks blocks = channel_block(a.layout, (a.y ? 3 : 2) * i64(sizeof(S)))) {
      with_grad_variant(a, a.d_residual, [&](auto mask, auto residual) {
        backward_blocked<S, T, decltype(mask)::value, decltype(residual)::value>(a, sum_g.get(), sum_gxhat.get(),
                                                                                   blocks);
      });
      return;
    }
  }
  const GradSums s{sum_g.get(), sum_gxhat.get(), static_cast<double>(a.layout.per_channel())};
  backward_reduce<S, T>(a, sum_g.get(), sum_gxhat.get());
  store_param_grads(a, s, ChannelRange{0, C});
  backward_apply<S, T>(a, a.weight, a.training, s, a.dx, a.d_residual);
}

PYBN_FILL_FAMILY(batchnorm)

}  // namespace PYBN_ISA
}  // namespace pybn
