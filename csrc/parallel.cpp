#include "pybn/parallel.h"

#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>

namespace pybn {
namespace {
std::atomic<int> g_threads{1};

// A child made by fork has none of the parent's workers; it runs on one thread until it
// asks for more (as PyTorch's DataLoader workers do): N forked workers each starting the
// parent's team would oversubscribe the machine N times.
void one_thread_after_fork() { g_threads.store(1, std::memory_order_relaxed); }
const bool g_fork_handler = pthread_atfork(nullptr, nullptr, one_thread_after_fork) == 0;
}  // namespace

int num_threads() { return g_threads.load(std::memory_order_relaxed); }

void set_num_threads(int n) {
  if (n < 1 || n > kMaxThreads)
    throw std::invalid_argument("n: must be in [1, " + std::to_string(kMaxThreads) + "], got " + std::to_string(n));
  g_threads.store(n, std::memory_order_relaxed);
  pool_allow_retry();
}

int threads_for(std::int64_t work) {
  const std::int64_t by_work = std::max<std::int64_t>(1, work / kGrainElements);
  return static_cast<int>(std::min<std::int64_t>(num_threads(), by_work));
}

void trace_parallel_for(std::int64_t n, std::int64_t work, std::int64_t* rows, std::int64_t throw_in,
                        int slice_ms) {
  const std::thread::id caller = std::this_thread::get_id();
  parallel_for(n, work, [&](std::int64_t begin, std::int64_t end) {
    if (begin <= throw_in && throw_in < end) throw std::bad_alloc();
    std::this_thread::sleep_for(std::chrono::milliseconds(slice_ms));
    std::int64_t* row = rows + 4 * begin;
    row[0] = begin;
    row[1] = end;
    row[2] = std::this_thread::get_id() == caller;
    row[3] = syscall(SYS_gettid);  // not gettid(): glibc has it only since 2.30 (manylinux_2_28 has 2.28)
  });
}

}  // namespace pybn

// The thread count as plain C symbols of the extension module, for threadpoolctl: its
// controller (pybn/_threadpoolctl.py) finds the loaded library and calls these through
// ctypes, as it calls omp_get_max_threads in an OpenMP runtime. Exported despite the
// module's hidden default visibility; the names are pybn's so that the controller can tell
// this library from other extension modules also named _C.
extern "C" __attribute__((visibility("default"))) int pybn_get_num_threads() { return pybn::num_threads(); }

// Returns 0, or -1 (and changes nothing) when n is outside [1, kMaxThreads].
extern "C" __attribute__((visibility("default"))) int pybn_set_num_threads(int n) {
  if (n < 1 || n > pybn::kMaxThreads) return -1;
  pybn::set_num_threads(n);
  return 0;
}
