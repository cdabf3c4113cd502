// Threading: an OpenMP team sized by pybn's own setting, skipped for small work.
//
// Determinism does not come from here: callers split reductions into blocks that depend
// only on the shape, never on the thread count, and combine them in a fixed order.
#pragma once
#include <algorithm>
#include <cstdint>
#include <omp.h>

namespace pybn {

// Defined once in parallel.cpp (baseline code, never compiled per ISA).
int num_threads();
void set_num_threads(int n);

// Below this many elements of work a kernel stays on the calling thread:
// a fork/join costs a few microseconds, about what 32K floats take to stream.
constexpr std::int64_t kGrainElements = std::int64_t(1) << 15;

// Threads worth using for `work` elements.
int threads_for(std::int64_t work);

// Calls f(begin, end) on contiguous, nearly equal slices of [0, n) in parallel.
template <class F>
void parallel_for(std::int64_t n, std::int64_t work, F&& f) {
  const int nt = static_cast<int>(std::min<std::int64_t>(threads_for(work), n));
  if (nt <= 1) {
    if (n > 0) f(std::int64_t(0), n);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    const std::int64_t t = omp_get_thread_num();
    const std::int64_t team = omp_get_num_threads();
    const std::int64_t begin = n * t / team;
    const std::int64_t end = n * (t + 1) / team;
    if (begin < end) f(begin, end);
  }
}

}  // namespace pybn
