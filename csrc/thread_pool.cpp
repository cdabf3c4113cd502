// The fork-join pool under parallel_for (thread_pool.h says what it guarantees).
//
// All state is static and trivially destructible: the pool is never torn down, so a
// daemon thread still inside a kernel while the process exits finds it intact, and the
// workers end with the process. Waiting is a bounded spin, then a futex: each worker
// waits on its own word, the caller of a job on the count of slices still running.
#include "pybn/thread_pool.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <exception>

#include "pybn/openmp_runtime.h"
#include "pybn/parallel.h"

namespace pybn {
namespace {

// How long an idle thread spins before it sleeps. Long enough that back-to-back pybn
// calls (separated by microseconds of Python) find the workers awake; short enough that
// an idle pool does not take the cores from the next library's threads (a BLAS matmul
// after a pybn call waited for the spinning threads, 8 ms instead of 1 ms, when GNU
// OpenMP spun 5 ms). Waking a sleeping worker costs tens of microseconds.
constexpr std::chrono::nanoseconds kSpin = std::chrono::microseconds(100);

void futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}

void futex_wake_one(std::atomic<std::uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
}

// Tells the core this thread is spinning (frees pipeline resources for its sibling thread).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

// The CPU this thread runs on (-1 where unknown): with glibc on x86-64 a read, no system call.
inline int current_cpu() { return sched_getcpu(); }

// The CPU each thread of the pool last ran on, plus one (0: not known): index 0 the caller
// of the current job, t worker t; and that job's team. Written once per job and wait, read
// by spinning threads: a stale value costs a yield, or a spin, never a result.
std::atomic<int> g_cpus[kMaxThreads];
std::atomic<int> g_team{1};

void publish_cpu(int index) { g_cpus[index].store(current_cpu() + 1, std::memory_order_relaxed); }

// Whether another thread of a team of `team` last ran on this thread's CPU.
bool another_on_this_cpu(int self, int team) {
  const int mine = current_cpu() + 1;
  if (mine <= 0) return false;
  for (int t = 0; t < team; ++t)
    if (t != self && g_cpus[t].load(std::memory_order_relaxed) == mine) return true;
  return false;
}

// Spins until done() or kSpin has passed; returns done(). When another thread of the team
// last ran on this thread's CPU (shares_cpu(), asked every 64 polls, about a microsecond),
// it yields that CPU: the two share it (an affinity mask narrower than the team, another
// process busy on the other core), and without the yield each 2-thread call took both
// sides' whole spins, about 210 us, where one thread took 6 us. Only then: yielding on
// every poll also changed how the scheduler placed two threads with a CPU each (the first
// thousands of calls shared one).
template <class Done, class SharesCpu>
bool spin_until(Done done, SharesCpu shares_cpu) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (unsigned i = 1;; ++i) {
    if (done()) return true;
    cpu_relax();
    if (i % 64 == 0) {
      if (std::chrono::steady_clock::now() > deadline) return done();
      if (shares_cpu()) sched_yield();
    }
  }
}

// Waits until `word` differs from `seen` (spin, then futex) and returns its new value.
// `sleeping` tells the thread that changes the word whether a wake-up call is needed:
// each side writes its own flag then reads the other's (all seq_cst), so either the
// waiter sees the new value or the changer sees the waiter asleep.
std::uint32_t wait_for_change(std::atomic<std::uint32_t>& word, std::uint32_t seen,
                              std::atomic<std::uint32_t>& sleeping, int index) {
  publish_cpu(index);
  if (spin_until([&] { return word.load(std::memory_order_acquire) != seen; },
                 [index] { return another_on_this_cpu(index, g_team.load(std::memory_order_relaxed)); }))
    return word.load(std::memory_order_acquire);
  for (;;) {
    sleeping.store(1);
    const std::uint32_t now = word.load();
    if (now != seen) {
      sleeping.store(0, std::memory_order_relaxed);
      return now;
    }
    futex_wait(word, seen);  // returns at once if the word changed in between
    sleeping.store(0, std::memory_order_relaxed);
  }
}

// One job: on the caller's stack, read by workers only before they report their slice done.
struct Job {
  Job(SliceFn f, void* c) : fn(f), context(c) {}

  SliceFn fn;
  void* context;
  int team = 1;
  std::atomic<bool> failed{false};
  std::exception_ptr error;  // the first exception a slice threw

  void run(int slice) noexcept {
    try {
      fn(context, slice, team);
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  }
};

struct alignas(64) Worker {
  std::atomic<std::uint32_t> epoch{0};     // bumped by the caller to hand this worker a slice
  std::atomic<std::uint32_t> sleeping{0};  // 1 while the worker sleeps (or is about to) on epoch
  Job* job = nullptr;                      // written before epoch is bumped
  int slice = 0;
  int index = 0;                           // its place in the pool, 1 .. kMaxThreads - 1
};

// Workers are thread indices 1 .. kMaxThreads - 1 (0 is the caller).
Worker g_workers[kMaxThreads];
std::atomic<int> g_started{1};            // threads running: the caller + workers 1 .. g_started - 1
std::atomic<int> g_create_limit{kMaxThreads};  // lowered when pthread_create fails
std::atomic<bool> g_busy{false};          // a job is on the pool
std::atomic<std::uint32_t> g_remaining{0};      // worker slices of the current job not yet done
std::atomic<std::uint32_t> g_caller_sleeping{0};

void report_done() {
  if (g_remaining.fetch_sub(1) == 1 && g_caller_sleeping.load()) futex_wake_one(g_remaining);
}

void* worker_main(void* arg) {
  Worker& w = *static_cast<Worker*>(arg);
  std::uint32_t seen = 0;  // the creator zeroed epoch before starting this thread
  for (;;) {
    seen = wait_for_change(w.epoch, seen, w.sleeping, w.index);
    publish_cpu(w.index);  // (it may have slept, and woken on another CPU)
    w.job->run(w.slice);
    report_done();  // the last access to the job
  }
}

// Starts worker `index` with every asynchronous signal blocked, so that signals go to the
// application's threads (Python handles them on its main thread). Faults stay unblocked:
// a crash in a worker must still reach faulthandler or the default action.
bool start_worker(int index) {
  Worker& w = g_workers[index];
  w.epoch.store(0, std::memory_order_relaxed);
  w.sleeping.store(0, std::memory_order_relaxed);
  w.index = index;
  g_cpus[index].store(0, std::memory_order_relaxed);
  sigset_t all, previous;
  sigfillset(&all);
  for (int fault : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT, SIGSYS}) sigdelset(&all, fault);
  pthread_sigmask(SIG_SETMASK, &all, &previous);
  pthread_t thread;
  const bool ok = pthread_create(&thread, nullptr, worker_main, &w) == 0;
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  if (!ok) return false;
  pthread_setname_np(thread, "pybn-worker");
  pthread_detach(thread);
  return true;
}

// In a child made by fork only the forking thread exists: the workers, and any job another
// thread of the parent was running, are gone. Their slots are abandoned, not destroyed.
void reset_after_fork() {
  g_started.store(1, std::memory_order_relaxed);
  g_create_limit.store(kMaxThreads, std::memory_order_relaxed);
  g_busy.store(false, std::memory_order_relaxed);
  g_remaining.store(0, std::memory_order_relaxed);
  g_caller_sleeping.store(0, std::memory_order_relaxed);
}

const bool g_fork_handler = pthread_atfork(nullptr, nullptr, reset_after_fork) == 0;

// Starts workers until `team` threads run, or as many as the system allows; returns the
// threads available. Called only by the pool's current owner. Without the fork handler
// (registration failed) no worker is started: a forked child would wait for them forever.
int grow_to(int team) {
  if (!g_fork_handler) return 1;
  int started = g_started.load(std::memory_order_relaxed);
  const int limit = std::min(team, g_create_limit.load(std::memory_order_relaxed));
  while (started < limit) {
    if (!start_worker(started)) {
      g_create_limit.store(started, std::memory_order_relaxed);
      break;
    }
    g_started.store(++started, std::memory_order_relaxed);
  }
  return std::min(team, started);
}

void hand_out(Job& job) {
  g_team.store(job.team, std::memory_order_relaxed);
  publish_cpu(0);
  g_remaining.store(static_cast<std::uint32_t>(job.team - 1), std::memory_order_relaxed);
  for (int t = 1; t < job.team; ++t) {
    Worker& w = g_workers[t];
    w.job = &job;
    w.slice = t;
    w.epoch.fetch_add(1);
    if (w.sleeping.load()) futex_wake_one(w.epoch);
  }
}

void wait_for_workers(int team) {
  std::uint32_t left = g_remaining.load(std::memory_order_acquire);
  if (left == 0 || spin_until([] { return g_remaining.load(std::memory_order_acquire) == 0; },
                              [team] { return another_on_this_cpu(0, team); }))
    return;
  for (;;) {
    g_caller_sleeping.store(1);
    left = g_remaining.load();
    if (left == 0) break;
    futex_wait(g_remaining, left);
  }
  g_caller_sleeping.store(0, std::memory_order_relaxed);
}

// A job on a loaded GNU OpenMP runtime's team (openmp_runtime.h). The same slices as on the
// pool, so the same results; if the runtime gives fewer threads than asked (OMP_THREAD_LIMIT,
// OMP_DYNAMIC), each thread takes every k-th slice. Slices never throw (Job::run catches),
// so no exception crosses libgomp's frames. Called from inside any OpenMP region (a torch
// intra-op thread, say), the job runs whole on the calling thread: a nested team would
// multiply the threads, and libgomp might serialize it anyway.
struct OpenMpRegion {
  const OpenMpRuntime* omp;
  Job* job;
};

void run_slices_of_region(void* data) {
  const OpenMpRegion& r = *static_cast<const OpenMpRegion*>(data);
  const int k = r.omp->num_threads();
  for (int slice = r.omp->thread_num(); slice < r.job->team; slice += k) r.job->run(slice);
}

// libgomp exits the process when it cannot create a thread its team needs. The threads of a
// team stay with the thread that formed it until a smaller team retires the extra ones, so
// only a team larger than the last one on this thread creates some: that many are first
// created here (alive together, with libgomp's stack size, then joined), and the team is cut
// to what the system allowed. Creation is tried again after set_num_threads.
thread_local int t_openmp_team = 1;  // the last team libgomp formed for this thread
std::atomic<int> g_openmp_team_cap{kMaxThreads};  // the largest team a probe found room for

// The stack size libgomp gives its threads, read as libgomp reads it (libgomp/env.c): from
// OMP_STACKSIZE, else GOMP_STACKSIZE, a number and an optional b, k, m or g (k when none),
// spaces around; a value libgomp rejects is skipped as it skips it. 0: neither is valid,
// libgomp keeps the default stack, as the probe then does.
std::size_t openmp_stack_bytes() {
  for (const char* name : {"OMP_STACKSIZE", "GOMP_STACKSIZE"}) {
    const char* text = std::getenv(name);
    if (text == nullptr) continue;
    while (std::isspace(static_cast<unsigned char>(*text))) ++text;
    char* end = nullptr;
    errno = 0;
    const unsigned long value = std::strtoul(text, &end, 10);
    if (*text == '\0' || errno != 0 || end == text) continue;
    while (std::isspace(static_cast<unsigned char>(*end))) ++end;
    unsigned shift = 10;
    if (*end != '\0') {
      const int unit = std::tolower(static_cast<unsigned char>(*end));
      if (unit != 'b' && unit != 'k' && unit != 'm' && unit != 'g') continue;
      shift = unit == 'b' ? 0 : unit == 'm' ? 20 : unit == 'g' ? 30 : 10;
      ++end;
      while (std::isspace(static_cast<unsigned char>(*end))) ++end;
      if (*end != '\0') continue;
    }
    if (((value << shift) >> shift) != value) continue;
    return static_cast<std::size_t>(value << shift);
  }
  return 0;
}

void* wait_for_release(void* gate) {
  auto& open = *static_cast<std::atomic<std::uint32_t>*>(gate);
  while (open.load() == 0) futex_wait(open, 0);
  return nullptr;
}

// How many of `wanted` threads the system lets this process create at once (at most).
int threads_creatable(int wanted) {
  static const std::size_t stack_bytes = openmp_stack_bytes();
  pthread_attr_t attr;
  pthread_attr_t* with_stack = nullptr;  // (libgomp's stacks: an address-space limit refuses them first)
  if (stack_bytes != 0 && pthread_attr_init(&attr) == 0) {
    if (pthread_attr_setstacksize(&attr, stack_bytes) == 0)  // (else libgomp keeps the default too)
      with_stack = &attr;
    else
      pthread_attr_destroy(&attr);
  }
  std::atomic<std::uint32_t> gate{0};
  pthread_t probes[kMaxThreads];
  int created = 0;
  while (created < wanted && pthread_create(&probes[created], with_stack, wait_for_release, &gate) == 0) ++created;
  if (with_stack != nullptr) pthread_attr_destroy(with_stack);
  gate.store(1);
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&gate), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
  for (int i = 0; i < created; ++i) pthread_join(probes[i], nullptr);
  return created;
}

int openmp_team(int wanted) {
  wanted = std::min(wanted, g_openmp_team_cap.load(std::memory_order_relaxed));
  if (wanted <= t_openmp_team) return wanted;
  const int missing = wanted - t_openmp_team;
  const int creatable = threads_creatable(missing);
  if (creatable < missing) g_openmp_team_cap.store(t_openmp_team + creatable, std::memory_order_relaxed);
  return t_openmp_team + creatable;
}

void run_on_openmp(const OpenMpRuntime& omp, Job& job, int wanted) {
  if (omp.level() > 0) {
    job.run(0);
    return;
  }
  job.team = openmp_team(wanted);
  if (job.team == 1) {
    job.run(0);
    return;
  }
  OpenMpRegion region{&omp, &job};
  omp.parallel(run_slices_of_region, &region, static_cast<unsigned>(job.team), 0);
  t_openmp_team = job.team;  // (a smaller team than the last retires libgomp's extra threads)
}

void run_on_own_threads(Job& job, int wanted) {
  job.team = grow_to(wanted);
  hand_out(job);
  job.run(0);
  wait_for_workers(job.team);
}

}  // namespace

void run_on_pool(int wanted, SliceFn fn, void* context) {
  Job job(fn, context);
  const bool owner = wanted > 1 && !g_busy.exchange(true, std::memory_order_acquire);
  if (!owner) {
    job.run(0);  // one slice of [0, n): the same result by construction, on this thread
  } else {
    if (const OpenMpRuntime* omp = openmp_for_regions())
      run_on_openmp(*omp, job, wanted);
    else
      run_on_own_threads(job, wanted);
    g_busy.store(false, std::memory_order_release);
  }
  if (job.failed.load(std::memory_order_acquire)) std::rethrow_exception(job.error);
}

int pool_threads() {
  return openmp_for_regions() ? t_openmp_team : g_started.load(std::memory_order_relaxed);
}

void pool_allow_retry() {
  g_create_limit.store(kMaxThreads, std::memory_order_relaxed);
  g_openmp_team_cap.store(kMaxThreads, std::memory_order_relaxed);
}

}  // namespace pybn
