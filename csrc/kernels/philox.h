// Philox4x32-10 (Salmon et al., SC'11; constants as in Random123) on vectors of counters,
// and the keep bits of dropout's normative mask stream (DESIGN.md, "Inverted dropout").
// Included by kernel sources only: everything lands in this ISA's namespace.
#pragma once
#include <cstdint>

#include "pybn/vec/vec.h"

namespace pybn {
namespace PYBN_ISA {

using U32 = Vec<std::uint32_t>;

constexpr std::uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr std::uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr std::uint32_t kPhiloxW0 = 0x9E3779B9u;  // key increments (golden ratio, sqrt(3) - 1)
constexpr std::uint32_t kPhiloxW1 = 0xBB67AE85u;

// Ten rounds on N independent vectors of W counters (c[i][0..3] per lane) under one key;
// the result replaces c. A round is a chain of multiply, blend and xor: N chains side by
// side keep the multipliers busy instead of waiting on one.
template <int N>
inline void philox4x32_10(U32 (&c)[N][4], std::uint32_t k0, std::uint32_t k1) {
  // Unrolled completely, so the state stays in registers (a loop over rounds kept it in memory).
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const U32 key0 = U32::set1(k0), key1 = U32::set1(k1);
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) {
      U32 hi0, lo0, hi1, lo1;
      mulhilo(c[i][0], kPhiloxM0, hi0, lo0);
      mulhilo(c[i][2], kPhiloxM1, hi1, lo1);
      const U32 n0 = hi1 ^ c[i][1] ^ key0;
      const U32 n2 = hi0 ^ c[i][3] ^ key1;
      c[i][0] = n0;
      c[i][1] = lo1;
      c[i][2] = n2;
      c[i][3] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Counters (b mod 2**32, b >> 32, 0, 0) for the W consecutive 64-bit values b = first + lane.
inline void counters_from(std::uint64_t first, U32 (&c)[4]) {
  const std::uint32_t lo = static_cast<std::uint32_t>(first), hi = static_cast<std::uint32_t>(first >> 32);
  if (lo <= 0xFFFFFFFFu - (U32::W - 1)) {  // no lane carries into the high word
    c[0] = U32::set1(lo) + U32::iota();
    c[1] = U32::set1(hi);
  } else {
    std::uint32_t l[U32::W], h[U32::W];
    for (int i = 0; i < U32::W; ++i) {
      const std::uint64_t b = first + static_cast<std::uint64_t>(i);
      l[i] = static_cast<std::uint32_t>(b);
      h[i] = static_cast<std::uint32_t>(b >> 32);
    }
    c[0] = U32::load(l);
    c[1] = U32::load(h);
  }
  c[2] = c[3] = U32::set1(0);
}

// Groups whose Philox vectors are computed side by side: 4 vectors of counters.
constexpr int kGroupsAtOnce = U32::W >= 16 ? 4 * U32::W / 16 : 1;

// The keep bits of mask groups g0 .. g0 + NG - 1 (bits[i] holds group g0 + i's 128
// elements, bit e of the 128-bit little-endian value = element 128(g0 + i) + e). A group
// uses 16 counters from offset + 16g; word j of counter `lane`, read as two little-endian
// 16-bit halves h, is element 32j + 2*lane + h, kept when >= threshold.
template <int NG>
inline void groups_keep_bits(std::uint64_t seed, std::uint64_t offset, std::uint64_t g0, std::uint16_t threshold,
                             std::uint64_t (&bits)[NG][2]) {
  constexpr int W = U32::W, S = 16 / W;  // S vectors of counters per group
  U32 c[NG * S][4];
  for (int i = 0; i < NG; ++i)
    for (int s = 0; s < S; ++s) counters_from(offset + 16 * (g0 + i) + static_cast<std::uint64_t>(s * W), c[i * S + s]);
  philox4x32_10(c, static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
  for (int i = 0; i < NG; ++i) {
    bits[i][0] = bits[i][1] = 0;
    for (int s = 0; s < S; ++s)
      for (int j = 0; j < 4; ++j) {
        const int at = 32 * j + 2 * W * s;  // 2W bits, never across a 64-bit word
        bits[i][at / 64] |= halves_at_least(c[i * S + s][j], threshold) << (at % 64);
      }
  }
}

}  // namespace PYBN_ISA
}  // namespace pybn
