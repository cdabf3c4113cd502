// Bindings of the batch-norm kernels: training and inference forwards, the split phases,
// the backwards, the running statistics, and the merge of per-worker statistics.
#include "kernel_sets.h"
#include "plain_calls.h"

namespace pybn::bindings {
namespace {

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

// The statistics of several workers merged (Chan's formula), for SyncBatchNorm.
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

// --------------------------------------------------------------------------- common calls whole
// The *_plain bindings (plain_calls.h): the arguments of batch_norm_infer / _train /
// _backward as Python passes them, run at once when every one is in its common form, else
// None. Anything they take, the checks would have passed through unchanged; their bindings
// above check each array again.

NdArray nd(py::handle h) { return NdArray(py::reinterpret_borrow<py::object>(h)); }
OptionalNdArray optional_nd(py::handle h) { return OptionalNdArray(py::reinterpret_borrow<py::object>(h)); }

template <class K>
OptionalNdArray bn_infer_plain(py::handle x, py::handle mean, py::handle var, py::handle weight, py::handle bias,
                               py::handle eps_obj, py::handle axis, py::handle relu_obj, py::handle out) {
  const OptionalNdArray declined{py::none()};
  plain::Channels c;
  double eps = 0;
  bool relu = false;
  if (!plain::channels_of(x, axis, c) || !plain::output(out, c.x) || !plain::per_channel(mean, c, false) ||
      !plain::per_channel(var, c, false) || !plain::per_channel(weight, c, true) ||
      !plain::per_channel(bias, c, true) || !plain::apart({out, x, mean, var, weight, bias}, 1) ||
      !plain::real(eps_obj, true, eps) || !plain::flag(relu_obj, relu))
    return declined;
  py::array y = plain::output_array(out, c.x);
  bn_infer<K>(nd(c.x), nd(y), nd(mean), nd(var), optional_nd(weight), optional_nd(bias), c.outer, c.channels,
              c.inner, eps, relu, declined);
  return OptionalNdArray(std::move(y));
}

template <class K>
OptionalArrays bn_train_plain(py::handle x, py::handle weight, py::handle bias, py::handle running_mean,
                              py::handle running_var, py::handle momentum_obj, py::handle eps_obj, py::handle axis,
                              py::handle relu_obj, py::handle out) {
  const OptionalArrays declined{py::none()};
  plain::Channels c;
  double momentum = 0, eps = 0;
  bool relu = false;
  if (!plain::channels_of(x, axis, c) || c.outer * c.inner < 2 || !plain::output(out, c.x) ||
      !plain::per_channel(weight, c, true) ||
      !plain::per_channel(bias, c, true) || running_mean.is_none() != running_var.is_none() ||
      !plain::per_channel(running_mean, c, true, true) || !plain::per_channel(running_var, c, true, true) ||
      !plain::apart({out, running_mean, running_var, x, weight, bias}, 3) ||
      !plain::real(momentum_obj, false, momentum) || !plain::real(eps_obj, true, eps) ||
      !plain::flag(relu_obj, relu))
    return declined;
  py::array y = plain::output_array(out, c.x);
  py::array mean = plain::empty(c.x, c.channels), invstd = plain::empty(c.x, c.channels);
  bn_train<K>(nd(c.x), nd(y), optional_nd(weight), optional_nd(bias), optional_nd(running_mean),
              optional_nd(running_var), nd(mean), nd(invstd), c.outer, c.channels, c.inner, momentum, eps, relu,
              OptionalNdArray(py::none()));
  return OptionalArrays(py::make_tuple(y, mean, invstd));
}

template <class K>
OptionalArrays bn_backward_plain(py::handle dy, py::handle x, py::handle mean, py::handle invstd,
                                 py::handle weight, py::handle training_obj, py::handle axis, py::handle y,
                                 py::handle out) {
  const OptionalArrays declined{py::none()};
  plain::Channels c;
  bool training = false;
  if (!plain::channels_of(dy, axis, c) || !plain::output(out, c.x) || !plain::like(x, c.x, false) ||
      !plain::like(y, c.x, true) ||
      !plain::per_channel(mean, c, false) || !plain::per_channel(invstd, c, false) ||
      !plain::per_channel(weight, c, true) || !plain::apart({out, dy, x, y, mean, invstd, weight}, 1) ||
      !plain::flag(training_obj, training))
    return declined;
  py::array dx = plain::output_array(out, c.x);
  py::array dweight = plain::empty(c.x, c.channels), dbias = plain::empty(c.x, c.channels);
  bn_backward<K>(nd(dy), nd(x), optional_nd(y), nd(mean), nd(invstd), optional_nd(weight), nd(dx), nd(dweight),
                 nd(dbias), c.outer, c.channels, c.inner, training, OptionalNdArray(py::none()));
  return OptionalArrays(py::make_tuple(dx, dweight, dbias));
}

}  // namespace

template <class K>
void def_batch_norm(py::module_& m) {
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
}

template void def_batch_norm<ActiveKernels>(py::module_&);
template void def_batch_norm<FloatComputingInDouble>(py::module_&);

void def_plain_calls(py::module_& m) {
  using K = ActiveKernels;
  m.def("bn_infer_plain", &bn_infer_plain<K>, py::arg("x"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("axis"), py::arg("relu"), py::arg("out"));
  m.def("bn_train_plain", &bn_train_plain<K>, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("momentum"), py::arg("eps"), py::arg("axis"),
        py::arg("relu"), py::arg("out"));
  m.def("bn_backward_plain", &bn_backward_plain<K>, py::arg("dy"), py::arg("x"), py::arg("mean"),
        py::arg("invstd"), py::arg("weight"), py::arg("training"), py::arg("axis"), py::arg("y"), py::arg("out"));
}

void def_merge_stats(py::module_& m) {
  m.def("bn_merge_stats", &bn_merge_stats, py::arg("count"), py::arg("mean"), py::arg("m2"),
        py::arg("merged_mean"), py::arg("merged_m2"));
}

}  // namespace pybn::bindings
