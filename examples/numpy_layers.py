"""NumPy building blocks shared by the example scripts: layers, optimizers, thread limits.

Each layer has ``__call__(x)`` (the forward, saving what its backward needs),
``backward(dy) -> dx`` and ``train()`` / ``eval()``, like ``pybn.nn.BatchNorm`` and
``pybn.nn.Dropout``, so pybn's layers and these mix in one ``Sequential``. Trainable
layers name their arrays as pybn.nn.BatchNorm does (``weight``, ``bias``,
``grad_weight``, ``grad_bias``), so one optimizer loop updates every kind of layer.

Not a package module: the scripts in examples/ import it as ``from numpy_layers import
...``, which works because Python puts a script's own folder first on ``sys.path`` (and
multiprocessing's spawned workers inherit that path).
"""
from __future__ import annotations

import math

import numpy as np

import pybn


# --------------------------------------------------------------------------- layers

class Layer:
    """Base of the layers without a training mode: train() and eval() do nothing."""

    def train(self, mode=True):
        return self

    def eval(self):
        return self


class Linear(Layer):
    """y = x W^T + b, PyTorch's layout (weight (out, in)) and default initialization."""

    def __init__(self, n_in, n_out, rng, dtype=np.float32):
        bound = 1.0 / math.sqrt(n_in)
        self.weight = rng.uniform(-bound, bound, (n_out, n_in)).astype(dtype)
        self.bias = rng.uniform(-bound, bound, n_out).astype(dtype)
        self.grad_weight = self.grad_bias = None

    @classmethod
    def from_weights(cls, weight, bias):
        """A layer with the given parameters (another initialization, trained weights)."""
        layer = cls.__new__(cls)
        layer.weight, layer.bias = weight, bias
        layer.grad_weight = layer.grad_bias = None
        return layer

    def __call__(self, x):
        self.x = x  # saved for the weight gradient
        return x @ self.weight.T + self.bias

    def backward(self, dy):
        self.grad_weight = dy.T @ self.x
        self.grad_bias = dy.sum(axis=0)
        return dy @ self.weight


class ReLU(Layer):
    """max(x, 0); backward passes the gradient where the input was positive."""

    def __call__(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy):
        return dy * self.mask


class Sequential:
    """Layers applied in order; backward in reverse order."""

    def __init__(self, layers):
        self.layers = layers

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def train(self, mode=True):
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def parameters(self):
        """(layer, name) of every trainable array (weight, bias; a bias of None is skipped)."""
        return [(layer, name) for layer in self.layers for name in ("weight", "bias")
                if getattr(layer, name, None) is not None]


# --------------------------------------------------------------------------- optimizers
# Both take the (layer, name) pairs of Sequential.parameters(): the array is
# getattr(layer, name), its gradient getattr(layer, "grad_" + name); they update in place.

class Adam:
    """Adam (Kingma & Ba); the defaults are PyTorch's (Keras' eps is 1e-7)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.m = [np.zeros_like(getattr(layer, name)) for layer, name in params]
        self.v = [np.zeros_like(getattr(layer, name)) for layer, name in params]

    def step(self):
        self.t += 1
        b1, b2 = self.betas
        # bias corrections folded into the step size (as in the paper's efficient form)
        lr_t = self.lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for (layer, name), m, v in zip(self.params, self.m, self.v):
            g = getattr(layer, "grad_" + name)
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            getattr(layer, name)[...] -= lr_t * m / (np.sqrt(v) + self.eps)


class SGD:
    """SGD with momentum, PyTorch's formulation: ``v = momentum * v + g``, ``p -= lr * v``."""

    def __init__(self, params, lr, momentum=0.0):
        self.params, self.lr, self.momentum = params, lr, momentum
        self.v = [np.zeros_like(getattr(layer, name)) for layer, name in params]

    def step(self):
        for (layer, name), v in zip(self.params, self.v):
            v *= self.momentum
            v += getattr(layer, "grad_" + name)
            getattr(layer, name)[...] -= self.lr * v


# --------------------------------------------------------------------------- threads

def limit_threads(n):
    """Run NumPy's BLAS and pybn's kernels on n threads each (the scripts' default: 1).

    The matmuls run on OpenBLAS's thread pool and pybn's kernels on pybn's own, whose idle
    threads spin about 0.1 ms before they sleep: they do not take the cores from BLAS for
    8 ms after each call (as GNU OpenMP's did), and on an idle 2-core machine 2 threads lose
    no wall time: ``mlp_tabular.py`` took 13.8 s wall with ``--threads 1`` and 13.9 s with
    ``--threads 2`` (2 runs each), but 24 s of CPU instead of 13. With other work on the
    2 cores (load about 2), the two busy pools still crowd each other out: 14.6-14.8 s
    on 1 thread, 34.6 and 60.0 s on 2. (One training step, a 256x512 by 512x512 matmul
    then a batch norm: median 1.5 ms on 1 + 1 threads, 1.8-2.2 ms on 2 + 2 idle and
    2.1-10 ms loaded; BLAS on 2 with pybn on 1 ran it in 0.8 ms, but the whole script no
    faster than on 1 + 1.) The arrays here are small (a few MB at most), so one thread
    each is the fast and steady choice. Results do not depend on the thread counts.
    """
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    pybn.set_num_threads(n)
    return threadpool_limits(limits=n, user_api="blas")
