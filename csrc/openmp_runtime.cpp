// Finds a GNU OpenMP runtime already loaded in the process (openmp_runtime.h says why).
//
// Libraries that bundle libgomp (torch's wheel, scikit-learn's) load it RTLD_LOCAL, often
// under a mangled name (libgomp-<hash>.so.1), so dlsym(RTLD_DEFAULT) does not see it: the
// loaded objects are listed with dl_iterate_phdr, and a libgomp among them is opened again
// with RTLD_NOLOAD (which also keeps it loaded for as long as pybn may call it).
#include "pybn/openmp_runtime.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "pybn/printable.h"

namespace pybn {
namespace {

// Set in a child made by fork: libgomp's workers were not copied, its pool still counts
// them, and its next region with more than one thread waits for them forever.
std::atomic<bool> g_forked{false};
const bool g_fork_handler = pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); }) == 0;

Threading parse_threading() {
  const char* value = std::getenv("PYBN_THREADING");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return Threading::automatic;
  if (std::strcmp(value, "own") == 0) return Threading::own;
  if (std::strcmp(value, "openmp") == 0) {
    if (dlopen("libgomp.so.1", RTLD_NOW | RTLD_LOCAL) == nullptr)
      throw std::runtime_error(std::string("PYBN_THREADING=openmp: libgomp.so.1 could not be loaded: ") + dlerror());
    return Threading::openmp;
  }
  throw std::runtime_error("PYBN_THREADING=" + printable(value) + ": must be own, openmp or auto");
}

bool is_libgomp(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return std::strncmp(slash ? slash + 1 : path, "libgomp", 7) == 0;
}

struct Search {
  unsigned long long adds_seen;  // libraries loaded in the process at the last search
  unsigned long long adds_now = 0;
  char path[4096] = "";           // the first libgomp in load order, if any
};

int visit(dl_phdr_info* info, std::size_t size, void* data) {
  Search& s = *static_cast<Search*>(data);
  if (size < offsetof(dl_phdr_info, dlpi_subs)) return 1;  // a loader too old to count loads: no search
  if (s.adds_now == 0) {
    s.adds_now = info->dlpi_adds;
    if (s.adds_now == s.adds_seen) return 1;  // nothing loaded since the last search
  }
  if (info->dlpi_name == nullptr || !is_libgomp(info->dlpi_name)) return 0;
  if (std::strlen(info->dlpi_name) >= sizeof s.path) return 0;
  std::strcpy(s.path, info->dlpi_name);
  return 1;
}

// Opens the library at `path` (already loaded) and takes the entry points; false if one is missing.
bool take_entry_points(const char* path, OpenMpRuntime& rt) {
  void* lib = dlopen(path, RTLD_NOLOAD | RTLD_LAZY | RTLD_LOCAL);
  if (lib == nullptr) return false;
  rt.parallel = reinterpret_cast<decltype(rt.parallel)>(dlsym(lib, "GOMP_parallel"));
  rt.thread_num = reinterpret_cast<decltype(rt.thread_num)>(dlsym(lib, "omp_get_thread_num"));
  rt.num_threads = reinterpret_cast<decltype(rt.num_threads)>(dlsym(lib, "omp_get_num_threads"));
  rt.level = reinterpret_cast<decltype(rt.level)>(dlsym(lib, "omp_get_level"));
  if (rt.parallel && rt.thread_num && rt.num_threads && rt.level) return true;
  dlclose(lib);
  return false;
}

// Written once, under g_search, before g_found is set.
OpenMpRuntime g_runtime{};
char g_path[4096] = "";
std::atomic<bool> g_found{false};
std::mutex g_search;  // the pool's owner and the diagnostics may look at the same time
unsigned long long g_adds_seen = 0;

void search() {
  const std::lock_guard<std::mutex> lock(g_search);
  if (g_found.load(std::memory_order_relaxed)) return;
  Search s{g_adds_seen};
  dl_iterate_phdr(visit, &s);
  g_adds_seen = s.adds_now;
  if (s.path[0] == '\0' || !take_entry_points(s.path, g_runtime)) return;
  std::strcpy(g_path, s.path);
  g_runtime.path = g_path;
  g_found.store(true, std::memory_order_release);
}

// Whether the system counts this process's threads against a tight limit: its user may have
// fewer than 4096 processes and threads (RLIMIT_NPROC, which the kernel does not apply to
// root). Checked per region, a limit can be set at any time. (An address-space limit is not
// counted: the probe makes threads with libgomp's stack size, and glibc keeps the stacks of
// the threads libgomp retires for the next ones.)
bool threads_limited() {
  rlimit limit{};
  return getuid() != 0 && getrlimit(RLIMIT_NPROC, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY &&
         limit.rlim_cur < 4096;
}

}  // namespace

Threading threading() {
  static const Threading mode = parse_threading();
  return mode;
}

const OpenMpRuntime* openmp_for_regions() {
  const Threading mode = threading();
  if (mode == Threading::own || g_forked.load(std::memory_order_relaxed) || !g_fork_handler) return nullptr;
  if (!g_found.load(std::memory_order_acquire)) search();
  if (!g_found.load(std::memory_order_acquire)) return nullptr;
  return mode == Threading::automatic && threads_limited() ? nullptr : &g_runtime;
}

}  // namespace pybn
