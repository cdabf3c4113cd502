// The lists pybn is built from, one per axis of variation:
//
//   ISAs      CMakeLists.txt, one pybn_isa() line each, read here as PYBN_ISAS (build_lists.h)
//   dtypes    PYBN_DTYPES below
//   kernels   PYBN_KERNELS_<family> below, one list per kernel family (csrc/kernels/<family>.cpp;
//             the families are CMakeLists.txt's PYBN_KERNEL_FAMILIES)
//
// and what derives from them: the fields of the kernel and diagnostic tables (kernels.h),
// the per-ISA declarations (kernels/kernels_isa.h) and the filling of the tables
// (PYBN_FILL_FAMILY at the end of each family's source, kernels/table.cpp), the dispatch
// (dispatch.cpp), the bindings' dtype switch and the module's KERNELS, DTYPES and ISAS
// (bindings/kernel_sets.h, bindings/module.cpp), which the tests parametrize over and tests/stubgen.py turns into
// the stub src/pybn/_C.pyi.
//
// Why X-macros: an entry must become identifiers (a table field, a function declaration,
// a template instantiation, a binding's table call) in several headers and translation
// units, and only the preprocessor makes names from one list; a constexpr table can list
// values but not declare a field or a function. The ISA list is CMake's because the build
// needs it for the compile flags; CMake writes it out as a header so that no ISA name is
// spelled twice.
#pragma once

#include "pybn/build_lists.h"
#include "pybn/half.h"

// X(storage type, NumPy dtype name, compute type): the element types the typed kernels
// are compiled for and the bindings accept. Arrays hold the storage type; the loops
// compute in the compute type, converting once at each load and rounding once at each
// store. The 16-bit types (pybn/half.h; bfloat16 is ml_dtypes') compute in float, with
// float parameters and statistics (param_t, kernels.h).
#define PYBN_DTYPES(X)       \
  X(float, float32, float)   \
  X(double, float64, double) \
  X(Float16, float16, float) \
  X(BFloat16, bfloat16, float)

// The kernel entry points, one list per family. Each list is called with three macros:
//   TYPED(name, Args)       void name(const Args<S>&), compiled for each storage type S
//   UNTYPED(name, Args)     void name(const Args&), independent of the element type
//   DIAGNOSTIC(name, Args)  as UNTYPED, for tests and benchmarks only: in the separate
//                           DiagnosticTable, bound in pybn._C.diagnostics
// Every Args is a struct of kernels.h.
#define PYBN_KERNELS_batchnorm(TYPED, UNTYPED, DIAGNOSTIC) \
  TYPED(bn_train, BnTrainArgs)                             \
  TYPED(bn_infer, BnInferArgs)                             \
  TYPED(bn_apply, BnApplyArgs)                             \
  TYPED(bn_moments, BnMomentsArgs)                         \
  TYPED(bn_backward, BnBackwardArgs)                       \
  TYPED(bn_backward_reduce, BnGradReduceArgs)              \
  TYPED(bn_backward_apply, BnGradApplyArgs)                \
  TYPED(bn_update_running_stats, BnRunningStatsArgs)       \
  UNTYPED(bn_merge_stats, BnMergeArgs)

#define PYBN_KERNELS_dropout(TYPED, UNTYPED, DIAGNOSTIC) \
  TYPED(dropout, DropoutArgs)                            \
  TYPED(dropout_apply, DropoutApplyArgs)                 \
  TYPED(dropout_apply_broadcast, DropoutApplyArgs)       \
  TYPED(relu_dropout_backward, ReluDropoutBackwardArgs)  \
  UNTYPED(dropout_mask, DropoutMaskArgs)                 \
  DIAGNOSTIC(philox, PhiloxArgs)

#define PYBN_KERNELS_noise(TYPED, UNTYPED, DIAGNOSTIC) \
  TYPED(alpha_dropout, AlphaDropoutArgs)               \
  TYPED(gaussian_noise, GaussianNoiseArgs)             \
  DIAGNOSTIC(normal_math, NormalMathArgs)

#define PYBN_KERNELS_dropblock(TYPED, UNTYPED, DIAGNOSTIC) \
  UNTYPED(drop_block_mask, DropBlockMaskArgs)

#define PYBN_KERNELS_fold(TYPED, UNTYPED, DIAGNOSTIC) \
  TYPED(fold_scale, FoldScaleArgs)                    \
  TYPED(fold_bias, FoldBiasArgs)

#define PYBN_KERNELS_probe(TYPED, UNTYPED, DIAGNOSTIC) \
  DIAGNOSTIC(probe_read, ProbeReadArgs)                \
  DIAGNOSTIC(probe_stream, ProbeStreamArgs)

#define PYBN_KERNELS_convert(TYPED, UNTYPED, DIAGNOSTIC) \
  DIAGNOSTIC(convert_16bit, Convert16Args)

// ---------------------------------------------------------------------------------------
// Walking the lists.

// Every entry of every family: PYBN_KERNELS(TYPED, UNTYPED, DIAGNOSTIC).
#define PYBN_KERNELS_OF_FAMILY(family, TYPED, UNTYPED, DIAGNOSTIC) PYBN_KERNELS_##family(TYPED, UNTYPED, DIAGNOSTIC)
#define PYBN_KERNELS(TYPED, UNTYPED, DIAGNOSTIC) \
  PYBN_KERNEL_FAMILIES(PYBN_KERNELS_OF_FAMILY, TYPED, UNTYPED, DIAGNOSTIC)

// The macro to pass for the kinds of entries a walk skips.
#define PYBN_SKIP(name, Args)
