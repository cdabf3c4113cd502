// Baseline implementation: a short array the compiler is free to turn into SSE2.
// Width 16 bytes like an SSE register, so tails exist and get tested on this path too.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "pybn/half.h"

namespace pybn {
namespace scalar {

template <class T>
struct Vec {
  static constexpr int W = 16 / sizeof(T);
  static constexpr int kRegisters = 16;  // architectural vector registers
  T v[W];

  static Vec zero() { return set1(T(0)); }
  static Vec set1(T a) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = a;
    return r;
  }
  static Vec load(const T* p) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = p[i];
    return r;
  }
  static Vec load(const T* p, std::int64_t n) {
    Vec r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = p[i];
    return r;
  }
  void store(T* p) const {
    for (int i = 0; i < W; ++i) p[i] = v[i];
  }
  void store(T* p, std::int64_t n) const {
    for (int i = 0; i < n; ++i) p[i] = v[i];
  }
  void stream(T* p) const { store(p); }
  // Storage S narrower than T (float for double, Float16 and BFloat16 for float): widened
  // on load, rounded once on store, by S's scalar conversions (half.h).
  template <class S>
  static Vec load_widen(const S* p) {
    return load_widen(p, W);
  }
  template <class S>
  static Vec load_widen(const S* p, std::int64_t n) {
    Vec r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = static_cast<T>(p[i]);
    return r;
  }
  template <class S>
  void store_narrow(S* p) const {
    store_narrow(p, W);
  }
  template <class S>
  void store_narrow(S* p, std::int64_t n) const {
    for (int i = 0; i < n; ++i) p[i] = static_cast<S>(v[i]);
  }
  template <class S>
  void stream_narrow(S* p) const {
    store_narrow(p);
  }

  friend Vec operator+(Vec a, const Vec& b) {
    for (int i = 0; i < W; ++i) a.v[i] += b.v[i];
    return a;
  }
  friend Vec operator-(Vec a, const Vec& b) {
    for (int i = 0; i < W; ++i) a.v[i] -= b.v[i];
    return a;
  }
  friend Vec operator*(Vec a, const Vec& b) {
    for (int i = 0; i < W; ++i) a.v[i] *= b.v[i];
    return a;
  }
  friend Vec operator/(Vec a, const Vec& b) {
    for (int i = 0; i < W; ++i) a.v[i] /= b.v[i];
    return a;
  }
  friend Vec sqrt(Vec a) {  // correctly rounded: sqrtss/sqrtsd (-fno-math-errno)
    for (int i = 0; i < W; ++i) {
      if constexpr (std::is_same_v<T, float>)
        a.v[i] = __builtin_sqrtf(a.v[i]);
      else
        a.v[i] = __builtin_sqrt(a.v[i]);
    }
    return a;
  }
  friend Vec fma(const Vec& a, const Vec& b, Vec c) {
    for (int i = 0; i < W; ++i) c.v[i] = a.v[i] * b.v[i] + c.v[i];
    return c;
  }
  friend Vec relu(Vec a) {
    // NaN stays NaN (the comparison is false), as on the SIMD paths.
    for (int i = 0; i < W; ++i) a.v[i] = (a.v[i] < T(0)) ? T(0) : a.v[i];
    return a;
  }
  friend Vec keep_first(Vec a, std::int64_t n) {
    for (int i = static_cast<int>(n); i < W; ++i) a.v[i] = T(0);
    return a;
  }
  // torch's threshold_backward: a NaN y keeps a
  friend Vec keep_unless_nonpositive(const Vec& y, Vec a) {
    for (int i = 0; i < W; ++i) a.v[i] = (y.v[i] <= T(0)) ? T(0) : a.v[i];
    return a;
  }
  // a * s in the lanes whose bit is set in `bits`, +0 elsewhere. A bitwise select, not a
  // branch: the bits are random, and a branch on them mispredicts half the time.
  friend Vec scale_where(std::uint32_t bits, Vec a, const Vec& s) {
    using Bits = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
    for (int i = 0; i < W; ++i) {
      const T r = a.v[i] * s.v[i];
      Bits word;
      std::memcpy(&word, &r, sizeof word);
      word &= Bits(0) - Bits((bits >> i) & 1u);
      std::memcpy(&a.v[i], &word, sizeof word);
    }
    return a;
  }
  // a in the lanes whose bit is set, b elsewhere; a bitwise select, as scale_where.
  friend Vec select_bits(std::uint32_t bits, Vec a, const Vec& b) {
    using Bits = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
    for (int i = 0; i < W; ++i) {
      Bits wa, wb;
      std::memcpy(&wa, &a.v[i], sizeof wa);
      std::memcpy(&wb, &b.v[i], sizeof wb);
      const Bits m = Bits(0) - Bits((bits >> i) & 1u);
      wa = (wa & m) | (wb & ~m);
      std::memcpy(&a.v[i], &wa, sizeof wa);
    }
    return a;
  }
  // a * b rounded to odd (toward zero, the last bit set when inexact), for T = float: in
  // double, exact for the products of a 16-bit value and a float (half.h, to_odd_float).
  friend Vec mul_round_to_odd(Vec a, const Vec& b) {
    static_assert(sizeof(T) == 4, "for float vectors");
    for (int i = 0; i < W; ++i) a.v[i] = half_bits::to_odd_float(static_cast<double>(a.v[i]) * b.v[i]);
    return a;
  }
  T reduce_add() const {
    T s = v[0];
    for (int i = 1; i < W; ++i) s += v[i];
    return s;
  }
};

// 32-bit unsigned lanes: the RNG's words in the order docs/dropout.md numbers them.
template <>
struct Vec<std::uint32_t> {
  static constexpr int W = 4;
  std::uint32_t v[W];

  static Vec zero() { return {{0, 0, 0, 0}}; }
  static Vec set1(std::uint32_t a) { return {{a, a, a, a}}; }
  template <class Op>
  friend Vec lanewise(Vec a, const Vec& b, Op op) {
    for (int i = 0; i < W; ++i) a.v[i] = op(a.v[i], b.v[i]);
    return a;
  }
  friend Vec operator&(const Vec& a, const Vec& b) { return lanewise(a, b, [](auto x, auto y) { return x & y; }); }
  friend Vec operator|(const Vec& a, const Vec& b) { return lanewise(a, b, [](auto x, auto y) { return x | y; }); }
  friend Vec operator^(const Vec& a, const Vec& b) { return lanewise(a, b, [](auto x, auto y) { return x ^ y; }); }
  friend Vec operator-(const Vec& a, const Vec& b) { return lanewise(a, b, [](auto x, auto y) { return x - y; }); }
  friend std::uint64_t halves_at_least(const Vec& a, std::uint16_t t) {
    std::uint64_t bits = 0;
    for (int i = 0; i < W; ++i)
      for (int h = 0; h < 2; ++h)
        if (((a.v[i] >> (16 * h)) & 0xFFFFu) >= t) bits |= std::uint64_t(1) << (2 * i + h);
    return bits;
  }
};

// 64-bit lanes holding one 32-bit RNG word each in the low half (the high half is ignored).
template <>
struct Vec<std::uint64_t> {
  static constexpr int W = 2;
  std::uint64_t v[W];

  static Vec set1(std::uint64_t a) { return {{a, a}}; }
  static Vec zero() { return {{0, 0}}; }
  static Vec from_index(std::uint64_t first) { return {{first, first + 1}}; }
  friend Vec mul_lo32(Vec a, std::uint32_t m) {
    for (auto& x : a.v) x = (x & 0xFFFFFFFFu) * m;
    return a;
  }
  friend Vec shr32(Vec a) {
    for (auto& x : a.v) x >>= 32;
    return a;
  }
  friend Vec operator+(Vec a, const Vec& b) {
    for (int i = 0; i < W; ++i) a.v[i] += b.v[i];
    return a;
  }
  friend Vec operator^(Vec a, const Vec& b) {
    for (int i = 0; i < W; ++i) a.v[i] ^= b.v[i];
    return a;
  }
  friend Vec xor3(Vec a, const Vec& b, const Vec& c) {
    for (int i = 0; i < W; ++i) a.v[i] ^= b.v[i] ^ c.v[i];
    return a;
  }
};

// The low 32 bits of a's lanes, then of b's, as one vector of 2 * 2 32-bit lanes.
inline Vec<std::uint32_t> pack_lo32(const Vec<std::uint64_t>& a, const Vec<std::uint64_t>& b) {
  return {{static_cast<std::uint32_t>(a.v[0]), static_cast<std::uint32_t>(a.v[1]), static_cast<std::uint32_t>(b.v[0]),
           static_cast<std::uint32_t>(b.v[1])}};
}

// 32-bit lanes as integers and as float bits, for the normal variates (noise.cpp).
template <int N>
inline Vec<std::uint32_t> shift_left(Vec<std::uint32_t> a) {
  for (auto& x : a.v) x <<= N;
  return a;
}
template <int N>
inline Vec<std::uint32_t> shift_right(Vec<std::uint32_t> a) {
  for (auto& x : a.v) x >>= N;
  return a;
}
template <int N>
inline Vec<std::uint32_t> shift_right_signed(Vec<std::uint32_t> a) {
  for (auto& x : a.v) x = static_cast<std::uint32_t>(static_cast<std::int32_t>(x) >> N);
  return a;
}
inline Vec<float> int32_to_float(const Vec<std::uint32_t>& a) {
  Vec<float> r;
  for (int i = 0; i < 4; ++i) r.v[i] = static_cast<float>(static_cast<std::int32_t>(a.v[i]));
  return r;
}
inline Vec<std::uint32_t> as_bits(const Vec<float>& a) {
  Vec<std::uint32_t> r;
  std::memcpy(r.v, a.v, sizeof r.v);
  return r;
}
inline Vec<float> as_float(const Vec<std::uint32_t>& a) {
  Vec<float> r;
  std::memcpy(r.v, a.v, sizeof r.v);
  return r;
}

inline void stream_fence() {}

}  // namespace scalar
}  // namespace pybn
