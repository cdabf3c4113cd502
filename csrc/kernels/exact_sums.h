// The reductions' slow path: per-channel sums that hold for any finite input.
//
// The fast reductions accumulate in the input's type (float lanes, for float32), which
// overflows long before the statistics do: float32 values near 3e38 overflow their sum,
// values past about 1e19 their squares, and float64 the same near 1e308 and 1e154. A sum
// that comes out non-finite is recomputed here, once per block or group that needs it:
// in double, and for float64 input scaled by a power of two (exact) so that no
// intermediate leaves double's range unless the result itself does. Infinities and NaN
// in the input give what IEEE arithmetic gives on the definitions: the mean of {+inf,
// finite} is +inf, of {+inf, -inf} NaN, and any infinity makes the variance NaN.
//
// Included by kernel sources only (everything lands in this ISA's namespace).
#pragma once
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace pybn {
namespace PYBN_ISA {

// One step of Chan et al.'s pairwise merge, for sets of n and nb values: their count ratios,
// and apply() merging a second set's (mean_b, m2_b) into the first's (mean, m2). Means
// whose difference is not finite (an infinity or a NaN among the values, or float64 means
// of opposite signs past half the range) are combined as a weighted sum, which IEEE
// arithmetic takes through infinities and which cannot overflow; M2 then takes the
// non-finite term.
struct MergeWeights {
  double b, a, m2;  // nb / total, n / total, n * nb / total

  MergeWeights(double n, double nb) {
    const double total = n + nb;
    b = nb / total;
    a = n / total;
    m2 = n * nb / total;
  }
  void apply(double& mean, double& m2_sum, double mean_b, double m2_b) const {
    const double delta = mean_b - mean;
    mean = std::isfinite(delta) ? mean + delta * b : mean * a + mean_b * b;
    m2_sum += m2_b + delta * delta * m2;
  }
};

// Count, mean and sum of squared deviations (M2) of a set of values.
struct Moments {
  double n = 0, mean = 0, m2 = 0;

  void merge(double nb, double mean_b, double m2_b) {
    if (nb == 0) return;
    if (n == 0) {
      mean = mean_b;
      m2 = m2_b;
    } else {
      MergeWeights(n, nb).apply(mean, m2, mean_b, m2_b);
    }
    n += nb;
  }
};

// Moments::merge of `parts` partial results into every channel at once, for parts that
// hold the same count in every channel (the ranges of rows of a period-mode reduction):
// each part's count ratios, and their divisions, are computed once instead of once per
// channel, which left the channel loop bound by divisions. Part r's value for channel c is
// at [r * channels + c].
inline void merge_equal_counts(std::int64_t parts, std::int64_t channels, const double* count,
                               const double* part_mean, const double* part_m2, double* mean, double* m2) {
  std::fill(mean, mean + channels, 0.0);
  std::fill(m2, m2 + channels, 0.0);
  double n = 0;
  for (std::int64_t r = 0; r < parts; ++r) {
    const double nb = count[r];
    if (nb == 0) continue;
    const double* mb = part_mean + r * channels;
    const double* qb = part_m2 + r * channels;
    if (n == 0) {
      std::copy(mb, mb + channels, mean);
      std::copy(qb, qb + channels, m2);
    } else {
      const MergeWeights w(n, nb);
      for (std::int64_t c = 0; c < channels; ++c) w.apply(mean[c], m2[c], mb[c], qb[c]);
    }
    n += nb;
  }
}

// The power of two e such that the values times 2^-e are at most about 1 in magnitude:
// scaled so, no sum of them (or of products of two such sets) leaves double's range.
// 0 for float input, which double holds with room to spare, and when the values hold an
// infinity or a NaN, whose results need no scaling. each(f) calls f(value) per value.
template <class T, class Each>
int range_exponent([[maybe_unused]] const Each& each) {
  if constexpr (!std::is_same_v<T, double>) {
    return 0;
  } else {
    double big = 0;
    bool finite = true;
    each([&](double v) {
      finite &= std::isfinite(v);
      big = std::max(big, std::abs(v));
    });
    if (!finite || big == 0) return 0;
    return std::clamp(std::ilogb(big), -1022, 1023);  // 2^-e is a double
  }
}

// Moments of the values each(f) visits (f(value) per value), n of them; three passes (four
// for float64) in double. The second corrects the mean by the mean of the deviations from
// it: the sum's roundings leave it some ulps off (sixteen float64 values of 1e160 summed
// one after another give a mean that is not 1e160, and m2 = 1.6e290 for a constant channel).
template <class T, class Each>
Moments exact_moments(double n, const Each& each) {
  const int e = range_exponent<T>(each);
  const double scale = std::ldexp(1.0, -e);
  double sum = 0;
  each([&](double v) { sum += v * scale; });
  double mean = sum / n, deviations = 0;
  each([&](double v) { deviations += v * scale - mean; });
  if (std::isfinite(deviations)) mean += deviations / n;
  double m2 = 0;
  each([&](double v) {
    const double d = v * scale - mean;
    m2 += d * d;
  });
  Moments m;
  m.n = n;
  m.mean = std::ldexp(mean, e);
  m.m2 = std::ldexp(m2, 2 * e);
  return m;
}

// sum(g) and sum(g * (x - mean) * invstd) over the pairs each(f) visits (f(g, x) per
// pair), in double; into out[0] and out[1]. invstd joins before the sum leaves its scale:
// sum(g * (x - mean)) may be out of range where the result is not (invstd 0 or tiny).
template <class T, class Each>
void exact_grad_sums(double mean, double invstd, const Each& each, double (&out)[2]) {
  const int eg = range_exponent<T>([&](const auto& f) { each([&](double g, double) { f(g); }); });
  const int ex = range_exponent<T>([&](const auto& f) {
    f(mean);
    each([&](double, double x) { f(x); });
  });
  const double sg = std::ldexp(1.0, -eg), sx = std::ldexp(1.0, -ex), m = mean * sx;
  double a = 0, b = 0;
  each([&](double g, double x) {
    a += g * sg;
    b += (g * sg) * (x * sx - m);
  });
  out[0] = std::ldexp(a, eg);
  // b * invstd * 2^(eg + ex), scaled last (b * 2^(eg + ex) alone may overflow, or lose bits
  // as a subnormal), unless b * invstd overflows
  const double scaled_last = std::ldexp(b * invstd, eg + ex);
  out[1] = std::isfinite(b * invstd) ? scaled_last : std::ldexp(b, eg + ex) * invstd;
}

}  // namespace PYBN_ISA
}  // namespace pybn
