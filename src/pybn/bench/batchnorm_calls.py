"""The batch-norm calls being timed: pybn's and its peers' (torch, NumPy, onnxruntime).

One function per implementation and kernel, each returning a :class:`Runner` for one case:
``call`` is the timed thunk (everything a user's call does, nothing more), ``reset`` restores
the state a call updates (running statistics) and ``outputs`` turns what ``call`` returned
into NumPy arrays in the case's layout for the check. :mod:`.table` says which function is
which kernel's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .reference import EPS, MOMENTUM, Case
from .schema import Unavailable

Arrays = dict[str, Any]


@dataclass
class Runner:
    call: Callable[[], Any]
    outputs: Callable[[Any], Arrays]
    reset: Callable[[], None] = lambda: None
    state: Callable[[], Arrays] | None = None   # running statistics after a call, as NumPy arrays
    label: str = ""                 # the exact call, for the JSON and README
    keep: list[Any] = field(default_factory=list)  # objects that must outlive the runner's calls


def _out_suffix(out: bool) -> str:
    return ", out=y" if out else ""


def _running_copies(case: Case) -> tuple[np.ndarray, np.ndarray, Callable[[], None]]:
    """Copies of the initial running statistics, and the reset that restores them."""
    rm, rv = case.running_mean.copy(), case.running_var.copy()

    def reset() -> None:
        rm[:] = case.running_mean
        rv[:] = case.running_var

    return rm, rv, reset


# ----------------------------------------------------------------------------- pybn
# pybn is timed with preallocated outputs on the shapes that ask for them (shape.out).

def pybn_infer(case: Case, threads: int) -> Runner:
    import pybn

    x, w, b, axis = case.x, case.weight, case.bias, case.axis
    rm, rv = case.running_mean, case.running_var
    y = np.empty_like(x) if case.shape.out else None

    def call() -> Any:
        return pybn.batch_norm_infer(x, rm, rv, w, b, eps=EPS, axis=axis, out=y)

    return Runner(call, lambda r: {"y": r},
                  label="pybn.batch_norm_infer(x, running_mean, running_var, w, b, eps, axis"
                        f"{_out_suffix(case.shape.out)})")


def pybn_train(case: Case, threads: int) -> Runner:
    import pybn

    x, w, b, axis = case.x, case.weight, case.bias, case.axis
    rm, rv, reset = _running_copies(case)
    y = np.empty_like(x) if case.shape.out else None

    def call() -> Any:
        return pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv,
                                     momentum=MOMENTUM, eps=EPS, axis=axis, out=y)

    return Runner(call, lambda r: {"y": r[0], "mean": r[1], "invstd": r[2]},
                  reset=reset, state=lambda: {"running_mean": rm, "running_var": rv},
                  label="pybn.batch_norm_train(x, w, b, running_mean=, running_var=, momentum, eps, axis"
                        f"{_out_suffix(case.shape.out)})")


def pybn_backward(case: Case, threads: int) -> Runner:
    import pybn

    x, w, axis = case.x, case.weight, case.axis
    dy, mean, invstd = case.dy, case.save_mean, case.save_invstd
    assert dy is not None
    y = np.empty_like(x) if case.shape.out else None

    def call() -> Any:
        return pybn.batch_norm_backward(dy, x, mean, invstd, w, training=True, axis=axis, out=y)

    return Runner(call, lambda r: {"dx": r[0], "dweight": r[1], "dbias": r[2]},
                  label="pybn.batch_norm_backward(dy, x, mean, invstd, w, training=True, axis"
                        f"{_out_suffix(case.shape.out)})")


# ----------------------------------------------------------------------------- torch
# torch is timed twice on the shapes with preallocated outputs: its plain call and its
# out= call (the table's torch_out variant); the faster is reported.

def torch_tensor(torch: Any, a: np.ndarray) -> Any:
    """The tensor over the NumPy buffer (no copy); ml_dtypes' bfloat16, which torch.from_numpy
    refuses, through int16."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def torch_array(t: Any) -> np.ndarray:
    """The NumPy array over a CPU tensor (no copy); a bfloat16 one as ml_dtypes'
    bfloat16, as pybn.torch views them."""
    from pybn.torch._layout import numpy_view  # (imports torch)

    return numpy_view(t.detach())


def _torch_view(torch: Any, a: np.ndarray, channels_last: bool) -> Any:
    """NCHW-logical tensor over the NumPy buffer (no copy); channels-last memory format for NHWC data."""
    t = torch_tensor(torch, a)
    if channels_last:
        t = t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))
    return t


def _torch_np(t: Any, channels_last: bool) -> np.ndarray:
    """A torch result back in the case's NumPy layout."""
    if channels_last:
        t = t.permute(0, *range(2, t.dim()), 1)
    return torch_array(t)


@dataclass
class _TorchArgs:
    """The case's arrays as tensors (no copies), and preallocated outputs for the out= calls."""

    torch: Any
    cl: bool
    x: Any
    w: Any
    b: Any
    y_np: np.ndarray | None = None
    y: Any = None
    save_mean: Any = None
    save_invstd: Any = None

    @classmethod
    def of(cls, case: Case, out: bool) -> _TorchArgs:
        import torch

        cl = case.shape.channels_last
        args = cls(torch, cl, _torch_view(torch, case.x, cl), torch.from_numpy(case.weight),
                   torch.from_numpy(case.bias))
        if out:
            args.y_np = np.empty_like(case.x)
            args.y = _torch_view(torch, args.y_np, cl)
            args.save_mean, args.save_invstd = torch.empty(case.C), torch.empty(case.C)
        return args


def torch_infer(case: Case, threads: int, *, out: bool) -> Runner:
    import torch.nn.functional as F

    t = _TorchArgs.of(case, out)
    x, w, b = t.x, t.w, t.b
    rm, rv = t.torch.from_numpy(case.running_mean), t.torch.from_numpy(case.running_var)
    if out:
        op, y, sm, si, y_np = t.torch.ops.aten.native_batch_norm.out, t.y, t.save_mean, t.save_invstd, t.y_np

        def call() -> Any:
            return op(x, w, b, rm, rv, False, MOMENTUM, EPS, out=y, save_mean=sm, save_invstd=si)

        return Runner(call, lambda r: {"y": y_np}, keep=[x],
                      label="torch.ops.aten.native_batch_norm.out(x, w, b, running_mean, running_var, "
                            "training=False, momentum, eps, out=y, save_mean=, save_invstd=)")

    def plain() -> Any:
        return F.batch_norm(x, rm, rv, w, b, training=False, momentum=MOMENTUM, eps=EPS)

    return Runner(plain, lambda r: {"y": _torch_np(r, t.cl)}, keep=[x],
                  label="torch.nn.functional.batch_norm(x, running_mean, running_var, w, b, training=False, "
                        "momentum, eps)")


def torch_train(case: Case, threads: int, *, out: bool) -> Runner:
    t = _TorchArgs.of(case, out)
    x, w, b = t.x, t.w, t.b
    rm_np, rv_np, reset = _running_copies(case)
    rm, rv = t.torch.from_numpy(rm_np), t.torch.from_numpy(rv_np)

    def state() -> Arrays:
        return {"running_mean": rm_np, "running_var": rv_np}

    if out:
        op, y, sm, si, y_np = t.torch.ops.aten.native_batch_norm.out, t.y, t.save_mean, t.save_invstd, t.y_np

        def call() -> Any:
            return op(x, w, b, rm, rv, True, MOMENTUM, EPS, out=y, save_mean=sm, save_invstd=si)

        return Runner(call, lambda r: {"y": y_np, "mean": sm.numpy(), "invstd": si.numpy()},
                      reset=reset, state=state, keep=[x],
                      label="torch.ops.aten.native_batch_norm.out(x, w, b, running_mean, running_var, "
                            "training=True, momentum, eps, out=y, save_mean=, save_invstd=)")
    native = t.torch.native_batch_norm

    def plain() -> Any:
        return native(x, w, b, rm, rv, True, MOMENTUM, EPS)

    return Runner(plain, lambda r: {"y": _torch_np(r[0], t.cl), "mean": r[1].numpy(), "invstd": r[2].numpy()},
                  reset=reset, state=state, keep=[x],
                  label="torch.native_batch_norm(x, w, b, running_mean, running_var, training=True, "
                        "momentum, eps) -> (y, save_mean, save_invstd)")


def torch_backward(case: Case, threads: int, *, out: bool) -> Runner:
    t = _TorchArgs.of(case, out)
    torch, x, w = t.torch, t.x, t.w
    assert case.dy is not None
    dy = _torch_view(torch, case.dy, t.cl)
    rm, rv = torch.from_numpy(case.running_mean), torch.from_numpy(case.running_var)
    sm, si = torch.from_numpy(case.save_mean), torch.from_numpy(case.save_invstd)
    mask = [True, True, True]
    if out:
        op, dx, dx_np = torch.ops.aten.native_batch_norm_backward.out, t.y, t.y_np
        dw, db = torch.empty(case.C), torch.empty(case.C)

        def call() -> Any:
            return op(dy, x, w, rm, rv, sm, si, True, EPS, mask, out0=dx, out1=dw, out2=db)

        return Runner(call, lambda r: {"dx": dx_np, "dweight": dw.numpy(), "dbias": db.numpy()}, keep=[x, dy],
                      label="torch.ops.aten.native_batch_norm_backward.out(dy, x, w, running_mean, running_var, "
                            "save_mean, save_invstd, train=True, eps, [True]*3, out0=dx, out1=, out2=)")
    native = torch.ops.aten.native_batch_norm_backward

    def plain() -> Any:
        return native(dy, x, w, rm, rv, sm, si, True, EPS, mask)

    return Runner(plain, lambda r: {"dx": _torch_np(r[0], t.cl), "dweight": r[1].numpy(), "dbias": r[2].numpy()},
                  keep=[x, dy],
                  label="torch.ops.aten.native_batch_norm_backward(dy, x, w, running_mean, running_var, "
                        "save_mean, save_invstd, train=True, eps, output_mask=[True]*3)")


# ----------------------------------------------------------------------------- NumPy
# What a plain NumPy user writes: vectorized, allocating its results.

def numpy_infer(case: Case, threads: int) -> Runner:
    x, w, b, bs = case.x, case.weight, case.bias, case.bshape()
    rm, rv = case.running_mean, case.running_var

    def call() -> Any:
        scale = w / np.sqrt(rv + np.float32(EPS))
        shift = b - rm * scale
        return x * scale.reshape(bs) + shift.reshape(bs)

    return Runner(call, lambda r: {"y": r},
                  label="scale = w/sqrt(rv+eps); shift = b - rm*scale; y = x*scale + shift")


def numpy_train(case: Case, threads: int) -> Runner:
    x, w, b, bs, axes = case.x, case.weight, case.bias, case.bshape(), case.reduce_axes()
    rm, rv, reset = _running_copies(case)
    f32, n = np.float32, case.n
    m = f32(MOMENTUM)

    def call() -> Any:
        mean = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True)
        invstd = f32(1) / np.sqrt(var + f32(EPS))
        y = (x - mean) * (invstd * w.reshape(bs)) + b.reshape(bs)
        mean, var, invstd = mean.reshape(-1), var.reshape(-1), invstd.reshape(-1)
        rm[:] = (f32(1) - m) * rm + m * mean
        rv[:] = (f32(1) - m) * rv + m * var * f32(n / (n - 1))
        return y, mean, invstd

    return Runner(call, lambda r: {"y": r[0], "mean": r[1], "invstd": r[2]},
                  reset=reset, state=lambda: {"running_mean": rm, "running_var": rv},
                  label="mean = x.mean(axes, keepdims); var = x.var(axes, keepdims); "
                        "y = (x - mean)*(w/sqrt(var+eps)) + b; running stats updated in place")


def numpy_backward(case: Case, threads: int) -> Runner:
    x, w, bs, axes = case.x, case.weight, case.bshape(), case.reduce_axes()
    dy, mean, invstd = case.dy, case.save_mean, case.save_invstd
    assert dy is not None
    inv_n = np.float32(1.0 / case.n)

    def call() -> Any:
        xhat = (x - mean.reshape(bs)) * invstd.reshape(bs)
        dbias = dy.sum(axis=axes)
        dweight = (dy * xhat).sum(axis=axes)
        dx = (w * invstd).reshape(bs) * (
            dy - (dbias * inv_n).reshape(bs) - xhat * (dweight * inv_n).reshape(bs))
        return dx, dweight, dbias

    return Runner(call, lambda r: {"dx": r[0], "dweight": r[1], "dbias": r[2]},
                  label="xhat = (x-mean)*invstd; dbias = dy.sum(axes); dweight = (dy*xhat).sum(axes); "
                        "dx = w*invstd*(dy - dbias/n - xhat*dweight/n)")


# ----------------------------------------------------------------------------- onnxruntime

def ort_infer(case: Case, threads: int) -> Runner:
    """onnxruntime's BatchNormalization, preallocated output through io binding.

    ONNX BatchNormalization normalizes axis 1; channels-last data is given to it as the
    2-D ``(N*H*W, C)`` view of the same buffer (no copy, no transpose).
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    x = case.x.reshape(-1, case.C) if case.shape.channels_last else case.x
    shape = list(x.shape)
    inits = [numpy_helper.from_array(a, name) for a, name in
             ((case.weight, "scale"), (case.bias, "B"), (case.running_mean, "mean"),
              (case.running_var, "var"))]
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], ["Y"],
                            epsilon=EPS, momentum=MOMENTUM)
    graph = helper.make_graph([node], "bn",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = np.empty_like(x)
    xv = ort.OrtValue.ortvalue_from_numpy(x)
    yv = ort.OrtValue.ortvalue_from_numpy(y)
    io = sess.io_binding()
    io.bind_ortvalue_input("X", xv)
    io.bind_ortvalue_output("Y", yv)
    run = sess.run_with_iobinding

    def call() -> None:
        run(io)

    y_case = y.reshape(case.x.shape)
    label = (f"InferenceSession(BatchNormalization opset 15, intra_op_num_threads={threads}, "
             "inter_op_num_threads=1).run_with_iobinding(io) with X and a preallocated Y bound "
             "as OrtValues" + (" (channels-last data as the (N*H*W, C) view)" if case.shape.channels_last else ""))
    return Runner(call, lambda r: {"y": y_case}, label=label, keep=[sess, io, xv, yv, y, x])


def ort_training(case: Case, threads: int) -> Runner:
    raise Unavailable("onnxruntime's BatchNormalization is an inference operator")
