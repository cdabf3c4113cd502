"""pybn.torch.fold reports every batch norm it leaves, whatever its spelling in the graph: each
batch norm call torch 2.13 can put in a torch.fx graph or an ExportedProgram (before and after
``run_decompositions()``) is folded where it normalizes with constant running statistics, and
otherwise left with a NotFolded entry saying why (docs/folding.md)."""

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import pybn.torch  # noqa: E402
from pybn.torch import Folded, NotFolded  # noqa: E402

aten = torch.ops.aten
pybn_ops = torch.ops.pybn
EPS = 1e-3
BATCH_STATISTICS = "batch's statistics"


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(1234)


# name -> (the call on y with the norm's tensors n, whether it is exact to fold, what the reason says)
SPELLINGS = {
    # eval statistics: folded
    "F.batch_norm": (lambda y, n: F.batch_norm(y, n.mean, n.var, n.weight, n.bias, False, 0.1, EPS), True),
    "torch.batch_norm": (lambda y, n: torch.batch_norm(y, n.weight, n.bias, n.mean, n.var, False, 0.1, EPS, False),
                         True),
    "torch.native_batch_norm": (lambda y, n: torch.native_batch_norm(y, n.weight, n.bias, n.mean, n.var, False, 0.1,
                                                                     EPS)[0], True),
    "torch._native_batch_norm_legit": (lambda y, n: torch._native_batch_norm_legit(
        y, n.weight, n.bias, n.mean, n.var, False, 0.1, EPS)[0], True),
    "torch._native_batch_norm_legit_no_training": (lambda y, n: torch._native_batch_norm_legit_no_training(
        y, n.weight, n.bias, n.mean, n.var, 0.1, EPS)[0], True),
    "aten.batch_norm": (lambda y, n: aten.batch_norm.default(y, n.weight, n.bias, n.mean, n.var, False, 0.1, EPS,
                                                             False), True),
    "aten.native_batch_norm": (lambda y, n: aten.native_batch_norm.default(y, n.weight, n.bias, n.mean, n.var, False,
                                                                           0.1, EPS)[0], True),
    "aten.native_batch_norm (packet)": (lambda y, n: aten.native_batch_norm(y, n.weight, n.bias, n.mean, n.var,
                                                                            False, 0.1, EPS)[0], True),
    "aten._native_batch_norm_legit": (lambda y, n: aten._native_batch_norm_legit.default(
        y, n.weight, n.bias, n.mean, n.var, False, 0.1, EPS)[0], True),
    "aten._native_batch_norm_legit_no_training": (lambda y, n: aten._native_batch_norm_legit_no_training.default(
        y, n.weight, n.bias, n.mean, n.var, 0.1, EPS)[0], True),
    "aten._batch_norm_no_update": (lambda y, n: aten._batch_norm_no_update.default(
        y, n.weight, n.bias, n.mean, n.var, 0.1, EPS)[0], True),
    "pybn.batch_norm_infer": (lambda y, n: pybn_ops.batch_norm_infer.default(y, n.mean, n.var, n.weight, n.bias,
                                                                             EPS), True),
    "pybn.batch_norm_infer (packet)": (lambda y, n: pybn_ops.batch_norm_infer(y, n.mean, n.var, n.weight, n.bias,
                                                                              EPS), True),
    "pybn.batch_norm_add_relu (bn alone)": (lambda y, n: pybn_ops.batch_norm_add_relu.default(
        y, None, n.weight, n.bias, n.mean, n.var, False, 0.1, EPS, False)[0], True),
    # batch statistics, or more than a batch norm: left and reported
    "F.batch_norm training=True": (lambda y, n: F.batch_norm(y, n.mean, n.var, n.weight, n.bias, True, 0.1, EPS),
                                   BATCH_STATISTICS),
    "F.batch_norm no statistics": (lambda y, n: F.batch_norm(y, None, None, n.weight, n.bias, True, 0.1, EPS),
                                   BATCH_STATISTICS),
    "torch.batch_norm training=True": (lambda y, n: torch.batch_norm(y, n.weight, n.bias, n.mean, n.var, True, 0.1,
                                                                     EPS, False), BATCH_STATISTICS),
    "torch.native_batch_norm training=True": (lambda y, n: torch.native_batch_norm(
        y, n.weight, n.bias, n.mean, n.var, True, 0.1, EPS)[0], BATCH_STATISTICS),
    "torch._native_batch_norm_legit no_stats": (lambda y, n: torch._native_batch_norm_legit(
        y, n.weight, n.bias, True, 0.1, EPS)[0], BATCH_STATISTICS),
    "aten._native_batch_norm_legit.no_stats": (lambda y, n: aten._native_batch_norm_legit.no_stats(
        y, n.weight, n.bias, True, 0.1, EPS)[0], BATCH_STATISTICS),
    "aten._native_batch_norm_legit training=True": (lambda y, n: aten._native_batch_norm_legit.default(
        y, n.weight, n.bias, n.mean, n.var, True, 0.1, EPS)[0], BATCH_STATISTICS),
    "aten._native_batch_norm_legit_functional": (lambda y, n: aten._native_batch_norm_legit_functional.default(
        y, n.weight, n.bias, n.mean, n.var, True, 0.1, EPS)[0], BATCH_STATISTICS),
    "aten._batch_norm_with_update": (lambda y, n: aten._batch_norm_with_update.default(
        y, n.weight, n.bias, n.mean, n.var, 0.1, EPS)[0], BATCH_STATISTICS),
    "aten._batch_norm_with_update_functional": (lambda y, n: aten._batch_norm_with_update_functional.default(
        y, n.weight, n.bias, n.mean, n.var, 0.1, EPS)[0], BATCH_STATISTICS),
    "aten._batch_norm_impl_index training=True": (lambda y, n: aten._batch_norm_impl_index.default(
        y, n.weight, n.bias, n.mean, n.var, True, 0.1, EPS, False)[0], BATCH_STATISTICS),
    "pybn.batch_norm_train": (lambda y, n: pybn_ops.batch_norm_train.default(y, n.weight, n.bias, n.mean, n.var, 0.1,
                                                                             EPS)[0], BATCH_STATISTICS),
    "pybn.batch_norm_add_relu training=True": (lambda y, n: pybn_ops.batch_norm_add_relu.default(
        y, None, n.weight, n.bias, n.mean, n.var, True, 0.1, EPS, False)[0], BATCH_STATISTICS),
    "pybn.batch_norm_add_relu residual": (lambda y, n: pybn_ops.batch_norm_add_relu.default(
        y, y, n.weight, n.bias, n.mean, n.var, False, 0.1, EPS, True)[0], "adds a residual or applies a ReLU"),
}


class Norm(nn.Module):
    """A batch norm spelled as `call`, on its own tensors (no batch norm module to report)."""

    def __init__(self, call, c=4):
        super().__init__()
        self.call = call
        self.weight = nn.Parameter(1 + 0.5 * torch.randn(c))
        self.bias = nn.Parameter(torch.randn(c))
        self.register_buffer("mean", torch.randn(c))
        self.register_buffer("var", torch.rand(c) * 2 + 0.25)

    def forward(self, y):
        return self.call(y, self)


class ConvNorm(nn.Module):
    def __init__(self, call):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = Norm(call)

    def forward(self, x):
        return self.norm(self.conv(x))


# run_decompositions() makes these an operator that also returns the running statistics, which the
# program writes back to its buffers: left (the statistics are read), and reported.
DECOMPOSED_LEFT = {"torch._native_batch_norm_legit": "statistics are used",
                   "aten._native_batch_norm_legit": "statistics are used",
                   "pybn.batch_norm_add_relu (bn alone)": "statistics are used"}


def batch_norm_nodes(graph):
    """The batch norm calls in `graph` (auto_functionalized(op, ...) counts as a call of op)."""
    return [n for n in graph.nodes if n.op == "call_function" and
            "batch_norm" in str(n.args[0] if "auto_functionalized" in str(n.target) else n.target)]


@pytest.mark.parametrize("path", ["fx", "export", "export decomposed"])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_every_batch_norm_spelling_is_folded_or_reported(spelling, path):
    call, expected = SPELLINGS[spelling]
    if path == "export decomposed":
        expected = DECOMPOSED_LEFT.get(spelling, expected)
    model = ConvNorm(call).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        want = copy.deepcopy(model)(x)
    if path == "fx":
        folded, report = pybn.torch.fold(copy.deepcopy(model), example_inputs=x, return_report=True)
        graph = folded.graph
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(copy.deepcopy(model), (x,))
            if path == "export decomposed":
                ep = ep.run_decompositions()
        assert batch_norm_nodes(ep.graph), "the program has the batch norm"
        folded_ep, report = pybn.torch.fold(ep, return_report=True)
        folded, graph = folded_ep.module(), folded_ep.graph
    if expected is True:
        assert report == [Folded("conv+bn", ("conv", "norm"))]
        assert not batch_norm_nodes(graph)
        with torch.no_grad():
            got = folded(x)
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-5 * scale
    else:
        assert batch_norm_nodes(graph), "the batch norm is left"
        assert len(report) == 1 and isinstance(report[0], NotFolded), report
        assert report[0].kind == "batch norm" and report[0].names == ("norm",), report
        assert report[0].reason and expected in report[0].reason, report
