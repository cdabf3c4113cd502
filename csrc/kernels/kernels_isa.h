// The entry points one ISA's kernel sources define, in namespace pybn::<isa>.
// Only table.cpp (compiled for the same ISA) refers to them.
#pragma once
#include <cstdint>

#include "pybn/kernels.h"

namespace pybn {
namespace PYBN_ISA {

template <class T>
void bn_train(const BnTrainArgs<T>& a);
template <class T>
void bn_infer(const BnInferArgs<T>& a);
template <class T>
void bn_backward(const BnBackwardArgs<T>& a);
template <class T>
void bn_moments(const BnMomentsArgs<T>& a);
template <class T>
void bn_backward_reduce(const BnBackwardArgs<T>& a, const BnGradSums<T>& s);
template <class T>
void bn_backward_apply(const BnBackwardArgs<T>& a, const BnGradSums<T>& s);

template <class T>
void dropout(const DropoutArgs<T>& a);
template <class T>
void dropout_apply(const DropoutApplyArgs<T>& a);
template <class T>
void dropout_apply_broadcast(const DropoutApplyArgs<T>& a);
void dropout_mask(const DropoutMaskArgs& a);

template <class T>
void fold_scale(const FoldScaleArgs<T>& a);
template <class T>
void fold_bias(const FoldBiasArgs<T>& a);
void philox(const std::uint32_t* counters, std::int64_t n, std::uint64_t key, std::uint32_t* out);

double probe_read(const float* x, std::int64_t n);
void probe_stream(const float* src, float* dst, std::int64_t n);

}  // namespace PYBN_ISA
}  // namespace pybn
