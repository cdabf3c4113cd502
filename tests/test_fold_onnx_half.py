"""pybn.onnx.fold on float16 and bfloat16 graphs (docs/folding.md, docs/dtypes.md).

Every folded initializer must equal the fold computed in float64 by NumPy here and rounded
once to the initializer's dtype; every initializer keeps its dtype (no Cast added); the
folded model must pass the checker and compute what the original computes. float16 graphs
run in onnxruntime; its CPU provider has no bfloat16 Conv or Gemm, so bfloat16 graphs run
in onnx's reference evaluator.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ml_dtypes = pytest.importorskip("ml_dtypes")
from numpy.lib.stride_tricks import sliding_window_view  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import pybn.onnx  # noqa: E402
from pybn.onnx import FoldRecord, NotFolded  # noqa: E402
from reference import nearest_even  # noqa: E402

F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
# unit roundoff: half the distance from 1 to the next value
UNIT = {F16: 2.0**-11, BF16: 2.0**-8}
# ONNX float attributes are float32: the epsilon a BatchNormalization (and the fold) uses
EPS = float(np.float32(1e-3))


# --- building and running graphs ---------------------------------------------------------------

def elem(dtype):
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def tensor(name, value, dtype):
    return numpy_helper.from_array(np.asarray(value, np.float64).astype(dtype), name)


def make_model(nodes, inputs, outputs, inits, opset):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = max(7, helper.find_min_ir_version_for(list(model.opset_import)))
    return model


def bn_params(rng, c, dtype):
    """Inference statistics and affine parameters (var > 0, scale of either sign), as stored."""
    values = {"scale": rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c), "bias": rng.normal(size=c),
              "mean": rng.normal(size=c), "var": rng.uniform(0.3, 2.0, c)}
    return {k: np.asarray(v).astype(dtype) for k, v in values.items()}


def bn_node(x, y):
    ins = [x] + [f"bn.{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", ins, [y], name="bn", epsilon=EPS)


def bn_inits(params):
    return [numpy_helper.from_array(v, f"bn.{k}") for k, v in params.items()]


def scale_shift(params):
    """(s, t) of the batch norm, float64, as the fold computes them."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    s = p["scale"] / np.sqrt(p["var"] + EPS)
    return s, p["bias"] - p["mean"] * s


def run_ort(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ORT fuses Conv+BN itself
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def run_reference(model, feeds):
    return ReferenceEvaluator(model).run(None, feeds)


def inits_of(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def fold(model, kind):
    """Fold `model`; check the input untouched, the result valid, one fold of `kind`, every
    initializer of a dtype the original had and no Cast node."""
    onnx.checker.check_model(model, full_check=True)  # the test's own graph is valid
    before = model.SerializeToString()
    folded, report = pybn.onnx.fold(model, return_report=True)
    assert model.SerializeToString() == before, "fold modified its input"
    onnx.checker.check_model(folded, full_check=True)
    assert report == [FoldRecord(kind, report[0].nodes)]
    assert "BatchNormalization" not in ops(folded) and "Cast" not in ops(folded)
    assert {t.data_type for t in folded.graph.initializer} <= {t.data_type for t in model.graph.initializer}
    return folded


def ops(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def assert_rounded_once(got, want64, dtype):
    """`got` (an initializer) is the float64 `want64` rounded once to `dtype`, bit for bit."""
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.view(np.uint16), nearest_even(want64, dtype).view(np.uint16))


def ulps(got, want):
    """Distance in units in the last place of their (common) 16-bit dtype."""
    def position(a):
        bits = a.view(np.uint16).astype(np.int64)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)
    assert got.dtype == want.dtype
    return np.abs(position(got) - position(want))


def assert_outputs_close(got, want, magnitude, dtype, roundings=8):
    """Both outputs of a 16-bit graph agree within `roundings` roundings to `dtype` of the
    `magnitude` of each output element (a bound on every value either graph computes on the
    way to it, in units of the output), each rounding erring by at most UNIT times such a
    value. 8 covers a layer and a batch norm: the folded graph rounds its weights, its bias
    and its output (3), the original its layer's output and up to four steps of the batch
    norm (5). onnxruntime's CPU kernels and onnx's reference evaluator accumulate the
    products in float32, whose error (at most 36 terms times 2**-24 here) is a small
    fraction of one 16-bit rounding. (The largest difference seen is 1.5 roundings.)"""
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = roundings * UNIT[dtype] * magnitude
    assert np.all(diff <= bound), f"max excess {np.max(diff - bound)} (max bound {bound.max()})"


# --- Conv followed by BatchNormalization -----------------------------------------------------

def conv64(x, w, pad):
    """A group-1, stride-1 2-D convolution with zero padding, in float64."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(xp, w.shape[2:], axis=(2, 3))  # (n, c, h, w, kh, kw)
    return np.einsum("nchwij,ocij->nohw", windows, w.astype(np.float64))


def conv_bn_model(rng, dtype, param_dtype, *, bias=True, cin=4, cout=6, opset=15):
    w = (rng.normal(size=(cout, cin, 3, 3)) / 6).astype(dtype)
    b = rng.normal(size=cout).astype(dtype) if bias else None
    params = bn_params(rng, cout, param_dtype)
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if bias else [])
    conv = helper.make_node("Conv", ["x", "w", "b"] if bias else ["x", "w"], ["c"], name="conv", pads=[1] * 4)
    e = elem(dtype)
    model = make_model([conv, bn_node("c", "y")], [helper.make_tensor_value_info("x", e, [2, cin, 7, 6])],
                       [helper.make_tensor_value_info("y", e, [2, cout, 7, 6])], inits + bn_inits(params), opset)
    x = rng.normal(size=(2, cin, 7, 6)).astype(dtype)
    return model, x, w, b, params


def conv_bn_magnitude(x, w, b, params):
    """Per output element, a bound on the size of every value either graph computes on the way
    to it, in units of the output: |s| (sum |w x| + |b| + |mean|) + |bias|."""
    s, _ = scale_shift(params)
    b = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
    inner = conv64(np.abs(x), np.abs(w), 1) + (np.abs(b) + np.abs(params["mean"].astype(np.float64)))[:, None, None]
    return np.abs(s)[:, None, None] * inner + np.abs(params["bias"].astype(np.float64))[:, None, None]


def check_conv_bn_weights(folded, w, b, params, dtype):
    conv = folded.graph.node[0]
    new = inits_of(folded)
    s, _ = scale_shift(params)
    b64 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
    assert_rounded_once(new[conv.input[1]], w.astype(np.float64) * s[:, None, None, None], dtype)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    assert_rounded_once(new[conv.input[2]], (b64 - p["mean"]) * s + p["bias"], dtype)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("param_dtype", [F16, F32], ids=["f16_params", "f32_params"])
def test_float16_conv_bn(rng, bias, param_dtype):
    """A float16 Conv then a BatchNormalization with float16 or (ONNX's T1/T2) float32 parameters."""
    model, x, w, b, params = conv_bn_model(rng, F16, param_dtype, bias=bias)
    folded = fold(model, "Conv+BatchNormalization")
    assert ops(folded) == {"Conv": 1}
    check_conv_bn_weights(folded, w, b, params, F16)
    (want,), (got,) = run_ort(model, {"x": x}), run_ort(folded, {"x": x})
    assert_outputs_close(got, want, conv_bn_magnitude(x, w, b, params), F16)


def test_float16_conv_bn_against_float64(rng):
    """The folded float16 graph computes the float64 function within float16's error."""
    model, x, w, b, params = conv_bn_model(rng, F16, F16)
    (got,) = run_ort(fold(model, "Conv+BatchNormalization"), {"x": x})
    s, t = scale_shift(params)
    want = s[:, None, None] * (conv64(x, w, 1) + b.astype(np.float64)[:, None, None]) + t[:, None, None]
    assert_outputs_close(got, want.astype(F16), conv_bn_magnitude(x, w, b, params), F16)


def test_float16_weights_are_rounded_once_not_through_float32(rng):
    """w * s just above a float16 tie: float32 would round it onto the tie, and float16's tie
    to even then down to 1; rounded once, from float64, it goes up to 1 + 2**-10."""
    model, x, w, b, params = conv_bn_model(rng, F16, F32, bias=False)
    inits = {t.name: t for t in model.graph.initializer}
    w[0, 0, 0, 0] = 1.0
    params["scale"][0] = 1 + 2.0**-11  # the tie between 1 and 1 + 2**-10
    params["var"][0] = np.float32(1 - 2.0**-24) - np.float32(EPS)  # sqrt(var + eps) just below 1
    inits["w"].CopyFrom(numpy_helper.from_array(w, "w"))
    for k in ("scale", "var"):
        inits[f"bn.{k}"].CopyFrom(numpy_helper.from_array(params[k], f"bn.{k}"))
    folded = fold(model, "Conv+BatchNormalization")
    s, _ = scale_shift(params)
    assert np.float32(s[0]) == np.float32(1 + 2.0**-11) and s[0] > 1 + 2.0**-11  # the case meant
    new_w = inits_of(folded)[folded.graph.node[0].input[1]]
    assert new_w[0, 0, 0, 0] == np.float16(1 + 2.0**-10)
    check_conv_bn_weights(folded, w, b, params, F16)


def conv_transpose64(x, w):
    """A group-1, stride-1 2-D transposed convolution without padding, in float64."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    (n, _, h, width), k = x.shape, w.shape[2]
    y = np.zeros((n, w.shape[1], h + k - 1, width + k - 1))
    for a in range(k):
        for b in range(k):
            y[:, :, a:a + h, b:b + width] += np.einsum("nihw,io->nohw", x, w[:, :, a, b])
    return y


def test_float16_conv_transpose_bn(rng):
    """ConvTranspose, whose output channels are its weight's axis 1, with float32 statistics."""
    w = (rng.normal(size=(4, 6, 3, 3)) / 6).astype(F16)
    params = bn_params(rng, 6, F32)
    e = elem(F16)
    model = make_model([helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")],
                       [helper.make_tensor_value_info("x", e, [2, 4, 5, 5])],
                       [helper.make_tensor_value_info("y", e, [2, 6, 7, 7])],
                       [numpy_helper.from_array(w, "w")] + bn_inits(params), 15)
    folded = fold(model, "ConvTranspose+BatchNormalization")
    conv = folded.graph.node[0]
    new = inits_of(folded)
    s, t = scale_shift(params)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    assert_rounded_once(new[conv.input[1]], w.astype(np.float64) * s[None, :, None, None], F16)
    assert_rounded_once(new[conv.input[2]], -p["mean"] * s + p["bias"], F16)
    x = rng.normal(size=(2, 4, 5, 5)).astype(F16)
    (want,), (got,) = run_ort(model, {"x": x}), run_ort(folded, {"x": x})
    magnitude = np.abs(s)[:, None, None] * (conv_transpose64(np.abs(x), np.abs(w)) + np.abs(p["mean"])[:, None, None]) \
        + np.abs(p["bias"])[:, None, None]
    assert_outputs_close(got, want, magnitude, F16)


def test_float16_chain_of_constants(rng):
    """Conv then Mul and Add by float16 per-channel constants (an exported frozen batch norm)."""
    model, x, w, b, params = conv_bn_model(rng, F16, F16)
    s_c = rng.uniform(0.5, 2, (6, 1, 1)).astype(F16)
    t_c = rng.normal(size=(6, 1, 1)).astype(F16)
    g = model.graph
    del g.node[1:]
    g.node.extend([helper.make_node("Mul", ["c", "s_c"], ["m"]), helper.make_node("Add", ["m", "t_c"], ["y"])])
    del g.initializer[2:]
    g.initializer.extend([numpy_helper.from_array(s_c, "s_c"), numpy_helper.from_array(t_c, "t_c")])
    folded = fold(model, "Conv+Mul+Add")
    conv = folded.graph.node[0]
    new = inits_of(folded)
    s, t = s_c.astype(np.float64).reshape(-1), t_c.astype(np.float64).reshape(-1)
    assert_rounded_once(new[conv.input[1]], w.astype(np.float64) * s[:, None, None, None], F16)
    assert_rounded_once(new[conv.input[2]], b.astype(np.float64) * s + t, F16)
    (want,), (got,) = run_ort(model, {"x": x}), run_ort(folded, {"x": x})
    magnitude = s[:, None, None] * (conv64(np.abs(x), np.abs(w), 1) + np.abs(b.astype(np.float64))[:, None, None]) \
        + np.abs(t)[:, None, None]
    assert_outputs_close(got, want, magnitude, F16)


def test_float16_branches_merge(rng):
    """merge_branches on a float16 RepVGG block: a 3x3 Conv, a 1x1 Conv and an identity batch norm
    summed become one Conv whose weight and bias are the float64 sums rounded once."""
    c = 4
    w3, w1 = (rng.normal(size=(c, c, 3, 3)) / 6).astype(F16), (rng.normal(size=(c, c, 1, 1)) / 2).astype(F16)
    b3, b1 = rng.normal(size=c).astype(F16), rng.normal(size=c).astype(F16)
    params = bn_params(rng, c, F16)
    e = elem(F16)
    nodes = [helper.make_node("Conv", ["x", "w3", "b3"], ["k"], name="conv3", pads=[1] * 4),
             helper.make_node("Conv", ["x", "w1", "b1"], ["one"], name="conv1"), bn_node("x", "ident"),
             helper.make_node("Add", ["k", "one"], ["s0"], name="add0"),
             helper.make_node("Add", ["s0", "ident"], ["y"], name="add1")]
    inits = [numpy_helper.from_array(a, n) for n, a in (("w3", w3), ("b3", b3), ("w1", w1), ("b1", b1))]
    model = make_model(nodes, [helper.make_tensor_value_info("x", e, [2, c, 6, 6])],
                       [helper.make_tensor_value_info("y", e, [2, c, 6, 6])], inits + bn_inits(params), 15)
    onnx.checker.check_model(model, full_check=True)
    folded, report = pybn.onnx.fold(model, merge_branches=True, return_report=True)
    onnx.checker.check_model(folded, full_check=True)
    assert report == [FoldRecord("branches", ("conv3", "conv1", "bn", "add1", "add0"))]
    assert ops(folded) == {"Conv": 1}
    conv = folded.graph.node[0]
    new = inits_of(folded)
    s, t = scale_shift(params)
    weight = w3.astype(np.float64)
    weight[:, :, 1:2, 1:2] += w1.astype(np.float64)
    weight[range(c), range(c), 1, 1] += s
    assert_rounded_once(new[conv.input[1]], weight, F16)
    assert_rounded_once(new[conv.input[2]], b3.astype(np.float64) + b1.astype(np.float64) + t, F16)
    x = rng.normal(size=(2, c, 6, 6)).astype(F16)
    (want,), (got,) = run_ort(model, {"x": x}), run_ort(folded, {"x": x})
    p = {k: v.astype(np.float64) for k, v in params.items()}
    ax = np.abs(x.astype(np.float64))
    magnitude = conv64(ax, np.abs(w3), 1) + conv64(ax, np.abs(w1), 0) + \
        (np.abs(b3.astype(np.float64)) + np.abs(b1.astype(np.float64)) + np.abs(p["bias"]))[:, None, None] + \
        np.abs(s)[:, None, None] * (ax + np.abs(p["mean"])[:, None, None])
    # the original rounds two conv outputs, the batch norm's steps (up to 4) and two sums (8),
    # the folded graph its weights, bias and output (3)
    assert_outputs_close(got, want, magnitude, F16, roundings=11)


def test_float16_fold_that_overflows_is_left(rng):
    """Folded weights past float16's largest value (65504) are not written: the batch norm stays."""
    model, x, w, b, params = conv_bn_model(rng, F16, F32)
    inits = {t.name: t for t in model.graph.initializer}
    inits["w"].CopyFrom(numpy_helper.from_array(np.full(w.shape, 10000.0, F16), "w"))
    inits["bn.var"].CopyFrom(numpy_helper.from_array(np.full(6, 1e-4, F32), "bn.var"))  # |s| >= 15
    folded, report = pybn.onnx.fold(model, return_report=True)
    assert report == [NotFolded("BatchNormalization", ("bn",),
                                "with conv: the folded weights would not be finite in float16")]
    assert ops(folded) == {"Conv": 1, "BatchNormalization": 1}


@pytest.mark.parametrize("op, k", [("Mul", 60000.0), ("Div", 1e-6)])
def test_float16_chain_that_overflows_is_left_and_reported(op, k):
    """A lone Mul or Div by a constant after a float16 Conv whose fold would pass 65504 stays,
    and the report says so, as for a Mul+Add pair or a BatchNormalization."""
    w = np.full((2, 3, 1, 1), 4.0, F16)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                        helper.make_node(op, ["c", "k"], ["y"], name="scale")],
                       [helper.make_tensor_value_info("x", elem(F16), [1, 3, 2, 2])],
                       [helper.make_tensor_value_info("y", elem(F16), [1, 2, 2, 2])],
                       [tensor("w", w, F16), tensor("k", np.full((1, 2, 1, 1), k), F16)], 15)
    folded, report = pybn.onnx.fold(model, return_report=True)
    assert report == [NotFolded(op, ("scale",), "with conv: the folded weights would not be finite in float16")]
    assert ops(folded) == {"Conv": 1, op: 1}


# --- Gemm and MatMul -----------------------------------------------------------------------------

def gemm_model(rng, dtype, param_dtype, *, bn_after, transB, alpha=1.0, beta=1.0, k=7, n=5, opset=15):
    bmat = (rng.normal(size=(n, k) if transB else (k, n)) / np.sqrt(k)).astype(dtype)
    c = rng.normal(size=n).astype(dtype)
    params = bn_params(rng, n if bn_after else k, param_dtype)
    gemm = helper.make_node("Gemm", ["a" if bn_after else "h", "B", "C"], ["g" if bn_after else "y"], name="gemm",
                            transB=transB, alpha=alpha, beta=beta)
    nodes = [gemm, bn_node("g", "y")] if bn_after else [bn_node("a", "h"), gemm]
    e = elem(dtype)
    inits = [numpy_helper.from_array(bmat, "B"), numpy_helper.from_array(c, "C")] + bn_inits(params)
    model = make_model(nodes, [helper.make_tensor_value_info("a", e, [3, k])],
                       [helper.make_tensor_value_info("y", e, [3, n])], inits, opset)
    a = rng.normal(size=(3, k)).astype(dtype)
    w = float(np.float32(alpha)) * (bmat.astype(np.float64) if transB else bmat.astype(np.float64).T)  # (n, k)
    return model, a, w, float(np.float32(beta)) * c.astype(np.float64), params


def gemm_magnitude(a, w, c, params, bn_after):
    """As conv_bn_magnitude, for a Gemm (w: its (n, k) weight, c: its bias, float64)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    s, _ = scale_shift(params)
    a = np.abs(a.astype(np.float64))
    if bn_after:
        return np.abs(s) * (a @ np.abs(w).T + np.abs(c) + np.abs(p["mean"])) + np.abs(p["bias"])
    return (np.abs(s) * (a + np.abs(p["mean"])) + np.abs(p["bias"])) @ np.abs(w).T + np.abs(c)


@pytest.mark.parametrize("transB", [0, 1])
@pytest.mark.parametrize("bn_after", [True, False], ids=["gemm_bn", "bn_gemm"])
@pytest.mark.parametrize("param_dtype", [F16, F32], ids=["f16_params", "f32_params"])
def test_float16_gemm(rng, transB, bn_after, param_dtype):
    model, a, w, c, params = gemm_model(rng, F16, param_dtype, bn_after=bn_after, transB=transB, alpha=0.7,
                                        beta=-1.3)
    folded = fold(model, "Gemm+BatchNormalization" if bn_after else "BatchNormalization+Gemm")
    gemm = folded.graph.node[0]
    new = inits_of(folded)
    s, t = scale_shift(params)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    new_w = new[gemm.input[1]] if transB else new[gemm.input[1]].T
    if bn_after:
        assert_rounded_once(new_w, w * s[:, None], F16)
        assert_rounded_once(new[gemm.input[2]], (c - p["mean"]) * s + p["bias"], F16)
    else:
        assert_rounded_once(new_w, w * s, F16)
        # b + W t: a float64 sum whose order pybn and NumPy may choose differently, each within
        # a few float64 ulps of the exact sum; rounded to float16 they differ only when the
        # exact sum lies that close to a rounding boundary, and then by 1 ulp
        assert ulps(new[gemm.input[2]], nearest_even(c + w @ t, F16)).max() <= 1
    (want,), (got,) = run_ort(model, {"a": a}), run_ort(folded, {"a": a})
    assert_outputs_close(got, want, gemm_magnitude(a, w, c, params, bn_after), F16)


@pytest.mark.parametrize("bn_after", [True, False], ids=["matmul_add_bn", "bn_matmul_add"])
def test_float16_matmul_add(rng, bn_after):
    k, n = 6, 5
    wmat = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(F16)
    c = rng.normal(size=n).astype(F16)
    params = bn_params(rng, n if bn_after else k, F16)
    if bn_after:
        nodes = [helper.make_node("MatMul", ["a", "W"], ["m"], name="mm"),
                 helper.make_node("Add", ["m", "c"], ["s"], name="add"), bn_node("s", "y")]
    else:
        nodes = [bn_node("a", "h"), helper.make_node("MatMul", ["h", "W"], ["m"], name="mm"),
                 helper.make_node("Add", ["m", "c"], ["y"], name="add")]
    e = elem(F16)
    model = make_model(nodes, [helper.make_tensor_value_info("a", e, [3, k])],
                       [helper.make_tensor_value_info("y", e, [3, n])],
                       [numpy_helper.from_array(wmat, "W"), numpy_helper.from_array(c, "c")] + bn_inits(params), 15)
    folded = fold(model, "MatMul+Add+BatchNormalization" if bn_after else "BatchNormalization+MatMul")
    assert ops(folded) == {"MatMul": 1, "Add": 1}
    mm, add = folded.graph.node
    new = inits_of(folded)
    w = wmat.astype(np.float64).T  # (n, k)
    s, t = scale_shift(params)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    c64 = c.astype(np.float64)
    if bn_after:
        assert_rounded_once(new[mm.input[1]].T, w * s[:, None], F16)
        assert_rounded_once(new[add.input[1]], (c64 - p["mean"]) * s + p["bias"], F16)
    else:
        assert_rounded_once(new[mm.input[1]].T, w * s, F16)
        assert ulps(new[add.input[1]], nearest_even(c64 + w @ t, F16)).max() <= 1  # as in test_float16_gemm
    a = rng.normal(size=(3, k)).astype(F16)
    (want,), (got,) = run_ort(model, {"a": a}), run_ort(folded, {"a": a})
    assert_outputs_close(got, want, gemm_magnitude(a, w, c64, params, bn_after), F16)


# --- bfloat16 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("param_dtype", [BF16, F32], ids=["bf16_params", "f32_params"])
def test_bfloat16_conv_bn(rng, param_dtype):
    """bfloat16 Conv (opset 22) then BatchNormalization: folded as in float16, run in onnx's reference
    evaluator (onnxruntime's CPU provider has no bfloat16 Conv)."""
    model, x, w, b, params = conv_bn_model(rng, BF16, param_dtype, opset=22)
    folded = fold(model, "Conv+BatchNormalization")
    check_conv_bn_weights(folded, w, b, params, BF16)
    (want,), (got,) = run_reference(model, {"x": x}), run_reference(folded, {"x": x})
    assert_outputs_close(got, want, conv_bn_magnitude(x, w, b, params), BF16)


@pytest.mark.parametrize("bn_after", [True, False], ids=["gemm_bn", "bn_gemm"])
def test_bfloat16_gemm(rng, bn_after):
    model, a, w, c, params = gemm_model(rng, BF16, BF16, bn_after=bn_after, transB=1, alpha=1.5, beta=0.5)
    folded = fold(model, "Gemm+BatchNormalization" if bn_after else "BatchNormalization+Gemm")
    gemm = folded.graph.node[0]
    new = inits_of(folded)
    s, t = scale_shift(params)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    if bn_after:
        assert_rounded_once(new[gemm.input[1]], w * s[:, None], BF16)
        assert_rounded_once(new[gemm.input[2]], (c - p["mean"]) * s + p["bias"], BF16)
    else:
        assert_rounded_once(new[gemm.input[1]], w * s, BF16)
        assert ulps(new[gemm.input[2]], nearest_even(c + w @ t, BF16)).max() <= 1  # as in test_float16_gemm
    (want,), (got,) = run_reference(model, {"a": a}), run_reference(folded, {"a": a})
    assert_outputs_close(got, want, gemm_magnitude(a, w, c, params, bn_after), BF16)
