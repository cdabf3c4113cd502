"""``python -m pybn fold`` on a model whose external data passes 2 GiB, the most one protobuf
message can hold: checked by path, never loaded whole, its weights kept external next to OUT.

Opt-in (``pytest -m bigmodel``): the data file is sparse, so it takes almost no disk, but
onnxruntime reads its 2 GiB to run the folded model (skipped, with the reason, where 6 GiB of
memory are not available).
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from test_fold_onnx import bn_inits, bn_node, make_model, run, vinfo, weight  # noqa: E402

pytestmark = pytest.mark.bigmodel

ELEMENTS = 2**29 + 4096  # float32: 2 GiB + 16 KiB
MARKS = {0: 1.5, 2**29 - 1: -2.5, 2**29: 3.25, ELEMENTS - 1: 7.0}  # on both sides of byte 2**31
CHILD_ADDRESS_SPACE = 1536 << 20  # bytes: the command runs in less than one copy of the big tensor


def available_memory():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def big_model(folder, rng):
    """x -> Conv -> BN -> y (folded), and idx -> Gather(E) -> z with E of ELEMENTS float32 in big.bin."""
    c = 8
    inits = [numpy_helper.from_array(weight(rng, (c, c, 3, 3), 9 * c).astype(np.float32), "w")] + bn_inits(rng, c)
    big = TensorProto()
    big.name, big.data_type = "E", TensorProto.FLOAT
    big.dims.append(ELEMENTS)
    big.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.bin"), ("offset", "0"), ("length", str(4 * ELEMENTS))):
        entry = big.external_data.add()
        entry.key, entry.value = key, value
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]), bn_node("h", "y"),
             helper.make_node("Gather", ["E", "idx"], ["z"], name="gather")]
    model = make_model(nodes, [vinfo("x", ["N", c, 5, 5]), vinfo("idx", [len(MARKS)], TensorProto.INT64)],
                       [vinfo("y", 4), vinfo("z", [len(MARKS)])], inits + [big])
    with open(folder / "big.bin", "wb") as f:  # sparse: zeros but for the marks
        f.truncate(4 * ELEMENTS)
        for index, value in MARKS.items():
            f.seek(4 * index)
            f.write(np.float32(value).tobytes())
    onnx.save(model, str(folder / "m.onnx"))
    feeds = {"x": rng.normal(size=(2, c, 5, 5)).astype(np.float32), "idx": np.array(list(MARKS), dtype=np.int64)}
    return model, feeds


def small_part(model):
    """The model without E (runs without the big file): the reference for y."""
    small = onnx.ModelProto()
    small.CopyFrom(model)
    g = small.graph
    del g.node[2]
    del g.input[1]
    del g.output[1]
    del g.initializer[-1]
    return small


def test_external_data_past_2_gib(tmp_path, rng):
    if available_memory() < 6 << 30:
        pytest.skip("needs 6 GiB of available memory (onnxruntime reads the 2 GiB tensor)")
    folder = tmp_path / "in"
    folder.mkdir()
    (tmp_path / "out").mkdir()
    model, feeds = big_model(folder, rng)
    onnx.checker.check_model(str(folder / "m.onnx"))

    def limit():  # the command must not load the big tensor: it could not, in this address space
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))

    r = subprocess.run([sys.executable, "-m", "pybn", "fold", "in/m.onnx", "out/f.onnx"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=900, preexec_fn=limit)
    assert r.returncode == 0, r.stderr
    assert "folded Conv+BatchNormalization: conv, bn" in r.stdout
    assert "wrote out/f.onnx (weights in f.onnx.data next to it)" in r.stdout
    out = tmp_path / "out" / "f.onnx"
    onnx.checker.check_model(str(out))  # by path, as the data exceed one protobuf
    folded = onnx.load(str(out), load_external_data=False)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Gather"]
    (e,) = [t for t in folded.graph.initializer if t.name == "E"]
    info = {x.key: x.value for x in e.external_data}
    assert info["location"] == "f.onnx.data" and int(info["length"]) == 4 * ELEMENTS
    data = tmp_path / "out" / "f.onnx.data"
    with open(data, "rb") as f:
        for index, value in MARKS.items():
            f.seek(int(info["offset"]) + 4 * index)
            assert np.frombuffer(f.read(4), np.float32)[0] == value
    assert data.stat().st_blocks * 512 < 64 << 20  # the zeros stayed holes: a few MiB on disk, not 2 GiB

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y, z = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(z, np.array(list(MARKS.values()), dtype=np.float32))
    (want,) = run(small_part(model), {"x": feeds["x"]})
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    assert os.path.getsize(folder / "big.bin") == 4 * ELEMENTS  # the input's data untouched
