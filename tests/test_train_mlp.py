"""Step-for-step agreement of a NumPy training loop built on pybn.nn with the same loop
in torch.

The model, twice (Linear -> ReLU -> Dropout -> BatchNorm) then Linear, 16 -> 64 -> 64 -> 3,
softmax cross-entropy, plain SGD, batch 32, 50 steps. The NumPy side uses pybn.nn layers
and NumPy matmuls; the torch side nn.Linear, nn.BatchNorm1d and autograd, with dropout
done as a multiplication by the mask pybn drew (read back with pybn.dropout_mask at the
layer's offset) and pybn's scale, 1 / P(keep) computed in float64 and rounded once to the
dtype (tests/reference_dropout.py). Losses, every weight and the running statistics agree at every step.
"""
import math

import numpy as np
import pytest
import torch

import pybn
import pybn.nn as nn
import reference_dropout as rd

SIZES = [16, 64, 64, 3]
BATCH, STEPS, P, LR = 32, 50, 0.2, 0.1
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
# max |pybn - torch| / max |torch| over each array
TOL = {np.float32: 1e-4, np.float64: 1e-10}


def init_linear(rng, n_in, n_out, dtype):
    bound = 1 / math.sqrt(n_in)  # torch's default nn.Linear initialization
    return (rng.uniform(-bound, bound, (n_out, n_in)).astype(dtype),
            rng.uniform(-bound, bound, n_out).astype(dtype))


def make_data(rng, dtype):
    """Fresh batches each step; labels from a fixed random teacher, so there is something to learn."""
    teacher = rng.normal(size=(SIZES[0], SIZES[-1]))
    xs = rng.normal(size=(STEPS, BATCH, SIZES[0]))
    labels = np.argmax(xs @ teacher, axis=-1)
    return xs.astype(dtype), labels


class NumpyMLP:
    """The model with pybn.nn layers; forward, backward and SGD by hand."""

    def __init__(self, linears, dtype):
        self.linears = [[w.copy(), b.copy()] for w, b in linears]
        self.drops = [nn.Dropout(P, seed=1000 + i) for i in range(2)]
        self.bns = [nn.BatchNorm(SIZES[i + 1], dtype=dtype) for i in range(2)]

    def forward(self, x):
        self.inputs, self.pre = [], []  # inputs of each Linear, ReLU pre-activations
        h = x
        for (w, b), drop, bn in zip(self.linears, self.drops, self.bns):
            self.inputs.append(h)
            z = h @ w.T + b
            self.pre.append(z)
            h = bn(drop(np.maximum(z, 0)))
        self.inputs.append(h)
        w, b = self.linears[-1]
        return h @ w.T + b

    def backward(self, dlogits):
        self.grads = [None] * 3
        dh = dlogits
        for i in (2, 1, 0):
            w, _ = self.linears[i]
            self.grads[i] = (dh.T @ self.inputs[i], dh.sum(axis=0))
            if i == 0:
                break
            dh = dh @ w
            dh = self.drops[i - 1].backward(self.bns[i - 1].backward(dh))
            dh = dh * (self.pre[i - 1] > 0)

    def sgd(self):
        for (w, b), (gw, gb) in zip(self.linears, self.grads):
            w -= LR * gw
            b -= LR * gb
        for bn in self.bns:
            bn.weight -= LR * bn.grad_weight
            bn.bias -= LR * bn.grad_bias

    def eval(self):
        for layer in self.drops + self.bns:
            layer.eval()


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy and its gradient with respect to the logits (float64 inside)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -logp[np.arange(n), labels].mean()
    d = np.exp(logp)
    d[np.arange(n), labels] -= 1
    return loss, (d / n).astype(logits.dtype)


class TorchMLP(torch.nn.Module):
    def __init__(self, linears, dtype):
        super().__init__()
        tdt = TORCH_DTYPE[dtype]
        self.linears = torch.nn.ModuleList(torch.nn.Linear(w.shape[1], w.shape[0], dtype=tdt) for w, _ in linears)
        with torch.no_grad():
            for lin, (w, b) in zip(self.linears, linears):
                lin.weight.copy_(torch.from_numpy(w))
                lin.bias.copy_(torch.from_numpy(b))
        self.bns = torch.nn.ModuleList(torch.nn.BatchNorm1d(SIZES[i + 1], dtype=tdt) for i in range(2))

    def forward(self, x, masks):
        h = x
        for i in range(2):
            h = torch.relu(self.linears[i](h))
            if masks is not None:
                h = h * masks[i]
            h = self.bns[i](h)
        return self.linears[2](h)


def pybn_masks(drops, shape, dtype):
    """The multipliers the dropout layers' next training calls apply: keep * scale."""
    n = math.prod(shape)
    scale = rd.scale_for(P, dtype)  # 1 / P(keep) in float64, one rounding, as pybn
    out = []
    for drop in drops:
        packed = pybn.dropout_mask(shape, drop.p, seed=drop.seed, offset=drop.offset)
        keep = np.unpackbits(packed, count=n, bitorder="little").reshape(shape)
        out.append(torch.from_numpy(keep.astype(dtype) * scale))
    return out


def rel_err(got, want):
    got = np.asarray(got, np.float64)
    want = want.detach().numpy().astype(np.float64) if isinstance(want, torch.Tensor) else np.float64(want)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def compare(np_model, t_model, what):
    pairs = []
    for i, ((w, b), lin) in enumerate(zip(np_model.linears, t_model.linears)):
        pairs += [(f"linear{i}.weight", w, lin.weight), (f"linear{i}.bias", b, lin.bias)]
    for i, (bn, tbn) in enumerate(zip(np_model.bns, t_model.bns)):
        pairs += [(f"bn{i}.{k}", getattr(bn, k), getattr(tbn, k))
                  for k in ["weight", "bias", "running_mean", "running_var"]]
        assert bn.num_batches_tracked == int(tbn.num_batches_tracked)
    return {f"{what} {name}": rel_err(a, t) for name, a, t in pairs}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_training_agrees_with_torch_at_every_step(dtype):
    rng = np.random.default_rng(20240605)
    linears = [init_linear(rng, SIZES[i], SIZES[i + 1], dtype) for i in range(3)]
    xs, labels = make_data(rng, dtype)
    np_model, t_model = NumpyMLP(linears, dtype), TorchMLP(linears, dtype)
    opt = torch.optim.SGD(t_model.parameters(), lr=LR)
    tol = TOL[dtype]
    losses = []
    for step in range(STEPS):
        masks = pybn_masks(np_model.drops, (BATCH, SIZES[1]), dtype)  # before pybn advances

        loss, dlogits = softmax_cross_entropy(np_model.forward(xs[step]), labels[step])
        np_model.backward(dlogits)
        np_model.sgd()

        opt.zero_grad()
        t_loss = torch.nn.functional.cross_entropy(t_model(torch.from_numpy(xs[step]), masks),
                                                   torch.from_numpy(labels[step]))
        t_loss.backward()
        opt.step()

        errors = {"loss": rel_err(loss, t_loss.item()), **compare(np_model, t_model, "")}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= tol, f"step {step}: {worst} differs by {errors[worst]:.3g} (relative)"
        losses.append(loss)

    # the dropout layers moved on by one mask per step
    assert np_model.drops[0].offset == STEPS * pybn.counters_used(BATCH * SIZES[1])
    # it learned something
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])

    # inference: running statistics, no dropout
    np_model.eval()
    t_model.eval()
    x_test = rng.normal(size=(100, SIZES[0])).astype(dtype)
    with torch.no_grad():
        want = t_model(torch.from_numpy(x_test), None)
    assert rel_err(np_model.forward(x_test), want) <= tol
