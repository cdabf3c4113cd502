// pybn._C: thin bindings, one per kernel entry point of kernel_list.h (same name), plus the
// runtime (ISA, threads) and, in pybn._C.diagnostics, the entry points for tests and
// benchmarks. The Python layer (src/pybn/*.py) validates user input and chooses layouts;
// here each array is checked once more against what the kernel will touch (dtype,
// C-contiguity, size, writability) so no call can reach a kernel with a bad pointer, then
// the GIL is released and the active ISA's table is called.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cxxabi.h>
#include <unistd.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "pybn/cache_sizes.h"
#include "pybn/dispatch.h"
#include "pybn/huge_pages.h"
#include "pybn/kernels.h"
#include "pybn/openmp_runtime.h"
#include "pybn/parallel.h"
#include "pybn/thread_pool.h"

namespace py = pybind11;
using pybn::BFloat16;  // the storage types of PYBN_DTYPES, as the list names them
using pybn::Float16;
using pybn::Layout;
using i64 = std::int64_t;

namespace {

// Array arguments: any object (checked below, so that a wrong one gets a message naming
// it), shown as numpy.ndarray (or None) in the signatures tests/stubgen.py reads.
class NdArray : public py::object {
 public:
  PYBIND11_OBJECT_DEFAULT(NdArray, object, PyObject_Type)
};
class OptionalNdArray : public py::object {
 public:
  PYBIND11_OBJECT_DEFAULT(OptionalNdArray, object, PyObject_Type)
};

}  // namespace

namespace pybind11 {
namespace detail {
template <>
struct handle_type_name<NdArray> {
  static constexpr auto name = const_name("numpy.ndarray");
};
template <>
struct handle_type_name<OptionalNdArray> {
  static constexpr auto name = const_name("numpy.ndarray | None");
};
}  // namespace detail
}  // namespace pybind11

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

// The NumPy dtypes of the 16-bit storage types: NumPy's float16, set when the module is
// imported, and ml_dtypes' bfloat16 (a dtype NumPy does not know by itself), looked up the
// first time an array could hold it: only after ml_dtypes was imported, which pybn never
// does for a check (it costs more than importing NumPy, docs/dtypes.md). Kept for the life
// of the process.
PyObject* float16_dtype = nullptr;
PyObject* bfloat16_dtype = nullptr;

void find_float16_dtype() { float16_dtype = py::dtype("float16").release().ptr(); }

// ml_dtypes' bfloat16 if ml_dtypes has been imported (a bfloat16 array cannot exist before).
PyObject* find_bfloat16_dtype() {
  if (bfloat16_dtype) return bfloat16_dtype;
  PyObject* ml_dtypes = PyImport_GetModule(py::str("ml_dtypes").ptr());  // no import; null if absent
  if (!ml_dtypes) {
    PyErr_Clear();
    return nullptr;
  }
  const py::object module = py::reinterpret_steal<py::object>(ml_dtypes);
  if (module.is_none()) return nullptr;  // sys.modules["ml_dtypes"] = None: imports fail
  try {
    bfloat16_dtype = py::dtype::from_args(module.attr("bfloat16")).release().ptr();
  } catch (py::error_already_set&) {  // an ml_dtypes without bfloat16 (or still importing)
    return nullptr;
  }
  return bfloat16_dtype;
}

bool is_dtype(const py::array& a, PyObject* dtype) {
  return dtype && py::detail::npy_api::get().PyArray_EquivTypes_(a.dtype().ptr(), dtype);
}

// The array holds T: its dtype is equivalent to T's (compared by value: an unpickled array
// has an equal dtype that is another object).
template <class T>
bool is_of(const py::array& a) {
  if constexpr (std::is_same_v<T, pybn::Float16>)
    return is_dtype(a, float16_dtype);
  else if constexpr (std::is_same_v<T, pybn::BFloat16>)
    return is_dtype(a, find_bfloat16_dtype());
  else
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

// The number of elements of obj, an ndarray (else a TypeError naming it).
i64 size_of(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + ": expected a numpy.ndarray");
  return static_cast<i64>(py::reinterpret_borrow<py::array>(obj).size());
}

Layout make_layout(i64 outer, i64 channels, i64 inner) {
  if (outer < 0 || channels < 0 || inner < 0) throw py::value_error("layout: negative extent");
  Layout L;
  L.outer = outer;
  L.channels = channels;
  L.inner = inner;
  return L;
}

// "float32, float64": the dtypes of PYBN_DTYPES.
std::string dtype_names() {
  std::string s;
#define PYBN_DTYPE_NAME(S, name, T) s += (s.empty() ? "" : ", ") + std::string(#name);
  PYBN_DTYPES(PYBN_DTYPE_NAME)
#undef PYBN_DTYPE_NAME
  return s;
}

[[noreturn]] void unsupported_dtype(const py::handle& x, const char* name, const std::string& supported) {
  throw py::type_error(std::string(name) + ": dtype " + std::string(py::str(py::getattr(x, "dtype"))) +
                       " is not supported (" + supported + ")");
}

// Which kernels the typed bindings call: by_dtype(x, name, f) calls f(S{}) with S the
// storage type of x, and typed<S>() gives the entry points for S.
//
// The kernels of the active ISA, for every dtype of PYBN_DTYPES.
struct ActiveKernels {
  template <class F>
  static void by_dtype(const py::handle& x, const char* name, F&& f) {
    size_of(x, name);
    const auto a = py::reinterpret_borrow<py::array>(x);
#define PYBN_DTYPE_CASE(S, dtype, T) \
  if (is_of<S>(a)) return f(S{});
    PYBN_DTYPES(PYBN_DTYPE_CASE)
#undef PYBN_DTYPE_CASE
    unsupported_dtype(x, name, dtype_names());
  }
  template <class S>
  static const pybn::TypedKernels<S>& typed() {
    return pybn::table().typed<S>();
  }
};

// The active ISA's float32 kernels computing in double (DiagnosticTable).
struct FloatComputingInDouble {
  template <class F>
  static void by_dtype(const py::handle& x, const char* name, F&& f) {
    size_of(x, name);
    if (is_of<float>(py::reinterpret_borrow<py::array>(x))) return f(float{});
    unsupported_dtype(x, name, "float32");
  }
  template <class S>
  static const pybn::TypedKernels<float>& typed() {
    static_assert(std::is_same_v<S, float>);
    return pybn::diagnostics().float_computing_in_double;
  }
};

// ---------------------------------------------------------------------------------------
// The typed kernels' bindings, for the kernels K.

template <class K>
void bn_train(const NdArray& x, const NdArray& y, const OptionalNdArray& weight, const OptionalNdArray& bias,
              const OptionalNdArray& running_mean, const OptionalNdArray& running_var, const NdArray& save_mean,
              const NdArray& save_invstd, i64 outer, i64 channels, i64 inner, double momentum, double eps,
              bool relu, const OptionalNdArray& residual) {
  const Layout L = make_layout(outer, channels, inner);
  K::by_dtype(x, "x", [&](auto zero) {
    using S = decltype(zero);
    pybn::BnTrainArgs<S> a;
    a.layout = L;
    a.x = required<S>(x, L.numel(), "x");
    a.y = required_out<S>(y, L.numel(), "out");
    using P = pybn::param_t<S>;
    a.weight = in<P>(weight, channels, "weight");
    a.bias = in<P>(bias, channels, "bias");
    a.running_mean = inout<P>(running_mean, channels, "running_mean");
    a.running_var = inout<P>(running_var, channels, "running_var");
    a.save_mean = required_out<P>(save_mean, channels, "mean");
    a.save_invstd = required_out<P>(save_invstd, channels, "invstd");
    a.momentum = momentum;
    a.eps = eps;
    a.relu = relu;
    a.residual = in<S>(residual, L.numel(), "residual");
    if (L.per_channel() < 2) fail("x", "training needs more than 1 value per channel");
    GilReleased nogil;
    K::template typed<S>().bn_train(a);
  });
}

template <class K>
void bn_infer(const NdArray& x, const NdArray& y, const NdArray& mean, const NdArray& var,
              const OptionalNdArray& weight, const OptionalNdArray& bias, i64 outer, i64 channels, i64 inner,
              double eps, bool relu, const OptionalNdArray& residual) {
  const Layout L = make_layout(outer, channels, inner);
  K::by_dtype(x, "x", [&](auto zero) {
    using S = decltype(zero);
    pybn::BnInferArgs<S> a;
    a.layout = L;
    a.x = required<S>(x, L.numel(), "x");
    a.y = required_out<S>(y, L.numel(), "out");
    using P = pybn::param_t<S>;
    a.mean = required<P>(mean, channels, "running_mean");
    a.var = required<P>(var, channels, "running_var");
    a.weight = in<P>(weight, channels, "weight");
    a.bias = in<P>(bias, channels, "bias");
    a.eps = eps;
    a.relu = relu;
    a.residual = in<S>(residual, L.numel(), "residual");
    GilReleased nogil;
    K::template typed<S>().bn_infer(a);
  });
}

template <class K>
void bn_apply(const NdArray& x, const NdArray& y, const NdArray& mean, const NdArray& invstd,
              const OptionalNdArray& weight, const OptionalNdArray& bias, i64 outer, i64 channels, i64 inner,
              bool relu, const OptionalNdArray& residual) {
  const Layout L = make_layout(outer, channels, inner);
  K::by_dtype(x, "x", [&](auto zero) {
    using S = decltype(zero);
    pybn::BnApplyArgs<S> a;
    a.layout = L;
    a.x = required<S>(x, L.numel(), "x");
    a.y = required_out<S>(y, L.numel(), "out");
    using P = pybn::param_t<S>;
    a.mean = required<P>(mean, channels, "mean");
    a.invstd = required<double>(invstd, channels, "invstd");
    a.weight = in<P>(weight, channels, "weight");
    a.bias = in<P>(bias, channels, "bias");
    a.relu = relu;
    a.residual = in<S>(residual, L.numel(), "residual");
    GilReleased nogil;
    K::template typed<S>().bn_apply(a);
  });
}

template <class K>
void bn_moments(const NdArray& x, const NdArray& mean, const NdArray& m2, i64 outer, i64 channels, i64 inner) {
  const Layout L = make_layout(outer, channels, inner);
  K::by_dtype(x, "x", [&](auto zero) {
    using S = decltype(zero);
    pybn::BnMomentsArgs<S> a;
    a.layout = L;
    a.x = required<S>(x, L.numel(), "x");
    a.mean = required_out<double>(mean, channels, "mean");
    a.m2 = required_out<double>(m2, channels, "m2");
    GilReleased nogil;
    K::template typed<S>().bn_moments(a);
  });
}

// The arrays every backward reads: dy, x (and y) of the layout's size, mean and invstd per channel.
template <class S>
void set_grad_inputs(pybn::BnGradInputs<S>& a, const Layout& L, const NdArray& dy, const NdArray& x,
                     const OptionalNdArray& y, const NdArray& mean, const NdArray& invstd) {
  a.layout = L;
  a.dy = required<S>(dy, L.numel(), "dy");
  a.x = required<S>(x, L.numel(), "x");
  a.y = in<S>(y, L.numel(), "y");
  a.mean = required<pybn::param_t<S>>(mean, L.channels, "mean");
  a.invstd = required<pybn::param_t<S>>(invstd, L.channels, "invstd");
}

template <class K>
void bn_backward(const NdArray& dy, const NdArray& x, const OptionalNdArray& y, const NdArray& mean,
                 const NdArray& invstd, const OptionalNdArray& weight, const NdArray& dx, const NdArray& dweight,
                 const NdArray& dbias, i64 outer, i64 channels, i64 inner, bool training,
                 const OptionalNdArray& d_residual) {
  const Layout L = make_layout(outer, channels, inner);
  K::by_dtype(dy, "dy", [&](auto zero) {
    using S = decltype(zero);
    pybn::BnBackwardArgs<S> a;
    set_grad_inputs(a, L, dy, x, y, mean, invstd);
    using P = pybn::param_t<S>;
    a.weight = in<P>(weight, channels, "weight");
    a.dx = required_out<S>(dx, L.numel(), "out");
    a.dweight = required_out<P>(dweight, channels, "dweight");
    a.dbias = required_out<P>(dbias, channels, "dbias");
    a.training = training;
    a.d_residual = inout<S>(d_residual, L.numel(), "d_residual");
    GilReleased nogil;
    K::template typed<S>().bn_backward(a);
  });
}

template <class K>
void bn_backward_reduce(const NdArray& dy, const NdArray& x, const OptionalNdArray& y, const NdArray& mean,
                        const NdArray& invstd, const NdArray& sum_dy, const NdArray& sum_dy_xhat, i64 outer,
                        i64 channels, i64 inner) {
  const Layout L = make_layout(outer, channels, inner);
  K::by_dtype(dy, "dy", [&](auto zero) {
    using S = decltype(zero);
    pybn::BnGradReduceArgs<S> a;
    set_grad_inputs(a, L, dy, x, y, mean, invstd);
    a.sum_g = required_out<double>(sum_dy, channels, "sum_dy");
    a.sum_gxhat = required_out<double>(sum_dy_xhat, channels, "sum_dy_xhat");
    GilReleased nogil;
    K::template typed<S>().bn_backward_reduce(a);
  });
}

template <class K>
void bn_backward_apply(const NdArray& dy, const NdArray& x, const OptionalNdArray& y, const NdArray& mean,
                       const NdArray& invstd, const OptionalNdArray& weight, const NdArray& sum_dy,
                       const NdArray& sum_dy_xhat, double count, const NdArray& dx, i64 outer, i64 channels,
                       i64 inner, const OptionalNdArray& d_residual) {
  const Layout L = make_layout(outer, channels, inner);
  if (!(count > 0)) fail("count", "must be > 0");
  K::by_dtype(dy, "dy", [&](auto zero) {
    using S = decltype(zero);
    pybn::BnGradApplyArgs<S> a;
    set_grad_inputs(a, L, dy, x, y, mean, invstd);
    a.weight = in<pybn::param_t<S>>(weight, channels, "weight");
    a.sum_g = required<double>(sum_dy, channels, "sum_dy");
    a.sum_gxhat = required<double>(sum_dy_xhat, channels, "sum_dy_xhat");
    a.count = count;
    a.dx = required_out<S>(dx, L.numel(), "out");
    a.d_residual = inout<S>(d_residual, L.numel(), "d_residual");
    GilReleased nogil;
    K::template typed<S>().bn_backward_apply(a);
  });
}

template <class K>
void bn_update_running_stats(const OptionalNdArray& running_mean, const OptionalNdArray& running_var,
                             const NdArray& mean, const NdArray& m2, double count, double momentum) {
  const i64 channels = size_of(mean, "mean");
  if (!(count > 1)) fail("count", "must be > 1 (the variance is unbiased)");
  K::by_dtype(running_mean.is_none() ? running_var : running_mean, "running_mean", [&](auto zero) {
    using S = decltype(zero);
    pybn::BnRunningStatsArgs<S> a;
    a.channels = channels;
    a.running_mean = inout<pybn::param_t<S>>(running_mean, channels, "running_mean");
    a.running_var = inout<pybn::param_t<S>>(running_var, channels, "running_var");
    a.mean = required<double>(mean, channels, "mean");
    a.m2 = required<double>(m2, channels, "m2");
    a.count = count;
    a.momentum = momentum;
    GilReleased nogil;
    K::template typed<S>().bn_update_running_stats(a);
  });
}

template <class K>
void dropout(const NdArray& x, const NdArray& y, std::uint64_t seed, std::uint64_t offset, std::uint32_t threshold,
             double scale) {
  if (threshold > 0xFFFFu) throw py::value_error("threshold: must be < 65536 (p == 1 gives zeros without a mask)");
  K::by_dtype(x, "x", [&](auto zero) {
    using S = decltype(zero);
    pybn::DropoutArgs<S> a;
    a.n = size_of(x, "x");
    a.x = required<S>(x, a.n, "x");
    a.y = required_out<S>(y, a.n, "out");
    a.seed = seed;
    a.offset = offset;
    a.threshold = static_cast<std::uint16_t>(threshold);
    a.scale = scale;
    GilReleased nogil;
    K::template typed<S>().dropout(a);
  });
}

// y = x * scale where the packed mask's bit is set, 0 elsewhere; one bit per element.
template <class K>
void dropout_apply(const NdArray& x, const NdArray& mask, const NdArray& y, double scale) {
  K::by_dtype(x, "x", [&](auto zero) {
    using S = decltype(zero);
    pybn::DropoutApplyArgs<S> a;
    a.n = size_of(x, "x");
    a.x = required<S>(x, a.n, "x");
    a.mask = required<unsigned char>(mask, (a.n + 7) / 8, "mask");
    a.y = required_out<S>(y, a.n, "out");
    a.scale = scale;
    GilReleased nogil;
    K::template typed<S>().dropout_apply(a);
  });
}

// As dropout_apply, with a mask over a noise shape that broadcasts: x seen as (f0, b1, f2,
// b3), the mask as (f0, f2) (kernels.h, BroadcastShape).
template <class K>
void dropout_apply_broadcast(const NdArray& x, const NdArray& mask, const NdArray& y, double scale, i64 f0, i64 b1,
                             i64 f2, i64 b3) {
  if (f0 < 0 || b1 < 0 || f2 < 0 || b3 < 0) fail("broadcast", "sizes must be >= 0");
  K::by_dtype(x, "x", [&](auto zero) {
    using S = decltype(zero);
    pybn::DropoutApplyArgs<S> a;
    a.broadcast = {f0, b1, f2, b3};
    a.n = f0 * b1 * f2 * b3;
    a.x = required<S>(x, a.n, "x");
    a.mask = required<unsigned char>(mask, (f0 * f2 + 7) / 8, "mask");
    a.y = required_out<S>(y, a.n, "out");
    a.scale = scale;
    GilReleased nogil;
    K::template typed<S>().dropout_apply_broadcast(a);
  });
}

// y = keep ? x * a + b : b - c on dropout's keep bits (kernels.h, AlphaDropoutArgs).
template <class K>
void alpha_dropout(const NdArray& x, const NdArray& y, std::uint64_t seed, std::uint64_t offset,
                   std::uint32_t threshold, double a, double b, double c) {
  if (threshold > 0xFFFFu) throw py::value_error("threshold: must be < 65536");
  K::by_dtype(x, "x", [&](auto zero) {
    using S = decltype(zero);
    pybn::AlphaDropoutArgs<S> args;
    args.n = size_of(x, "x");
    args.x = required<S>(x, args.n, "x");
    args.y = required_out<S>(y, args.n, "out");
    args.seed = seed;
    args.offset = offset;
    args.threshold = static_cast<std::uint16_t>(threshold);
    args.a = a, args.b = b, args.c = c;
    GilReleased nogil;
    K::template typed<S>().alpha_dropout(args);
  });
}

// y = x * (1 + sigma * z) (multiply) or x + sigma * z on the normal stream.
template <class K>
void gaussian_noise(const NdArray& x, const NdArray& y, std::uint64_t seed, std::uint64_t offset, double sigma,
                    bool multiply) {
  K::by_dtype(x, "x", [&](auto zero) {
    using S = decltype(zero);
    pybn::GaussianNoiseArgs<S> a;
    a.n = size_of(x, "x");
    a.x = required<S>(x, a.n, "x");
    a.y = required_out<S>(y, a.n, "out");
    a.seed = seed;
    a.offset = offset;
    a.sigma = sigma;
    a.multiply = multiply;
    GilReleased nogil;
    K::template typed<S>().gaussian_noise(a);
  });
}

template <class K>
void fold_scale(const NdArray& w, const NdArray& scale, const NdArray& y, i64 groups, i64 outer, i64 channels,
                i64 inner) {
  if (groups < 0 || outer < 0 || channels < 0 || inner < 0) fail("weight", "negative dimension");
  K::by_dtype(w, "weight", [&](auto zero) {
    using S = decltype(zero);
    pybn::FoldScaleArgs<S> a;
    const i64 n = groups * outer * channels * inner;
    a.groups = groups, a.outer = outer, a.channels = channels, a.inner = inner;
    a.w = required<S>(w, n, "weight");
    a.y = required_out<S>(y, n, "out");
    a.scale = required<double>(scale, groups * channels, "scale");
    GilReleased nogil;
    K::template typed<S>().fold_scale(a);
  });
}

template <class K>
void fold_bias(const NdArray& w, const NdArray& shift, const NdArray& bias, const NdArray& out, i64 rows, i64 cols) {
  if (rows < 0 || cols < 0) fail("weight", "negative dimension");
  K::by_dtype(w, "weight", [&](auto zero) {
    using S = decltype(zero);
    pybn::FoldBiasArgs<S> a;
    a.rows = rows, a.cols = cols;
    a.w = required<S>(w, rows * cols, "weight");
    a.shift = required<double>(shift, cols, "shift");
    a.bias = required<double>(bias, rows, "bias");
    a.out = required_out<S>(out, rows, "out");
    GilReleased nogil;
    K::template typed<S>().fold_bias(a);
  });
}

// Every typed binding, calling the kernels K.
template <class K>
void def_typed_kernels(py::module_& m) {
  m.def("bn_train", &bn_train<K>, py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("bias"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("save_mean"), py::arg("save_invstd"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"), py::arg("momentum"), py::arg("eps"),
        py::arg("relu"), py::arg("residual") = py::none());
  m.def("bn_infer", &bn_infer<K>, py::arg("x"), py::arg("y"), py::arg("mean"), py::arg("var"), py::arg("weight"),
        py::arg("bias"), py::arg("outer"), py::arg("channels"), py::arg("inner"), py::arg("eps"), py::arg("relu"),
        py::arg("residual") = py::none());
  m.def("bn_apply", &bn_apply<K>, py::arg("x"), py::arg("y"), py::arg("mean"), py::arg("invstd"),
        py::arg("weight"), py::arg("bias"), py::arg("outer"), py::arg("channels"), py::arg("inner"),
        py::arg("relu"), py::arg("residual") = py::none());
  m.def("bn_moments", &bn_moments<K>, py::arg("x"), py::arg("mean"), py::arg("m2"), py::arg("outer"),
        py::arg("channels"), py::arg("inner"));
  m.def("bn_backward", &bn_backward<K>, py::arg("dy"), py::arg("x"), py::arg("y"), py::arg("mean"),
        py::arg("invstd"), py::arg("weight"), py::arg("dx"), py::arg("dweight"), py::arg("dbias"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"), py::arg("training"),
        py::arg("d_residual") = py::none());
  m.def("bn_backward_reduce", &bn_backward_reduce<K>, py::arg("dy"), py::arg("x"), py::arg("y"), py::arg("mean"),
        py::arg("invstd"), py::arg("sum_dy"), py::arg("sum_dy_xhat"), py::arg("outer"), py::arg("channels"),
        py::arg("inner"));
  m.def("bn_backward_apply", &bn_backward_apply<K>, py::arg("dy"), py::arg("x"), py::arg("y"), py::arg("mean"),
        py::arg("invstd"), py::arg("weight"), py::arg("sum_dy"), py::arg("sum_dy_xhat"), py::arg("count"),
        py::arg("dx"), py::arg("outer"), py::arg("channels"), py::arg("inner"), py::arg("d_residual") = py::none());
  m.def("bn_update_running_stats", &bn_update_running_stats<K>, py::arg("running_mean"), py::arg("running_var"),
        py::arg("mean"), py::arg("m2"), py::arg("count"), py::arg("momentum"));
  m.def("dropout", &dropout<K>, py::arg("x"), py::arg("y"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"), py::arg("scale"));
  m.def("dropout_apply", &dropout_apply<K>, py::arg("x"), py::arg("mask"), py::arg("y"), py::arg("scale"));
  m.def("dropout_apply_broadcast", &dropout_apply_broadcast<K>, py::arg("x"), py::arg("mask"), py::arg("y"),
        py::arg("scale"), py::arg("f0"), py::arg("b1"), py::arg("f2"), py::arg("b3"));
  m.def("alpha_dropout", &alpha_dropout<K>, py::arg("x"), py::arg("y"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"), py::arg("a"), py::arg("b"), py::arg("c"));
  m.def("gaussian_noise", &gaussian_noise<K>, py::arg("x"), py::arg("y"), py::arg("seed"), py::arg("offset"),
        py::arg("sigma"), py::arg("multiply"));
  m.def("fold_scale", &fold_scale<K>, py::arg("weight"), py::arg("scale"), py::arg("out"), py::arg("groups"),
        py::arg("outer"), py::arg("channels"), py::arg("inner"));
  m.def("fold_bias", &fold_bias<K>, py::arg("weight"), py::arg("shift"), py::arg("bias"), py::arg("out"),
        py::arg("rows"), py::arg("cols"));
}

// ---------------------------------------------------------------------------------------
// The untyped kernels' bindings.

void bn_merge_stats(const NdArray& count, const NdArray& mean, const NdArray& m2, const NdArray& merged_mean,
                    const NdArray& merged_m2) {
  size_of(mean, "mean");
  const auto means = py::reinterpret_borrow<py::array>(mean);
  if (means.ndim() != 2) fail("mean", "expected a (workers, channels) array");
  const i64 workers = static_cast<i64>(means.shape(0)), channels = static_cast<i64>(means.shape(1));
  pybn::BnMergeArgs a;
  a.workers = workers;
  a.channels = channels;
  a.count = required<double>(count, workers * channels, "count");
  a.mean = required<double>(mean, workers * channels, "mean");
  a.m2 = required<double>(m2, workers * channels, "m2");
  a.merged_mean = required_out<double>(merged_mean, channels, "merged_mean");
  a.merged_m2 = required_out<double>(merged_m2, channels, "merged_m2");
  GilReleased nogil;
  pybn::table().bn_merge_stats(a);
}

void dropout_mask(const NdArray& mask, i64 n, std::uint64_t seed, std::uint64_t offset, std::uint32_t threshold) {
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

// DropBlock's keep mask from its packed seed mask (0 bits are seeds); returns the count kept.
i64 drop_block_mask(const NdArray& seeds, const NdArray& keep, i64 planes, i64 rows, i64 cols, i64 block_rows,
                    i64 block_cols) {
  if (planes < 0 || rows < 0 || cols < 0) fail("planes", "sizes must be >= 0");
  if (block_rows < 1 || block_rows > std::max<i64>(rows, 1) || block_cols < 1 || block_cols > std::max<i64>(cols, 1))
    fail("block_rows", "the block must be at least 1 and at most the plane in each dimension");
  pybn::DropBlockMaskArgs a;
  const i64 n = planes * rows * cols;
  a.seeds = required<unsigned char>(seeds, (n + 7) / 8, "seeds");
  a.keep = required_out<unsigned char>(keep, (n + 7) / 8, "keep");
  a.planes = planes;
  a.rows = rows;
  a.cols = cols;
  a.block_rows = block_rows;
  a.block_cols = block_cols;
  i64 kept = 0;
  a.kept = &kept;
  {
    GilReleased nogil;
    pybn::table().drop_block_mask(a);
  }
  return kept;
}

// ---------------------------------------------------------------------------------------
// Diagnostics.

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
  d.def("openmp_runtime", []() -> std::optional<std::string> {
    const pybn::OpenMpRuntime* omp = pybn::openmp_for_regions();
    if (omp == nullptr) return std::nullopt;
    return std::string(omp->path);
  }, "Path of the GNU OpenMP runtime parallel regions run on now, or None for pybn's own pool.");
  auto wide = d.def_submodule("float_computing_in_double",
                              "The typed kernels for float32 arrays, computing in double (DiagnosticTable).");
  def_typed_kernels<FloatComputingInDouble>(wide);
}

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
  m.def("cache_sizes", [] { return std::make_pair(pybn::cache_sizes().l2_bytes, pybn::cache_sizes().l3_bytes); },
        "(L2 bytes per core, shared L3 bytes) as the channel-blocked kernels size their blocks to them.");
  m.def("advise_huge_pages", [](const NdArray& obj) -> bool {
    if (!py::isinstance<py::array>(obj)) throw py::type_error("a: expected a numpy.ndarray");
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (!(a.flags() & py::array::c_style)) fail("a", "must be C-contiguous");
    if (!a.writeable()) fail("a", "is read-only");
    return pybn::advise_huge_pages(a.mutable_data(), static_cast<std::size_t>(a.nbytes()));
  }, py::arg("a"), "Advise a's memory for transparent huge pages (before its first write); whether it was taken.");

  def_typed_kernels<ActiveKernels>(m);
  m.def("bn_merge_stats", &bn_merge_stats, py::arg("count"), py::arg("mean"), py::arg("m2"),
        py::arg("merged_mean"), py::arg("merged_m2"));
  m.def("dropout_mask", &dropout_mask, py::arg("mask"), py::arg("n"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"));
  m.def("drop_block_mask", &drop_block_mask, py::arg("seeds"), py::arg("keep"), py::arg("planes"), py::arg("rows"),
        py::arg("cols"), py::arg("block_rows"), py::arg("block_cols"));
  def_diagnostics(m);
}
