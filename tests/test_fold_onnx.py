"""pybn.onnx.fold and ``python -m pybn fold``: every folded model is checked against the
original by running both in onnxruntime (graph optimizations off, so the original really
runs its BatchNormalization / Dropout nodes)."""
from __future__ import annotations

import collections
import importlib
import io
import logging
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import pybn.onnx  # noqa: E402
from pybn.onnx import FoldRecord, NotFolded  # noqa: E402

F32 = TensorProto.FLOAT
DATA = pathlib.Path(__file__).parent / "data" / "onnx_pytorch_converted"


# --- building and running graphs ------------------------------------------------------------

def vinfo(name, shape, elem=F32):
    """A typed value; `shape` a list of dims, or an int: that rank with unknown dims."""
    return helper.make_tensor_value_info(name, elem, [None] * shape if isinstance(shape, int) else shape)


def tensor(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def make_model(nodes, inputs, outputs, inits=(), opset=13, value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # the oldest IR version for the opset, but >= 7 (older ones need every initializer to be a
    # graph input, and every graph output to have a shape)
    model.ir_version = max(7, helper.find_min_ir_version_for(list(model.opset_import)))
    return model


def bn_inits(rng, c, prefix="bn", dtype=np.float32):
    """Random inference statistics and affine parameters (var > 0, scale of either sign)."""
    values = {
        "scale": rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c),
        "bias": rng.normal(size=c),
        "mean": rng.normal(size=c),
        "var": rng.uniform(0.3, 2.0, c),
    }
    return [tensor(f"{prefix}.{k}", v, dtype) for k, v in values.items()]


def bn_node(x, y, prefix="bn", eps=1e-3, **attrs):
    ins = [x] + [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", ins, [y], name=prefix, epsilon=eps, **attrs)


def weight(rng, shape, fan_in):
    return rng.normal(size=shape) / np.sqrt(fan_in)


def run(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ORT fuses Conv+BN itself
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ops(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def fold_and_compare(model, feeds, kinds=None, rtol=1e-4, atol=1e-4):
    """Fold `model`; check the input is untouched, the result valid and equal under ORT."""
    onnx.checker.check_model(model, full_check=True)  # the test's own graph is valid
    before = model.SerializeToString()
    folded, report = pybn.onnx.fold(model, return_report=True)
    assert model.SerializeToString() == before, "fold modified its input"
    assert folded is not model
    onnx.checker.check_model(folded, full_check=True)
    assert [v.name for v in folded.graph.input] == [v.name for v in model.graph.input]
    assert [v.name for v in folded.graph.output] == [v.name for v in model.graph.output]
    want, got = run(model, feeds), run(folded, feeds)
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
    changes = [r for r in report if isinstance(r, FoldRecord)]
    assert report[:len(changes)] == changes and all(isinstance(r, NotFolded) for r in report[len(changes):])
    # every BatchNormalization, Dropout and Identity left in the main graph is reported, once
    left = [r.nodes[0] for r in report[len(changes):] if not r.reason.startswith("inside ")]
    assert left == [label(n) for n in folded.graph.node if n.op_type in ("BatchNormalization", "Dropout", "Identity")]
    if kinds is not None:
        assert sorted(r.kind for r in changes) == sorted(kinds)
    return folded, report


def label(node):
    return node.name or f"{node.op_type}:{node.output[0]}"


def reasons(report):
    """node -> why it was left in place."""
    return {r.nodes[0]: r.reason for r in report if isinstance(r, NotFolded)}


def inits_of(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# --- Conv / ConvTranspose followed by BatchNormalization --------------------------------------

def conv_bn_model(rng, *, cin=4, cout=6, kernel=(3, 3), group=1, bias=True, transposed=False, opset=13,
                  spatial=(7, 6), bn_attrs=None, dtype=np.float32):
    op = "ConvTranspose" if transposed else "Conv"
    wshape = (cin, cout // group, *kernel) if transposed else (cout, cin // group, *kernel)
    inits = [tensor("w", weight(rng, wshape, cin * np.prod(kernel) / group), dtype)]
    ins = ["x", "w"]
    if bias:
        inits.append(tensor("b", rng.normal(size=cout), dtype))
        ins.append("b")
    pads = [1] * (2 * len(kernel))
    nodes = [helper.make_node(op, ins, ["c"], name="conv", group=group, pads=pads),
             bn_node("c", "y", **(bn_attrs or {}))]
    inits += bn_inits(rng, cout, dtype=dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = make_model(nodes, [vinfo("x", ["N", cin, *spatial], elem)], [vinfo("y", 2 + len(kernel), elem)], inits,
                       opset)
    x = rng.normal(size=(2, cin, *spatial)).astype(dtype)
    return model, {"x": x}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("opset", [7, 9, 13, 14, 15])
def test_conv_bn(rng, bias, opset):
    model, feeds = conv_bn_model(rng, bias=bias, opset=opset)
    folded, report = fold_and_compare(model, feeds, ["Conv+BatchNormalization"])
    assert ops(folded) == {"Conv": 1}
    assert report == [FoldRecord("Conv+BatchNormalization", ("conv", "bn"))]
    conv = folded.graph.node[0]
    assert len(conv.input) == 3 and conv.output[0] == "y"
    assert set(inits_of(folded)) == {conv.input[1], conv.input[2]}  # the old ones are gone


def test_conv_bn_float64(rng):
    """onnxruntime has no float64 Conv: check the folded weights against the formula."""
    model, _ = conv_bn_model(rng, dtype=np.float64)
    folded = pybn.onnx.fold(model)
    onnx.checker.check_model(folded, full_check=True)
    assert ops(folded) == {"Conv": 1}
    conv = folded.graph.node[0]
    new, old = inits_of(folded), inits_of(model)
    assert new[conv.input[1]].dtype == new[conv.input[2]].dtype == np.float64
    s = old["bn.scale"] / np.sqrt(old["bn.var"] + np.float32(1e-3))
    np.testing.assert_allclose(new[conv.input[1]], old["w"] * s[:, None, None, None], rtol=1e-14)
    np.testing.assert_allclose(new[conv.input[2]], (old["b"] - old["bn.mean"]) * s + old["bn.bias"], rtol=1e-13)


@pytest.mark.parametrize("kernel,spatial", [((3,), (9,)), ((3, 3, 3), (5, 4, 6)), ((1, 1), (5, 5))],
                         ids=["conv1d", "conv3d", "conv1x1"])
def test_conv_bn_dims(rng, kernel, spatial):
    model, feeds = conv_bn_model(rng, kernel=kernel, spatial=spatial)
    folded, _ = fold_and_compare(model, feeds, ["Conv+BatchNormalization"])
    assert ops(folded) == {"Conv": 1}


@pytest.mark.parametrize("cin,cout,group", [(4, 6, 2), (6, 6, 3), (5, 5, 5), (4, 8, 4)],
                         ids=["g2", "g3", "depthwise", "depthwise_x2"])
def test_grouped_conv_bn(rng, cin, cout, group):
    model, feeds = conv_bn_model(rng, cin=cin, cout=cout, group=group)
    folded, _ = fold_and_compare(model, feeds, ["Conv+BatchNormalization"])
    assert ops(folded) == {"Conv": 1}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cin,cout,group,kernel", [(4, 6, 1, (3, 3)), (4, 6, 2, (3, 3)), (6, 6, 6, (3, 3)),
                                                    (4, 6, 2, (3,))], ids=["g1", "g2", "depthwise", "1d_g2"])
def test_conv_transpose_bn(rng, bias, cin, cout, group, kernel):
    spatial = (5,) * len(kernel)
    model, feeds = conv_bn_model(rng, cin=cin, cout=cout, group=group, kernel=kernel, transposed=True, bias=bias,
                                 spatial=spatial)
    folded, _ = fold_and_compare(model, feeds, ["ConvTranspose+BatchNormalization"])
    assert ops(folded) == {"ConvTranspose": 1}


def test_conv_bias_input_empty_name(rng):
    """Conv(x, w, "") — an explicitly absent bias gets the folded one."""
    model, feeds = conv_bn_model(rng, bias=False)
    model.graph.node[0].input.append("")
    folded, _ = fold_and_compare(model, feeds, ["Conv+BatchNormalization"])
    assert folded.graph.node[0].input[2] != ""


def test_conv_weight_from_constant_node(rng):
    model, feeds = conv_bn_model(rng, bias=True)
    w = model.graph.initializer[0]
    assert w.name == "w"
    const = helper.make_node("Constant", [], ["w"], value=w)
    del model.graph.initializer[0]
    model.graph.node.insert(0, const)
    folded, _ = fold_and_compare(model, feeds, ["Conv+BatchNormalization"])
    assert ops(folded) == {"Conv": 1}  # the Constant nobody reads any more is gone



def test_ir3_model_keeps_every_initializer_a_graph_input(rng):
    """IR 3 requires every initializer to be a graph input: the folded weights of Constant
    nodes were initializers only, and the result failed onnx.checker (and the command line's
    own second fold). They are graph inputs too, as IR 3 has them."""
    model, feeds = conv_bn_model(rng, bias=True, opset=8)
    for t in list(model.graph.initializer):
        model.graph.node.insert(0, helper.make_node("Constant", [], [t.name], value=t))
    del model.graph.initializer[:]
    model.ir_version = 3
    onnx.checker.check_model(model)
    folded, report = pybn.onnx.fold(model, return_report=True)
    assert [r.kind for r in report] == ["Conv+BatchNormalization"]
    onnx.checker.check_model(folded, full_check=True)
    assert {t.name for t in folded.graph.initializer} <= {v.name for v in folded.graph.input}
    np.testing.assert_allclose(run(folded, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)




def test_ir3_model_folds_a_second_pair_that_needs_a_rank(rng):
    """After a first fold in an IR 3 model, shape inference (on a copy of IR 3) ignored the
    folded weights, initializers not listed as inputs: a later MatMul+BatchNormalization was
    left, "the rank of its output 'mm' is not known"."""
    c, k = 3, 5

    def const(name, a):
        return helper.make_node("Constant", [], [name], value=tensor(name, a))

    nodes = [const("w1", weight(rng, (c, c, 1, 1), c)), const("w2", weight(rng, (c, k), c))]
    for t in [*bn_inits(rng, c, "a"), *bn_inits(rng, k, "b")]:
        nodes.append(helper.make_node("Constant", [], [t.name], value=t))
    nodes += [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv"), bn_node("c", "h", "a"),
              helper.make_node("GlobalAveragePool", ["h"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="fl"),
              helper.make_node("MatMul", ["f", "w2"], ["mm"], name="mm"), bn_node("mm", "y", "b")]
    model = make_model(nodes, [vinfo("x", [2, c, 4, 4])], [vinfo("y", [2, k])], opset=8)
    model.ir_version = 3
    folded, report = pybn.onnx.fold(model, return_report=True)
    assert [r.kind for r in report] == ["Conv+BatchNormalization", "MatMul+BatchNormalization"]
    onnx.checker.check_model(folded, full_check=True)
    feeds = {"x": rng.normal(size=(2, c, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(folded, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_statistics_from_constant_lists(rng):
    """A Constant in its list form (value_floats=[...], opset 12) was refused: "'bn.mean' is
    computed by Constant:bn.mean, not a constant"."""
    model, feeds = conv_bn_model(rng, bias=True)
    for name in ("bn.mean", "bn.scale"):
        t = next(t for t in model.graph.initializer if t.name == name)
        model.graph.initializer.remove(t)
        values = numpy_helper.to_array(t).tolist()
        model.graph.node.insert(0, helper.make_node("Constant", [], [name], value_floats=values))
    folded, _ = fold_and_compare(model, feeds, ["Conv+BatchNormalization"])
    assert ops(folded) == {"Conv": 1}


@pytest.mark.parametrize("is_test", [1, 0])
def test_conv_bn_opset6(rng, is_test):
    """onnxruntime has no BatchNormalization-6: onnx's reference evaluator runs both models."""
    from onnx.reference import ReferenceEvaluator

    model, feeds = conv_bn_model(rng, opset=6, bn_attrs={"is_test": is_test})
    onnx.checker.check_model(model, full_check=True)
    folded, report = pybn.onnx.fold(model, return_report=True)
    onnx.checker.check_model(folded, full_check=True)
    if not is_test:  # training mode: batch statistics
        assert report == [NotFolded("BatchNormalization", ("bn",), "is_test=0: training mode")]
        assert ops(folded)["BatchNormalization"] == 1
        return
    assert ops(folded) == {"Conv": 1}
    (want,) = ReferenceEvaluator(model).run(None, feeds)
    (got,) = ReferenceEvaluator(folded).run(None, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("is_test", [1, 0])
def test_dropout_opset6(rng, is_test):
    model, _ = chain_model(rng, [helper.make_node("Dropout", ["r"], ["d"], is_test=is_test)], opset=6)
    onnx.checker.check_model(model, full_check=True)
    folded = pybn.onnx.fold(model)
    onnx.checker.check_model(folded, full_check=True)
    assert ("Dropout" in ops(folded)) == (not is_test)


def test_bn_spatial0_opset7_not_folded(rng):
    """spatial=0 (opset < 9): statistics per element, not per channel."""
    model, _ = conv_bn_model(rng, opset=7, bn_attrs={"spatial": 0})
    folded = pybn.onnx.fold(model)
    assert ops(folded) == {"Conv": 1, "BatchNormalization": 1}


def test_bn_training_mode_not_folded(rng):
    model, feeds = conv_bn_model(rng, opset=15, bn_attrs={"training_mode": 1})
    bn = model.graph.node[1]
    bn.output.extend(["running_mean", "running_var"])  # required by the checker in training mode
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded) == {"Conv": 1, "BatchNormalization": 1}


def test_bn_extra_outputs_opset9_not_folded(rng):
    """Opset 7-13: more than one output means training mode."""
    model, feeds = conv_bn_model(rng, opset=9)
    model.graph.node[1].output.extend(["m", "v", "sm", "sv"])
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded) == {"Conv": 1, "BatchNormalization": 1}


def test_bn_training_mode_explicit_zero_folded(rng):
    model, feeds = conv_bn_model(rng, opset=14, bn_attrs={"training_mode": 0})
    folded, _ = fold_and_compare(model, feeds, ["Conv+BatchNormalization"])
    assert ops(folded) == {"Conv": 1}


def test_bn_default_epsilon(rng):
    model, feeds = conv_bn_model(rng)
    bn = model.graph.node[1]
    del bn.attribute[:]  # epsilon defaults to 1e-5
    model.graph.initializer[-1].CopyFrom(tensor("bn.var", rng.uniform(1e-5, 1e-4, 6)))  # eps matters
    fold_and_compare(model, feeds, ["Conv+BatchNormalization"], rtol=2e-4)


# --- what must be left alone ------------------------------------------------------------------

def test_conv_output_two_consumers_not_folded(rng):
    model, feeds = conv_bn_model(rng)
    model.graph.node.append(helper.make_node("Relu", ["c"], ["r"]))
    model.graph.output.append(vinfo("r", 4))
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}


def test_conv_output_is_graph_output_not_folded(rng):
    model, feeds = conv_bn_model(rng)
    model.graph.output.append(vinfo("c", 4))
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["BatchNormalization"] == 1


def test_weight_graph_input_not_folded(rng):
    model, feeds = conv_bn_model(rng, bias=False)
    w = model.graph.initializer[0]
    feeds["w"] = numpy_helper.to_array(w)
    del model.graph.initializer[0]
    model.graph.input.append(vinfo("w", list(feeds["w"].shape)))
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["BatchNormalization"] == 1


@pytest.mark.parametrize("name", ["w", "bn.var"])
def test_initializer_also_graph_input_not_folded(rng, name):
    """An initializer listed as a graph input is a default that a caller may override."""
    model, feeds = conv_bn_model(rng)
    t = next(t for t in model.graph.initializer if t.name == name)
    model.graph.input.append(vinfo(name, list(t.dims)))
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["BatchNormalization"] == 1
    assert name in inits_of(folded)  # kept: it is a graph input's default
    # and overriding it still works on the folded model
    feeds[name] = (numpy_helper.to_array(t) * 1.5).astype(np.float32)
    np.testing.assert_allclose(run(folded, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("case", ["reshape-after", "rank-before"])
def test_a_shape_given_by_an_overridable_initializer_is_not_static(rng, case):
    """Shape inference read the default of an initializer that is also a graph input: a
    Reshape's target shape, and through it the MatMul's rank, were taken as static and the
    pair folded; feeding another valid shape gave outputs off by 87% / 67%. Inference sees
    the input now: not folded, and the model computes as before with either shape."""
    if case == "reshape-after":  # MatMul -> Reshape(shape) -> BN
        c, k = 4, 5
        nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
                 helper.make_node("Reshape", ["mm", "shape"], ["r"], name="rs"), bn_node("r", "y")]
        x_shape, shapes = [2, 3, 5], ([6, 4, 1], [3, 4, 2])
    else:  # Reshape(x, shape) -> MatMul -> BN: a fold exact at rank 2 only
        c, k = 3, 4
        nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="rs"),
                 helper.make_node("MatMul", ["r", "w"], ["mm"], name="mm"), bn_node("mm", "y")]
        x_shape, shapes = [6, 4], ([6, 4], [2, 3, 4])
    inits = [tensor("w", weight(rng, (k, c), k)), *bn_inits(rng, c)]
    inits.append(tensor("shape", shapes[0], np.int64))
    model = make_model(nodes, [vinfo("x", x_shape), vinfo("shape", [len(shapes[0])], TensorProto.INT64)],
                       [vinfo("y", len(shapes[0]))], inits)
    if case == "rank-before":
        model.graph.input[1].CopyFrom(vinfo("shape", [None], TensorProto.INT64))
    x = rng.normal(size=x_shape).astype(np.float32)
    folded, report = fold_and_compare(model, {"x": x, "shape": np.array(shapes[0], np.int64)}, [])
    assert ops(folded)["BatchNormalization"] == 1
    feeds = {"x": x, "shape": np.array(shapes[1], np.int64)}
    np.testing.assert_array_equal(run(folded, feeds)[0], run(model, feeds)[0])


def test_shared_weight(rng):
    """Two convs share one weight; one of them can fold, the other not (two consumers)."""
    model, feeds = conv_bn_model(rng)
    g = model.graph
    g.node.append(helper.make_node("Conv", ["x", "w", "b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]))
    g.node.append(helper.make_node("Relu", ["c2"], ["r2"]))
    g.node.append(bn_node("c2", "y2", prefix="bn2"))
    g.initializer.extend(bn_inits(rng, 6, prefix="bn2"))
    g.output.extend([vinfo("y2", 4), vinfo("r2", 4)])
    w_before = inits_of(model)["w"].copy()
    folded, report = fold_and_compare(model, feeds, ["Conv+BatchNormalization"])
    assert report[0].nodes == ("conv", "bn")
    inits = inits_of(folded)
    np.testing.assert_array_equal(inits["w"], w_before)  # the shared one is untouched
    assert folded.graph.node[0].input[1] != "w" and folded.graph.node[1].input[1] == "w"


def test_shared_weight_both_folded(rng):
    model, feeds = conv_bn_model(rng)
    g = model.graph
    g.node.append(helper.make_node("Conv", ["x", "w", "b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]))
    g.node.append(bn_node("c2", "y2", prefix="bn2"))
    g.initializer.extend(bn_inits(rng, 6, prefix="bn2"))
    g.output.append(vinfo("y2", 4))
    folded, _ = fold_and_compare(model, feeds, ["Conv+BatchNormalization"] * 2)
    assert ops(folded) == {"Conv": 2}
    names = [n.input[1] for n in folded.graph.node]
    assert len(set(names)) == 2 and "w" not in names
    assert len(folded.graph.initializer) == 4


def test_consumer_in_subgraph_not_folded(rng):
    """A value read inside an If branch has a consumer the main graph does not show."""
    model, feeds = conv_bn_model(rng)
    branch = helper.make_graph([helper.make_node("Identity", ["c"], ["o"])], "then", [], [vinfo("o", 4)])
    other = helper.make_graph([helper.make_node("Identity", ["y"], ["o2"])], "else", [], [vinfo("o2", 4)])
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=other))
    model.graph.input.append(vinfo("cond", [], TensorProto.BOOL))
    model.graph.output.append(vinfo("z", 4))
    for cond in (True, False):
        feeds["cond"] = np.array(cond)
        folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["BatchNormalization"] == 1


def test_bn_params_not_constant_not_folded(rng):
    model, feeds = conv_bn_model(rng)
    g = model.graph
    t = next(t for t in g.initializer if t.name == "bn.mean")
    feeds["bn.mean"] = numpy_helper.to_array(t)
    g.initializer.remove(t)
    g.input.append(vinfo("bn.mean", [6]))
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["BatchNormalization"] == 1


def test_bn_alone_unchanged(rng):
    """A BatchNormalization whose input is a graph input has nothing to fold into."""
    inits = bn_inits(rng, 3)
    model = make_model([bn_node("x", "y")], [vinfo("x", ["N", 3, 4, 4])], [vinfo("y", 4)], inits)
    folded, _ = fold_and_compare(model, {"x": rng.normal(size=(2, 3, 4, 4)).astype(np.float32)}, [])
    assert folded.SerializeToString() == model.SerializeToString()


# --- Gemm / MatMul ----------------------------------------------------------------------------

def gemm_model(rng, *, transB, alpha=None, beta=None, c_shape=(5,), k=7, n=5, opset=13, bn_after=True,
               transA=0, dtype=np.float32):
    b = weight(rng, (n, k) if transB else (k, n), k)
    inits = [tensor("B", b, dtype)]
    ins = ["a" if bn_after else "h", "B"]
    if c_shape is not None:
        inits.append(tensor("C", rng.normal(size=c_shape), dtype))
        ins.append("C")
    attrs = {"transB": transB, "transA": transA}
    if alpha is not None:
        attrs["alpha"] = alpha
    if beta is not None:
        attrs["beta"] = beta
    ashape = ["M", k] if not transA else [k, "M"]
    if bn_after:
        nodes = [helper.make_node("Gemm", ins, ["g"], name="gemm", **attrs), bn_node("g", "y")]
        inits += bn_inits(rng, n, dtype=dtype)
    else:
        nodes = [bn_node("a", "h"), helper.make_node("Gemm", ins, ["y"], name="gemm", **attrs)]
        inits += bn_inits(rng, ashape[1] if not transA else 3, dtype=dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = make_model(nodes, [vinfo("a", ashape, elem)], [vinfo("y", 2, elem)], inits, opset)
    a = rng.normal(size=(3, k) if not transA else (k, 3)).astype(dtype)
    return model, {"a": a}


GEMM_CASES = {
    "transB0": dict(transB=0),
    "transB1": dict(transB=1),
    "alpha_beta_transB0": dict(transB=0, alpha=0.7, beta=-1.9),
    "alpha_beta_transB1": dict(transB=1, alpha=2.5, beta=0.3),
    "noC": dict(transB=1, c_shape=None, alpha=1.3),
    "C_row": dict(transB=0, c_shape=(1, 5), beta=2.0),
    "C_scalar": dict(transB=1, c_shape=(), beta=0.5),
    "C_1": dict(transB=0, c_shape=(1,)),
    "opset9": dict(transB=1, opset=9, alpha=0.5),
    "transA": dict(transB=1, transA=1, k=3, alpha=0.9),
}


@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_gemm_bn(rng, case):
    model, feeds = gemm_model(rng, **GEMM_CASES[case])
    folded, _ = fold_and_compare(model, feeds, ["Gemm+BatchNormalization"])
    assert ops(folded) == {"Gemm": 1}
    gemm = folded.graph.node[0]
    assert {a.name for a in gemm.attribute} <= {"transA", "transB"}  # alpha, beta folded in


@pytest.mark.parametrize("bn_after", [True, False], ids=["gemm_bn", "bn_gemm"])
def test_gemm_float64(rng, bn_after):
    model, feeds = gemm_model(rng, transB=0, alpha=0.7, beta=1.3, dtype=np.float64, bn_after=bn_after)
    folded, _ = fold_and_compare(model, feeds, None, rtol=1e-12, atol=1e-12)
    assert ops(folded) == {"Gemm": 1}
    assert all(t.data_type == TensorProto.DOUBLE for t in folded.graph.initializer)


def test_gemm_bn_per_row_c_not_folded(rng):
    model, feeds = gemm_model(rng, transB=1, c_shape=(3, 5))
    model.graph.input[0].CopyFrom(vinfo("a", [3, 7]))
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["BatchNormalization"] == 1


@pytest.mark.parametrize("case", [c for c in GEMM_CASES if c != "transA"])
def test_bn_gemm(rng, case):
    model, feeds = gemm_model(rng, bn_after=False, **GEMM_CASES[case])
    folded, _ = fold_and_compare(model, feeds, ["BatchNormalization+Gemm"])
    assert ops(folded) == {"Gemm": 1}


def test_bn_gemm_transA_not_folded(rng):
    """With transA=1 the BN's channels are the rows of the product, not the contraction axis."""
    model, feeds = gemm_model(rng, bn_after=False, transB=1, transA=1)
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["BatchNormalization"] == 1



@pytest.mark.parametrize("layer", ["Gemm", "MatMul", "Conv"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_batch_norm_far_from_zero_stays_before_its_layer(rng, layer, dtype):
    """Folded into the layer after it, a batch norm whose mean is many standard deviations from
    0 makes the layer sum terms that large and cancel them: float16 outputs 7x (10 std), 60x
    (100 std) the unfolded error. Past 8 standard deviations the pair is left, saying why;
    at 7 it folds, within the usual tolerance."""
    c, k = 6, 5
    x_shape = [3, c] if layer != "Conv" else [3, c, 4, 4]
    w_shape = (k, c) if layer == "Gemm" else (c, k) if layer == "MatMul" else (k, c, 1, 1)
    nodes = [bn_node("x", "h"), helper.make_node(layer, ["h", "w"], ["y"], name="layer",
                                                 **({"transB": 1} if layer == "Gemm" else {}))]
    var = rng.uniform(0.5, 2.0, c)
    elem = TensorProto.FLOAT16 if dtype == np.float16 else F32
    y_shape = [3, k] if layer != "Conv" else [3, k, 4, 4]
    for stds, folds in ((7.0, True), (20.0, False)):
        mean = stds * np.sqrt(var + 1e-3) * rng.choice([-1.0, 1.0], c)
        inits = [tensor("w", weight(rng, w_shape, c), dtype), tensor("bn.scale", rng.uniform(0.5, 1.5, c), dtype),
                 tensor("bn.bias", 0.1 * rng.normal(size=c), dtype), tensor("bn.mean", mean, dtype),
                 tensor("bn.var", var, dtype)]
        model = make_model(nodes, [vinfo("x", x_shape, elem)], [vinfo("y", y_shape, elem)], inits)
        x = (mean.reshape([1, c] + [1] * (len(x_shape) - 2)) +
             rng.normal(size=x_shape) * np.sqrt(var).reshape([1, c] + [1] * (len(x_shape) - 2))).astype(dtype)
        tol = 3e-2 if dtype == np.float16 else 1e-4
        folded, report = fold_and_compare(model, {"x": x}, [f"BatchNormalization+{layer}"] if folds else [],
                                          rtol=tol, atol=tol)
        if not folds:
            assert "times the normalized values and cancel them (channels 0, 1, 2, 3, 4, ... (6 of 6): a mean far " \
                "from 0" in reasons(report)["bn"]


def test_gemm_bn_gemm_chain(rng):
    """Gemm -> BN -> Gemm: the BN goes into the Gemm before it."""
    model, feeds = gemm_model(rng, transB=1)
    g = model.graph
    g.node[1].output[0] = "h"
    g.node.append(helper.make_node("Gemm", ["h", "B2"], ["y"], transB=1))
    g.initializer.append(tensor("B2", weight(rng, (4, 5), 5)))
    folded, _ = fold_and_compare(model, feeds, ["Gemm+BatchNormalization"])
    assert ops(folded) == {"Gemm": 2}


def matmul_model(rng, *, add=None, k=6, n=5, rows=("M",), bn_after=True, opset=13, a_shape=None):
    """MatMul(a, W) [+ Add] -> BN  or  BN -> MatMul(h, W) [+ Add]."""
    inits = [tensor("W", weight(rng, (k, n), k))]
    if bn_after:
        nodes = [helper.make_node("MatMul", ["a", "W"], ["m"], name="mm")]
        last = "m"
        if add is not None:
            inits.append(tensor("c", rng.normal(size=add)))
            nodes.append(helper.make_node("Add", ["m", "c"] if len(add) != 2 else ["c", "m"], ["s"], name="add"))
            last = "s"
        nodes.append(bn_node(last, "y"))
        inits += bn_inits(rng, n)
    else:
        nodes = [bn_node("a", "h"), helper.make_node("MatMul", ["h", "W"], ["m" if add else "y"], name="mm")]
        if add is not None:
            inits.append(tensor("c", rng.normal(size=add)))
            nodes.append(helper.make_node("Add", ["m", "c"], ["y"], name="add"))
        inits += bn_inits(rng, k)
    shape = a_shape if a_shape is not None else [*rows, k]
    model = make_model(nodes, [vinfo("a", shape)], [vinfo("y", len(shape))], inits, opset)
    concrete = [3 if isinstance(d, str) else d for d in (shape or [3, k])]
    return model, {"a": rng.normal(size=concrete).astype(np.float32)}


@pytest.mark.parametrize("add", [None, (5,), (1, 5), ()], ids=["noadd", "add_n", "add_1n", "add_scalar"])
def test_matmul_bn(rng, add):
    model, feeds = matmul_model(rng, add=add)
    kind = "MatMul+BatchNormalization" if add is None else "MatMul+Add+BatchNormalization"
    folded, _ = fold_and_compare(model, feeds, [kind])
    assert ops(folded) == {"MatMul": 1, "Add": 1}


def test_matmul_rank3_bn_not_folded(rng):
    """(B, T, K) @ (K, N): BN normalizes axis 1 = T, not the matmul's output features."""
    model, feeds = matmul_model(rng, rows=("B", 5))
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["BatchNormalization"] == 1


@pytest.mark.parametrize("add", [None, (5,), (1, 5)], ids=["noadd", "add_n", "add_1n"])
def test_bn_matmul(rng, add):
    model, feeds = matmul_model(rng, add=add, bn_after=False)
    folded, _ = fold_and_compare(model, feeds, ["BatchNormalization+MatMul"])
    assert ops(folded) == {"MatMul": 1, "Add": 1}


def test_bn_matmul_rank3_not_folded(rng):
    model, feeds = matmul_model(rng, bn_after=False, rows=("B", 6), k=6)
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["BatchNormalization"] == 1


def test_bn_matmul_rank_unknown_not_folded(rng):
    """x reshaped by a runtime shape of unknown length: BN's input has no known rank."""
    model, feeds = matmul_model(rng, bn_after=False)
    g = model.graph
    g.input[0].CopyFrom(vinfo("x", ["N"]))
    g.input.append(vinfo("shape", ["R"], TensorProto.INT64))
    g.node.insert(0, helper.make_node("Reshape", ["x", "shape"], ["a"]))
    feeds = {"x": rng.normal(size=18).astype(np.float32), "shape": np.array([3, 6])}
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["BatchNormalization"] == 1


def test_bn_matmul_rank_from_shape_inference(rng):
    """No shape on the graph input, but Flatten makes the BN input rank 2."""
    model, feeds = matmul_model(rng, bn_after=False, k=6)
    g = model.graph
    g.input[0].CopyFrom(vinfo("x", ["N", 2, 3]))  # "a", the BN's input, has no type in the model
    g.node.insert(0, helper.make_node("Flatten", ["x"], ["a"]))
    feeds = {"x": rng.normal(size=(3, 2, 3)).astype(np.float32)}
    folded, _ = fold_and_compare(model, feeds, ["BatchNormalization+MatMul"])
    assert ops(folded) == {"Flatten": 1, "MatMul": 1, "Add": 1}


# --- BN -> Conv ---------------------------------------------------------------------------------

def bn_conv_model(rng, kernel=(1, 1), pads=None, group=1, bias=True):
    cin, cout = 4, 6
    inits = [tensor("w", weight(rng, (cout, cin // group, *kernel), cin))] + bn_inits(rng, cin)
    ins = ["h", "w"]
    if bias:
        inits.append(tensor("b", rng.normal(size=cout)))
        ins.append("b")
    attrs = {"group": group}
    if pads is not None:
        attrs["pads"] = pads
    nodes = [bn_node("x", "h"), helper.make_node("Conv", ins, ["y"], name="conv", **attrs)]
    model = make_model(nodes, [vinfo("x", ["N", cin, 5, 5])], [vinfo("y", 4)], inits)
    return model, {"x": rng.normal(size=(2, cin, 5, 5)).astype(np.float32)}


@pytest.mark.parametrize("bias", [True, False])
def test_bn_conv1x1(rng, bias):
    model, feeds = bn_conv_model(rng, bias=bias)
    folded, _ = fold_and_compare(model, feeds, ["BatchNormalization+Conv"])
    assert ops(folded) == {"Conv": 1}


@pytest.mark.parametrize("kw", [dict(kernel=(3, 3), pads=[1, 1, 1, 1]), dict(kernel=(3, 3)),
                                dict(pads=[1, 1, 1, 1]), dict(group=2)], ids=["3x3pad", "3x3", "1x1pad", "group"])
def test_bn_conv_not_folded(rng, kw):
    """Zero padding sees zeros where it should see BN(x) = t; groups are not supported."""
    model, feeds = bn_conv_model(rng, **kw)
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["BatchNormalization"] == 1


# --- Dropout and Identity ---------------------------------------------------------------------

def chain_model(rng, middle, inits=(), opset=13, extra_outputs=()):
    """x -> Relu -> r -> <middle nodes: r to d> -> Sigmoid -> y"""
    nodes = [helper.make_node("Relu", ["x"], ["r"])] + middle + [helper.make_node("Sigmoid", ["d"], ["y"])]
    outs = [vinfo("y", 2)] + [vinfo(n, 2, e) for n, e in extra_outputs]
    model = make_model(nodes, [vinfo("x", [3, 4])], outs, list(inits), opset)
    return model, {"x": rng.normal(size=(3, 4)).astype(np.float32)}


@pytest.mark.parametrize("opset", [7, 10, 12, 13, 15])
def test_dropout_removed(rng, opset):
    attrs = {"ratio": 0.3} if opset < 12 else {}
    ins = ["r"] if opset < 12 else ["r", "ratio"]
    inits = [] if opset < 12 else [tensor("ratio", 0.3)]
    model, feeds = chain_model(rng, [helper.make_node("Dropout", ins, ["d"], name="drop", **attrs)], inits, opset)
    folded, report = fold_and_compare(model, feeds, ["Dropout"])
    assert ops(folded) == {"Relu": 1, "Sigmoid": 1}
    assert report == [FoldRecord("Dropout", ("drop",))]
    assert not folded.graph.initializer  # the ratio is not needed any more


def test_dropout_training_mode_false_removed(rng):
    inits = [tensor("ratio", 0.5), tensor("tm", False, np.bool_)]
    model, feeds = chain_model(rng, [helper.make_node("Dropout", ["r", "ratio", "tm"], ["d"])], inits)
    folded, _ = fold_and_compare(model, feeds, ["Dropout"])
    assert ops(folded) == {"Relu": 1, "Sigmoid": 1}


def test_dropout_training_mode_true_kept(rng):
    # ratio 0: the training-mode output equals the input, so ORT's results are comparable
    inits = [tensor("ratio", 0.0), tensor("tm", True, np.bool_)]
    model, feeds = chain_model(rng, [helper.make_node("Dropout", ["r", "ratio", "tm"], ["d"])], inits)
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["Dropout"] == 1


def test_dropout_training_mode_input_kept(rng):
    model, feeds = chain_model(rng, [helper.make_node("Dropout", ["r", "", "tm"], ["d"])])
    model.graph.input.append(vinfo("tm", [], TensorProto.BOOL))
    feeds["tm"] = np.array(False)
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["Dropout"] == 1


def test_dropout_mask_used_kept(rng):
    model, feeds = chain_model(rng, [helper.make_node("Dropout", ["r"], ["d", "mask"])],
                               extra_outputs=[("mask", TensorProto.BOOL)])
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["Dropout"] == 1


def test_dropout_mask_unused_removed(rng):
    model, feeds = chain_model(rng, [helper.make_node("Dropout", ["r"], ["d", "mask"])])
    folded, _ = fold_and_compare(model, feeds, ["Dropout"])
    assert "Dropout" not in ops(folded)


def test_identity_chain_removed(rng):
    middle = [helper.make_node("Identity", ["r"], ["i1"], name="id1"), helper.make_node("Dropout", ["i1"], ["i2"]),
              helper.make_node("Identity", ["i2"], ["d"], name="id2")]
    model, feeds = chain_model(rng, middle)
    folded, _ = fold_and_compare(model, feeds, ["Identity", "Identity", "Dropout"])
    assert ops(folded) == {"Relu": 1, "Sigmoid": 1}


def test_identity_to_graph_output(rng):
    """The removed node's output is a graph output: its producer takes over the name."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Dropout", ["r"], ["d"]),
             helper.make_node("Identity", ["d"], ["y"]), helper.make_node("Sigmoid", ["r"], ["s"])]
    model = make_model(nodes, [vinfo("x", [3, 4])], [vinfo("y", 2), vinfo("s", 2)])
    folded, _ = fold_and_compare(model, {"x": rng.normal(size=(3, 4)).astype(np.float32)}, ["Dropout", "Identity"])
    assert ops(folded) == {"Relu": 1, "Sigmoid": 1}
    assert folded.graph.node[0].output[0] == "y" and folded.graph.node[1].input[0] == "y"


@pytest.mark.parametrize("source", ["input", "output", "initializer"])
def test_identity_kept_when_needed(rng, source):
    """Graph input -> Identity -> graph output, or an output copied to a second output: kept."""
    if source == "input":
        nodes = [helper.make_node("Identity", ["x"], ["y"])]
        model = make_model(nodes, [vinfo("x", [3, 4])], [vinfo("y", 2)])
    elif source == "output":
        nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
        model = make_model(nodes, [vinfo("x", [3, 4])], [vinfo("r", 2), vinfo("y", 2)])
    else:
        nodes = [helper.make_node("Identity", ["k"], ["y"]), helper.make_node("Add", ["x", "k"], ["z"])]
        model = make_model(nodes, [vinfo("x", [3, 4])], [vinfo("y", 2), vinfo("z", 2)],
                           [tensor("k", rng.normal(size=(3, 4)))])
    folded, _ = fold_and_compare(model, {"x": rng.normal(size=(3, 4)).astype(np.float32)}, [])
    assert ops(folded)["Identity"] == 1


def test_identity_output_read_in_subgraph_kept(rng):
    model, feeds = chain_model(rng, [helper.make_node("Identity", ["r"], ["d"])])
    branch = helper.make_graph([helper.make_node("Neg", ["d"], ["o"])], "then", [], [vinfo("o", 2)])
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch))
    model.graph.input.append(vinfo("cond", [], TensorProto.BOOL))
    model.graph.output.append(vinfo("z", 2))
    feeds["cond"] = np.array(True)
    folded, _ = fold_and_compare(model, feeds, [])
    assert ops(folded)["Identity"] == 1


def test_matmul_bn_add_node_takes_bn_name(rng):
    model, feeds = matmul_model(rng)
    folded, _ = fold_and_compare(model, feeds, ["MatMul+BatchNormalization"])
    assert [n.name for n in folded.graph.node] == ["mm", "bn"]


def test_identity_of_initializers_then_fold(rng):
    """The legacy torch exporter writes equal BN parameters once and Identity copies of them."""
    model, feeds = conv_bn_model(rng)
    g = model.graph
    bn = g.node[1]
    bn.input[3], bn.input[4] = "mean_copy", "var_copy"
    g.node.insert(0, helper.make_node("Identity", ["bn.mean"], ["mean_copy"]))
    g.node.insert(0, helper.make_node("Identity", ["bn.var"], ["var_copy"]))
    folded, _ = fold_and_compare(model, feeds, ["Identity", "Identity", "Conv+BatchNormalization"])
    assert ops(folded) == {"Conv": 1}


# --- API ------------------------------------------------------------------------------------------

def test_fold_returns_model_only_by_default(rng):
    model, _ = conv_bn_model(rng)
    assert isinstance(pybn.onnx.fold(model), onnx.ModelProto)


def test_fold_rejects_non_model():
    with pytest.raises(TypeError, match="model"):
        pybn.onnx.fold(b"not a model")


def test_fold_logs(rng, caplog):
    model, _ = conv_bn_model(rng)
    with caplog.at_level(logging.INFO, logger="pybn.onnx"):
        pybn.onnx.fold(model)
    assert "folded Conv+BatchNormalization: conv, bn" in caplog.text


def test_fold_record_str():
    assert str(FoldRecord("Dropout", ("d",))) == "removed Dropout: d"
    assert str(FoldRecord("Conv+BatchNormalization", ("c", "b"))) == "folded Conv+BatchNormalization: c, b"


def test_onnx_missing_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # None in sys.modules: "import onnx" fails
    monkeypatch.delitem(sys.modules, "pybn.onnx")
    with pytest.raises(ImportError, match=r"pip install 'pybn-kernels\[onnx\]'"):
        importlib.import_module("pybn.onnx")


def test_pybn_does_not_import_onnx():
    code = "import sys, pybn; assert 'pybn.onnx' not in sys.modules and 'onnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the published BatchNormalization test models -------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("test_*") if p.is_dir()))
def test_backend_testdata_unchanged(name):
    """Each is a lone BatchNormalization (opset 6) whose parameters are graph inputs."""
    model = onnx.load(str(DATA / name / "model.onnx"))
    folded, report = pybn.onnx.fold(model, return_report=True)
    (bn,) = model.graph.node
    assert report == [NotFolded("BatchNormalization", (label(bn),), f"{bn.input[1]!r} is a graph input, not a "
                                                                    "constant")]
    assert folded.SerializeToString() == model.SerializeToString()
    # still correct: onnxruntime has no BatchNormalization-6, the reference evaluator does
    from onnx.reference import ReferenceEvaluator

    def load(path):
        t = onnx.TensorProto()
        t.ParseFromString(path.read_bytes())
        return numpy_helper.to_array(t)

    x = load(DATA / name / "test_data_set_0" / "input_0.pb")
    expected = load(DATA / name / "test_data_set_0" / "output_0.pb")
    feeds = {model.graph.input[0].name: x}
    feeds.update({t.name: numpy_helper.to_array(t) for t in model.graph.initializer})
    (got,) = ReferenceEvaluator(folded).run(None, feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# --- models exported from PyTorch ---------------------------------------------------------------

def torch_export(module, x):
    torch = pytest.importorskip("torch")
    f = io.BytesIO()
    with warnings.catch_warnings():
        # dynamo=False is the TorchScript exporter, whose output these tests were written
        # against; torch 2.13 warns that it is deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        # PRESERVE (of an eval-mode module) keeps the BatchNormalization nodes, in inference
        # mode: in EVAL mode the exporter folds Conv+BN itself. Constant folding is off, as the
        # exporter asks for with PRESERVE.
        torch.onnx.export(module.eval(), (x,), f, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return onnx.load_from_string(f.getvalue())


def randomize_bn(module, seed=0):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.3)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g))
    return module.eval()


def check_torch_model(module, x, kinds):
    torch = pytest.importorskip("torch")
    model = torch_export(module, x)
    folded, report = fold_and_compare(model, {"x": x.numpy()}, rtol=1e-4, atol=1e-4)
    assert sorted(collections.Counter(r.kind for r in report).items()) == sorted(kinds.items())
    assert "BatchNormalization" not in ops(folded)
    with torch.no_grad():
        np.testing.assert_allclose(run(folded, {"x": x.numpy()})[0], module(x).numpy(), rtol=1e-4, atol=1e-4)
    return folded


def test_torch_red_wine_mlp():
    """The Red Wine model: (Linear 11->1024, ReLU, Dropout(0.3), BatchNorm1d) x 3, Linear 1024->1."""
    torch = pytest.importorskip("torch")
    from tutorial_models import red_wine
    torch.manual_seed(0)
    module = randomize_bn(red_wine())
    x = torch.randn(16, 11)
    folded = check_torch_model(module, x, {"BatchNormalization+Gemm": 3})
    assert ops(folded) == {"Gemm": 4, "Relu": 3}


def test_torch_cnn_with_bn_dropout():
    torch = pytest.importorskip("torch")
    from tutorial_models import CNNWithBNDropout

    torch.manual_seed(0)
    module = randomize_bn(CNNWithBNDropout())
    folded = check_torch_model(module, torch.randn(4, 1, 28, 28), {"Conv+BatchNormalization": 1})
    assert ops(folded)["Conv"] == 1


def test_torch_resnet_block():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin=8, cout=16, stride=2):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            self.dw = nn.Conv2d(cout, cout, 3, 1, 1, groups=cout)
            self.bn3 = nn.BatchNorm2d(cout)
            self.up = nn.ConvTranspose2d(cout, cin, 2, 2, groups=2)
            self.bn4 = nn.BatchNorm2d(cin)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.bn2(self.conv2(y)) + self.short(x))
            y = torch.relu(self.bn3(self.dw(y)))
            return self.bn4(self.up(y))

    torch.manual_seed(0)
    module = randomize_bn(Block())
    folded = check_torch_model(module, torch.randn(2, 8, 12, 12),
                               {"Conv+BatchNormalization": 4, "ConvTranspose+BatchNormalization": 1})
    assert ops(folded) == {"Conv": 4, "ConvTranspose": 1, "Relu": 3, "Add": 1}


# --- the command line -------------------------------------------------------------------------------

def cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "pybn", "fold", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def test_cli_fold(rng, tmp_path):
    model, feeds = conv_bn_model(rng)
    model.graph.node.append(helper.make_node("Dropout", ["y"], ["z"], name="drop"))
    model.graph.output[0].CopyFrom(vinfo("z", 4))
    onnx.save(model, str(tmp_path / "in.onnx"))
    r = cli(tmp_path, "in.onnx", "out.onnx")
    assert r.returncode == 0, r.stderr
    assert "folded Conv+BatchNormalization: conv, bn" in r.stdout
    assert "removed Dropout: drop" in r.stdout
    lines = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line.startswith("  ")}
    assert lines["BatchNormalization"] == ["1", "->", "0"]
    assert lines["Dropout"] == ["1", "->", "0"]
    assert lines["Conv"] == ["1", "->", "1"]
    assert "nodes: 3 -> 1" in r.stdout
    out = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(out, full_check=True)
    assert ops(out) == {"Conv": 1}
    np.testing.assert_allclose(run(out, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_cli_missing_file(tmp_path):
    r = cli(tmp_path, "nope.onnx", "out.onnx")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "nope.onnx" in r.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"", b"hello, not a model\n"],
                         ids=["garbage", "empty", "text"])
def test_cli_invalid_file(tmp_path, content):
    (tmp_path / "bad.onnx").write_bytes(content)
    r = cli(tmp_path, "bad.onnx", "out.onnx")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "bad.onnx" in r.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_cli_help_lists_fold(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pybn", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and "fold" in r.stdout


# --- annotations fold must not trust, invalid models it must refuse, hostile ones -------------------

def stale_rank_model(rng, bn_after):
    """A rank-3 MatMul next to a BN, with value_info claiming the value between is rank 2: the
    checker accepts it and onnxruntime runs it (it only warns)."""
    if bn_after:  # (B, 5, 6) @ (6, 5) -> "m" (B, 5, 5) -> BN(5): normalizes axis 1, the 5 rows
        model, feeds = matmul_model(rng, rows=("B", 5))
        model.graph.value_info.append(vinfo("m", ["B", 5]))
    else:  # (B, 6, 6) -> BN(6) -> "h" -> MatMul: BN normalizes axis 1, MatMul contracts axis 2
        model, feeds = matmul_model(rng, bn_after=False, rows=("B", 6), k=6)
        model.graph.value_info.append(vinfo("h", ["B", 6]))
    onnx.checker.check_model(model)
    return model, feeds


@pytest.mark.parametrize("bn_after", [True, False], ids=["matmul_bn", "bn_matmul"])
def test_stale_value_info_rank_is_not_trusted(rng, bn_after):
    model, feeds = stale_rank_model(rng, bn_after)
    folded, report = pybn.onnx.fold(model, return_report=True)
    want, got = run(model, feeds)[0], run(folded, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    value = "its output 'm'" if bn_after else "its input 'a'"
    assert reasons(report) == {"bn": f"with mm: {value} has rank 3; the fold is exact only for rank 2"}


def test_wrong_value_info_does_not_stop_a_fold(rng):
    """The rank comes from inference, so a wrong annotation claiming rank 3 does not block it."""
    model, feeds = matmul_model(rng)
    model.graph.value_info.append(vinfo("m", ["M", 5, 1]))
    folded, report = pybn.onnx.fold(model, return_report=True)
    assert report == [FoldRecord("MatMul+BatchNormalization", ("mm", "bn"))]
    np.testing.assert_allclose(run(folded, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_failed_shape_inference_is_the_reason(rng):
    model, feeds = matmul_model(rng, bn_after=False)
    model.graph.node.insert(0, helper.make_node("Reshape", ["x", "bad_shape"], ["a"]))  # inconsistent
    model.graph.input[0].CopyFrom(vinfo("x", [3, 6]))
    model.graph.initializer.append(tensor("bad_shape", [4, 5], np.int64))
    _, report = pybn.onnx.fold(model, return_report=True)
    assert reasons(report)["bn"].startswith("with mm: the rank of its input 'a' is not known: shape inference "
                                            "failed (")


def invalid(rng, case):
    model, _ = conv_bn_model(rng, cin=3, cout=3, kernel=(1, 1))
    g = model.graph
    w = g.initializer[0]  # "w": (3, 3, 1, 1) float32, 36 bytes
    if case == "duplicate_initializer":
        g.initializer.append(tensor("w", np.zeros((3, 3, 1, 1))))
    elif case == "cycle":
        g.node[0].input[0] = "y"
    elif case == "unsorted":
        g.node.reverse()
    elif case == "undefined_input":
        g.node[0].input[0] = "nowhere"
    elif case == "raw_data_long":
        w.raw_data = w.raw_data + bytes(8)
    elif case == "raw_data_short":
        w.raw_data = w.raw_data[:-4]
    elif case == "no_data":
        w.ClearField("raw_data")
    elif case == "two_fields":
        w.float_data.extend([1.0] * 9)
    elif case == "float_data_count":
        w.ClearField("raw_data")
        w.float_data.extend([1.0] * 8)
    elif case == "negative_dim":
        w.dims[0] = -3
    elif case == "huge_dims":  # declares 2**80 elements, holds 36 bytes: nothing may allocate for it
        del w.dims[:]
        w.dims.extend([2**40, 2**40])
    elif case == "external_without_location":
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
    elif case == "no_opset":
        del model.opset_import[:]
    elif case == "empty":
        model = onnx.ModelProto()
    return model


INVALID = {
    "duplicate_initializer": "w initializer name is not unique",
    "cycle": "topologically sorted",
    "unsorted": "topologically sorted",
    "undefined_input": "topologically sorted",
    "raw_data_long": "initializer 'w' holds 44 bytes of raw data; its shape (3, 3, 1, 1) and type FLOAT need 36",
    "raw_data_short": "initializer 'w' holds 32 bytes of raw data; its shape (3, 3, 1, 1) and type FLOAT need 36",
    "no_data": "initializer 'w' holds no data; its shape (3, 3, 1, 1) and type FLOAT need 9 elements",
    "two_fields": "initializer 'w' has data in two fields (raw_data, float_data)",
    "float_data_count": "initializer 'w' holds 8 values in float_data; its shape (3, 3, 1, 1) and type FLOAT need 9",
    "negative_dim": "initializer 'w' has a negative dimension in (-3, 3, 1, 1)",
    "huge_dims": "initializer 'w' holds 36 bytes of raw data; its shape (1099511627776, 1099511627776) and type "
                 "FLOAT need 4835703278458516698824704",
    "external_without_location": "initializer 'w' has external data without a location",
    "no_opset": "opset_import",
    "empty": "ir_version",
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_model_is_refused(rng, case):
    """fold checks its input as the command line does: an invalid model gives a ValueError, never a
    model computing something else (two initializers named "w": the runtime takes the last)."""
    model = invalid(rng, case)
    with pytest.raises(ValueError, match=r"^model: ") as info:
        pybn.onnx.fold(model)
    assert INVALID[case] in str(info.value)


def test_invalid_tensor_in_a_subgraph_is_refused(rng):
    model, _ = conv_bn_model(rng)
    bad = tensor("k", [1.0, 2.0])
    bad.raw_data = bad.raw_data[:4]
    branch = helper.make_graph([helper.make_node("Identity", ["k"], ["o"])], "then", [], [vinfo("o", 1)], [bad])
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], name="if", then_branch=branch,
                                             else_branch=branch))
    model.graph.input.append(vinfo("cond", [], TensorProto.BOOL))
    model.graph.output.append(vinfo("z", 1))
    with pytest.raises(ValueError, match=r"^model: initializer 'k' in a subgraph of node if holds 4 bytes"):
        pybn.onnx.fold(model)


@pytest.mark.parametrize("case", ["nan_mean", "inf_var", "negative_var", "zero_var_zero_eps", "inf_scale"])
def test_non_finite_or_negative_statistics_are_left_to_the_runtime(rng, case):
    model, feeds = conv_bn_model(rng, bn_attrs={"eps": 0.0} if case == "zero_var_zero_eps" else None)
    inits = {t.name: t for t in model.graph.initializer}
    name, channel, value = {"nan_mean": ("bn.mean", 2, np.nan), "inf_var": ("bn.var", 0, np.inf),
                            "negative_var": ("bn.var", 4, -0.5), "zero_var_zero_eps": ("bn.var", 1, 0.0),
                            "inf_scale": ("bn.scale", 3, np.inf)}[case]
    values = numpy_helper.to_array(inits[name]).copy()
    values[channel] = value
    inits[name].CopyFrom(tensor(name, values))
    folded, report = fold_and_compare(model, feeds, [])  # the runtime's NaN and infinities, unchanged
    assert reasons(report) == {"bn": {
        "nan_mean": "bn.mean is not finite in channel 2", "inf_var": "bn.var is not finite in channel 0",
        "negative_var": "bn.var is negative in channel 4 (a variance is >= 0)",
        "zero_var_zero_eps": "bn.var + eps is 0 in channel 1 (the batch norm divides by 0 there)",
        "inf_scale": "bn.scale is not finite in channel 3"}[case]}


def test_folded_weights_that_overflow_are_not_written(rng):
    model, feeds = conv_bn_model(rng)
    inits = {t.name: t for t in model.graph.initializer}
    inits["w"].CopyFrom(tensor("w", np.full((6, 4, 3, 3), 3e37)))
    inits["bn.var"].CopyFrom(tensor("bn.var", np.full(6, 1e-4)))  # scale ~ 30: 1e39 is past float32
    folded, report = pybn.onnx.fold(model, return_report=True)
    assert reasons(report) == {"bn": "with conv: the folded weights would not be finite in float32"}
    assert ops(folded)["BatchNormalization"] == 1


def test_weight_dtypes_that_are_not_folded(rng):
    """float16 and bfloat16 graphs fold (tests/test_fold_onnx_half.py); integer statistics do not."""
    model, _ = conv_bn_model(rng)
    inits = {t.name: t for t in model.graph.initializer}
    inits["bn.var"].CopyFrom(tensor("bn.var", np.ones(6), np.int64))
    _, report = pybn.onnx.fold(model, return_report=True)
    assert reasons(report) == {"bn": "'bn.var' is int64, not a float tensor"}


def test_batch_norm_inside_a_subgraph_is_reported(rng):
    model, feeds = conv_bn_model(rng)
    inner, _ = conv_bn_model(rng)
    for n in inner.graph.node:  # values of its own, reading the main graph's x
        n.output[0] = "inner_" + n.output[0]
        n.input[0] = "x" if n.op_type == "Conv" else "inner_" + n.input[0]
    body = helper.make_graph(list(inner.graph.node), "then", [], [vinfo("inner_y", 4)],
                             list(inner.graph.initializer))
    other = helper.make_graph([helper.make_node("Neg", ["inner_y"], ["o"])], "else", [], [vinfo("o", 4)])
    other.node.insert(0, helper.make_node("Relu", ["x"], ["inner_y"]))
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], name="if", then_branch=body,
                                             else_branch=other))
    model.graph.input.append(vinfo("cond", [], TensorProto.BOOL))
    model.graph.output.append(vinfo("z", 4))
    for cond in (True, False):
        feeds["cond"] = np.array(cond)
        folded, report = fold_and_compare(model, feeds, ["Conv+BatchNormalization"])
    assert report[1:] == [NotFolded("BatchNormalization", ("bn",), "inside a subgraph of if: only the main graph "
                                                                   "is folded")]


def test_zero_channels(rng):
    """A batch norm of 0 channels after a conv of 0 output channels: folded, nothing to compute."""
    model, _ = conv_bn_model(rng, cin=4, cout=0)
    folded, report = pybn.onnx.fold(model, return_report=True)
    assert report == [FoldRecord("Conv+BatchNormalization", ("conv", "bn"))]
    onnx.checker.check_model(folded, full_check=True)
    assert [tuple(t.dims) for t in folded.graph.initializer] == [(0, 4, 3, 3), (0,)]


def test_nan_gemm_alpha_is_not_folded(rng):
    model, feeds = gemm_model(rng, transB=1, alpha=float("nan"))
    folded, report = fold_and_compare(model, feeds, [])
    assert reasons(report) == {"bn": "with gemm: the folded weights would not be finite in float32"}


def test_batch_norm_in_a_model_function_is_reported(rng):
    model, feeds = conv_bn_model(rng)
    body = [helper.make_node("BatchNormalization", ["X", "s", "b", "m", "v"], ["Y"], name="inner_bn")]
    model.functions.append(helper.make_function("local", "MyNorm", ["X", "s", "b", "m", "v"], ["Y"], body,
                                                [helper.make_opsetid("", 13)]))
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.graph.node.append(helper.make_node("MyNorm", ["y", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["z"],
                                             domain="local", name="mynorm"))
    model.graph.output.append(vinfo("z", 4))
    _, report = fold_and_compare(model, feeds, ["Conv+BatchNormalization"])
    assert reasons(report) == {"inner_bn": "inside function local.MyNorm: only the main graph is folded"}
