// Inverted dropout with the normative counter-based mask stream (DESIGN.md): forward fused
// (random words compared and kept values scaled in one pass, no mask materialised), packed
// mask generation, and applying a packed mask. Every group of 128 elements depends only on
// (seed, offset, its index), so results do not depend on the thread split or the ISA.
#include <cstring>

#include "channel_loops.h"
#include "kernels_isa.h"
#include "philox.h"

namespace pybn {
namespace PYBN_ISA {
namespace {

constexpr i64 kGroup = 128;

// y[0, n) = keep ? x * scale : 0 for the elements of one group whose keep bits are `bits`.
// A whole group (n = 128) takes the unrolled path with constant shifts. Ordinary stores:
// non-temporal ones, interleaved with the RNG's arithmetic, measured 20-50% slower here.
template <class T>
inline void apply_group(const T* x, T* y, i64 n, const std::uint64_t (&bits)[2], const Vec<T>& scale) {
  using V = Vec<T>;
  constexpr i64 W = V::W;
  constexpr std::uint64_t kLanes = (std::uint64_t(1) << W) - 1;
  if (n == kGroup) {
#pragma GCC unroll 32
    for (i64 e = 0; e < kGroup; e += W) {
      const std::uint32_t b = static_cast<std::uint32_t>((bits[e / 64] >> (e % 64)) & kLanes);
      scale_where(b, V::load(x + e), scale).store(y + e);
    }
    return;
  }
  for (i64 e = 0; e < n; e += W) {
    const std::uint32_t b = static_cast<std::uint32_t>((bits[e / 64] >> (e % 64)) & kLanes);
    const i64 m = std::min(W, n - e);
    store_lanes(scale_where(b, load_n(x + e, m), scale), y + e, m);
  }
}

// Calls f(g, bits) for every group in [gb, ge) with its keep bits, computing
// kGroupsAtOnce groups' random words at a time (a few extra past ge are simply unused).
template <class F>
void for_each_group_bits(std::uint64_t seed, std::uint64_t offset, std::uint16_t threshold, i64 gb, i64 ge,
                         const F& f) {
  constexpr int NG = kGroupsAtOnce;
  MaskStream<NG> stream(seed, offset, static_cast<std::uint64_t>(gb), threshold);
  for (i64 g0 = gb; g0 < ge; g0 += NG) {
    std::uint64_t bits[NG][2];
    stream.next(bits);
    for (int i = 0; i < NG && g0 + i < ge; ++i) f(g0 + i, bits[i]);
  }
}

}  // namespace

namespace {

// The fused forward over groups [gb, ge) with non-temporal stores. The keep bits of
// consecutive groups are read as one bit stream, and y is written in vectors aligned to
// the cache line (NumPy's large arrays start 16 bytes past a page, so group-aligned vectors
// would split lines, and split non-temporal stores are slow). With y's first aligned element
// h lanes into a group, group g writes elements [128g - W + h, 128g + 128 - W + h): one
// vector straddling groups g - 1 and g, then 128/W - 1 vectors inside g, their bits shifted
// by h once per group. The first and last groups of the range go element-exact.
template <class T>
void dropout_streamed(const DropoutArgs<T>& a, i64 gb, i64 ge, const Vec<T>& scale) {
  using V = Vec<T>;
  constexpr i64 W = V::W;
  constexpr int NG = kGroupsAtOnce;
  constexpr std::uint64_t kLanes = (std::uint64_t(1) << W) - 1;
  const i64 start = gb * kGroup, end = std::min(ge * kGroup, a.n);
  const int h = static_cast<int>(lanes_to_alignment(a.y + start));
  // words[0] holds the bits of the 64 elements before the block, words[1 .. 2NG] the
  // block's, words[2NG + 1] zeros: every W-bit field of the block is inside the array.
  std::uint64_t words[2 * NG + 2] = {};
  MaskStream<NG> stream(a.seed, a.offset, static_cast<std::uint64_t>(gb), a.threshold);
  i64 i = start;  // the next element to write
  for (i64 g0 = gb; g0 < ge; g0 += NG) {
    std::uint64_t bits[NG][2];
    stream.next(bits);
    words[0] = words[2 * NG];
    for (int k = 0; k < NG; ++k) words[1 + 2 * k] = bits[k][0], words[2 + 2 * k] = bits[k][1];
    for (int k = 0; k < NG && g0 + k < ge; ++k) {
      const i64 g = g0 + k, limit = g + 1 == ge ? end : std::min(end, g * kGroup + kGroup - W + h);
      const T* x = a.x + g * kGroup;
      T* y = a.y + g * kGroup;
      if (g > gb && limit == g * kGroup + kGroup - W + h) {
        const std::uint64_t lo = bits[k][0], hi = bits[k][1];
        const auto straddle = static_cast<std::uint32_t>((words[2 * k] >> (64 - W + h) | lo << (W - h)) & kLanes);
        scale_where(straddle, V::load(x - W + h), scale).stream(y - W + h);
        const std::uint64_t shifted[2] = {h ? lo >> h | hi << (64 - h) : lo, hi >> h};
#pragma GCC unroll 16
        for (i64 e = 0; e < kGroup - W; e += W) {
          const auto b = static_cast<std::uint32_t>((shifted[e / 64] >> (e % 64)) & kLanes);
          scale_where(b, V::load(x + h + e), scale).stream(y + h + e);
        }
        i = limit;
        continue;
      }
      const i64 first = g0 * kGroup - 64;  // the element of bit 0 of words
      const auto bits_at = [&](i64 at) {   // the W bits of elements [at, at + W)
        const i64 q = at - first;
        const std::uint64_t w0 = words[q / 64], w1 = words[q / 64 + 1];
        const int sh = static_cast<int>(q % 64);
        return static_cast<std::uint32_t>((sh ? w0 >> sh | w1 << (64 - sh) : w0) & kLanes);
      };
      if (i == start && h > 0) {  // lanes before the first aligned element
        const i64 m = std::min<i64>(h, end - i);
        store_lanes(scale_where(bits_at(i), load_n(a.x + i, m), scale), a.y + i, m);
        i += m;
      }
      for (; i + W <= limit; i += W) scale_where(bits_at(i), V::load(a.x + i), scale).stream(a.y + i);
      if (limit == end && i < end) {
        store_lanes(scale_where(bits_at(i), load_n(a.x + i, end - i), scale), a.y + i, end - i);
        i = end;
      }
    }
  }
  stream_fence();
}

}  // namespace

template <class T>
void dropout(const DropoutArgs<T>& a) {
  const i64 n = a.n, groups = (n + kGroup - 1) / kGroup;
  const Vec<T> scale = Vec<T>::set1(static_cast<T>(a.scale));
  const bool stream = n * i64(sizeof(T)) >= kStreamBytes;
  parallel_for(groups, n, [&](i64 gb, i64 ge) {
    if (stream) return dropout_streamed(a, gb, ge, scale);
    for_each_group_bits(a.seed, a.offset, a.threshold, gb, ge, [&](i64 g, const std::uint64_t(&bits)[2]) {
      apply_group(a.x + g * kGroup, a.y + g * kGroup, std::min(kGroup, n - g * kGroup), bits, scale);
    });
  });
}

void dropout_mask(const DropoutMaskArgs& a) {
  const i64 n = a.n, groups = (n + kGroup - 1) / kGroup;
  parallel_for(groups, n, [&](i64 gb, i64 ge) {
    for_each_group_bits(a.seed, a.offset, a.threshold, gb, ge, [&](i64 g, const std::uint64_t(&keep)[2]) {
      std::uint64_t bits[2] = {keep[0], keep[1]};
      const i64 valid = std::min(kGroup, n - g * kGroup);
      if (valid < 64) bits[0] &= (std::uint64_t(1) << valid) - 1;  // trailing bits are zero
      if (valid < 128) bits[1] &= valid <= 64 ? 0 : (std::uint64_t(1) << (valid - 64)) - 1;
      unsigned char bytes[16];
      std::memcpy(bytes, bits, 16);  // little-endian: bit k%8 of byte k/8 is element k
      std::memcpy(a.mask + g * 16, bytes, static_cast<std::size_t>((valid + 7) / 8));
    });
  });
}

namespace {

// The keep bits of elements [e, e + W) of a packed mask of `bytes` bytes: one unaligned
// 8-byte read at byte e / 8 (e % 8 + W <= 64); near the end, the bytes that exist.
inline std::uint64_t mask_bits_at(const unsigned char* mask, i64 bytes, i64 e) {
  std::uint64_t word = 0;
  const i64 at = e / 8;
  std::memcpy(&word, mask + at, static_cast<std::size_t>(std::min<i64>(8, bytes - at)));
  return word >> (e % 8);
}

// y[j] = keep ? x[j] * scale : 0 for j < len, element j's bit being bit0 + j of the packed
// mask of `bytes` bytes; the output is aligned first when streaming.
template <bool kStream, class T>
void apply_mask_span(const T* x, T* y, i64 len, const unsigned char* mask, i64 bytes, i64 bit0, const Vec<T>& scale) {
  using V = Vec<T>;
  constexpr i64 W = V::W;
  constexpr std::uint64_t kLanes = (std::uint64_t(1) << W) - 1;
  i64 i = 0;
  const auto step = [&](i64 n) {
    const auto b = static_cast<std::uint32_t>(mask_bits_at(mask, bytes, bit0 + i) & kLanes);
    put<kStream>(y + i, scale_where(b, load_n(x + i, n), scale), n);
    i += n;
  };
  if (const i64 nh = head_lanes<kStream>(y, len)) step(nh);
  while (i + W <= len) step(W);
  if (i < len) step(len - i);
}

// y[j] = keep ? x[j] * scale : 0 for j < len (one bit for the whole run).
template <bool kStream, class T>
void apply_keep_run(const T* x, T* y, i64 len, bool keep, const Vec<T>& scale) {
  using V = Vec<T>;
  constexpr i64 W = V::W;
  i64 i = 0;
  const auto step = [&](i64 n) {
    put<kStream>(y + i, keep ? load_n(x + i, n) * scale : V::zero(), n);
    i += n;
  };
  if (const i64 nh = head_lanes<kStream>(y, len)) step(nh);
  while (i + W <= len) step(W);
  if (i < len) step(len - i);
}

template <bool kStream, class T>
void dropout_apply_impl(const DropoutApplyArgs<T>& a) {
  constexpr i64 W = Vec<T>::W;
  const i64 slots = (a.n + W - 1) / W, bytes = (a.n + 7) / 8;
  const Vec<T> scale = Vec<T>::set1(static_cast<T>(a.scale));
  parallel_for(slots, a.n, [&](i64 sb, i64 se) {
    const i64 i = sb * W, end = std::min(se * W, a.n);
    apply_mask_span<kStream>(a.x + i, a.y + i, end - i, a.mask, bytes, i, scale);
    if (kStream) stream_fence();
  });
}

// Rows of f2 * b3 elements, row r = a * b1 + b reading mask bits [a * f2, (a + 1) * f2).
template <bool kStream, class T>
void dropout_apply_broadcast_impl(const DropoutApplyArgs<T>& a) {
  const BroadcastShape& s = a.broadcast;
  const i64 row_len = s.f2 * s.b3, bytes = (s.f0 * s.f2 + 7) / 8;
  const Vec<T> scale = Vec<T>::set1(static_cast<T>(a.scale));
  parallel_for(s.f0 * s.b1, a.n, [&](i64 rb, i64 re) {
    for (i64 r = rb; r < re; ++r) {
      const i64 bit0 = r / s.b1 * s.f2;
      const T* x = a.x + r * row_len;
      T* y = a.y + r * row_len;
      if (s.b3 == 1) {
        apply_mask_span<kStream>(x, y, row_len, a.mask, bytes, bit0, scale);
        continue;
      }
      for (i64 c = 0; c < s.f2; ++c) {
        const bool keep = (a.mask[(bit0 + c) / 8] >> ((bit0 + c) % 8)) & 1;
        apply_keep_run<kStream>(x + c * s.b3, y + c * s.b3, s.b3, keep, scale);
      }
    }
    if (kStream) stream_fence();
  });
}

}  // namespace

// A stored mask is applied as a flat elementwise pass (no random words to compute), so large
// outputs are streamed past the caches like the batch-norm passes.
template <class T>
void dropout_apply(const DropoutApplyArgs<T>& a) {
  with_streaming<T>(a.n, [&](auto stream) { dropout_apply_impl<decltype(stream)::value>(a); });
}

template <class T>
void dropout_apply_broadcast(const DropoutApplyArgs<T>& a) {
  with_streaming<T>(a.n, [&](auto stream) { dropout_apply_broadcast_impl<decltype(stream)::value>(a); });
}

void philox(const std::uint32_t* counters, i64 n, std::uint64_t key, std::uint32_t* out) {
  // Known-answer checks of the vector Philox: U64::W counters at a time, one per lane.
  constexpr int W = U64::W;
  const PhiloxKeys keys(key);
  for (i64 i0 = 0; i0 < n; i0 += W) {
    U64 c[1][4];
    for (int w = 0; w < 4; ++w) {
      std::uint64_t lanes[W] = {};
      for (int l = 0; l < W && i0 + l < n; ++l) lanes[l] = counters[4 * (i0 + l) + w];
      std::memcpy(&c[0][w], lanes, sizeof lanes);
    }
    philox4x32_10(c, keys);
    for (int w = 0; w < 4; ++w) {
      std::uint64_t lanes[W];
      std::memcpy(lanes, &c[0][w], sizeof lanes);
      for (int l = 0; l < W && i0 + l < n; ++l) out[4 * (i0 + l) + w] = static_cast<std::uint32_t>(lanes[l]);
    }
  }
}

template void dropout<float>(const DropoutArgs<float>&);
template void dropout<double>(const DropoutArgs<double>&);
template void dropout_apply<float>(const DropoutApplyArgs<float>&);
template void dropout_apply<double>(const DropoutApplyArgs<double>&);
template void dropout_apply_broadcast<float>(const DropoutApplyArgs<float>&);
template void dropout_apply_broadcast<double>(const DropoutApplyArgs<double>&);

}  // namespace PYBN_ISA
}  // namespace pybn
