"""pybn.torch.fuse_tails: which tails of a traced forward become one fused call, and that the
fused model trains as the unfused accelerated one (outputs, every gradient, running
statistics, over SGD steps; then evaluation mode) with the same state_dict, parameter order
and checkpoints; what it refuses to fuse and why."""
import copy
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pybn.torch
from pybn.bench import torch_models
from pybn.torch import Fused, fuse_tails

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


class TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock spelling: an in-place `+=` and an in-place ReLU module."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class Spellings(nn.Module):
    """Every spelling of ReLU and add the pass knows, and tails it must leave alone."""

    def __init__(self, c):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm1d(c) for _ in range(9))
        self.bias = nn.Parameter(torch.randn(c))

    def forward(self, x):
        b = self.bns
        h = F.relu(b[0](x), inplace=True)             # relu(bn(x))
        h = torch.relu(b[1](h) + x)                   # relu(bn(x) + r)
        h = torch.add(x, b[2](h)).relu()              # relu(r + bn(x)), torch.add, method relu
        h = b[3](h).add(x)                            # bn(x) + r, no relu
        h = operator.iadd(b[4](h), h)                 # bn(x) + r, no relu (in-place add)
        y = b[5](h)
        h = F.relu(y) + y                             # used twice: left alone
        h = F.relu(b[6](h) + 1.0)                     # a constant addend: left alone
        h = F.relu(b[7](h) + self.bias)               # a parameter that broadcasts: fused, added unfused
        return torch.relu_(b[8](h) + h)               # relu_(bn(x) + r)


def train_steps(model, x, steps=3, seed=0):
    """Outputs, input and parameter gradients and running statistics over SGD steps."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record = []
    for _ in range(steps):
        xs = x.detach().clone().requires_grad_()
        opt.zero_grad(set_to_none=True)
        y = model(xs)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        record.append([y.detach().clone(), xs.grad.clone()] + [p.grad.clone() for p in model.parameters()])
        opt.step()
    record.append([t.clone() for t in model.state_dict().values()])
    return record


def assert_same_training(stock, fused, x, dtype):
    """The fused model trains as the accelerated one (pybn's batch norm, unfused), which trains
    as stock torch (tests/test_torch_steps.py; here, deep and with batches of 4, torch's and
    pybn's roundings drift apart over steps)."""
    _assert_same_steps(pybn.torch.accelerate(copy.deepcopy(stock)), copy.deepcopy(fused), x, TOL[dtype])


def _assert_same_steps(model, fused, x, tol):
    want, got = train_steps(model, x), train_steps(fused, x)
    for step_want, step_got in zip(want, got):
        assert len(step_want) == len(step_got)
        for a, b in zip(step_want, step_got):
            torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_resnet18_trains_as_stock(dtype, channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    stock = torch_models.ResNet18(10).to(dtype=dtype, memory_format=fmt)
    x = torch.randn(4, 3, 32, 32, dtype=dtype).contiguous(memory_format=fmt)
    fused, report = fuse_tails(copy.deepcopy(stock), return_report=True)
    assert isinstance(fused, torch.fx.GraphModule)
    # the stem's and every block's relu(bn(x)), and every block's relu(bn(x) + shortcut)
    assert sorted(f.tail for f in report) == ["relu(bn(x) + r)"] * 8 + ["relu(bn(x))"] * 9
    assert {f.name for f in report} >= {"stem.1", "blocks.0.bn1", "blocks.7.bn2"}
    assert list(fused.state_dict()) == list(stock.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in stock.named_parameters()]
    assert_same_training(stock, fused, x, dtype)
    stock.eval()
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock(x), **TOL[dtype])


def test_torchvision_spelling_in_place_add_and_relu_module():
    torch.manual_seed(1)
    stock = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), TorchvisionBlock(8), TorchvisionBlock(8))
    fused, report = fuse_tails(copy.deepcopy(stock), return_report=True)
    assert report == [Fused("1.bn1", "relu(bn(x))"), Fused("1.bn2", "relu(bn(x) + r)"),
                      Fused("2.bn1", "relu(bn(x))"), Fused("2.bn2", "relu(bn(x) + r)")]
    assert_same_training(stock.double(), fused.double(), torch.randn(3, 3, 9, 9, dtype=torch.float64), torch.float64)


def test_every_spelling_and_the_tails_left_alone():
    torch.manual_seed(2)
    stock = Spellings(5)
    fused, report = fuse_tails(copy.deepcopy(stock), return_report=True)
    assert report == [Fused("bns.0", "relu(bn(x))"), Fused("bns.1", "relu(bn(x) + r)"),
                      Fused("bns.2", "relu(bn(x) + r)"), Fused("bns.3", "bn(x) + r"), Fused("bns.4", "bn(x) + r"),
                      Fused("bns.7", "relu(bn(x) + r)"), Fused("bns.8", "relu(bn(x) + r)")]
    assert_same_training(stock.double(), fused.double(), torch.randn(6, 5, dtype=torch.float64), torch.float64)


def test_fused_model_loads_stock_checkpoints_and_shares_the_parameters():
    torch.manual_seed(3)
    stock = torch_models.ResNet18(10)
    model = copy.deepcopy(stock)
    params = list(model.parameters())
    fused = fuse_tails(model)
    assert all(a is b for a, b in zip(fused.parameters(), params)) and len(list(fused.parameters())) == len(params)
    trained = torch_models.ResNet18(10)
    fused.load_state_dict(trained.state_dict())
    torch.testing.assert_close(dict(fused.state_dict()), dict(trained.state_dict()))
    assert params[0] is next(fused.parameters())  # loaded in place: an optimizer built before still sees them


def test_bn_with_hooks_is_left_alone_and_hooks_still_run():
    stock = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU())
    seen = []
    stock[0].register_forward_hook(lambda m, i, o: seen.append(o.min().item()))
    fused, report = fuse_tails(copy.deepcopy(stock), return_report=True)
    assert report == []
    fused(torch.randn(8, 4) - 5)
    assert len(seen) == 1 and seen[0] < 0  # the hook saw the batch norm's own output


class ReadsTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return F.relu(self.bn(F.dropout(x, 0.5, self.training)))


def test_forward_reading_self_training_is_left_unfused_with_a_warning():
    with pytest.warns(UserWarning, match="depends on self.training"):
        model, report = fuse_tails(ReadsTraining(), return_report=True)
    assert report == [] and type(model) is ReadsTraining
    assert type(model.bn) is pybn.torch.nn.BatchNorm1d  # accelerated all the same


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return F.relu(self.bn(x))
        return self.bn(x)


def test_untraceable_forward_is_left_unfused_with_a_warning():
    with pytest.warns(UserWarning, match="torch.fx cannot trace"):
        model = fuse_tails(Untraceable())
    assert type(model) is Untraceable


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """detectron2's spelling: training updates the running statistics with augmented
    assignments in its own forward."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        self.running_mean += self.momentum * (mean.detach() - self.running_mean)
        self.running_var += self.momentum * (var.detach() - self.running_var)
        invstd = torch.rsqrt(var + self.eps)
        return (x - mean[:, None, None]) * (invstd * self.weight)[:, None, None] + self.bias[:, None, None]


class Counting(nn.Module):
    """A block whose forward counts its calls in a buffer and in a Python attribute."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.sync = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), NaiveSyncBatchNorm(4)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.calls = 0

    def forward(self, x):
        self.steps.add_(1)
        self.calls += 1
        return F.relu(self.bn(self.conv(x))) + self.sync(x[:, :1].expand(-1, 4, -1, -1))


def test_a_forward_that_changes_state_leaves_the_model_as_it_was():
    """fuse_tails traces the user's own model: a forward changing state while traced (a
    counter; a buffer rebound by ``+=`` in training) is refused, and the model comes back
    unchanged. The buffers were left as torch.fx proxies (eval returned a Proxy, state_dict
    failed to pickle) and the counters advanced."""
    torch.manual_seed(2)
    model = Counting()
    stock = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="left unfused: torch.fx cannot trace its forward \\(forward changes"):
        fused = fuse_tails(model)
    assert fused is model and model.calls == 0 and model.training
    for key, value in model.state_dict().items():
        assert type(value) is torch.Tensor and torch.equal(value, before[key]), key
    x = torch.randn(2, 3, 5, 5)
    pybn.torch.revert(model)
    for training in (True, False):
        model.train(training), stock.train(training)
        torch.testing.assert_close(model(x), stock(x))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, stock.state_dict()[key], msg=key)


def test_an_uninitialized_lazy_model_is_left_as_it_is():
    """(Putting back what tracing changed must not read a lazy buffer, which has no values.)"""
    model = nn.Sequential(nn.LazyConv2d(4, 1), nn.LazyBatchNorm2d(), nn.ReLU())
    fused, report = fuse_tails(model, return_report=True)
    assert fused is model and report == [] and nn.parameter.is_lazy(model[1].running_mean)


def test_modes_of_submodules_are_kept():
    stock = torch_models.ResNet18(10)
    stock.train()
    stock.stem[1].eval()  # a frozen batch norm
    fused = fuse_tails(stock)
    assert fused.training and not fused.get_submodule("stem.1").training
    assert fused.get_submodule("blocks.0.bn1").training


def test_compiled_fused_model_matches_eager():
    torch.manual_seed(4)
    stock = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    fused, report = fuse_tails(copy.deepcopy(stock), return_report=True)
    assert report == [Fused("1", "relu(bn(x))")]
    x = torch.randn(16, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(fused, fullgraph=True)
        torch.testing.assert_close(compiled(x), pybn.torch.accelerate(stock)(x), **TOL[torch.float32])


def test_the_fused_kernel_is_what_runs(monkeypatch):
    """Not the unfused fallback of block_tail (which the comparisons above would not notice)."""
    calls = []
    real = pybn.torch.nn.batch_norm_add_relu

    def counting(input, residual, *args, **kwargs):
        calls.append((residual is not None, kwargs.get("relu", args[-1] if args else None)))
        return real(input, residual, *args, **kwargs)

    monkeypatch.setattr(pybn.torch.nn, "batch_norm_add_relu", counting)
    fused = fuse_tails(torch_models.ResNet18(10))
    fused(torch.randn(2, 3, 32, 32))
    assert sorted(calls) == [(False, True)] * 9 + [(True, True)] * 8


class InPlaceIntoResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.lin2, self.bn = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        h = self.lin(x)
        r = h
        r += self.bn(self.lin2(x))  # changes h too: no fused call would
        return h * 2


class ReluWithHook(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.act = nn.BatchNorm1d(4), nn.ReLU()
        self.act.register_forward_hook(lambda m, i, out: out * 0 - 1)

    def forward(self, x):
        return self.act(self.bn(x))


class SharedNorm(nn.Module):
    """One batch norm called twice: fusing the first call after the second would swap the
    order of the running statistics' updates."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return F.relu(self.bn(x) + self.bn(x * 3 + 1))


class OwnForward(pybn.torch.nn.BatchNorm1d):
    def forward(self, x, *args, **kwargs):
        return super().forward(x) * 2


class SubclassUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = OwnForward(4)

    def forward(self, x):
        return F.relu(self.bn(x))


class ResidualChangedInPlace(nn.Module):
    """The residual is changed in place after the batch norm and before the add: a fused call
    where the batch norm was would read it unchanged."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        r = self.lin(x)
        y = self.bn(x)
        r.mul_(2)
        return F.relu(y + r)


class ResidualViewWritten(nn.Module):
    """A view of the residual is written in place after the batch norm, before the add."""

    def __init__(self):
        super().__init__()
        self.lin, self.lin2, self.bn = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        r = self.lin(x)
        view = r[:, :2]
        y = self.bn(self.lin2(x))
        view.mul_(0)
        return F.relu(y + r)


class ResidualsBaseWritten(nn.Module):
    """The residual is a view, and the tensor it views is written after the batch norm."""

    def __init__(self):
        super().__init__()
        self.lin, self.lin2, self.bn = nn.Linear(4, 8), nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        h = self.lin(x)
        r = h[:, :4]
        y = self.bn(self.lin2(x))
        h.mul_(0.5)
        return F.relu(y + r)


class InputViewWrittenBeforeLaterResidual(nn.Module):
    """A view of the batch norm's input is written after it, and the residual is computed
    later still: the batch norm cannot move to the residual's place past that write."""

    def __init__(self):
        super().__init__()
        self.lin, self.lin2, self.bn = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        h = self.lin(x)
        view = h.view(8, 2, 2)[:, 0]
        y = self.bn(h)
        view += 1
        return F.relu(y + self.lin2(x))


@pytest.mark.parametrize("cls, fused_tails", [
    (InPlaceIntoResidual, []), (ReluWithHook, []), (SubclassUser, []), (ResidualChangedInPlace, []),
    (ResidualViewWritten, []), (ResidualsBaseWritten, []),
    (SharedNorm, [Fused("bn", "relu(bn(x) + r)")]),  # the second call (the first cannot move after it)
])
def test_tails_that_must_stay_unfused(cls, fused_tails):
    torch.manual_seed(5)
    stock = cls()
    fused, report = fuse_tails(copy.deepcopy(stock), return_report=True)
    assert report == fused_tails
    assert_same_training(stock.double(), fused.double(), torch.randn(8, 4, dtype=torch.float64), torch.float64)


class InputsBaseWrittenBeforeLaterResidual(InputViewWrittenBeforeLaterResidual):
    """The batch norm's input is a view, and the tensor it views is written after it."""

    def forward(self, x):
        h = torch.cat([self.lin(x), x], 1)
        y = self.bn(h[:, :4])
        h.mul_(0.5)
        return F.relu(y + self.lin2(x))


@pytest.mark.parametrize("cls", [InputViewWrittenBeforeLaterResidual, InputsBaseWrittenBeforeLaterResidual])
def test_input_written_after_the_batch_norm_keeps_it_in_place(cls):
    """(Inference only: in training the write breaks the stock model's backward, as the batch
    norm saved its input.)"""
    torch.manual_seed(6)
    stock = cls().eval()
    fused, report = fuse_tails(copy.deepcopy(stock), return_report=True)
    assert report == []
    x = torch.randn(8, 4)
    with torch.no_grad():
        assert torch.equal(fused(x), stock(x))


class DownsampleAfter(nn.Module):
    """The residual computed after the batch norm (torchvision's downsampling block): the
    fused call goes after it."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.down = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    def forward(self, x):
        return F.relu(self.bn(self.lin(x)) + self.down(x))


def test_residual_computed_after_the_batch_norm():
    torch.manual_seed(6)
    stock = DownsampleAfter()
    fused, report = fuse_tails(copy.deepcopy(stock), return_report=True)
    assert report == [Fused("bn", "relu(bn(x) + r)")]
    assert_same_training(stock.double(), fused.double(), torch.randn(8, 4, dtype=torch.float64), torch.float64)


class WithNonPersistent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU())
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    def forward(self, x):
        return self.inner(x) * self.scale


def test_non_persistent_buffers_and_container_modes_are_kept():
    stock = WithNonPersistent().eval()
    fused, report = fuse_tails(copy.deepcopy(stock), return_report=True)
    assert report == [Fused("inner.1", "relu(bn(x))")]
    assert list(fused.state_dict()) == list(stock.state_dict()) == [k for k in stock.state_dict() if k != "scale"]
    assert not fused.training and not fused.inner.training


def test_fold_after_fuse_tails_folds_as_after_accelerate():
    torch.manual_seed(7)
    stock = torch_models.ResNet18(10).eval()
    x = torch.randn(2, 3, 32, 32)
    _, report_accelerated = pybn.torch.fold(pybn.torch.accelerate(copy.deepcopy(stock)), example_inputs=x,
                                            return_report=True)
    folded, report_fused = pybn.torch.fold(fuse_tails(copy.deepcopy(stock)), example_inputs=x, return_report=True)
    kinds = [[r.kind for r in report if isinstance(r, pybn.torch.Folded)] for report in (report_accelerated,
                                                                                        report_fused)]
    assert kinds[0] == kinds[1] == ["conv+bn"] * 20
    torch.testing.assert_close(folded(x), stock(x), rtol=1e-4, atol=1e-4)


class BlockAndHead(nn.Module):
    """A block tail and a dropout(relu(x)) head: both kinds of fused call."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)) + x)
        return self.drop(torch.relu(self.fc(y.mean((2, 3)))))


def fused_calls(gm):
    return [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (pybn.torch.fuse.block_tail, pybn.torch.fuse.relu_dropout_tail)]


def test_a_pickled_fused_model_stays_fused():
    """torch.fx rebuilds an unpickled GraphModule by tracing its code, and the tails unfused
    themselves under that tracer: torch.save / torch.load (or a spawned process) silently
    lost the fusion."""
    import io

    torch.manual_seed(0)
    fused = fuse_tails(BlockAndHead())
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert fused_calls(loaded) == fused_calls(fused) == ["block_tail", "relu_dropout_tail"]
    x = torch.randn(3, 4, 5, 5)
    _assert_same_steps(copy.deepcopy(fused), loaded, x, TOL[torch.float32])
    # another tracer (pybn.torch.fold's) still sees the tails unfused and folds the conv + bn
    _, report = pybn.torch.fold(loaded, example_inputs=x, return_report=True)
    assert [r.kind for r in report if isinstance(r, pybn.torch.Folded)] == ["dropout", "conv+bn"]


def test_revert_writes_the_fused_tails_back_as_separate_calls():
    """revert() of a fuse_tails model swapped torch's modules in under the fused calls, and
    the first forward raised TypeError (unexpected keyword argument 'relu')."""
    torch.manual_seed(0)
    stock = BlockAndHead()
    reverted, report = pybn.torch.revert(fuse_tails(copy.deepcopy(stock)), return_report=True)
    assert [s.after for s in report] == ["torch.nn.BatchNorm2d", "torch.nn.Dropout"]
    assert fused_calls(reverted) == []
    assert all(type(m).__module__.startswith("torch") for m in reverted.modules())
    x = torch.randn(3, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(reverted.eval()(x), stock.eval()(x), rtol=0, atol=0)
    reverted.train()
    torch.manual_seed(1)
    y = reverted(x)
    torch.manual_seed(1)
    torch.testing.assert_close(y, stock.train()(x), rtol=0, atol=0)


def add_100(module, inputs, output):  # (module level: a pickled model's hook must be importable)
    return output + 100.0


class WithShift(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.register_buffer("shift", torch.full((1, 4, 1, 1), 0.5), persistent=False)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))) + self.shift


def drop_shift(module, state_dict, prefix, local_metadata):  # (a state_dict hook, module level)
    state_dict.pop(prefix + "conv.weight_unused", None)


@pytest.mark.parametrize("how", ["torch.save", "deepcopy", "copy"])
def test_copies_of_a_fused_model_keep_its_state_dict_and_hooks(how):
    """torch.fx rebuilds a GraphModule when it is unpickled or deep-copied, registering every
    buffer as persistent and dropping the root's forward hooks: the copy's state_dict gained
    "shift" (the model's checkpoints no longer loaded) and fuse_tails' copies of the model's
    hooks were gone (outputs changed)."""
    import io

    torch.manual_seed(0)
    model = WithShift().eval()
    model.register_forward_hook(add_100)
    checkpoint = model.state_dict()
    fused = fuse_tails(copy.deepcopy(model))
    fused._register_state_dict_hook(drop_shift)
    fused._ddp_params_and_buffers_to_ignore = ["bn._offset_t"]
    if how == "deepcopy":
        copied = copy.deepcopy(fused)
    elif how == "copy":
        copied = copy.copy(fused)
    else:
        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        copied = torch.load(buf, weights_only=False)
    assert list(copied.state_dict()) == list(checkpoint)
    copied.load_state_dict(checkpoint)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), model(x), rtol=1e-6, atol=1e-6)
    assert fused_calls(copied) == fused_calls(fused) == ["block_tail"] and not copied.training
    assert len(copied._state_dict_hooks) == 1 and copied._ddp_params_and_buffers_to_ignore == ["bn._offset_t"]
    again = copy.deepcopy(copied)  # (a copy of a copy keeps it too)
    assert list(again.state_dict()) == list(checkpoint) and len(again._forward_hooks) == 1


def test_a_reverted_model_quantizes_as_the_stock_one():
    """revert wrote the ReLUs back as torch.relu, which torch.ao's fusion patterns do not
    match: fuse_fx left Conv2d and ReLU apart (prepare_qat_fx lost its ConvBnReLU2d)."""
    from torch.ao.quantization.quantize_fx import fuse_fx

    stock = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    reverted = pybn.torch.revert(fuse_tails(copy.deepcopy(stock)))
    kinds = [[type(m).__name__ for m in fuse_fx(copy.deepcopy(m).eval()).modules()][1:] for m in (stock, reverted)]
    assert kinds[0][0] == "ConvReLU2d" and kinds[1] == kinds[0], kinds
