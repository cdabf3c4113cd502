// The SIMD vocabulary every kernel is written in: Vec<float> and Vec<double>.
//
// This header is included by kernel sources that are compiled once per ISA with
// -DPYBN_ISA=<name> -DPYBN_ISA_HEADER="pybn/vec/<name>.h" (CMakeLists.txt); it includes
// that implementation, which puts its types in namespace pybn::<name>, so the copies
// never collide.
//
// Every implementation provides, for T in {float, double}:
//   W                       lanes
//   kRegisters              vector registers the ISA has (for choosing tile sizes)
//   load(p) / load(p, n)    unaligned load; the second reads only n < W lanes, the rest are 0
//   store(p) / store(p, n)  unaligned store; the second writes only the first n lanes
//   stream(p)               non-temporal store, p aligned to W*sizeof(T)
//   Vec<float>::stream_narrow(Float16* / BFloat16* p):
//                           store_narrow's rounding with a non-temporal store, p aligned
//                           to W*2 bytes
//   Vec<double>::load_widen(const float* p[, n]) / store_narrow(float* p[, n]):
//                           W floats converted to double, and back with one rounding
//   Vec<float>::load_widen(const Float16* / const BFloat16* p[, n]) / store_narrow(...):
//                           the same for 16-bit storage (half.h), to the same bits on
//                           every path
//   set1, zero, + - *, fma(a, b, c) = a*b + c, reduce_add (fma rounds once on the SIMD
//                           paths and twice, a product then a sum, on the scalar one:
//                           a kernel whose bits must agree on every path does not use it)
//   relu(v)                 max(v, 0) with NaN propagated, as torch.relu
//   keep_first(v, n)        v with lanes [n, W) set to 0
//   keep_unless_nonpositive(y, v)  0 where y <= 0, else v: the ReLU gradient's mask (a NaN
//                           y keeps v, as torch's threshold_backward)
//   scale_where(bits, v, s) v * s in the lanes whose bit is set, 0 in the others
//   select_bits(bits, a, b) a in the lanes whose bit is set, b in the others
//   mul_round_to_odd(a, b)  (float) a * b rounded toward zero with the last bit set when
//                           inexact: rounded once more to 16 bits, the correctly rounded
//                           product (for products that do not underflow)
// For the counter-based RNG, Vec<uint64_t> holds one 32-bit word per lane in the low half:
//   set1, zero, from_index(first) (lanes first + i), a + b (mod 2**64), shr32, a ^ b,
//   xor3(a, b, c) = a ^ b ^ c,
//   mul_lo32(a, m)          (a mod 2**32) * m, the whole 64-bit product
//   pack_lo32(a, b)         the low words of a's lanes, then b's, as a Vec<uint32_t>
// and Vec<uint32_t> (2 * that many lanes; as many as Vec<float>) has
//   zero(), set1, a & b, a | b, a ^ b, a - b (mod 2**32)
//   halves_at_least(a, t)   bit e (e < 2W) set when 16-bit half e of a (little-endian) >= t
//   shift_left<N>(a), shift_right<N>(a), shift_right_signed<N>(a) (the lanes as int32)
//   int32_to_float(a)       the lanes as int32, rounded to float (to nearest)
//   as_bits(f) / as_float(a) the bits of Vec<float> lanes and back
// which, with Vec<float>'s a / b and sqrt(a) (correctly rounded), the normal variates of
// noise.cpp are computed from.
// For the fused dropout, windows of 2W elements over the stream of random halves:
//   KeepWindows(d, t)       .next(r) gives the Keep of the last d halves of the previous r
//                           and the first 2W - d of this one, compared with t (d < 2W)
//   Keep                    .from<E>() the keep bits of window elements [E, ...), for
//                           scale_where (in a mask register on AVX-512, plain bits elsewhere)
// and stream_fence(), which orders non-temporal stores before the caller returns.
//
// Below, for every implementation: load_as / store_as, storage read and written as
// vectors of the compute type.
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>

#if !defined(PYBN_ISA) || !defined(PYBN_ISA_HEADER)
#error "vec.h is for kernel sources compiled per ISA (PYBN_ISA and PYBN_ISA_HEADER must be defined)"
#endif

#include PYBN_ISA_HEADER
#include "pybn/half.h"

namespace pybn {
namespace PYBN_ISA {

// 16-bit storage in double vectors (the fold kernels, which compute in double whatever
// the dtype): lane by lane through half.h's conversions, which round a double once.
template <class C, class S>
constexpr bool kLaneByLane = std::is_same_v<C, double> && is_16bit<S>;

template <class S>
inline Vec<double> widen_lanes(const S* p, std::int64_t n) {
  double t[Vec<double>::W] = {};
  for (std::int64_t i = 0; i < n; ++i) t[i] = static_cast<double>(p[i]);
  return Vec<double>::load(t);
}

template <class S>
inline void narrow_lanes(const Vec<double>& v, S* p, std::int64_t n) {
  double t[Vec<double>::W];
  v.store(t);
  for (std::int64_t i = 0; i < n; ++i) p[i] = static_cast<S>(t[i]);
}

// Storage S as vectors of the compute type C: plain loads and stores when S is C, else
// widened on load and rounded once on store (Vec<C>::load_widen, store_narrow). The
// (p, n) forms touch only the first n lanes of memory, as load(p, n) and store(p, n).
template <class C, class S>
inline Vec<C> load_as(const S* p) {
  if constexpr (std::is_same_v<C, S>)
    return Vec<C>::load(p);
  else if constexpr (kLaneByLane<C, S>)
    return widen_lanes(p, Vec<C>::W);
  else
    return Vec<C>::load_widen(p);
}

template <class C, class S>
inline Vec<C> load_as(const S* p, std::int64_t n) {
  if constexpr (std::is_same_v<C, S>)
    return Vec<C>::load(p, n);
  else if constexpr (kLaneByLane<C, S>)
    return widen_lanes(p, n);
  else
    return Vec<C>::load_widen(p, n);
}

template <class C, class S>
inline void store_as(const Vec<C>& v, S* p) {
  if constexpr (std::is_same_v<C, S>)
    v.store(p);
  else if constexpr (kLaneByLane<C, S>)
    narrow_lanes(v, p, Vec<C>::W);
  else
    v.store_narrow(p);
}

template <class C, class S>
inline void store_as(const Vec<C>& v, S* p, std::int64_t n) {
  if constexpr (std::is_same_v<C, S>)
    v.store(p, n);
  else if constexpr (kLaneByLane<C, S>)
    narrow_lanes(v, p, n);
  else
    v.store_narrow(p, n);
}

// A whole vector with a non-temporal store: stream(), or for 16-bit storage of float
// vectors stream_narrow() (the same rounding as store_as). p aligned to kStreamAlignment<C, S>.
template <class C, class S>
inline void stream_as(const Vec<C>& v, S* p) {
  static_assert(std::is_same_v<C, S> || (std::is_same_v<C, float> && is_16bit<S>),
                "non-temporal stores of S itself, or of 16-bit storage rounded from float");
  if constexpr (std::is_same_v<C, S>)
    v.stream(p);
  else
    v.stream_narrow(p);
}

// Bytes a vector of C stored as S fills, which stream_as needs p aligned to.
template <class C, class S>
constexpr std::size_t kStreamAlignment = sizeof(S) * Vec<C>::W;

// The bits of a window of n <= 32 elements over a stream of n-bit words: the last d bits of
// prev, then the first n - d of cur (d < n).
inline std::uint64_t bit_window(std::uint64_t prev, std::uint64_t cur, int d, int n) {
  return (cur << d | prev >> (n - d)) & ((std::uint64_t(1) << n) - 1);
}

#if !defined(PYBN_VEC_HAS_KEEP_WINDOWS)
// Keep bits and windows of the random halves for ISAs without mask registers: plain bits,
// a window shifted together from two compares' bits.
struct Keep {
  std::uint32_t bits;
  template <int E>
  std::uint32_t from() const {
    return bits >> E;
  }
};

class KeepWindows {
 public:
  KeepWindows(int d, std::uint16_t t) : d_(d), t_(t) {}
  __attribute__((always_inline)) Keep next(const Vec<std::uint32_t>& r) {
    const std::uint64_t b = halves_at_least(r, t_);
    const std::uint64_t w = bit_window(prev_, b, d_, 2 * Vec<std::uint32_t>::W);
    prev_ = b;
    return {static_cast<std::uint32_t>(w)};
  }

 private:
  int d_;
  std::uint16_t t_;
  std::uint64_t prev_ = 0;
};
#endif

}  // namespace PYBN_ISA
}  // namespace pybn
