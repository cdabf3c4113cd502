"""pybn.torch.nn's drop-in modules against torch.nn's, and pybn.torch.accelerate /
convert_sync_batchnorm (single process; tests/test_torch_sync.py runs several)."""
import copy
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pybn
import pybn.torch
import pybn.torch.nn as pnn

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def dropout_scale(p):
    # the scale pybn multiplies kept values by; switch to pybn.dropout_scale once every branch has it
    return pybn.dropout_scale(p) if hasattr(pybn, "dropout_scale") else 1.0 / (1.0 - p)


def keep_of(shape, p, seed, offset):
    n = math.prod(shape)
    return torch.from_numpy(np.unpackbits(pybn.dropout_mask(shape, p, seed=seed, offset=offset), count=n,
                                          bitorder="little").reshape(shape).astype(bool))


# --------------------------------------------------------------------------- batch norm modules

BN_CASES = [(nn.BatchNorm1d, pnn.BatchNorm1d, (8, 5)), (nn.BatchNorm1d, pnn.BatchNorm1d, (8, 5, 7)),
            (nn.BatchNorm2d, pnn.BatchNorm2d, (6, 5, 4, 3)), (nn.BatchNorm3d, pnn.BatchNorm3d, (4, 5, 3, 2, 3))]
SETTINGS = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
            dict(momentum=0.5, eps=1e-3, affine=False, track_running_stats=False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
@pytest.mark.parametrize("stock_cls,pybn_cls,shape", BN_CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_batch_norm_module_equals_torchs(stock_cls, pybn_cls, shape, settings, dtype):
    """Three training steps, then evaluation: outputs, gradients, parameters and buffers."""
    torch.manual_seed(0)
    stock = stock_cls(shape[1], dtype=dtype, **settings)
    ours = pybn_cls(shape[1], dtype=dtype, **settings)
    ours.load_state_dict(stock.state_dict())
    for step in range(4):
        training = step < 3
        for m in (stock, ours):
            m.train(training)
        x = (2 + torch.randn(shape, dtype=dtype) * 3)
        if len(shape) == 4 and step % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for m in (stock, ours):
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.backward(torch.cos(torch.arange(y.numel(), dtype=dtype)).reshape(y.shape))
            outs.append([y, xi.grad] + [p.grad.clone() for p in m.parameters()])
            m.zero_grad()
        for got, want in zip(outs[1], outs[0]):
            torch.testing.assert_close(got, want, **TOL[dtype])
        for (k, got), (_, want) in zip(ours.state_dict().items(), stock.state_dict().items()):
            torch.testing.assert_close(got, want, **TOL[dtype], msg=k)


@pytest.mark.parametrize("stock_cls,pybn_cls", [(nn.BatchNorm2d, pnn.BatchNorm2d), (nn.Dropout, pnn.Dropout),
                                                 (nn.SyncBatchNorm, pnn.SyncBatchNorm)])
def test_constructor_and_state_dict_are_torchs(stock_cls, pybn_cls):
    args = dict(num_features=4, eps=1e-3, momentum=None, affine=True, track_running_stats=True,
                dtype=torch.float64) if stock_cls is not nn.Dropout else dict(p=0.3, inplace=False)
    stock, ours = stock_cls(**args), pybn_cls(**args)
    # (DistributedDataParallel refuses instances of torch's SyncBatchNorm on the CPU)
    assert isinstance(ours, stock_cls) == (stock_cls is not nn.SyncBatchNorm)
    assert list(ours.state_dict()) == list(stock.state_dict())
    assert repr(ours) == repr(stock)
    if stock_cls is nn.Dropout:
        return
    assert "num_batches_tracked" in ours.state_dict()
    stock.running_mean.fill_(0.25)
    ours.load_state_dict(stock.state_dict())
    assert torch.equal(ours.running_mean, stock.running_mean)
    old_checkpoint = {k: v for k, v in stock.state_dict().items() if k != "num_batches_tracked"}
    ours.load_state_dict(old_checkpoint)  # torch's rule for checkpoints from before num_batches_tracked
    assert int(ours.num_batches_tracked) == 0


def test_training_needs_more_than_one_value_per_channel():
    with pytest.raises(ValueError, match=r"^input: training needs more than 1 value per channel"):
        pnn.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="expected 4D input"):  # torch's own check
        pnn.BatchNorm2d(3)(torch.randn(2, 3))
    pnn.BatchNorm1d(3).eval()(torch.randn(1, 3))  # evaluation is fine


@pytest.mark.parametrize("eps, training, accepted", [(0.0, True, False), (-1e-5, False, False), (0.0, False, True),
                                                      (1e-5, True, True)])
def test_eps_follows_torchs_rule(eps, training, accepted):
    """Stock torch refuses eps <= 0 in training (a constant channel's variance is 0) and eps < 0
    in evaluation; the accelerated module took eps=0 in training (0 for a constant channel)."""
    x = torch.ones(4, 3) if training else torch.randn(4, 3)
    results = []
    for module in (nn.BatchNorm1d(3, eps=eps), pnn.BatchNorm1d(3, eps=eps)):
        module.train(training)
        try:
            results.append(module(x))
        except ValueError as e:
            results.append(e)
    stock, ours = results
    if accepted:
        torch.testing.assert_close(ours, stock)
    else:
        assert isinstance(stock, ValueError) and isinstance(ours, ValueError)
        assert str(ours).startswith("eps: must be")


@pytest.mark.parametrize("kind", ["0-d tensor", "numpy"])
def test_hyperparameters_as_torch_takes_them(kind):
    """A 0-d tensor (a momentum schedule's torch.linspace(...)[epoch]) or a NumPy scalar as
    momentum, eps or p: torch takes them, so do the drop-ins (they raised TypeError)."""
    number = (lambda v: torch.tensor(v)) if kind == "0-d tensor" else (lambda v: np.float32(v))
    x = torch.randn(8, 4, 5, 5)
    stock, ours = nn.BatchNorm2d(4), pybn.torch.accelerate(nn.BatchNorm2d(4))
    for m in (stock, ours):
        m.momentum, m.eps = number(0.25), number(1e-3)
    torch.testing.assert_close(ours(x), stock(x))
    torch.testing.assert_close(ours.running_var, stock.running_var)
    for cls in (nn.Dropout, nn.Dropout2d, nn.AlphaDropout, pnn.DropPath):
        torch.manual_seed(3)
        want = pybn.torch.accelerate(cls(0.25))(x) if cls is not pnn.DropPath else pnn.DropPath(0.25)(x)
        torch.manual_seed(3)
        got = pybn.torch.accelerate(cls(number(0.25)))(x) if cls is not pnn.DropPath else pnn.DropPath(number(0.25))(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_hyperparameters_as_tensors_under_torch_compile():
    """A 0-d tensor momentum, eps or p reaches the operators as a number: under torch.compile
    a FakeTensor, which no float argument takes, made the accelerated modules raise (review)."""
    x = torch.randn(8, 4, 5, 5)
    for make in (lambda: nn.BatchNorm2d(4), lambda: nn.Dropout(torch.tensor(0.25)),
                 lambda: nn.AlphaDropout(torch.tensor(0.25)), lambda: pnn.DropPath(torch.tensor(0.25))):
        m = make()
        if isinstance(m, nn.BatchNorm2d):
            m.momentum, m.eps = torch.tensor(0.25), torch.tensor(1e-3)
        m = pybn.torch.accelerate(m) if not isinstance(m, pnn.DropPath) else m
        torch._dynamo.reset()
        assert torch.compile(m)(x).shape == x.shape


def test_float_hyperparameters_of_the_noises_compile_without_graph_breaks():
    """Under dynamic shapes a float p is a symbolic float, which math.isfinite breaks the
    graph on (review): the functions compare it instead."""
    from pybn.torch.nn import alpha_dropout, gaussian_dropout, gaussian_noise

    torch._dynamo.reset()
    for f in (lambda t, v: alpha_dropout(t, v, True), lambda t, v: gaussian_dropout(t, v),
              lambda t, v: gaussian_noise(t, v)):
        compiled = torch.compile(f, fullgraph=True, dynamic=True)
        for n in (6, 7):
            assert compiled(torch.randn(n, 4), 0.2).shape == (n, 4)


def test_hyperparameters_torch_refuses_or_that_are_not_finite_name_themselves():
    x = torch.randn(8, 4)
    bn = pybn.torch.accelerate(nn.BatchNorm1d(4))
    bn.momentum = torch.tensor(0.1, requires_grad=True)  # (torch: "must be float, not Tensor")
    with pytest.raises(TypeError, match="^momentum: a torch tensor that requires grad"):
        bn(x)
    bn.momentum = float("nan")
    with pytest.raises(ValueError, match="^momentum: must be finite"):
        bn(x)
    for cls in (nn.Dropout, nn.AlphaDropout):
        with pytest.raises(ValueError, match="^p: must be (finite|in \\[0, 1\\])"):
            pybn.torch.accelerate(cls(float("nan")))(x)  # (torch's constructor takes a NaN)


@pytest.mark.parametrize("settings", [{}, {"affine": False}, {"track_running_stats": False}])
@pytest.mark.parametrize("training", [True, False])
def test_a_wrong_channel_count_names_the_input(settings, training):
    bn = pybn.torch.accelerate(nn.BatchNorm2d(4, **settings)).train(training)
    with pytest.raises(ValueError, match=r"^input: has 3 channels \(dim 1\) but the module was built with "
                                         r"num_features=4"):
        bn(torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("training", [True, False])
def test_without_weight_or_statistics_any_channel_count_is_torchs(training):
    # (no per-channel tensor to disagree with: torch normalizes the batch's own channels)
    stock = nn.BatchNorm2d(4, affine=False, track_running_stats=False).train(training)
    ours = pybn.torch.accelerate(nn.BatchNorm2d(4, affine=False, track_running_stats=False)).train(training)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(ours(x), stock(x))


def _torch_flag_calls():
    """(id, call taking one flag value, the flag's name) for the flags of pybn.torch's
    functions (its modules' constructors are torch's own and take what torch takes)."""
    x, stats = torch.randn(4, 3, 6, 6), lambda: (torch.zeros(3), torch.ones(3))
    model = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()  # noqa: E731
    P = pnn
    return [
        ("batch_norm training", lambda v: P.batch_norm(x, *stats(), training=v), "training"),
        ("batch_norm_add_relu training", lambda v: P.batch_norm_add_relu(x, None, *stats(), training=v), "training"),
        ("dropout training", lambda v: P.dropout(x, 0.5, training=v), "training"),
        ("dropout inplace", lambda v: P.dropout(x.clone(), 0.5, inplace=v), "inplace"),
        ("alpha_dropout training", lambda v: P.alpha_dropout(x, 0.5, training=v), "training"),
        ("alpha_dropout inplace", lambda v: P.alpha_dropout(x.clone(), 0.5, True, inplace=v), "inplace"),
        ("gaussian_dropout training", lambda v: P.gaussian_dropout(x, 0.5, training=v), "training"),
        ("gaussian_noise training", lambda v: P.gaussian_noise(x, 0.5, training=v), "training"),
        ("stochastic_depth training", lambda v: P.stochastic_depth(x, 0.5, "row", training=v), "training"),
        ("accelerate return_report", lambda v: pybn.torch.accelerate(model(), return_report=v), "return_report"),
        ("revert return_report", lambda v: pybn.torch.revert(model(), return_report=v), "return_report"),
        ("convert_sync_batchnorm return_report",
         lambda v: pybn.torch.convert_sync_batchnorm(model(), return_report=v), "return_report"),
        ("fuse_tails return_report", lambda v: pybn.torch.fuse_tails(model(), return_report=v), "return_report"),
        ("fold return_report", lambda v: pybn.torch.fold(model(), return_report=v), "return_report"),
        ("fold merge_branches", lambda v: pybn.torch.fold(model(), merge_branches=v), "merge_branches"),
    ]


@pytest.mark.parametrize("value", [None, "False", 0], ids=repr)
@pytest.mark.parametrize("case", _torch_flag_calls(), ids=lambda c: c[0])
def test_flags_must_be_bools(case, value):
    """A merely truthy value is refused (torch's functions refuse it too): "False" would
    train, return a report or write in place."""
    _, call, name = case
    with pytest.raises(TypeError, match=f"^{name}: must be a bool"):
        call(value)
    call(np.True_)
    call(False)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
@pytest.mark.parametrize("mode", ["train", "eval", "eval, batch statistics", "train, fused tail"])
def test_an_empty_batch_is_torchs(shape, mode):
    """An empty input (a detection head with no boxes, an empty last shard): torch's empty
    output, running statistics left alone, num_batches_tracked counted, zero gradients."""
    track = mode != "eval, batch statistics"
    stock, ours = nn.BatchNorm2d(3, track_running_stats=track), pnn.BatchNorm2d(3, track_running_stats=track)
    for m in (stock, ours):
        if track:
            m.running_mean.fill_(0.25)
        m.train(mode.startswith("train"))
    results = []
    for m in (stock, ours):
        x = torch.randn(shape, requires_grad=True)
        if mode == "train, fused tail":
            r = torch.randn(shape, requires_grad=True)
            y = m(x, r, relu=True) if m is ours else torch.relu(m(x) + r)
        else:
            y = m(x)
        y.sum().backward()
        results.append((y.detach(), x.grad, m.weight.grad, m.bias.grad, m.state_dict()))
    (y0, dx0, dw0, db0, state0), (y1, dx1, dw1, db1, state1) = results
    assert y1.shape == y0.shape == shape and dx1.shape == dx0.shape == shape
    assert torch.equal(dw1, dw0) and torch.equal(db1, db0) and not dw1.any()
    assert list(state1) == list(state0) and all(torch.equal(state1[k], state0[k]) for k in state0)
    if track:
        assert (ours.running_mean == 0.25).all() and int(ours.num_batches_tracked) == mode.startswith("train")


def test_an_empty_batch_under_torch_compile_is_torchs():
    """A compiled training step on an empty batch (a dynamic batch size, as between epochs):
    the same answer as eager mode, the size checked without failing the compilation."""
    ours = pnn.BatchNorm2d(3)
    compiled = torch.compile(ours, backend="aot_eager", dynamic=True, fullgraph=True)
    for n in (4, 0, 5):
        x = torch.randn(n, 3, 2, 2)
        before = ours.running_mean.clone()
        y = compiled(x)
        assert y.shape == x.shape
        assert torch.equal(ours.running_mean, before) == (n == 0)
    assert int(ours.num_batches_tracked) == 3


def test_sync_batch_norm_without_a_process_group_is_local_batch_norm():
    torch.manual_seed(1)
    stock, ours = nn.BatchNorm2d(3), pnn.SyncBatchNorm(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(ours(x), stock(x))
    torch.testing.assert_close(ours.running_var, stock.running_var)


# --------------------------------------------------------------------------- dropout modules

def test_dropout_module_masks_and_scale():
    drop = pnn.Dropout(0.3)
    x = torch.randn(40, 50) + 3
    torch.manual_seed(7)
    y = drop(x)
    torch.manual_seed(7)
    seed = int(torch.randint(2**63 - 1, ()))
    assert torch.equal(y, torch.where(keep_of(x.shape, 0.3, seed, 0), x * x.new_tensor(dropout_scale(0.3)), 0.0))
    assert drop.eval()(x) is x
    assert drop.seed is None and drop.offset is None


def test_pinned_seed_advances_the_offset_per_call_and_can_be_rewound():
    drop = pnn.Dropout(0.5, seed=2**64 - 1)
    x = torch.randn(3, 100)
    assert drop.seed == 2**64 - 1 and drop.offset == 0
    first = drop(x)
    assert drop.offset == pybn.counters_used(300) == 48
    second = drop(x)
    assert drop.offset == 96
    assert torch.equal(first, torch.where(keep_of(x.shape, 0.5, 2**64 - 1, 0), x * 2, 0.0))
    assert torch.equal(second, torch.where(keep_of(x.shape, 0.5, 2**64 - 1, 48), x * 2, 0.0))
    drop.offset = 0  # MC dropout: the same masks for every batch
    assert torch.equal(drop(x), first)
    torch.manual_seed(0)  # the generator plays no part
    assert torch.equal(drop(x), second)
    assert "seed=18446744073709551615" in repr(drop)


def test_pinned_seed_errors_name_the_argument():
    with pytest.raises(ValueError, match="^seed:"):
        pnn.Dropout(0.5, seed=-1)
    with pytest.raises(TypeError, match="^seed:"):
        pnn.Dropout(0.5, seed=1.5)
    with pytest.raises(ValueError, match="^offset:"):
        pnn.Dropout(0.5).offset = 3
    with pytest.raises(ValueError, match="^offset:"):
        pnn.Dropout(0.5, seed=1).offset = 2**64
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):  # torch's check
        pnn.Dropout(1.5)


@pytest.mark.parametrize("cls,shape", [(pnn.Dropout1d, (4, 6, 9)), (pnn.Dropout1d, (6, 9)),
                                       (pnn.Dropout2d, (4, 6, 3, 5)), (pnn.Dropout3d, (2, 6, 3, 2, 4)),
                                       (pnn.Dropout3d, (6, 3, 2, 4))])
def test_channel_dropout_drops_whole_channels_with_pybns_mask(cls, shape):
    drop = cls(0.5, seed=11)
    x = torch.rand(shape) + 1
    y = drop(x)
    channels = shape[:2] if len(shape) == cls._spatial + 2 else shape[:1]
    keep = keep_of(channels, 0.5, 11, 0).reshape(channels + (1,) * (len(shape) - len(channels)))
    assert torch.equal(y, torch.where(keep, x * 2, 0.0))
    assert drop.offset == pybn.counters_used(math.prod(channels))
    if len(shape) == 4:  # channels_last gives the same result
        drop.offset = 0
        assert torch.equal(drop(x.contiguous(memory_format=torch.channels_last)), y)


def test_ranks_torch_warns_about_go_to_torchs_function():
    drop = pnn.Dropout2d(0.5)
    with pytest.warns(UserWarning, match="dropout2d"):
        y = drop(torch.ones(4, 6, 9))
    assert set(y.unique().tolist()) <= {0.0, 2.0}


def test_inplace_dropout_writes_into_its_input():
    x = torch.ones(10, 20)
    y = pnn.Dropout(0.5, inplace=True, seed=3)(x)
    assert y is x and torch.equal(x, torch.where(keep_of((10, 20), 0.5, 3, 0), 2.0, 0.0))


@pytest.mark.parametrize("cls, dims", [(pnn.Dropout, 4), (pnn.Dropout1d, 3), (pnn.Dropout2d, 4), (pnn.Dropout3d, 5)])
def test_p_zero_is_torchs_identity(cls, dims):
    """p = 0 in training returns the input itself, as torch's modules do: nothing computed,
    no seed drawn from torch's generator (so the next random numbers are stock torch's), a
    pinned offset not advanced, and inplace=True on a leaf that requires grad allowed."""
    x = torch.randn((2, 3, 4, 5, 5)[:dims]).requires_grad_()
    state = torch.get_rng_state()
    stock = getattr(nn, cls.__name__)(0.0, inplace=True)
    assert stock(x) is x
    for layer in (cls(0.0), cls(0.0, inplace=True), cls(0.0, seed=4)):
        assert layer(x) is x
    pinned = pnn.Dropout(0.0, seed=4)
    assert pinned(x) is x and pinned.offset == 0
    assert torch.equal(pnn.Dropout(0.0)(x, relu=True), torch.relu(x))
    assert torch.equal(torch.get_rng_state(), state)
    assert pnn.dropout(x, 0.0) is x
    if cls in (pnn.Dropout1d, pnn.Dropout3d):  # unbatched: torch's view, and its error in place on a leaf
        sample = x[0].detach().requires_grad_()
        y = cls(0.0)(sample)
        assert y is not sample and y._base is sample and torch.equal(y, sample)
        with pytest.raises(RuntimeError, match="leaf Variable"):
            cls(0.0, inplace=True)(sample)
        assert torch.equal(torch.get_rng_state(), state)


def test_dropout_on_another_device_is_torchs():
    """A tensor that is not on the CPU goes to torch's F.dropout (here the meta device)."""
    y = pnn.Dropout(0.5)(torch.empty(4, 5, device="meta"))
    assert y.device.type == "meta" and y.shape == (4, 5)


# --------------------------------------------------------------------------- accelerate

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout2d(0.2)
        self.seq = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8), nn.Dropout(0.1))
        self.shared = nn.Dropout(0.3)

    def forward(self, x):
        h = self.seq(self.drop(self.bn(self.conv(x))))
        return self.shared(self.shared(h))


class CustomBatchNorm(nn.BatchNorm1d):
    def forward(self, x):
        return super().forward(x) * 2


def test_accelerate_swaps_in_place_and_reports(caplog):
    model = Block()
    model.custom = CustomBatchNorm(8)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    model.bn.register_forward_hook(lambda *args: calls.append("hook"))
    with caplog.at_level(logging.INFO, logger="pybn.torch"):
        out, report = pybn.torch.accelerate(model, return_report=True)
    assert out is model
    assert [(s.name, s.before, s.after) for s in report] == [
        ("bn", "torch.nn.BatchNorm2d", "pybn.torch.nn.BatchNorm2d"),
        ("drop", "torch.nn.Dropout2d", "pybn.torch.nn.Dropout2d"),
        ("seq.2", "torch.nn.BatchNorm1d", "pybn.torch.nn.BatchNorm1d"),
        ("seq.3", "torch.nn.Dropout", "pybn.torch.nn.Dropout"),
        ("shared", "torch.nn.Dropout", "pybn.torch.nn.Dropout")]
    assert len(caplog.records) == 5 and "bn: torch.nn.BatchNorm2d -> pybn.torch.nn.BatchNorm2d" in caplog.text
    assert type(model.custom) is CustomBatchNorm  # a subclass with its own forward is left alone
    assert list(model.parameters()) == params  # the same tensors: the optimizer still updates them
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    before = model.bn.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.bn.weight, before)
    assert calls == ["hook"]



def test_revert_gives_back_torchs_classes_for_quantization():
    """torch.ao.quantization's tools match torch's exact classes: fuse_modules raised a bare
    AssertionError ("did not find fuser method for ... pybn.torch.nn.BatchNorm2d"), eager
    quantization left the batch norm a float module that crashed the converted model. revert
    swaps torch's classes back in place, a pinned seed and its offset buffer with them."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3), nn.AlphaDropout(0.2))
    model[1].running_var.uniform_(0.5, 2)
    stock_state = {k: v.clone() for k, v in model.state_dict().items()}
    pybn.torch.accelerate(model)
    model[3].seed = 5
    model.append(pnn.DropPath(0.1))  # no torch counterpart: left
    out, report = pybn.torch.revert(model, return_report=True)
    assert out is model
    assert [(s.name, s.before, s.after) for s in report] == [
        ("1", "pybn.torch.nn.BatchNorm2d", "torch.nn.BatchNorm2d"),
        ("3", "pybn.torch.nn.Dropout", "torch.nn.Dropout"),
        ("4", "pybn.torch.nn.AlphaDropout", "torch.nn.AlphaDropout")]
    assert [type(m) for m in model[:5]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout, nn.AlphaDropout]
    assert not hasattr(model[3], "_seed") and "_offset_t" not in model[3]._buffers
    assert type(model[5]) is pnn.DropPath
    assert {k: v for k, v in model.state_dict().items()}.keys() == stock_state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, stock_state[k]), k
    del model[5]
    model.eval()
    fused = torch.ao.quantization.fuse_modules(copy.deepcopy(model), [["0", "1", "2"]])
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


class _Softplus(nn.Module):
    def forward(self, w):
        return nn.functional.softplus(w)


def test_parametrized_modules_are_swapped_with_their_parametrization():
    """A batch norm with a parametrized weight (torch.nn.utils.parametrize makes its class a
    subclass of BatchNorm2d that only adds the property) is accelerated, converted to
    SyncBatchNorm and reverted like the others, and keeps its parametrization: revert used
    to leave it a pybn class without reporting it, and accelerate to skip it."""
    torch.manual_seed(3)
    stock = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    nn.utils.parametrize.register_parametrization(stock[1], "weight", _Softplus())
    model = copy.deepcopy(stock)
    _, report = pybn.torch.accelerate(model, return_report=True)
    assert [(s.name, s.after) for s in report] == [("1", "pybn.torch.nn.BatchNorm2d")]
    assert isinstance(model[1], pnn.BatchNorm2d) and nn.utils.parametrize.is_parametrized(model[1], "weight")
    x = torch.randn(4, 3, 8, 8)
    for train in (True, False):
        stock.train(train), model.train(train)
        torch.testing.assert_close(model(x), stock(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[1].running_var, stock[1].running_var)
    grads = torch.autograd.grad(model(x).square().sum(), model[1].parametrizations.weight.original)
    ref = torch.autograd.grad(stock(x).square().sum(), stock[1].parametrizations.weight.original)
    torch.testing.assert_close(grads, ref, rtol=1e-5, atol=1e-5)
    synced = pybn.torch.convert_sync_batchnorm(copy.deepcopy(stock))
    assert isinstance(synced[1], pnn.SyncBatchNorm) and nn.utils.parametrize.is_parametrized(synced[1], "weight")
    _, report = pybn.torch.revert(model, return_report=True)
    assert [(s.name, s.after) for s in report] == [("1", "torch.nn.BatchNorm2d")]
    assert not isinstance(model[1], pnn.BatchNorm2d) and isinstance(model[1], nn.BatchNorm2d)
    nn.utils.parametrize.remove_parametrizations(model[1], "weight")
    assert type(model[1]) is nn.BatchNorm2d


class _FunctionalThenModule(nn.Module):
    """F.batch_norm over a batch norm module's own tensors, then the module itself: both
    update the running statistics in training."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        h, b = self.conv(x), self.bn
        return F.batch_norm(h, b.running_mean, b.running_var, b.weight, b.bias, self.training, 0.1, b.eps) + b(h)


def test_running_statistics_keep_their_version_as_with_torch():
    """torch's batch norm saved the running statistics for its backward and pybn's module then
    advanced their version counters, so the accelerated model's backward raised "modified by
    an inplace operation" where the stock one trains."""
    torch.manual_seed(5)
    stock = _FunctionalThenModule()
    model = pybn.torch.accelerate(copy.deepcopy(stock))
    x = torch.randn(4, 3, 5, 5)
    for m in (stock, model):
        m(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(model.bn.running_var, stock.bn.running_var)


def test_accelerate_keeps_the_modules_and_their_hook_handles():
    """The swapped modules are the same objects: handles taken before still remove their
    hooks, a load-state-dict hook bound to the module still runs, references see the change."""
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Dropout(0.1))
    bn, drop = model[1], model[2]
    calls = []
    handles = [bn.register_forward_hook(lambda *a: calls.append("forward")),
               drop.register_forward_pre_hook(lambda *a: calls.append("pre")),
               bn.register_full_backward_hook(lambda *a: calls.append("backward")),
               bn.register_state_dict_post_hook(lambda *a: calls.append("state_dict"))]
    loads = []
    bn.register_load_state_dict_pre_hook(lambda module, *a: loads.append(module))
    pybn.torch.accelerate(model)
    assert model[1] is bn and model[2] is drop and type(bn) is pnn.BatchNorm1d and type(drop) is pnn.Dropout
    model(torch.randn(8, 4, requires_grad=True)).sum().backward()
    state = model.state_dict()
    assert calls == ["forward", "pre", "backward", "state_dict"]
    model.load_state_dict(state)
    assert loads == [bn]
    for handle in handles:
        handle.remove()
    calls.clear()
    model(torch.randn(8, 4, requires_grad=True)).sum().backward()
    model.state_dict()
    assert calls == []


class EveryModule(nn.Module):
    """Each of pybn.torch's module classes once (seeded where random, so two calls agree)."""

    def __init__(self):
        super().__init__()
        self.bn1, self.bn2, self.bn3 = pnn.BatchNorm1d(4), pnn.BatchNorm2d(4), pnn.BatchNorm3d(4)
        self.sync = pnn.SyncBatchNorm(4)
        self.random = nn.ModuleList([pnn.Dropout(0.3, seed=1), pnn.Dropout1d(0.3, seed=2), pnn.Dropout2d(0.3, seed=3),
                                     pnn.AlphaDropout(0.3, seed=4), pnn.GaussianDropout(0.3, seed=5),
                                     pnn.GaussianNoise(0.3, seed=6), pnn.DropPath(0.3, seed=7),
                                     pnn.StochasticDepth(0.3, "batch", seed=8), pnn.DropBlock2d(0.3, 3, seed=9)])
        self.d3 = pnn.Dropout3d(0.3, seed=10)

    def forward(self, x):
        x = self.sync(self.bn2(x, torch.relu(x), relu=True))
        x = self.bn1(x.flatten(2)).unflatten(2, (6, 6))
        x = self.d3(self.bn3(x.unsqueeze(2))).squeeze(2)
        x = self.random[1](x.flatten(2)).unflatten(2, (6, 6))
        for i, module in enumerate(self.random):
            if i != 1:
                x = module(x)
        return x


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace_keeps_each_module_whole(training):
    """torch.fx keeps torch.nn's modules as call_module nodes (and traces through anything
    else): pybn's modules stay such nodes too, so the GraphModule runs them as the model
    does, in whichever mode they are in when it is called."""
    torch.manual_seed(0)
    model = EveryModule().train(training)
    twin = copy.deepcopy(model)
    graph_module = torch.fx.symbolic_trace(model)
    called = {n.target for n in graph_module.graph.nodes if n.op == "call_module"}
    assert called == {name for name, m in model.named_modules() if m is not model and name != "random"}
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(graph_module(x), twin(x), rtol=0, atol=0)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):  # running statistics too
        assert torch.equal(a, b)
    graph_module.train(not training)  # the mode is read at run time, not frozen at tracing
    twin.train(not training)
    torch.testing.assert_close(graph_module(x), twin(x), rtol=0, atol=0)


class _ScaledBatchNorm(pnn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2.0


class _ScaledStockBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_fx_symbolic_trace_of_a_subclass_with_its_own_forward_fails_as_torchs():
    """A subclass whose forward calls super().forward and does more: its call was recorded
    from inside that forward, so the graph ran the scaling twice (off by the output itself).
    Now tracing fails as it does for the same subclass of torch's class."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _ScaledBatchNorm(4)).eval()
    stock = nn.Sequential(nn.Conv2d(3, 4, 3), _ScaledStockBatchNorm(4))
    for m in (stock.eval(), model):
        with pytest.raises(torch.fx.proxy.TraceError, match="control flow"):
            torch.fx.symbolic_trace(m)


@pytest.mark.filterwarnings("ignore:The TorchScript type system doesn't support:UserWarning")  # (fx's GraphModule)
def test_jit_script_says_what_to_script_instead():
    """TorchScript cannot run pybn's kernels: scripting a pybn module is a TypeError naming it
    and the ways that work, and leaves the model as it was; the folded model scripts."""
    torch.manual_seed(8)
    stock = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout2d(0.2), nn.Flatten(), nn.Linear(64, 6),
                          nn.BatchNorm1d(6), nn.AlphaDropout(0.1), nn.Dropout(0.3))
    stock(torch.randn(8, 3, 4, 4))  # running statistics away from their start
    accelerated = pybn.torch.accelerate(copy.deepcopy(stock)).eval()
    for model in (accelerated, nn.Sequential(pnn.GaussianDropout(0.2)), nn.Sequential(pnn.DropPath(0.1)),
                  nn.Sequential(pnn.DropBlock2d(0.1, 3))):
        classes = [type(m) for m in model.modules()]
        with pytest.raises(TypeError, match=r"^\w+: torch.jit.script cannot compile pybn.torch's modules .* "
                                            r"pybn.torch.fold"):
            torch.jit.script(model)
        assert [type(m) for m in model.modules()] == classes
    x = torch.randn(5, 3, 4, 4)
    scripted = torch.jit.script(pybn.torch.fold(accelerated, example_inputs=x))
    torch.testing.assert_close(scripted(x), stock.eval()(x))


def test_accelerated_model_loads_and_saves_the_stock_checkpoints(tmp_path):
    torch.manual_seed(3)
    stock = Block()
    stock(torch.randn(4, 3, 6, 6))  # running statistics away from their start
    path = tmp_path / "stock.pt"
    torch.save(stock.state_dict(), path)
    accelerated = pybn.torch.accelerate(Block())
    accelerated.load_state_dict(torch.load(path))
    assert list(accelerated.state_dict()) == list(stock.state_dict())
    for (k, a), (_, s) in zip(accelerated.state_dict().items(), stock.state_dict().items()):
        assert torch.equal(a, s), k
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(accelerated.eval()(x), stock.eval()(x))
    fresh = Block()
    fresh.load_state_dict(accelerated.state_dict())  # and back
    torch.testing.assert_close(fresh.eval()(x), stock(x))


def test_accelerate_a_single_layer_and_a_non_module():
    bn = nn.BatchNorm1d(3)
    new = pybn.torch.accelerate(bn)
    assert type(new) is pnn.BatchNorm1d and new.weight is bn.weight and new.running_mean is bn.running_mean
    with pytest.raises(TypeError, match="^model:"):
        pybn.torch.accelerate(lambda x: x)


def test_convert_sync_batchnorm_keeps_the_state_and_the_group():
    model = Block()
    group = object()  # any process group object is only stored
    out, report = pybn.torch.convert_sync_batchnorm(model, group, return_report=True)
    assert [s.name for s in report] == ["bn", "seq.2"]
    assert type(model.bn) is pnn.SyncBatchNorm and model.bn.process_group is group
    assert type(model.drop) is nn.Dropout2d
    converted = pnn.SyncBatchNorm.convert_sync_batchnorm(pybn.torch.accelerate(nn.Sequential(nn.BatchNorm3d(2))))
    assert type(converted[0]) is pnn.SyncBatchNorm and converted[0].process_group is None
    stock_sync = nn.SyncBatchNorm(5, process_group=group)
    assert pybn.torch.convert_sync_batchnorm(stock_sync).process_group is group


def test_fold_folds_an_accelerated_model_as_the_stock_one():
    """pybn.torch.fold treats the drop-ins as the torch classes they replace."""
    torch.manual_seed(4)
    stock = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 2))
    stock(torch.randn(16, 4))  # running statistics away from their start
    accelerated = pybn.torch.accelerate(copy.deepcopy(stock))
    example = torch.randn(3, 4)  # a BatchNorm1d folds into the Linear only where its input is seen to be 2-D
    folded_stock, stock_report = pybn.torch.fold(stock, example_inputs=example, return_report=True)
    folded, report = pybn.torch.fold(accelerated, example_inputs=example, return_report=True)
    assert report == stock_report and [f.kind for f in report] == ["dropout", "linear+bn"]
    x = torch.randn(5, 4)
    torch.testing.assert_close(folded(x), folded_stock(x))
    torch.testing.assert_close(folded(x), stock.eval()(x))


def test_import_pybn_does_not_import_torch():
    code = "import sys, pybn; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_deepcopy_keeps_a_pinned_stream():
    drop = pnn.Dropout(0.5, seed=5)
    drop(torch.ones(300))
    twin = copy.deepcopy(drop)
    x = torch.randn(300)
    assert twin.offset == drop.offset and torch.equal(twin(x), drop(x))
