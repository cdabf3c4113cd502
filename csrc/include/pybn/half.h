// The 16-bit storage types, Float16 (IEEE binary16, NumPy's float16) and BFloat16 (the
// upper half of a float32, ml_dtypes' bfloat16), and their scalar conversions.
//
// The kernels compute in float (PYBN_DTYPES): a 16-bit value is widened on load and the
// result rounded once on store, to nearest, ties to even. Every ISA path converts to the
// same bits (docs/dtypes.md): the vector conversions of vec/<isa>.h follow these functions,
// which the scalar path and the kernels' slow paths use.
//   widening   exact; a float16 NaN comes back quiet (its quiet bit set, as F16C's
//              vcvtph2ps does), a bfloat16 NaN keeps its bits
//   narrowing  to nearest, ties to even, past the largest value to infinity; subnormal
//              results kept (never flushed); a NaN stays NaN of the same sign, quiet,
//              with the top bits of its payload (what vcvtps2ph and vcvtneps2bf16 give)
// No arithmetic is done on these types: they are storage only.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pybn {

namespace half_bits {

inline std::uint32_t float_bits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

inline float bits_float(std::uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline float from_bfloat16(std::uint16_t h) { return bits_float(std::uint32_t(h) << 16); }

inline std::uint16_t to_bfloat16(float f) {
  const std::uint32_t b = float_bits(f);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((b >> 16) | 0x0040u);  // NaN, quiet
  // round to nearest even: add just under half an ulp of the result, plus its last bit
  return static_cast<std::uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

inline float from_float16(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_float(sign | 0x7F800000u | (mant ? 0x400000u | (mant << 13) : 0u));
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  // zero or subnormal: mant * 2^-24, exact in float
  const float m = static_cast<float>(mant) * 0x1p-24f;
  return bits_float(sign | float_bits(m));
}

inline std::uint16_t to_float16(float f) {
  const std::uint32_t b = float_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((b >> 16) & 0x8000u);
  const std::uint32_t a = b & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));  // NaN, quiet
  if (a >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 65520: infinity
  if (a >= 0x38800000u) {  // normal result (>= 2^-14): drop 13 bits, to nearest even
    const std::uint32_t r = a - (112u << 23);
    return static_cast<std::uint16_t>(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13));
  }
  if (a < 0x33000000u) return sign;  // <= 2^-25 (half the smallest subnormal, a tie to 0): zero
  // subnormal result: the value in units of 2^-24, to nearest even (the implicit bit added)
  const std::uint32_t e = a >> 23, m = (a & 0x7FFFFFu) | 0x800000u;
  const std::uint32_t shift = 126u - e;  // 14..24: from 2^-(e-127) * m / 2^23 to units of 2^-24
  const std::uint32_t q = m >> shift, rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
  return static_cast<std::uint16_t>(sign | (q + (rest > half || (rest == half && (q & 1u)))));
}

// A double rounded to float toward zero with the last bit set when inexact ("round to
// odd"): rounding that float to a 16-bit type to nearest even is the correct rounding of
// the double, since float keeps more than two bits beyond either 16-bit type's precision
// over its whole range.
inline float to_odd_float(double d) {
  const float f = static_cast<float>(d);
  if (std::isnan(d) || static_cast<double>(f) == d) return f;
  std::uint32_t b = float_bits(f);
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) b -= 1;  // rounded away from zero: one step back
  return bits_float(b | 1u);
}

}  // namespace half_bits

// Storage only: constructed from float or double with one rounding, converted to float or
// double exactly.
struct Float16 {
  std::uint16_t bits;
  Float16() = default;
  explicit Float16(float f) : bits(half_bits::to_float16(f)) {}
  explicit Float16(double d) : bits(half_bits::to_float16(half_bits::to_odd_float(d))) {}
  explicit operator float() const { return half_bits::from_float16(bits); }
  explicit operator double() const { return half_bits::from_float16(bits); }
};

struct BFloat16 {
  std::uint16_t bits;
  BFloat16() = default;
  explicit BFloat16(float f) : bits(half_bits::to_bfloat16(f)) {}
  explicit BFloat16(double d) : bits(half_bits::to_bfloat16(half_bits::to_odd_float(d))) {}
  explicit operator float() const { return half_bits::from_bfloat16(bits); }
  explicit operator double() const { return half_bits::from_bfloat16(bits); }
};

static_assert(sizeof(Float16) == 2 && sizeof(BFloat16) == 2, "16-bit storage types");

template <class S>
constexpr bool is_16bit = sizeof(S) == 2;

}  // namespace pybn
