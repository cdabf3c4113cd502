// Philox4x32-10 (Salmon et al., SC'11; constants as in Random123) on vectors of counters,
// and the keep bits of dropout's normative mask stream (docs/dropout.md).
// Included by kernel sources only: everything lands in this ISA's namespace.
#pragma once
#include <cstdint>

#include "pybn/vec/vec.h"

namespace pybn {
namespace PYBN_ISA {

// The block's random words are forced inline into the kernels' loops on the x86 SIMD paths,
// where they then stay in registers (GCC stopped inlining them once dropout had more
// instantiations: AVX2 float32 fused forward 5.47 -> 5.76 instructions per element).
#if defined(PYBN_VEC_INLINE_RNG)
#define PYBN_RNG_INLINE __attribute__((always_inline)) inline
#else
#define PYBN_RNG_INLINE inline
#endif

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
  std::uint32_t first_k0, first_k1;  // the seed's words, round 1's keys
  explicit PhiloxKeys(std::uint64_t seed)
      : first_k0(static_cast<std::uint32_t>(seed)), first_k1(static_cast<std::uint32_t>(seed >> 32)) {
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
// Always inlined, as kept_scaled in dropout.cpp (see there).
__attribute__((always_inline)) inline void philox_round(U64 (&c)[N][4], const U64& key0, const U64& key1) {
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

// Counter vectors per mask group (16 counters), and groups computed side by side: 4 vectors
// (on AVX-512, 69 cycles a group against 71 for 6 vectors and 72 for 8).
constexpr int kCounterVectors = 16 / U64::W;
constexpr int kGroupsAtOnce = kCounterVectors >= 4 ? 1 : 4 / kCounterVectors;

// Random halves per group: 128, in vectors of 2 * U32::W halves, vector q holding elements
// [q * 2W, q * 2W + 2W) of the group.
constexpr int kHalfVectors = 128 / (2 * U32::W);

// The random halves of dropout's mask stream, NG groups of 128 elements at a time from
// group g0 on. A group uses the 16 counters b = offset + 16g + lane, as (b mod 2**32,
// b >> 32, 0, 0); word j of counter `lane`, read as two little-endian 16-bit halves h, is
// element 32j + 2*lane + h (kept when >= the threshold).
//
// The first two rounds are written out. Round 1's zero words remove one product and one
// xor. When a block's counters share their high word (all but one block in 2**28 groups),
// round 1's x0 = hi ^ k0 is the same in every lane, so round 2's product of it is a
// constant too, computed once per high word: another product and shift per vector saved.
// Within one high word the low words of consecutive blocks only grow, so round 1's products
// M0 * (b mod 2**32) advance by the constant M0 * 16 * NG: an add per vector instead of a
// product (on AVX-512, 90 -> 85 cycles per 128 elements of the fused dropout, in cache).
template <int NG>
class MaskStream {
 public:
  MaskStream(std::uint64_t seed, std::uint64_t offset, std::uint64_t g0)
      : keys_(seed), first_(offset + 16 * g0) {}

  // The next NG groups' random halves: r[i][q] is vector q of group g + i.
  PYBN_RNG_INLINE void next(U32 (&r)[NG][kHalfVectors]) {
    U64 c[kVectors][4];
    const std::uint64_t last = first_ + (16 * NG - 1);
    if (last >> 32 == first_ >> 32 && last >= first_)
      rounds_1_2_same_high(c, static_cast<std::uint32_t>(first_ >> 32));
    else
      rounds_1_2(c);
#pragma GCC unroll 8
    for (int round = 2; round < 10; ++round) philox_round(c, keys_.k0[round], keys_.k1[round]);
    first_ += 16 * NG;
    // word j of counters [s * W, s * W + W) (W = U64::W) is vector j * (16 / 2W) + s
    constexpr int S = 16 / U32::W;
    for (int i = 0; i < NG; ++i)
      for (int j = 0; j < 4; ++j)
        for (int h = 0; h < S; ++h)
          r[i][j * S + h] = pack_lo32(c[i * kCounterVectors + 2 * h][j], c[i * kCounterVectors + 2 * h + 1][j]);
  }

 private:
  static constexpr int kVectors = NG * kCounterVectors;

  // Vector i of the block's counters.
  U64 counters(int i) const { return U64::from_index(first_ + static_cast<std::uint64_t>(i * U64::W)); }

  PYBN_RNG_INLINE void rounds_1_2(U64 (&c)[kVectors][4]) const {
#pragma GCC unroll 16
    for (int i = 0; i < kVectors; ++i) {
      const U64 b = counters(i);
      const U64 p0 = mul_lo32(b, kPhiloxM0);
      c[i][0] = shr32(b) ^ keys_.k0[0];  // hi1 = lo1 = 0
      c[i][1] = U64::zero();
      c[i][2] = shr32(p0) ^ keys_.k1[0];
      c[i][3] = p0;
    }
    philox_round(c, keys_.k0[1], keys_.k1[1]);
  }

  PYBN_RNG_INLINE void rounds_1_2_same_high(U64 (&c)[kVectors][4], std::uint32_t high) {
    if (!have_high_ || high != high_) {
      const std::uint64_t x0 = high ^ keys_.first_k0;  // round 1's x0
      const std::uint64_t p = x0 * kPhiloxM0;          // round 2's product
      x2_key_ = U64::set1((p >> 32) ^ static_cast<std::uint32_t>(keys_.first_k1 + kPhiloxW1));
      x3_ = U64::set1(p);
      high_ = high;
      have_high_ = true;
      // A new high word follows a block of another one (or a block across two): the low
      // words start afresh.
      for (int i = 0; i < kVectors; ++i) p0_[i] = mul_lo32(counters(i), kPhiloxM0);
    }
    const U64 step = U64::set1(std::uint64_t(kPhiloxM0) * (16 * NG));
#pragma GCC unroll 16
    for (int i = 0; i < kVectors; ++i) {
      const U64 p0 = p0_[i];  // round 1: x2 = hi0 ^ k1, x3 = lo0
      p0_[i] = p0 + step;
      const U64 p1 = mul_lo32(shr32(p0) ^ keys_.k1[0], kPhiloxM1);
      c[i][0] = shr32(p1) ^ keys_.k0[1];  // round 2, with round 1's x1 = 0
      c[i][1] = p1;
      c[i][2] = p0 ^ x2_key_;  // the constant product's hi ^ round 1's x3 ^ k1
      c[i][3] = x3_;
    }
  }

  PhiloxKeys keys_;
  std::uint64_t first_;  // the next block's first counter
  // The state of the shared high word, set before its first use (have_high_); zero until
  // then, so that no path reads an indeterminate value.
  U64 p0_[kVectors] = {};  // its round-1 products M0 * (b mod 2**32), while the high word holds
  bool have_high_ = false;
  std::uint32_t high_ = 0;
  U64 x2_key_ = {}, x3_ = {};
};

// The keep bits of one group from its random halves: bit e of the 128-bit little-endian
// value bits is element e.
inline void group_keep_bits(const U32 (&r)[kHalfVectors], std::uint16_t threshold, std::uint64_t (&bits)[2]) {
  constexpr int H = 2 * U32::W;  // halves per vector, never across a 64-bit word
  bits[0] = bits[1] = 0;
  for (int q = 0; q < kHalfVectors; ++q) bits[q * H / 64] |= halves_at_least(r[q], threshold) << (q * H % 64);
}

}  // namespace PYBN_ISA
}  // namespace pybn
