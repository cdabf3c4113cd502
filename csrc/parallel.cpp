#include "pybn/parallel.h"

#include <atomic>

namespace pybn {
namespace {
// 0 = not yet read: the first use takes OpenMP's default, which honours OMP_NUM_THREADS.
std::atomic<int> g_threads{0};
}  // namespace

int num_threads() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n == 0) {
    n = std::max(1, omp_get_max_threads());
    g_threads.store(n, std::memory_order_relaxed);
  }
  return n;
}

void set_num_threads(int n) { g_threads.store(std::max(1, n), std::memory_order_relaxed); }

int threads_for(std::int64_t work) {
  const std::int64_t by_work = std::max<std::int64_t>(1, work / kGrainElements);
  return static_cast<int>(std::min<std::int64_t>(num_threads(), by_work));
}

}  // namespace pybn
