"""torch.onnx.export of models holding pybn.torch's modules: batch norm and unseeded dropout
export as ONNX's own operators (pybn/torch/_capture.py, exporting_onnx), checked by running
the exported file in onnxruntime against the stock model; what only pybn's masks compute is
refused with a TypeError naming it, before a pinned offset moves."""
import copy
import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import pybn.torch as pt  # noqa: E402
from pybn.nn import mc_dropout  # noqa: E402
from pybn.torch import nn as pnn  # noqa: E402

nn = torch.nn


def _dynamo_available():
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return "dynamo" in torch.onnx.export.__code__.co_varnames


# dynamo=False: TorchScript's exporter; dynamo=True: torch.export's (torch's default from 2.9)
EXPORTERS = [False, pytest.param(True, marks=pytest.mark.skipif(not _dynamo_available(),
                                                                 reason="the dynamo exporter needs onnxscript"))]


def export(model, x, dynamo, **kwargs):
    f = io.BytesIO()
    with warnings.catch_warnings():
        # TorchScript's exporter is deprecated (a DeprecationWarning on torch 2.13); the
        # dynamo one warns of torchvision's missing operators and of its own internals
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), f, dynamo=True, verbose=False, **kwargs)
        else:
            torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17, **kwargs)
    return onnx.load_from_string(f.getvalue())


def run(model_proto, x):
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def op_types(model_proto):
    return {(n.domain, n.op_type) for n in model_proto.graph.node}


class Net(nn.Module):
    """Every batch norm and dropout module torch has, in a small conv net."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop2 = nn.Dropout2d(0.3)
        self.bn1 = nn.BatchNorm1d(8)
        self.drop1 = nn.Dropout1d(0.2)
        self.bn3 = nn.BatchNorm3d(8)
        self.drop3 = nn.Dropout3d(0.1)
        self.alpha = nn.AlphaDropout(0.2)
        self.sync = nn.SyncBatchNorm(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = self.drop2(torch.relu(self.bn2(self.conv(x))))
        n, c, h, w = y.shape
        y = self.drop1(self.bn1(y.reshape(n, c, h * w))).reshape(n, c, h, w)
        y = self.drop3(self.bn3(y.unsqueeze(2))).squeeze(2)
        y = self.sync(self.alpha(y))
        return self.fc(self.drop(y.flatten(1)))


def trained_stats(model):
    """Running statistics and affine parameters that are not the defaults (so a batch norm
    dropped from the export would show)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g))
    return model


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_accelerated_model_exports_as_the_stock_model(dynamo, channels_last):
    stock = trained_stats(Net()).eval()
    model, swapped = pt.accelerate(copy.deepcopy(stock), return_report=True)
    assert len(swapped) == 9  # (every batch norm and dropout module became pybn's)
    x = torch.randn(2, 3, 4, 4)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    exported = export(model, x, dynamo)
    assert all(domain in ("", "ai.onnx") for domain, _ in op_types(exported)), op_types(exported)
    with torch.no_grad():
        np.testing.assert_allclose(run(exported, x), stock(x).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(run(exported, x), model(x).numpy(), rtol=1e-5, atol=1e-5)


class Tail(nn.Module):
    """A ResNet block's tail through pybn's fused call (module and function) and pybn's own
    modules, which are the identity in evaluation mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = pnn.BatchNorm2d(4)
        self.bn_f = nn.BatchNorm2d(4)
        self.path = pnn.DropPath(0.3)
        self.block = pnn.DropBlock2d(0.3, block_size=3)
        self.noise = pnn.GaussianNoise(0.5)
        self.gdrop = pnn.GaussianDropout(0.5)
        self.relu_drop = pnn.Dropout(0.4)

    def forward(self, x):
        y = self.bn(self.conv(x), x, relu=True)
        m = self.bn_f
        y = pnn.batch_norm_add_relu(y, x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.1, m.eps)
        y = self.gdrop(self.noise(self.block(self.path(y))))
        return self.relu_drop(y, relu=True)


def tail_reference(model, x):
    """The same computation in torch's functions."""
    def bn(m, v):
        return nn.functional.batch_norm(v, m.running_mean, m.running_var, m.weight, m.bias, False, 0.1, m.eps)

    y = torch.relu(bn(model.bn, model.conv(x)) + x)
    return torch.relu(torch.relu(bn(model.bn_f, y) + x))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_fused_tails_and_pybn_modules_export_in_evaluation_mode(dynamo):
    model = trained_stats(Tail()).eval()
    x = torch.randn(2, 4, 5, 5)
    exported = export(model, x, dynamo)
    assert all(domain in ("", "ai.onnx") for domain, _ in op_types(exported)), op_types(exported)
    with torch.no_grad():
        np.testing.assert_allclose(run(exported, x), tail_reference(model, x).numpy(), rtol=1e-5, atol=1e-5)


def test_fuse_tails_output_exports():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.drop = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.3)

        def forward(self, x):
            return self.drop(torch.relu(self.bn(self.conv(x)) + x))

    stock = trained_stats(Block()).eval()
    fused = pt.fuse_tails(pt.accelerate(copy.deepcopy(stock))).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        np.testing.assert_allclose(run(export(fused, x, False), x), stock(x).numpy(), rtol=1e-5, atol=1e-5)


def test_training_mode_exports_onnx_batch_norm_and_dropout():
    # (torch's exporter has no training-mode Dropout2d, pybn's or torch's: aten::feature_dropout)
    model = nn.Sequential(pnn.BatchNorm2d(3), pnn.Dropout(0.5)).train()
    x = torch.randn(4, 3, 5, 5)
    exported = export(model, x, False, training=torch.onnx.TrainingMode.TRAINING)
    types = [n.op_type for n in exported.graph.node]
    assert "BatchNormalization" in types and "Dropout" in types, types
    assert not any(n.domain not in ("", "ai.onnx") for n in exported.graph.node)


def refusing_models():
    yield "Dropout(seed=...)", pnn.Dropout(0.5, seed=3)
    yield "DropPath(seed=...)", pnn.DropPath(0.5, seed=3)
    yield "pybn::dropout", pnn.DropPath(0.5)
    yield "pybn::dropout", pnn.StochasticDepth(0.5, "batch")
    yield "Dropout2d(seed=...)", pnn.Dropout2d(0.5, seed=7)
    yield "pybn::drop_block", pnn.DropBlock2d(0.5, block_size=3)
    yield "pybn::gaussian_noise", pnn.GaussianNoise(0.5)
    yield "pybn::gaussian_dropout", pnn.GaussianDropout(0.5)
    yield "AlphaDropout(seed=...)", pnn.AlphaDropout(0.5, seed=1)


@pytest.mark.parametrize("name,module", list(refusing_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_pybn_masks_in_training_mode_are_refused_naming_the_module(name, module):
    module.train()
    offset = getattr(module, "offset", None)
    with pytest.raises(TypeError, match=r"^" + name.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
                       + ": torch.onnx.export cannot export pybn's masks"):
        export(nn.Sequential(module), torch.randn(2, 3, 5, 5), False, training=torch.onnx.TrainingMode.TRAINING)
    assert getattr(module, "offset", None) == offset  # (nothing advanced)


def test_mc_dropout_export_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), pnn.Dropout(0.5)).eval()
    # (PRESERVE: the exporter's default, EVAL, exports the model in evaluation mode)
    with mc_dropout(model, seed=1, sample=0), \
            pytest.raises(TypeError, match=r"Dropout\(seed=\.\.\.\): torch.onnx.export cannot export"):
        export(model, torch.randn(2, 4), False, training=torch.onnx.TrainingMode.PRESERVE)
    assert model[1].seed is None and not model[1].training  # (restored)
    np.testing.assert_allclose(run(export(model, torch.randn(2, 4), False), torch.ones(2, 4)),
                               model(torch.ones(2, 4)).detach().numpy(), rtol=1e-6)


class NumpyInForward(nn.Module):
    """A forward torch.export's non-strict mode cannot capture (NumPy on a tensor): the dynamo
    exporter falls back to strict mode, where dynamo made torch.onnx.is_in_onnx_export()
    False, and pybn::batch_norm_infer reached the ONNX graph (ConversionError)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.from_numpy(np.tanh(self.bn(self.conv(x)).numpy()))


@pytest.mark.skipif(not _dynamo_available(), reason="the dynamo exporter needs onnxscript")
def test_dynamo_exporter_in_strict_mode():
    stock = trained_stats(NumpyInForward()).eval()
    model = pt.accelerate(copy.deepcopy(stock))
    x = torch.randn(2, 3, 8, 8)
    exported = export(model, x, True)
    assert {t for _, t in op_types(exported)} == {"Conv", "Tanh"}
    with torch.no_grad():
        np.testing.assert_allclose(run(exported, x), stock(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _dynamo_available(), reason="the dynamo exporter needs onnxscript")
def test_dynamo_exporter_reports_the_refusal():
    module = pnn.Dropout(0.5, seed=3).train()
    with pytest.raises(Exception, match=r"Dropout\(seed=\.\.\.\): torch.onnx.export cannot export pybn's masks"):
        export(nn.Sequential(module), torch.randn(2, 3), True)
    assert module.offset == 0
