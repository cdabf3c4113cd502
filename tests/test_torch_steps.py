"""Step for step: the tutorials' models trained in stock torch and with pybn.torch.accelerate.

Three models: the PyTorch tutorial's Net (Linear(10, 5) -> Dropout(0.2)), the CNN with
BatchNorm2d and Dropout(0.5) and the Keras "Red Wine" MLP written in torch (three times
Linear -> ReLU -> Dropout(0.3) -> BatchNorm1d, then Linear). Each is trained 50 SGD steps
twice from the same weights: stock torch, with every Dropout replaced by a multiplication
by pybn's mask (the seed drawn from torch's generator as pybn.torch documents it), and the
same model after ``pybn.torch.accelerate``. Losses, every parameter and the running
statistics agree at every step, within 1e-12 relative in float64 (two runs of 50 steps)
and 1e-5 in float32, where each accelerated step starts from the stock run's state.

Why float32 steps start from the stock state: pybn's batch norm and torch's differ by an
ulp or so per element (pybn computes ``(x - mean) * alpha + beta``, torch
``x * alpha + (beta - mean * alpha)``), and once a ReLU's pre-activation lies within that
difference of 0 the two runs take different branches and separate (measured on the Red
Wine MLP, batch 32: step 17, one of 98304 pre-activations at 3.6e-7 with a 3.8e-6
difference, after which the first batch norm's bias differs by 3.5e-4 relative, 3e-2 by
step 45; stock torch on 1 and 2 threads, whose batch norms differ by less, stayed within
5e-6 of each other). In float64 the differences are 1e-15 and no branch flips in 50 steps.

A ``torch.compile``d accelerated model trains as the eager one.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pybn
import pybn.torch
from tutorial_models import CNNWithBNDropout, Net, red_wine

STEPS = 50
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # max |accelerated - stock| / max |stock|, per tensor


def dropout_scale(p):
    # the scale pybn multiplies kept values by; switch to pybn.dropout_scale once every branch has it
    return pybn.dropout_scale(p) if hasattr(pybn, "dropout_scale") else 1.0 / (1.0 - p)


class StockMaskDropout(nn.Module):
    """Stock torch arithmetic with pybn's mask: x * keep * scale. The seed is drawn from
    torch's default CPU generator at each training call, as pybn.torch.nn.Dropout documents
    (one torch.randint(2**63 - 1, ()), offset 0)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        seed = int(torch.randint(2**63 - 1, ()))
        n = x.numel()
        keep = np.unpackbits(pybn.dropout_mask(x.shape, self.p, seed=seed, offset=0), count=n, bitorder="little")
        scale = x.new_tensor(dropout_scale(self.p))  # rounded once to x's dtype, as pybn does
        return x * (torch.from_numpy(keep.reshape(x.shape)).to(x.dtype) * scale)


def stock_with_pybn_masks(model):
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, StockMaskDropout(child.p))
    return model


def red_wine_data(rng, steps, batch):
    """Unstandardized inputs (the wine features' means, spreads of 0.5 to 3) and a target.
    (With the real spreads the two sulfur dioxide columns dominate the batch's variation,
    the first layer's outputs are nearly one signal, and some gradients are then pure
    rounding noise, which no two implementations share.)"""
    means = np.array([8.3, 0.53, 0.27, 2.5, 0.087, 15.9, 46.5, 0.997, 3.31, 0.66, 10.4])
    spreads = rng.uniform(0.5, 3.0, 11)
    x = means + spreads * rng.normal(size=(steps, batch, 11))
    y = ((x - means) / spreads) @ rng.normal(size=(11, 1)) + 5.6
    return x, y


def cnn_data(rng, steps, batch):
    return rng.normal(size=(steps, batch, 1, 28, 28)), rng.integers(0, 10, size=(steps, batch))


def net_data(rng, steps, batch):
    x = rng.normal(size=(steps, batch, 10))
    return x, x[..., :5] * 0.5 - 0.1


CASES = {
    # name: (model, data, loss, batch, learning rate)
    "net": (Net, net_data, F.mse_loss, 16, 0.1),
    "cnn": (CNNWithBNDropout, cnn_data, F.cross_entropy, 6, 0.05),
    "red_wine": (red_wine, red_wine_data, F.l1_loss, 16, 0.001),  # the tutorial's loss, MAE
}


class Run:
    """One model's training: SGD, and the state after each step."""

    def __init__(self, model, loss_fn, lr):
        self.model, self.loss_fn = model, loss_fn
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step(self, x, y, step):
        torch.manual_seed(1000 + step)  # the masks of this step, the same for every run
        self.opt.zero_grad()
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach(), **self.model.state_dict()}


def train_together(runs, data, dtype, steps=STEPS, tol=0.0, restart=False):
    """The runs side by side, the first one the reference; after every step each other run's
    loss and state must agree with it within `tol`. `restart`: each other run starts every
    step from the reference's state before that step. Returns the reference's losses."""
    xs, ys = data
    losses = []
    for step in range(steps):
        x = torch.from_numpy(xs[step]).to(dtype)
        y = torch.from_numpy(ys[step])
        y = y.to(dtype) if y.is_floating_point() else y
        before = {k: v.clone() for k, v in runs[0].model.state_dict().items()} if restart else None
        want = runs[0].step(x, y, step)
        for run in runs[1:]:
            if restart:
                run.model.load_state_dict(before)
            assert_same_state(run.step(x, y, step), want, tol, step)
        losses.append(want["loss"].item())
    return losses


def relative(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300)


def assert_same_state(got, want, tol, step):
    assert got.keys() == want.keys()
    for key in want:
        if want[key].is_floating_point():
            err = relative(got[key], want[key])
            assert err <= tol, f"step {step}: {key} differs by {err:.3g} relative (tolerance {tol:g})"
        else:
            assert torch.equal(got[key], want[key]), f"step {step}: {key}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_accelerated_training_equals_stock_at_every_step(case, dtype):
    make, data_fn, loss_fn, batch, lr = CASES[case]
    torch.manual_seed(0)
    model = make().to(dtype)
    data = data_fn(np.random.default_rng(17), STEPS, batch)
    accelerated, report = pybn.torch.accelerate(copy.deepcopy(model), return_report=True)
    assert {s.before for s in report} <= {"torch.nn.Dropout", "torch.nn.BatchNorm1d", "torch.nn.BatchNorm2d"}
    assert sum(s.before == "torch.nn.Dropout" for s in report) == sum(isinstance(m, nn.Dropout)
                                                                      for m in model.modules())
    runs = [Run(stock_with_pybn_masks(model), loss_fn, lr), Run(accelerated, loss_fn, lr)]
    losses = train_together(runs, data, dtype, tol=TOL[dtype], restart=dtype == torch.float32)
    # it trained: the loss went down, and pybn's modules ran
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert all(type(m).__module__ == "pybn.torch.nn" for m in accelerated.modules()
               if isinstance(m, (nn.Dropout, nn.BatchNorm1d, nn.BatchNorm2d)))


def test_masks_differ_between_steps_and_follow_torch_manual_seed():
    """The control for the test above: the masks really come from torch's generator."""
    model = pybn.torch.accelerate(Net())
    x = torch.randn(64, 10)
    torch.manual_seed(3)
    a, b = model(x), model(x)
    torch.manual_seed(3)
    assert torch.equal(model(x), a)
    assert not torch.equal(a, b)
    kept = a != 0
    assert 0.7 < kept.double().mean().item() < 0.9  # p = 0.2


def test_compiled_accelerated_model_trains_as_eager():
    """torch.compile (inductor, fullgraph) of an accelerated model with batch norm and
    dropout: the same losses, weights and running statistics as eager, step for step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 5))
    accelerated = pybn.torch.accelerate(model)
    compiled_model = copy.deepcopy(accelerated)
    compiled = _CompiledCall(compiled_model, torch.compile(compiled_model, fullgraph=True))
    runs = [Run(accelerated, F.mse_loss, 0.1), Run(compiled, F.mse_loss, 0.1)]
    train_together(runs, net_data(np.random.default_rng(5), 10, 16), torch.float32, steps=10, tol=TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_compiled_cnn_trains_as_eager_with_aot_autograd(dtype):
    """The CNN, traced whole (fullgraph) through AOTAutograd without inductor: the graph
    calls the same operators, so the training is bit for bit the eager one."""
    torch.manual_seed(1)
    accelerated = pybn.torch.accelerate(CNNWithBNDropout().to(dtype))
    compiled_model = copy.deepcopy(accelerated)
    compiled = _CompiledCall(compiled_model, torch.compile(compiled_model, backend="aot_eager", fullgraph=True))
    runs = [Run(accelerated, F.cross_entropy, 0.05), Run(compiled, F.cross_entropy, 0.05)]
    train_together(runs, cnn_data(np.random.default_rng(6), 5, 4), dtype, steps=5, tol=0.0)


class _CompiledCall(nn.Module):
    """The compiled callable with the original module's parameters and state_dict."""

    def __init__(self, module, compiled):
        super().__init__()
        self.module = module
        self.compiled = [compiled]  # not a submodule: state_dict keys stay the module's

    def forward(self, x):
        return self.compiled[0](x)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)


def test_exported_accelerated_model_computes_as_eager():
    """torch.export of an accelerated CNN, in training mode (running statistics mutated)
    and in eval mode: the exported program gives the eager results."""
    torch.manual_seed(2)
    model = pybn.torch.accelerate(CNNWithBNDropout())
    x = torch.randn(4, 1, 28, 28)
    for training in (True, False):
        model.train(training)
        eager_model = copy.deepcopy(model)
        exported = torch.export.export(copy.deepcopy(model), (x,)).module()
        torch.manual_seed(9)
        want = eager_model(x)
        torch.manual_seed(9)
        got = exported(x)
        assert torch.equal(got, want)
        state = dict(exported.named_buffers())
        assert torch.equal(state["bn1.running_var"], eager_model.bn1.running_var)
        assert torch.equal(state["bn1.num_batches_tracked"], eager_model.bn1.num_batches_tracked)
        assert int(eager_model.bn1.num_batches_tracked) == int(training)
    calls = [str(n.target) for n in torch.export.export(model.train(), (x,)).graph.nodes]
    assert "pybn.batch_norm_train.default" in calls and "pybn.dropout.default" in calls
