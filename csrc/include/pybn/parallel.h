// Threading: pybn's own fork-join pool or a loaded OpenMP runtime's team (thread_pool.h) sized by
// pybn's setting, skipped for small work.
//
// Determinism does not come from here: callers split reductions into blocks that depend
// only on the shape, never on the thread count, and combine them in a fixed order.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "pybn/thread_pool.h"

namespace pybn {

// The most threads pybn uses. The kernels are bound by memory bandwidth: a core streams
// 10-40 GB/s, so a few dozen cores saturate even a two-socket server's memory, and past
// that more threads only add fork/join latency and stack reservations. 256 leaves room for
// the largest machines (SMT included) while refusing typos such as 1024 or 10000.
constexpr int kMaxThreads = 256;

// Defined once in parallel.cpp (baseline code, never compiled per ISA). The setting starts
// at 1 (the Python package sets its default at import) and is 1 again in a child made by
// fork, until set_num_threads is called there.
int num_threads();
// n in [1, kMaxThreads]; throws std::invalid_argument otherwise.
void set_num_threads(int n);

// Below this many elements of work a kernel stays on the calling thread:
// a fork/join costs a few microseconds, about what 32K floats take to stream.
constexpr std::int64_t kGrainElements = std::int64_t(1) << 15;

// Threads worth using for `work` elements.
int threads_for(std::int64_t work);

// Calls f(begin, end) on contiguous, nearly equal slices of [0, n) in parallel: with a
// team of k threads slice t is [n * t / k, n * (t + 1) / k), k <= threads_for(work) (fewer
// when the pool is busy or short of threads), slice 0 on the calling thread. An exception
// thrown by f is rethrown here once every slice has finished.
template <class F>
void parallel_for(std::int64_t n, std::int64_t work, F&& f) {
  const int nt = static_cast<int>(std::min<std::int64_t>(threads_for(work), n));
  if (nt <= 1) {
    if (n > 0) f(std::int64_t(0), n);
    return;
  }
  struct Context {
    std::int64_t n;
    std::remove_reference_t<F>* f;
  } context{n, &f};
  run_on_pool(nt, [](void* p, int t, int team) {
    const Context& c = *static_cast<const Context*>(p);
    const std::int64_t begin = c.n * t / team;
    const std::int64_t end = c.n * (t + 1) / team;
    if (begin < end) (*c.f)(begin, end);
  }, &context);
}

// For tests of the pool: runs parallel_for(n, work, ..) where each slice [b, e) waits
// `slice_ms` milliseconds then writes row b of `rows` (n x 4): b, e, whether it ran on the
// calling thread, and its OS thread id. The slice holding index `throw_in` (if any) throws
// std::bad_alloc at once, without waiting or writing.
void trace_parallel_for(std::int64_t n, std::int64_t work, std::int64_t* rows, std::int64_t throw_in,
                        int slice_ms);

}  // namespace pybn
