// The per-thread pool of kernel scratch (pybn/scratch.h). Compiled once, for the baseline
// ISA: every ISA's kernels share one pool.
#include "pybn/scratch.h"

#include <limits>
#include <new>

namespace pybn {
namespace {

constexpr std::size_t kAlign = 64;

// Under AddressSanitizer nothing is kept: a block handed out again would hide a kernel's
// overrun past its request inside the block (ASan checks each fresh allocation exactly).
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kKeep = false;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kKeep = false;
#else
constexpr bool kKeep = true;
#endif
#else
constexpr bool kKeep = true;
#endif

// A block is [header | usable bytes]; the header holds the usable size, so that a block
// reused for a smaller request is kept again at its full size.
struct alignas(kAlign) Header {
  std::size_t bytes;
};

Header* header_of(void* block) { return static_cast<Header*>(block) - 1; }

void free_block(Header* h) noexcept { ::operator delete(h, std::align_val_t{kAlign}); }

struct Kept {
  Header* blocks[kScratchKept] = {};
  int count = 0;
  std::size_t bytes = 0;

  Header* take(int i) noexcept {
    Header* h = blocks[i];
    blocks[i] = blocks[--count];
    bytes -= h->bytes;
    return h;
  }

  void keep(Header* h) noexcept {
    blocks[count++] = h;
    bytes += h->bytes;
  }

  ~Kept() {
    while (count > 0) free_block(take(count - 1));
  }
};

thread_local Kept kept;

}  // namespace

void* scratch_acquire(std::size_t bytes) {
  int best = -1;  // the smallest kept block that is large enough
  for (int i = 0; i < kept.count; ++i)
    if (kept.blocks[i]->bytes >= bytes && (best < 0 || kept.blocks[i]->bytes < kept.blocks[best]->bytes)) best = i;
  if (best >= 0) return kept.take(best) + 1;
  if (bytes > std::numeric_limits<std::size_t>::max() - 2 * kAlign) throw std::bad_alloc();
  bytes = (bytes + kAlign - 1) / kAlign * kAlign;
  auto* h = static_cast<Header*>(::operator new(sizeof(Header) + bytes, std::align_val_t{kAlign}));
  h->bytes = bytes;
  return h + 1;
}

void scratch_release(void* block) noexcept {
  if (block == nullptr) return;
  Header* h = header_of(block);
  if (!kKeep || h->bytes > kScratchKeptBytes) {
    free_block(h);
    return;
  }
  // Make room by dropping smaller kept blocks (the larger block serves more calls).
  while (kept.count > 0 && (kept.count == kScratchKept || kept.bytes + h->bytes > kScratchKeptBytes)) {
    int smallest = 0;
    for (int i = 1; i < kept.count; ++i)
      if (kept.blocks[i]->bytes < kept.blocks[smallest]->bytes) smallest = i;
    if (kept.blocks[smallest]->bytes >= h->bytes) {
      free_block(h);
      return;
    }
    free_block(kept.take(smallest));
  }
  kept.keep(h);
}

bool scratch_keeps_blocks() noexcept { return kKeep; }

std::size_t scratch_kept_blocks() noexcept { return static_cast<std::size_t>(kept.count); }
std::size_t scratch_kept_bytes() noexcept { return kept.bytes; }

}  // namespace pybn
