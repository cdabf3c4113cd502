// pybn's own fork-join thread pool (thread_pool.cpp), under parallel_for.
//
// pybn owns its worker threads instead of being built on an OpenMP runtime, whose behaviour
// depended on which runtime another library (torch) had loaded first, did not survive
// fork, exited the process when a thread could not be created and let exceptions escape
// its parallel regions. When a GNU OpenMP runtime is loaded anyway (torch), run_on_pool runs
// the job on that runtime's team instead, with the same guarantees (openmp_runtime.h,
// docs/threads.md). The pool:
// - starts workers lazily, and runs with fewer when the system refuses to create more;
// - runs one job at a time: a caller that finds it busy (another Python thread's job, or a
//   nested call from inside a job) runs the whole job on its own thread;
// - rethrows on the caller the first exception any slice threw, once every slice is done;
// - lets idle workers spin briefly after a job, then sleep on a futex;
// - is reset in a child process made by fork (the workers are not copied): the child has no
//   workers and pybn uses 1 thread there until set_num_threads is called.
#pragma once

namespace pybn {

// One slice of a job: slice `t` of `team`, 0 <= t < team.
using SliceFn = void (*)(void* context, int slice, int team);

// Runs fn(context, t, team) for every t in [0, team) and returns when all have finished.
// team is at most `wanted`: fewer when the pool is busy (then 1, everything on this
// thread) or when workers could not be created. Slice 0 runs on the calling thread.
// The first exception thrown by a slice is rethrown here after all slices finished.
void run_on_pool(int wanted, SliceFn fn, void* context);

// Threads the pool has started, the calling thread included; on an OpenMP runtime, the
// largest team it formed for the calling thread (for tests).
int pool_threads();

// Called by set_num_threads: worker creation that failed is tried again up to `n`.
void pool_allow_retry();

}  // namespace pybn
