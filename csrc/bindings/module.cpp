// pybn._C: thin bindings. The Python layer (pybn/*.py) validates user input and chooses
// layouts; here each array is checked once more against what the kernel will touch
// (dtype, C-contiguity, size, writability) so no call can reach a kernel with a bad
// pointer, then the GIL is released and the active ISA's table is called.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cxxabi.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "pybn/dispatch.h"
#include "pybn/kernels.h"
#include "pybn/parallel.h"

namespace py = pybind11;
using pybn::Layout;
using i64 = std::int64_t;

namespace {

// Releases the GIL for its lifetime: each binding holds one around its kernel call.
//
// Not pybind11's gil_scoped_release: at interpreter exit CPython (before 3.14) ends a
// daemon thread that asks for the GIL back by pthread_exit, whose forced unwind out of that
// destructor is std::terminate (SIGABRT), and through the frames above would drop Python
// references without the GIL. Such a thread is parked here instead until the process ends,
// as CPython 3.14 itself does.
class GilReleased {
 public:
  GilReleased() : state_(PyEval_SaveThread()) {}
  GilReleased(const GilReleased&) = delete;
  GilReleased& operator=(const GilReleased&) = delete;
  ~GilReleased() {
    try {
      PyEval_RestoreThread(state_);
    } catch (abi::__forced_unwind&) {
      for (;;) pause();
    }
  }

 private:
  PyThreadState* state_;
};

[[noreturn]] void fail(const char* name, const std::string& what) {
  throw py::value_error(std::string(name) + ": " + what);
}

// The array holds T: its dtype is equivalent to T's (compared by value: an unpickled array
// has an equal dtype that is another object).
template <class T>
bool is_of(const py::array& a) {
  return py::isinstance<py::array_t<T>>(a);
}

template <class T>
py::array checked(const py::handle& obj, i64 size, const char* name, bool writable) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + ": expected a numpy.ndarray");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!is_of<T>(a))
    throw py::type_error(std::string(name) + ": dtype " + std::string(py::str(a.dtype())) + " does not match x");
  if (!(a.flags() & py::array::c_style)) fail(name, "must be C-contiguous");
  if (a.size() != size) fail(name, "has " + std::to_string(a.size()) + " elements, expected " + std::to_string(size));
  if (writable && !a.writeable()) fail(name, "is read-only");
  return a;
}

template <class T>
const T* in(const py::handle& obj, i64 size, const char* name) {
  if (obj.is_none()) return nullptr;
  return static_cast<const T*>(checked<T>(obj, size, name, false).data());
}

template <class T>
T* inout(const py::handle& obj, i64 size, const char* name) {
  if (obj.is_none()) return nullptr;
  return static_cast<T*>(checked<T>(obj, size, name, true).mutable_data());
}

template <class T>
const T* required(const py::handle& obj, i64 size, const char* name) {
  if (obj.is_none()) fail(name, "is required");
  return in<T>(obj, size, name);
}

template <class T>
T* required_out(const py::handle& obj, i64 size, const char* name) {
  if (obj.is_none()) fail(name, "is required");
  return inout<T>(obj, size, name);
}

Layout make_layout(i64 outer, i64 channels, i64 inner) {
  if (outer < 0 || channels < 0 || inner < 0) throw py::value_error("layout: negative extent");
  Layout L;
  L.outer = outer;
  L.channels = channels;
  L.inner = inner;
  return L;
}

// Calls f.template operator()<T>() with T the element type of x (float32 or float64).
template <class F>
void by_dtype(const py::array& x, F&& f) {
  if (is_of<float>(x))
    f(float{});
  else if (is_of<double>(x))
    f(double{});
  else
    throw py::type_error("x: dtype " + std::string(py::str(x.dtype())) + " is not supported (float32, float64)");
}

void bn_train(const py::array& x, const py::object& y, const py::object& weight, const py::object& bias,
              const py::object& running_mean, const py::object& running_var, const py::object& save_mean,
              const py::object& save_invstd, i64 outer, i64 channels, i64 inner, double momentum, double eps,
              bool relu) {
  const Layout L = make_layout(outer, channels, inner);
  by_dtype(x, [&](auto zero) {
    using T = decltype(zero);
    pybn::BnTrainArgs<T> a;
    a.layout = L;
    a.x = required<T>(x, L.numel(), "x");
    a.y = required_out<T>(y, L.numel(), "out");
    a.weight = in<T>(weight, channels, "weight");
    a.bias = in<T>(bias, channels, "bias");
    a.running_mean = inout<T>(running_mean, channels, "running_mean");
    a.running_var = inout<T>(running_var, channels, "running_var");
    a.save_mean = required_out<T>(save_mean, channels, "mean");
    a.save_invstd = required_out<T>(save_invstd, channels, "invstd");
    a.momentum = momentum;
    a.eps = eps;
    a.relu = relu;
    if (L.per_channel() < 2) fail("x", "training needs more than 1 value per channel");
    GilReleased nogil;
    pybn::table().typed<T>().bn_train(a);
  });
}

// Inference forward with var and eps, or (invstd given, float64) with the batch statistics
// of a split-phase training forward.
void bn_infer(const py::array& x, const py::object& y, const py::object& mean, const py::object& var,
              const py::object& weight, const py::object& bias, i64 outer, i64 channels, i64 inner, double eps,
              bool relu, const py::object& invstd) {
  const Layout L = make_layout(outer, channels, inner);
  by_dtype(x, [&](auto zero) {
    using T = decltype(zero);
    pybn::BnInferArgs<T> a;
    a.layout = L;
    a.x = required<T>(x, L.numel(), "x");
    a.y = required_out<T>(y, L.numel(), "out");
    a.mean = required<T>(mean, channels, "running_mean");
    a.invstd = in<double>(invstd, channels, "invstd");
    if (!a.invstd) a.var = required<T>(var, channels, "running_var");
    a.weight = in<T>(weight, channels, "weight");
    a.bias = in<T>(bias, channels, "bias");
    a.eps = eps;
    a.relu = relu;
    GilReleased nogil;
    pybn::table().typed<T>().bn_infer(a);
  });
}

// The arrays every backward call reads: dy, x (and y) of the layout's size, mean and invstd per channel.
template <class T>
pybn::BnBackwardArgs<T> backward_args(const Layout& L, const py::array& dy, const py::object& x,
                                      const py::object& y, const py::object& mean, const py::object& invstd) {
  pybn::BnBackwardArgs<T> a;
  a.layout = L;
  a.dy = required<T>(dy, L.numel(), "dy");
  a.x = required<T>(x, L.numel(), "x");
  a.y = in<T>(y, L.numel(), "y");
  a.mean = required<T>(mean, L.channels, "mean");
  a.invstd = required<T>(invstd, L.channels, "invstd");
  return a;
}

void bn_backward(const py::array& dy, const py::object& x, const py::object& y, const py::object& mean,
                 const py::object& invstd, const py::object& weight, const py::object& dx,
                 const py::object& dweight, const py::object& dbias, i64 outer, i64 channels, i64 inner,
                 bool training) {
  const Layout L = make_layout(outer, channels, inner);
  by_dtype(dy, [&](auto zero) {
    using T = decltype(zero);
    auto a = backward_args<T>(L, dy, x, y, mean, invstd);
    a.weight = in<T>(weight, channels, "weight");
    a.dx = required_out<T>(dx, L.numel(), "out");
    a.dweight = required_out<T>(dweight, channels, "dweight");
    a.dbias = required_out<T>(dbias, channels, "dbias");
    a.training = training;
    GilReleased nogil;
    pybn::table().typed<T>().bn_backward(a);
  });
}

void bn_moments(const py::array& x, const py::object& mean, const py::object& m2, i64 outer, i64 channels,
                i64 inner) {
  const Layout L = make_layout(outer, channels, inner);
  by_dtype(x, [&](auto zero) {
    using T = decltype(zero);
    pybn::BnMomentsArgs<T> a;
    a.layout = L;
    a.x = required<T>(x, L.numel(), "x");
    a.mean = required_out<double>(mean, channels, "mean");
    a.m2 = required_out<double>(m2, channels, "m2");
    GilReleased nogil;
    pybn::table().typed<T>().bn_moments(a);
  });
}

// The two backward phases (kernels.h, BnGradSums); apply == false reduces into the sums.
void bn_backward_phase(bool apply, const py::array& dy, const py::object& x, const py::object& y,
                       const py::object& mean, const py::object& invstd, const py::object& weight,
                       const py::object& sum_g, const py::object& sum_gxhat, double count, const py::object& dx,
                       i64 outer, i64 channels, i64 inner) {
  const Layout L = make_layout(outer, channels, inner);
  by_dtype(dy, [&](auto zero) {
    using T = decltype(zero);
    auto a = backward_args<T>(L, dy, x, y, mean, invstd);
    pybn::BnGradSums<T> sums;
    if (apply) {
      a.weight = in<T>(weight, channels, "weight");
      a.dx = required_out<T>(dx, L.numel(), "out");
      sums.sum_g = const_cast<double*>(required<double>(sum_g, channels, "sum_dy"));
      sums.sum_gxhat = const_cast<double*>(required<double>(sum_gxhat, channels, "sum_dy_xhat"));
      if (!(count > 0)) fail("count", "must be > 0");
      sums.count = count;
    } else {
      sums.sum_g = required_out<double>(sum_g, channels, "sum_dy");
      sums.sum_gxhat = required_out<double>(sum_gxhat, channels, "sum_dy_xhat");
    }
    GilReleased nogil;
    if (apply)
      pybn::table().typed<T>().bn_backward_apply(a, sums);
    else
      pybn::table().typed<T>().bn_backward_reduce(a, sums);
  });
}

void dropout(const py::array& x, const py::object& y, std::uint64_t seed, std::uint64_t offset,
             std::uint32_t threshold, double scale) {
  if (threshold > 0xFFFFu) throw py::value_error("threshold: must be < 65536 (p == 1 gives zeros without a mask)");
  by_dtype(x, [&](auto zero) {
    using T = decltype(zero);
    pybn::DropoutArgs<T> a;
    a.n = static_cast<i64>(x.size());
    a.x = required<T>(x, a.n, "x");
    a.y = required_out<T>(y, a.n, "out");
    a.seed = seed;
    a.offset = offset;
    a.threshold = static_cast<std::uint16_t>(threshold);
    a.scale = scale;
    GilReleased nogil;
    pybn::table().typed<T>().dropout(a);
  });
}

void dropout_mask(const py::object& mask, i64 n, std::uint64_t seed, std::uint64_t offset, std::uint32_t threshold) {
  if (threshold > 0xFFFFu) throw py::value_error("threshold: must be < 65536");
  if (n < 0) throw py::value_error("n: must be >= 0");
  pybn::DropoutMaskArgs a;
  a.n = n;
  a.mask = required_out<unsigned char>(mask, (n + 7) / 8, "mask");
  a.seed = seed;
  a.offset = offset;
  a.threshold = static_cast<std::uint16_t>(threshold);
  GilReleased nogil;
  pybn::table().dropout_mask(a);
}

// A flat mask (broadcast None), or a mask over a noise shape that broadcasts, with x seen as
// broadcast = (f0, b1, f2, b3) (kernels.h, BroadcastShape).
void dropout_apply(const py::array& x, const py::object& mask, const py::object& y, double scale,
                   const py::object& broadcast) {
  pybn::BroadcastShape b;
  const bool flat = broadcast.is_none();
  if (flat) {
    b.f2 = static_cast<i64>(x.size());
  } else {
    const auto dims = broadcast.cast<std::vector<i64>>();
    if (dims.size() != 4 || *std::min_element(dims.begin(), dims.end()) < 0)
      fail("broadcast", "expected 4 sizes >= 0");
    b = {dims[0], dims[1], dims[2], dims[3]};
  }
  by_dtype(x, [&](auto zero) {
    using T = decltype(zero);
    pybn::DropoutApplyArgs<T> a;
    a.n = b.f0 * b.b1 * b.f2 * b.b3;
    a.broadcast = b;
    a.x = required<T>(x, a.n, "x");
    a.mask = required<unsigned char>(mask, (b.f0 * b.f2 + 7) / 8, "mask");
    a.y = required_out<T>(y, a.n, "out");
    a.scale = scale;
    GilReleased nogil;
    if (flat)
      pybn::table().typed<T>().dropout_apply(a);
    else
      pybn::table().typed<T>().dropout_apply_broadcast(a);
  });
}

void fold_scale(const py::array& w, const py::object& scale, const py::object& y, i64 groups, i64 outer,
                i64 channels, i64 inner) {
  if (groups < 0 || outer < 0 || channels < 0 || inner < 0) fail("weight", "negative dimension");
  by_dtype(w, [&](auto zero) {
    using T = decltype(zero);
    pybn::FoldScaleArgs<T> a;
    const i64 n = groups * outer * channels * inner;
    a.groups = groups, a.outer = outer, a.channels = channels, a.inner = inner;
    a.w = required<T>(w, n, "weight");
    a.y = required_out<T>(y, n, "out");
    a.scale = required<double>(scale, groups * channels, "scale");
    GilReleased nogil;
    pybn::table().typed<T>().fold_scale(a);
  });
}

void fold_bias(const py::array& w, const py::object& shift, const py::object& bias, const py::object& out, i64 rows,
               i64 cols) {
  if (rows < 0 || cols < 0) fail("weight", "negative dimension");
  by_dtype(w, [&](auto zero) {
    using T = decltype(zero);
    pybn::FoldBiasArgs<T> a;
    a.rows = rows, a.cols = cols;
    a.w = required<T>(w, rows * cols, "weight");
    a.shift = required<double>(shift, cols, "shift");
    a.bias = required<double>(bias, rows, "bias");
    a.out = required_out<T>(out, rows, "out");
    GilReleased nogil;
    pybn::table().typed<T>().fold_bias(a);
  });
}

py::array philox(const py::array& counters, std::uint64_t key) {
  const i64 words = static_cast<i64>(counters.size());
  if (words % 4 != 0) fail("counters", "must hold 4 words per counter");
  const std::uint32_t* c = required<std::uint32_t>(counters, words, "counters");
  py::array_t<std::uint32_t> out(std::vector<py::ssize_t>{static_cast<py::ssize_t>(words / 4), 4});
  std::uint32_t* o = out.mutable_data();
  {
    GilReleased nogil;
    pybn::table().philox(c, words / 4, key, o);
  }
  return out;
}

double probe_read(const py::array& x) {
  const float* p = required<float>(x, static_cast<i64>(x.size()), "x");
  const i64 n = static_cast<i64>(x.size());
  GilReleased nogil;
  return pybn::table().probe_read(p, n);
}

void probe_stream(const py::array& src, const py::object& dst) {
  const i64 n = static_cast<i64>(src.size());
  const float* s = required<float>(src, n, "src");
  float* d = required_out<float>(dst, n, "dst");
  GilReleased nogil;
  pybn::table().probe_stream(s, d, n);
}

void trace_parallel_for(i64 n, i64 work, const py::object& rows, i64 throw_in, int slice_ms) {
  if (n < 0 || work < 0 || slice_ms < 0) fail("n", "n, work and slice_ms must be >= 0");
  i64* r = required_out<i64>(rows, 4 * n, "rows");
  GilReleased nogil;
  pybn::trace_parallel_for(n, work, r, throw_in, slice_ms);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pybn's compiled kernels (private: use the functions of the pybn package)";
  m.attr("__version__") = PYBN_VERSION;
  pybn::table();  // choose the ISA now, so a bad PYBN_ISA fails the import with its message
  // pybind11 looks NumPy's C API up on first use, releasing the GIL with its own guard
  // (GilReleased says why that guard must not be passed by a thread at exit): do it now,
  // not in the first kernel call, which may come from a daemon thread.
  py::dtype::of<float>();

  m.def("isa", [] { return std::string(pybn::table().isa); }, "Name of the active kernel path.");
  m.def("supported_isas", &pybn::supported_isas, "Kernel paths this CPU can run, lowest first.");
  m.def("use_isa", &pybn::use_isa, py::arg("name"), "Switch the active kernel path (for tests).");
  m.def("get_num_threads", &pybn::num_threads);
  m.def("set_num_threads", &pybn::set_num_threads, py::arg("n"));
  m.attr("MAX_THREADS") = pybn::kMaxThreads;
  m.def("pool_threads", &pybn::pool_threads, "Threads the pool has started, the calling thread included.");
  m.def("_trace_parallel_for", &trace_parallel_for, py::arg("n"), py::arg("work"), py::arg("rows"),
        py::arg("throw_in") = -1, py::arg("slice_ms") = 0,
        "For tests: how parallel_for splits [0, n) over threads (parallel.h, trace_parallel_for).");

  m.def("bn_train", &bn_train, py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("bias"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("save_mean"), py::arg("save_invstd"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"), py::arg("momentum"), py::arg("eps"),
        py::arg("relu"));
  m.def("bn_infer", &bn_infer, py::arg("x"), py::arg("y"), py::arg("mean"), py::arg("var"), py::arg("weight"),
        py::arg("bias"), py::arg("outer"), py::arg("channels"), py::arg("inner"), py::arg("eps"), py::arg("relu"),
        py::arg("invstd") = py::none());
  m.def("bn_backward", &bn_backward, py::arg("dy"), py::arg("x"), py::arg("y"), py::arg("mean"),
        py::arg("invstd"), py::arg("weight"), py::arg("dx"), py::arg("dweight"), py::arg("dbias"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"), py::arg("training"));
  m.def("bn_moments", &bn_moments, py::arg("x"), py::arg("mean"), py::arg("m2"), py::arg("outer"),
        py::arg("channels"), py::arg("inner"));
  m.def("bn_backward_phase", &bn_backward_phase, py::arg("apply"), py::arg("dy"), py::arg("x"), py::arg("y"),
        py::arg("mean"), py::arg("invstd"), py::arg("weight"), py::arg("sum_dy"), py::arg("sum_dy_xhat"),
        py::arg("count"), py::arg("dx"), py::arg("outer"), py::arg("channels"), py::arg("inner"));
  m.def("dropout", &dropout, py::arg("x"), py::arg("y"), py::arg("seed"), py::arg("offset"), py::arg("threshold"),
        py::arg("scale"));
  m.def("dropout_mask", &dropout_mask, py::arg("mask"), py::arg("n"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"));
  m.def("dropout_apply", &dropout_apply, py::arg("x"), py::arg("mask"), py::arg("y"), py::arg("scale"),
        py::arg("broadcast") = py::none());
  m.def("fold_scale", &fold_scale, py::arg("weight"), py::arg("scale"), py::arg("out"), py::arg("groups"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"));
  m.def("fold_bias", &fold_bias, py::arg("weight"), py::arg("shift"), py::arg("bias"), py::arg("out"),
        py::arg("rows"), py::arg("cols"));
  m.def("philox", &philox, py::arg("counters"), py::arg("key"),
        "Philox4x32-10 of (n, 4) uint32 counters under a 64-bit key, on the active path.");
  m.def("probe_read", &probe_read, py::arg("x"), "Bandwidth probe: one vectorized pass that reads x (float32).");
  m.def("probe_stream", &probe_stream, py::arg("src"), py::arg("dst"),
        "Bandwidth probe: copy src into dst with non-temporal stores (float32).");
}
