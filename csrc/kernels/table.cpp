// This ISA's table of entry points. A new kernel family adds its fields to KernelTable
// (kernels.h) and its lines here; dispatch and bindings stay as they are.
#include "kernels_isa.h"

namespace pybn {
namespace PYBN_ISA {

#define PYBN_STR2(x) #x
#define PYBN_STR(x) PYBN_STR2(x)

namespace {
template <class T>
TypedKernels<T> typed_kernels() {
  TypedKernels<T> k;
  k.bn_train = &bn_train<T>;
  k.bn_infer = &bn_infer<T>;
  k.bn_backward = &bn_backward<T>;
  k.bn_moments = &bn_moments<T>;
  k.bn_backward_reduce = &bn_backward_reduce<T>;
  k.bn_backward_apply = &bn_backward_apply<T>;
  k.dropout = &dropout<T>;
  k.dropout_apply = &dropout_apply<T>;
  k.dropout_apply_broadcast = &dropout_apply_broadcast<T>;
  k.fold_scale = &fold_scale<T>;
  k.fold_bias = &fold_bias<T>;
  return k;
}

KernelTable make_table() {
  KernelTable t;
  t.isa = PYBN_STR(PYBN_ISA);
  t.f32 = typed_kernels<float>();
  t.f64 = typed_kernels<double>();
  t.dropout_mask = &dropout_mask;
  t.philox = &philox;
  t.probe_read = &probe_read;
  t.probe_stream = &probe_stream;
  return t;
}
}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable table = make_table();
  return table;
}

}  // namespace PYBN_ISA
}  // namespace pybn
