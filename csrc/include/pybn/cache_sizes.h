// The CPU's cache sizes, read once at run time: the one place that knows them. Kernels that
// process data in blocks sized to the caches (the batch-norm channel blocks,
// csrc/kernels/channel_loops.h) take them from here.
#pragma once
#include <cstdint>

namespace pybn {

struct CacheSizes {
  std::int64_t l2_bytes;  // one core's L2 (private on the CPUs pybn targets)
  std::int64_t l3_bytes;  // the L3 the cores of one die or complex share
};

// Used where the system does not describe its caches (or describes them implausibly).
constexpr std::int64_t kDefaultL2Bytes = std::int64_t(512) << 10;
constexpr std::int64_t kDefaultL3Bytes = std::int64_t(16) << 20;

// Read on first use (defined in cache_sizes.cpp, baseline code, never compiled per ISA):
// Linux's description of cpu0's caches in sysfs, else sysconf, else the defaults above.
const CacheSizes& cache_sizes();

}  // namespace pybn
