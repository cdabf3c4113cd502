"""A small CNN with batch norm and dropout on 8x8 digits, trained from NumPy with pybn,
then deployed with its batch norms folded into the convolutions.

The model (PyTorch's order and weight layouts)::

    conv3x3(1 -> 16, padding 1) -> BatchNorm2d(16) -> ReLU
    conv3x3(16 -> 32, padding 1) -> BatchNorm2d(32) -> ReLU
    avg pool 2x2 -> flatten (32*4*4) -> Dropout(0.5) -> Linear(512 -> 10)

The convolutions are im2col + one matmul in NumPy, forward and backward written out
below; the batch norms and the dropout are ``pybn.nn.BatchNorm`` and ``pybn.nn.Dropout``
(``p`` is the probability of DROPPING a unit, as in PyTorch). Activations are kept
channels-last (NHWC), so the im2col matmul's output needs no transpose; batch norm over
the channel axis -1 is exactly PyTorch's BatchNorm2d (statistics over N, H and W).

After training, each conv -> BN pair is replaced (eval mode) by one conv with
``pybn.fold_conv_bn``: ``W' = W * gamma / sqrt(running_var + eps)`` per output channel and
the matching bias. The script checks that the folded model gives the same logits (to
float32 rounding) and the same predicted class on every test image, and times the
eval-mode forward of the whole test set both ways. It exits with status 1 if any
prediction differs.

Expect little speed from the fold here: pybn's batch norm runs at memory speed and
takes about 5% of this forward, the NumPy im2col convolutions nearly all the rest, and
the folded convs add a bias instead (the table shows the batch norms' share). Folding
pays more where the convolution itself is fast (an optimized conv library that adds the
bias inside its kernel).

Dataset: scikit-learn's bundled digits (1797 images of 8x8 pixels, 10 classes; no download).

Run it (about 5 s on 2 cores)::

    pip install .[examples]
    python examples/cnn_digits.py
    python examples/cnn_digits.py --epochs 30 --repeats 200
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import pybn
import pybn.nn as nn
from numpy_layers import Adam, Layer, Linear, ReLU, Sequential, limit_threads

DTYPE = np.float32


# --------------------------------------------------------------------------- data

def load_data(seed):
    """(x_train, x_test, y_train, y_test), as train_test_split: float32 NHWC images in
    [0, 1], int labels; a stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(DTYPE).reshape(-1, 8, 8, 1)  # pixel values are 0..16
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


# --------------------------------------------------------------------------- layers
# The layers follow numpy_layers' conventions (shared with the other examples): __call__(x)
# forward, backward(dy) -> dx, train()/eval(), arrays named weight, bias, grad_weight,
# grad_bias as pybn.nn.BatchNorm names them. Linear, ReLU and Sequential come from there.

def im2col(x):
    """(N, H, W, C) -> (N*H*W, 9*C): the 3x3 neighbourhood (zero padding 1) of each pixel.

    Columns are ordered (kh, kw, c): channels innermost, so the copy moves runs of C
    contiguous floats (6x faster here than the (c, kh, kw) order of PyTorch's weight).
    """
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = sliding_window_view(xp, (3, 3), axis=(1, 2))  # (N, H, W, C, 3, 3), a view
    return windows.transpose(0, 1, 2, 4, 5, 3).reshape(n * h * w, 9 * c)  # the one copy


def col2im(dcols, shape):
    """The adjoint of im2col: add each column's gradient back onto the pixels it read."""
    n, h, w, c = shape
    dcols = dcols.reshape(n, h, w, 3, 3, c)
    dxp = np.zeros((n, h + 2, w + 2, c), DTYPE)
    for i in range(3):
        for j in range(3):
            dxp[:, i:i + h, j:j + w, :] += dcols[:, :, :, i, j, :]
    return dxp[:, 1:-1, 1:-1, :]


class Conv3x3(Layer):
    """3x3 convolution, stride 1, zero padding 1, on NHWC; weight (out, in, 3, 3) as PyTorch."""

    def __init__(self, n_in, n_out, rng, bias=True):
        bound = 1.0 / math.sqrt(n_in * 9)  # PyTorch's default initialization
        self.weight = rng.uniform(-bound, bound, (n_out, n_in, 3, 3)).astype(DTYPE)
        # a conv followed by batch norm needs no bias: BN's mean subtraction cancels it
        self.bias = rng.uniform(-bound, bound, n_out).astype(DTYPE) if bias else None
        self.grad_weight = self.grad_bias = None
        self.input_grad = True  # False for the first layer: nobody needs d(loss)/d(image)

    @classmethod
    def from_weights(cls, weight, bias):
        """A conv with given (folded) parameters, for inference."""
        conv = cls.__new__(cls)
        conv.weight, conv.bias, conv.input_grad = weight, bias, False
        return conv

    def matrix(self):
        """The weight as (out, 9*in) in im2col's column order (kh, kw, c)."""
        return self.weight.transpose(0, 2, 3, 1).reshape(len(self.weight), -1)

    def __call__(self, x):
        self.shape = x.shape
        self.cols = im2col(x)
        y = self.cols @ self.matrix().T  # (N*H*W, out): already NHWC
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:3], len(self.weight))

    def backward(self, dy):
        out, c = self.weight.shape[:2]
        dy = dy.reshape(-1, out)
        # back from im2col's (kh, kw, c) order to PyTorch's (out, c, kh, kw)
        self.grad_weight = (dy.T @ self.cols).reshape(out, 3, 3, c).transpose(0, 3, 1, 2)
        if self.bias is not None:
            self.grad_bias = dy.sum(axis=0)
        return col2im(dy @ self.matrix(), self.shape) if self.input_grad else None


class AvgPool2Flatten(Layer):
    """2x2 average pooling, then flatten (N, H/2, W/2, C) to (N, H/2 * W/2 * C)."""

    def __call__(self, x):
        n, h, w, c = self.shape = x.shape
        return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4), dtype=DTYPE).reshape(n, -1)

    def backward(self, dy):
        n, h, w, c = self.shape
        dy = dy.reshape(n, h // 2, 1, w // 2, 1, c) * DTYPE(0.25)
        return np.broadcast_to(dy, (n, h // 2, 2, w // 2, 2, c)).reshape(self.shape)


def build_model(seed, p_drop):
    rng = np.random.default_rng(seed)
    conv1 = Conv3x3(1, 16, rng, bias=False)
    conv1.input_grad = False
    return Sequential([
        conv1, nn.BatchNorm(16, axis=-1), ReLU(),  # axis=-1: channels-last BatchNorm2d
        Conv3x3(16, 32, rng, bias=False), nn.BatchNorm(32, axis=-1), ReLU(),
        AvgPool2Flatten(), nn.Dropout(p_drop, seed=seed), Linear(32 * 4 * 4, 10, rng),
    ])


# --------------------------------------------------------------------------- training

def cross_entropy(logits, labels):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(labels)
    grad = np.exp(logp)
    grad[np.arange(n), labels] -= 1
    return float(-logp[np.arange(n), labels].mean()), grad / DTYPE(n)


def fit(model, x, y, epochs, batch_size, seed):
    """Train with Adam; return the mean training loss of the last epoch."""
    opt = Adam(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        order, losses = rng.permutation(len(x)), []
        for start in range(0, len(x) - 1, batch_size):  # a final batch of 1 row is skipped (BN needs 2)
            idx = order[start:start + batch_size]
            loss, dlogits = cross_entropy(model(x[idx]), y[idx])
            model.backward(dlogits)
            opt.step()
            losses.append(loss)
    return float(np.mean(losses))


# --------------------------------------------------------------------------- folding

def fold(model):
    """An eval-mode copy of the model with every conv -> BN pair folded into one conv.

    Dropout is the identity in eval mode, so it is left out of the folded model.
    """
    layers, src = [], model.layers
    i = 0
    while i < len(src):
        layer = src[i]
        if isinstance(layer, Conv3x3) and i + 1 < len(src) and isinstance(src[i + 1], nn.BatchNorm):
            bn = src[i + 1]
            w, b = pybn.fold_conv_bn(layer.weight, layer.bias, bn.running_mean, bn.running_var,
                                     bn.weight, bn.bias, eps=bn.eps)
            layers.append(Conv3x3.from_weights(w, b))
            i += 2
            continue
        if not isinstance(layer, nn.Dropout):
            layers.append(layer)
        i += 1
    return Sequential(layers)


def median_times(fns, repeats):
    """Median wall time of each function; the runs are interleaved, so that a slower
    stretch of a shared machine hits all of them alike."""
    for fn in fns:
        fn()  # warm-up: first-touch page faults, BLAS start-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [float(np.median(ts)) for ts in times]


def batchnorm_inputs(model, x):
    """(bn layer, its input) for each batch norm of an eval-mode forward of x."""
    pairs = []
    for layer in model.layers:
        if isinstance(layer, nn.BatchNorm):
            pairs.append((layer, x))
        x = layer(x)
    return pairs


def compare(model, folded, x_test, y_test, repeats):
    """Logits of both models on the test set, their agreement, and eval-forward times."""
    model.eval()
    logits = model(x_test)
    logits_f = folded(x_test)
    bns = batchnorm_inputs(model, x_test)
    t, t_f, t_bn = median_times([lambda: model(x_test), lambda: folded(x_test),
                                 lambda: [bn(x) for bn, x in bns]], repeats)
    return dict(
        acc=float((logits.argmax(1) == y_test).mean()),
        acc_f=float((logits_f.argmax(1) == y_test).mean()),
        max_diff=float(np.abs(logits - logits_f).max()),
        max_logit=float(np.abs(logits).max()),
        same=int((logits.argmax(1) == logits_f.argmax(1)).sum()),
        t=t, t_f=t_f, t_bn=t_bn,
    )


def print_table(r, n_test, repeats):
    ms = 1e3
    print(f"{'':<36}{'unfolded':>12}{'folded':>12}")
    print(f"{'test accuracy':<36}{r['acc']:>12.4f}{r['acc_f']:>12.4f}")
    print(f"{'max |logit difference|':<36}{'':>12}{r['max_diff']:>12.2e}")
    same = f"{r['same']}/{n_test}"
    print(f"{'same predicted class':<36}{'':>12}{same:>12}")
    print(f"{f'eval forward, {n_test} images (median of {repeats})':<36}"
          f"{r['t'] * ms:>9.2f} ms{r['t_f'] * ms:>9.2f} ms")
    print(f"{'  of which the 2 batch norms':<36}{r['t_bn'] * ms:>9.2f} ms{'-':>12}")
    print(f"{'speed-up':<36}{'':>12}{r['t'] / r['t_f']:>11.2f}x")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, help="default 20 (2 with --quick)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dropout", type=float, default=0.5, help="drop probability before the last layer")
    ap.add_argument("--repeats", type=int, help="timed eval forwards per model; default 50 (5 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for NumPy's BLAS and for pybn (see limit_threads)")
    ap.add_argument("--quick", action="store_true", help="2 epochs, 5 timed runs (a smoke test)")
    args = ap.parse_args(argv)
    if args.epochs is None:
        args.epochs = 2 if args.quick else 20
    if args.repeats is None:
        args.repeats = 5 if args.quick else 50
    return args


def main(argv=None):
    args = parse_args(argv)
    blas_limit = limit_threads(args.threads)  # noqa: F841 (keep the limit alive)
    x_tr, x_te, y_tr, y_te = load_data(args.seed)
    model = build_model(args.seed, args.dropout)
    loss = fit(model, x_tr, y_tr, args.epochs, args.batch_size, args.seed)
    folded = fold(model)
    r = compare(model, folded, x_te, y_te, args.repeats)
    print(f"digits: {len(x_tr)} train / {len(x_te)} test images; {args.epochs} epochs, Adam, batch "
          f"{args.batch_size}, dropout {args.dropout}; last epoch's training loss {loss:.4f}")
    print_table(r, len(x_te), args.repeats)
    # float32 rounding differs between W*s and (x W)*s, nothing more; a real difference is a bug
    if r["same"] != len(x_te) or r["max_diff"] > 1e-3 * max(1.0, r["max_logit"]):
        print("ERROR: the folded model does not reproduce the unfolded one", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
