// pybn._C.diagnostics: entry points for tests and benchmarks (DiagnosticTable), not kernels:
// the RNG and the normal stream's arithmetic, the bandwidth probes, the 16-bit conversions,
// how parallel_for splits work, and the float32 kernels computing in double.
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "kernel_sets.h"
#include "pybn/openmp_runtime.h"
#include "pybn/parallel.h"
#include "pybn/scratch.h"
#include "pybn/thread_pool.h"

namespace pybn::bindings {
namespace {

py::array philox(const NdArray& counters, std::uint64_t key) {
  const i64 words = size_of(counters, "counters");
  if (words % 4 != 0) fail("counters", "must hold 4 words per counter");
  pybn::PhiloxArgs a;
  a.counters = required<std::uint32_t>(counters, words, "counters");
  a.n = words / 4;
  a.key = key;
  py::array_t<std::uint32_t> out(std::vector<py::ssize_t>{static_cast<py::ssize_t>(a.n), 4});
  a.out = out.mutable_data();
  {
    GilReleased nogil;
    pybn::diagnostics().philox(a);
  }
  return out;
}

py::array normal_math(const NdArray& words) {
  const i64 n = size_of(words, "words");
  if (n % 2 != 0) fail("words", "must hold 2 words per pair");
  pybn::NormalMathArgs a;
  a.words = required<std::uint32_t>(words, n, "words");
  a.n = n / 2;
  py::array_t<float> out(std::vector<py::ssize_t>{static_cast<py::ssize_t>(a.n), 5});
  a.out = out.mutable_data();
  {
    GilReleased nogil;
    pybn::diagnostics().normal_math(a);
  }
  return out;
}

double probe_read(const NdArray& x) {
  pybn::ProbeReadArgs a;
  a.n = size_of(x, "x");
  a.x = required<float>(x, a.n, "x");
  double sum = 0;
  a.sum = &sum;
  {
    GilReleased nogil;
    pybn::diagnostics().probe_read(a);
  }
  return sum;
}

void probe_stream(const NdArray& src, const NdArray& dst) {
  pybn::ProbeStreamArgs a;
  a.n = size_of(src, "src");
  a.src = required<float>(src, a.n, "src");
  a.dst = required_out<float>(dst, a.n, "dst");
  GilReleased nogil;
  pybn::diagnostics().probe_stream(a);
}

void convert_16bit(const NdArray& src, const NdArray& dst, bool bfloat16, bool widen) {
  pybn::Convert16Args a;
  a.n = size_of(src, "src");
  a.bfloat16 = bfloat16;
  a.widen = widen;
  if (widen) {
    a.src = required<std::uint16_t>(src, a.n, "src");
    a.dst = required_out<float>(dst, a.n, "dst");
  } else {
    a.src = required<float>(src, a.n, "src");
    a.dst = required_out<std::uint16_t>(dst, a.n, "dst");
  }
  GilReleased nogil;
  pybn::diagnostics().convert_16bit(a);
}

void trace_parallel_for(i64 n, i64 work, const NdArray& rows, i64 throw_in, int slice_ms) {
  if (n < 0 || work < 0 || slice_ms < 0) fail("n", "n, work and slice_ms must be >= 0");
  i64* r = required_out<i64>(rows, 4 * n, "rows");
  GilReleased nogil;
  pybn::trace_parallel_for(n, work, r, throw_in, slice_ms);
}

}  // namespace

// The names of the entries of one kind in kernel_list.h, in its order.
py::tuple kernel_names(bool diagnostic) {
  py::list names;
#define PYBN_KERNEL_NAME(name, Args) \
  if (!diagnostic) names.append(#name);
#define PYBN_DIAGNOSTIC_NAME(name, Args) \
  if (diagnostic) names.append(#name);
  PYBN_KERNELS(PYBN_KERNEL_NAME, PYBN_KERNEL_NAME, PYBN_DIAGNOSTIC_NAME)
#undef PYBN_KERNEL_NAME
#undef PYBN_DIAGNOSTIC_NAME
  return py::tuple(names);
}

void def_diagnostics(py::module_& m) {
  auto d = m.def_submodule("diagnostics", "Entry points for tests and benchmarks (DiagnosticTable), not kernels.");
  d.attr("KERNELS") = kernel_names(true);
  d.def("philox", &philox, py::arg("counters"), py::arg("key"),
        "Philox4x32-10 of (n, 4) uint32 counters under a 64-bit key, on the active path.");
  d.def("normal_math", &normal_math, py::arg("words"),
        "The normal stream's arithmetic on (n, 2) uint32 words: (n, 5) float32 u, ln u, phi, cos phi, sin phi.");
  d.def("probe_read", &probe_read, py::arg("x"), "Bandwidth probe: one vectorized pass that reads x (float32).");
  d.def("probe_stream", &probe_stream, py::arg("src"), py::arg("dst"),
        "Bandwidth probe: copy src into dst with non-temporal stores (float32).");
  d.def("convert_16bit", &convert_16bit, py::arg("src"), py::arg("dst"), py::arg("bfloat16"), py::arg("widen"),
        "The active path's 16-bit conversions: uint16 bits of float16/bfloat16 to float32 (widen), or back.");
  d.def("trace_parallel_for", &trace_parallel_for, py::arg("n"), py::arg("work"), py::arg("rows"),
        py::arg("throw_in") = -1, py::arg("slice_ms") = 0,
        "How parallel_for splits [0, n) over threads (parallel.h, trace_parallel_for).");
  d.def("pool_threads", &pybn::pool_threads, "Threads the pool has started, the calling thread included.");
  d.def("scratch_kept", []() { return std::make_pair(pybn::scratch_kept_blocks(), pybn::scratch_kept_bytes()); },
        "(blocks, bytes) of kernel scratch the calling thread keeps for its next call (pybn/scratch.h).");
  d.def("scratch_limits", []() {
    return pybn::scratch_keeps_blocks() ? std::make_pair(pybn::kScratchKept, pybn::kScratchKeptBytes)
                                        : std::make_pair(0, std::size_t(0));
  }, "(blocks, bytes): the most kernel scratch a thread keeps ((0, 0) under AddressSanitizer).");
  d.def("openmp_runtime", []() -> std::optional<std::string> {
    const pybn::OpenMpRuntime* omp = pybn::openmp_for_regions();
    if (omp == nullptr) return std::nullopt;
    return std::string(omp->path);
  }, "Path of the GNU OpenMP runtime parallel regions run on now, or None for pybn's own pool.");
  auto wide = d.def_submodule("float_computing_in_double",
                              "The typed kernels for float32 arrays, computing in double (DiagnosticTable).");
  def_typed_kernels<FloatComputingInDouble>(wide);
}


}  // namespace pybn::bindings
