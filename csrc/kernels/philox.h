// Philox4x32-10 (Salmon et al., SC'11; constants as in Random123) on vectors of counters,
// and the keep bits of dropout's normative mask stream (DESIGN.md, "Inverted dropout").
// Included by kernel sources only: everything lands in this ISA's namespace.
#pragma once
#include <cstdint>

#include "pybn/vec/vec.h"

namespace pybn {
namespace PYBN_ISA {

using U32 = Vec<std::uint32_t>;
using U64 = Vec<std::uint64_t>;

constexpr std::uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr std::uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr std::uint32_t kPhiloxW0 = 0x9E3779B9u;  // key increments (golden ratio, sqrt(3) - 1)
constexpr std::uint32_t kPhiloxW1 = 0xBB67AE85u;

// Ten rounds on N independent vectors of counters under one key; the result replaces c.
// Each 32-bit word sits in the low half of a 64-bit lane, so one epu32 multiply gives the
// whole product in place: its low half is the next lo word as it stands, a shift gives hi,
// and the stale high halves are never read (multiplies and the final packing take low
// halves only). A round is then 4 multiplies, 4 shifts and 4 three-way xors per 16 counters,
// with no shuffles. N chains side by side keep the multipliers busy.
template <int N>
inline void philox4x32_10(U64 (&c)[N][4], std::uint32_t k0, std::uint32_t k1) {
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const U64 key0 = U64::set1(k0), key1 = U64::set1(k1);
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) {
      const U64 p0 = mul_lo32(c[i][0], kPhiloxM0);  // lo0 : hi0
      const U64 p1 = mul_lo32(c[i][2], kPhiloxM1);  // lo1 : hi1
      c[i][0] = xor3(shr32(p1), c[i][1], key0);     // hi1 ^ c1 ^ k0
      c[i][1] = p1;                                 // lo1
      c[i][2] = xor3(shr32(p0), c[i][3], key1);     // hi0 ^ c3 ^ k1
      c[i][3] = p0;                                 // lo0
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Counter vectors per mask group (16 counters), and groups computed side by side: 4 vectors.
constexpr int kCounterVectors = 16 / U64::W;
constexpr int kGroupsAtOnce = kCounterVectors >= 4 ? 1 : 4 / kCounterVectors;

// The keep bits of mask groups g0 .. g0 + NG - 1 (bits[i] holds group g0 + i's 128
// elements, bit e of the 128-bit little-endian value = element 128(g0 + i) + e). A group
// uses the 16 counters offset + 16g + lane, as (b mod 2**32, b >> 32, 0, 0); word j of
// counter `lane`, read as two little-endian 16-bit halves h, is element 32j + 2*lane + h,
// kept when >= threshold.
template <int NG>
inline void groups_keep_bits(std::uint64_t seed, std::uint64_t offset, std::uint64_t g0, std::uint16_t threshold,
                             std::uint64_t (&bits)[NG][2]) {
  constexpr int V = kCounterVectors;
  U64 c[NG * V][4];
  for (int i = 0; i < NG; ++i)
    for (int v = 0; v < V; ++v) {
      const U64 b = U64::from_index(offset + 16 * (g0 + i) + static_cast<std::uint64_t>(v * U64::W));
      c[i * V + v][0] = b;  // the low half is b mod 2**32
      c[i * V + v][1] = shr32(b);
      c[i * V + v][2] = c[i * V + v][3] = U64::zero();
    }
  philox4x32_10(c, static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
  constexpr int W = U32::W;  // = 2 * U64::W: one 32-bit vector from two counter vectors
  for (int i = 0; i < NG; ++i) {
    bits[i][0] = bits[i][1] = 0;
    for (int s = 0; s < 16 / W; ++s)
      for (int j = 0; j < 4; ++j) {
        const U32 r = pack_lo32(c[i * V + 2 * s][j], c[i * V + 2 * s + 1][j]);
        const int at = 32 * j + 2 * W * s;  // 2W bits, never across a 64-bit word
        bits[i][at / 64] |= halves_at_least(r, threshold) << (at % 64);
      }
  }
}

}  // namespace PYBN_ISA
}  // namespace pybn
