"""The published ONNX backend test cases for BatchNormalization (eval mode,
exported from PyTorch; see data/onnx_pytorch_converted/SOURCE.txt)."""

import pathlib

import numpy as np
import pytest

import pybn

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data" / "onnx_pytorch_converted"
CASES = sorted(p.name for p in DATA.glob("test_*") if p.is_dir())


def test_cases_present():
    assert (DATA / "SOURCE.txt").is_file()
    assert len(CASES) == 5


def load_tensor(path):
    t = onnx.TensorProto()
    t.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(t)


def load_case(name):
    model = onnx.load(str(DATA / name / "model.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(nodes) == 1
    node = nodes[0]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scale, bias, mean, var = (inits[n] for n in node.input[1:5])
    eps = 1e-5  # the operator's default
    for a in node.attribute:
        if a.name == "epsilon":
            eps = a.f
    x = load_tensor(DATA / name / "test_data_set_0" / "input_0.pb")
    expected = load_tensor(DATA / name / "test_data_set_0" / "output_0.pb")
    return x, scale, bias, mean, var, eps, expected


@pytest.mark.parametrize("name", CASES)
def test_onnx_batchnorm_eval(name, isa):
    x, scale, bias, mean, var, eps, expected = load_case(name)
    assert x.dtype == np.float32 and x.shape[1] == scale.shape[0]
    y = pybn.batch_norm_infer(x, mean, var, scale, bias, eps=eps)
    assert y.dtype == np.float32 and y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # also through the out= path and channels-last
    out = np.empty_like(x)
    assert pybn.batch_norm_infer(x, mean, var, scale, bias, eps=eps,
                                 out=out) is out
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    yl = pybn.batch_norm_infer(xl, mean, var, scale, bias, eps=eps, axis=-1)
    np.testing.assert_allclose(np.moveaxis(yl, -1, 1), expected, rtol=1e-5,
                               atol=1e-5)
