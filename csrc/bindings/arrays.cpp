#include "arrays.h"

namespace pybn::bindings {

void fail(const char* name, const std::string& what) { throw py::value_error(std::string(name) + ": " + what); }

namespace {

// The NumPy dtypes of the 16-bit storage types: NumPy's float16, set when the module is
// imported, and ml_dtypes' bfloat16 (a dtype NumPy does not know by itself), looked up the
// first time an array could hold it: only after ml_dtypes was imported, which pybn never
// does for a check (it costs more than importing NumPy, docs/dtypes.md). Kept for the life
// of the process.
PyObject* float16_dtype = nullptr;
PyObject* bfloat16_dtype = nullptr;

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

}  // namespace

void find_float16_dtype() { float16_dtype = py::dtype("float16").release().ptr(); }

bool is_float16(const py::array& a) { return is_dtype(a, float16_dtype); }

bool is_bfloat16(const py::array& a) { return is_dtype(a, find_bfloat16_dtype()); }

i64 size_of(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(name) + ": expected a numpy.ndarray");
  return static_cast<i64>(py::reinterpret_borrow<py::array>(obj).size());
}

pybn::Layout make_layout(i64 outer, i64 channels, i64 inner) {
  if (outer < 0 || channels < 0 || inner < 0) throw py::value_error("layout: negative extent");
  pybn::Layout L;
  L.outer = outer;
  L.channels = channels;
  L.inner = inner;
  return L;
}

std::string dtype_names() {
  std::string s;
#define PYBN_DTYPE_NAME(S, name, T) s += (s.empty() ? "" : ", ") + std::string(#name);
  PYBN_DTYPES(PYBN_DTYPE_NAME)
#undef PYBN_DTYPE_NAME
  return s;
}

void unsupported_dtype(const py::handle& x, const char* name, const std::string& supported) {
  throw py::type_error(std::string(name) + ": dtype " + std::string(py::str(py::getattr(x, "dtype"))) +
                       " is not supported (" + supported + ")");
}

}  // namespace pybn::bindings
