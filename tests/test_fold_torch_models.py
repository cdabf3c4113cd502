"""pybn.torch.fold on the building blocks of real models, written here: batch norm subclasses
with an activation (timm's BatchNormAct2d), frozen batch norms (torchvision's FrozenBatchNorm2d)
and other per-channel affine modules, SyncBatchNorm, layers that pad by an amount computed from
the input (timm's Conv2dSame), models torch.fx cannot trace, torch.export programs, and the
branch merging of RepVGG / MobileOne blocks. Every folded model is checked against the original
in eval mode (float32: within 1e-5 of the output's scale) on the example and on fresh inputs."""
import copy
import math
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import pybn.torch  # noqa: E402
from pybn.torch import Folded, NotFolded  # noqa: E402
from test_fold_torch import assert_same  # noqa: E402


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(1234)


def randomize(model):
    """Non-trivial statistics and affine parameters in every batch norm, frozen ones included."""
    with torch.no_grad():
        for m in model.modules():
            mean = getattr(m, "running_mean", None)
            if isinstance(mean, torch.Tensor):
                c = mean.shape[0]
                mean.copy_(torch.randn(c))
                m.running_var.copy_(torch.rand(c) * 2 + 0.25)
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.5 * torch.randn(c))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(c))
    return model


def check(model, x, *fresh, **kwargs):
    """Fold (with x as the example unless told otherwise); the result must equal model.eval() on
    x and on every `fresh` input; returns (folded, report)."""
    kwargs.setdefault("example_inputs", x)
    folded, report = pybn.torch.fold(model, return_report=True, **kwargs)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for inp in (x, *fresh):
            assert_same(folded(inp), reference(inp))
    return folded, report


def left(report):
    return {r.names[0]: r.reason for r in report if isinstance(r, NotFolded)}


def kinds(report):
    return sorted(r.kind for r in report if isinstance(r, Folded))


# --- batch norm with an activation (timm's BatchNormAct2d) ----------------------------------

class BatchNormAct2d(nn.BatchNorm2d):
    """timm's: forward is F.batch_norm (with the rank asserted), then dropout, then an activation."""

    def __init__(self, num_features, act=nn.ReLU, assert_rank=True):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act()
        self.assert_rank = assert_rank

    def forward(self, x):
        if self.assert_rank:
            torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


def test_issue_reproducer_batch_norm_act_folds():
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8)))
    x = torch.randn(2, 3, 9, 9)
    folded, report = check(model, x, torch.randn(3, 3, 12, 12), example_inputs=None)
    assert report == [Folded("conv+bn", ("0", "1"))]  # the rank is asserted in the graph: no example needed
    # the activation stays, the batch norm's statistics are gone
    assert any(isinstance(m, nn.ReLU) for m in folded.modules())
    assert not any(k.endswith(("running_mean", "running_var")) for k in folded.state_dict())


def test_batch_norm_act_without_asserted_rank_needs_the_example():
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, nn.SiLU, assert_rank=False)))
    x = torch.randn(2, 3, 9, 9)
    _, report = check(model, x, example_inputs=None)
    assert left(report) == {"1": "with 0: batch_norm takes inputs of any rank >= 2 and this fold is exact only "
                                 "for 4-D ones, which torch.fx cannot see: pass example_inputs to fold it"}
    _, report = check(model, x, torch.randn(1, 3, 5, 7))
    assert report == [Folded("conv+bn", ("0", "1"))]


def test_batch_norm_act_on_an_unbatched_conv_is_not_folded():
    """Conv2d accepts (C, H, W): batch_norm would normalize H there, not the channels."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, assert_rank=False)))
    x = torch.randn(3, 10, 8)  # H == 8 channels: batch_norm runs, on the wrong axis
    _, report = check(model, x)
    assert left(report) == {"1": "with 0: its input had rank 3 in the example call; this fold is exact only "
                                 "for rank 4"}


def test_batch_norm_act_after_a_residual_add_is_reported():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = BatchNormAct2d(4)

        def forward(self, x):
            return self.bn(self.conv(x) + x)

    _, report = check(randomize(Block()), torch.randn(2, 4, 6, 6))
    assert left(report) == {"bn": "no Linear or convolution next to it"}


# --- frozen batch norm and other per-channel affine modules ---------------------------------

class FrozenBatchNorm2d(nn.Module):
    """torchvision's: buffers only; forward is x * scale + shift with (1, C, 1, 1) constants."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", torch.ones(n)), ("bias", torch.zeros(n)), ("running_mean", torch.zeros(n)),
                            ("running_var", torch.ones(n))):
            self.register_buffer(name, value)

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        scale = w * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = b - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift


class Backbone(nn.Module):
    """A detection-style stem and residual block with frozen batch norms everywhere."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = FrozenBatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), FrozenBatchNorm2d(8))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


def test_frozen_batch_norm_folds_with_the_example():
    model = randomize(Backbone())
    x = torch.randn(2, 3, 8, 8)
    folded, report = check(model, x, torch.randn(1, 3, 11, 5))
    assert report == [Folded("conv+affine", ("conv1", "bn1")), Folded("conv+affine", ("conv2", "bn2")),
                      Folded("conv+affine", ("down.0", "down.1"))]
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    assert not [k for k in folded.state_dict() if "running" in k]


def test_frozen_batch_norm_without_the_example_is_reported():
    """(1, C, 1, 1) constants would add a dimension to the (C, H, W) output of an unbatched conv."""
    _, report = check(randomize(Backbone()), torch.randn(2, 3, 8, 8), example_inputs=None)
    reason = ("with conv1: its constant of shape (1, 8, 1, 1) would add a dimension to an output of rank 3, which "
              "the layer also gives: pass example_inputs to show the rank")
    assert left(report)["bn1"] == reason
    assert [r.kind for r in report] == ["affine"] * 3


class ChannelScale(nn.Module):
    """x * weight + bias with (C, 1, 1) parameters: per channel for batched and unbatched inputs alike."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(1 + torch.randn(n, 1, 1))
        self.bias = nn.Parameter(torch.randn(n, 1, 1))

    def forward(self, x):
        return self.weight * x + self.bias


def test_affine_module_of_any_rank_folds_without_the_example():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), ChannelScale(5), nn.ReLU())
    x = torch.randn(2, 3, 7, 7)
    folded, report = check(model, x, torch.randn(3, 9, 9), example_inputs=None)  # unbatched too
    assert report == [Folded("conv+affine", ("0", "1"))]


class LayerScaleMLP(nn.Module):
    """ConvNeXt-style: per-channel gamma after a Linear, in forward itself; a scalar multiply, a
    subtraction from a constant and a division after others."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 6)
        self.fc3 = nn.Linear(6, 6)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.register_buffer("offset", torch.randn(6))

    def forward(self, x):
        y = F.gelu(2.0 * self.fc1(x))
        y = self.fc2(y) * self.gamma
        return (self.offset - self.fc3(y)) / 3.0


def test_arithmetic_by_constants_after_linear_folds():
    model = LayerScaleMLP()
    x = torch.randn(4, 5, 6)  # Linear acts on the last axis: any rank
    folded, report = check(model, x, torch.randn(6), example_inputs=None)
    assert [r.kind for r in report] == ["linear+affine"] * 4
    assert not any(n.op == "call_function" and n.target.__name__ in ("mul", "sub", "truediv")
                   for n in folded.graph.nodes)


class Arithmetic(nn.Module):
    """One arithmetic operation of its input and a constant buffer."""

    def __init__(self, const, op="mul"):
        super().__init__()
        self.register_buffer("c", const)
        self.op = op

    def forward(self, y):
        return {"mul": lambda: y * self.c, "add": lambda: y + self.c, "div": lambda: y / self.c,
                "rdiv": lambda: self.c / y}[self.op]()


REFUSED = {
    "float64_constant": (Arithmetic(torch.rand(4, 1, 1, dtype=torch.float64)),
                         "its constant is float64, the layer's output float32 (the result would be float64)"),
    "varies_over_space": (Arithmetic(torch.rand(4, 5, 5)), "its constant of shape (4, 5, 5) is not one value per "
                                                           "channel"),
    "adds_a_dimension": (Arithmetic(torch.rand(2, 4, 1, 1)), "its constant of shape (2, 4, 1, 1) is not one value "
                                                             "per channel"),
    "divides_by_zero": (Arithmetic(torch.tensor([1.0, 0.0, 2.0, 3.0]).reshape(4, 1, 1), "div"),
                        "it divides by 0 in some channel"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_arithmetic_that_is_not_an_exact_per_channel_map_is_refused(case):
    op, reason = REFUSED[case]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), op)
    x = torch.randn(2, 3, 7, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the division by zero of the reference)
        folded, report = pybn.torch.fold(model, example_inputs=x, return_report=True)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model.eval()(x), equal_nan=True)
    assert report == [NotFolded("affine", ("1",), f"with 0: {reason}")]


def test_constant_divided_by_the_layer_output_is_no_affine_map():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Arithmetic(torch.rand(4, 1, 1) + 1, "rdiv"))
    _, report = check(model, torch.randn(2, 3, 6, 6))
    assert report == []


def test_layer_output_used_twice_is_not_folded():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.scale = ChannelScale(4)

        def forward(self, x):
            y = self.conv(x)
            return self.scale(y) + y

    _, report = check(TwoUses(), torch.randn(2, 3, 5, 5))
    assert left(report) == {"scale": "with conv: the output of conv is used 2 times"}


def test_affine_step_before_a_linear_folds():
    class Before(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.rand(6) + 0.5)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x * self.scale + 1.0)

    model = Before()
    _, report = check(model, torch.randn(5, 6), torch.randn(2, 3, 6), example_inputs=None)
    assert [r.kind for r in report] == ["affine+linear", "affine+linear"]


class FunctionalLayers(nn.Module):
    """Layers as calls of their functions on the module's own tensors, not as modules."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.2)
        self.bn = nn.BatchNorm2d(6)
        self.fc_w = nn.Parameter(torch.randn(4, 6) * 0.3)
        self.fc_b = nn.Parameter(torch.randn(4))
        self.bn1 = nn.BatchNorm1d(4)

    def forward(self, x):
        y = torch.relu(self.bn(F.conv2d(x, self.w, None, 1, 1)))
        return self.bn1(F.linear(y.mean((2, 3)), self.fc_w, self.fc_b))


def test_layer_functions_on_module_tensors_fold():
    model = randomize(FunctionalLayers())
    folded, report = check(model, torch.randn(3, 3, 6, 6), torch.randn(2, 3, 5, 7))
    assert report == [Folded("conv+bn", ("conv2d", "bn")), Folded("linear+bn", ("linear", "bn1"))]
    assert "bias" in dict(folded.named_parameters())  # the conv call got a bias


def test_layer_function_whose_weight_is_read_twice_is_not_folded():
    class Twice(FunctionalLayers):
        def forward(self, x):
            return self.bn(F.conv2d(x, self.w, None, 1, 1)) + self.w.sum()

    _, report = check(randomize(Twice()), torch.randn(2, 3, 6, 6))
    assert left(report)["bn"].startswith("with conv2d: its weight w is also read elsewhere")


# --- SyncBatchNorm -------------------------------------------------------------------------

def test_sync_batch_norm_folds_in_eval_mode_with_the_example():
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3), nn.SyncBatchNorm(6), nn.ReLU(), nn.Conv2d(6, 4, 1),
                                    nn.SyncBatchNorm(4)))
    x = torch.randn(2, 3, 8, 8)
    folded, report = check(model, x, torch.randn(1, 3, 5, 5))
    assert report == [Folded("conv+bn", ("0", "1")), Folded("conv+bn", ("3", "4"))]
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in folded.modules())


def test_sync_batch_norm_needs_the_rank():
    """SyncBatchNorm takes any rank >= 2: on an unbatched conv's (C, H, W) it normalizes H."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3), nn.SyncBatchNorm(6)))
    _, report = check(model, torch.randn(2, 3, 8, 8), example_inputs=None)
    assert left(report) == {"1": "with 0: SyncBatchNorm takes inputs of any rank >= 2 and this fold is exact only "
                                 "for 4-D ones, which torch.fx cannot see: pass example_inputs to fold it"}
    _, report = check(model, torch.randn(3, 8, 8))  # (6, 6, 6): SyncBatchNorm runs, on H
    assert left(report) == {"1": "with 0: its input had rank 3 in the example call; this fold is exact only for "
                                 "rank 4"}


class AnyRankBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that also takes unbatched (C, H, W) input, through its own check."""

    def _check_input_dim(self, input):
        if input.dim() not in (3, 4):
            raise ValueError(f"expected 3D or 4D input (got {input.dim()}D input)")


def test_batch_norm_with_its_own_rank_check_needs_the_rank():
    """A subclass overriding only _check_input_dim: on an unbatched conv's (C, H, W) it
    normalizes H. It was folded as a BatchNorm2d (off by up to 6.4)."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), AnyRankBatchNorm2d(6)))
    _, report = check(model, torch.randn(3, 6, 6), example_inputs=None)
    assert left(report) == {"1": "with 0: AnyRankBatchNorm2d has its own _check_input_dim, which may take inputs of "
                                 "other ranks and this fold is exact only for 4-D ones, which torch.fx cannot see: "
                                 "pass example_inputs to fold it"}
    _, report = check(model, torch.randn(3, 6, 6))
    assert left(report) == {"1": "with 0: its input had rank 3 in the example call; this fold is exact only for "
                                 "rank 4"}
    _, report = check(model, torch.randn(2, 3, 6, 6))
    assert kinds(report) == ["conv+bn"] and not left(report)


def test_an_uninitialized_lazy_module_is_named():
    """A lazy batch norm's uninitialized buffers cannot be deep-copied: fold raised TypeError
    "cannot be deep-copied" in torch's words. (A lazy module with parameters only is copied,
    and reported: test_fold_torch.py.)"""
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"^module: 1.running_mean is not initialized \(a lazy module never called\)"):
        pybn.torch.fold(model)
    model(torch.randn(2, 3, 6, 6))
    _, report = check(randomize(model), torch.randn(2, 3, 6, 6))
    assert kinds(report) == ["conv+bn"]


# --- pybn.torch.nn's drop-ins fold like the torch classes they replace ----------------------

class DropInNet(nn.Module):
    """pybn's SyncBatchNorm (not a torch SyncBatchNorm subclass) and BatchNorm2d, in a traceable model."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.bn1 = pybn.torch.nn.SyncBatchNorm(6)
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.bn2 = pybn.torch.nn.BatchNorm2d(4)
        self.drop = pybn.torch.nn.Dropout2d(0.3)

    def forward(self, x):
        return self.drop(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class UntraceableDropInNet(DropInNet):
    def forward(self, x):
        if x.mean() > 0:
            x = x * 0.5
        return super().forward(x)


@pytest.mark.parametrize("model_class", [DropInNet, UntraceableDropInNet])
def test_drop_ins_fold_like_the_torch_classes(model_class):
    model = randomize(model_class())
    x = torch.randn(2, 3, 8, 8) + 1
    folded, report = check(model, x, -torch.ones(1, 3, 5, 7))
    assert sorted(kinds(report)) == ["conv+bn", "conv+bn", "dropout"] and not left(report)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())


def test_drop_in_sync_batch_norm_needs_the_rank():
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3), pybn.torch.nn.SyncBatchNorm(6)))
    _, report = check(model, torch.randn(2, 3, 8, 8), example_inputs=None)
    assert left(report) == {"1": "with 0: SyncBatchNorm takes inputs of any rank >= 2 and this fold is exact only "
                                 "for 4-D ones, which torch.fx cannot see: pass example_inputs to fold it"}


class ShiftedBatchNorm(pybn.torch.nn.BatchNorm2d):
    """A subclass of a drop-in with its own forward computes something else: not folded."""

    def forward(self, x):
        return super().forward(x) + 1


def test_drop_in_subclass_with_its_own_forward_is_not_folded():
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3), ShiftedBatchNorm(6)))
    _, report = check(model, torch.randn(2, 3, 8, 8))
    assert report == [NotFolded("batch norm", ("1",), "ShiftedBatchNorm has its own forward")]


# --- layers whose forward pads by an amount computed from the input (timm's Conv2dSame) -----

class Conv2dSame(nn.Conv2d):
    """Pads like TensorFlow's "SAME": by an amount torch.fx cannot compute from a proxy."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        pads = [max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
                for i, s, k, d in zip((ih, iw), self.stride, self.kernel_size, self.dilation)]
        x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StandardizedSame(Conv2dSame):
    """Weight standardization too: the weight is used normalized, so scaling it does not fold."""

    def forward(self, x):
        if x.size(-1) % 2:  # (a branch on the input's size: torch.fx cannot trace it)
            x = F.pad(x, [1, 0, 0, 0])
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1)
        return F.conv2d(x, w, self.bias, self.stride)


class SameNet(nn.Module):
    def __init__(self, conv=Conv2dSame):
        super().__init__()
        self.stem = conv(3, 8, 3, stride=2)
        self.bn1 = BatchNormAct2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.stem(x))))


def test_untraceable_submodule_is_called_whole_and_the_rest_is_folded():
    model = randomize(SameNet())
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.fx raises: the model is not traceable
        torch.fx.symbolic_trace(copy.deepcopy(model))
    x = torch.randn(2, 3, 11, 9)
    _, report = check(model, x, example_inputs=None)
    assert report[0] == Folded("conv+bn", ("conv", "bn2"))
    assert left(report) == {"bn1": "with stem: Conv2dSame has its own forward: pass example_inputs to have the "
                                   "example call show whether it computes like its base class"}


def test_layer_with_its_own_forward_folds_when_the_example_shows_it_computes_like_its_class():
    model = randomize(SameNet())
    folded, report = check(model, torch.randn(2, 3, 11, 9), torch.randn(1, 3, 16, 7))
    assert report == [Folded("conv+bn", ("stem", "bn1")), Folded("conv+bn", ("conv", "bn2"))]
    assert type(folded.get_submodule("stem")) is Conv2dSame


def test_layer_using_its_weight_otherwise_is_not_folded():
    model = randomize(SameNet(StandardizedSame))
    _, report = check(model, torch.randn(2, 3, 11, 9))
    assert left(report)["bn1"] == "with stem: StandardizedSame has its own forward, and its forward read its " \
                                  "weight or bias in 4 torch calls, not in one"


class BranchInForward(nn.Module):
    """A child with a data-dependent branch: called as a whole; the batch norm inside it is left."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


def test_batch_norm_inside_an_untraceable_child_is_reported():
    model = randomize(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), BranchInForward()))
    _, report = check(model, torch.randn(2, 3, 6, 6))
    assert report[0] == Folded("conv+bn", ("0", "1"))
    assert left(report) == {"2.bn": "inside 2, which is called as a whole (torch.fx cannot trace it: TraceError: "
                                    "symbolically traced variables cannot be used as inputs to control flow)"}


# --- models whose own forward torch.fx cannot trace: adjacency from the example call --------

class Crossed(nn.Module):
    """Registered in the order conv_a, bn_a, conv_b, bn_b, but forward feeds conv_b to bn_a and
    conv_a to bn_b: a guess from the module order would fold the wrong pairs. The data-dependent
    branch makes the model untraceable; both sides of it call the modules the same way."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(6, 6, 1)
        self.bn_b = nn.BatchNorm2d(6)
        self.act = BatchNormAct2d(6)
        self.frozen = FrozenBatchNorm2d(6)
        self.conv_c = nn.Conv2d(6, 6, 1)
        self.conv_d = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        if x.mean() > 0:
            x = x * 0.5
        y = self.bn_b(self.conv_a(x))
        y = self.bn_a(self.conv_b(y))
        return self.frozen(self.conv_d(self.act(self.conv_c(y))))


def test_untraceable_model_folds_the_pairs_the_example_call_shows():
    model = randomize(Crossed())
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.fx raises: the model is not traceable
        torch.fx.symbolic_trace(copy.deepcopy(model))
    x = torch.randn(2, 3, 6, 6) + 1
    folded, report = check(model, x, -torch.ones(2, 3, 6, 6), torch.randn(1, 3, 9, 4) + 1)
    assert sorted(report) == sorted([Folded("conv+bn", ("conv_a", "bn_b")), Folded("conv+bn", ("conv_b", "bn_a")),
                                     Folded("conv+bn", ("conv_c", "act")), Folded("conv+affine", ("conv_d", "frozen"))])
    assert type(folded) is Crossed
    assert type(folded.bn_a) is nn.Identity and type(folded.frozen) is nn.Identity
    assert isinstance(folded.act, torch.fx.GraphModule)  # its activation stays


def test_the_module_order_guess_would_be_wrong():
    """Folding by module order (conv_a with bn_a...) changes the result: the check above has teeth."""
    model = randomize(Crossed()).eval()
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        for conv, bn in ((wrong.conv_a, wrong.bn_a), (wrong.conv_b, wrong.bn_b)):
            fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
            conv.weight.copy_(fused.weight)
            conv.bias.copy_(fused.bias)
        wrong.bn_a, wrong.bn_b = nn.Identity(), nn.Identity()
        x = torch.randn(2, 3, 6, 6) + 1
        assert not torch.allclose(wrong(x), model(x), atol=1e-3)


class CountingScale(nn.Module):
    """A per-channel scale that counts its calls: tracing it alone would count once, for real."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(n, 1, 1) + 0.5)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.scale + self.calls


class UntraceableWithCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.scale = CountingScale(4)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.scale(self.conv(x))


def test_module_changing_its_state_is_not_traced_alone():
    model = UntraceableWithCounter().eval()
    x = torch.randn(2, 3, 6, 6)
    folded, report = check(model, x, x)  # (each call counts: the original and the folded one alike)
    assert report == [] and folded.scale.calls == 2 and model.scale.calls == 0  # (fold itself counted nothing)


class ReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        y = self.conv(x)
        return self.bn(y) * y.abs().mean()  # the conv's output is read outside the batch norm


def test_untraceable_model_does_not_fold_an_output_read_elsewhere():
    _, report = check(randomize(ReadTwice()), torch.randn(2, 3, 6, 6))
    assert list(left(report)) == ["bn"]


# --- torch.export ----------------------------------------------------------------------------

class ExportNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.act = BatchNormAct2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8, padding=1)
        self.frozen = FrozenBatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.bn2 = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = self.frozen(self.dw(self.act(self.conv(x))))
        y = self.drop(y.mean((2, 3)))
        return self.head(self.bn2(torch.relu(self.bn1(self.fc(y)))))


def export(model, x, decompose=False):
    """torch.export of `model` (in eval mode), with its ATen decompositions if asked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's own deprecation notices)
        ep = torch.export.export(model, (x,))
        return ep.run_decompositions() if decompose else ep


@pytest.mark.parametrize("decomposed", [False, True], ids=["training_ir", "decomposed"])
def test_exported_program_folds_and_round_trips(decomposed, tmp_path):
    model = randomize(ExportNet()).eval()
    x = torch.randn(4, 3, 8, 8)
    ep = export(model, x, decomposed)
    before = dict(ep.state_dict)
    folded, report = pybn.torch.fold(ep, return_report=True)
    assert isinstance(folded, torch.export.ExportedProgram)
    # (the decompositions drop an inference dropout themselves)
    assert kinds(report) == ["bn+linear", "conv+affine", "conv+bn"] + ["dropout"] * (not decomposed) + ["linear+bn"]
    assert left(report) == {}
    with torch.no_grad():
        for inp in (x, torch.randn(4, 3, 8, 8)):
            assert_same(folded.module()(inp), model(inp))
    assert {k: v.data_ptr() for k, v in ep.state_dict.items()} == {k: v.data_ptr() for k, v in before.items()}
    assert not [k for k in folded.state_dict if k.startswith(("act.", "bn1.", "bn2.", "frozen."))]
    assert "conv.bias" in folded.state_dict  # the conv had none
    ops = {str(n.target) for n in folded.graph.nodes if n.op == "call_function"}
    assert not [op for op in ops if "batch_norm" in op or "dropout" in op]
    again = export(folded.module(), x)  # exported again
    torch.export.save(folded, tmp_path / "folded.pt2")
    loaded = torch.export.load(tmp_path / "folded.pt2")
    with torch.no_grad():
        assert_same(again.module()(x), model(x))
        assert_same(loaded.module()(x), model(x))


def test_exported_program_leaves_what_is_not_exact():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = randomize(Shared()).eval()
    x = torch.randn(2, 3, 4, 4)
    folded, report = pybn.torch.fold(export(model, x), return_report=True)
    assert report == [NotFolded("batch norm", ("bn",), "with conv: the output of conv is used 2 times")]
    with torch.no_grad():
        assert_same(folded.module()(x), model(x))


def test_exported_program_with_example_inputs_is_refused():
    ep = export(nn.Sequential(nn.Linear(3, 3)).eval(), torch.randn(2, 3))
    with pytest.raises(TypeError, match=r"^example_inputs: "):
        pybn.torch.fold(ep, example_inputs=torch.randn(2, 3))


@pytest.mark.parametrize("decomposed", [False, True], ids=["training_ir", "decomposed"])
def test_exported_program_of_drop_ins_folds(decomposed):
    """An accelerated model exports pybn's operator torch.ops.pybn.batch_norm_infer: a batch norm too."""
    model = pybn.torch.accelerate(randomize(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                                                          nn.Conv2d(6, 6, 1), nn.SyncBatchNorm(6)))).eval()
    x = torch.randn(2, 3, 8, 8)
    ep = export(model, x, decomposed)
    assert sum(n.target is torch.ops.pybn.batch_norm_infer.default for n in ep.graph.nodes) == 2
    folded, report = pybn.torch.fold(ep, return_report=True)
    assert report == [Folded("conv+bn", ("0", "1")), Folded("conv+bn", ("3", "4"))]
    assert not any("batch_norm" in str(n.target) for n in folded.graph.nodes)
    with torch.no_grad():
        for inp in (x, torch.randn(2, 3, 8, 8)):
            assert_same(folded.module()(inp), model(inp))


@pytest.mark.parametrize("last", ["bn", "dropout"])
def test_exported_program_ending_in_a_fold_names_its_new_output(last):
    """Folding the step that made the program's output makes the layer's node the output; the
    signature must name it (else the program does not verify)."""
    layers = [nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)] + ([nn.Dropout(0.5)] if last == "dropout" else [])
    model = randomize(nn.Sequential(*layers)).eval()
    x = torch.randn(2, 3, 8, 8)
    folded, report = pybn.torch.fold(export(model, x), return_report=True)
    assert kinds(report) == ["conv+bn"] + ["dropout"] * (last == "dropout")
    with torch.no_grad():
        assert_same(folded.module()(x), model(x))
    output = list(folded.graph.nodes)[-1]
    assert [s.arg.name for s in folded.graph_signature.output_specs] == [a.name for a in output.args[0]] == ["conv2d"]


class PybnFunctional(nn.Module):
    """pybn.torch.nn.batch_norm called in forward: torch.fx records torch.ops.pybn.batch_norm_infer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        bn = self.bn
        return pybn.torch.nn.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                        False, 0.1, bn.eps)


def test_pybn_batch_norm_function_folds():
    x = torch.randn(2, 3, 8, 8)
    folded, report = check(randomize(PybnFunctional()), x, torch.randn(1, 3, 4, 4))
    assert kinds(report) == ["conv+bn"] and not left(report)
    _, report = check(randomize(PybnFunctional()), x, example_inputs=None)  # any rank >= 2: the rank rule
    assert list(left(report)) == ["batch_norm_infer"] and "pass example_inputs" in left(report)["batch_norm_infer"]


# --- branch merging (RepVGG, MobileOne) -------------------------------------------------------

class ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k, stride=1, groups=1, padding=None):
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2 if padding is None else padding, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    def __init__(self, c, stride=1, identity=True, one_padding=None):
        super().__init__()
        self.kxk = ConvBN(c, c, 3, stride)
        self.one = ConvBN(c, c, 1, stride, padding=one_padding)
        self.identity = nn.BatchNorm2d(c) if identity else None

    def forward(self, x):
        y = self.kxk(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


class MobileOneBlock(nn.Module):
    """k depthwise kxk branches, a 1x1 scale branch and an identity batch norm, summed in place."""

    def __init__(self, c, branches=3):
        super().__init__()
        self.kxk = nn.ModuleList(ConvBN(c, c, 3, groups=c) for _ in range(branches))
        self.scale = ConvBN(c, c, 1, groups=c)
        self.identity = BatchNormAct2d(c, nn.Identity)

    def forward(self, x):
        identity = self.identity(x)
        out = self.scale(x)
        for branch in self.kxk:
            out += branch(x)
        out += identity
        return F.relu(out)


def test_repvgg_blocks_merge_into_one_conv_each():
    model = randomize(nn.Sequential(RepVGGBlock(4, stride=2, identity=False), RepVGGBlock(4), RepVGGBlock(4)))
    x = torch.randn(2, 4, 10, 10)
    folded, report = check(model, x, torch.randn(1, 4, 7, 9), merge_branches=True)
    merged = [r for r in report if r.kind == "branches"]
    assert merged == [Folded("branches", ("0.kxk.0", "0.one.0")),
                      Folded("branches", ("1.kxk.0", "1.one.0", "1.identity")),
                      Folded("branches", ("2.kxk.0", "2.one.0", "2.identity"))]
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert left(report) == {}


def test_mobileone_block_merges_depthwise_branches():
    model = randomize(MobileOneBlock(6))
    folded, report = check(model, torch.randn(2, 6, 7, 7), torch.randn(1, 6, 4, 5), merge_branches=True)
    assert report[-1] == Folded("branches", ("kxk.0.0", "scale.0", "kxk.1.0", "kxk.2.0", "identity"))
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 1


def test_branches_are_merged_only_on_request():
    model = randomize(RepVGGBlock(4))
    folded, report = check(model, torch.randn(2, 4, 6, 6))
    assert "branches" not in kinds(report)
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 2
    assert list(left(report)) == ["identity"]


class TwoConvs(nn.Module):
    def __init__(self, a, b, identity=False):
        super().__init__()
        self.a, self.b, self.identity = a, b, identity

    def forward(self, x):
        y = self.a(x) + self.b(x)
        return y + x if self.identity else y


def test_plain_identity_branch_merges():
    model = TwoConvs(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1, bias=False), identity=True)
    folded, report = check(model, torch.randn(2, 4, 5, 5), torch.randn(4, 6, 3), merge_branches=True)
    assert report == [Folded("branches", ("a", "b"))]
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 1


REFUSED_MERGES = {
    "dilation": (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2)),
    "groups": (nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1)),
    "padding_mode": (nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), nn.Conv2d(4, 4, 1)),
    "uneven_same": (nn.Conv2d(4, 4, 2, padding="same"), nn.Conv2d(4, 4, 1)),
    "transposed": (nn.ConvTranspose2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("case", list(REFUSED_MERGES))
def test_branches_that_do_not_sum_to_one_conv_are_left(case):
    a, b = copy.deepcopy(REFUSED_MERGES[case])
    folded, report = check(TwoConvs(a, b), torch.randn(2, 4, 6, 6), merge_branches=True)
    assert report == []
    assert sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in folded.modules()) == 2


@pytest.mark.parametrize("block", ["repvgg", "mobileone"])
def test_exported_program_branches_merge(block):
    model = randomize(nn.Sequential(RepVGGBlock(4) if block == "repvgg" else MobileOneBlock(4))).eval()
    x = torch.randn(2, 4, 7, 7)
    folded, report = pybn.torch.fold(export(model, x), merge_branches=True, return_report=True)
    assert report[-1].kind == "branches" and left(report) == {}
    assert [str(n.target) for n in folded.graph.nodes if n.op == "call_function"] == ["aten.conv2d.default",
                                                                                      "aten.relu.default"]
    with torch.no_grad():
        assert_same(folded.module()(x), model(x))


class AddsIntoItsInput(nn.Module):
    """`x.add_(a(x))` changes x, which b then reads through another name: b sees x + a(x), so the
    sum is not three branches over one input (merging them would give x + a(x) + b(x))."""

    def __init__(self, augmented=False):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.augmented = augmented

    def forward(self, x):
        x = x.clone()
        alias = x
        if self.augmented:
            x += self.a(x)
        else:
            x = x.add_(self.a(x))
        return x + self.b(alias)


def test_in_place_add_into_the_shared_input_is_not_merged():
    _, report = check(AddsIntoItsInput(), torch.randn(2, 4, 5, 5), merge_branches=True)
    assert report == []


@pytest.mark.parametrize("merge", [False, True], ids=["fold", "merge"])
def test_augmented_assignment_into_an_aliased_input_folds_as_eager(merge):
    """torch.fx's tracer records `x += y` as `x + y`: the change seen through `alias` is lost,
    and its graph computes another result (returned, silently wrong, before the example call
    checked it); pybn's tracer records the in-place add, and the graph is the model."""
    model = AddsIntoItsInput(augmented=True).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert not torch.allclose(torch.fx.symbolic_trace(copy.deepcopy(model))(x), model(x))
    kwargs = {"merge_branches": True} if merge else {}
    _, report = check(model, x, torch.randn(1, 4, 3, 3), **kwargs)
    assert report == []


@pytest.mark.parametrize("merge", [False, True], ids=["fold", "merge"])
def test_augmented_assignment_is_traced_in_place_without_the_example(merge):
    """Without example_inputs the graph torch.fx's tracer makes of `alias = x; x += a(x)` was
    returned (b(alias) silently read the old x); pybn's tracer records the in-place add."""
    model = AddsIntoItsInput(augmented=True).eval()
    x = torch.randn(2, 4, 5, 5)
    _, report = check(model, x, torch.randn(1, 4, 3, 3), example_inputs=None, merge_branches=merge)
    assert report == []


class AddsThroughAView(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.c1(x)
        half = y[:, :2]  # a view: it sees the += below
        y += self.c2(x)
        return self.bn(y) + half.mean()


class ScalesItsSizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        n, c, h, w = x.shape
        hw = h
        hw *= w  # an int: a new value, h keeps its own
        y = self.bn(self.c(x)).reshape(n, c, hw)
        return y.reshape(n, c, h, w)


def test_augmented_assignments_on_views_and_sizes_fold_as_eager():
    """A view taken before `y += ...` sees the change (a graph with y + ... gave the view the
    old values: 2.7 off); an `*=` on a size is an int's and does not stop the fold."""
    x = torch.randn(2, 4, 6, 6)
    _, report = check(randomize(AddsThroughAView()), x, torch.randn(1, 4, 3, 3), example_inputs=None)
    assert kinds(report) == []
    _, report = check(randomize(ScalesItsSizes()), x, torch.randn(1, 4, 3, 3), example_inputs=None)
    assert kinds(report) == ["conv+bn"]


class AddsItsInput(nn.Module):
    """A residual block's tail as torchvision writes it: ``out += identity``."""

    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.bn(self.c(x))
        out += x
        return torch.relu(out)


class ScalesByItsStride(nn.Module):
    """`s *= 2` on a stride, an int: a tensor method that returns no tensor."""

    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.c(x))
        s = y.stride(1)
        s *= 2
        return y * s


@pytest.mark.parametrize("example", [True, False], ids=["example", "no-example"])
@pytest.mark.parametrize("model", [AddsItsInput, AddsThroughAView, ScalesItsSizes, ScalesByItsStride])
def test_a_folded_graph_scripts_and_loads_without_pybn(model, example, tmp_path):
    """The folded graph's augmented assignments are plain torch calls (a tensor's in place, a
    size's a new value): before, each stayed a call of pybn's tracer's function, which
    TorchScript refused ("Python builtin iadd is currently not supported") and which a saved
    model needed pybn to load; loaded, the graph traced again keeps the in-place add (the
    view of AddsThroughAView sees it)."""
    model = randomize(model()).eval()
    x = torch.randn(2, 4, 6, 6)
    folded = check(model, x, example_inputs=x if example else None)[0]
    calls = [n.target for n in folded.graph.nodes if n.op in ("call_function", "call_method")]
    assert not any(str(getattr(t, "__module__", "")).startswith("pybn") for t in calls), calls
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (TorchScript's deprecation and its notes on the GraphModule's attributes)
        assert_same(torch.jit.script(folded)(x), model(x))
    torch.save(folded, tmp_path / "folded.pt")
    torch.save((x, model(x).detach()), tmp_path / "io.pt")
    code = ("import sys; sys.modules['pybn'] = None\n"  # (import pybn fails in this process)
            "import torch\n"
            f"m = torch.load({str(tmp_path / 'folded.pt')!r}, weights_only=False)\n"
            f"x, want = torch.load({str(tmp_path / 'io.pt')!r})\n"
            "with torch.no_grad():\n"
            "    err = ((m(x) - want).abs().max() / want.abs().max()).item()\n"
            "assert err < 1e-5, err\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


class LinearNorm(nn.Module):
    """timm LeViT's: a Linear on (batch, tokens, features), its features batch-normalized as
    rows (``start=0``); ``start=1`` normalizes tokens x features instead, which no fold keeps."""

    def __init__(self, start=0, tokens=5):
        super().__init__()
        self.start = start
        self.linear = nn.Linear(8, 6, bias=False)
        self.bn = nn.BatchNorm1d(6 if start == 0 else 6 * tokens)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(self.start, self.start + 1)).reshape_as(x)


def test_linear_then_rows_of_its_features_then_batch_norm_folds():
    """(before: left, "no Linear or convolution next to it": 58 of timm levit_128's 64 batch
    norms) The fold goes into the Linear, before the flatten; other token counts too."""
    x = torch.randn(2, 5, 8)
    _, report = check(randomize(LinearNorm()), x, torch.randn(3, 7, 8))
    assert kinds(report) == ["linear+bn"]
    # without the example the flatten's rank is unknown: left, as a batch norm whose rank is unknown
    _, report = check(randomize(LinearNorm()), x, example_inputs=None)
    assert kinds(report) == [] and left(report)
    # tokens x features as channels: no fold
    _, report = check(randomize(LinearNorm(start=1)), x)
    assert kinds(report) == [] and left(report)
    # the exported program (aten.flatten, aten.reshape_as)
    model = randomize(LinearNorm()).eval()
    program, report = pybn.torch.fold(torch.export.export(model, (x,)), return_report=True)
    assert kinds(report) == ["linear+bn"]
    with torch.no_grad():
        assert_same(program.module()(x), model(x))


def test_merge_branches_must_be_a_bool():
    with pytest.raises(TypeError, match=r"^merge_branches: "):
        pybn.torch.fold(nn.Linear(2, 2), merge_branches="yes")


# --- what the example call shows besides the modules' calls ---------------------------------

class ReadsOutside(nn.Module):
    """conv -> bn, with `read` (a parameter of either) added to the output by the model's own
    forward; `branch` makes the forward untraceable."""

    def __init__(self, read, branch):
        super().__init__()
        self.c, self.bn, self.read, self.branch = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), read, branch

    def forward(self, x):
        y = self.bn(self.c(x))
        if self.branch and x.sum() < -1e9:  # (untraceable: a value decides)
            return x
        return y + getattr(self, self.read[0]).get_parameter(self.read[1]).view(1, -1, 1, 1)


@pytest.mark.parametrize("branch", [False, True], ids=["traced", "untraced"])
@pytest.mark.parametrize("read", [("c", "bias"), ("bn", "weight"), ("bn", "bias")], ids=".".join)
def test_a_pair_whose_parameters_forward_reads_elsewhere_is_not_folded(read, branch):
    """The untraced path folded conv+bn and the forward's later read saw the folded bias
    (outputs off by 2 in 6), or raised for the batch norm's weight (an nn.Identity has none)."""
    x = torch.randn(2, 4, 6, 6)
    _, report = check(randomize(ReadsOutside(read, branch)), x, torch.randn(3, 4, 5, 5))
    assert kinds(report) == []
    assert "is read outside its own call" in left(report)["bn"]


class AddsBiasOf(nn.Module):
    """Adds the bias of a conv it holds without registering it (so the model registers it once)."""

    def __init__(self, conv):
        super().__init__()
        object.__setattr__(self, "conv", conv)

    def forward(self, x):
        return x + self.conv.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("where", ["model hook", "other module"])
def test_a_pair_whose_parameters_are_read_elsewhere_is_not_folded_with_the_example(where):
    """A hook on the model (copied onto the folded GraphModule) or another module's forward read
    the conv's bias, which the fold had changed (outputs off by 2 in 6): only the example call
    shows such reads."""
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.BatchNorm2d(4), AddsBiasOf(conv) if where == "other module" else nn.ReLU())
    if where == "model hook":
        model.register_forward_hook(lambda mod, args, out: out + mod.get_submodule("0").bias.view(1, -1, 1, 1))
    x = torch.randn(2, 4, 6, 6)
    _, report = check(randomize(model), x, torch.randn(3, 4, 5, 5))
    assert kinds(report) == []
    # (the traced forward's own read of the bias is in its graph: the conv is used twice there)
    assert ("is read outside its own call" if where == "model hook" else "is used 2 times") in left(report)["1"]


class DefaultArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x, bias=None):
        y = self.bn(self.c(x))
        return y if bias is None else y + bias


def test_a_traced_graph_that_fails_on_the_example_is_not_used():
    """torch.fx traces the default `bias=None` as an input, so the graph computed y + None on
    the example forward had run: fold returned that graph, which raised on the first call."""
    x = torch.randn(2, 4, 6, 6)
    folded, report = check(randomize(DefaultArgument()), x, torch.randn(3, 4, 5, 5))
    assert kinds(report) == ["conv+bn"]
    assert type(folded) is DefaultArgument  # folded as a model torch.fx cannot trace


def test_a_compiled_model_is_folded_as_the_model_it_wraps():
    """fold(torch.compile(model)) raised from dynamo (the example call's hooks were compiled);
    without an example nothing folded."""
    model = randomize(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)))
    x = torch.randn(2, 4, 6, 6)
    for example in (x, None):
        folded, report = pybn.torch.fold(torch.compile(model, backend="eager"), example_inputs=example,
                                         return_report=True)
        assert kinds(report) == ["conv+bn"]
        with torch.no_grad():
            assert_same(folded(x), copy.deepcopy(model).eval()(x))


class ScalesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        x.mul_(2)
        return self.bn(self.c(x))


def test_the_example_inputs_are_not_written_and_a_forward_writing_its_input_folds():
    """forward ran three times on the caller's tensor (x came back times 8), and the traced
    graph ran on the input forward had already doubled, so it looked unlike the model."""
    model = randomize(ScalesItsInput())
    x = torch.randn(2, 4, 6, 6)
    before = x.clone()
    folded, report = pybn.torch.fold(model, example_inputs=x, return_report=True)
    assert torch.equal(x, before)
    assert kinds(report) == ["conv+bn"] and isinstance(folded, torch.fx.GraphModule)
    with torch.no_grad():
        assert_same(folded(x.clone()), copy.deepcopy(model).eval()(x.clone()))
