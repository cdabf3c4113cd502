// The bandwidth probe of the benchmark (docs/performance.md), written in
// the same vector vocabulary and threading as the kernels so the bound is measured the
// way the kernels move memory: t_read is one vectorized pass that reads the array, and
// t_stream a copy with non-temporal stores, as the STREAM benchmark does it.
#include "channel_loops.h"
#include "kernels_isa.h"

namespace pybn {
namespace PYBN_ISA {

void probe_read(const ProbeReadArgs& a) {
  using V = Vec<float>;
  const float* x = a.x;
  const i64 n = a.n;
  constexpr i64 W = V::W;
  const i64 slots = (n + W - 1) / W;
  const int nt = std::max(1, threads_for(n));
  Buffer<double> part = make_buffer<double>(nt);
  std::fill(part.get(), part.get() + nt, 0.0);
  parallel_for(nt, n, [&](i64 tb, i64 te) {
    for (i64 t = tb; t < te; ++t) {
      const i64 begin = std::min(n, slots * t / nt * W), end = std::min(n, slots * (t + 1) / nt * W);
      double s[2];
      segment_accumulate<float, 2>(end - begin, s, [&](i64 i, i64 k, V* a) {
        a[0] = a[0] + load_n<float>(x + begin + i, k);
      });
      part[t] = s[0];
    }
  });
  double total = 0;
  for (int t = 0; t < nt; ++t) total += part[t];
  *a.sum = total;
}

void probe_stream(const ProbeStreamArgs& a) {
  using V = Vec<float>;
  const float* src = a.src;
  float* dst = a.dst;
  const i64 n = a.n;
  constexpr i64 W = V::W;
  // Streams at every size: this is the bound the kernels are held to, not a kernel.
  const i64 slots = (n + W - 1) / W;
  parallel_for(slots, n, [&](i64 sb, i64 se) {
    i64 i = sb * W;
    const i64 end = std::min(se * W, n);
    const i64 head = std::min(end - i, lanes_to_alignment(dst + i));
    if (head > 0) {
      V::load(src + i, head).store(dst + i, head);
      i += head;
    }
    for (; i + W <= end; i += W) V::load(src + i).stream(dst + i);
    if (i < end) V::load(src + i, end - i).store(dst + i, end - i);
    stream_fence();
  });
}

PYBN_FILL_FAMILY(probe)

}  // namespace PYBN_ISA
}  // namespace pybn
