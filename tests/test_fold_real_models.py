"""Opt-in (``-m realmodels``): pybn.torch.fold and pybn.onnx.fold on the real architectures of
``pybn.bench.fold_models.MODELS`` (torchvision and timm, random weights and batch norm
statistics). Needs torchvision and timm beside torch (see docs/folding.md for the environment);
skipped with the reason when they cannot be imported.

For every model: the folded model's outputs are within 1e-5 of the original's (relative to the
largest output, float32), in torch and in onnxruntime; every batch norm left is in the report,
with a reason saying why no fold is exact there; and pybn leaves no more batch norms than
torch's fx fuser (torch) or onnxruntime's optimizer (ONNX).
"""
from __future__ import annotations

import copy
import warnings

import pytest

pytestmark = pytest.mark.realmodels

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import pybn.onnx  # noqa: E402
import pybn.torch  # noqa: E402
from pybn.bench.fold_models import (MODELS, _export_onnx, _outputs, _session, count_onnx, count_torch,  # noqa: E402
                                    randomize, relative_error)

# Why a batch norm may stay: nothing next to it can take it exactly (pre-activation blocks put an
# activation between it and the conv; an identity branch's batch norm reads a tensor other layers
# read too). Anything else left is a fold missed.
STRUCTURAL = ("no Linear or convolution next to it", "no Conv, ConvTranspose, Gemm or MatMul next to it",
              "is used 2 times", "is used 3 times",
              "its input 'input' is also used", "is also used elsewhere")


def _ids(spec):
    return f"{spec.source}-{spec.name}{'-merge' if spec.merge_branches else ''}".replace(" ", "_")


def _libraries():
    """Import torchvision and timm only when these tests run (not at collection): beside a torch
    it was not built for, importing torchvision fails part way through registering its operators."""
    try:
        import timm  # noqa: F401
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - that failure is a RuntimeError, not an ImportError
        pytest.skip(f"torchvision and timm are needed ({type(exc).__name__}: {exc})"[:300])


@pytest.fixture(scope="module", params=MODELS, ids=_ids)
def case(request):
    _libraries()
    spec = request.param
    torch.manual_seed(0)
    model = randomize(spec.build())
    x = torch.randn(1, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = [t.numpy() for t in _outputs(model(x))]
    return spec, model, x, want


def test_torch_fold(case):
    spec, model, x, want = case
    folded, report = pybn.torch.fold(model, example_inputs=x, merge_branches=spec.merge_branches,
                                     return_report=True)
    with torch.no_grad():
        assert relative_error(want, [t.numpy() for t in _outputs(folded(x))]) < 1e-5
    left = [r for r in report if isinstance(r, pybn.torch.NotFolded) and r.kind in ("batch norm", "affine")]
    assert count_torch(folded, x) == len(left)
    assert all(any(s in r.reason for s in STRUCTURAL) for r in left), left
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(copy.deepcopy(model))
    except Exception:  # noqa: BLE001 - the fuser cannot trace every model
        return
    assert len(left) <= count_torch(fused, x)


def test_onnx_fold(case, tmp_path):
    spec, model, x, want = case
    exported = _export_onnx(model, x)
    folded, report = pybn.onnx.fold(exported, merge_branches=spec.merge_branches, return_report=True)
    feeds = {exported.graph.input[0].name: x.numpy()}
    assert relative_error(want, _session(folded, 1, optimize=False).run(None, feeds)) < 1e-5
    left = [r for r in report if isinstance(r, pybn.onnx.NotFolded) and r.kind in ("BatchNormalization", "Mul+Add")]
    assert count_onnx(folded) == len(left)
    assert all(any(s in r.reason for s in STRUCTURAL) for r in left), left
    optimized = str(tmp_path / "ort.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _session(exported, 1, optimize=True, save_to=optimized)
    assert len(left) <= count_onnx(onnx.load(optimized))
