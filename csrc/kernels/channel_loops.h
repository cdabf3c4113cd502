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
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>

#include "pybn/kernels.h"
#include "pybn/parallel.h"
#include "pybn/vec/vec.h"

namespace pybn {
namespace PYBN_ISA {

using i64 = std::int64_t;

// Rows shorter than this are walked in period mode (when the period table stays small).
constexpr i64 kPeriodMaxInner = 128;
constexpr i64 kPeriodMaxLength = i64(1) << 16;
// Elements in one reduction block: its second pass re-reads it from L1/L2, not memory.
constexpr i64 kBlockElements = 4096;
constexpr i64 kPeriodBlockElements = 16384;
// A reduction group holds at least this many elements; at most kMaxGroups per channel.
constexpr i64 kGroupElements = i64(1) << 15;
constexpr i64 kMaxGroups = 16;
// Outputs at least this large are written with non-temporal stores: they would not stay
// in cache anyway, and streaming skips reading the destination lines first.
constexpr i64 kStreamBytes = i64(4) << 20;

inline bool use_period_mode(const Layout& L) {
  return L.inner == 1 || (L.inner < kPeriodMaxInner && L.channels * L.inner <= kPeriodMaxLength);
}

template <class T>
inline bool should_stream(const Layout& L) {
  return L.numel() * i64(sizeof(T)) >= kStreamBytes;
}

template <class T>
using Buffer = std::unique_ptr<T[]>;

template <class T>
Buffer<T> make_buffer(i64 n) {
  return Buffer<T>(new T[static_cast<std::size_t>(std::max<i64>(n, 1))]);
}

// Loads n lanes (n == W compiles to a plain load when the caller passes the constant).
template <class T>
inline Vec<T> load_n(const T* p, i64 n) {
  return n == Vec<T>::W ? Vec<T>::load(p) : Vec<T>::load(p, n);
}

// Lanes from p up to the next vector-aligned address.
template <class T>
inline i64 lanes_to_alignment(const T* p) {
  const auto mis = reinterpret_cast<std::uintptr_t>(p) % kVecBytes<T>;
  return mis == 0 ? 0 : static_cast<i64>((kVecBytes<T> - mis) / sizeof(T));
}

// ---------------------------------------------------------------------------------------
// Elementwise pass: out[i] = op(i, coefficients of i's channel).
//
// coef holds K per-channel arrays of length C. op(i, n, cv) returns the output vector for
// flat positions [i, i + n), n <= W, given cv[k] = coefficient k for each of those lanes;
// it must load only n lanes of its inputs.
template <class T, int K, class Op>
void channel_apply(const Layout& L, const T* const (&coef)[K], T* out, const Op& op) {
  using V = Vec<T>;
  constexpr i64 W = V::W;
  const i64 total = L.numel();
  if (total == 0) return;
  const bool stream = should_stream<T>(L);

  auto emit = [&](i64 i, i64 n, const V* cv) {
    const V r = op(i, n, cv);
    if (n == W && stream)
      r.stream(out + i);
    else if (n == W)
      r.store(out + i);
    else
      r.store(out + i, n);
  };
  // Head lanes to process before out + i is aligned for streaming.
  auto head = [&](i64 i, i64 end) { return stream ? std::min(end - i, lanes_to_alignment(out + i)) : 0; };

  const i64 slots = (total + W - 1) / W;  // threads split the array at vector boundaries
  if (use_period_mode(L)) {
    const i64 P = L.channels * L.inner;
    const i64 stride = P + W;
    Buffer<T> table = make_buffer<T>(K * stride);
    for (int k = 0; k < K; ++k)
      for (i64 q = 0; q < stride; ++q) table[k * stride + q] = coef[k][(q % P) / L.inner];
    const T* tab = table.get();
    parallel_for(slots, total, [&](i64 sb, i64 se) {
      i64 i = sb * W;
      const i64 end = std::min(se * W, total);
      i64 j = i % P;
      auto advance = [&](i64 n) {
        j += n;
        if (j >= P) j = (j - P < P) ? j - P : j % P;
      };
      V cv[K];
      auto load_coef = [&] {
        for (int k = 0; k < K; ++k) cv[k] = V::load(tab + k * stride + j);
      };
      if (const i64 nh = head(i, end)) {
        load_coef();
        emit(i, nh, cv);
        i += nh;
        advance(nh);
      }
      for (; i + W <= end; i += W) {
        load_coef();
        emit(i, W, cv);
        advance(W);
      }
      if (i < end) {
        load_coef();
        emit(i, end - i, cv);
      }
      if (stream) stream_fence();
    });
  } else {
    parallel_for(slots, total, [&](i64 sb, i64 se) {
      i64 i = sb * W;
      const i64 end = std::min(se * W, total);
      while (i < end) {
        const i64 row = i / L.inner;
        const i64 row_end = std::min(end, (row + 1) * L.inner);
        const i64 c = row % L.channels;
        V cv[K];
        for (int k = 0; k < K; ++k) cv[k] = V::set1(coef[k][c]);
        if (const i64 nh = head(i, row_end)) {
          emit(i, nh, cv);
          i += nh;
        }
        for (; i + W <= row_end; i += W) emit(i, W, cv);
        if (i < row_end) {
          emit(i, row_end - i, cv);
          i = row_end;
        }
      }
      if (stream) stream_fence();
    });
  }
}

// ---------------------------------------------------------------------------------------
// Row-mode reduction blocks: channel c's values (outer*inner of them) are cut into G
// groups of consecutive values; each group into blocks that stay inside one row and hold
// at most kBlockElements.

inline i64 row_groups(const Layout& L) {
  return std::clamp<i64>(L.per_channel() / kGroupElements, 1, kMaxGroups);
}

// Calls block(offset, length) for each block of channel c in group g of G, in order.
template <class F>
void for_each_row_block(const Layout& L, i64 c, i64 g, i64 G, F&& block) {
  const i64 N = L.per_channel();
  i64 v = N * g / G;
  const i64 v_end = N * (g + 1) / G;
  while (v < v_end) {
    const i64 n = v / L.inner;
    const i64 q = v % L.inner;
    const i64 len = std::min({v_end - v, L.inner - q, kBlockElements});
    block((n * L.channels + c) * L.inner + q, len);
    v += len;
  }
}

// ---------------------------------------------------------------------------------------
// Period-mode reduction blocks: the array is read as rows of `row_len` elements, a whole
// number of periods chosen so that vectors line up with the same positions in every row
// (row_len = lcm(P, W) when that is small). Rows are cut into G groups and each group into
// blocks of `block_rows` rows. The outer rows that do not fill a last row of row_len form
// one short block at the end of the last group.
struct PeriodBlocks {
  i64 period = 0;      // P = C * inner
  i64 row_len = 0;     // a multiple of P
  i64 rows = 0;        // full rows of row_len
  i64 rest = 0;        // elements in the short last row (a multiple of P, < row_len)
  i64 block_rows = 0;
  i64 groups = 0;

  template <class T>
  static PeriodBlocks make(const Layout& L) {
    constexpr i64 W = Vec<T>::W;
    PeriodBlocks b;
    b.period = L.channels * L.inner;
    i64 reps = W / std::gcd(b.period, W);  // periods per row so that W divides row_len
    if (b.period * reps > kPeriodBlockElements) reps = 1;
    b.row_len = b.period * reps;
    b.rows = L.outer / reps;
    b.rest = (L.outer % reps) * b.period;
    b.block_rows = std::max<i64>(1, kPeriodBlockElements / b.row_len);
    b.groups = std::clamp<i64>(b.rows * b.row_len / kGroupElements, 1, kMaxGroups);
    return b;
  }

  // Calls block(offset, nrows, len) for each block of group g, in order: nrows rows of
  // len valid elements starting at offset, consecutive rows row_len apart.
  template <class F>
  void for_each(i64 g, F&& block) const {
    i64 r = rows * g / groups;
    const i64 r_end = rows * (g + 1) / groups;
    for (; r < r_end; r += block_rows) block(r * row_len, std::min(block_rows, r_end - r), row_len);
    if (g == groups - 1 && rest > 0) block(rows * row_len, i64(1), rest);
  }
};

// ---------------------------------------------------------------------------------------
// Accumulation kernels of the reduction blocks.

// Sums over one contiguous segment of `len` elements: out[a] = sum of accumulator a.
// f(i, n, acc) adds the contribution of lanes [i, i + n) to acc[0..NACC); for n < W it
// must leave lanes [n, W) contributing zero. Two independent accumulator sets hide the
// add latency.
template <class T, int NACC, class F>
void segment_accumulate(i64 len, double (&out)[NACC], const F& f) {
  using V = Vec<T>;
  constexpr i64 W = V::W;
  V a[NACC], b[NACC];
  for (int k = 0; k < NACC; ++k) a[k] = b[k] = V::zero();
  i64 i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    f(i, W, a);
    f(i + W, W, b);
  }
  if (i + W <= len) {
    f(i, W, a);
    i += W;
  }
  if (i < len) f(i, len - i, b);
  for (int k = 0; k < NACC; ++k) out[k] = static_cast<double>((a[k] + b[k]).reduce_add());
}

// Column sums over nrows rows of len elements, rows `stride` apart: acc[a][j] = sum over
// rows of accumulator a at column j. Columns are taken a tile at a time so that the
// accumulators stay in registers while the rows stream past. f(offset, col, n, acc) adds
// lanes [col, col + n) of the row at `offset` (= row * stride + col); lanes >= n are
// never stored, so they may hold anything.
template <class T, int NACC, class F>
void column_accumulate(i64 nrows, i64 stride, i64 len, T* const (&acc)[NACC], const F& f) {
  using V = Vec<T>;
  constexpr i64 W = V::W;
  constexpr i64 kTile = 4;
  i64 j = 0;
  for (; j + kTile * W <= len; j += kTile * W) {
    V a[kTile][NACC];
    for (auto& t : a)
      for (auto& v : t) v = V::zero();
    for (i64 r = 0; r < nrows; ++r)
      for (i64 t = 0; t < kTile; ++t) f(r * stride + j + t * W, j + t * W, W, a[t]);
    for (i64 t = 0; t < kTile; ++t)
      for (int k = 0; k < NACC; ++k) a[t][k].store(acc[k] + j + t * W);
  }
  for (; j < len; j += W) {
    const i64 n = std::min(W, len - j);
    V a[NACC];
    for (auto& v : a) v = V::zero();
    for (i64 r = 0; r < nrows; ++r) f(r * stride + j, j, n, a);
    for (int k = 0; k < NACC; ++k) a[k].store(acc[k] + j, n);
  }
}

}  // namespace PYBN_ISA
}  // namespace pybn
