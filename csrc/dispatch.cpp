// Picks the kernel table once: CPUID for the instructions, XGETBV for the OS saving the
// registers they use (a CPU with AVX-512 under an OS that does not save ZMM state must
// not run the AVX-512 path). PYBN_ISA may force a lower path.
#include "pybn/dispatch.h"

#if defined(__x86_64__)
#define PYBN_X86 1
#include <cpuid.h>
#else  // built with the scalar path only (CMakeLists.txt): no x86 feature to detect
#define PYBN_X86 0
#endif

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace pybn {
namespace {

struct CpuFeatures {
  bool avx2 = false;    // AVX2 + FMA, YMM state enabled
  bool avx512 = false;  // AVX-512 F/BW/DQ/VL, ZMM and opmask state enabled
};

#if PYBN_X86
unsigned long long xgetbv0() {
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & bit_OSXSAVE;
  const bool fma = c & bit_FMA;
  const bool avx = c & bit_AVX;
  if (!osxsave || !avx) return f;
  const unsigned long long xcr0 = xgetbv0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;          // SSE + AVX state
  const bool zmm_state = (xcr0 & 0xE6) == 0xE6;        // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool avx2 = b & bit_AVX2;
  const bool bmi2 = b & bit_BMI2;
  const bool avx512 = (b & bit_AVX512F) && (b & bit_AVX512BW) && (b & bit_AVX512DQ) && (b & bit_AVX512VL);
  f.avx2 = ymm_state && avx2 && fma && bmi2;
  f.avx512 = f.avx2 && zmm_state && avx512;
  return f;
}

const KernelTable* avx2_table() { return &avx2::kernel_table(); }
const KernelTable* avx512_table() { return &avx512::kernel_table(); }
#else
CpuFeatures detect() { return {}; }
const KernelTable* avx2_table() { return nullptr; }  // never asked for: detect() says no AVX2
const KernelTable* avx512_table() { return nullptr; }
#endif

const KernelTable* by_name(const std::string& name, const CpuFeatures& cpu) {
  if (name == "scalar") return &scalar::kernel_table();
  if (name == "avx2" && cpu.avx2) return avx2_table();
  if (name == "avx512" && cpu.avx512) return avx512_table();
  if (name == "avx2" || name == "avx512") return nullptr;
  throw std::runtime_error("'" + name + "' is not one of scalar, avx2, avx512");
}

const KernelTable* choose() {
  const CpuFeatures cpu = detect();
  const KernelTable* best = cpu.avx512 ? avx512_table()
                            : cpu.avx2 ? avx2_table()
                                       : &scalar::kernel_table();
  const char* forced = std::getenv("PYBN_ISA");
  if (forced == nullptr || *forced == '\0') return best;
  try {
    const KernelTable* t = by_name(forced, cpu);
    if (t == nullptr)
      throw std::runtime_error(std::string("this CPU supports only up to ") + best->isa);
    return t;
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(std::string("PYBN_ISA=") + forced + ": " + e.what());
  }
}

std::atomic<const KernelTable*> g_active{nullptr};

}  // namespace

const KernelTable& table() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = choose();
    g_active.store(t, std::memory_order_release);
  }
  return *t;
}

void use_isa(const std::string& name) {
  const KernelTable* t = by_name(name, detect());
  if (t == nullptr) throw std::runtime_error("this CPU cannot run the " + name + " path");
  g_active.store(t, std::memory_order_release);
}

std::vector<std::string> supported_isas() {
  const CpuFeatures cpu = detect();
  std::vector<std::string> out{"scalar"};
  if (cpu.avx2) out.push_back("avx2");
  if (cpu.avx512) out.push_back("avx512");
  return out;
}

}  // namespace pybn
