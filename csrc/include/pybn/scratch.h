// Working memory of kernel calls (per-channel coefficients, partial sums), kept by the
// calling thread for its next call. Fresh, these blocks (11 doubles a channel: 1.4 MB for
// 16,384 channels) came from glibc's malloc, which maps blocks past its mmap threshold anew
// and trims freed memory off the top of its heap: every call then took a page fault and a
// page of zeros per 4 KiB (320 faults, 720 us for a (2, 16384) training forward whose
// arithmetic takes 60). Kept blocks are at most kScratchKept of them and kScratchKeptBytes
// in all per thread, freed when the thread ends. Only threads calling a kernel allocate
// (nothing allocates inside a parallel region, channel_loops.h).
#pragma once
#include <cstddef>

namespace pybn {

inline constexpr int kScratchKept = 8;
inline constexpr std::size_t kScratchKeptBytes = std::size_t(32) << 20;

// At least `bytes` (64-byte aligned): a kept block of this thread, else a new one
// (std::bad_alloc when there is no memory).
void* scratch_acquire(std::size_t bytes);

// Gives back a block of scratch_acquire (nullptr: nothing): kept for the next call when
// within the limits, else freed.
void scratch_release(void* block) noexcept;

// Whether blocks are kept at all (not under AddressSanitizer, which must see each
// allocation's exact size).
bool scratch_keeps_blocks() noexcept;

// Blocks and bytes this thread keeps (for the tests).
std::size_t scratch_kept_blocks() noexcept;
std::size_t scratch_kept_bytes() noexcept;

}  // namespace pybn
