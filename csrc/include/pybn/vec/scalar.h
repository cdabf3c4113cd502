// Baseline implementation: a short array the compiler is free to turn into SSE2.
// Width 16 bytes like an SSE register, so tails exist and get tested on this path too.
#pragma once
#include <cstdint>

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
  friend Vec keep_if_positive(const Vec& y, Vec a) {
    for (int i = 0; i < W; ++i) a.v[i] = (y.v[i] > T(0)) ? a.v[i] : T(0);
    return a;
  }
  T reduce_add() const {
    T s = v[0];
    for (int i = 1; i < W; ++i) s += v[i];
    return s;
  }
};

inline void stream_fence() {}

}  // namespace scalar
}  // namespace pybn
