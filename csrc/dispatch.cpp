// Picks the kernel tables once, from the ISA list (PYBN_ISAS, CMakeLists.txt): the last
// path whose required CPU features the CPU has, unless PYBN_ISA forces a lower one.
//
// The features are checked with __builtin_cpu_supports (GCC, Clang), which reads CPUID for
// the instructions and XGETBV for the OS saving the registers they use: a CPU with AVX-512
// under an OS that does not save ZMM state does not report avx512f. A path's tables are
// built the first time they are asked for, and only a path the CPU supports is asked for:
// its table code was compiled with its flags.
#include "pybn/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "pybn/printable.h"

#if defined(__x86_64__) || defined(__i386__)
#define PYBN_CPU_SUPPORTS(feature) (__builtin_cpu_init(), __builtin_cpu_supports(feature))
#elif defined(__aarch64__)
#include <cstring>
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#define PYBN_CPU_SUPPORTS(feature) aarch64_supports(feature)
#endif
// Elsewhere no ISA line names a feature (a path the architecture always has runs everywhere),
// so the lists below use no PYBN_CPU_SUPPORTS.

namespace pybn {
namespace {

#if defined(__aarch64__)
// An AArch64 feature as Linux's HWCAP bits and /proc/cpuinfo name it (GCC 12 has no
// __builtin_cpu_supports for AArch64). ASIMD is mandatory in AArch64: where the OS cannot
// be asked, the compiler's baseline answers.
bool aarch64_supports(const char* feature) {
  if (std::strcmp(feature, "asimd") != 0) return false;  // the only feature an ISA line names
#if defined(__linux__) && defined(HWCAP_ASIMD)
  return (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
#elif defined(__ARM_NEON)
  return true;
#else
  return false;
#endif
}
#endif

struct Isa {
  const char* name;
  const char* features;  // the CPU features it needs, space-separated
  bool (*can_run)();
  const KernelTable& (*kernels)();
  const DiagnosticTable& (*diagnostics)();
};

#define PYBN_ISA_ENTRY(isa, condition, feature_list) \
  Isa{#isa, feature_list, [] { return condition; }, &isa::kernel_table, &isa::diagnostic_table},
const Isa kIsas[] = {PYBN_ISAS(PYBN_ISA_ENTRY)};
#undef PYBN_ISA_ENTRY
constexpr int kIsaCount = sizeof(kIsas) / sizeof(kIsas[0]);

std::string all_names() {
  std::string s;
  for (const Isa& isa : kIsas) s += (s.empty() ? "" : ", ") + std::string(isa.name);
  return s;
}

// The path named `name`, or nullptr when this CPU cannot run it; throws std::runtime_error
// for a name that is not in the list.
const Isa* by_name(const std::string& name) {
  for (const Isa& isa : kIsas)
    if (name == isa.name) return isa.can_run() ? &isa : nullptr;
  throw std::runtime_error("'" + printable(name) + "' is not one of " + all_names());
}

const Isa* best() {
  for (int i = kIsaCount - 1; i > 0; --i)
    if (kIsas[i].can_run()) return &kIsas[i];
  return &kIsas[0];
}

const Isa* choose() {
  const char* forced = std::getenv("PYBN_ISA");
  if (forced == nullptr || *forced == '\0') return best();
  try {
    const Isa* isa = by_name(forced);
    if (isa == nullptr) throw std::runtime_error(std::string("this CPU supports only up to ") + best()->name);
    return isa;
  } catch (const std::runtime_error& e) {
    throw std::runtime_error("PYBN_ISA=" + printable(forced) + ": " + e.what());
  }
}

std::atomic<const Isa*> g_active{nullptr};

const Isa& active() {
  const Isa* isa = g_active.load(std::memory_order_acquire);
  if (isa == nullptr) {
    isa = choose();
    g_active.store(isa, std::memory_order_release);
  }
  return *isa;
}

}  // namespace

const KernelTable& table() { return active().kernels(); }

const DiagnosticTable& diagnostics() { return active().diagnostics(); }

void use_isa(const std::string& name) {
  const Isa* isa = by_name(name);
  if (isa == nullptr) throw std::runtime_error("this CPU cannot run the " + name + " path");
  g_active.store(isa, std::memory_order_release);
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const Isa& isa : kIsas)
    if (isa.can_run()) out.push_back(isa.name);
  return out;
}

std::vector<std::pair<std::string, std::string>> compiled_isas() {
  std::vector<std::pair<std::string, std::string>> out;
  for (const Isa& isa : kIsas) out.emplace_back(isa.name, isa.features);
  return out;
}

}  // namespace pybn
