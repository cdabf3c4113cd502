"""pybn.torch.fold against PyTorch itself: every folded module must compute what the
original computes in eval mode (docs/folding.md)."""

import copy
import logging
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import pybn.torch  # noqa: E402
from pybn.torch import Folded, NotFolded  # noqa: E402
from reference import nearest_even  # noqa: E402
from tutorial_models import CNNWithBNDropout, red_wine  # noqa: E402

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(1234)


def randomize_batch_norms(model):
    """Non-trivial running statistics and affine parameters (var > 0, gamma far from 1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BATCH_NORMS) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c))
                m.running_var.copy_(torch.rand(c) * 2 + 0.25)
                if m.affine:
                    m.weight.copy_(1 + 0.5 * torch.randn(c))
                    m.bias.copy_(torch.randn(c))
    return model


def assert_same(actual, expected):
    """Equal up to rounding: 1e-5 (float32) or 1e-10 (float64) of the output's scale."""
    tol = 1e-10 if expected.dtype == torch.float64 else 1e-5
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def check_fold(model, x, **kwargs):
    """Fold `model` (with x as the example input unless told otherwise); assert the result
    equals model.eval() on x; return (folded, report)."""
    kwargs.setdefault("example_inputs", x)
    folded, report = pybn.torch.fold(model, return_report=True, **kwargs)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x)
        actual = folded(x)
    assert actual.dtype == expected.dtype
    assert_same(actual, expected)
    return folded, report


def count(model, classes):
    return sum(isinstance(m, classes) for m in model.modules())


# --- layer -> batch norm -------------------------------------------------------------

LAYER_THEN_BN = {
    "linear": (lambda: nn.Linear(7, 5), nn.BatchNorm1d, (4, 7)),
    "conv1d": (lambda: nn.Conv1d(3, 6, 3), nn.BatchNorm1d, (2, 3, 10)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d, (2, 3, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3), nn.BatchNorm3d, (2, 2, 5, 5, 5)),
    "conv2d_groups2": (lambda: nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d, (2, 4, 7, 7)),
    "conv2d_depthwise": (lambda: nn.Conv2d(6, 6, 3, groups=6, padding=1), nn.BatchNorm2d, (2, 6, 7, 7)),
    "conv1d_depthwise_multiplier2": (lambda: nn.Conv1d(3, 6, 3, groups=3), nn.BatchNorm1d, (2, 3, 9)),
    "conv2d_no_bias": (lambda: nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d, (2, 3, 6, 6)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(3, 6, 3, stride=2), nn.BatchNorm1d, (2, 3, 5)),
    "conv_transpose1d_groups2": (lambda: nn.ConvTranspose1d(4, 6, 3, groups=2), nn.BatchNorm1d, (2, 4, 5)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d, (2, 4, 5, 5)),
    "conv_transpose2d_groups2": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d,
                                 (2, 4, 5, 5)),
    "conv_transpose2d_depthwise": (lambda: nn.ConvTranspose2d(6, 6, 3, groups=6), nn.BatchNorm2d, (2, 6, 5, 5)),
    "conv_transpose2d_no_bias": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1, groups=2,
                                                            bias=False), nn.BatchNorm2d, (2, 4, 5, 5)),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(2, 4, 3), nn.BatchNorm3d, (2, 2, 4, 4, 4)),
    "conv_transpose3d_groups2": (lambda: nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2), nn.BatchNorm3d,
                                 (2, 4, 3, 3, 3)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("case", list(LAYER_THEN_BN))
def test_layer_then_batch_norm(case, affine, dtype):
    make_layer, bn_class, shape = LAYER_THEN_BN[case]
    layer = make_layer()
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    model = randomize_batch_norms(nn.Sequential(layer, bn_class(channels, affine=affine))).to(dtype)
    folded, report = check_fold(model, torch.randn(shape, dtype=dtype))

    kind = "linear+bn" if isinstance(layer, nn.Linear) else "conv+bn"
    assert report == [Folded(kind, ("0", "1"))]
    assert count(folded, BATCH_NORMS) == 0
    new = folded.get_submodule("0")
    assert type(new) is type(layer)
    assert new.weight.dtype == new.bias.dtype == dtype
    assert new.weight.requires_grad and new.bias.requires_grad


def test_requires_grad_and_dtype_are_kept():
    layer = nn.Conv2d(3, 4, 3, bias=False).requires_grad_(False)
    model = randomize_batch_norms(nn.Sequential(layer, nn.BatchNorm2d(4))).double()
    folded, _ = check_fold(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    conv = folded.get_submodule("0")
    assert conv.weight.dtype == conv.bias.dtype == torch.float64
    assert not conv.weight.requires_grad and not conv.bias.requires_grad


# --- batch norm -> layer -------------------------------------------------------------

BN_THEN_LAYER = {
    "bn1d_linear": (nn.BatchNorm1d(7), nn.Linear(7, 5), (4, 7), "bn+linear"),
    "bn1d_linear_no_bias": (nn.BatchNorm1d(7), nn.Linear(7, 5, bias=False), (4, 7), "bn+linear"),
    "bn1d_no_affine_linear": (nn.BatchNorm1d(7, affine=False), nn.Linear(7, 5), (4, 7), "bn+linear"),
    "bn2d_conv1x1": (nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), (2, 4, 5, 5), "bn+conv"),
    "bn2d_conv1x1_stride2": (nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, stride=2), (2, 4, 5, 5), "bn+conv"),
    # without padding, the padding mode does not matter
    "bn2d_conv1x1_circular": (nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, padding_mode="circular"), (2, 4, 5, 5),
                              "bn+conv"),
    "bn1d_conv1d_pointwise": (nn.BatchNorm1d(4), nn.Conv1d(4, 3, 1, bias=False), (2, 4, 9), "bn+conv"),
    "bn3d_conv3d_pointwise": (nn.BatchNorm3d(3), nn.Conv3d(3, 2, 1), (2, 3, 3, 4, 5), "bn+conv"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(BN_THEN_LAYER))
def test_batch_norm_then_layer(case, dtype):
    bn, layer, shape, kind = copy.deepcopy(BN_THEN_LAYER[case])
    model = randomize_batch_norms(nn.Sequential(bn, layer)).to(dtype)
    folded, report = check_fold(model, torch.randn(shape, dtype=dtype))
    assert report == [Folded(kind, ("0", "1"))]
    assert count(folded, BATCH_NORMS) == 0
    assert folded.get_submodule("1").weight.dtype == dtype


NOT_FOLDED = {
    # zero padding at the border would not see the BN's shift
    "bn2d_conv3x3": (nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5), "only into a 1x1 conv"),
    "bn2d_conv3x3_no_padding": (nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3), (2, 4, 5, 5), "only into a 1x1 conv"),
    "bn2d_conv1x1_padding1": (nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, padding=1), (2, 4, 5, 5), "pads its input"),
    "bn2d_conv1x1_groups2": (nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, groups=2), (2, 4, 5, 5), "groups=1"),
    # BN before a ConvTranspose: positions no kernel tap reaches would miss the shift
    "bn2d_conv_transpose1x1": (nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 1, stride=2), (2, 4, 5, 5),
                               "before a ConvTranspose"),
    # batch statistics even in eval mode: not an affine map
    "conv_bn_no_running_stats": (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                                 (2, 3, 6, 6), "no running statistics"),
    "bn_no_running_stats_linear": (nn.BatchNorm1d(7, track_running_stats=False), nn.Linear(7, 5), (4, 7),
                                   "no running statistics"),
}


@pytest.mark.parametrize("case", list(NOT_FOLDED))
def test_pairs_that_must_not_fold(case):
    first, second, shape, why = copy.deepcopy(NOT_FOLDED[case])
    model = randomize_batch_norms(nn.Sequential(first, second))
    folded, report = check_fold(model, torch.randn(shape))
    bn_name = "0" if isinstance(first, BATCH_NORMS) else "1"
    assert len(report) == 1 and report[0][:2] == ("batch norm", (bn_name,)) and why in report[0].reason, report
    assert count(folded, BATCH_NORMS) == 1


class ResidualBeforeBN(nn.Module):
    """The conv's output also feeds the residual add: folding BN into it would change that."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    """The same conv is called twice: folding BN into it would change the second call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


class WeightAlsoReadDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x)) + self.fc.weight.sum()


@pytest.mark.parametrize("model_class", [ResidualBeforeBN, SharedConv, WeightAlsoReadDirectly])
def test_layer_with_other_users_is_not_folded(model_class):
    model = randomize_batch_norms(model_class())
    shape = (3, 5) if model_class is WeightAlsoReadDirectly else (2, 4, 6, 6)
    folded, report = check_fold(model, torch.randn(shape))
    assert len(report) == 1 and report[0][:2] == ("batch norm", ("bn",)), report
    assert "used 2 times" in report[0].reason
    assert count(folded, BATCH_NORMS) == 1


def test_hooked_batch_norm_is_not_folded():
    model = randomize_batch_norms(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)))
    calls = []
    model[1].register_forward_hook(lambda *args: calls.append(1))
    folded, report = check_fold(model, torch.randn(3, 5))
    assert report == [NotFolded("batch norm", ("1",), "BatchNorm1d has hooks, which would no longer run")]
    # still runs: in the example call, in the traced graph's check on it, the original and the folded module
    assert calls == [1, 1, 1, 1]


# --- dropout ---------------------------------------------------------------------------

@pytest.mark.parametrize("dropout_class", DROPOUTS)
def test_dropout_modules_are_removed(dropout_class):
    model = nn.Sequential(nn.Tanh(), dropout_class(0.4), nn.ReLU())
    shape = {nn.Dropout1d: (2, 3, 5), nn.Dropout3d: (2, 3, 4, 4, 4)}.get(dropout_class, (2, 3, 5, 5))
    folded, report = check_fold(model, torch.randn(shape))
    assert report == [Folded("dropout", ("1",))]
    assert count(folded, DROPOUTS) == 0


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        x = F.dropout(x, 0.3, training=self.training)  # identity in eval mode: removed
        x = F.alpha_dropout(self.fc(x), 0.2)  # training defaults to False: removed
        x = F.dropout(x, 0.5)  # training defaults to True: drops in eval mode too, kept
        return self.bn(x)


def test_functional_dropout():
    model = randomize_batch_norms(FunctionalDropout())
    folded, report = pybn.torch.fold(model, return_report=True)
    assert report[:2] == [Folded("functional dropout", ("dropout",)), Folded("functional dropout", ("alpha_dropout",))]
    assert report[2] == NotFolded("functional dropout", ("dropout_1",),
                                  "training=True (the default): it drops units in eval mode too")
    assert report[3][:2] == ("batch norm", ("bn",)) and len(report) == 4
    kept = [n for n in folded.graph.nodes if n.op == "call_function" and n.target is F.dropout]
    assert len(kept) == 1
    x = torch.randn(8, 6)
    with torch.no_grad():
        torch.manual_seed(7)
        expected = copy.deepcopy(model).eval()(x)
        torch.manual_seed(7)  # the same dropout mask in both
        actual = folded(x)
    assert_same(actual, expected)
    # the kept dropout sits between fc and bn, so they are not adjacent
    assert count(folded, BATCH_NORMS) == 1


# --- whole models ------------------------------------------------------------------------

def test_red_wine_model(caplog):
    model = red_wine()
    with torch.no_grad():  # running statistics from a few training batches
        for _ in range(3):
            model(torch.rand(256, 11) * 10)
    with torch.no_grad():  # and non-trivial affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.copy_(1 + 0.5 * torch.randn(1024))
                m.bias.copy_(torch.randn(1024))
    with caplog.at_level(logging.INFO, logger="pybn.torch"):
        folded, report = check_fold(model, torch.rand(64, 11) * 10)
    assert count(folded, BATCH_NORMS) == 0 and count(folded, DROPOUTS) == 0
    # every BN follows a ReLU, so each folds into the *next* Linear
    assert sorted(report) == sorted([Folded("dropout", (str(i),)) for i in (2, 6, 10)]
                                    + [Folded("bn+linear", (str(i), str(i + 1))) for i in (3, 7, 11)])
    assert [type(m) for m in folded.children()] == [nn.Linear, nn.ReLU] * 3 + [nn.Linear]
    logged = [r.getMessage() for r in caplog.records if r.name == "pybn.torch"]
    assert len(logged) == 6 and any("bn+linear: 3 -> 4" in m for m in logged)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_seed_cnn(dtype):
    model = randomize_batch_norms(CNNWithBNDropout()).to(dtype)
    folded, report = check_fold(model, torch.randn(4, 1, 28, 28, dtype=dtype))
    assert report == [Folded("dropout", ("dropout",)), Folded("conv+bn", ("conv1", "bn1"))]
    assert count(folded, BATCH_NORMS) == 0 and count(folded, DROPOUTS) == 0


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-bn-relu-conv-bn, plus the identity, relu."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_resnet_basic_block(dtype):
    model = randomize_batch_norms(nn.Sequential(BasicBlock(8), BasicBlock(8))).to(dtype)
    folded, report = check_fold(model, torch.randn(2, 8, 10, 10, dtype=dtype))
    assert report == [Folded("conv+bn", (f"{b}.conv{i}", f"{b}.bn{i}")) for b in (0, 1) for i in (1, 2)]
    assert count(folded, BATCH_NORMS) == 0


class FusedTailBlock(BasicBlock):
    """BasicBlock on pybn's modules, its tail written as one call: bn2(conv2(out), residual=x,
    relu=True) (or as the composite, `fused=False`)."""

    def __init__(self, channels, fused):
        super().__init__(channels)
        self.bn1, self.bn2 = pybn.torch.nn.BatchNorm2d(channels), pybn.torch.nn.BatchNorm2d(channels)
        self.fused = fused

    def forward(self, x):
        if not self.fused:
            return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)
        out = self.bn1(self.conv1(x), relu=True)
        return self.bn2(self.conv2(out), residual=x, relu=True)


def test_block_tail_on_pybn_modules_folds_the_bn_and_keeps_the_add():
    """relu(bn(conv(x)) + identity) on pybn's modules: fold merges the BNs into the convs, the
    add and relu stay, and the result equals the model's."""
    model = randomize_batch_norms(nn.Sequential(FusedTailBlock(8, False), FusedTailBlock(8, False)))
    folded, report = check_fold(model, torch.randn(2, 8, 10, 10))
    assert report == [Folded("conv+bn", (f"{b}.conv{i}", f"{b}.bn{i}")) for b in (0, 1) for i in (1, 2)]
    assert count(folded, BATCH_NORMS) == 0


def test_fused_tail_call_is_left_unfolded_and_exact():
    """A BN called with residual= / relu= (the fused tail) is not a BN alone: fold leaves it,
    says why, and the model computes exactly what it did."""
    model = randomize_batch_norms(nn.Sequential(FusedTailBlock(8, True), FusedTailBlock(8, True)))
    x = torch.randn(2, 8, 10, 10)
    folded, report = check_fold(model, x)
    assert report == [NotFolded("batch norm", (f"{b}.bn{i}",), "it is not called with its input alone")
                      for b in (0, 1) for i in (1, 2)]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), copy.deepcopy(model).eval()(x), rtol=0, atol=0)


def grouped_conv_transpose_bn():
    return randomize_batch_norms(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
                                               nn.BatchNorm2d(6))).eval()


def test_grouped_conv_transpose_folds_exactly():
    model = grouped_conv_transpose_bn()
    _, report = check_fold(model, torch.randn(2, 4, 6, 6))
    assert report == [Folded("conv+bn", ("0", "1"))]


def test_torch_fuse_cannot_fold_grouped_conv_transpose():
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv, bn = grouped_conv_transpose_bn()
    try:
        fuse_conv_bn_eval(conv, bn, transpose=True)
    except RuntimeError:
        return  # torch scales the (in, out/groups, ...) weight as if it were (in, out, ...)
    pytest.skip("this torch folds grouped ConvTranspose -> BN itself")


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 4 * 4, 8), nn.Dropout(0.2), nn.BatchNorm1d(8),
                                  nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3))

    def forward(self, x):
        y = self.features(x)
        if x.sum() > 0:
            y = -y
        return self.head(y)


class BranchOnBatchSize(nn.Module):
    """The batch size picks the batch norm after the shared conv."""

    def __init__(self):
        super().__init__()
        self.c, self.bn, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.c(x)) if x.shape[0] > 1 else self.bn2(self.c(x))


class BranchOnValues(nn.Module):
    """The values pick the conv before the shared batch norm."""

    def __init__(self):
        super().__init__()
        self.c, self.d, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.c(x)) if x.mean() > 0 else self.bn(self.d(x))


@pytest.mark.parametrize("cls, example, other", [
    (BranchOnBatchSize, torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)),
    (BranchOnValues, torch.randn(2, 4, 8, 8) - 1, torch.randn(2, 4, 8, 8) + 1)], ids=["batch size", "values"])
def test_a_module_the_example_did_not_run_stops_the_folds_of_an_untraceable_model(cls, example, other):
    """A branch the example call did not take may pair the folded conv with another batch norm
    (or the batch norm with another conv): folding the example's pairs gave outputs off by
    2.4 and 1.6 on the other branch (found by outside use). Nothing is folded; the report
    names what did not run."""
    model = randomize_batch_norms(cls()).eval()
    folded, report = pybn.torch.fold(model, example_inputs=example, return_report=True)
    with torch.no_grad():
        for x in (example, other):
            assert_same(folded(x), model(x))
    assert report and all(isinstance(r, NotFolded) and "did not run in the example call" in r.reason for r in report)


def test_untraceable_module_folds_inside_sequentials(caplog):
    model = randomize_batch_norms(Untraceable())
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(copy.deepcopy(model))
    with caplog.at_level(logging.INFO, logger="pybn.torch"):
        folded, report = check_fold(model, torch.randn(2, 3, 6, 6) + 1)
    assert_same(folded(-torch.ones(2, 3, 6, 6)), model.eval()(-torch.ones(2, 3, 6, 6)))  # the other branch
    assert type(folded) is Untraceable
    assert count(folded, BATCH_NORMS) == 0 and count(folded, DROPOUTS) == 0
    assert sorted(report) == sorted([
        Folded("dropout", ("features.3",)), Folded("dropout", ("head.2",)),
        Folded("conv+bn", ("features.0", "features.1")), Folded("linear+bn", ("head.1", "head.3")),
        Folded("bn+linear", ("head.5", "head.6"))])
    # folded batch norms become Identity, so indices into the Sequentials stay valid
    assert [type(m) for m in folded.features] == [nn.Conv2d, nn.Identity, nn.ReLU, nn.Identity]
    assert any("cannot trace" in r.getMessage() for r in caplog.records)


# --- the input module, options, errors ---------------------------------------------------

@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
def test_input_module_is_untouched(train_mode):
    model = randomize_batch_norms(CNNWithBNDropout()).train(train_mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    folded = pybn.torch.fold(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert [m.training for m in model.modules()] == modes
    assert count(model, BATCH_NORMS) == 1 and count(model, DROPOUTS) == 1
    assert not any(m.training for m in folded.modules())
    # nothing is shared: changing the result leaves the input alone
    with torch.no_grad():
        for p in folded.parameters():
            p.add_(1)
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), key



@pytest.mark.parametrize("layer", ["linear", "conv1x1"])
def test_a_batch_norm_far_from_zero_stays_before_its_layer(layer):
    """A batch norm before a Linear or 1x1 conv whose mean is many standard deviations from 0
    (raw tabular features: wine density is 500 from 0) makes the folded layer sum terms that
    large and cancel them, each output off by about as many roundings. Past 8 the pair is
    left, saying why (docs/folding.md); at 7 it folds."""
    for stds, folds in ((7.0, True), (20.0, False)):
        bn = nn.BatchNorm1d(6) if layer == "linear" else nn.BatchNorm2d(6)
        after = nn.Linear(6, 4) if layer == "linear" else nn.Conv2d(6, 4, 1)
        model = randomize_batch_norms(nn.Sequential(bn, after))
        with torch.no_grad():  # (|beta| small against |gamma|: the excess is about the distance in stds)
            bn.running_mean.copy_(stds * torch.sqrt(bn.running_var + bn.eps) * torch.tensor([1.0, -1.0] * 3))
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.mul_(0.01)
        shape = (5, 6) if layer == "linear" else (5, 6, 3, 3)
        x = bn.running_mean.reshape((1, 6) + (1,) * (len(shape) - 2)) + torch.randn(shape)
        folded, report = check_fold(model, x)
        if folds:
            assert report == [Folded(f"bn+{layer if layer == 'linear' else 'conv'}", ("0", "1"))]
        else:
            assert [r[:2] for r in report] == [("batch norm", ("0",))]
            assert "times the normalized values and cancel them (channels 0, 1, 2, 3, 4, ... (6 of 6)" in \
                report[0].reason


def test_example_inputs_decide_batch_norm1d_rank():
    # BatchNorm1d on (N, C, L) normalizes C while the Linear acts on L: not a fold, even
    # though num_features == in_features (L == C here); only an example input tells
    model = randomize_batch_norms(nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 4)))
    x3 = torch.randn(2, 8, 8)
    folded, report = check_fold(model, x3, example_inputs=x3)
    assert report == [NotFolded("batch norm", ("0",), "with 1: its input had rank 3 in the example call; this "
                                                      "fold is exact only for rank 2")]
    folded, report = check_fold(model, torch.randn(5, 8), example_inputs=(torch.randn(5, 8),))
    assert report == [Folded("bn+linear", ("0", "1"))]
    # Linear on (N, L, C) then BatchNorm1d(L) with L == out_features: normalizes L, no fold
    model = randomize_batch_norms(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)))
    x3 = torch.randn(2, 6, 4)
    _, report = check_fold(model, x3, example_inputs=x3)
    assert [r[:2] for r in report] == [("batch norm", ("1",))] and "rank 3" in report[0].reason


def test_return_value_without_report():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout())
    folded = pybn.torch.fold(model)
    assert isinstance(folded, nn.Module) and count(folded, DROPOUTS) == 0


def test_not_a_module():
    with pytest.raises(TypeError, match="module"):
        pybn.torch.fold(lambda x: x)


def test_import_without_torch_names_the_extra():
    code = ("import sys\n"
            "sys.modules['torch'] = None  # what Python does for a module that cannot be imported\n"
            "import pybn  # pybn itself does not need torch\n"
            "try:\n"
            "    import pybn.torch\n"
            "except ImportError as exc:\n"
            "    print(exc)\n"
            "else:\n"
            "    print('imported')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'pybn-kernels[torch]'" in out.stdout


def f64(t):
    return t.detach().double().numpy()


def bits16(t):
    """The bit patterns of a float16 or bfloat16 tensor."""
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


def numpy_half(dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(np.float16) if dtype == torch.float16 else np.dtype(ml_dtypes.bfloat16)


def scale_shift(bn):
    """(s, t) of a batch norm module, float64: s = gamma / sqrt(var + eps), t = beta - mean * s."""
    s = f64(bn.weight) / np.sqrt(f64(bn.running_var) + bn.eps)
    return s, f64(bn.bias) - f64(bn.running_mean) * s


def assert_rounded_once(got, want64):
    """The 16-bit tensor `got` is the float64 `want64` rounded once to its dtype, bit for bit."""
    np.testing.assert_array_equal(bits16(got), nearest_even(want64, numpy_half(got.dtype)).view(np.uint16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_weights_are_folded_in_float64_and_rounded_once(dtype):
    """model.half() / model.to(torch.bfloat16): every folded weight and bias keeps the dtype and
    is the fold computed in float64 from the 16-bit parameters, rounded once."""
    model = randomize_batch_norms(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 5), nn.BatchNorm1d(5))).to(dtype).eval()
    x = torch.randn(3, 3, 5, 5, dtype=dtype)
    folded, report = pybn.torch.fold(model, example_inputs=x, return_report=True)
    assert sorted(r.kind for r in report) == ["bn+conv", "conv+bn", "linear+bn"]
    assert all(p.dtype == dtype for p in folded.parameters())
    new = folded.state_dict()
    s, t = scale_shift(model[1])
    assert_rounded_once(new["0.weight"], f64(model[0].weight) * s[:, None, None, None])
    assert_rounded_once(new["0.bias"], (f64(model[0].bias) - f64(model[1].running_mean)) * s + f64(model[1].bias))
    s, t = scale_shift(model[3])
    w = f64(model[4].weight)
    assert_rounded_once(new["4.weight"], w * s[None, :, None, None])
    # b + W t: a float64 sum whose order pybn and NumPy may choose differently, each within a
    # few float64 ulps of the exact sum; rounded to 16 bits they differ only when the exact
    # sum lies that close to a rounding boundary, and then by one ulp
    want = nearest_even(f64(model[4].bias) + w[:, :, 0, 0] @ t, numpy_half(dtype)).view(np.uint16).astype(int)
    assert np.abs(bits16(new["4.bias"]).astype(int) - want).max() <= 1  # (same sign: |bias| >> 1 ulp)
    s, t = scale_shift(model[7])
    assert_rounded_once(new["6.weight"], f64(model[6].weight) * s[:, None])
    assert_rounded_once(new["6.bias"], (f64(model[6].bias) - f64(model[7].running_mean)) * s + f64(model[7].bias))
    with torch.no_grad():  # torch's CPU kernels take both dtypes: the folded model runs
        expected = model.float()(x.float())  # the exact function, in float32
        actual = folded(x).float()
    # a few roundings to 8 (bf16) or 11 (f16) bits of values of the output's scale
    torch.testing.assert_close(actual, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_weights_are_not_rounded_through_float32(dtype):
    """A 16-bit conv before a float32 batch norm (torch's mixed precision), with w * s just above
    a tie of the 16-bit type: float32 would round it onto the tie, and the tie to even then down
    to 1; rounded once, from float64, it goes up to the next value above 1."""
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    conv, bn = nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3, eps=0.0)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = 1.0
        bn.weight[0] = 1 + ulp / 2  # the tie between 1 and 1 + ulp
        bn.running_var[0] = 1 - 2.0**-24  # sqrt(var) just below 1: s just above the tie
    model = nn.Sequential(conv.to(dtype), bn).eval()
    s, _ = scale_shift(bn)
    assert np.float32(s[0]) == np.float32(1 + ulp / 2) and s[0] > 1 + ulp / 2  # the case meant
    new = pybn.torch.fold(model).state_dict()
    assert new["0.weight"].dtype == new["0.bias"].dtype == dtype
    assert new["0.weight"][0, 0, 0, 0].item() == 1 + ulp
    assert_rounded_once(new["0.weight"], f64(model[0].weight) * s[:, None, None, None])
    assert_rounded_once(new["0.bias"], -f64(bn.running_mean) * s + f64(bn.bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_branches_merge_rounded_once(dtype):
    """Summed 16-bit conv branches and an identity merge into one conv whose weights are the
    float64 sum rounded once."""
    class TwoConvsAndIdentity(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.a(x) + self.b(x) + x

    model = TwoConvsAndIdentity().to(dtype).eval()
    folded, report = pybn.torch.fold(model, example_inputs=torch.randn(2, 4, 5, 5, dtype=dtype), merge_branches=True,
                                     return_report=True)
    assert report == [Folded("branches", ("a", "b"))]
    weight = f64(model.a.weight)
    weight[:, :, 1:2, 1:2] += f64(model.b.weight)
    weight[range(4), range(4), 1, 1] += 1.0
    assert_rounded_once(folded.a.weight, weight)
    assert_rounded_once(folded.a.bias, f64(model.a.bias) + f64(model.b.bias))


# --- what fold must refuse, and the hooks it must keep ----------------------------------------

def leftovers(report):
    return {r.names[0]: r.reason for r in report if isinstance(r, NotFolded)}


BATCH_NORM1D_PAIRS = {
    # the reproducer: BatchNorm1d on (N, C, L) normalizes C, the Linear acts on L == C
    "bn1d_linear_3d": (lambda: nn.Sequential(nn.BatchNorm1d(10), nn.Linear(10, 4)), (5, 10, 10), "0"),
    # Linear on (N, L, C) gives (N, L, out); BatchNorm1d(out) then normalizes L == out
    "linear_bn1d_3d": (lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)), (2, 6, 4), "1"),
    # an unbatched Conv1d gives (C, L): BatchNorm1d normalizes L == C
    "conv1d_unbatched_bn1d": (lambda: nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5)), (3, 7), "1"),
    "bn1d_conv1d_unbatched": (lambda: nn.Sequential(nn.BatchNorm1d(5), nn.Conv1d(5, 3, 1)), (5, 5), "0"),
}


@pytest.mark.parametrize("case", list(BATCH_NORM1D_PAIRS))
def test_batch_norm1d_is_not_folded_without_example_inputs(case):
    """The rank decides whether a BatchNorm1d fold is exact, and the types do not tell it."""
    make, shape, bn_name = BATCH_NORM1D_PAIRS[case]
    model = randomize_batch_norms(make())
    x = torch.randn(shape)
    folded, report = check_fold(model, x, example_inputs=None)  # equal to the original on x
    assert [type(r) for r in report] == [NotFolded] and report[0].names == (bn_name,)
    assert "pass example_inputs" in report[0].reason
    # with an example of the rank the fold needs, it folds
    good = {"bn1d_linear_3d": (5, 10), "linear_bn1d_3d": (2, 4), "conv1d_unbatched_bn1d": (2, 3, 7),
            "bn1d_conv1d_unbatched": (2, 5, 5)}[case]
    _, report = check_fold(model, torch.randn(good))
    assert [type(r) for r in report] == [Folded]


@pytest.mark.parametrize("case", ["conv2d", "conv3d", "conv_transpose2d"])
def test_batch_norm2d_3d_fold_without_example_inputs(case):
    """BatchNorm2d/3d raise on any other rank: the types alone prove the fold exact."""
    make_layer, bn_class, shape = LAYER_THEN_BN[case]
    layer = make_layer()
    model = randomize_batch_norms(nn.Sequential(layer, bn_class(layer.out_channels)))
    _, report = check_fold(model, torch.randn(shape), example_inputs=None)
    assert report == [Folded("conv+bn", ("0", "1"))]


def test_hooks_on_the_model_itself_are_kept():
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    seen = []
    model.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model.register_forward_pre_hook(lambda m, args, kwargs: (args, kwargs), with_kwargs=True)
    model.register_forward_hook(lambda m, args, out: out + 1)
    model.register_forward_hook(lambda m, args, out: seen.append(out.shape), always_call=True)
    x = torch.randn(2, 3, 6, 6)
    folded, report = check_fold(model, x)
    assert report == [Folded("conv+bn", ("0", "1"))]
    assert seen == [(2, 4, 4, 4)] * 3  # the example call, the original, the folded module
    with torch.no_grad():  # the hooks, not the check's tolerance, make these differ from the bare layers
        assert not torch.allclose(folded(x), folded.get_submodule("0")(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_hooks_on_a_traced_through_module_run_at_every_call():
    """torch.fx traces through a custom module: its hooks ran once, at trace time, and were lost."""
    model = randomize_batch_norms(nn.Sequential(Block(), nn.ReLU(), Block()))
    calls = []
    model[0].register_forward_hook(lambda m, args, out: calls.append(1))
    x = torch.randn(4, 5)
    folded, report = check_fold(model, x)
    calls.clear()
    with torch.no_grad():
        folded(x)
        folded(x)
    assert calls == [1, 1]
    assert report[:1] == [Folded("linear+bn", ("2.fc", "2.bn"))]
    assert leftovers(report) == {"0.bn": "inside 0, which is called as a whole (it has hooks)"}


def test_negative_running_variance_leaves_that_batch_norm_and_names_it():
    model = randomize_batch_norms(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(),
                                                nn.Linear(6, 3), nn.BatchNorm1d(3)))
    with torch.no_grad():
        model[4].running_var[1] = -0.5
    x = torch.randn(5, 4)
    folded, report = pybn.torch.fold(model, example_inputs=x, return_report=True)
    assert report == [Folded("linear+bn", ("0", "1")),
                      NotFolded("batch norm", ("4",), "running_var is negative in channel 1 (a variance is >= 0)")]
    with torch.no_grad():  # torch's NaN in channel 1, the rest equal
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-5, equal_nan=True)
        assert torch.isnan(folded(x)[:, 1]).all()


@pytest.mark.parametrize("case", ["nan_mean", "inf_var", "inf_weight", "zero_var_zero_eps"])
def test_non_finite_batch_norm_is_left_to_torch(case):
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    bn = model[1]
    with torch.no_grad():
        if case == "nan_mean":
            bn.running_mean[2] = float("nan")
        elif case == "inf_var":
            bn.running_var[0] = float("inf")
        elif case == "inf_weight":
            bn.weight[3] = float("inf")
        else:
            bn.eps, bn.running_var[1] = 0.0, 0.0
    x = torch.randn(2, 3, 6, 6)
    folded, report = pybn.torch.fold(model, return_report=True)
    assert [r[:2] for r in report] == [("batch norm", ("1",))]
    assert {"nan_mean": "running_mean is not finite in channel 2", "inf_var": "running_var is not finite",
            "inf_weight": "weight is not finite in channel 3",
            "zero_var_zero_eps": "running_var + eps is 0 in channel 1"}[case] in report[0].reason
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=0, atol=0, equal_nan=True)


def test_folded_weights_that_overflow_their_dtype_are_not_written():
    model = randomize_batch_norms(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    with torch.no_grad():
        model[0].weight.fill_(30000.0)
        model[1].running_var.fill_(1e-4)  # scale ~ 100: 3e6 does not fit in float16
        model[1].weight.fill_(1.0)
    model = model.half()
    x = torch.randn(2, 4).half() * 1e-3
    folded, report = pybn.torch.fold(model, example_inputs=x, return_report=True)
    assert report == [NotFolded("batch norm", ("1",), "with 0: the folded weights of Linear overflow float16")]
    assert all(torch.isfinite(p).all() for p in folded.parameters())


class ConvTimesBuffer(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("k", torch.full((4, 1, 1), k))

    def forward(self, x):
        return self.conv(x) * self.k


def test_per_channel_map_whose_fold_overflows_is_reported():
    """``conv(x) * k`` whose folded float16 weights would overflow stays, reported as an affine
    map left (with k = 2 it folds)."""
    x = torch.ones(1, 3, 2, 2, dtype=torch.float16)
    for k, want in ((60000.0, [NotFolded("affine", ("mul",), "with conv: the folded weights of Conv2d overflow "
                                          "float16")]),
                    (2.0, [Folded("conv+affine", ("conv", "mul"))])):
        model = ConvTimesBuffer(k).eval().half()
        with torch.no_grad():
            model.conv.weight.fill_(4.0)
        folded, report = pybn.torch.fold(model, example_inputs=(x,), return_report=True)
        assert report == want
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


class ManualSequential(nn.Module):
    """Untraceable (a data-dependent branch), and calls its Sequential's children by hand."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        y = self.body[0](x) + 1.0  # between the conv and the batch norm: folding them changes y
        return self.body[2](self.body[1](y))


def test_untraced_fallback_checks_what_reads_the_layer_output():
    """The Sequential holds conv then batch norm, but forward adds 1 between them: not adjacent."""
    model = randomize_batch_norms(ManualSequential())
    x = torch.randn(2, 3, 5, 5)
    folded, report = check_fold(model, x)
    assert leftovers(report) == {"body.1": "torch.fx cannot trace ManualSequential (TraceError: symbolically traced "
                                           "variables cannot be used as inputs to control flow): only the pairs the "
                                           "example call shows adjacent are folded then"}
    assert count(folded, BATCH_NORMS) == 1


def test_untraced_fallback_folds_no_pair_without_example_inputs():
    model = randomize_batch_norms(ManualSequential())
    folded, report = check_fold(model, torch.randn(2, 3, 5, 5), example_inputs=None)
    assert [r[:2] for r in report] == [("batch norm", ("body.1",))]
    assert report[0].reason.startswith("torch.fx cannot trace ManualSequential (TraceError: ")
    assert report[0].reason.endswith("pass example_inputs to fold the pairs the example call shows adjacent")


def test_global_module_hooks_stop_every_fold():
    from torch.nn.modules.module import register_module_forward_hook

    calls = []
    handle = register_module_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    try:
        model = randomize_batch_norms(nn.Sequential(Block(), nn.Dropout(0.5)))
        x = torch.randn(3, 5)
        folded, report = check_fold(model, x)
        assert [r[:2] for r in report] == [("dropout", ("1",)), ("batch norm", ("0.bn",))]
        assert report[0].reason.startswith("global module hooks are registered")
        assert report[1].reason == "inside 0, which is called as a whole (global module hooks are registered)"
        calls.clear()
        with torch.no_grad():
            model.eval()(x)
            expected = sorted(calls)  # (the traced module's class takes the model's class name)
            calls.clear()
            folded(x)
        assert sorted(calls) == expected  # every module call still runs the hook
    finally:
        handle.remove()


def test_meta_device_model_is_reported_not_folded():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout()).to("meta")
    folded, report = pybn.torch.fold(model, return_report=True)
    assert report == [Folded("dropout", ("2",)),
                      NotFolded("batch norm", ("1",), "BatchNorm1d is on the meta device (no values to fold)")]
    assert folded(torch.empty(2, 3, device="meta")).shape == (2, 4)


def test_lazy_module_never_called_is_not_folded():
    model = nn.Sequential(nn.LazyLinear(4), nn.BatchNorm1d(4))
    _, report = pybn.torch.fold(model, return_report=True)
    assert [r[:2] for r in report] == [("batch norm", ("1",))]
    assert "lazy module never called" in report[0].reason


def test_parametrized_layer_is_not_folded():
    from torch.nn.utils import parametrizations

    model = randomize_batch_norms(nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 5)), nn.BatchNorm1d(5)))
    _, report = check_fold(model, torch.randn(3, 4))
    assert report == [NotFolded("batch norm", ("1",), "with 0: ParametrizedLinear has parametrizations")]


def test_module_registered_under_two_names_is_used_twice():
    model = randomize_batch_norms(SharedConv())
    model.alias = model.conv  # the same conv, registered twice
    _, report = check_fold(model, torch.randn(2, 4, 6, 6))
    assert [r[:2] for r in report] == [("batch norm", ("bn",))]


def test_example_inputs_the_model_rejects():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"^example_inputs: calling the model on them raised RuntimeError: "):
        pybn.torch.fold(model, example_inputs=torch.randn(2, 5))


def test_model_that_cannot_be_copied():
    class Unpicklable(nn.Module):
        def __init__(self):
            super().__init__()
            import threading

            self.lock = threading.Lock()

    with pytest.raises(TypeError, match=r"^module: cannot be deep-copied \(TypeError: "):
        pybn.torch.fold(Unpicklable())


def test_every_leftover_is_logged(caplog):
    model = randomize_batch_norms(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)))
    with caplog.at_level(logging.INFO, logger="pybn.torch"):
        _, report = pybn.torch.fold(model, return_report=True)
    assert report == [NotFolded("batch norm", ("1",), "no Linear or convolution next to it")]
    assert any("not folded: batch norm 1: no Linear or convolution next to it" in r.getMessage()
               for r in caplog.records)


class Counting(nn.Module):
    """Changes its own state in forward (as a cache or a call counter does)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.bn(self.fc(x)) + self.calls


class PlainCounter(Counting):
    def __init__(self):
        super().__init__()
        self.count = 0

    def forward(self, x):
        self.count += 1
        return self.bn(self.fc(x)) + self.count


@pytest.mark.parametrize("model_class", [Counting, PlainCounter])
def test_state_changed_in_forward_is_not_lost(model_class):
    """Tracing ran the increments once, for real, and left them out of the graph: the folded
    module returned the first call's output for ever (and the example call counted too)."""
    model = randomize_batch_norms(model_class())
    x = torch.randn(3, 4)
    folded, report = pybn.torch.fold(model, example_inputs=x, return_report=True)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for _ in range(3):
            assert_same(folded(x), reference(x))
    # forward cannot be traced faithfully; the example call shows fc feeding bn alone
    assert report == [Folded("linear+bn", ("fc", "bn"))]
    assert type(folded) is model_class and type(folded.bn) is nn.Identity


def test_torchscript_module_is_refused():
    import warnings

    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    with pytest.raises(TypeError, match=r"^module: a TorchScript module \(torch.jit.script or trace\) cannot be "
                                        r"folded"):
        pybn.torch.fold(scripted)


class BatchNormByKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(input=self.conv(x))


def test_batch_norm_called_by_keyword_is_reported_as_such():
    _, report = check_fold(randomize_batch_norms(BatchNormByKeyword()), torch.randn(2, 3, 6, 6))
    assert report == [NotFolded("batch norm", ("bn",), "it is not called with its input alone")]


# --- pybn.torch's own modules and their extra arguments --------------------------------------

from pybn.torch import nn as pnn  # noqa: E402


class ReluDropoutMLP(nn.Module):
    """fc2(dropout(relu(fc1(x)))) through pybn's fused call, by keyword or by position; with
    `branch`, a forward torch.fx cannot trace."""

    def __init__(self, positional=False, branch=False):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(8, 16), pnn.Dropout(0.3), nn.Linear(16, 2)
        self.positional, self.branch = positional, branch

    def forward(self, x):
        if self.branch and x.sum() < -1e9:
            return x
        h = self.fc1(x)
        return self.fc2(self.drop(h, True) if self.positional else self.drop(h, relu=True))


@pytest.mark.parametrize("positional", [False, True])
def test_dropout_called_with_relu_folds_to_relu(positional):
    """A traced dropout(x, relu=True) is relu(x) in eval mode: it was removed with its relu
    (outputs off by 0.76)."""
    folded, report = check_fold(ReluDropoutMLP(positional), torch.randn(5, 8))
    assert report == [Folded("dropout", ("drop",))]
    assert not any(type(m).__module__.startswith("pybn") for m in folded.modules())


@pytest.mark.parametrize("example", [True, False])
def test_untraced_dropout_called_with_relu_is_left(example):
    """On the path for models torch.fx cannot trace, nn.Identity stood in for it and the
    folded model raised TypeError (unexpected keyword argument 'relu')."""
    x = torch.randn(5, 8)
    folded, report = check_fold(ReluDropoutMLP(branch=True), x, example_inputs=x if example else None)
    assert type(folded.drop) is pnn.Dropout
    left = [e for e in report if e.kind == "dropout"]
    assert len(left) == 1 and isinstance(left[0], NotFolded) and "relu" in left[0].reason


class ReluOnTheOtherBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.drop = nn.Linear(4, 4), pnn.Dropout(0.3)

    def forward(self, x):
        if x.sum() > 0:  # (the example's branch)
            return self.fc(x)
        return self.drop(self.fc(x), relu=True)


def test_untraced_dropout_the_example_did_not_run_is_left():
    """nn.Identity stood in for it, and the other branch's relu=True call raised TypeError."""
    model = ReluOnTheOtherBranch().eval()
    folded, report = pybn.torch.fold(model, example_inputs=torch.ones(2, 4), return_report=True)
    assert type(folded.drop) is pnn.Dropout and [r.kind for r in report if isinstance(r, NotFolded)] == ["dropout"]
    with torch.no_grad():
        assert_same(folded(-torch.ones(2, 4)), model(-torch.ones(2, 4)))


class UntraceableBlockTail(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), pnn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() < -1e9:
            return x
        return self.bn(self.conv(x), residual=x, relu=True)


def test_untraced_block_tail_is_not_folded():
    """bn(conv(x), residual=x, relu=True): the conv+bn fold replaced bn by nn.Identity, which
    then raised TypeError (unexpected keyword argument 'residual')."""
    folded, report = check_fold(randomize_batch_norms(UntraceableBlockTail()), torch.randn(2, 4, 6, 6))
    assert type(folded.bn) is pnn.BatchNorm2d
    assert report == [NotFolded("batch norm", ("bn",), "it is not called with its input alone")]


@pytest.mark.parametrize("noise", [lambda: pnn.DropPath(0.1), lambda: pnn.StochasticDepth(0.1, "batch"),
                                   lambda: pnn.DropBlock2d(0.1, 3), lambda: pnn.GaussianNoise(0.1),
                                   lambda: pnn.GaussianDropout(0.1)],
                         ids=["DropPath", "StochasticDepth", "DropBlock2d", "GaussianNoise", "GaussianDropout"])
@pytest.mark.parametrize("traceable", [True, False])
def test_pybn_noise_modules_are_removed_as_dropout(noise, traceable):
    """pybn's stochastic depth, DropBlock and Gaussian modules are the identity in eval mode:
    they stayed in the folded model, unreported, and kept conv -> bn apart."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.noise, self.bn = nn.Conv2d(3, 4, 3), noise(), nn.BatchNorm2d(4)

        def forward(self, x):
            if not traceable and x.sum() < -1e9:
                return x
            return self.bn(self.noise(self.conv(x)))

    folded, report = check_fold(randomize_batch_norms(Net()), torch.randn(2, 3, 8, 8))
    assert report == [Folded("dropout", ("noise",)), Folded("conv+bn", ("conv", "bn"))]
    assert not any(type(m).__module__.startswith("pybn") for m in folded.modules())
