// The fused elementwise pass over dropout's keep bits (docs/dropout.md): y = op(bits, x)
// vector by vector, the bits made from the mask stream's random halves as the pass goes,
// never stored. Dropout (x * scale where kept, 0 elsewhere) and alpha dropout (an affine
// map where kept, a constant elsewhere) are two ops over this one loop.
// Included by kernel sources only, so everything lands in this ISA's namespace.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "channel_loops.h"
#include "philox.h"

namespace pybn {
namespace PYBN_ISA {

constexpr i64 kKeepGroup = 128;             // elements per group of 16 counters
constexpr i64 kKeepWindow = 2 * U32::W;     // elements per window of random halves

// Calls f(e) for e = 0, Step, .., (N - 1) * Step, each a compile-time constant.
template <int N, int Step, class F, int... I>
inline void unroll_steps(const F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I * Step>{}), ...);
}

// y[0, kKeepWindow) = op(bits, x) over whole vectors (aligned ones when streaming); op
// takes the vector's keep bits (bit j: lane j kept) and its x, and gives its y.
template <bool kStream, class T, class S, class Op>
inline void apply_keep_window(const S* x, S* y, const Keep& keep, const Op& op) {
  using V = Vec<T>;
  unroll_steps<kKeepWindow / V::W, V::W>(
      [&](auto e) { put<kStream>(y + e, op(keep.template from<e>(), load_as<T>(x + e)), V::W); },
      std::make_integer_sequence<int, kKeepWindow / V::W>{});
}

// y[at + j] = op(bit j of bits, x[at + j]) for j in [lo, hi) (ordinary stores; at + lo >=
// 0). Out of line: it runs at the ends of a thread's range only, and the hot loop stays
// small.
template <class T, class S, class Op>
__attribute__((noinline)) void apply_keep_window_part(const S* x, S* y, i64 at, std::uint64_t bits, i64 lo, i64 hi,
                                                      const Op& op) {
  for (i64 j = lo; j < hi; j += Vec<T>::W) {
    const i64 m = std::min<i64>(Vec<T>::W, hi - j);
    store_lanes(op(static_cast<std::uint32_t>(bits >> j), load_n<T>(x + at + j, m)), y + at + j, m);
  }
}

// When streaming, x is prefetched 4 KB ahead (prefetcht2) while a block's random words are
// computed: with the hardware prefetchers alone the loads after each block's arithmetic
// waited on memory. Measured in one process, alternating: L fused dropout 3.9 ms without,
// 3.3 ms with (66% -> 78% of the copy bound; in the slower memory state 93% -> 100%); A
// (mostly in L3) unchanged or 2-5% faster. 2 KB ahead did worse than none; 8-32 KB the
// same as 4 KB; the non-temporal hint worse.
template <class S>
constexpr i64 kPrefetchAhead = 4096 / sizeof(S);

template <class S>
inline void prefetch_block(const S* p) {
  constexpr int kLines = kGroupsAtOnce * kKeepGroup * sizeof(S) / 64;
#pragma GCC unroll 32
  for (int l = 0; l < kLines; ++l) __builtin_prefetch(reinterpret_cast<const char*>(p) + 64 * l, 0, 1);
}

// The pass over groups [gb, ge) of a.x / a.y (a: x, y of storage S, n, seed, offset, threshold):
// windows of kKeepWindow elements slide over the random halves of consecutive groups, each
// starting d elements before its halves' own vector. Streaming, d aligns every vector store
// of y (NumPy's large arrays start 16 bytes past a page), and so puts a float window on a
// cache line and 16-bit windows two to a line: non-temporal stores then write whole lines,
// which keeps x in the cache and saves reading y's lines first. A window that is not wholly
// inside the range (the first, and the last groups') is applied element by element from
// plain bits.
template <bool kStream, class S, class T, class Args, class Op>
void keep_pass_range(const Args& a, i64 gb, i64 ge, const Op& op_ref) {
  constexpr i64 W = Vec<T>::W;
  constexpr int NG = kGroupsAtOnce;
  const Op op = op_ref;  // a local copy: the stores to y cannot alias its constants
  const i64 start = gb * kKeepGroup, end = std::min(ge * kKeepGroup, a.n);
  int d = 0;
  if constexpr (kStream) d = static_cast<int>((W - lanes_to_alignment(a.y + start)) % W);
  const auto window_bits = [&](const U32& prev, const U32& cur) {
    return bit_window(halves_at_least(prev, a.threshold), halves_at_least(cur, a.threshold), d, kKeepWindow);
  };
  MaskStream<NG> stream(a.seed, a.offset, static_cast<std::uint64_t>(gb));
  KeepWindows windows(d, a.threshold);
  U32 prev = U32::zero();
  for (i64 g0 = gb; g0 < ge; g0 += NG) {
    U32 r[NG][kHalfVectors];
    stream.next(r);
    if (kStream && (g0 + NG) * kKeepGroup + kPrefetchAhead<S> < end)
      prefetch_block(a.x + g0 * kKeepGroup + kPrefetchAhead<S>);
    if (g0 * kKeepGroup - d >= start && (g0 + NG) * kKeepGroup - d <= end) {  // every window whole
      const S* x = a.x + g0 * kKeepGroup - d;                                 // the block's first window
      S* y = a.y + g0 * kKeepGroup - d;
#pragma GCC unroll 16
      for (int w = 0; w < NG * kHalfVectors; ++w)
        apply_keep_window<kStream, T>(x + w * kKeepWindow, y + w * kKeepWindow,
                                      windows.next(r[w / kHalfVectors][w % kHalfVectors]), op);
      prev = r[NG - 1][kHalfVectors - 1];
      continue;
    }
    for (int w = 0; w < NG * kHalfVectors && g0 + w / kHalfVectors < ge; ++w) {
      const U32& cur = r[w / kHalfVectors][w % kHalfVectors];
      const Keep keep = windows.next(cur);
      const i64 at = g0 * kKeepGroup + w * kKeepWindow - d;  // the window's first element
      if (at >= start && at + kKeepWindow <= end)
        apply_keep_window<kStream, T>(a.x + at, a.y + at, keep, op);
      else if (at + kKeepWindow > start && at < end)
        apply_keep_window_part<T>(a.x, a.y, at, window_bits(prev, cur), std::max<i64>(0, start - at),
                                  std::min<i64>(kKeepWindow, end - at), op);
      prev = cur;
    }
  }
  const i64 at = ge * kKeepGroup - d;  // the window after the last: its first d elements
  if (at < end) apply_keep_window_part<T>(a.x, a.y, at, window_bits(prev, U32::zero()), 0, end - at, op);
  if (kStream) stream_fence();
}

// y = op(bits, x) over all of a.x (storage S, compute T), streamed when large, the groups
// split between the threads.
template <class S, class T, class Args, class Op>
void keep_pass(const Args& a, const Op& op) {
  const i64 groups = (a.n + kKeepGroup - 1) / kKeepGroup;
  with_streaming<S, T>(a.n, [&](auto stream) {
    parallel_for(groups, a.n, [&](i64 gb, i64 ge) { keep_pass_range<decltype(stream)::value, S, T>(a, gb, ge, op); });
  });
}

}  // namespace PYBN_ISA
}  // namespace pybn
