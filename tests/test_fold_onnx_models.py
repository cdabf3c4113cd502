"""pybn.onnx.fold on what real models export to: frozen batch norms (Conv -> Mul -> Add by
per-channel constants), a batch norm behind a Transpose or Reshape of a MatMul, and the
branches of RepVGG / MobileOne blocks (merge_branches). Graphs are built here and every
folded model is run against the original in onnxruntime (graph optimizations off)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import helper  # noqa: E402

import pybn.onnx  # noqa: E402
from pybn.onnx import FoldRecord, NotFolded  # noqa: E402
from test_fold_onnx import bn_inits, bn_node, make_model, ops, reasons, run, tensor, vinfo, weight  # noqa: E402


def set_attr(node, name, value):
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep + [helper.make_attribute(name, value)])


def fold_check(model, feeds, *, merge_branches=False):
    """Fold; the input must be untouched, the result valid and equal under onnxruntime."""
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    folded, report = pybn.onnx.fold(model, merge_branches=merge_branches, return_report=True)
    assert model.SerializeToString() == before
    onnx.checker.check_model(folded, full_check=True)
    for want, got in zip(run(model, feeds), run(folded, feeds)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    return folded, report


def changes(report):
    return [r for r in report if isinstance(r, FoldRecord)]


# --- Conv -> Mul -> Add (a frozen batch norm) -----------------------------------------------------

def frozen_model(rng, *, shape=(1, 6, 1, 1), op="Conv", cin=4, cout=6, ops_after=("Mul", "Add"), dtype=np.float32,
                 const=None):
    """x -> layer -> Mul(scale) -> Add(shift) (or the ops in `ops_after`) -> y."""
    k = 3 if op == "Conv" else None
    if op == "Conv":
        inits = [tensor("w", weight(rng, (cout, cin, k, k), cin * 9), dtype)]
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])]
        x = rng.normal(size=(2, cin, 5, 5)).astype(dtype)
        xin, rank = vinfo("x", ["N", cin, 5, 5]), 4
    elif op == "ConvTranspose":  # (in, out/group, k, k), group 2
        inits = [tensor("w", weight(rng, (cin, cout // 2, 3, 3), cin * 9), dtype)]
        nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="convt", group=2, strides=[2, 2])]
        x = rng.normal(size=(2, cin, 4, 4)).astype(dtype)
        xin, rank = vinfo("x", ["N", cin, 4, 4]), 4
    elif op == "Gemm":
        inits = [tensor("w", weight(rng, (cout, cin), cin), dtype), tensor("b", rng.normal(size=cout), dtype)]
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["c"], name="gemm", transB=1)]
        x = rng.normal(size=(3, cin)).astype(dtype)
        xin, rank = vinfo("x", ["N", cin]), 2
    else:  # MatMul on a rank-3 input: per-channel on the last axis
        inits = [tensor("w", weight(rng, (cin, cout), cin), dtype)]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["c"], name="mm")]
        x = rng.normal(size=(2, 3, cin)).astype(dtype)
        xin, rank = vinfo("x", [2, 3, cin]), 3
    cur = "c"
    for i, name in enumerate(ops_after):
        value = const[i] if const is not None else rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1, 1], shape)
        inits.append(tensor(f"k{i}", value, dtype))
        out = "y" if i == len(ops_after) - 1 else f"t{i}"
        nodes.append(helper.make_node(name, [cur, f"k{i}"], [out], name=f"{name.lower()}{i}"))
        cur = out
    out_rank = max(rank, len(shape)) if const is None else rank
    return make_model(nodes, [xin], [vinfo("y", out_rank)], inits), {"x": x}


@pytest.mark.parametrize("shape", [(1, 6, 1, 1), (6, 1, 1), (1,), ()], ids=["1c11", "c11", "one", "scalar"])
def test_conv_mul_add_folds(rng, shape):
    model, feeds = frozen_model(rng, shape=shape)
    folded, report = fold_check(model, feeds)
    assert report == [FoldRecord("Conv+Mul+Add", ("conv", "mul0", "add1"))]
    assert ops(folded) == {"Conv": 1}


@pytest.mark.parametrize("chain", [("Sub",), ("Div",), ("Mul", "Sub", "Add"), ("Add", "Mul")])
def test_conv_arithmetic_chains_fold(rng, chain):
    model, feeds = frozen_model(rng, ops_after=chain)
    folded, report = fold_check(model, feeds)
    assert changes(report) == [FoldRecord("Conv+" + "+".join(chain),
                                          ("conv", *(f"{op.lower()}{i}" for i, op in enumerate(chain))))]
    assert ops(folded) == {"Conv": 1}


@pytest.mark.parametrize("op", ["ConvTranspose", "Gemm", "MatMul"])
def test_other_layers_mul_add_fold(rng, op):
    model, feeds = frozen_model(rng, op=op, shape=(6, 1, 1) if op == "ConvTranspose" else (6,))
    folded, report = fold_check(model, feeds)
    assert [r.kind for r in changes(report)] == [f"{op}+Mul+Add"]
    assert sum(ops(folded).values()) == (2 if op == "MatMul" else 1)  # MatMul keeps an Add: its bias


REFUSED = {
    # (1, 6, 1, 1) on a rank-4 output is per channel; (6, 5) varies over space
    "spatial": dict(shape=(6, 1, 5)),
    "rank_up": dict(shape=(1, 1, 6, 1, 1)),
    "wrong_axis": dict(shape=(1, 1, 1, 5)),
    "div_by_zero": dict(ops_after=("Div",), const=[np.array([1, 0, 2, 3, 4, 5.0]).reshape(1, 6, 1, 1)]),
}
REFUSED_WHY = {"spatial": "its constant of shape (6, 1, 5) is not one value per channel",
               "rank_up": "its constant of shape (1, 1, 6, 1, 1) has more dimensions than the layer's output",
               "wrong_axis": "its constant of shape (1, 1, 1, 5) is not one value per channel",
               "div_by_zero": "it divides by 0 in some channel"}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("case", list(REFUSED))
def test_chains_that_are_not_per_channel_are_left(rng, case):
    model, feeds = frozen_model(rng, **REFUSED[case])
    if case == "div_by_zero":  # onnxruntime gives inf there; compare the graph, not the numbers
        folded, report = pybn.onnx.fold(model, return_report=True)
    else:
        folded, report = fold_check(model, feeds)
    assert not changes(report)
    assert ops(folded) == ops(model)
    first = "mul0" if case != "div_by_zero" else "div0"
    if case == "div_by_zero":
        assert report == []  # a single Div is no frozen batch norm (nothing to report)
    else:
        assert report == [NotFolded("Mul+Add", ("mul0", "add1"), f"with conv: {REFUSED_WHY[case]}")]
        assert first in report[0].nodes


def test_conv_output_also_used_elsewhere_is_left(rng):
    model, feeds = frozen_model(rng)
    model.graph.output.append(vinfo("c", 4))
    folded, report = fold_check(model, feeds)
    assert report == [NotFolded("Mul+Add", ("mul0", "add1"), "with conv: its input 'c' is also used elsewhere")]


def test_add_right_after_matmul_stays_its_bias(rng):
    model, feeds = frozen_model(rng, op="MatMul", shape=(6,), ops_after=("Add",))
    folded, report = fold_check(model, feeds)
    assert report == [] and ops(folded) == {"MatMul": 1, "Add": 1}


# --- MatMul -> Transpose / Reshape -> BatchNormalization ------------------------------------------

def matmul_shaped_bn(rng, shaper, *, bias=False):
    c, k = 6, 4
    inits = [tensor("w", weight(rng, (k, c), k), np.float32)] + bn_inits(rng, c)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm")]
    src = "m"
    if bias:
        inits.append(tensor("b", rng.normal(size=c), np.float32))
        nodes.append(helper.make_node("Add", ["m", "b"], ["mb"], name="bias"))
        src = "mb"
    if shaper == "transpose":  # (N, L, C) -> (N, C, L)
        x = rng.normal(size=(2, 5, k)).astype(np.float32)
        nodes.append(helper.make_node("Transpose", [src], ["t"], name="shape", perm=[0, 2, 1]))
        rank = 3
    elif shaper == "transpose_wrong":  # (N, L, C) -> (L, N, C): axis 1 is N (= C here: it runs)
        x = rng.normal(size=(6, 5, k)).astype(np.float32)
        nodes.append(helper.make_node("Transpose", [src], ["t"], name="shape", perm=[1, 0, 2]))
        rank = 3
    elif shaper in ("flatten", "flatten_wrong"):  # (N, L, C) -> (N * L, C) (timm LeViT's), or axis 1: (N, L * C)
        x = rng.normal(size=(2, 3, k)).astype(np.float32) if shaper == "flatten" else \
            rng.normal(size=(2, 1, k)).astype(np.float32)  # (L = 1: the wrong axis runs, and must still be left)
        nodes.append(helper.make_node("Flatten", [src], ["t"], name="shape", axis=2 if shaper == "flatten" else 1))
        rank = 2
    else:  # (N, C) -> (N, C, 1, 1), or (N, C) -> (N, 3, 2, 1) for "reshape_wrong"
        x = rng.normal(size=(4, k)).astype(np.float32)
        target = [4, 6, 1, 1] if shaper == "reshape" else [4, 3, 2, 1]
        inits.append(tensor("shape_to", target, np.int64))
        nodes.append(helper.make_node("Reshape", [src, "shape_to"], ["t"], name="shape"))
        rank = 4
    if shaper == "reshape_wrong":
        inits = [t for t in inits if not t.name.startswith("bn.")] + bn_inits(rng, 3)
    nodes.append(bn_node("t", "y"))
    return make_model(nodes, [vinfo("x", list(x.shape))], [vinfo("y", rank)], inits), {"x": x}


@pytest.mark.parametrize("bias", [False, True], ids=["matmul", "matmul_add"])
@pytest.mark.parametrize("shaper", ["transpose", "reshape", "flatten"])
def test_batch_norm_behind_a_transpose_reshape_or_flatten_folds(rng, shaper, bias):
    """(Flatten: left before, "Flatten is not Transpose or Reshape", 58 of timm levit_128's 64
    batch norms as torch's TorchScript-based exporter writes them)"""
    model, feeds = matmul_shaped_bn(rng, shaper, bias=bias)
    folded, report = fold_check(model, feeds)
    op = shaper.capitalize()
    assert [r.kind for r in changes(report)] == [f"MatMul{'+Add' if bias else ''}+{op}+BatchNormalization"]
    assert "BatchNormalization" not in ops(folded)


@pytest.mark.parametrize("shaper", ["transpose_wrong", "reshape_wrong", "flatten_wrong"])
def test_batch_norm_behind_a_shape_change_that_moves_the_channels_is_left(rng, shaper):
    model, feeds = matmul_shaped_bn(rng, shaper)
    folded, report = fold_check(model, feeds)
    why = {"transpose_wrong": "with shape: perm=[1, 0, 2] does not move the channel axis (the last) to axis 1",
           "reshape_wrong": "with shape: reshaping (4, 6) to (4, 3, 2, 1) does not keep the channel axis as axis 1",
           "flatten_wrong": "with shape: Flatten(axis=1) of a rank-3 input does not keep the channel axis (the last) "
                            "whole"}
    assert reasons(report) == {"bn": why[shaper]}
    assert ops(folded) == ops(model)


# --- branch merging -----------------------------------------------------------------------------

def repvgg_model(rng, *, c=4, group=1, branches=1, identity=True, scale=True, one_pads=0, stride=1):
    """x -> [Conv3x3 (x branches), Conv1x1, BatchNormalization] -> Add tree -> Relu."""
    inits, nodes, outs = [], [], []
    for i in range(branches):
        inits += [tensor(f"w3_{i}", weight(rng, (c, c // group, 3, 3), 9 * c // group)),
                  tensor(f"b3_{i}", rng.normal(size=c))]
        nodes.append(helper.make_node("Conv", ["x", f"w3_{i}", f"b3_{i}"], [f"k{i}"], name=f"conv3_{i}",
                                      pads=[1, 1, 1, 1], group=group, strides=[stride, stride]))
        outs.append(f"k{i}")
    if scale:
        inits += [tensor("w1", weight(rng, (c, c // group, 1, 1), c // group)), tensor("b1", rng.normal(size=c))]
        nodes.append(helper.make_node("Conv", ["x", "w1", "b1"], ["one"], name="conv1", group=group,
                                      pads=[one_pads] * 4, strides=[stride, stride]))
        outs.append("one")
    if identity:
        inits += bn_inits(rng, c, "id")
        nodes.append(bn_node("x", "ident", "id"))
        outs.append("ident")
    cur = outs[0]
    for i, o in enumerate(outs[1:]):
        nodes.append(helper.make_node("Add", [cur, o], [f"s{i}"], name=f"add{i}"))
        cur = f"s{i}"
    nodes.append(helper.make_node("Relu", [cur], ["y"], name="relu"))
    x = rng.normal(size=(2, c, 6, 6)).astype(np.float32)
    return make_model(nodes, [vinfo("x", ["N", c, 6, 6])], [vinfo("y", 4)], inits), {"x": x}


def test_repvgg_block_merges_into_one_conv(rng):
    model, feeds = repvgg_model(rng)
    folded, report = fold_check(model, feeds, merge_branches=True)
    assert changes(report) == [FoldRecord("branches", ("conv3_0", "conv1", "id", "add1", "add0"))]
    assert str(report[0]) == "merged branches: conv3_0, conv1, id, add1, add0"
    assert ops(folded) == {"Conv": 1, "Relu": 1}


def test_mobileone_block_merges_depthwise_branches(rng):
    model, feeds = repvgg_model(rng, c=6, group=6, branches=3)
    folded, _ = fold_check(model, feeds, merge_branches=True)
    assert ops(folded) == {"Conv": 1, "Relu": 1}


def test_strided_block_without_identity_merges(rng):
    model, feeds = repvgg_model(rng, identity=False, stride=2)
    folded, _ = fold_check(model, feeds, merge_branches=True)
    assert ops(folded) == {"Conv": 1, "Relu": 1}


def test_branches_merge_only_on_request(rng):
    model, feeds = repvgg_model(rng)
    folded, report = fold_check(model, feeds)
    assert ops(folded) == ops(model)
    assert reasons(report) == {"id": "no Conv, ConvTranspose, Gemm or MatMul next to it"}


def test_windows_inside_one_another_merge_even_with_uneven_pads(rng):
    """3x3 padded (2, 0) and 1x1 unpadded: same output size; the 1x1 reads the last tap's row."""
    model, feeds = repvgg_model(rng, identity=False)
    set_attr(model.graph.node[0], "pads", [2, 2, 0, 0])
    folded, report = fold_check(model, feeds, merge_branches=True)
    assert ops(folded) == {"Conv": 1, "Relu": 1}


def test_branches_with_other_dilations_are_not_merged(rng):
    model, feeds = repvgg_model(rng, identity=False)
    conv3 = model.graph.node[0]
    set_attr(conv3, "pads", [2, 2, 2, 2])
    set_attr(conv3, "dilations", [2, 2])
    folded, report = fold_check(model, feeds, merge_branches=True)
    assert ops(folded) == ops(model) and not changes(report)


def test_identity_batch_norm_of_another_input_is_not_merged(rng):
    model, feeds = repvgg_model(rng)
    model.graph.node[-3].input[0] = "x2"  # the identity branch reads another tensor
    model.graph.input.append(vinfo("x2", ["N", 4, 6, 6]))
    feeds["x2"] = rng.normal(size=(2, 4, 6, 6)).astype(np.float32)
    folded, _ = fold_check(model, feeds, merge_branches=True)
    assert ops(folded) == ops(model)


@pytest.mark.parametrize("name", ["merge_branches", "return_report"])
def test_flags_must_be_bools(rng, name):
    model, _ = repvgg_model(rng)
    with pytest.raises(TypeError, match=f"^{name}: must be a bool"):
        pybn.onnx.fold(model, **{name: "False"})


def test_command_line_merges_branches_on_request(rng, tmp_path):
    model, feeds = repvgg_model(rng)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    for flag, convs in (([], 2), (["--merge-branches"], 1)):
        out = subprocess.run([sys.executable, "-m", "pybn", "fold", str(src), str(dst), *flag], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert ops(onnx.load(dst))["Conv"] == convs
    assert "merged branches: conv3_0, conv1, id, add1, add0" in out.stdout
