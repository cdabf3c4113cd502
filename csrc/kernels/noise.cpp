// Alpha dropout and Gaussian noise on the counter stream of dropout (docs/dropout.md):
// alpha dropout on dropout's keep bits, Gaussian dropout and noise on normal variates
// made from the same Philox words by Box-Muller. Every element's value depends only on
// (seed, offset, its index), never on the thread split, the ISA or the dtype.
//
// The normal variates are computed in float by the same IEEE operations on every path
// (adds, products, one division and one square root, each correctly rounded, in a fixed
// order, with no fma: this file is compiled with -ffp-contract=off, CMakeLists.txt), as
// loops over the 16 lanes of a group's counters that each path's compiler vectorises for
// its own registers. The same operations on the same values give the same bits whatever
// the vector width, so the paths agree bit for bit (tests/test_noise.py).
#include <cstring>

#include "channel_loops.h"
#include "keep_pass.h"
#include "kernels_isa.h"
#include "philox.h"

namespace pybn {
namespace PYBN_ISA {
namespace {

static_assert(sizeof(U32) == 4 * U32::W, "a vector of 32-bit words is its lanes, in order");

inline std::uint32_t bits_of(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float float_of(std::uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// u in (0, 1] from a 32-bit word: the odd 31-bit integer (w >> 1) | 1, rounded to float,
// times 2**-31. Never 0 (the least is 2**-31), so the logarithm is always finite.
inline float unit_from_word(std::uint32_t w) {
  return static_cast<float>(static_cast<std::int32_t>((w >> 1) | 1u)) * 0x1p-31f;
}

// ln u for a normal float u > 0: u = m * 2**e with m in [sqrt(1/2), sqrt(2)), and
// ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its series to s**9 (the next
// term is below 2**-27 of the sum); e * ln 2 in two parts, the first exact.
inline float log_unit(float u) {
  constexpr float kLn2Hi = 0.693145751953125f;       // 16 significant bits: e * kLn2Hi is exact
  constexpr float kLn2Lo = 1.428606765330187e-06f;   // ln 2 - kLn2Hi
  const std::uint32_t b = bits_of(u);
  const std::int32_t e = static_cast<std::int32_t>(b - 0x3F3504F3u) >> 23;  // 0x3F3504F3: sqrt(1/2)
  const float m = float_of(b - (static_cast<std::uint32_t>(e) << 23));
  const float f = m - 1.0f;  // exact (Sterbenz)
  const float s = f / (m + 1.0f);
  const float s2 = s * s;
  const float p = s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
  const float half_log = s + s * p;
  const float ef = static_cast<float>(e);
  return ef * kLn2Hi + (ef * kLn2Lo + (half_log + half_log));
}

// The angle of a 32-bit word: quadrant q = w >> 30 and phi = k * pi/4 * 2**-24 with k the
// odd integer of the next 25 bits centred on 0, |phi| < pi/4; the angle q * pi/2 + phi is
// uniform on 2**26 points of the circle.
inline float reduced_angle(std::uint32_t w) {
  constexpr float kStep = 0.785398163397448309616f * 0x1p-24f;  // pi/4 * 2**-24, rounded once
  const std::int32_t k = static_cast<std::int32_t>(((w >> 5) & 0x1FFFFFFu) | 1u) - (1 << 24);
  return static_cast<float>(k) * kStep;  // k has at most 24 bits: exact in float
}

// sin and cos of |phi| < pi/4 by their Taylor polynomials (to phi**9 and phi**10: the
// next terms are below 2**-28 and 2**-32 of the value).
inline float sin_reduced(float phi) {
  const float p2 = phi * phi;
  return phi + phi * (p2 * (-1.0f / 6 + p2 * (1.0f / 120 + p2 * (-1.0f / 5040 + p2 * (1.0f / 362880)))));
}

inline float cos_reduced(float phi) {
  const float p2 = phi * phi;
  return 1.0f +
         p2 * (-0.5f + p2 * (1.0f / 24 + p2 * (-1.0f / 720 + p2 * (1.0f / 40320 + p2 * (-1.0f / 3628800)))));
}

// Elements per group of 16 counters: 64 words, two per normal pair.
constexpr i64 kNormalGroup = 64;
constexpr int kCounters = 16;

// The 64 variates of one group from its words (w[16j + c] is word j of counter c, as
// MaskStream's vectors hold them): for pair p in {0, 1} and counter c, R = sqrt(-2 ln u)
// of word 2p and the angle of word 2p + 1 give element 32p + c = R cos, 32p + 16 + c = R sin.
inline void box_muller(const std::uint32_t (&w)[kNormalGroup], float (&z)[kNormalGroup]) {
  for (int p = 0; p < 2; ++p) {
    const std::uint32_t* radius_words = w + 32 * p;
    const std::uint32_t* angle_words = w + 32 * p + kCounters;
    float* z_cos = z + 32 * p;
    float* z_sin = z + 32 * p + kCounters;
#pragma GCC ivdep
    for (int c = 0; c < kCounters; ++c) {
      const float r = __builtin_sqrtf(-2.0f * log_unit(unit_from_word(radius_words[c])));
      const std::uint32_t q = angle_words[c] >> 30;
      const float phi = reduced_angle(angle_words[c]);
      const std::uint32_t cb = bits_of(cos_reduced(phi)), sb = bits_of(sin_reduced(phi));
      // rotate (cos, sin) by q quarter turns: swap for odd q, then the signs of the quadrant
      const std::uint32_t swap = (cb ^ sb) & (0u - (q & 1u));
      const std::uint32_t cos_sign = ((q ^ (q >> 1)) & 1u) << 31, sin_sign = (q >> 1) << 31;
      z_cos[c] = r * float_of(cb ^ swap ^ cos_sign);
      z_sin[c] = r * float_of(sb ^ swap ^ sin_sign);
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
      for (int i = 0; i < NG; ++i) {
        std::uint32_t w[kNormalGroup];
        std::memcpy(w, r[i], sizeof w);
        float z[kNormalGroup];
        box_muller(w, z);
        std::memcpy(buf_ + (next_ - first_ + i) * kNormalGroup, z, sizeof z);
      }
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

void normal_math(const NormalMathArgs& a) {
  for (i64 i = 0; i < a.n; ++i) {
    const float u = unit_from_word(a.words[2 * i]), phi = reduced_angle(a.words[2 * i + 1]);
    const float values[5] = {u, log_unit(u), phi, cos_reduced(phi), sin_reduced(phi)};
    std::memcpy(a.out + 5 * i, values, sizeof values);
  }
}

PYBN_FILL_FAMILY(noise)

}  // namespace PYBN_ISA
}  // namespace pybn
