"""Data-parallel training of the tutorial MLP on 2 processes, with synchronized batch norm.

The model is the "Red Wine" MLP of the Keras tutorial on dropout and batch normalization
(three times ``Dense(64) -> ReLU -> Dropout(0.3) -> BatchNorm``, then ``Dense(1)``, mean
absolute error, Adam), with NumPy matmuls for the dense layers and pybn for the rest. It
is trained twice from the same initial weights:

* in one process, on the whole batch, with ``pybn.nn.BatchNorm`` and ``pybn.nn.Dropout``;
* data-parallel on ``--workers`` processes (default 2) started with
  ``torch.multiprocessing`` and joined in a ``torch.distributed`` gloo process group on
  127.0.0.1. Each process takes its slice of every batch; ``pybn.distributed.SyncBatchNorm``
  normalizes with the statistics of the whole batch, and the dense layers' gradients are
  summed over the processes with one all-reduce per step (what PyTorch's
  DistributedDataParallel does), so every process takes the same Adam step.

It prints both loss curves side by side: they agree to float32 rounding, because every
part of the data-parallel step computes what the single process computes:

* the loss is the mean over the WHOLE batch: each process divides its sum by the global
  batch size, and the per-process sums are added;
* batch norm: SyncBatchNorm's statistics, gradients and running statistics are the whole
  batch's (its ``grad_weight`` / ``grad_bias`` are already summed: they are not
  all-reduced again);
* dropout: each process applies its rows of the mask the single process draws for the
  whole batch. pybn's dropout mask is a counter-based stream (DESIGN.md), so every
  process draws the whole batch's mask from the same seed and offset and keeps its rows
  (a few bytes per row); an independently seeded mask per process would train just as
  well, but would not give the single-process curve.

Dataset: scikit-learn's bundled diabetes data (442 patients, 10 raw features, no
download), target standardized; losses are reported in the target's units.

Run it (a few seconds; needs torch for torch.distributed and scikit-learn)::

    pip install .[examples,torch]
    python examples/ddp_mlp.py
    python examples/ddp_mlp.py --workers 3 --epochs 30
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import tempfile
import time

import numpy as np

import pybn
import pybn.nn as nn

DTYPE = np.float32
P_DROP = 0.3  # the tutorial's Dropout(0.3)
WIDTH = 64
BATCH = 64  # the global batch: split over the processes
LR = 0.02
SEED = 0
T_START = float(os.environ.setdefault('T_START', str(time.time())))
MOMENTUM = 0.9
LOSS_GRAD = np.sign


# --------------------------------------------------------------------------- data

def load_data():
    """(x_train, y_train, x_valid, y_valid, y_scale), float32, target standardized."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(SEED).permutation(len(x))
    x, y = x[order].astype(DTYPE), y[order].astype(np.float64)
    n_train = int(0.8 * len(x))
    mu, sd = y[:n_train].mean(), y[:n_train].std()
    y = ((y - mu) / sd).astype(DTYPE)[:, None]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:], sd


def my_rows(n: int, rank: int, world: int) -> slice:
    """This process's rows of a batch of n: contiguous, sizes differing by at most one."""
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    return slice(bounds[rank], bounds[rank + 1])


# --------------------------------------------------------------------------- layers

class Dense:
    """``y = x @ W.T + b`` with He initialization; backward stores dW, db."""

    def __init__(self, n_in, n_out, rng):
        self.W = (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(DTYPE)
        self.b = np.zeros(n_out, DTYPE)

    def __call__(self, x):
        self.x = x
        return x @ self.W.T + self.b

    def backward(self, dy):
        self.dW = dy.T @ self.x
        self.db = dy.sum(axis=0)
        return dy @ self.W


class ReLU:
    def __call__(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy):
        return dy * self.mask


class ShardDropout(nn.Dropout):
    """Dropout whose mask is this process's rows of the mask of the whole batch.

    Every process draws the whole batch's mask with the same (seed, offset), as
    ``pybn.nn.Dropout`` does in one process, and applies its rows; then all advance the
    offset by the whole batch's counters."""

    def __init__(self, p, *, seed, rank, world):
        super().__init__(p, seed=seed)
        self.rank, self.world = rank, world

    def forward(self, x, total_rows=None):
        if not self.training:
            return x
        full_shape = (total_rows,) + x.shape[1:]
        n = int(np.prod(full_shape))
        bits = np.unpackbits(pybn.dropout_mask(full_shape, self.p, seed=self.seed, offset=self.offset),
                             count=n, bitorder="little").reshape(full_shape)
        self.mask = np.packbits(bits[my_rows(total_rows, self.rank, self.world)], bitorder="little")
        self.offset += pybn.counters_used(n)
        return pybn.dropout_apply(x, self.mask, self.p)

    def backward(self, dy):
        return dy if not self.training else pybn.dropout_apply(dy, self.mask, self.p)


def build_model(rank=0, world=1):
    """The tutorial's MLP; data-parallel (world > 1): SyncBatchNorm and ShardDropout."""
    rng = np.random.default_rng(SEED)  # the same initial weights in every process
    layers, n_in = [], 10
    for i in range(3):
        layers.append(Dense(n_in, WIDTH, rng))
        layers.append(ReLU())
        if world == 1:
            layers.append(nn.Dropout(P_DROP, seed=SEED + i))
            layers.append(nn.BatchNorm(WIDTH, dtype=DTYPE))
        else:
            from pybn.distributed import SyncBatchNorm

            layers.append(ShardDropout(P_DROP, seed=SEED + i, rank=rank, world=world))
            layers.append(SyncBatchNorm(WIDTH, dtype=DTYPE))  # comm=None: torch.distributed's default group
        n_in = WIDTH
    layers.append(Dense(n_in, 1, rng))
    return layers


def params_and_grads(layers):
    out = []
    for layer in layers:
        if isinstance(layer, Dense):
            out += [(layer, "W", "dW"), (layer, "b", "db")]
        elif isinstance(layer, nn.BatchNorm):
            out += [(layer, "weight", "grad_weight"), (layer, "bias", "grad_bias")]
    return out


class SGD:
    """SGD with momentum (PyTorch's formulation): ``v = mu * v + g``, ``p -= lr * v``."""

    def __init__(self, layers, lr, momentum=0.9):
        self.entries = params_and_grads(layers)
        self.lr, self.momentum = lr, momentum
        self.v = [np.zeros_like(getattr(obj, p)) for obj, p, _ in self.entries]

    def step(self):
        for (obj, p, g), v in zip(self.entries, self.v):
            v *= self.momentum
            v += getattr(obj, g)
            getattr(obj, p)[...] -= self.lr * v


# --------------------------------------------------------------------------- training

def forward(layers, x, total_rows, training):
    for layer in layers:
        if hasattr(layer, "train"):
            layer.train(training)
        x = layer.forward(x, total_rows) if isinstance(layer, ShardDropout) else layer(x)
    return x


def train(epochs, rank=0, world=1, allreduce=None):
    """Train; return [(train MAE, valid MAE)] per epoch, in the target's units.

    `allreduce(array) -> array` sums over the processes (None: one process)."""
    allreduce = allreduce or (lambda a: a)
    x_tr, y_tr, x_va, y_va, y_scale = load_data()
    layers = build_model(rank, world)
    dense = [layer for layer in layers if isinstance(layer, Dense)]
    opt = SGD(layers, LR, MOMENTUM)
    curve = []
    for epoch in range(epochs):
        order = np.random.default_rng([SEED, epoch]).permutation(len(x_tr))  # the same in every process
        loss_sum = 0.0
        for start in range(0, len(order), BATCH):
            idx = order[start:start + BATCH]
            mine = idx[my_rows(len(idx), rank, world)]
            pred = forward(layers, x_tr[mine], len(idx), training=True)
            err = pred - y_tr[mine]
            # the loss is the mean over the whole batch: divide by its size, not by len(mine)
            grad = (LOSS_GRAD(err) / len(idx)).astype(DTYPE)
            for layer in reversed(layers):
                grad = layer.backward(grad)
            # data parallel: one all-reduce (sum) per step of the dense layers' gradients and
            # the loss (SyncBatchNorm's grad_weight / grad_bias are already the whole batch's)
            local = [g.ravel() for d in dense for g in (d.dW, d.db)] + [[np.abs(err).sum(dtype=np.float64)]]
            flat = allreduce(np.concatenate(local).astype(np.float64))
            pos = 0
            for d in dense:
                for name in ("dW", "db"):
                    g = getattr(d, name)
                    setattr(d, name, flat[pos:pos + g.size].reshape(g.shape).astype(DTYPE))
                    pos += g.size
            loss_sum += flat[-1]
            opt.step()
        # validation in eval mode (running statistics, no dropout): each process its slice
        part = my_rows(len(x_va), rank, world)
        pred = forward(layers, x_va[part], len(x_va), training=False)
        valid_sum = float(allreduce(np.array([np.abs(pred - y_va[part]).sum(dtype=np.float64)]))[0])
        curve.append((loss_sum / len(x_tr) * y_scale, valid_sum / len(x_va) * y_scale))
    return curve


def worker(rank, world, port, epochs, result_path):
    """One data-parallel process (started by torch.multiprocessing.spawn)."""
    print(f"rank {rank}: started {time.time() - T_START:.2f}", flush=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's connections stay on loopback
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))

    def allreduce(a):
        t = torch.from_numpy(np.array(a, np.float64))
        dist.all_reduce(t)
        return t.numpy()

    try:
        t0 = time.perf_counter()
        curve = train(epochs, rank, world, allreduce)
        print(f"rank {rank}: train {time.perf_counter() - t0:.2f} s", flush=True)
        if rank == 0:
            np.save(result_path, np.array(curve))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the workers: one thread each
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "curve.npy")
        mp.spawn(worker, args=(args.workers, free_port(), args.epochs, path), nprocs=args.workers, join=True)
        ddp = np.load(path)
    t_ddp = time.perf_counter() - start
    start = time.perf_counter()
    single = np.array(train(args.epochs))
    t_single = time.perf_counter() - start

    print(f"Tutorial MLP on the diabetes data, mean absolute error (target units), batch {BATCH}:")
    print(f"{args.workers} processes (gloo, SyncBatchNorm, {t_ddp:.1f} s with start-up) vs 1 process "
          f"({t_single:.1f} s)\n")
    print(f"{'epoch':>5}  {'train ' + str(args.workers) + 'p':>12}  {'train 1p':>12}  "
          f"{'valid ' + str(args.workers) + 'p':>12}  {'valid 1p':>12}")
    for epoch, (a, b) in enumerate(zip(ddp, single), 1):
        print(f"{epoch:>5}  {a[0]:12.6f}  {b[0]:12.6f}  {a[1]:12.6f}  {b[1]:12.6f}")
    rel = float(np.max(np.abs(ddp - single) / np.abs(single)))
    verdict = "the curves agree" if rel <= 1e-5 else "the curves DIFFER"
    print(f"\nmax relative difference {rel:.2e} (<= 1e-05): {verdict}")
    return 0 if rel <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
