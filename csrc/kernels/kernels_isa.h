// The entry points of kernel_list.h as one ISA's kernel sources define them, in namespace
// pybn::<isa>, and how each family's source hands them to the tables (table.cpp).
#pragma once
#include <cstdint>

#include "pybn/kernels.h"

namespace pybn {
namespace PYBN_ISA {

// Typed entries take the storage type S and the compute type C of the loops: the tables
// hold <S, compute_t<S>> for each dtype, and the diagnostic table <float, double>.
#define PYBN_DECLARE_TYPED(name, Args) \
  template <class S, class C>          \
  void name(const Args<S>& a);
#define PYBN_DECLARE_UNTYPED(name, Args) void name(const Args& a);
PYBN_KERNELS(PYBN_DECLARE_TYPED, PYBN_DECLARE_UNTYPED, PYBN_DECLARE_UNTYPED)
#undef PYBN_DECLARE_TYPED
#undef PYBN_DECLARE_UNTYPED

// fill_<family>(kernels, diagnostics) for each family: sets the table fields of the
// family's entries. Defined by PYBN_FILL_FAMILY(family) at the end of the family's source,
// where the templates are defined, so that taking their addresses instantiates them there.
#define PYBN_DECLARE_FILL(family, ...) void fill_##family(KernelTable& kernels, DiagnosticTable& diagnostics);
PYBN_KERNEL_FAMILIES(PYBN_DECLARE_FILL)
#undef PYBN_DECLARE_FILL

#define PYBN_FILL_TYPED(name, Args) k.name = &name<S, C>;
#define PYBN_FILL_UNTYPED(name, Args) kernels.name = &name;
#define PYBN_FILL_DIAGNOSTIC(name, Args) diagnostics.name = &name;
#define PYBN_FILL_FAMILY(family)                                                                   \
  namespace {                                                                                      \
  template <class S, class C>                                                                      \
  void fill_typed_##family([[maybe_unused]] TypedKernels<S>& k) {                                  \
    PYBN_KERNELS_##family(PYBN_FILL_TYPED, PYBN_SKIP, PYBN_SKIP)                                   \
  }                                                                                                \
  }                                                                                                \
  void fill_##family([[maybe_unused]] KernelTable& kernels, [[maybe_unused]] DiagnosticTable& diagnostics) { \
    for_each_dtype([&](auto tag) {                                                                 \
      using S = typename decltype(tag)::type;                                                      \
      fill_typed_##family<S, compute_t<S>>(kernels.typed<S>());                                    \
    });                                                                                            \
    fill_typed_##family<float, double>(diagnostics.float_computing_in_double);                     \
    PYBN_KERNELS_##family(PYBN_SKIP, PYBN_FILL_UNTYPED, PYBN_FILL_DIAGNOSTIC)                      \
  }

}  // namespace PYBN_ISA
}  // namespace pybn
