// The 16-bit storage conversions exactly as the kernels' loads and stores do them on this
// path (load_as, store_as over Vec<float>), whole vectors then a partial one: the tests
// compare them, bit for bit, with NumPy and ml_dtypes and across paths (docs/dtypes.md).
#include "channel_loops.h"
#include "kernels_isa.h"

namespace pybn {
namespace PYBN_ISA {
namespace {

template <class S>
void widen(const S* src, float* dst, i64 n) {
  constexpr i64 W = Vec<float>::W;
  for (i64 i = 0; i < n; i += W) store_lanes(load_n<float>(src + i, std::min(W, n - i)), dst + i, std::min(W, n - i));
}

template <class S>
void narrow(const float* src, S* dst, i64 n) {
  constexpr i64 W = Vec<float>::W;
  for (i64 i = 0; i < n; i += W) store_lanes(load_n<float>(src + i, std::min(W, n - i)), dst + i, std::min(W, n - i));
}

template <class S>
void convert(const Convert16Args& a) {
  if (a.widen)
    widen(static_cast<const S*>(a.src), static_cast<float*>(a.dst), a.n);
  else
    narrow(static_cast<const float*>(a.src), static_cast<S*>(a.dst), a.n);
}

}  // namespace

void convert_16bit(const Convert16Args& a) {
  if (a.bfloat16)
    convert<BFloat16>(a);
  else
    convert<Float16>(a);
}

PYBN_FILL_FAMILY(convert)

}  // namespace PYBN_ISA
}  // namespace pybn
