// Which threads run parallel regions: pybn's own pool, or the GNU OpenMP runtime (libgomp)
// another library (torch, scikit-learn) has already loaded into the process.
//
// Why borrow it: after each of its parallel regions libgomp's workers spin for
// milliseconds (OMP_WAIT_POLICY's default). pybn's own workers, started right after a torch
// op, fought those spinning threads for the cores and ran 1.5x slower; a region run on
// libgomp's team hands the work to the spinning worker at once. docs/threads.md has the
// decision, the costs (libgomp's idle spin after pybn's calls too) and the limits.
#pragma once

namespace pybn {

// The libgomp entry points a parallel region needs (all in libgomp's ABI since GCC 4.9).
struct OpenMpRuntime {
  void (*parallel)(void (*region)(void*), void* data, unsigned num_threads, unsigned flags);  // GOMP_parallel
  int (*thread_num)();   // omp_get_thread_num
  int (*num_threads)();  // omp_get_num_threads: the team actually running the region
  int (*level)();        // omp_get_level: > 0 inside any OpenMP region, nested ones included
  const char* path;      // where it was loaded from
};

// PYBN_THREADING: "own" (pybn's pool always), "openmp" (libgomp always: the one loaded, or
// libgomp.so.1 loaded at import), "auto" or unset (libgomp when one is loaded, else the pool).
enum class Threading { own, openmp, automatic };

// Reads PYBN_THREADING once (the module's import calls this first, so a bad value fails the
// import with its message) and, for "openmp", loads libgomp. Throws std::runtime_error.
Threading threading();

// The runtime a parallel region started now should run on, or nullptr for pybn's pool:
// nullptr under "own", in a child made by fork (libgomp's pool is not copied; its next
// region would wait forever for the parent's workers), and under "auto" while no libgomp is
// loaded or while the process has a tight thread limit (RLIMIT_NPROC below 4096, not root):
// libgomp exits the process when a thread is refused, and pybn's probe cannot see the
// threads another library's smaller team retired; pybn's pool runs on the threads it gets. Looks again for a loaded libgomp only when a library was loaded since the last
// look. Thread-safe (the pool's owner and the diagnostics call it).
const OpenMpRuntime* openmp_for_regions();

}  // namespace pybn
