// AArch64 Advanced SIMD (NEON, ASIMD) implementation (128-bit), the baseline of every
// AArch64 CPU. NEON has no masked loads and stores: partial vectors go through a small
// buffer on the stack (the tails only).
#pragma once
#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "pybn/half.h"

namespace pybn {
namespace neon {

template <class T>
struct Vec;

namespace detail {
// Lanes [0, n) all ones. Built from a compare: no static vector initialisers.
inline uint32x4_t lane_mask32(std::int64_t n) {
  const uint32x4_t idx = {0, 1, 2, 3};
  return vcltq_u32(idx, vdupq_n_u32(static_cast<std::uint32_t>(n)));
}
inline uint64x2_t lane_mask64(std::int64_t n) {
  const uint64x2_t idx = {0, 1};
  return vcltq_u64(idx, vdupq_n_u64(static_cast<std::uint64_t>(n)));
}
// Lanes whose bit is set in `bits` all ones.
inline uint32x4_t bit_mask32(std::uint32_t bits) {
  const uint32x4_t sel = {1, 2, 4, 8};
  return vtstq_u32(vdupq_n_u32(bits), sel);
}
inline uint64x2_t bit_mask64(std::uint32_t bits) {
  const uint64x2_t sel = {1, 2};
  return vtstq_u64(vdupq_n_u64(bits), sel);
}

// The first n lanes of a vector through a buffer on the stack (the rest read as 0), and back.
template <class V, class E>
inline V load_part(const E* p, std::int64_t n, V (*load)(const E*)) {
  E t[sizeof(V) / sizeof(E)] = {};
  std::memcpy(t, p, static_cast<std::size_t>(n) * sizeof(E));
  return load(t);
}
template <class V, class E>
inline void store_part(E* p, std::int64_t n, V v, void (*store)(E*, V)) {
  E t[sizeof(V) / sizeof(E)];
  store(t, v);
  std::memcpy(p, t, static_cast<std::size_t>(n) * sizeof(E));
}

inline const std::uint16_t* bits_of(const Float16* p) { return reinterpret_cast<const std::uint16_t*>(p); }
inline const std::uint16_t* bits_of(const BFloat16* p) { return reinterpret_cast<const std::uint16_t*>(p); }
inline std::uint16_t* bits_of(Float16* p) { return reinterpret_cast<std::uint16_t*>(p); }
inline std::uint16_t* bits_of(BFloat16* p) { return reinterpret_cast<std::uint16_t*>(p); }

// float16 by the base AArch64 conversions (FCVTL, FCVTN): IEEE half (FPCR.AHP is 0 under
// Linux), to nearest even in the default rounding mode, subnormals kept (FPCR.FZ is 0), and
// a NaN quiet with the top of its payload: the bits of half.h and of x86's F16C.
inline float32x4_t from_float16(uint16x4_t h) { return vcvt_f32_f16(vreinterpret_f16_u16(h)); }
inline uint16x4_t to_float16(float32x4_t v) { return vreinterpret_u16_f16(vcvt_f16_f32(v)); }

// bfloat16 to nearest even by integer rounding (half_bits::to_bfloat16): the high half of
// bits + 0x7FFF + its last bit, or for a NaN its high half made quiet.
inline uint16x4_t to_bfloat16(float32x4_t v) {
  const uint32x4_t b = vreinterpretq_u32_f32(v);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(b, 16), vdupq_n_u32(1));
  const uint16x4_t rounded = vaddhn_u32(b, vaddq_u32(lsb, vdupq_n_u32(0x7FFF)));
  const uint16x4_t quiet_nan = vorr_u16(vshrn_n_u32(b, 16), vdup_n_u16(0x40));
  const uint16x4_t nan = vmovn_u32(vmvnq_u32(vceqq_f32(v, v)));
  return vbsl_u16(nan, quiet_nan, rounded);
}
inline float32x4_t from_bfloat16(uint16x4_t h) { return vreinterpretq_f32_u32(vshll_n_u16(h, 16)); }

inline float32x4_t load_f32(const float* p) { return vld1q_f32(p); }
inline void store_f32(float* p, float32x4_t v) { vst1q_f32(p, v); }
inline float64x2_t load_f64(const double* p) { return vld1q_f64(p); }
inline void store_f64(double* p, float64x2_t v) { vst1q_f64(p, v); }
inline float32x2_t load_f32x2(const float* p) { return vld1_f32(p); }
inline void store_f32x2(float* p, float32x2_t v) { vst1_f32(p, v); }
inline uint16x4_t load_u16x4(const std::uint16_t* p) { return vld1_u16(p); }
inline void store_u16x4(std::uint16_t* p, uint16x4_t v) { vst1_u16(p, v); }
}  // namespace detail

template <>
struct Vec<float> {
  static constexpr int W = 4;
  static constexpr int kRegisters = 32;  // architectural vector registers
  float32x4_t v;

  static Vec zero() { return {vdupq_n_f32(0.0f)}; }
  static Vec set1(float a) { return {vdupq_n_f32(a)}; }
  static Vec load(const float* p) { return {vld1q_f32(p)}; }
  static Vec load(const float* p, std::int64_t n) { return {detail::load_part(p, n, detail::load_f32)}; }
  void store(float* p) const { vst1q_f32(p, v); }
  void store(float* p, std::int64_t n) const { detail::store_part(p, n, v, detail::store_f32); }
  // No non-temporal vector store in base NEON that the compiler schedules well: a plain
  // store (the data goes through the caches).
  void stream(float* p) const { vst1q_f32(p, v); }
  // 16-bit storage (half.h gives the bits).
  static Vec load_widen(const Float16* p) { return {detail::from_float16(vld1_u16(detail::bits_of(p)))}; }
  static Vec load_widen(const Float16* p, std::int64_t n) {
    return {detail::from_float16(detail::load_part(detail::bits_of(p), n, detail::load_u16x4))};
  }
  void store_narrow(Float16* p) const { vst1_u16(detail::bits_of(p), detail::to_float16(v)); }
  void store_narrow(Float16* p, std::int64_t n) const {
    detail::store_part(detail::bits_of(p), n, detail::to_float16(v), detail::store_u16x4);
  }
  static Vec load_widen(const BFloat16* p) { return {detail::from_bfloat16(vld1_u16(detail::bits_of(p)))}; }
  static Vec load_widen(const BFloat16* p, std::int64_t n) {
    return {detail::from_bfloat16(detail::load_part(detail::bits_of(p), n, detail::load_u16x4))};
  }
  void store_narrow(BFloat16* p) const { vst1_u16(detail::bits_of(p), detail::to_bfloat16(v)); }
  void store_narrow(BFloat16* p, std::int64_t n) const {
    detail::store_part(detail::bits_of(p), n, detail::to_bfloat16(v), detail::store_u16x4);
  }
  // plain stores, as stream above
  void stream_narrow(Float16* p) const { store_narrow(p); }
  void stream_narrow(BFloat16* p) const { store_narrow(p); }

  friend Vec operator+(Vec a, Vec b) { return {vaddq_f32(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {vsubq_f32(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {vmulq_f32(a.v, b.v)}; }
  friend Vec fma(Vec a, Vec b, Vec c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
  friend Vec operator/(Vec a, Vec b) { return {vdivq_f32(a.v, b.v)}; }
  friend Vec sqrt(Vec a) { return {vsqrtq_f32(a.v)}; }
  // Lanes below zero cleared: NaN and -0 kept as they are, as on the scalar and x86 paths
  // (FMAX would turn -0 into +0 and quiet a signalling NaN).
  friend Vec relu(Vec a) {
    return {vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(a.v), vcltzq_f32(a.v)))};
  }
  friend Vec keep_first(Vec a, std::int64_t n) {
    return {vreinterpretq_f32_u32(vandq_u32(detail::lane_mask32(n), vreinterpretq_u32_f32(a.v)))};
  }
  // torch's threshold_backward: a NaN y keeps a
  friend Vec keep_unless_nonpositive(Vec y, Vec a) {
    return {vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(a.v), vclezq_f32(y.v)))};
  }
  // a * s in the lanes whose bit is set in `bits`, +0 elsewhere.
  friend Vec scale_where(std::uint32_t bits, Vec a, Vec s) {
    return {vreinterpretq_f32_u32(vandq_u32(detail::bit_mask32(bits), vreinterpretq_u32_f32(vmulq_f32(a.v, s.v))))};
  }
  friend Vec select_bits(std::uint32_t bits, Vec a, Vec b) { return {vbslq_f32(detail::bit_mask32(bits), a.v, b.v)}; }
  // a * b rounded to odd (toward zero, the last bit set when inexact): the rounded product
  // stepped toward zero where its error (exact, from an FMA) has the other sign. Exact for
  // products that do not underflow (those of 16-bit values and a scale >= 1).
  friend Vec mul_round_to_odd(Vec a, Vec b) {
    const float32x4_t p = vmulq_f32(a.v, b.v);
    const float32x4_t e = vfmaq_f32(vnegq_f32(p), a.v, b.v);  // a * b - p, exactly
    const uint32x4_t bits = vreinterpretq_u32_f32(p);
    const uint32x4_t inexact = vcagtq_f32(e, vdupq_n_f32(0.0f));  // |e| > 0: false for NaN
    const uint32x4_t toward_zero =
        vreinterpretq_u32_s32(vshrq_n_s32(vreinterpretq_s32_u32(veorq_u32(bits, vreinterpretq_u32_f32(e))), 31));
    const uint32x4_t r = vaddq_u32(bits, vandq_u32(inexact, toward_zero));  // - 1
    return {vreinterpretq_f32_u32(vorrq_u32(r, vandq_u32(inexact, vdupq_n_u32(1))))};
  }
  float reduce_add() const { return vaddvq_f32(v); }
};

template <>
struct Vec<double> {
  static constexpr int W = 2;
  static constexpr int kRegisters = 32;  // architectural vector registers
  float64x2_t v;

  static Vec zero() { return {vdupq_n_f64(0.0)}; }
  static Vec set1(double a) { return {vdupq_n_f64(a)}; }
  static Vec load(const double* p) { return {vld1q_f64(p)}; }
  static Vec load(const double* p, std::int64_t n) { return {detail::load_part(p, n, detail::load_f64)}; }
  void store(double* p) const { vst1q_f64(p, v); }
  void store(double* p, std::int64_t n) const { detail::store_part(p, n, v, detail::store_f64); }
  void stream(double* p) const { vst1q_f64(p, v); }
  // float <-> double: W floats widened on load, rounded once on store.
  static Vec load_widen(const float* p) { return {vcvt_f64_f32(vld1_f32(p))}; }
  static Vec load_widen(const float* p, std::int64_t n) {
    return {vcvt_f64_f32(detail::load_part(p, n, detail::load_f32x2))};
  }
  void store_narrow(float* p) const { vst1_f32(p, vcvt_f32_f64(v)); }
  void store_narrow(float* p, std::int64_t n) const {
    detail::store_part(p, n, vcvt_f32_f64(v), detail::store_f32x2);
  }

  friend Vec operator+(Vec a, Vec b) { return {vaddq_f64(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {vsubq_f64(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {vmulq_f64(a.v, b.v)}; }
  friend Vec fma(Vec a, Vec b, Vec c) { return {vfmaq_f64(c.v, a.v, b.v)}; }
  friend Vec relu(Vec a) {
    return {vreinterpretq_f64_u64(vbicq_u64(vreinterpretq_u64_f64(a.v), vcltzq_f64(a.v)))};
  }
  friend Vec keep_first(Vec a, std::int64_t n) {
    return {vreinterpretq_f64_u64(vandq_u64(detail::lane_mask64(n), vreinterpretq_u64_f64(a.v)))};
  }
  friend Vec keep_unless_nonpositive(Vec y, Vec a) {
    return {vreinterpretq_f64_u64(vbicq_u64(vreinterpretq_u64_f64(a.v), vclezq_f64(y.v)))};
  }
  friend Vec scale_where(std::uint32_t bits, Vec a, Vec s) {
    return {vreinterpretq_f64_u64(vandq_u64(detail::bit_mask64(bits), vreinterpretq_u64_f64(vmulq_f64(a.v, s.v))))};
  }
  friend Vec select_bits(std::uint32_t bits, Vec a, Vec b) { return {vbslq_f64(detail::bit_mask64(bits), a.v, b.v)}; }
  double reduce_add() const { return vaddvq_f64(v); }
};

// 32-bit unsigned lanes: the RNG's words in the order docs/dropout.md numbers them.
template <>
struct Vec<std::uint32_t> {
  static constexpr int W = 4;
  uint32x4_t v;

  static Vec zero() { return {vdupq_n_u32(0)}; }
  static Vec set1(std::uint32_t a) { return {vdupq_n_u32(a)}; }
  friend Vec operator&(Vec a, Vec b) { return {vandq_u32(a.v, b.v)}; }
  friend Vec operator|(Vec a, Vec b) { return {vorrq_u32(a.v, b.v)}; }
  friend Vec operator^(Vec a, Vec b) { return {veorq_u32(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {vsubq_u32(a.v, b.v)}; }  // mod 2**32
  // Bit e (e < 2W) set when the e-th 16-bit half (little-endian order) is >= t: each
  // half's compare keeps its own bit, and the sum across the halves gathers them.
  friend std::uint64_t halves_at_least(Vec a, std::uint16_t t) {
    const uint16x8_t sel = {1, 2, 4, 8, 16, 32, 64, 128};
    const uint16x8_t ge = vcgeq_u16(vreinterpretq_u16_u32(a.v), vdupq_n_u16(t));
    return vaddvq_u16(vandq_u16(ge, sel));
  }
};

// 64-bit lanes holding one 32-bit RNG word each in the low half (the high half is ignored
// by every consumer): UMULL multiplies the low words into whole 64-bit products in place.
template <>
struct Vec<std::uint64_t> {
  static constexpr int W = 2;
  uint64x2_t v;

  static Vec set1(std::uint64_t a) { return {vdupq_n_u64(a)}; }
  static Vec zero() { return {vdupq_n_u64(0)}; }
  static Vec from_index(std::uint64_t first) {
    const uint64x2_t idx = {0, 1};
    return {vaddq_u64(vdupq_n_u64(first), idx)};
  }
  friend Vec mul_lo32(Vec a, std::uint32_t m) { return {vmull_u32(vmovn_u64(a.v), vdup_n_u32(m))}; }
  friend Vec shr32(Vec a) { return {vshrq_n_u64(a.v, 32)}; }
  friend Vec operator+(Vec a, Vec b) { return {vaddq_u64(a.v, b.v)}; }  // mod 2**64
  friend Vec operator^(Vec a, Vec b) { return {veorq_u64(a.v, b.v)}; }
  friend Vec xor3(Vec a, Vec b, Vec c) { return {veorq_u64(veorq_u64(a.v, b.v), c.v)}; }
  // The low words of a's lanes, then of b's (UZP1 of the 32-bit views).
  friend Vec<std::uint32_t> pack_lo32(Vec a, Vec b) {
    return {vuzp1q_u32(vreinterpretq_u32_u64(a.v), vreinterpretq_u32_u64(b.v))};
  }
};

// 32-bit lanes as integers and as float bits, for the normal variates (noise.cpp).
template <int N>
inline Vec<std::uint32_t> shift_left(Vec<std::uint32_t> a) { return {vshlq_n_u32(a.v, N)}; }
template <int N>
inline Vec<std::uint32_t> shift_right(Vec<std::uint32_t> a) { return {vshrq_n_u32(a.v, N)}; }
template <int N>
inline Vec<std::uint32_t> shift_right_signed(Vec<std::uint32_t> a) {
  return {vreinterpretq_u32_s32(vshrq_n_s32(vreinterpretq_s32_u32(a.v), N))};
}
// to nearest, as FPCR is by default
inline Vec<float> int32_to_float(Vec<std::uint32_t> a) { return {vcvtq_f32_s32(vreinterpretq_s32_u32(a.v))}; }
inline Vec<std::uint32_t> as_bits(Vec<float> a) { return {vreinterpretq_u32_f32(a.v)}; }
inline Vec<float> as_float(Vec<std::uint32_t> a) { return {vreinterpretq_f32_u32(a.v)}; }

// Stores are ordinary ones (stream above): nothing to order.
inline void stream_fence() {}

}  // namespace neon
}  // namespace pybn
