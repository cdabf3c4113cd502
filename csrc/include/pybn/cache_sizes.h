// The CPU's cache sizes, read once at run time: the one place that knows them. Kernels that
// process data in blocks sized to the caches (the batch-norm channel blocks,
// csrc/kernels/channel_loops.h) take them from here.
#pragma once
#include <cstdint>

namespace pybn {

struct CacheSizes {
  std::int64_t l2_bytes;  // one core's L2 (private on the CPUs pybn targets)
  std::int64_t l3_bytes;  // the L3 the cores of one die or complex share, at most 32 MiB
};

// Used where the system does not describe its caches (or describes them implausibly).
constexpr std::int64_t kDefaultL2Bytes = std::int64_t(512) << 10;
constexpr std::int64_t kDefaultL3Bytes = std::int64_t(16) << 20;

// Read on first use (defined in cache_sizes.cpp, baseline code, never compiled per ISA):
// PYBN_L2_BYTES and PYBN_L3_BYTES where set (a bad value throws std::runtime_error), else
// Linux's description of cpu0's caches in sysfs, else sysconf, else the defaults above.
const CacheSizes& cache_sizes();

// Outputs of at least this many bytes are written with non-temporal stores: kStreamBytes,
// or a quarter of the L3 where that is more. Below it an output and the inputs that make it
// fit the L3 together, where the next call (or the next layer) finds them; streamed, the
// output goes to memory: (32, 256, 14, 14) float32 inference took 293 us streamed against
// torch's 158 us with ordinary stores on a 32 MiB L3.
std::int64_t stream_min_bytes();

}  // namespace pybn
