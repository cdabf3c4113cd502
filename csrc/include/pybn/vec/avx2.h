// AVX2 + FMA implementation (256-bit).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "pybn/half.h"

// The RNG of philox.h is inlined into the kernels' loops on this path.
#define PYBN_VEC_INLINE_RNG 1

namespace pybn {
namespace avx2 {

template <class T>
struct Vec;

namespace detail {
// Lane masks for partial loads/stores: lanes [0, n) all ones. Built from a compare,
// never a static SIMD initialiser (those would run before the CPU check).
inline __m256i lane_mask32(std::int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}
// Lanes whose bit is set in `bits` all ones.
inline __m256i bit_mask32(std::uint32_t bits) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), sel), sel);
}
inline __m256i bit_mask64(std::uint32_t bits) {
  const __m256i sel = _mm256_setr_epi64x(1, 2, 4, 8);
  return _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(bits), sel), sel);
}
inline __m256i lane_mask64(std::int64_t n) {
  const __m256i idx = _mm256_setr_epi64x(0, 1, 2, 3);
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), idx);
}

// n < 8 16-bit values into the low lanes of a vector (the rest 0), and back: AVX2 has no
// masked 16-bit loads and stores (used for the tails only).
inline __m128i load_halves(const void* p, std::int64_t n) {
  std::uint16_t t[8] = {};
  std::memcpy(t, p, static_cast<std::size_t>(n) * 2);
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(t));
}
inline void store_halves(void* p, std::int64_t n, __m128i v) {
  std::uint16_t t[8];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(t), v);
  std::memcpy(p, t, static_cast<std::size_t>(n) * 2);
}

// 8 floats to bfloat16, to nearest even by integer rounding (half_bits::to_bfloat16). The
// rounded words' upper halves are gathered by a byte shuffle and a permute (one step fewer
// than shifting them down, extracting the upper lane and packing).
inline __m128i to_bfloat16(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(b, _mm256_set1_epi32(0x400000)), nan);  // NaN: quiet, payload's top
  // bytes 2-3 of each word to the low 8 bytes of its 128-bit lane, then the lanes' low halves together
  const __m256i upper = _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                         2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  r = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(r, upper), _MM_SHUFFLE(3, 1, 2, 0));
  return _mm256_castsi256_si128(r);
}
inline __m256 from_bfloat16(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// vcvtps2ph's immediate: to nearest even, whatever MXCSR says
constexpr int kToNearest = _MM_FROUND_TO_NEAREST_INT;
}  // namespace detail

template <>
struct Vec<float> {
  static constexpr int W = 8;
  static constexpr int kRegisters = 16;  // architectural vector registers
  __m256 v;

  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec set1(float a) { return {_mm256_set1_ps(a)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const float* p, std::int64_t n) { return {_mm256_maskload_ps(p, detail::lane_mask32(n))}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(float* p, std::int64_t n) const { _mm256_maskstore_ps(p, detail::lane_mask32(n), v); }
  void stream(float* p) const { _mm256_stream_ps(p, v); }
  // 16-bit storage: float16 by F16C, bfloat16 by integer rounding (half.h gives the bits).
  static Vec load_widen(const Float16* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  static Vec load_widen(const Float16* p, std::int64_t n) { return {_mm256_cvtph_ps(detail::load_halves(p, n))}; }
  void store_narrow(Float16* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, detail::kToNearest));
  }
  void store_narrow(Float16* p, std::int64_t n) const {
    detail::store_halves(p, n, _mm256_cvtps_ph(v, detail::kToNearest));
  }
  static Vec load_widen(const BFloat16* p) {
    return {detail::from_bfloat16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  static Vec load_widen(const BFloat16* p, std::int64_t n) { return {detail::from_bfloat16(detail::load_halves(p, n))}; }
  void store_narrow(BFloat16* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), detail::to_bfloat16(v)); }
  void store_narrow(BFloat16* p, std::int64_t n) const { detail::store_halves(p, n, detail::to_bfloat16(v)); }
  // Non-temporal 16-bit stores, p aligned to 16 bytes.
  void stream_narrow(Float16* p) const {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, detail::kToNearest));
  }
  void stream_narrow(BFloat16* p) const { _mm_stream_si128(reinterpret_cast<__m128i*>(p), detail::to_bfloat16(v)); }

  friend Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
  friend Vec sqrt(Vec a) { return {_mm256_sqrt_ps(a.v)}; }
  // maxps returns its second operand when either is NaN: (0, a) keeps a NaN in a.
  friend Vec relu(Vec a) { return {_mm256_max_ps(_mm256_setzero_ps(), a.v)}; }
  friend Vec keep_first(Vec a, std::int64_t n) {
    return {_mm256_and_ps(_mm256_castsi256_ps(detail::lane_mask32(n)), a.v)};
  }
  // torch's threshold_backward: a NaN y keeps a
  friend Vec keep_unless_nonpositive(Vec y, Vec a) {
    return {_mm256_andnot_ps(_mm256_cmp_ps(y.v, _mm256_setzero_ps(), _CMP_LE_OQ), a.v)};
  }
  // a * s in the lanes whose bit is set in `bits`, 0 elsewhere.
  friend Vec scale_where(std::uint32_t bits, Vec a, Vec s) {
    return {_mm256_and_ps(_mm256_castsi256_ps(detail::bit_mask32(bits)), _mm256_mul_ps(a.v, s.v))};
  }
  friend Vec select_bits(std::uint32_t bits, Vec a, Vec b) {
    return {_mm256_blendv_ps(b.v, a.v, _mm256_castsi256_ps(detail::bit_mask32(bits)))};
  }
  // a * b rounded to odd (toward zero, the last bit set when inexact): the rounded product
  // stepped toward zero where its error (exact, from an FMA) has the other sign. Exact for
  // products that do not underflow (those of 16-bit values and a scale >= 1).
  friend Vec mul_round_to_odd(Vec a, Vec b) {
    const __m256 p = _mm256_mul_ps(a.v, b.v);
    const __m256 e = _mm256_fmsub_ps(a.v, b.v, p);
    const __m256i bits = _mm256_castps_si256(p);
    const __m256i inexact = _mm256_castps_si256(_mm256_cmp_ps(e, _mm256_setzero_ps(), _CMP_NEQ_OQ));
    const __m256i toward_zero = _mm256_srai_epi32(_mm256_xor_si256(bits, _mm256_castps_si256(e)), 31);
    const __m256i r = _mm256_add_epi32(bits, _mm256_and_si256(inexact, toward_zero));  // - 1
    return {_mm256_castsi256_ps(_mm256_or_si256(r, _mm256_and_si256(inexact, _mm256_set1_epi32(1))))};
  }
  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

template <>
struct Vec<double> {
  static constexpr int W = 4;
  static constexpr int kRegisters = 16;  // architectural vector registers
  __m256d v;

  static Vec zero() { return {_mm256_setzero_pd()}; }
  static Vec set1(double a) { return {_mm256_set1_pd(a)}; }
  static Vec load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static Vec load(const double* p, std::int64_t n) { return {_mm256_maskload_pd(p, detail::lane_mask64(n))}; }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  void store(double* p, std::int64_t n) const { _mm256_maskstore_pd(p, detail::lane_mask64(n), v); }
  void stream(double* p) const { _mm256_stream_pd(p, v); }
  // float <-> double: W floats widened on load, rounded once on store.
  static Vec load_widen(const float* p) { return {_mm256_cvtps_pd(_mm_loadu_ps(p))}; }
  static Vec load_widen(const float* p, std::int64_t n) {
    return {_mm256_cvtps_pd(_mm_maskload_ps(p, _mm256_castsi256_si128(detail::lane_mask32(n))))};
  }
  void store_narrow(float* p) const { _mm_storeu_ps(p, _mm256_cvtpd_ps(v)); }
  void store_narrow(float* p, std::int64_t n) const {
    _mm_maskstore_ps(p, _mm256_castsi256_si128(detail::lane_mask32(n)), _mm256_cvtpd_ps(v));
  }

  friend Vec operator+(Vec a, Vec b) { return {_mm256_add_pd(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm256_sub_pd(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_pd(a.v, b.v)}; }
  friend Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
  friend Vec relu(Vec a) { return {_mm256_max_pd(_mm256_setzero_pd(), a.v)}; }
  friend Vec keep_first(Vec a, std::int64_t n) {
    return {_mm256_and_pd(_mm256_castsi256_pd(detail::lane_mask64(n)), a.v)};
  }
  friend Vec keep_unless_nonpositive(Vec y, Vec a) {
    return {_mm256_andnot_pd(_mm256_cmp_pd(y.v, _mm256_setzero_pd(), _CMP_LE_OQ), a.v)};
  }
  friend Vec scale_where(std::uint32_t bits, Vec a, Vec s) {
    return {_mm256_and_pd(_mm256_castsi256_pd(detail::bit_mask64(bits)), _mm256_mul_pd(a.v, s.v))};
  }
  friend Vec select_bits(std::uint32_t bits, Vec a, Vec b) {
    return {_mm256_blendv_pd(b.v, a.v, _mm256_castsi256_pd(detail::bit_mask64(bits)))};
  }
  double reduce_add() const {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
};

// 32-bit unsigned lanes: the RNG's words in the order docs/dropout.md numbers them.
template <>
struct Vec<std::uint32_t> {
  static constexpr int W = 8;
  __m256i v;

  static Vec zero() { return {_mm256_setzero_si256()}; }
  static Vec set1(std::uint32_t a) { return {_mm256_set1_epi32(static_cast<int>(a))}; }
  friend Vec operator&(Vec a, Vec b) { return {_mm256_and_si256(a.v, b.v)}; }
  friend Vec operator|(Vec a, Vec b) { return {_mm256_or_si256(a.v, b.v)}; }
  friend Vec operator^(Vec a, Vec b) { return {_mm256_xor_si256(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm256_sub_epi32(a.v, b.v)}; }  // mod 2**32
  // Bit e (e < 2W) set when the e-th 16-bit half (little-endian order) is >= t:
  // max(a, t) == a per half, then one bit per half from the byte mask.
  friend std::uint64_t halves_at_least(Vec a, std::uint16_t t) {
    const __m256i ge = _mm256_cmpeq_epi16(_mm256_max_epu16(a.v, _mm256_set1_epi16(static_cast<short>(t))), a.v);
    return _pext_u32(static_cast<std::uint32_t>(_mm256_movemask_epi8(ge)), 0x55555555u);
  }
};

// 64-bit lanes holding one 32-bit RNG word each in the low half (the high half is ignored
// by every consumer): the layout in which epu32 multiplies give whole products in place.
template <>
struct Vec<std::uint64_t> {
  static constexpr int W = 4;
  __m256i v;

  static Vec set1(std::uint64_t a) { return {_mm256_set1_epi64x(static_cast<long long>(a))}; }
  static Vec zero() { return {_mm256_setzero_si256()}; }
  static Vec from_index(std::uint64_t first) {
    return {_mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(first)), _mm256_setr_epi64x(0, 1, 2, 3))};
  }
  friend Vec mul_lo32(Vec a, std::uint32_t m) { return {_mm256_mul_epu32(a.v, _mm256_set1_epi64x(m))}; }
  friend Vec shr32(Vec a) { return {_mm256_srli_epi64(a.v, 32)}; }
  friend Vec operator+(Vec a, Vec b) { return {_mm256_add_epi64(a.v, b.v)}; }  // mod 2**64
  friend Vec operator^(Vec a, Vec b) { return {_mm256_xor_si256(a.v, b.v)}; }
  friend Vec xor3(Vec a, Vec b, Vec c) { return {_mm256_xor_si256(_mm256_xor_si256(a.v, b.v), c.v)}; }
  friend Vec<std::uint32_t> pack_lo32(Vec a, Vec b) {
    // [a0 a2 b0 b2 | a4 a6 b4 b6] (32-bit words of each 128-bit half), then the halves' pairs in order.
    const __m256 lo = _mm256_shuffle_ps(_mm256_castsi256_ps(a.v), _mm256_castsi256_ps(b.v), _MM_SHUFFLE(2, 0, 2, 0));
    return {_mm256_permute4x64_epi64(_mm256_castps_si256(lo), _MM_SHUFFLE(3, 1, 2, 0))};
  }
};

// 32-bit lanes as integers and as float bits, for the normal variates (noise.cpp).
template <int N>
inline Vec<std::uint32_t> shift_left(Vec<std::uint32_t> a) { return {_mm256_slli_epi32(a.v, N)}; }
template <int N>
inline Vec<std::uint32_t> shift_right(Vec<std::uint32_t> a) { return {_mm256_srli_epi32(a.v, N)}; }
template <int N>
inline Vec<std::uint32_t> shift_right_signed(Vec<std::uint32_t> a) { return {_mm256_srai_epi32(a.v, N)}; }
inline Vec<float> int32_to_float(Vec<std::uint32_t> a) { return {_mm256_cvtepi32_ps(a.v)}; }
inline Vec<std::uint32_t> as_bits(Vec<float> a) { return {_mm256_castps_si256(a.v)}; }
inline Vec<float> as_float(Vec<std::uint32_t> a) { return {_mm256_castsi256_ps(a.v)}; }

inline void stream_fence() { _mm_sfence(); }

}  // namespace avx2
}  // namespace pybn
