// AVX-512 (F, BW, DQ, VL) implementation (512-bit), with mask registers for tails.
#pragma once
#include <immintrin.h>
#include <cstdint>

namespace pybn {
namespace avx512 {

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

  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  // vmaxps returns its second operand when either is NaN: (0, a) keeps a NaN in a.
  friend Vec relu(Vec a) { return {_mm512_max_ps(_mm512_setzero_ps(), a.v)}; }
  friend Vec keep_first(Vec a, std::int64_t n) { return {_mm512_maskz_mov_ps(mask(n), a.v)}; }
  friend Vec keep_if_positive(Vec y, Vec a) {
    return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y.v, _mm512_setzero_ps(), _CMP_GT_OQ), a.v)};
  }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }
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

  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_pd(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_pd(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_pd(a.v, b.v)}; }
  friend Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
  friend Vec relu(Vec a) { return {_mm512_max_pd(_mm512_setzero_pd(), a.v)}; }
  friend Vec keep_first(Vec a, std::int64_t n) { return {_mm512_maskz_mov_pd(mask(n), a.v)}; }
  friend Vec keep_if_positive(Vec y, Vec a) {
    return {_mm512_maskz_mov_pd(_mm512_cmp_pd_mask(y.v, _mm512_setzero_pd(), _CMP_GT_OQ), a.v)};
  }
  double reduce_add() const { return _mm512_reduce_add_pd(v); }
};

inline void stream_fence() { _mm_sfence(); }

}  // namespace avx512
}  // namespace pybn
