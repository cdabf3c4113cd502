// DropBlock's keep mask (docs/dropout.md): the block seeds (a packed mask drawn by dropout_mask,
// whose 0 bits are seeds) dilated to blocks, then packed again and counted. The seeds are
// drawn by dropout's kernel and the mask is applied by dropout_apply(_broadcast), so this file
// holds only the integer work between them: it is exact, hence the same on every ISA and
// thread count. Planes are dilated separately (columns by running counts along each row, then
// rows by running counts down each column, O(1) per element whatever the block size) into a
// byte per element; the packing pass then owns whole output bytes, so no two threads write
// the same byte when a plane does not end on a byte boundary.
#include <atomic>
#include <cstring>
#include <vector>

#include "kernels_isa.h"
#include "pybn/parallel.h"

namespace pybn {
namespace PYBN_ISA {
namespace {

using i64 = std::int64_t;

inline unsigned char is_seed(const unsigned char* seeds, i64 k) {
  return static_cast<unsigned char>(((seeds[k >> 3] >> (k & 7)) & 1) ^ 1);
}

// hit[c] = 1 where a seed of the row starting at element k0 lies in [c - before, c + after].
void dilate_row(const unsigned char* seeds, i64 k0, i64 cols, i64 before, i64 after, unsigned char* hit) {
  i64 count = 0;  // seeds in the window of column c
  for (i64 c = 0; c <= after && c < cols; ++c) count += is_seed(seeds, k0 + c);
  for (i64 c = 0; c < cols; ++c) {
    hit[c] = count > 0;
    if (c + after + 1 < cols) count += is_seed(seeds, k0 + c + after + 1);
    if (c - before >= 0) count -= is_seed(seeds, k0 + c - before);
  }
}

// keep[r, c] = 1 where no row of hit in [r - before, r + after] is set at column c;
// count (cols entries) is scratch.
void dilate_columns(const unsigned char* hit, i64 rows, i64 cols, i64 before, i64 after, std::int32_t* count,
                    unsigned char* keep) {
  std::memset(count, 0, static_cast<std::size_t>(cols) * sizeof *count);
  for (i64 r = 0; r <= after && r < rows; ++r)
    for (i64 c = 0; c < cols; ++c) count[c] += hit[r * cols + c];
  for (i64 r = 0; r < rows; ++r) {
    unsigned char* out = keep + r * cols;
    for (i64 c = 0; c < cols; ++c) out[c] = count[c] == 0;
    if (r + after + 1 < rows)
      for (i64 c = 0; c < cols; ++c) count[c] += hit[(r + after + 1) * cols + c];
    if (r - before >= 0)
      for (i64 c = 0; c < cols; ++c) count[c] -= hit[(r - before) * cols + c];
  }
}

// Eight bytes, each 0 or 1, as the bits of one byte (byte i -> bit i): the multiplier puts
// byte i's bit at bit 56 + i of the product, and no two partial products overlap.
inline unsigned char pack8(const unsigned char* bytes) {
  std::uint64_t word;
  std::memcpy(&word, bytes, 8);
  return static_cast<unsigned char>((word * 0x0102040810204080ull) >> 56);
}

}  // namespace

void drop_block_mask(const DropBlockMaskArgs& a) {
  const i64 plane = a.rows * a.cols, n = a.planes * plane, bytes = (n + 7) / 8;
  // before any parallel region, so that an allocation failure leaves no thread behind
  std::vector<unsigned char> hit(static_cast<std::size_t>(n)), keep(static_cast<std::size_t>(8 * bytes), 0);
  std::vector<std::int32_t> count(static_cast<std::size_t>(a.planes * a.cols));
  const i64 col_before = (a.block_cols - 1) / 2, col_after = a.block_cols / 2;
  const i64 row_before = (a.block_rows - 1) / 2, row_after = a.block_rows / 2;
  parallel_for(a.planes, 4 * n, [&](i64 pb, i64 pe) {
    for (i64 p = pb; p < pe; ++p) {
      unsigned char* h = hit.data() + p * plane;
      for (i64 r = 0; r < a.rows; ++r) dilate_row(a.seeds, p * plane + r * a.cols, a.cols, col_before, col_after, h + r * a.cols);
      dilate_columns(h, a.rows, a.cols, row_before, row_after, count.data() + p * a.cols, keep.data() + p * plane);
    }
  });
  std::atomic<i64> kept{0};
  parallel_for(bytes, n, [&](i64 jb, i64 je) {
    i64 ones = 0;
    for (i64 j = jb; j < je; ++j) {
      const unsigned char b = pack8(keep.data() + 8 * j);  // the padding bytes past n are 0
      a.keep[j] = b;
      ones += __builtin_popcount(b);
    }
    kept += ones;
  });
  *a.kept = kept.load();
}

PYBN_FILL_FAMILY(dropblock)

}  // namespace PYBN_ISA
}  // namespace pybn
