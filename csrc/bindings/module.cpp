// pybn._C: thin bindings, one per kernel entry point of kernel_list.h (same name), plus the
// runtime (ISA, threads) and, in pybn._C.diagnostics, the entry points for tests and
// benchmarks. The Python layer (src/pybn/*.py) validates user input and chooses layouts;
// each binding checks every array once more against what the kernel will touch (dtype,
// C-contiguity, size, writability; arrays.h) so no call can reach a kernel with a bad
// pointer, then releases the GIL and calls the active ISA's table. The bindings live with
// their family: bind_batch_norm.cpp, bind_dropout.cpp, bind_fold.cpp, bind_diagnostics.cpp.
#include <pybind11/stl.h>

#include "kernel_sets.h"
#include "pybn/cache_sizes.h"
#include "pybn/huge_pages.h"
#include "pybn/openmp_runtime.h"
#include "pybn/parallel.h"
#include "pybn/thread_pool.h"

namespace py = pybind11;
using namespace pybn::bindings;

namespace {

py::dict isa_list() {
  py::dict isas;
  for (const auto& [name, features] : pybn::compiled_isas()) {
    py::list required;
    for (const auto& f : py::str(features).attr("split")()) required.append(f);
    isas[py::str(name)] = py::tuple(required);
  }
  return isas;
}

py::tuple dtype_list() {
  py::list names;
#define PYBN_DTYPE_NAME(S, name, T) names.append(#name);
  PYBN_DTYPES(PYBN_DTYPE_NAME)
#undef PYBN_DTYPE_NAME
  return py::tuple(names);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pybn's compiled kernels (private: use the functions of the pybn package)";
  m.attr("__version__") = PYBN_VERSION;
  pybn::table();  // choose the ISA now, so a bad PYBN_ISA fails the import with its message
  pybn::threading();  // and read PYBN_THREADING, for the same reason
  // pybind11 looks NumPy's C API up on first use, releasing the GIL with its own guard
  // (GilReleased says why that guard must not be passed by a thread at exit): do it now,
  // not in the first kernel call, which may come from a daemon thread.
  py::dtype::of<float>();
  find_float16_dtype();

  // The lists (kernel_list.h) and the thresholds the kernels own.
  m.attr("ISAS") = isa_list();
  m.attr("DTYPES") = dtype_list();
  m.attr("KERNELS") = kernel_names(false);
  m.attr("STREAM_MIN_BYTES") = pybn::kStreamBytes;
  m.attr("ALIGNMENT") = pybn::kAlignmentBytes;
  m.attr("MAX_THREADS") = pybn::kMaxThreads;

  m.def("isa", [] { return std::string(pybn::table().isa); }, "Name of the active kernel path.");
  m.def("supported_isas", &pybn::supported_isas, "Kernel paths this CPU can run, lowest first.");
  m.def("use_isa", &pybn::use_isa, py::arg("name"), "Switch the active kernel path (for tests).");
  m.def("get_num_threads", &pybn::num_threads);
  m.def("set_num_threads", &pybn::set_num_threads, py::arg("n"));
  m.def("stream_min_bytes", &pybn::stream_min_bytes,
        "Outputs of at least this many bytes are written with non-temporal stores: STREAM_MIN_BYTES or a "
        "quarter of the L3, whichever is more.");
  pybn::cache_sizes();  // a bad PYBN_L2_BYTES or PYBN_L3_BYTES fails the import, not a kernel call
  m.def("cache_sizes", [] { return std::make_pair(pybn::cache_sizes().l2_bytes, pybn::cache_sizes().l3_bytes); },
        "(L2 bytes per core, shared L3 bytes) as the channel-blocked kernels size their blocks to them: "
        "PYBN_L2_BYTES / PYBN_L3_BYTES where set, else the CPU's, the L3 counted as at most 32 MiB.");
  m.def("advise_huge_pages", [](const NdArray& obj) -> bool {
    if (!py::isinstance<py::array>(obj)) throw py::type_error("a: expected a numpy.ndarray");
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (!(a.flags() & py::array::c_style)) fail("a", "must be C-contiguous");
    if (!a.writeable()) fail("a", "is read-only");
    return pybn::advise_huge_pages(a.mutable_data(), static_cast<std::size_t>(a.nbytes()));
  }, py::arg("a"), "Advise a's memory for transparent huge pages (before its first write); whether it was taken.");

  def_typed_kernels<ActiveKernels>(m);
  def_plain_calls(m);
  def_merge_stats(m);
  def_masks(m);
  def_diagnostics(m);
}
