// Loops over the (outer, C, inner) view shared by the channel-wise kernels.
// Included by kernel sources only, so everything lands in this ISA's namespace.
//
// Two ways to walk the array, chosen by the layout:
// - row mode (inner large, NCHW): each row of `inner` elements has one channel, so the
//   channel's coefficients are broadcast across the row;
// - period mode (inner == 1 channels-last, or short rows): the channel pattern repeats
//   with period P = C*inner along the flat array, so coefficients are loaded per lane
//   from a table of one period (plus a vector's worth, so no load wraps around).
//
// Reductions never depend on the thread count: the work is cut into blocks and groups
// that depend on the shape alone, each group's blocks are merged in order, and the
// groups are merged in order at the end.
//
// The loops take two element types: S, the storage type of the arrays, and T, the compute
// type of the vectors, of the per-channel coefficients and of the partial sums (for
// float and double storage, T is S: PYBN_DTYPES). Vectors hold Vec<T>::W lanes; storage
// is converted once at each load and rounded once at each store (load_as, store_as).
// Non-temporal stores need S == T or 16-bit S (with_streaming).
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <numeric>
#include <type_traits>

#include "pybn/cache_sizes.h"
#include "pybn/kernels.h"
#include "pybn/parallel.h"
#include "pybn/scratch.h"
#include "pybn/vec/vec.h"

namespace pybn {
namespace PYBN_ISA {

using i64 = std::int64_t;

// Rows shorter than this are walked in period mode (use_period_mode), periods of up to
// kPeriodMaxLength positions (the reductions cut long ones into column chunks; one row of
// shifts or means, P values, is allocated per call) and the elementwise passes' table up
// to kPeriodTableMaxLength (K tables of P values). Periods past 65536 were left to row
// mode, which merges each row of a channel on its own: (32, 2048, 7, 7), ResNet-50's last
// stage at batch 32, trained in 7.4 ms against 0.9 ms for inference (docs/performance.md).
constexpr i64 kPeriodMaxInner = 128;
constexpr i64 kPeriodMaxLength = i64(1) << 20;
constexpr i64 kPeriodTableMaxLength = i64(1) << 16;
// Elements in one reduction block: its second pass re-reads it from L1/L2, not memory.
constexpr i64 kBlockElements = 4096;
constexpr i64 kPeriodBlockElements = i64(1) << 16;
constexpr i64 kFirstBlockElements = 4096;
// Each lane of a period block sums one value per row in T: more rows would let float
// rounding grow past about sqrt(rows) ulps.
constexpr i64 kMaxBlockRows = 128;
// Rows a range of period blocks keeps when the rows allow (PeriodBlocks::make).
constexpr i64 kMinRangeRows = 16;
// A reduction group holds at least this many elements; at most kMaxGroups per channel.
constexpr i64 kGroupElements = i64(1) << 16;
constexpr i64 kMaxGroups = 16;
// Row mode's groups are smaller: the pool's grain, so that every array large enough for
// two threads has groups for both (short rows cost more per element than their bytes:
// (1, 2048, 7, 7) was one group, on one thread). Smaller groups would only add first
// segments, which take an extra pass (merge_segment).
constexpr i64 kRowGroupElements = kGrainElements;
static_assert(kAlignmentBytes % (sizeof(double) * Vec<double>::W) == 0 &&
                  kAlignmentBytes % (sizeof(float) * Vec<float>::W) == 0,
              "aligned allocations (kAlignmentBytes) must align every vector of this path");

// Period mode (the reductions sum columns of rows of whole periods, then fold each
// block's columns into channel sums) for inner == 1, where rows are single elements, and
// for short rows when the samples are enough: row mode pays per row (a horizontal sum and
// a merge), period mode per block and channel (a fold as long as the row). Measured on
// float32 training forwards and backwards, 1 and 2 threads, AVX-512 and AVX2 (docs/
// performance.md): period mode won for (6, 1024, 49), (4, 128, 9), (1, 512, 16), lost for
// (1, 64, 64), (2, 256, 49), (2, 64, 100), (4, 512, 64); rows of at most 16, or more samples
// than a sixteenth of the row length, separate them (and include every layout with 8
// samples, the rule before).
constexpr i64 kPeriodRowsPerSample = 16;

inline bool use_period_mode(const Layout& L) {
  return L.inner == 1 ||
         (L.inner < kPeriodMaxInner && L.channels * L.inner <= kPeriodMaxLength &&
          (L.inner <= kPeriodRowsPerSample || kPeriodRowsPerSample * L.outer > L.inner));
}

// Fills row[0, len) with the per-channel values of src along one period (each repeated
// `inner` times) and on cyclically: row[q] = src[(q % (C * inner)) / inner].
template <class T, class S>
void fill_period(const Layout& L, const S* src, i64 len, T* row) {
  const i64 P = L.channels * L.inner;
  if (L.inner == 1) {
    for (i64 c = 0; c < L.channels; ++c) row[c] = static_cast<T>(src[c]);
  } else {
    for (i64 c = 0; c < L.channels; ++c) std::fill(row + c * L.inner, row + (c + 1) * L.inner, static_cast<T>(src[c]));
  }
  // On in doubling copies: a loop of row[q] = row[q - P] waited on its own stores when P is
  // a few positions (3.4 us for one channel's 528-entry table, against 0.4 for 64 channels).
  for (i64 filled = P; filled > 0 && filled < len; filled *= 2)
    std::copy_n(row, std::min(filled, len - filled), row + filled);
}

// The compute type whose vectors are streamed to storage S: S itself, or float for 16-bit
// storage (stream_as).
template <class S>
using stream_vector_t = std::conditional_t<is_16bit<S>, float, S>;

// Calls f(std::true_type{}) when an output of n values of S is large enough to be written
// with non-temporal stores (stream_min_bytes), else f(std::false_type{}): the kStream template
// argument of the loops. 16-bit outputs are streamed as float ones are: without it every
// store of a large output first read its line (half the traffic again) and left x's lines
// to be evicted. Other narrowing stores (float storage computed in double, a diagnostic)
// are not.
template <class S, class T, class F>
inline void with_streaming(i64 n, const F& f) {
  if constexpr (std::is_same_v<T, stream_vector_t<S>>) {
    if (n * i64(sizeof(S)) >= stream_min_bytes())
      f(std::true_type{});
    else
      f(std::false_type{});
  } else {
    f(std::false_type{});
  }
}

// n values of T, default-initialised as new T[n] would (doubles and floats left as they
// are, Moments empty), in scratch from the calling thread's pool of kept blocks
// (pybn/scratch.h).
struct ScratchRelease {
  void operator()(void* block) const noexcept { scratch_release(block); }
};

template <class T>
using Buffer = std::unique_ptr<T[], ScratchRelease>;

template <class T>
Buffer<T> make_buffer(i64 n) {
  static_assert(std::is_trivially_destructible_v<T>);  // (released without destructors)
  const auto count = static_cast<std::size_t>(std::max<i64>(n, 1));
  if (count > std::numeric_limits<std::size_t>::max() / sizeof(T)) throw std::bad_alloc();  // (as new T[n])
  T* values = static_cast<T*>(scratch_acquire(sizeof(T) * count));
  std::uninitialized_default_construct_n(values, count);
  return Buffer<T>(values);
}

// ---------------------------------------------------------------------------------------
// Scratch of parallel loops. Nothing allocates (or throws) inside a parallel region: an
// exception cannot leave a thread of the team, so an allocation failing there would end
// the process instead of reaching the caller as MemoryError. A loop that needs working
// buffers is cut into slices, one per thread it can use, and slice s takes its buffers
// from storage allocated before the loop.

// Slices for a loop over n items of `work` elements in all.
inline i64 slice_count(i64 n, i64 work) {
  return std::max<i64>(1, std::min<i64>(n, threads_for(work)));
}

// Calls f(slice, begin, end) on `slices` contiguous slices of [0, n), in parallel; each
// slice runs on one thread, so its buffers are never shared.
template <class F>
void parallel_slices(i64 n, i64 work, i64 slices, const F& f) {
  parallel_for(slices, work, [&](i64 s0, i64 s1) {
    for (i64 s = s0; s < s1; ++s) {
      const i64 begin = n * s / slices, end = n * (s + 1) / slices;
      if (begin < end) f(s, begin, end);
    }
  });
}

// One buffer of `per_slice` T for each slice, in one allocation made up front.
template <class T>
class SliceBuffers {
 public:
  SliceBuffers(i64 slices, i64 per_slice) : data_(make_buffer<T>(slices * per_slice)), per_slice_(per_slice) {}
  T* operator[](i64 slice) const { return data_.get() + slice * per_slice_; }

 private:
  Buffer<T> data_;
  i64 per_slice_;
};

// Loads n lanes of storage S as Vec<T> (n == W compiles to a plain load when the caller
// passes the constant).
template <class T, class S>
inline Vec<T> load_n(const S* p, i64 n) {
  return n == Vec<T>::W ? load_as<T>(p) : load_as<T>(p, n);
}

// Stores n lanes (n == W compiles to a plain store when the caller passes the constant).
template <class T, class S>
inline void store_lanes(const Vec<T>& v, S* p, i64 n) {
  if (n == Vec<T>::W)
    store_as(v, p);
  else
    store_as(v, p, n);
}

// Lanes from p up to the next address a streamed vector may start at.
template <class S>
inline i64 lanes_to_alignment(const S* p) {
  constexpr std::size_t kBytes = kStreamAlignment<stream_vector_t<S>, S>;
  const auto mis = reinterpret_cast<std::uintptr_t>(p) % kBytes;
  return mis == 0 ? 0 : static_cast<i64>((kBytes - mis) / sizeof(S));
}

// ---------------------------------------------------------------------------------------
// Elementwise pass: out[i] = op(i, coefficients of i's channel).
//
// coef holds K per-channel arrays of length C. op(i, n, cv) returns the output vector for
// flat positions [i, i + n), n <= W, given cv[k] = coefficient k for each of those lanes;
// it must load only n lanes of its inputs. Everything the loops use is passed by value,
// so the compiler keeps it in registers instead of reloading it after every store.

template <bool kStream, class T, class S>
inline void put(S* p, const Vec<T>& r, i64 n) {
  if (n < Vec<T>::W)
    store_as(r, p, n);
  else if constexpr (kStream)
    stream_as(r, p);
  else
    store_as(r, p);
}

// Head lanes before out + i is aligned for streaming (none when not streaming).
template <bool kStream, class T>
inline i64 head_lanes(const T* p, i64 available) {
  if constexpr (kStream)
    return std::min(available, lanes_to_alignment(p));
  else
    return 0;
}

// Non-temporal stores must fill whole 64-byte lines: a line written partly by them and
// partly by ordinary stores leaves the write-combining buffer as a partial write, which
// the memory controller completes by reading the line. Where vectors are smaller than a
// line (16-bit storage, and float32 on AVX2) rows whose ends fall inside lines did that
// at every row: NCHW 7x7 rows (32, 2048, 7, 7) took 5.9 ms in float16 against 1.2 ms in
// float32 on AVX-512, 6.4 ms in float32 on AVX2.
constexpr i64 kLineBytes = 64;

// Lanes of S from p up to the next line boundary.
template <class S>
inline i64 lanes_to_line(const S* p) {
  const auto mis = static_cast<i64>(reinterpret_cast<std::uintptr_t>(p) % kLineBytes);
  return mis == 0 ? 0 : (kLineBytes - mis) / i64(sizeof(S));
}

// Writes the span y[0, len) in vectors, in order: step(i, n, stream) writes [i, i + n)
// (n <= W) with ordinary stores, or, when stream is std::true_type (then n == W), with a
// non-temporal one. With kStream, only the whole lines of the span are streamed: the
// lanes before its first line boundary and after its last one are stored ordinarily.
template <bool kStream, class T, class S, class Step>
inline void for_each_vector(S* y, i64 len, const Step& step) {
  constexpr i64 W = Vec<T>::W;
  i64 i = 0;
  if constexpr (kStream) {
    constexpr i64 kLineLanes = kLineBytes / i64(sizeof(S));
    static_assert(kLineLanes % W == 0, "a line holds whole vectors");
    const i64 head = std::min(len, lanes_to_line(y));
    for (; i < head; i += std::min(W, head - i)) step(i, std::min(W, head - i), std::false_type{});
    for (const i64 lines_end = i + (len - i) / kLineLanes * kLineLanes; i < lines_end; i += W)
      step(i, W, std::true_type{});
  }
  for (; i + W <= len; i += W) step(i, W, std::false_type{});
  if (i < len) step(i, len - i, std::false_type{});
}

// Row mode over flat positions [i, end).
template <bool kStream, class S, class T, int K, class Op>
void apply_rows(const Layout L, const T* const* coef, S* const out, const Op op, i64 i, const i64 end) {
  using V = Vec<T>;
  i64 row = i / L.inner, c = row % L.channels;  // then counted, not divided, per row
  for (; i < end; ++row, c = c + 1 == L.channels ? 0 : c + 1) {
    const i64 row_end = std::min(end, (row + 1) * L.inner);
    V cv[K];
    for (int k = 0; k < K; ++k) cv[k] = V::set1(coef[k][c]);
    S* const row_out = out + i;
    const i64 first = i;
    for_each_vector<kStream, T>(row_out, row_end - i, [&](i64 at, i64 n, auto stream) {
      put<decltype(stream)::value>(row_out + at, op(first + at, n, cv), n);
    });
    i = row_end;
  }
  if (kStream) stream_fence();
}

// Period mode over flat positions [i, end); tab holds K rows of `stride` = P + W entries (P
// a multiple of the channel pattern's period), so a vector whose first lane is at table
// position j < P reads tab[j, j + W) without wrapping. The walk goes in runs of vectors
// between wraps of j, with fixed table offsets inside a run (no index bookkeeping per vector).
template <bool kStream, class S, class T, int K, class Op>
void apply_period(const i64 P, const T* const tab, const i64 stride, S* const out, const Op op, i64 i,
                  const i64 end) {
  using V = Vec<T>;
  constexpr i64 W = V::W;
  i64 j = i % P;
  const auto partial_vector = [&](i64 n) {
    V cv[K];
    for (int c = 0; c < K; ++c) cv[c] = V::load(tab + c * stride + j);
    put<kStream>(out + i, op(i, n, cv), n);
  };
  const auto advance = [&](i64 n) {  // n < P + W, so one subtraction unless P < W
    i += n;
    j += n;
    if (j >= P) j = j - P < P ? j - P : j % P;
  };
  if (const i64 nh = head_lanes<kStream>(out + i, end - i)) {
    partial_vector(nh);
    advance(nh);
  }
  while (i + W <= end) {
    const i64 run = std::min((P - j + W - 1) / W, (end - i) / W);  // vectors starting below P
    const T* t = tab + j;
    i64 at = i;
    for (const i64 stop = i + run * W; at < stop; at += W, t += W) {
      V cv[K];
      for (int c = 0; c < K; ++c) cv[c] = V::load(t + c * stride);
      put<kStream>(out + at, op(at, W, cv), W);
    }
    advance(run * W);
  }
  if (i < end) partial_vector(end - i);
  if (kStream) stream_fence();
}

// Calls f(begin, end) over [begin, end) in pieces of kPieceElements (multiples of W),
// last piece first when `backwards`.
constexpr i64 kPieceElements = 8192;

template <class F>
void for_each_piece(i64 begin, i64 end, bool backwards, const F& f) {
  if (!backwards) {
    f(begin, end);
    return;
  }
  for (i64 hi = end; hi > begin;) {
    const i64 lo = std::max(begin, (hi - 1) / kPieceElements * kPieceElements);
    f(lo, hi);
    hi = lo;
  }
}

constexpr i64 kPeriodTableRun = 512;
// The elementwise passes of period-mode layouts take rows of at least this many elements
// row by row, each with its channel's coefficients broadcast, rather than through a table
// of every position's coefficients (a table of P positions times K is read from L2 once P
// passes a few thousand). 16 was best of 4, 8, 16, 32 and the table alone on AVX-512 and
// AVX2 (float32, 1 thread, docs/performance.md): (16, 128, 8, 8) inference 32 -> 18 us,
// (32, 512, 7, 7) 182 -> 100 us; rows of 9 (3x3) are faster through the table.
constexpr i64 kTableMaxInner = 16;

template <bool kStream, class S, class T, int K, class Op>
void channel_apply_impl(const Layout& L, const T* const (&coef)[K], S* out, const Op& op, bool backwards) {
  constexpr i64 W = Vec<T>::W;
  const i64 total = L.numel();
  const i64 slots = (total + W - 1) / W;  // threads split the array at vector boundaries
  if (use_period_mode(L) && L.inner < kTableMaxInner && L.channels * L.inner <= kPeriodTableMaxLength) {
    // The table spans whole periods up to kPeriodTableRun elements: apply_period's runs of
    // vectors end where the table wraps, and runs of one short period (8 vectors for 64
    // channels-last channels) cost a quarter of the pass in bookkeeping.
    const i64 P = L.channels * L.inner * std::max<i64>(1, kPeriodTableRun / (L.channels * L.inner));
    const i64 stride = P + W;
    Buffer<T> table = make_buffer<T>(K * stride);
    for (int k = 0; k < K; ++k) fill_period(L, coef[k], stride, table.get() + k * stride);
    const T* tab = table.get();
    parallel_for(slots, total, [=](i64 sb, i64 se) {
      for_each_piece(sb * W, std::min(se * W, total), backwards, [=](i64 lo, i64 hi) {
        apply_period<kStream, S, T, K>(P, tab, stride, out, op, lo, hi);
      });
    });
  } else {
    const T* const* cf = coef;
    parallel_for(slots, total, [=](i64 sb, i64 se) {
      for_each_piece(sb * W, std::min(se * W, total), backwards, [=](i64 lo, i64 hi) {
        apply_rows<kStream, S, T, K>(L, cf, out, op, lo, hi);
      });
    });
  }
}

// The pass that follows a reduction over the same arrays sets `after_reduction`: each
// thread then walks its part of the array last piece first, so the tens of MB that the
// reduction read last, still in cache, are used before they are evicted.
template <class S, class T, int K, class Op>
void channel_apply(const Layout& L, const T* const (&coef)[K], S* out, const Op& op,
                   bool after_reduction = false) {
  if (L.numel() == 0) return;
  with_streaming<S, T>(L.numel(), [&](auto stream) {
    channel_apply_impl<decltype(stream)::value, S, T>(L, coef, out, op, after_reduction);
  });
}

// ---------------------------------------------------------------------------------------
// Channel blocks: a reduction and the elementwise pass that needs its result, done per
// block of channels by one thread (the next block's reduction interleaved with the
// current block's pass: pipelined_channel_blocks), so that the second pass re-reads the
// block from the cache instead of memory: each input crosses the memory bus once. A block is
// sized to the thread's L2 where a channel's slice fits there (the second pass then reads
// from L2), else to its share of the L3 (cache_sizes: the sizes come from the CPU at run
// time). Each channel is reduced by one thread in a fixed order (its rows, then segments
// within a row, in memory order) whatever the block size: results depend neither on the
// thread count nor on the cache sizes. Whether an array is blocked at all changes the
// reduction order, so that stays a decision on the shape alone.

// Blocks use at most this fraction of the L2 (1/kL2Share): room for the coefficient
// tables and the prefetchers' lead, and for set conflicts between rows of a channel,
// which lie a whole row of channels apart.
constexpr i64 kL2Share = 2;
// The threads' blocks together use at most this fraction of the L3: a block must survive
// what the other threads, and the prefetchers, bring in while it is normalized.
constexpr i64 kL3Share = 4;
// Blocks a thread holds at once: the one being written and the next, being read
// (pipelined_channel_blocks). The shares above are for both together.
constexpr i64 kBlocksInFlight = 2;
// Rows of an L2-sized block shorter than this take an L3-sized block instead (channel_block).
constexpr i64 kMinL2RowBytes = i64(64) << 10;
// Cores with at least this much L2 (Intel's server cores: 2 MiB) take L2 blocks whatever
// their rows' length. Their L3 is the socket's mesh, no faster to read back from than
// memory, so the second pass gains most from the L2; short rows cost little there, where
// the prefetchers stop at every 4 KiB page anyway.
constexpr i64 kLargeL2Bytes = i64(2) << 20;
// On such a core the blocks in flight fill at most this share of the L2, as many channels
// as fit (M's backward: 16-channel blocks filling 78% of a 2 MiB L2 took 523-560 us,
// 8-channel ones filling 39% 457-465 us); a channel too large for that share but within
// half the L2 is a block of its own, still pipelined (L's training forward: 5.9 ms,
// against 7.9 ms with nothing pipelined).
constexpr i64 kLargeL2BlocksPercent = 40;
// ... or more, up to half the L2, where the block's rows (one per sample, summed over the
// arrays it reads) would be shorter than this: one-channel blocks of 3 KB rows ((128, 64,
// 28, 28)'s training forward) took 2.12-2.28 ms, two-channel ones 1.83-2.07 ms.
constexpr i64 kLargeL2MinRowBytes = i64(12) << 10;
// On such a core, a channel whose slice fits in this share of the L2 but not twice in it
// is its own block, reduced and then written with nothing pipelined (ChannelBlocks): the
// next block's reads would evict the lines the current block's pass still has to read.
constexpr i64 kAloneL2Percent = 85;
// Below this (bytes read per pass: the L2 of two server cores), both passes run from the
// cache anyway. The same on every CPU, as whether an array is blocked sets its reduction
// order.
constexpr i64 kChannelBlockMinBytes = i64(4) << 20;

struct ChannelRange {
  i64 begin = 0, end = 0;
};

// How a blocked kernel walks an array: `channels` per block (0: not blocked), and whether
// each block's writes carry the next block's reads (pipelined_channel_blocks).
struct ChannelBlocks {
  i64 channels = 0;
  bool pipelined = true;
  explicit operator bool() const { return channels > 0; }
};

// What a pass over a block does after each sample's rows when nothing is pipelined with it.
struct NoSampleHook {
  void operator()(i64) const {}
  void prefetch_for(i64, i64) const {}
};

// The blocks for arrays of `bytes` per position (summed over the arrays both passes read);
// none when the layout is not blocked (a decision on the shape alone). `passing_bytes` per
// position are of arrays only the second pass reads (a residual): their lines pass through
// the cache beside the blocks, so blocks are sized for them too.
//
// Two blocks (kBlocksInFlight) fill half of one core's L2 when a channel's slice fits in
// a quarter and the block's rows (one per outer index, `block * inner` positions long) are
// at least kMinL2RowBytes; otherwise the threads' blocks fill a quarter of the L3. Short
// rows defeat the prefetchers, which start over at each row: on a 1 MB-L2 Zen 4,
// one-channel L2 blocks (rows of 6-12 KB: A's float32 and L's float16 forward) trained
// 10-40% slower than L3 blocks, while L2 blocks with rows of 128-256 KB ((2..4,
// 512..1024, 64, 64)) trained and ran the backward 10-25% faster (docs/performance.md).
// On a core with a large L2 (kLargeL2Bytes) the two blocks fill kLargeL2BlocksPercent of
// it (one channel at least, while a channel fits half of it) and rows of any length are
// taken: on a 2 MiB-L2 Xeon, with blocks filling all of it, A trained in 1.21-1.24 ms
// instead of 1.48-1.51 ms in L3 blocks, its backward 1.76-1.81 instead of 2.28-2.29 ms, L
// trained in 5.1 instead of 6.1-6.3 ms; filling 40%, 6-12 MB arrays trained 7-20% faster
// and ran the backward up to 20% faster again (docs/performance.md, "the 6th").
// There a channel too large for two blocks but within kAloneL2Percent of the L2 runs alone:
// L's backward (x and dy, 1.6 MB a channel) took 10.5-10.8 ms instead of 12.5-13.0 pipelined
// in one-channel L3 blocks, whose second pass gained nothing over reading memory again; a
// (128, 64, 56, 56) training forward (1.6 MB of x) 6.7-6.9 instead of 6.9-7.1 ms. Sized
// for x alone, A's training forward with a residual ran two-channel blocks whose residual
// lines evicted x's: 1.86-1.87 ms, against 1.60-1.61 ms in blocks sized for both.
inline ChannelBlocks channel_block(const Layout& L, i64 bytes, i64 passing_bytes = 0) {
  if (use_period_mode(L) || L.channels < 4) return {};
  const i64 cached = L.per_channel() * bytes, per_channel = L.per_channel() * (bytes + passing_bytes);
  if (cached * L.channels < kChannelBlockMinBytes) return {};
  // at most C/16 channels: enough blocks for the threads to finish together
  const auto channels_within = [&](i64 budget) {
    return std::clamp<i64>(std::min(budget / per_channel, L.channels / 16), 1, L.channels);
  };
  const CacheSizes& cs = cache_sizes();
  if (cs.l2_bytes >= kLargeL2Bytes) {
    const i64 half_l2 = cs.l2_bytes / kBlocksInFlight;
    if (per_channel <= half_l2) {
      const i64 block = channels_within(cs.l2_bytes * kLargeL2BlocksPercent / (100 * kBlocksInFlight));
      const i64 row_bytes = L.inner * bytes, long_rows = (kLargeL2MinRowBytes + row_bytes - 1) / row_bytes;
      return {std::max(block, std::min(long_rows, channels_within(half_l2)))};
    }
    if (cached > half_l2 && per_channel * 100 <= cs.l2_bytes * kAloneL2Percent) return {1, false};
  } else if (const i64 in_l2 = cs.l2_bytes / (kL2Share * kBlocksInFlight); per_channel <= in_l2) {
    const i64 block = channels_within(in_l2);
    if (block * L.inner * bytes >= kMinL2RowBytes) return {block};
  }
  return {channels_within(cs.l3_bytes / (kL3Share * kBlocksInFlight * std::max<i64>(threads_for(L.numel()), 1)))};
}

// Slices of pipelined_channel_blocks (for the scratch its callers allocate per slice).
inline i64 channel_block_slices(const Layout& L, ChannelBlocks blocks) {
  return slice_count((L.channels + blocks.channels - 1) / blocks.channels, L.numel());
}

// Calls segment(c, offset, length) for the rows of sample o of the channels in r, in memory
// order, in segments of at most kBlockElements.
template <class F>
void for_each_channel_segment(const Layout& L, ChannelRange r, i64 o, F&& segment) {
  for (i64 c = r.begin; c < r.end; ++c) {
    const i64 row = (o * L.channels + c) * L.inner;
    for (i64 i = 0; i < L.inner; i += kBlockElements) segment(c, row + i, std::min(kBlockElements, L.inner - i));
  }
}

// Asks for the cache line of p[j] into the L2 once per line-sized group of elements, for
// the groups that begin in [i, i + n): called per vector as a pass walks i upwards, one
// request per line. Never past p[limit - 1].
template <class S>
inline void prefetch_lines(const S* p, i64 i, i64 n, i64 limit) {
  constexpr i64 kLanes = std::max<i64>(1, kLineBytes / i64(sizeof(S)));
  const i64 j = (i + kLanes - 1) / kLanes * kLanes;
  if (j < i + n && j < limit) __builtin_prefetch(p + j, 0, 2);
}

// The reads of the next block that a pass over one block carries along
// (pipelined_channel_blocks): after sample o's rows, the next block's statistics over
// sample o; while element i is written, the lines of element i + ahead (the next block's
// element in the same place) are requested. The per-vector loop holds it by value, and it
// holds the prefetch (pointers and a limit) by value: nothing there is reloaded after the
// loop's stores.
template <class Reduce, class Prefetch>
struct NextBlockReads {
  const Reduce& reduce;
  Prefetch prefetch;
  i64 slice;
  ChannelRange next;
  i64 ahead;
  void operator()(i64 o) const { reduce(slice, next, o); }
  void prefetch_for(i64 i, i64 n) const { prefetch(i + ahead, n); }
};

// The two passes of a blocked kernel over blocks of `block` channels, spread over the
// threads in `slices` (channel_block_slices) slices and pipelined on each thread:
// reduce(slice, r, o) reads sample o of block r for its statistics (o = 0 starts them),
// finish(slice, r) turns them into the block's coefficients, and apply(slice, r, reads)
// writes block r, calling reads(o) after sample o's rows and reads.prefetch_for(i, n) as
// it writes elements [i, i + n). prefetch(i, n) requests the lines reduce will read at
// elements [i, i + n) (prefetch_lines). So the next block's reads from memory are in flight
// while the current block's writes drain, instead of waiting for them, and the statistics
// then read from the L2: one trip over the bus for both passes. Blocks that are not
// `pipelined` are each reduced, then written. Every block's values still meet in the same
// order.
template <class Reduce, class Prefetch, class Finish, class Apply>
void pipelined_channel_blocks(const Layout& L, ChannelBlocks blocks, i64 slices, const Reduce& reduce,
                              const Prefetch& prefetch, const Finish& finish, const Apply& apply) {
  const i64 block = blocks.channels, count = (L.channels + block - 1) / block;
  const auto range = [&](i64 b) { return ChannelRange{b * block, std::min(L.channels, (b + 1) * block)}; };
  parallel_slices(count, L.numel(), slices, [&](i64 s, i64 b0, i64 b1) {
    if (!blocks.pipelined) {
      for (i64 b = b0; b < b1; ++b) {
        for (i64 o = 0; o < L.outer; ++o) reduce(s, range(b), o);
        finish(s, range(b));
        apply(s, range(b), NoSampleHook{});
      }
      return;
    }
    for (i64 o = 0; o < L.outer; ++o) reduce(s, range(b0), o);
    finish(s, range(b0));
    for (i64 b = b0; b + 1 < b1; ++b) {
      const ChannelRange r = range(b), next = range(b + 1);
      apply(s, r, NextBlockReads<Reduce, Prefetch>{reduce, prefetch, s, next, (r.end - r.begin) * L.inner});
      finish(s, next);
    }
    apply(s, range(b1 - 1), NoSampleHook{});
  });
}

// The elementwise pass (as channel_apply, row mode) over the rows of the channels in r,
// on the calling thread.
template <class S, class T, int K, class Op, class AfterSample>
void channel_apply_range(const Layout& L, const T* const (&coef)[K], S* out, const Op& op, ChannelRange r,
                         const AfterSample& after_sample) {
  with_streaming<S, T>(L.numel(), [&](auto stream) {
    for (i64 o = 0; o < L.outer; ++o) {
      const i64 begin = (o * L.channels + r.begin) * L.inner, end = (o * L.channels + r.end) * L.inner;
      apply_rows<decltype(stream)::value, S, T, K>(
          L, coef, out,
          [op, after_sample](i64 i, i64 n, const Vec<T>* c) {
            after_sample.prefetch_for(i, n);
            return op(i, n, c);
          },
          begin, end);
      after_sample(o);
    }
  });
}

// channel_apply over the whole array, or over the channels of *r on the calling thread,
// calling after_sample(o) after each sample's rows (pipelined_channel_blocks; whole-array
// passes take no hook).
template <class S, class T, int K, class Op, class AfterSample = NoSampleHook>
void channel_apply_to(const Layout& L, const T* const (&coef)[K], S* out, const Op& op, const ChannelRange* r,
                      bool after_reduction, const AfterSample& after_sample = {}) {
  if (r)
    channel_apply_range(L, coef, out, op, *r, after_sample);
  else
    channel_apply(L, coef, out, op, after_reduction);
}

// ---------------------------------------------------------------------------------------
// Partial states of reductions. Each reduction group keeps one running state (a few
// doubles) per channel it sees, and the groups merge in order at the end. Those states are
// the reductions' only scratch proportional to the data's shape: a group must see enough
// values per channel for its states to be small beside the data they summarize, else the
// reduction would need more memory than the array it reads (a wide array of a few rows,
// 16 groups of C states each). Allowed: C states (what one group needs anyway, plus one
// per group for rows cut at a group boundary), 1/kStateFraction of the array's bytes, or
// kStateBytes, too little to matter.
constexpr i64 kStateFraction = 16;
constexpr i64 kStateBytes = i64(4) << 20;

inline bool states_fit(i64 states, i64 groups, i64 state_bytes, const Layout& L, i64 elem_bytes) {
  return states <= L.channels + groups || states * state_bytes <= kStateBytes ||
         states * state_bytes * kStateFraction <= L.numel() * elem_bytes;
}

// ---------------------------------------------------------------------------------------
// Row-mode reduction groups: the flat array is cut into G groups of consecutive elements
// and walked in memory order (the prefetchers follow, pages are touched once); a group
// visits the rows it overlaps, each as segments of at most kBlockElements, and keeps one
// running state per channel. Channel c's values thus meet in a fixed order of segments
// within each group, and groups merge in order: nothing depends on the thread count.
//
// A group overlapping fewer than C rows sees each of its channels once: it keeps states
// only for those (slot row - first row), so a short wide array needs about C states in
// all, whatever G. Otherwise it keeps C, slot (row - first row) % C.
struct RowGroups {
  i64 count = 1;
  i64 first_row[kMaxGroups] = {};
  i64 slots[kMaxGroups] = {};         // states of the group: min(C, rows overlapped)
  i64 offset[kMaxGroups + 1] = {};    // index of its first state among all groups'

  static RowGroups make(const Layout& L, i64 state_bytes, i64 elem_bytes) {
    RowGroups r;
    r.count = std::clamp<i64>(L.numel() / kRowGroupElements, 1, kMaxGroups);
    while (true) {
      r.place(L);
      if (r.count == 1 || states_fit(r.total(), r.count, state_bytes, L, elem_bytes)) return r;
      --r.count;
    }
  }

  i64 total() const { return offset[count]; }
  i64 begin(const Layout& L, i64 g) const { return L.numel() * g / count; }
  i64 end(const Layout& L, i64 g) const { return L.numel() * (g + 1) / count; }

  // Calls f(slot, c) for each slot of group g and the channel c it holds, in slot order.
  // The channel is counted, not divided: the merge of small arrays' groups was bound by
  // two integer divisions per channel and group.
  template <class F>
  void for_each_slot(const Layout& L, i64 g, F&& f) const {
    for (i64 s = 0, c = first_row[g] % L.channels; s < slots[g]; ++s, c = c + 1 == L.channels ? 0 : c + 1) f(s, c);
  }

  // Calls segment(slot, c, offset, length) for each segment of group g, in memory order.
  template <class F>
  void for_each_segment(const Layout& L, i64 g, F&& segment) const {
    i64 i = begin(L, g);
    const i64 stop = end(L, g);
    while (i < stop) {
      const i64 row = i / L.inner, rel = row - first_row[g];
      const i64 len = std::min({stop - i, (row + 1) * L.inner - i, kBlockElements});
      segment(rel < L.channels ? rel : rel % L.channels, row % L.channels, i, len);
      i += len;
    }
  }

 private:
  void place(const Layout& L) {
    for (i64 g = 0; g < count; ++g) {
      const i64 b = begin(L, g), e = end(L, g);
      first_row[g] = b / L.inner;
      slots[g] = e > b ? std::min(L.channels, (e - 1) / L.inner - first_row[g] + 1) : 0;
      offset[g + 1] = offset[g] + slots[g];
    }
  }
};

// ---------------------------------------------------------------------------------------
// Period-mode reduction blocks: the array is read as rows of `row_len` elements, a whole
// number of periods chosen so that vectors line up with the same positions in every row
// (row_len = lcm(P, W) when that is small). Rows are cut into R ranges. A row of one long
// period is also cut into K chunks of columns (channel ranges), so that the per-thread
// scratch, which spans a chunk, stays small, and so that the threads have work when a
// few rows allow few ranges; otherwise K = 1. Group g = (range g / K, chunk g % K) is
// walked in blocks of `block_rows` rows. The outer rows that do not fill a last row of
// row_len form one short block at the end of the last range (K is 1 then).
struct PeriodBlocks {
  i64 period = 0;          // P = C * inner
  i64 row_len = 0;         // a multiple of P
  i64 rows = 0;            // full rows of row_len
  i64 rest = 0;            // elements in the short last row (a multiple of P, < row_len)
  i64 block_rows = 0;
  i64 ranges = 0;          // R
  i64 chunks = 0;          // K
  i64 chunk_len = 0;       // columns of a chunk (the last may be shorter), a multiple of inner
  i64 groups = 0;          // R * K
  i64 chunk_channels = 0;  // channels of a chunk (at most): C when K = 1

  // For storage S read as vectors of T.
  template <class S, class T>
  static PeriodBlocks make(const Layout& L) {
    constexpr i64 W = Vec<T>::W;
    PeriodBlocks b;
    b.period = L.channels * L.inner;
    // Periods per row: so that W divides row_len and a row fills at least one column tile
    // of column_accumulate (4 vectors).
    i64 reps = W / std::gcd(b.period, W);
    reps *= std::max<i64>(1, (4 * W + b.period * reps - 1) / (b.period * reps));
    if (b.period * reps > kPeriodBlockElements) reps = 1;
    b.row_len = b.period * reps;
    b.rows = L.outer / reps;
    b.rest = (L.outer % reps) * b.period;
    // Ranges: each keeps 2 doubles per channel (see states_fit).
    i64 max_ranges = std::clamp<i64>(b.rows, 1, kMaxGroups);
    while (max_ranges > 1 && !states_fit(max_ranges * L.channels, 0, 16, L, sizeof(S))) --max_ranges;
    b.ranges = std::clamp<i64>(b.rows * b.row_len / kGroupElements, 1, max_ranges);
    // Each block of a range ends with a fold of its columns into channel sums
    // (fold_period), as long as one of its rows: a range of few long rows folded about as
    // much as it read ((32, 512, 7, 7) training forward: 57% of its time). Ranges of long
    // periods keep kMinRangeRows rows where there are that many; their columns are cut
    // into chunks below for the threads instead.
    if (reps == 1) b.ranges = std::clamp<i64>(b.rows / kMinRangeRows, 1, b.ranges);
    b.chunks = 1;
    b.chunk_len = b.row_len;
    if (reps == 1) {
      const i64 wanted = std::clamp<i64>(L.numel() / kGroupElements, 1, kMaxGroups);
      const i64 k = std::max((b.row_len + kPeriodBlockElements - 1) / kPeriodBlockElements,
                             (wanted + b.ranges - 1) / b.ranges);
      const i64 unit = std::lcm(L.inner, W);
      b.chunk_len = std::min(b.row_len, ((b.row_len + k - 1) / k + unit - 1) / unit * unit);
      b.chunks = (b.row_len + b.chunk_len - 1) / b.chunk_len;
    }
    b.chunk_channels = b.chunks == 1 ? L.channels : b.chunk_len / L.inner;
    // A block is read once (only a group's short first block twice), so it may be as tall
    // as the float sums allow, whatever its length.
    b.block_rows = kMaxBlockRows;
    b.groups = b.ranges * b.chunks;
    return b;
  }

  // The layout group g reduces: its chunk's channels (all of them when K = 1), and the
  // first of them.
  Layout chunk_layout(const Layout& L, i64 g) const {
    if (chunks == 1) return L;
    const i64 col = g % chunks * chunk_len;
    return Layout{L.outer, (std::min(row_len, col + chunk_len) - col) / L.inner, L.inner};
  }
  i64 first_channel(const Layout& L, i64 g) const { return g % chunks * chunk_len / L.inner; }

  // Values per channel in range r.
  i64 range_count(const Layout& L, i64 r) const {
    const i64 per_row = row_len / period * L.inner;
    const i64 n = (rows * (r + 1) / ranges - rows * r / ranges) * per_row;
    return r == ranges - 1 ? n + rest / period * L.inner : n;
  }

  // Calls block(offset, nrows, len) for each block of group g, in order: nrows rows of
  // len valid elements starting at offset, consecutive rows row_len apart. The first
  // block of a group is short (kFirstBlockElements), the others hold block_rows rows.
  template <class F>
  void for_each(i64 g, F&& block) const {
    const i64 range = g / chunks, col = g % chunks * chunk_len;
    const i64 len = std::min(chunk_len, row_len - col);
    i64 r = rows * range / ranges;
    const i64 r_end = rows * (range + 1) / ranges;
    i64 n = std::max<i64>(1, kFirstBlockElements / len);
    for (; r < r_end; r += n, n = block_rows) block(r * row_len + col, std::min(n, r_end - r), len);
    if (range == ranges - 1 && rest > 0) block(rows * row_len, i64(1), rest);
  }

  // Calls f(i) for the flat index of every value of channel c of group g (Lc its
  // chunk_layout), block by block: the slow paths' walk over one channel.
  template <class F>
  void for_each_index(const Layout& Lc, i64 g, i64 c, F&& f) const {
    const i64 P = Lc.channels * Lc.inner;
    for_each(g, [&](i64 off, i64 nrows, i64 len) {
      for (i64 r = 0; r < nrows; ++r)
        for (i64 q = off + r * row_len + c * Lc.inner, end = q + len; q < end; q += P)
          for (i64 k = 0; k < Lc.inner; ++k) f(q + k);
    });
  }
};

// ---------------------------------------------------------------------------------------
// Accumulation kernels of the reduction blocks.

// Sums over one contiguous segment of `len` elements, in vectors of T: out[a] = sum of
// accumulator a.
// f(i, n, acc) adds the contribution of lanes [i, i + n) to acc[0..NACC); for n < W it
// must leave lanes [n, W) contributing zero. Four independent accumulator sets hide the
// add/fma latency (4 cycles), so a segment in cache is summed at load speed.
template <class T, int NACC, class F>
void segment_accumulate(i64 len, double (&out)[NACC], const F& f) {
  using V = Vec<T>;
  constexpr i64 W = V::W;
  constexpr int kSets = 4;
  V a[kSets][NACC];
  for (auto& set : a)
    for (auto& v : set) v = V::zero();
  i64 i = 0;
  for (; i + kSets * W <= len; i += kSets * W)
    for (int s = 0; s < kSets; ++s) f(i + s * W, W, a[s]);
  // The remaining whole vectors go to sets 0, 1, 2, written out so that every index is a
  // constant: indexed by a loop counter, the sets lived on the stack, and short rows
  // (7x7) spent their time storing and reloading them.
  static_assert(kSets == 4, "the remainder below is written for four sets");
  if (i + W <= len) {
    f(i, W, a[0]);
    i += W;
    if (i + W <= len) {
      f(i, W, a[1]);
      i += W;
      if (i + W <= len) {
        f(i, W, a[2]);
        i += W;
      }
    }
  }
  if (i < len) f(i, len - i, a[kSets - 1]);
  for (int k = 0; k < NACC; ++k)
    out[k] = static_cast<double>(((a[0][k] + a[1][k]) + (a[2][k] + a[3][k])).reduce_add());
}

// How far ahead of its reads the statistics pass over one contiguous stream (channels-
// last) requests lines, where the array is at least kReadAheadL3Multiple times the L3
// (moments_period_group): the L2's streamer stops at the end of each 4 KiB page. L'
// float32 (102.8 MB), 2 threads, alternated: 3.92 ms without, 3.70 with 4 KiB ahead,
// 3.02 with 8 KiB, 3.12 with 16 KiB, 4.02 with 32 KiB. With 8 KiB, against none: L'
// 3.25-3.70 -> 2.56-2.84 ms, L' in bfloat16 5.25 -> 4.06 ms, (48, 56, 56, 128) float32
// (77 MB) 1.99 -> 1.84 ms; but 51 MB of float32 1.17 -> 1.26 ms, A' (25.7 MB) 543 -> 575
// us, L' in 16 bits (51 MB) 1.48-1.51 -> 1.67-1.69 ms, a part of which the L3 still held.
// The backward's reduction of L' gained nothing (15.8 ms either way).
constexpr i64 kStreamAheadBytes = 8192;
constexpr i64 kReadAheadL3Multiple = 2;

// column_accumulate's `ahead` where nothing is requested ahead.
struct NoReadAhead {
  void operator()(i64, i64) const {}
};

// Column sums over nrows rows of len elements, rows `stride` apart: acc[a][j] = sum over
// rows of accumulator a at column j. Rows are taken 4 at a time, and within them one
// column tile at a time, so the accumulators stay in registers across 4 rows while the
// memory is read as 4 sequential streams (a tile over all rows of a block would make one
// stream per row, too many for the prefetchers; and rows a multiple of 4 KB apart share
// L1 sets, which hold 8 lines). f(offset, col, n, acc) adds lanes [col, col + n) of the
// row at `offset` (= row * stride + col); lanes >= n are never stored, so may hold anything.
// Where the rows are contiguous, ahead(offset, n) is called before each vector's f.
template <class T, int NACC, class F, class Ahead = NoReadAhead>
void column_accumulate(i64 nrows, i64 stride, i64 len, T* const (&acc)[NACC], const F& f,
                       const Ahead& ahead = {}) {
  using V = Vec<T>;
  constexpr i64 W = V::W;
  // Rows a stride apart: 4 at a time (4 streams). Contiguous rows are one stream already:
  // all of them at once, so the accumulators go to memory once per block.
  const bool one_stream = stride == len;
  const i64 chunk = one_stream ? nrows : 4;
  const auto read = [&](i64 offset, i64 col, i64 n, V* a) {
    if (one_stream) ahead(offset, n);
    f(offset, col, n, a);
  };
  for (i64 r0 = 0; r0 < nrows; r0 += chunk) {
    const i64 r1 = std::min(nrows, r0 + chunk);
    // One tile of full vectors from column j: starts from zero on the first rows, from the
    // stored partial sums after them.
    auto tile = [&](auto tile_width, i64 j) {
      constexpr i64 kTile = decltype(tile_width)::value;
      V a[kTile][NACC];
      for (i64 t = 0; t < kTile; ++t)
        for (int k = 0; k < NACC; ++k) a[t][k] = r0 == 0 ? V::zero() : V::load(acc[k] + j + t * W);
      for (i64 r = r0; r < r1; ++r)
        for (i64 t = 0; t < kTile; ++t) read(r * stride + j + t * W, j + t * W, W, a[t]);
      for (i64 t = 0; t < kTile; ++t)
        for (int k = 0; k < NACC; ++k) a[t][k].store(acc[k] + j + t * W);
    };
    // As wide a tile as leaves registers for the accumulators and temporaries: 8 vectors
    // with AVX-512's 32 registers (a 128-channel row in one sequential sweep), else 4;
    // the rest of the row in tiles of 4, 2, 1 and a last partial vector.
    constexpr i64 kWide = V::kRegisters >= 32 ? 8 : 4;
    i64 j = 0;
    for (; j + kWide * W <= len; j += kWide * W) tile(std::integral_constant<i64, kWide>{}, j);
    if (kWide > 4 && j + 4 * W <= len) {
      tile(std::integral_constant<i64, 4>{}, j);
      j += 4 * W;
    }
    if (j + 2 * W <= len) {
      tile(std::integral_constant<i64, 2>{}, j);
      j += 2 * W;
    }
    if (j + W <= len) {
      tile(std::integral_constant<i64, 1>{}, j);
      j += W;
    }
    if (j < len) {  // the last partial vector
      const i64 n = len - j;
      V a[NACC];
      for (int k = 0; k < NACC; ++k) a[k] = r0 == 0 ? V::zero() : V::load(acc[k] + j, n);
      for (i64 r = r0; r < r1; ++r) read(r * stride + j, j, n, a);
      for (int k = 0; k < NACC; ++k) a[k].store(acc[k] + j, n);
    }
  }
}

}  // namespace PYBN_ISA
}  // namespace pybn
