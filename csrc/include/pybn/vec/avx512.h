// AVX-512 (F, BW, DQ, VL) implementation (512-bit), with mask registers for tails. The
// avx512bf16 path compiles this header again, into its own namespace, with -mavx512bf16
// (vec/avx512bf16.h): only the rounding to bfloat16 differs.
#pragma once
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_*() (`__m512 __Y = __Y;`) as the
// ignored source operand of their builtins, and its -Wuninitialized/-Wmaybe-uninitialized
// then report __Y wherever such an intrinsic is inlined (GCC bug 105593, fixed in GCC 13):
// silenced for the compiler's intrinsic headers only.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
#include <cstdint>

#include "pybn/half.h"

// The RNG of philox.h is inlined into the kernels' loops on this path.
#define PYBN_VEC_INLINE_RNG 1

#ifndef PYBN_AVX512_NAMESPACE
#define PYBN_AVX512_NAMESPACE avx512
#endif

namespace pybn {
namespace PYBN_AVX512_NAMESPACE {

template <class T>
struct Vec;

template <>
struct Vec<float> {
  static constexpr int W = 16;
  static constexpr int kRegisters = 32;  // architectural vector registers
  __m512 v;

  static __mmask16 mask(std::int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec set1(float a) { return {_mm512_set1_ps(a)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const float* p, std::int64_t n) { return {_mm512_maskz_loadu_ps(mask(n), p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(float* p, std::int64_t n) const { _mm512_mask_storeu_ps(p, mask(n), v); }
  void stream(float* p) const { _mm512_stream_ps(p, v); }
  // 16-bit storage: float16 by vcvtph2ps/vcvtps2ph; bfloat16 by integer rounding (half.h
  // gives the bits), or by vcvtneps2bf16 where the path has AVX512_BF16 (to_bfloat16).
  static Vec load_widen(const Float16* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
  static Vec load_widen(const Float16* p, std::int64_t n) { return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p))}; }
  void store_narrow(Float16* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_float16()); }
  void store_narrow(Float16* p, std::int64_t n) const { _mm256_mask_storeu_epi16(p, mask(n), to_float16()); }
  static Vec load_widen(const BFloat16* p) {
    return from_bfloat16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static Vec load_widen(const BFloat16* p, std::int64_t n) { return from_bfloat16(_mm256_maskz_loadu_epi16(mask(n), p)); }
  void store_narrow(BFloat16* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bfloat16()); }
  void store_narrow(BFloat16* p, std::int64_t n) const { _mm256_mask_storeu_epi16(p, mask(n), to_bfloat16()); }
  // Non-temporal 16-bit stores, p aligned to 32 bytes.
  void stream_narrow(Float16* p) const { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_float16()); }
  void stream_narrow(BFloat16* p) const { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bfloat16()); }
  __m256i to_float16() const { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  __m256i to_bfloat16() const {
#if defined(__AVX512BF16__)
    // vcvtneps2bf16 rounds to nearest even and quiets NaN as the integer rounding below
    // does, but reads subnormal inputs as zero: a vector holding one takes the integer
    // rounding (activations rarely do; tests/test_half_conversions.py crosses both).
    // (vfpclassps, class 0x20: denormal; no constants to keep in registers)
    const __mmask16 subnormal = _mm512_fpclass_ps_mask(v, 0x20);
    if (__builtin_expect(subnormal == 0, 1)) return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#endif
    return to_bfloat16_by_rounding();
  }
  __m256i to_bfloat16_by_rounding() const {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i high = _mm512_srli_epi32(b, 16);
    const __m512i lsb = _mm512_and_si512(high, _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, high, _mm512_set1_epi32(0x40));  // NaN: quiet, payload's top
    return _mm512_cvtepi32_epi16(r);
  }
  static Vec from_bfloat16(__m256i h) { return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))}; }

  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
  friend Vec sqrt(Vec a) { return {_mm512_sqrt_ps(a.v)}; }
  // vmaxps returns its second operand when either is NaN: (0, a) keeps a NaN in a.
  friend Vec relu(Vec a) { return {_mm512_max_ps(_mm512_setzero_ps(), a.v)}; }
  friend Vec keep_first(Vec a, std::int64_t n) { return {_mm512_maskz_mov_ps(mask(n), a.v)}; }
  // torch's threshold_backward: a NaN y keeps a
  friend Vec keep_unless_nonpositive(Vec y, Vec a) {
    return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y.v, _mm512_setzero_ps(), _CMP_NLE_UQ), a.v)};
  }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
  // a * b rounded to odd (toward zero, the last bit set when inexact): the rounded product
  // stepped toward zero where its error (exact, from an FMA) has the other sign. Exact for
  // products that do not underflow (those of 16-bit values and a scale >= 1).
  friend Vec mul_round_to_odd(Vec a, Vec b) {
    const __m512 p = _mm512_mul_ps(a.v, b.v);
    const __m512 e = _mm512_fmsub_ps(a.v, b.v, p);
    const __m512i bits = _mm512_castps_si512(p);
    const __mmask16 inexact = _mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_NEQ_OQ);
    const __m512i toward_zero = _mm512_srai_epi32(_mm512_xor_si512(bits, _mm512_castps_si512(e)), 31);
    const __m512i r = _mm512_mask_add_epi32(bits, inexact, bits, toward_zero);  // - 1
    return {_mm512_castsi512_ps(_mm512_mask_or_epi32(r, inexact, r, _mm512_set1_epi32(1)))};
  }
  // a * s in the lanes whose bit is set in `bits`, 0 elsewhere.
  friend Vec scale_where(std::uint32_t bits, Vec a, Vec s) {
    return {_mm512_maskz_mul_ps(static_cast<__mmask16>(bits), a.v, s.v)};
  }
  friend Vec select_bits(std::uint32_t bits, Vec a, Vec b) {
    return {_mm512_mask_blend_ps(static_cast<__mmask16>(bits), b.v, a.v)};
  }
};

template <>
struct Vec<double> {
  static constexpr int W = 8;
  static constexpr int kRegisters = 32;  // architectural vector registers
  __m512d v;

  static __mmask8 mask(std::int64_t n) { return static_cast<__mmask8>((1u << n) - 1u); }
  static Vec zero() { return {_mm512_setzero_pd()}; }
  static Vec set1(double a) { return {_mm512_set1_pd(a)}; }
  static Vec load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static Vec load(const double* p, std::int64_t n) { return {_mm512_maskz_loadu_pd(mask(n), p)}; }
  void store(double* p) const { _mm512_storeu_pd(p, v); }
  void store(double* p, std::int64_t n) const { _mm512_mask_storeu_pd(p, mask(n), v); }
  void stream(double* p) const { _mm512_stream_pd(p, v); }
  // float <-> double: W floats widened on load, rounded once on store.
  static Vec load_widen(const float* p) { return {_mm512_cvtps_pd(_mm256_loadu_ps(p))}; }
  static Vec load_widen(const float* p, std::int64_t n) { return {_mm512_cvtps_pd(_mm256_maskz_loadu_ps(mask(n), p))}; }
  void store_narrow(float* p) const { _mm256_storeu_ps(p, _mm512_cvtpd_ps(v)); }
  void store_narrow(float* p, std::int64_t n) const { _mm256_mask_storeu_ps(p, mask(n), _mm512_cvtpd_ps(v)); }

  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_pd(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_pd(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_pd(a.v, b.v)}; }
  friend Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
  friend Vec relu(Vec a) { return {_mm512_max_pd(_mm512_setzero_pd(), a.v)}; }
  friend Vec keep_first(Vec a, std::int64_t n) { return {_mm512_maskz_mov_pd(mask(n), a.v)}; }
  friend Vec keep_unless_nonpositive(Vec y, Vec a) {
    return {_mm512_maskz_mov_pd(_mm512_cmp_pd_mask(y.v, _mm512_setzero_pd(), _CMP_NLE_UQ), a.v)};
  }
  double reduce_add() const { return _mm512_reduce_add_pd(v); }
  friend Vec scale_where(std::uint32_t bits, Vec a, Vec s) {
    return {_mm512_maskz_mul_pd(static_cast<__mmask8>(bits), a.v, s.v)};
  }
  friend Vec select_bits(std::uint32_t bits, Vec a, Vec b) {
    return {_mm512_mask_blend_pd(static_cast<__mmask8>(bits), b.v, a.v)};
  }
};

// 32-bit unsigned lanes: the RNG's words in the order docs/dropout.md numbers them.
template <>
struct Vec<std::uint32_t> {
  static constexpr int W = 16;
  __m512i v;

  static Vec set1(std::uint32_t a) { return {_mm512_set1_epi32(static_cast<int>(a))}; }
  friend Vec operator&(Vec a, Vec b) { return {_mm512_and_si512(a.v, b.v)}; }
  friend Vec operator|(Vec a, Vec b) { return {_mm512_or_si512(a.v, b.v)}; }
  friend Vec operator^(Vec a, Vec b) { return {_mm512_xor_si512(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_epi32(a.v, b.v)}; }  // mod 2**32
  static Vec zero() { return {_mm512_setzero_si512()}; }
  // Bit e (e < 2W) set when the e-th 16-bit half (little-endian order) is >= t.
  friend std::uint64_t halves_at_least(Vec a, std::uint16_t t) {
    return _mm512_cmpge_epu16_mask(a.v, _mm512_set1_epi16(static_cast<short>(t)));
  }
};

// Keep bits of a window of 32 elements, left in a mask register: the fused dropout applies
// them without moving them through general registers (that round trip cost about 15% of
// the kernel's time).
struct Keep {
  __mmask32 k;
  // the bits of window elements [E, E + 16)
  template <int E>
  std::uint32_t from() const {
    if constexpr (E == 0)
      return k;
    else
      return _kshiftri_mask32(k, E);
  }
};

// Windows over the stream of random halves, each the last d halves of the previous vector
// then the first 32 - d of the current one (d < 32), compared with the threshold: one
// two-source permute and one compare per window.
class KeepWindows {
 public:
  KeepWindows(int d, std::uint16_t t)
      : idx_(_mm512_add_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14,
                                               13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                              _mm512_set1_epi16(static_cast<short>(32 - d)))),
        t_(_mm512_set1_epi16(static_cast<short>(t))),
        shifted_(d != 0) {}
  Keep next(Vec<std::uint32_t> r) {
    const __m512i w = shifted_ ? _mm512_permutex2var_epi16(prev_, idx_, r.v) : r.v;
    prev_ = r.v;
    return {_mm512_cmpge_epu16_mask(w, t_)};
  }

 private:
  __m512i idx_, t_, prev_ = _mm512_setzero_si512();
  bool shifted_;
};
#define PYBN_VEC_HAS_KEEP_WINDOWS 1

// 64-bit lanes holding one 32-bit RNG word each in the low half (the high half is ignored
// by every consumer): the layout in which epu32 multiplies give whole products in place.
template <>
struct Vec<std::uint64_t> {
  static constexpr int W = 8;
  __m512i v;

  static Vec set1(std::uint64_t a) { return {_mm512_set1_epi64(static_cast<long long>(a))}; }
  static Vec zero() { return {_mm512_setzero_si512()}; }
  // first + lane, with 64-bit wrap-around
  static Vec from_index(std::uint64_t first) {
    return {_mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first)), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7))};
  }
  // (a mod 2**32) * m, the whole 64-bit product
  friend Vec mul_lo32(Vec a, std::uint32_t m) { return {_mm512_mul_epu32(a.v, _mm512_set1_epi64(m))}; }
  friend Vec shr32(Vec a) { return {_mm512_srli_epi64(a.v, 32)}; }
  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_epi64(a.v, b.v)}; }  // mod 2**64
  friend Vec operator^(Vec a, Vec b) { return {_mm512_xor_si512(a.v, b.v)}; }
  friend Vec xor3(Vec a, Vec b, Vec c) { return {_mm512_ternarylogic_epi64(a.v, b.v, c.v, 0x96)}; }
  // The low 32 bits of a's lanes, then of b's, as one vector of 2W 32-bit lanes.
  friend Vec<std::uint32_t> pack_lo32(Vec a, Vec b) {
    const __m512i idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return {_mm512_permutex2var_epi32(a.v, idx, b.v)};
  }
};

// 32-bit lanes as integers and as float bits, for the normal variates (noise.cpp).
template <int N>
inline Vec<std::uint32_t> shift_left(Vec<std::uint32_t> a) { return {_mm512_slli_epi32(a.v, N)}; }
template <int N>
inline Vec<std::uint32_t> shift_right(Vec<std::uint32_t> a) { return {_mm512_srli_epi32(a.v, N)}; }
template <int N>
inline Vec<std::uint32_t> shift_right_signed(Vec<std::uint32_t> a) { return {_mm512_srai_epi32(a.v, N)}; }
inline Vec<float> int32_to_float(Vec<std::uint32_t> a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline Vec<std::uint32_t> as_bits(Vec<float> a) { return {_mm512_castps_si512(a.v)}; }
inline Vec<float> as_float(Vec<std::uint32_t> a) { return {_mm512_castsi512_ps(a.v)}; }

inline void stream_fence() { _mm_sfence(); }

}  // namespace PYBN_AVX512_NAMESPACE
}  // namespace pybn
