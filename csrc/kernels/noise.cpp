// Alpha dropout and Gaussian noise on the counter stream of dropout (docs/dropout.md):
// alpha dropout on dropout's keep bits, Gaussian dropout and noise on normal variates
// made from the same Philox words by Box-Muller. Every element's value depends only on
// (seed, offset, its index), never on the thread split, the ISA or the dtype.
//
// The normal variates are computed in float by the same IEEE operations on every path
// (adds, products, one division and one square root, each correctly rounded, in a fixed
// order, with no fma: this file is compiled with -ffp-contract=off, CMakeLists.txt), over
// the vectors of vec.h: the same operations on the same values give the same bits whatever
// the vector width, so the paths agree bit for bit (tests/test_noise.py).
#include <cstring>

#include "channel_loops.h"
#include "keep_pass.h"
#include "kernels_isa.h"
#include "philox.h"

namespace pybn {
namespace PYBN_ISA {
namespace {

using F32 = Vec<float>;
static_assert(sizeof(U32) == 4 * U32::W, "a vector of 32-bit words is its lanes, in order");
static_assert(F32::W == U32::W, "a float per 32-bit word");

inline F32 constant(float c) { return F32::set1(c); }
inline U32 constant(std::uint32_t c) { return U32::set1(c); }

// u in (0, 1] from a 32-bit word: the odd 31-bit integer (w >> 1) | 1, rounded to float,
// times 2**-31. Never 0 (the least is 2**-31), so the logarithm is always finite.
inline F32 unit_from_word(U32 w) {
  return int32_to_float(shift_right<1>(w) | constant(1u)) * constant(0x1p-31f);
}

// ln u for a normal float u > 0: u = m * 2**e with m in [sqrt(1/2), sqrt(2)), and
// ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its series to s**9 (the next
// term is below 2**-27 of the sum); e * ln 2 in two parts, the first exact.
inline F32 log_unit(F32 u) {
  constexpr float kLn2Hi = 0.693145751953125f;       // 16 significant bits: e * kLn2Hi is exact
  constexpr float kLn2Lo = 1.428606765330187e-06f;   // ln 2 - kLn2Hi
  const U32 b = as_bits(u);
  const U32 e = shift_right_signed<23>(b - constant(0x3F3504F3u));  // 0x3F3504F3: sqrt(1/2)
  const F32 m = as_float(b - shift_left<23>(e));
  const F32 f = m - constant(1.0f);  // exact (Sterbenz)
  const F32 s = f / (m + constant(1.0f));
  const F32 s2 = s * s;
  const F32 p = s2 * (constant(1.0f / 3) +
                      s2 * (constant(1.0f / 5) + s2 * (constant(1.0f / 7) + s2 * constant(1.0f / 9))));
  const F32 half_log = s + s * p;
  const F32 ef = int32_to_float(e);
  return ef * constant(kLn2Hi) + (ef * constant(kLn2Lo) + (half_log + half_log));
}

// The angle of a 32-bit word: quadrant q = w >> 30 and phi = k * pi/4 * 2**-24 with k the
// odd integer of the next 25 bits centred on 0, |phi| < pi/4; the angle q * pi/2 + phi is
// uniform on 2**26 points of the circle.
inline F32 reduced_angle(U32 w) {
  constexpr float kStep = 0.785398163397448309616f * 0x1p-24f;  // pi/4 * 2**-24, rounded once
  const U32 k = ((shift_right<5>(w) & constant(0x1FFFFFFu)) | constant(1u)) - constant(1u << 24);
  return int32_to_float(k) * constant(kStep);  // k has at most 24 bits: exact in float
}

// sin and cos of |phi| < pi/4 by their Taylor polynomials (to phi**9 and phi**10: the
// next terms are below 2**-28 and 2**-32 of the value).
inline F32 sin_reduced(F32 phi) {
  const F32 p2 = phi * phi;
  return phi + phi * (p2 * (constant(-1.0f / 6) +
                            p2 * (constant(1.0f / 120) + p2 * (constant(-1.0f / 5040) + p2 * constant(1.0f / 362880)))));
}

inline F32 cos_reduced(F32 phi) {
  const F32 p2 = phi * phi;
  return constant(1.0f) +
         p2 * (constant(-0.5f) +
               p2 * (constant(1.0f / 24) +
                     p2 * (constant(-1.0f / 720) + p2 * (constant(1.0f / 40320) + p2 * constant(-1.0f / 3628800)))));
}

// Elements per group of 16 counters: 64 words, two per normal pair.
constexpr i64 kNormalGroup = 64;
constexpr int kCounters = 16;
constexpr int kWordVectors = kCounters / U32::W;  // vectors of one word j of the 16 counters

// The 64 variates of one group from its words (vector q of r holds words q * W to q * W + W
// of the group, w[16j + c] being word j of counter c, as MaskStream gives them): for pair
// p in {0, 1} and counter c, R = sqrt(-2 ln u) of word 2p and the angle of word 2p + 1 give
// element 32p + c = R cos, 32p + 16 + c = R sin, so z's vectors sit where their words do.
inline void box_muller(const U32 (&r)[kHalfVectors], float* z) {
  static_assert(kHalfVectors == 4 * kWordVectors, "a group is 4 words of 16 counters");
  for (int p = 0; p < 2; ++p) {
    for (int h = 0; h < kWordVectors; ++h) {
      const int radius = 2 * p * kWordVectors + h, angle = radius + kWordVectors;
      const F32 length = sqrt(constant(-2.0f) * log_unit(unit_from_word(r[radius])));
      const U32 q = shift_right<30>(r[angle]);
      const F32 phi = reduced_angle(r[angle]);
      const U32 cb = as_bits(cos_reduced(phi)), sb = as_bits(sin_reduced(phi));
      // rotate (cos, sin) by q quarter turns: swap for odd q, then the signs of the quadrant
      const U32 one = constant(1u);
      const U32 swap = (cb ^ sb) & (U32::zero() - (q & one));
      const U32 cos_sign = shift_left<31>(q ^ shift_right<1>(q)), sin_sign = shift_left<31>(shift_right<1>(q));
      (length * as_float(cb ^ swap ^ cos_sign)).store(z + radius * U32::W);
      (length * as_float(sb ^ swap ^ sin_sign)).store(z + angle * U32::W);
    }
  }
}

// The normal variates of consecutive groups of the counter stream, for a thread that walks
// its elements in ascending order: at(e, len, group_start) gives the variates of the group
// holding elements [e, e + len) (len <= a vector, within at most two groups), generating
// groups NG at a time when they are first needed.
class NormalStream {
 public:
  NormalStream(std::uint64_t seed, std::uint64_t offset, i64 g0)
      : stream_(seed, offset, static_cast<std::uint64_t>(g0)), first_(g0), next_(g0) {}

  // The variates of the group holding element e, and the index of that group's first element.
  const float* at(i64 e, i64 len, i64& group_start) {
    const i64 ga = e / kNormalGroup, gl = (e + len - 1) / kNormalGroup;
    if (gl >= next_) refill(ga, gl);
    group_start = ga * kNormalGroup;
    return buf_ + (ga - first_) * kNormalGroup;
  }

 private:
  static constexpr int NG = kGroupsAtOnce;
  static constexpr i64 kCapacity = 2 + NG;  // groups [ga, gl] (two at most) and a batch

  // Keeps the groups from ga on (ga >= first_: elements come in ascending order) and
  // generates up to group gl.
  void refill(i64 ga, i64 gl) {
    const i64 kept = std::max<i64>(0, next_ - ga);
    if (kept > 0) std::memmove(buf_, buf_ + (ga - first_) * kNormalGroup, kept * kNormalGroup * sizeof(float));
    first_ = ga;
    while (next_ <= gl) {
      U32 r[NG][kHalfVectors];
      stream_.next(r);
      for (int i = 0; i < NG; ++i) box_muller(r[i], buf_ + (next_ - first_ + i) * kNormalGroup);
      next_ += NG;
    }
  }

  MaskStream<NG> stream_;
  i64 first_, next_;  // buf_ holds groups [first_, next_)
  alignas(64) float buf_[kCapacity * kNormalGroup] = {};
};

// y[i, i + n) = op(i, n, z) over a thread's elements [start, end), in vectors (aligned ones
// when streaming); z points at element i's normal variate. When the output's groups start
// on vector boundaries (always when not streaming, and for the aligned outputs pybn
// allocates) whole groups are walked with one lookup each, not one per vector.
template <bool kStream, class T, class S, class Op>
void walk(S* y, i64 start, i64 end, NormalStream& normals, const Op& op) {
  constexpr i64 W = Vec<T>::W, G = kNormalGroup;
  static_assert(G % W == 0, "groups hold whole vectors");
  const auto step = [&](i64 i, i64 n) {
    i64 g0;
    const float* z = normals.at(i, n, g0);
    put<kStream>(y + i, op(i, n, z + (i - g0)), n);
  };
  i64 i = start;
  bool whole_groups = true;
  if constexpr (kStream) whole_groups = lanes_to_alignment(y + start) == 0;
  if (whole_groups) {
    for (; i + G <= end; i += G) {
      i64 g0;
      const float* z = normals.at(i, G, g0);
#pragma GCC unroll 4
      for (i64 v = 0; v < G; v += W) put<kStream>(y + i + v, op(i + v, W, z + v), W);
    }
  } else if (const i64 nh = head_lanes<kStream>(y + i, end - i)) {
    step(i, nh);
    i += nh;
  }
  for (; i + W <= end; i += W) step(i, W);
  if (i < end) step(i, end - i);
  if (kStream) stream_fence();
}

}  // namespace

// On dropout's keep pass (keep_pass.h): the keep bits are dropout's bit for bit.
template <class S, class T>
void alpha_dropout(const AlphaDropoutArgs<S>& a) {
  using V = Vec<T>;
  const T at = static_cast<T>(a.a), bt = static_cast<T>(a.b), ct = static_cast<T>(a.c);
  const V scale = V::set1(at), shift = V::set1(bt), dropped = V::set1(bt - ct);
  keep_pass<S, T>(a, [scale, shift, dropped](std::uint32_t bits, const V& x) {
    return select_bits(bits, x * scale + shift, dropped);
  });
}

template <class S, class T>
void gaussian_noise(const GaussianNoiseArgs<S>& a) {
  using V = Vec<T>;
  const V sigma = V::set1(static_cast<T>(a.sigma)), one = V::set1(T(1));
  const i64 groups = (a.n + kNormalGroup - 1) / kNormalGroup;
  with_streaming<S, T>(a.n, [&](auto stream) {
    parallel_for(groups, a.n, [&](i64 gb, i64 ge) {
      NormalStream normals(a.seed, a.offset, gb);
      walk<decltype(stream)::value, T>(a.y, gb * kNormalGroup, std::min(ge * kNormalGroup, a.n), normals,
                                       [&](i64 i, i64 n, const float* z) {
        const V noise = sigma * load_n<T>(z, n);
        const V x = load_n<T>(a.x + i, n);
        if (!a.multiply) return x + noise;
        if constexpr (is_16bit<S>)  // the exact product rounded once by the store (dropout.cpp)
          return mul_round_to_odd(x, one + noise);
        else
          return x * (one + noise);
      });
    });
  });
}

// The steps of the normal stream's arithmetic on pairs of words (radius word, angle word),
// W pairs at a time; the words of a last partial vector are padded with zeros.
void normal_math(const NormalMathArgs& a) {
  constexpr int W = U32::W;
  for (i64 i = 0; i < a.n; i += W) {
    const i64 n = std::min<i64>(W, a.n - i);
    std::uint32_t radius_words[W] = {}, angle_words[W] = {};
    for (i64 j = 0; j < n; ++j) {
      radius_words[j] = a.words[2 * (i + j)];
      angle_words[j] = a.words[2 * (i + j) + 1];
    }
    U32 radius, angle;
    std::memcpy(&radius, radius_words, sizeof radius);
    std::memcpy(&angle, angle_words, sizeof angle);
    const F32 u = unit_from_word(radius), phi = reduced_angle(angle);
    float values[5][W];
    u.store(values[0]);
    log_unit(u).store(values[1]);
    phi.store(values[2]);
    cos_reduced(phi).store(values[3]);
    sin_reduced(phi).store(values[4]);
    for (i64 j = 0; j < n; ++j)
      for (int k = 0; k < 5; ++k) a.out[5 * (i + j) + k] = values[k][j];
  }
}

PYBN_FILL_FAMILY(noise)

}  // namespace PYBN_ISA
}  // namespace pybn
