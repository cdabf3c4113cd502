// This ISA's tables: each family fills the fields of its entries (kernels_isa.h). Nothing
// here names a kernel: a new entry is a line of kernel_list.h plus its code.
#include "kernels_isa.h"

namespace pybn {
namespace PYBN_ISA {

#define PYBN_STR2(x) #x
#define PYBN_STR(x) PYBN_STR2(x)

namespace {
struct Tables {
  KernelTable kernels;
  DiagnosticTable diagnostics;
};

// Built on first use, after dispatch chose this ISA (no SIMD code runs at load time).
const Tables& tables() {
  static const Tables t = [] {
    Tables t;
    t.kernels.isa = PYBN_STR(PYBN_ISA);
#define PYBN_CALL_FILL(family, ...) fill_##family(t.kernels, t.diagnostics);
    PYBN_KERNEL_FAMILIES(PYBN_CALL_FILL)
#undef PYBN_CALL_FILL
    return t;
  }();
  return t;
}
}  // namespace

const KernelTable& kernel_table() { return tables().kernels; }
const DiagnosticTable& diagnostic_table() { return tables().diagnostics; }

}  // namespace PYBN_ISA
}  // namespace pybn
