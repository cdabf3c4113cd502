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

// The round keys of one seed, broadcast once: a kernel builds them per call, not per group
// (broadcasting 20 keys for every group cost about a fifth of the RNG's time).
struct PhiloxKeys {
  U64 k0[10], k1[10];
  explicit PhiloxKeys(std::uint64_t seed) {
    auto a = static_cast<std::uint32_t>(seed), b = static_cast<std::uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round, a += kPhiloxW0, b += kPhiloxW1) {
      k0[round] = U64::set1(a);
      k1[round] = U64::set1(b);
    }
  }
};

// One Philox round on N independent vectors of counters; the result replaces c.
// Each 32-bit word sits in the low half of a 64-bit lane, so one epu32 multiply gives the
// whole product in place: its low half is the next lo word as it stands, a shift gives hi,
// and the stale high halves are never read (multiplies and the final packing take low
// halves only). A round is then 4 multiplies, 4 shifts and 4 three-way xors per 16 counters,
// with no shuffles. N chains side by side keep the multipliers busy.
template <int N>
inline void philox_round(U64 (&c)[N][4], const U64& key0, const U64& key1) {
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) {
    const U64 p0 = mul_lo32(c[i][0], kPhiloxM0);  // lo0 : hi0
    const U64 p1 = mul_lo32(c[i][2], kPhiloxM1);  // lo1 : hi1
    c[i][0] = xor3(shr32(p1), c[i][1], key0);     // hi1 ^ c1 ^ k0
    c[i][1] = p1;                                 // lo1
    c[i][2] = xor3(shr32(p0), c[i][3], key1);     // hi0 ^ c3 ^ k1
    c[i][3] = p0;                                 // lo0
  }
}

// Philox4x32-10 of any counters c (the known-answer checks); the result replaces c.
template <int N>
inline void philox4x32_10(U64 (&c)[N][4], const PhiloxKeys& keys) {
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) philox_round(c, keys.k0[round], keys.k1[round]);
}

// Philox4x32-10 of the mask stream's counters (b mod 2**32, b >> 32, 0, 0), b one 64-bit
// index per lane of b[i]; the four words land in c[i]. The first round is written out: its
// zero words make one product and one xor vanish.
template <int N>
inline void philox4x32_10_of_index(U64 (&c)[N][4], const U64 (&b)[N], const PhiloxKeys& keys) {
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) {
    const U64 p0 = mul_lo32(b[i], kPhiloxM0);
    c[i][0] = shr32(b[i]) ^ keys.k0[0];  // hi1 = lo1 = 0
    c[i][1] = U64::zero();
    c[i][2] = shr32(p0) ^ keys.k1[0];
    c[i][3] = p0;
  }
#pragma GCC unroll 9
  for (int round = 1; round < 10; ++round) philox_round(c, keys.k0[round], keys.k1[round]);
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
inline void groups_keep_bits(const PhiloxKeys& keys, std::uint64_t offset, std::uint64_t g0, std::uint16_t threshold,
                             std::uint64_t (&bits)[NG][2]) {
  constexpr int V = kCounterVectors;
  U64 b[NG * V], c[NG * V][4];
  for (int i = 0; i < NG; ++i)
    for (int v = 0; v < V; ++v)
      b[i * V + v] = U64::from_index(offset + 16 * (g0 + i) + static_cast<std::uint64_t>(v * U64::W));
  philox4x32_10_of_index(c, b, keys);
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
