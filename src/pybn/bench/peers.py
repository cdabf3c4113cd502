"""The implementations being timed: pybn and its peers (torch, NumPy, onnxruntime).

Each ``make_*`` returns a :class:`Runner` for one (case, kernel): ``call`` is the
timed thunk (everything a user's call does, nothing more), ``reset`` restores
the state a call updates (running statistics) and ``outputs`` turns what
``call`` returned into NumPy arrays in the case's layout for the check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .reference import EPS, MOMENTUM


class Unavailable(Exception):
    """This implementation does not exist for this kernel or is not installed."""


@dataclass
class Runner:
    impl: str                       # "pybn", "torch", "torch_out", "numpy", "ort"
    call: Callable[[], object]
    outputs: Callable[[object], dict]
    reset: Callable[[], None] = lambda: None
    state: Callable[[], dict] | None = None   # running statistics after a call, as NumPy arrays
    label: str = ""                 # the exact call, for the JSON and README
    keep: list = field(default_factory=list)  # objects that must outlive the runner's calls


# ----------------------------------------------------------------------------- availability

# The modules each optional peer imports (NumPy is always there: pybn needs it).
PEER_MODULES = {"torch": ("torch",), "ort": ("onnxruntime", "onnx")}


def cannot_import(peer: str) -> str | None:
    """Why ``peer`` cannot run here (its first module that fails to import, and how), or None."""
    import importlib

    for name in PEER_MODULES.get(peer, ()):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a broken install is skipped like a missing one
            return f"cannot import {name} ({type(e).__name__}: {e})"
    return None


# ----------------------------------------------------------------------------- pybn

def make_pybn(case, kernel: str, *, out: bool) -> Runner:
    import pybn

    x, w, b, axis = case.x, case.weight, case.bias, case.axis
    y = np.empty_like(x) if out else None
    suffix = ", out=y" if out else ""
    if kernel == "infer":
        rm, rv = case.running_mean, case.running_var

        def call():
            return pybn.batch_norm_infer(x, rm, rv, w, b, eps=EPS, axis=axis, out=y)

        return Runner("pybn", call, lambda r: {"y": r},
                      label=f"pybn.batch_norm_infer(x, running_mean, running_var, w, b, eps, axis{suffix})")
    if kernel == "train":
        rm, rv = case.running_mean.copy(), case.running_var.copy()

        def reset():
            rm[:] = case.running_mean
            rv[:] = case.running_var

        def call():
            return pybn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv,
                                         momentum=MOMENTUM, eps=EPS, axis=axis, out=y)

        return Runner("pybn", call, lambda r: {"y": r[0], "mean": r[1], "invstd": r[2]},
                      reset=reset, state=lambda: {"running_mean": rm, "running_var": rv},
                      label=f"pybn.batch_norm_train(x, w, b, running_mean=, running_var=, momentum, eps, axis{suffix})")
    if kernel == "backward":
        dy, mean, invstd = case.dy, case.save_mean, case.save_invstd

        def call():
            return pybn.batch_norm_backward(dy, x, mean, invstd, w, training=True, axis=axis, out=y)

        return Runner("pybn", call, lambda r: {"dx": r[0], "dweight": r[1], "dbias": r[2]},
                      label=f"pybn.batch_norm_backward(dy, x, mean, invstd, w, training=True, axis{suffix})")
    raise ValueError(kernel)


# ----------------------------------------------------------------------------- torch

def torch_module():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _torch_view(torch, a, channels_last):
    """NCHW-logical tensor over the NumPy buffer (no copy); channels-last memory format for NHWC data."""
    t = torch.from_numpy(a)
    if channels_last:
        t = t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))
    return t


def _torch_np(t, channels_last):
    """A torch result back in the case's NumPy layout."""
    t = t.detach()
    if channels_last:
        t = t.permute(0, *range(2, t.dim()), 1)
    return t.numpy()


def make_torch(case, kernel: str, *, out: bool) -> Runner:
    torch = torch_module()
    if torch is None:
        raise Unavailable("torch is not installed")
    import torch.nn.functional as F

    aten = torch.ops.aten
    cl = case.shape.channels_last
    xt = _torch_view(torch, case.x, cl)
    w, b = torch.from_numpy(case.weight), torch.from_numpy(case.bias)
    impl = "torch_out" if out else "torch"
    if out:
        y_np = np.empty_like(case.x)
        yt = _torch_view(torch, y_np, cl)
        sm_o, si_o = torch.empty(case.C), torch.empty(case.C)

    if kernel == "infer":
        rm, rv = torch.from_numpy(case.running_mean), torch.from_numpy(case.running_var)
        if out:
            op = aten.native_batch_norm.out

            def call():
                return op(xt, w, b, rm, rv, False, MOMENTUM, EPS, out=yt, save_mean=sm_o, save_invstd=si_o)

            label = ("torch.ops.aten.native_batch_norm.out(x, w, b, running_mean, running_var, "
                     "training=False, momentum, eps, out=y, save_mean=, save_invstd=)")
        else:
            def call():
                return F.batch_norm(xt, rm, rv, w, b, training=False, momentum=MOMENTUM, eps=EPS)

            label = "torch.nn.functional.batch_norm(x, running_mean, running_var, w, b, training=False, momentum, eps)"
        outputs = (lambda r: {"y": y_np}) if out else (lambda r: {"y": _torch_np(r, cl)})
        return Runner(impl, call, outputs, label=label, keep=[xt])

    if kernel == "train":
        rm_np, rv_np = case.running_mean.copy(), case.running_var.copy()
        rm, rv = torch.from_numpy(rm_np), torch.from_numpy(rv_np)

        def reset():
            rm_np[:] = case.running_mean
            rv_np[:] = case.running_var

        if out:
            op = aten.native_batch_norm.out

            def call():
                return op(xt, w, b, rm, rv, True, MOMENTUM, EPS, out=yt, save_mean=sm_o, save_invstd=si_o)

            label = ("torch.ops.aten.native_batch_norm.out(x, w, b, running_mean, running_var, "
                     "training=True, momentum, eps, out=y, save_mean=, save_invstd=)")

            def outputs(r):
                return {"y": y_np, "mean": sm_o.numpy(), "invstd": si_o.numpy()}
        else:
            op = torch.native_batch_norm

            def call():
                return op(xt, w, b, rm, rv, True, MOMENTUM, EPS)

            label = ("torch.native_batch_norm(x, w, b, running_mean, running_var, training=True, "
                     "momentum, eps) -> (y, save_mean, save_invstd)")

            def outputs(r):
                return {"y": _torch_np(r[0], cl), "mean": r[1].numpy(), "invstd": r[2].numpy()}
        return Runner(impl, call, outputs, reset=reset,
                      state=lambda: {"running_mean": rm_np, "running_var": rv_np}, label=label, keep=[xt])

    if kernel == "backward":
        dyt = _torch_view(torch, case.dy, cl)
        rm, rv = torch.from_numpy(case.running_mean), torch.from_numpy(case.running_var)
        sm, si = torch.from_numpy(case.save_mean), torch.from_numpy(case.save_invstd)
        mask = [True, True, True]
        if out:
            op = aten.native_batch_norm_backward.out
            dw_o, db_o = torch.empty(case.C), torch.empty(case.C)

            def call():
                return op(dyt, xt, w, rm, rv, sm, si, True, EPS, mask, out0=yt, out1=dw_o, out2=db_o)

            label = ("torch.ops.aten.native_batch_norm_backward.out(dy, x, w, running_mean, running_var, "
                     "save_mean, save_invstd, train=True, eps, [True]*3, out0=dx, out1=, out2=)")

            def outputs(r):
                return {"dx": y_np, "dweight": dw_o.numpy(), "dbias": db_o.numpy()}
        else:
            op = aten.native_batch_norm_backward

            def call():
                return op(dyt, xt, w, rm, rv, sm, si, True, EPS, mask)

            label = ("torch.ops.aten.native_batch_norm_backward(dy, x, w, running_mean, running_var, "
                     "save_mean, save_invstd, train=True, eps, output_mask=[True]*3)")

            def outputs(r):
                return {"dx": _torch_np(r[0], cl), "dweight": r[1].numpy(), "dbias": r[2].numpy()}
        return Runner(impl, call, outputs, label=label, keep=[xt, dyt])
    raise ValueError(kernel)


# ----------------------------------------------------------------------------- NumPy

def make_numpy(case, kernel: str) -> Runner:
    """A straightforward vectorized NumPy implementation: what a plain NumPy user writes."""
    x, w, b = case.x, case.weight, case.bias
    axes, bs = case.reduce_axes(), case.bshape()
    f32 = np.float32
    if kernel == "infer":
        rm, rv = case.running_mean, case.running_var

        def call():
            scale = w / np.sqrt(rv + f32(EPS))
            shift = b - rm * scale
            return x * scale.reshape(bs) + shift.reshape(bs)

        return Runner("numpy", call, lambda r: {"y": r},
                      label="scale = w/sqrt(rv+eps); shift = b - rm*scale; y = x*scale + shift")
    if kernel == "train":
        rm, rv = case.running_mean.copy(), case.running_var.copy()
        n = case.n
        m = f32(MOMENTUM)

        def reset():
            rm[:] = case.running_mean
            rv[:] = case.running_var

        def call():
            mean = x.mean(axis=axes, keepdims=True)
            var = x.var(axis=axes, keepdims=True)
            invstd = f32(1) / np.sqrt(var + f32(EPS))
            y = (x - mean) * (invstd * w.reshape(bs)) + b.reshape(bs)
            mean, var, invstd = mean.reshape(-1), var.reshape(-1), invstd.reshape(-1)
            rm[:] = (f32(1) - m) * rm + m * mean
            rv[:] = (f32(1) - m) * rv + m * var * f32(n / (n - 1))
            return y, mean, invstd

        return Runner("numpy", call, lambda r: {"y": r[0], "mean": r[1], "invstd": r[2]},
                      reset=reset, state=lambda: {"running_mean": rm, "running_var": rv},
                      label="mean = x.mean(axes, keepdims); var = x.var(axes, keepdims); "
                            "y = (x - mean)*(w/sqrt(var+eps)) + b; running stats updated in place")
    if kernel == "backward":
        dy, mean, invstd = case.dy, case.save_mean, case.save_invstd
        inv_n = f32(1.0 / case.n)

        def call():
            xhat = (x - mean.reshape(bs)) * invstd.reshape(bs)
            dbias = dy.sum(axis=axes)
            dweight = (dy * xhat).sum(axis=axes)
            dx = (w * invstd).reshape(bs) * (
                dy - (dbias * inv_n).reshape(bs) - xhat * (dweight * inv_n).reshape(bs))
            return dx, dweight, dbias

        return Runner("numpy", call, lambda r: {"dx": r[0], "dweight": r[1], "dbias": r[2]},
                      label="xhat = (x-mean)*invstd; dbias = dy.sum(axes); dweight = (dy*xhat).sum(axes); "
                            "dx = w*invstd*(dy - dbias/n - xhat*dweight/n)")
    raise ValueError(kernel)


# ----------------------------------------------------------------------------- onnxruntime

def ort_modules():
    try:
        import onnxruntime
    except ImportError:
        return None, None
    try:
        import onnx
    except ImportError:
        return onnxruntime, None
    return onnxruntime, onnx


def make_ort(case, kernel: str, *, threads: int) -> Runner:
    """onnxruntime's BatchNormalization (inference only), preallocated output through io binding.

    ONNX BatchNormalization normalizes axis 1; channels-last data is given to it as the
    2-D ``(N*H*W, C)`` view of the same buffer (no copy, no transpose).
    """
    if kernel != "infer":
        raise Unavailable("onnxruntime's BatchNormalization is an inference operator")
    ort, onnx = ort_modules()
    if ort is None:
        raise Unavailable("onnxruntime is not installed")
    if onnx is None:
        raise Unavailable("onnx (needed to build the model) is not installed")
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

    def call():
        run(io)

    y_case = y.reshape(case.x.shape)
    label = (f"InferenceSession(BatchNormalization opset 15, intra_op_num_threads={threads}, "
             "inter_op_num_threads=1).run_with_iobinding(io) with X and a preallocated Y bound "
             "as OrtValues" + (" (channels-last data as the (N*H*W, C) view)" if case.shape.channels_last else ""))
    return Runner("ort", call, lambda r: {"y": y_case}, label=label, keep=[sess, io, xv, yv, y, x])
