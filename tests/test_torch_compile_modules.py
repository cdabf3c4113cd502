"""pybn.torch's modules under torch.compile, where a user's training loop meets it: one graph
per configuration (no recompilation per call, per offset or per batch size), the same
gradients as eager with activation checkpointing, and errors that name the tensor at fault.
The backend is "eager" or "aot_eager": dynamo's guards and AOT autograd's partitioning are
what these tests are about, not inductor's code."""
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import pybn  # noqa: E402
import pybn.torch.nn as pnn  # noqa: E402
from pybn.torch.seeded import mask_counters, normal_counters  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_symbolic_counters_are_pybns():
    for n in [0, 1, *range(60, 70), 127, 128, 129, 255, 256, 257, 10**6 + 3]:
        assert mask_counters(n) == pybn.counters_used(n)
        assert normal_counters(n) == pybn.normal_counters_used(n)


SEEDED = {
    "Dropout": lambda: pnn.Dropout(0.5, seed=7),
    "Dropout2d": lambda: pnn.Dropout2d(0.5, seed=7),
    "StochasticDepth": lambda: pnn.StochasticDepth(0.3, "row", seed=7),
    "DropPath": lambda: pnn.DropPath(0.3, seed=7),
    "AlphaDropout": lambda: pnn.AlphaDropout(0.5, seed=7),
    "GaussianDropout": lambda: pnn.GaussianDropout(0.3, seed=7),
    "GaussianNoise": lambda: pnn.GaussianNoise(0.3, seed=7),
    "DropBlock2d": lambda: pnn.DropBlock2d(0.3, 3, seed=7),
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", sorted(SEEDED))
def test_a_pinned_stream_compiles_once_and_walks_as_in_eager(name, dynamic):
    """The pinned modules kept their offset as a Python int, on which dynamo guards: a new graph
    every call, and past the recompile limit (8) an error with fullgraph=True; Dropout's count
    of counters read the size through pybn's int checks: a graph per batch size with
    dynamic=True. The compiled module's outputs are the eager module's, call for call."""
    eager, compiled_module = SEEDED[name](), SEEDED[name]()
    compiled = torch.compile(compiled_module, backend="eager", fullgraph=True, dynamic=dynamic)
    sizes = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11] if dynamic else [4] * 10
    for n in sizes[:2]:  # the first graph (and, dynamic, the one with the size made symbolic)
        x = torch.randn(n, 3, 8, 8)
        torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in sizes[2:]:
            x = torch.randn(n, 3, 8, 8)
            torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=0)
    assert compiled_module.offset == eager.offset



# (dynamo resuming after torch's own graph break at float(num_batches_tracked) reads a .grad)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_momentum_none_compiles_once_and_matches_eager():
    """A cumulative average's momentum (1 / num_batches_tracked) went to pybn's operator as a
    float: dynamo specialized it, a new graph every step (13 graphs in 10 steps; stock torch's
    module: 2)."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), pnn.BatchNorm1d(8, momentum=None), nn.ReLU(), nn.Linear(8, 1))

    eager, compiled_model = model(), model()
    compiled = torch.compile(compiled_model, backend="eager")
    for _ in range(2):  # (the second step's new momentum makes dynamo treat it as a symbol, as for stock)
        x = torch.randn(16, 4)
        torch.testing.assert_close(compiled(x), eager(x))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(5):
            x = torch.randn(16, 4)
            torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(compiled_model[1].running_var, eager[1].running_var)
    assert int(compiled_model[1].num_batches_tracked) == int(eager[1].num_batches_tracked) == 7


IMPORT_THEN_COMPILE = """
import importlib.util, sys, torch, pybn.torch, pybn.torch.nn as pnn
loaded = [m for m in ("torch._dynamo", "sympy", "torch.onnx") if m in sys.modules]
assert not loaded, loaded
{before_compile}
bn, eager = pnn.BatchNorm1d(8, momentum=None), pnn.BatchNorm1d(8, momentum=None)
compiled = torch.compile(bn, backend="eager")
for _ in range(3):
    x = torch.randn(16, 8)
    torch.testing.assert_close(compiled(x), eager(x))
from torch._dynamo.utils import counters
breaks = list(counters["graph_break"])
assert len(breaks) == 1 and "torch.compiler.disable" in breaks[0], breaks
assert int(bn.num_batches_tracked) == 3
"""


BEFORE_COMPILE = {
    "nothing": "",
    # a library's availability check, which imports nothing
    "a find_spec probe": 'assert importlib.util.find_spec("torch._dynamo") is not None',
    # a first import that fails (sympy missing for a moment), then one that succeeds
    "a failed first import": """
sys.modules["sympy"] = None
try:
    import torch._dynamo
except ImportError:
    pass
else:
    raise AssertionError("torch._dynamo imported without sympy")
del sys.modules["sympy"]
for name in [n for n in sys.modules if n.startswith("torch._dynamo")]:
    del sys.modules[name]
""",
}


@pytest.mark.parametrize("before_compile", BEFORE_COMPILE)
def test_import_leaves_dynamo_unloaded_and_compile_still_runs_the_batch_norm_eagerly(before_compile):
    """``import pybn.torch`` imported torch._dynamo (through torch.compiler.disable) and sympy,
    doubling the time of ``import torch``, and torch.onnx. Now the functions that run outside
    compiled graphs are disabled when torch.compile loads dynamo: a momentum=None batch norm
    compiled after such an import still runs eagerly (dynamo's one break: the disabled call),
    also after a find_spec probe or a failed first import of dynamo (the review found that
    each made the hook miss the real import)."""
    script = IMPORT_THEN_COMPILE.format(before_compile=BEFORE_COMPILE[before_compile])
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


RANDOM_MODULES = {
    "Dropout": lambda: pnn.Dropout(0.5),
    "Dropout2d": lambda: pnn.Dropout2d(0.5),
    "StochasticDepth": lambda: pnn.StochasticDepth(0.5, "row"),
    "AlphaDropout": lambda: pnn.AlphaDropout(0.5),
    "GaussianDropout": lambda: pnn.GaussianDropout(0.5),
    "DropBlock2d": lambda: pnn.DropBlock2d(0.5, 3),
}


class Checkpointed(nn.Module):
    def __init__(self, drop):
        super().__init__()
        self.conv, self.drop = nn.Conv2d(3, 3, 1), drop

    def forward(self, x):
        return checkpoint(lambda h: self.drop(self.conv(h)), x, use_reentrant=False)


@pytest.mark.skipif(not pybn.torch.ops.RANDOM, reason="torch < 2.5: custom_op has no tags")
@pytest.mark.parametrize("name", sorted(RANDOM_MODULES))
def test_activation_checkpointing_under_compile_recomputes_the_forwards_mask(name):
    """The seed-drawing operators were not tagged random: the compiled backward recomputed them
    with a fresh seed (another mask), and the weight's gradient was off by 15-40 (eager: 0).
    With the tag torch replays its generator state around the recomputation."""
    torch.manual_seed(1)
    model = Checkpointed(RANDOM_MODULES[name]())
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(model, backend="aot_eager")
    state = torch.get_rng_state()
    y = compiled(x)
    y.sum().backward()
    got = model.conv.weight.grad.clone()
    # the weight's gradient for the mask the forward used: drop's derivative from eager
    # autograd on the same seed draw, through the 1x1 conv by hand
    h = model.conv(x).detach().requires_grad_()
    torch.set_rng_state(state)
    y_eager = model.drop(h)
    torch.testing.assert_close(y_eager, y.detach())
    (dh,) = torch.autograd.grad(y_eager.sum(), h)
    want = torch.einsum("nkhw,nchw->kc", dh, x).reshape(got.shape)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_channel_count_mismatch_under_compile_names_the_tensor(training):
    """The fake implementations checked no per-channel shape: compile failed later, in the
    backward's gradient check ("returned an invalid gradient at index 1 - got [4] but expected
    shape compatible with [3]")."""
    bn = pnn.BatchNorm2d(3).train(training)
    args = (bn.running_mean, bn.running_var, bn.weight, bn.bias, training)
    with pytest.raises(Exception, match=r"weight: expected shape \(4,\)"):
        torch.compile(lambda x: pnn.batch_norm(x, *args), backend="aot_eager")(torch.randn(2, 4, 5, 5))
    # the module names its input (it was built for 3 channels)
    with pytest.raises(Exception, match=r"input: has 4 channels \(dim 1\) but the module was built with "
                                        r"num_features=3"):
        torch.compile(bn, backend="aot_eager")(torch.randn(2, 4, 5, 5))


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_momentum_none_under_compile_runs_the_hooks_once():
    """The eager fallback called the module again: its hooks ran twice per step (a forward
    hook doubling the output doubled it twice)."""
    bn = pnn.BatchNorm1d(8, momentum=None)
    calls = []
    bn.register_forward_pre_hook(lambda m, args: calls.append(1))
    bn.register_forward_hook(lambda m, args, out: out * 2)
    eager = pnn.BatchNorm1d(8, momentum=None)
    eager.register_forward_hook(lambda m, args, out: out * 2)
    compiled = torch.compile(bn, backend="eager")
    for _ in range(3):
        x = torch.randn(16, 8)
        torch.testing.assert_close(compiled(x), eager(x))
    assert len(calls) == 3
