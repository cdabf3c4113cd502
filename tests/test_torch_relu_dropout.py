"""dropout(relu(x)) in torch: ``torch.ops.pybn.relu_dropout`` and its backward (opcheck,
gradcheck and double backward, values against torch's ReLU and pybn's mask, compile), the
dropout modules' ``relu=True``, and ``pybn.torch.fuse_tails`` rewriting ``dropout(relu(x))``
(which models it fuses, which it leaves alone, and that the fused model trains as the
unfused one, bit for bit)."""
import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import pybn
import pybn.torch
from pybn.bench import torch_models
from pybn.torch import Fused, fuse_tails

PHILOX = torch.tensor([12345, 64])


def keep_of(shape, p, seed, offset):
    n = math.prod(shape)
    return torch.from_numpy(np.unpackbits(pybn.dropout_mask(shape, p, seed=seed, offset=offset), count=n,
                                          bitorder="little").reshape(shape).astype(bool))


def expected(x, p, seed=12345, offset=64):
    """keep ? relu(x) * scale : 0 with the mask over x's memory order (contiguous x)."""
    scale = torch.tensor(pybn.dropout_scale(p), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    kept = (torch.relu(x.detach()).to(scale.dtype) * scale).to(x.dtype)
    return torch.where(keep_of(tuple(x.shape), p, seed, offset), kept, torch.zeros((), dtype=x.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_operator_values_and_gradient(isa, threads, dtype):
    torch.manual_seed(0)
    x = torch.randn(6, 7, 130, dtype=dtype)
    x[0, 0, :4] = torch.tensor([0.0, -0.0, float("nan"), float("-inf")])
    x.requires_grad_()
    y, used = torch.ops.pybn.relu_dropout(x, 0.3, PHILOX)
    assert used.tolist() == PHILOX.tolist()
    want = expected(x, 0.3)
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    # torch's autograd of relu then the mask (the same scale), in the compute type
    xr = x.detach().double().requires_grad_()
    keep = keep_of(tuple(x.shape), 0.3, 12345, 64)
    scale = pybn.dropout_scale(0.3) if dtype == torch.float64 else float(np.float32(pybn.dropout_scale(0.3)))
    ref = torch.where(keep, torch.relu(xr) * scale, torch.zeros((), dtype=torch.float64))
    (want_dx,) = torch.autograd.grad(ref, xr, dy.double())
    torch.testing.assert_close(dx, want_dx.to(dtype), rtol=0, atol=0)


def test_channels_last_mask_follows_memory_order():
    x = torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last)
    y, _ = torch.ops.pybn.relu_dropout(x, 0.5, PHILOX)
    assert y.is_contiguous(memory_format=torch.channels_last)
    want = expected(x.permute(0, 2, 3, 1).contiguous(), 0.5).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, want, rtol=0, atol=0)


def test_gradcheck_and_double_backward():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    x = (x + x.sign() * 0.1).requires_grad_()  # (away from ReLU's kink, where finite differences fail)

    def drop(x):
        return torch.ops.pybn.relu_dropout(x, 0.4, PHILOX)[0]
    assert gradcheck(drop, (x,))
    assert gradgradcheck(drop, (x,))


@pytest.mark.parametrize("case", ["f32", "bf16", "cl", "backward", "backward_bf16"])
def test_opcheck(case):
    g = torch.Generator().manual_seed(3)
    if case.startswith("backward"):
        dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
        y = torch.relu(torch.randn(4, 3, 5, generator=g)).to(dtype)
        torch.library.opcheck(torch.ops.pybn.relu_dropout_backward.default,
                              (torch.randn(4, 3, 5, generator=g).to(dtype).requires_grad_(), y, 0.3))
        return
    x = torch.randn(4, 3, 5, 2, generator=g, dtype=torch.bfloat16 if case == "bf16" else torch.float32)
    if case == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.pybn.relu_dropout.default, (x.requires_grad_(), 0.3, PHILOX))


@pytest.mark.parametrize("last", [False, True], ids=["contiguous", "channels_last"])
def test_what_pybn_does_not_take_falls_back(monkeypatch, last):
    """Tensors pybn's kernels do not take (other devices and dtypes; here pretended): the
    forward on a float32 copy (the same mask), the backward in torch, in y's layout."""
    taken = []
    monkeypatch.setattr(pybn.torch.ops, "pybn_takes", lambda t: taken.append(t) and False)
    fmt = torch.channels_last if last else torch.contiguous_format
    x = torch.randn(3, 4, 5, 2, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    y, _ = torch.ops.pybn.relu_dropout(x, 0.5, PHILOX)
    want = expected(x.detach().permute(0, 2, 3, 1).contiguous(), 0.5).permute(0, 3, 1, 2) if last else expected(x, 0.5)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    dy = torch.randn(3, 4, 5, 2, dtype=torch.float64)  # contiguous, whatever y's layout
    (dx,) = torch.autograd.grad(y, x, dy)
    assert taken  # the fallback was asked
    torch.testing.assert_close(dx, torch.where(y <= 0, torch.zeros((), dtype=torch.float64), dy * 2), rtol=0, atol=0)
    assert dx.is_contiguous(memory_format=fmt)


def test_compile_fullgraph_matches_eager():
    x = torch.randn(16, 33, requires_grad=True)

    def f(x):
        return torch.ops.pybn.relu_dropout(x, 0.3, PHILOX)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(f, fullgraph=True)
        y = compiled(x)
    torch.testing.assert_close(y, f(x), rtol=0, atol=0)
    (dx,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(f(x).sum(), x)
    torch.testing.assert_close(dx, want, rtol=0, atol=0)


# --------------------------------------------------------------------------- modules

def test_module_relu_argument_in_every_mode():
    torch.manual_seed(0)
    drop = pybn.torch.nn.Dropout(0.3, seed=99)
    x = torch.randn(8, 50)
    y = drop(x, relu=True)
    torch.testing.assert_close(y, expected(x, 0.3, 99, 0), rtol=0, atol=0)
    assert drop.offset == pybn.counters_used(x.numel())  # advanced as for dropout
    drop.eval()
    torch.testing.assert_close(drop(x, relu=True), torch.relu(x), rtol=0, atol=0)
    two_d = pybn.torch.nn.Dropout2d(0.5, seed=5)  # channel-wise: relu first, then its mask
    x4 = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(two_d(x4, relu=True), pybn.torch.nn.Dropout2d(0.5, seed=5)(torch.relu(x4)),
                               rtol=0, atol=0)
    inplace = pybn.torch.nn.Dropout(0.3, inplace=True, seed=99)
    x_before = x.clone()
    torch.testing.assert_close(inplace(x, relu=True), expected(x, 0.3, 99, 0), rtol=0, atol=0)
    assert torch.equal(x, x_before)  # the input is not relu(x): nothing to write in place


# --------------------------------------------------------------------------- fuse_tails

class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(6, 6) for _ in range(6))
        self.relu = nn.ReLU()
        self.relu_inplace = nn.ReLU(inplace=True)
        self.drop = nn.ModuleList(nn.Dropout(0.3) for _ in range(6))
        self.drop2d = nn.Dropout1d(0.3)

    def forward(self, x):
        f, d = self.fc, self.drop
        h = d[0](self.relu(f[0](x)))          # module ReLU: fused
        h = d[1](F.relu(f[1](h)))             # functional: fused
        h = d[2](f[2](h).relu())              # method: fused
        h = d[3](self.relu_inplace(f[3](h)))  # in place on a temporary: fused
        a = f[4](h)
        h = d[4](torch.relu_(a)) + a          # in place on a value read again: left alone
        r = F.relu(f[5](h))
        h = d[5](r) + r                       # the ReLU's output used twice: left alone
        return self.drop2d(F.relu(h.unsqueeze(1))).squeeze(1)  # channel-wise dropout: left alone


def test_spellings_fused_and_left_alone():
    torch.manual_seed(1)
    stock = Spellings()
    fused, report = fuse_tails(copy.deepcopy(stock), return_report=True)
    assert report == [Fused(f"drop.{i}", "dropout(relu(x))") for i in range(4)]
    _assert_same_steps(stock, fused, torch.randn(5, 6))


def _assert_same_steps(stock, fused, x, steps=3):
    """The fused model and the unfused accelerated one, pinned to the same dropout seeds:
    the same outputs, gradients and parameters bit for bit (the same kernels and masks; the
    backward from the output gives dropout's gradient exactly)."""
    accelerated = pybn.torch.accelerate(copy.deepcopy(stock))
    for model in (accelerated, fused):
        for i, m in enumerate(m for m in model.modules() if isinstance(m, pybn.torch.nn.Dropout)):
            m.seed = 1000 + i
    records = []
    for model in (accelerated, fused):
        torch.manual_seed(0)  # (the seeds of the modules left unpinned, channel-wise dropout's)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        record = []
        for _ in range(steps):
            xs = x.clone().requires_grad_()
            opt.zero_grad(set_to_none=True)
            y = model(xs)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            record += [y.detach().clone(), xs.grad.clone()] + [p.grad.clone() for p in model.parameters()]
            opt.step()
        records.append(record + [t.clone() for t in model.state_dict().values()])
    for a, b in zip(*records):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_red_wine_mlp_and_tutorial_cnn():
    torch.manual_seed(2)
    mlp = torch_models.red_wine()
    fused, report = fuse_tails(copy.deepcopy(mlp), return_report=True)
    assert report == [Fused(str(i), "dropout(relu(x))") for i in (2, 6, 10)]
    _assert_same_steps(mlp, fused, torch.randn(32, 11) * 3)
    cnn = torch_models.CNN()
    fused, report = fuse_tails(copy.deepcopy(cnn), return_report=True)
    assert Fused("dropout", "dropout(relu(x))") in report
    _assert_same_steps(cnn, fused, torch.randn(4, 1, 28, 28))
    fresh = fuse_tails(copy.deepcopy(cnn)).eval()  # evaluation mode: the ReLU alone
    with torch.no_grad():
        x = torch.randn(2, 1, 28, 28)
        torch.testing.assert_close(fresh(x), pybn.torch.accelerate(copy.deepcopy(cnn)).eval()(x), rtol=0, atol=0)


def test_dropout_or_relu_with_hooks_is_left_alone():
    for hooked in (1, 2):
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.5))
        seen = []
        model[hooked].register_forward_hook(lambda m, i, o: seen.append(o.min().item()))
        fused, report = fuse_tails(model, return_report=True)
        assert report == []
        fused(torch.randn(3, 4))
        assert seen and seen[0] >= 0  # the hook saw relu's output, or the dropout's of it


class MutateBetween(nn.Module):  # x written in place between the ReLU and the dropout
    def __init__(self):
        super().__init__()
        self.fc, self.drop = nn.Linear(8, 8), nn.Dropout(0.5)

    def forward(self, x):
        h = self.fc(x)
        r = torch.relu(h)
        h += 1.0
        return self.drop(r), h


class InPlaceOnView(nn.Module):  # an in-place ReLU writes h through a view
    def __init__(self):
        super().__init__()
        self.fc, self.drop = nn.Linear(8, 8), nn.Dropout(0.5)

    def forward(self, x):
        h = self.fc(x)
        return self.drop(F.relu(h.view(-1), inplace=True)), h


class InPlaceOnInput(nn.Module):  # an in-place ReLU writes the caller's tensor
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(torch.relu_(x.view(-1)))


class OutputWrittenInPlace(nn.Module):  # the fused call would have saved what += changes
    def __init__(self):
        super().__init__()
        self.fc, self.drop = nn.Linear(8, 8), nn.Dropout(0.5)

    def forward(self, x):
        h = self.drop(F.relu(self.fc(x)))
        h += 1.0
        return h


@pytest.mark.parametrize("cls", [MutateBetween, InPlaceOnView, InPlaceOnInput, OutputWrittenInPlace])
def test_pairs_that_must_stay_unfused(cls):
    torch.manual_seed(5)
    stock = cls()
    fused, report = fuse_tails(copy.deepcopy(stock), return_report=True)
    assert report == []
    accelerated = pybn.torch.accelerate(copy.deepcopy(stock))
    for model in (accelerated, fused):
        for m in model.modules():
            if isinstance(m, pybn.torch.nn.Dropout):
                m.seed = 3
    x = torch.randn(4, 8)
    xa, xb = x.clone(), x.clone()
    a, b = accelerated(xa), fused(xb)
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(v, u, rtol=0, atol=0)
    torch.testing.assert_close(xb, xa, rtol=0, atol=0)


def test_in_place_relu_on_a_layers_output():
    """VGG's classifier spelling: ReLU(inplace=True) on a Linear's output, then Dropout."""
    torch.manual_seed(6)
    stock = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(16, 3))
    fused, report = fuse_tails(copy.deepcopy(stock), return_report=True)
    assert report == [Fused("2", "dropout(relu(x))")]
    _assert_same_steps(stock, fused, torch.randn(5, 8))


def test_in_place_dropout_module():
    """Dropout(inplace=True) after an in-place ReLU: stock torch's backward (and the unfused
    accelerated model's) fails, the ReLU's saved output written; the fused call computes the
    same forward and has a backward."""
    torch.manual_seed(7)
    stock = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Dropout(0.5, inplace=True))
    fused, report = fuse_tails(copy.deepcopy(stock), return_report=True)
    assert report == [Fused("2", "dropout(relu(x))")]
    accelerated = pybn.torch.accelerate(copy.deepcopy(stock))
    accelerated[2].seed = fused.get_submodule("2").seed = 4
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), accelerated(x), rtol=0, atol=0)
    fused(x).sum().backward()
    assert fused.get_submodule("0").weight.grad is not None


def test_the_fused_operator_is_what_runs(monkeypatch):
    calls = []
    real = pybn.torch.ops.relu_dropout_call
    monkeypatch.setattr(pybn.torch.ops, "relu_dropout_call", lambda *a: calls.append(1) or real(*a))
    fused = fuse_tails(torch_models.red_wine())
    fused(torch.randn(8, 11))
    assert len(calls) == 3


def test_compiled_fused_mlp_matches_eager():
    torch.manual_seed(3)
    fused = fuse_tails(torch_models.red_wine())
    for i, m in enumerate(m for m in fused.modules() if isinstance(m, pybn.torch.nn.Dropout)):
        m.seed = 7 + i
    twin = copy.deepcopy(fused)
    x = torch.randn(16, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(fused, fullgraph=True)
        y = compiled(x)
    y_twin = twin(x)
    torch.testing.assert_close(y, y_twin, rtol=1e-6, atol=1e-6)
    y.square().sum().backward()
    y_twin.square().sum().backward()
    for p, q in zip(fused.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
