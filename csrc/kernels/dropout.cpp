// Inverted dropout with the normative counter-based mask stream (docs/dropout.md): forward
// fused (random words compared and kept values scaled in one pass, no mask materialised),
// packed mask generation, and applying a packed mask. Every group of 128 elements depends
// only on (seed, offset, its index), so results do not depend on the thread split or the
// ISA. S is the storage type of x and y, T the compute type (channel_loops.h).
#include <cstring>
#include <type_traits>

#include "channel_loops.h"
#include "keep_pass.h"
#include "kernels_isa.h"
#include "philox.h"

namespace pybn {
namespace PYBN_ISA {
namespace {

constexpr i64 kGroup = kKeepGroup;

// The kept values' scale as a vector; kExact when every product x * scale of a value x of
// the storage type is exact in T (for float and double storage, where the product rounded
// to T is the result, always); kRelu when x goes through ReLU first (fused: one pass).
template <class T, bool kExact, bool kRelu = false>
struct Scale {
  Vec<T> v;
};

// Significand bits of the 16-bit storage types.
template <class S>
constexpr int kSignificandBits = std::is_same_v<S, Float16> ? 11 : 8;

// Whether x * scale is exact in float for every 16-bit x: scale (>= 1) has at most 24 minus
// S's significand bits (p = 0.5, 0.75, 0.8, 0.9 give 2, 4, 5, 10). Products of 16-bit
// subnormals stay on float's grid too (S's last place times scale's is >= 2**-149).
template <class S>
bool exact_products(float scale) {
  std::uint32_t b;
  std::memcpy(&b, &scale, sizeof b);
  const std::uint32_t significand = (b & 0x7FFFFFu) | 0x800000u;
  return 24 - __builtin_ctz(significand) <= 24 - kSignificandBits<S>;
}

// Calls f(Scale<T, kExact, kRelu>) for the scale of storage S.
template <class S, class T, class F>
void with_scale(double scale, bool relu, const F& f) {
  const Vec<T> v = Vec<T>::set1(static_cast<T>(scale));
  const auto with_relu = [&](auto exact) {
    if (relu)
      f(Scale<T, decltype(exact)::value, true>{v});
    else
      f(Scale<T, decltype(exact)::value, false>{v});
  };
  if constexpr (is_16bit<S>) {
    if (!exact_products<S>(static_cast<float>(scale))) {
      with_relu(std::false_type{});
      return;
    }
  }
  with_relu(std::true_type{});
}

// x * scale where `bits` keeps, 0 elsewhere, for storage S: kept values are x * scale
// rounded once to S. For 16-bit S, unless the product is exact, it is taken rounded to odd,
// so that the store's rounding to S is the correct rounding of the exact product (not of
// its float rounding), and the mask is applied with a scale of 1 (exact).
template <class S, class T, bool kExact, bool kRelu>
// Always inlined (with philox_round and KeepWindows::next): with dropout's instantiations
// GCC's growth limits left these small steps of the hot loop out of line on the scalar
// path (float32 fused forward 32 -> 44 instructions per element).
__attribute__((always_inline)) inline Vec<T> kept_scaled(std::uint32_t bits, const Vec<T>& x_in,
                                                         const Scale<T, kExact, kRelu>& scale) {
  const Vec<T> x = kRelu ? relu(x_in) : x_in;  // exact: ReLU changes no kept value's rounding
  if constexpr (is_16bit<S> && !kExact)
    return scale_where(bits, mul_round_to_odd(x, scale.v), Vec<T>::set1(T(1)));
  else
    return scale_where(bits, x, scale.v);
}

}  // namespace

template <class S, class T>
void dropout(const DropoutArgs<S>& a) {
  with_scale<S, T>(a.scale, a.relu, [&](const auto& scale) {
    keep_pass<S, T>(a, [scale](std::uint32_t bits, const Vec<T>& x) { return kept_scaled<S>(bits, x, scale); });
  });
}

void dropout_mask(const DropoutMaskArgs& a) {
  const i64 n = a.n, groups = (n + kGroup - 1) / kGroup;
  constexpr int NG = kGroupsAtOnce;
  parallel_for(groups, n, [&](i64 gb, i64 ge) {
    MaskStream<NG> stream(a.seed, a.offset, static_cast<std::uint64_t>(gb));
    for (i64 g0 = gb; g0 < ge; g0 += NG) {
      U32 r[NG][kHalfVectors];
      stream.next(r);
      for (i64 g = g0; g < std::min<i64>(g0 + NG, ge); ++g) {
        std::uint64_t bits[2];
        group_keep_bits(r[g - g0], a.threshold, bits);
        const i64 valid = std::min(kGroup, n - g * kGroup);
        if (valid < 64) bits[0] &= (std::uint64_t(1) << valid) - 1;  // trailing bits are zero
        if (valid < 128) bits[1] &= valid <= 64 ? 0 : (std::uint64_t(1) << (valid - 64)) - 1;
        unsigned char bytes[16];
        std::memcpy(bytes, bits, 16);  // little-endian: bit k%8 of byte k/8 is element k
        std::memcpy(a.mask + g * 16, bytes, static_cast<std::size_t>((valid + 7) / 8));
      }
    }
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
// mask of `bytes` bytes; the output is aligned first when streaming. The bits of 32
// elements come from one fixed 8-byte read (a bit offset below 8 leaves 56 of its bits);
// read per vector with a length clamped to the mask's end, they went through a variable
// copy on the stack (one thread, in cache: AVX2 0.82 -> 0.47 cycles per element, AVX-512
// 0.50 -> 0.43, scalar 3.3 -> 1.7).
template <bool kStream, class S, class T, class Sc>
void apply_mask_span(const S* x, S* y, i64 len, const unsigned char* mask, i64 bytes, i64 bit0, const Sc& scale) {
  using V = Vec<T>;
  constexpr i64 W = V::W, kChunk = 32;
  constexpr std::uint64_t kLanes = (std::uint64_t(1) << W) - 1;
  // y[at, at + n) from x's values there and their bits (bit 0 first)
  // (stream: put's kStream; ordinary stores where a partial line would be streamed)
  const auto apply = [&](i64 at, std::uint64_t bits, const V& xv, i64 n, auto stream) {
    put<decltype(stream)::value>(y + at, kept_scaled<S>(static_cast<std::uint32_t>(bits & kLanes), xv, scale), n);
  };
  // The chunks below write whole lines (kChunk lanes are one or more), so, streaming, the
  // head ends at a line boundary and streams nothing (for_each_vector says why).
  i64 i = 0;
  const auto step = [&](i64 n, auto stream) {
    apply(i, mask_bits_at(mask, bytes, bit0 + i), load_n<T>(x + i, n), n, stream);
    i += n;
  };
  static_assert(kChunk * sizeof(S) % kLineBytes == 0, "chunks of whole lines");
  if constexpr (kStream) {
    const i64 head = std::min(len, lanes_to_line(y));
    while (i < head) step(std::min(W, head - i), std::false_type{});
  }
  for (; i + kChunk <= len && (bit0 + i) / 8 + 8 <= bytes; i += kChunk) {
    std::uint64_t word;
    std::memcpy(&word, mask + (bit0 + i) / 8, 8);
    word >>= (bit0 + i) % 8;
#pragma GCC unroll 32
    for (i64 v = 0; v < kChunk; v += W) apply(i + v, word >> v, load_as<T>(x + i + v), W, std::bool_constant<kStream>{});
  }
  for_each_vector<kStream, T>(y + i, len - i, [&](i64, i64 n, auto stream) { step(n, stream); });
}

// y[j] = keep ? x[j] * scale : 0 for j < len (one bit for the whole run).
template <bool kStream, class S, class T, class Sc>
void apply_keep_run(const S* x, S* y, i64 len, bool keep, const Sc& scale) {
  using V = Vec<T>;
  for_each_vector<kStream, T>(y, len, [&](i64 i, i64 n, auto stream) {
    put<decltype(stream)::value>(y + i, keep ? kept_scaled<S>(~0u, load_n<T>(x + i, n), scale) : V::zero(), n);
  });
}

template <bool kStream, class S, class T, class Sc>
void dropout_apply_impl(const DropoutApplyArgs<S>& a, const Sc& scale) {
  constexpr i64 W = Vec<T>::W;
  const i64 slots = (a.n + W - 1) / W, bytes = (a.n + 7) / 8;
  parallel_for(slots, a.n, [&](i64 sb, i64 se) {
    const i64 i = sb * W, end = std::min(se * W, a.n);
    apply_mask_span<kStream, S, T>(a.x + i, a.y + i, end - i, a.mask, bytes, i, scale);
    if (kStream) stream_fence();
  });
}

// Rows of f2 * b3 elements, row r = a * b1 + b reading mask bits [a * f2, (a + 1) * f2).
template <bool kStream, class S, class T, class Sc>
void dropout_apply_broadcast_impl(const DropoutApplyArgs<S>& a, const Sc& scale) {
  const BroadcastShape& s = a.broadcast;
  const i64 row_len = s.f2 * s.b3, bytes = (s.f0 * s.f2 + 7) / 8;
  parallel_for(s.f0 * s.b1, a.n, [&](i64 rb, i64 re) {
    for (i64 r = rb; r < re; ++r) {
      const i64 bit0 = r / s.b1 * s.f2;
      const S* x = a.x + r * row_len;
      S* y = a.y + r * row_len;
      if (s.b3 == 1) {
        apply_mask_span<kStream, S, T>(x, y, row_len, a.mask, bytes, bit0, scale);
        continue;
      }
      for (i64 c = 0; c < s.f2; ++c) {
        const bool keep = (a.mask[(bit0 + c) / 8] >> ((bit0 + c) % 8)) & 1;
        apply_keep_run<kStream, S, T>(x + c * s.b3, y + c * s.b3, s.b3, keep, scale);
      }
    }
    if (kStream) stream_fence();
  });
}

}  // namespace

// A stored mask is applied as a flat elementwise pass (no random words to compute), so large
// outputs are streamed past the caches like the batch-norm passes.
template <class S, class T>
void dropout_apply(const DropoutApplyArgs<S>& a) {
  with_scale<S, T>(a.scale, a.relu, [&](const auto& scale) {
    with_streaming<S, T>(a.n, [&](auto stream) { dropout_apply_impl<decltype(stream)::value, S, T>(a, scale); });
  });
}

template <class S, class T>
void dropout_apply_broadcast(const DropoutApplyArgs<S>& a) {
  with_scale<S, T>(a.scale, a.relu, [&](const auto& scale) {
    with_streaming<S, T>(a.n,
                         [&](auto stream) { dropout_apply_broadcast_impl<decltype(stream)::value, S, T>(a, scale); });
  });
}

// dx = dy * scale where y > 0 or NaN, 0 where y <= 0: dropout(relu(x))'s gradient from its
// output, as torch's (its ReLU passes the gradient of a NaN); a plain elementwise pass (kept
// values rounded once, as dropout's; no random words).
template <class S, class T>
void relu_dropout_backward(const ReluDropoutBackwardArgs<S>& a) {
  with_scale<S, T>(a.scale, false, [&](const auto& scale) {
    with_streaming<S, T>(a.n, [&](auto stream) {
      constexpr i64 W = Vec<T>::W;
      parallel_for((a.n + W - 1) / W, a.n, [&](i64 sb, i64 se) {
        const i64 i = sb * W, end = std::min(se * W, a.n);
        for_each_vector<decltype(stream)::value, T>(a.dx + i, end - i, [&](i64 j, i64 n, auto st) {
          const Vec<T> g = kept_scaled<S>(~0u, load_n<T>(a.dy + i + j, n), scale);
          put<decltype(st)::value>(a.dx + i + j, keep_unless_nonpositive(load_n<T>(a.y + i + j, n), g), n);
        });
        if (decltype(stream)::value) stream_fence();
      });
    });
  });
}

void philox(const PhiloxArgs& a) {
  // Known-answer checks of the vector Philox: U64::W counters at a time, one per lane.
  constexpr int W = U64::W;
  const PhiloxKeys keys(a.key);
  const i64 n = a.n;
  const std::uint32_t* counters = a.counters;
  std::uint32_t* out = a.out;
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

PYBN_FILL_FAMILY(dropout)

}  // namespace PYBN_ISA
}  // namespace pybn
