"""Data-parallel training of the tutorial MLP on 2 processes, with synchronized batch norm.

The model is the "Red Wine" MLP of the Keras tutorial on dropout and batch normalization
(three times ``Dense(64) -> ReLU -> Dropout(0.3) -> BatchNorm``, then ``Dense(1)``, mean
absolute error), with NumPy matmuls for the dense layers and pybn for the rest. It is
trained twice, from the same initial weights, with the same batches:

* in one process, on the whole batch, with ``pybn.nn.BatchNorm`` and ``pybn.nn.Dropout``;
* data-parallel on ``--workers`` processes (default 2) started by
  ``torch.multiprocessing.spawn`` and joined in a ``torch.distributed`` gloo process group
  on 127.0.0.1. Each process takes its slice of every batch; ``pybn.distributed.SyncBatchNorm``
  normalizes with the statistics of the whole batch, and one all-reduce per step sums the
  dense layers' gradients over the processes (as PyTorch's DistributedDataParallel does),
  so every process takes the same optimizer step.

It prints both loss curves side by side. They are the same curve because every part of
the data-parallel step computes what the single process computes, only summed in another
order:

* the loss is the mean over the WHOLE batch: each process divides its sum by the global
  batch size, and the per-process sums are added;
* batch norm: SyncBatchNorm's statistics, gradients and running statistics are the whole
  batch's (its ``grad_weight`` / ``grad_bias`` are already summed over the processes, so
  they are not all-reduced again);
* dropout: each process applies its rows of the mask that the single process draws for
  the whole batch. pybn's mask is a counter-based stream (docs/dropout.md), so each process
  draws the whole batch's mask from the same seed and offset (a few bytes per row) and
  keeps its rows. Independently seeded masks per process would train as well, but would
  not give the single-process curve.

The default is float64, in which the curves agree to about 1e-9 over the whole run. In
float32 (``--dtype float32``) they agree to about 1e-7 after the first epoch; later the
rounding differences of the two summation orders grow, as they do between any two float32
trainings that sum in different orders (PyTorch's DDP against one process included): a
ReLU or the sign of an absolute error flips for one sample, batch norm channels that
dropout left nearly constant amplify a tiny change, and SGD compounds it. When that
happens depends even on the SIMD path that sums (``PYBN_ISA=scalar|avx2|avx512``).
Comparing in float64 shows that the data-parallel step is the single-process one.

Dataset: scikit-learn's bundled diabetes data (442 patients, 10 standardized features, no
download), target standardized; losses are reported in the target's units.

Run it (about 15 s, mostly start-up; needs torch for torch.distributed, and scikit-learn)::

    pip install .[examples,torch]
    python examples/ddp_mlp.py
    python examples/ddp_mlp.py --workers 3 --dtype float32 --epochs 8
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
from numpy_layers import SGD, Linear, ReLU, Sequential

P_DROP = 0.3  # the tutorial's Dropout(0.3)
WIDTH = 64
BATCH = 64  # the global batch, split over the processes
LR = 0.02
MOMENTUM = 0.9
SEED = 0


# --------------------------------------------------------------------------- data

def load_data(dtype):
    """(x_train, y_train, x_valid, y_valid, y_scale): target standardized with the training split."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(SEED).permutation(len(x))
    x, y = x[order], y[order]
    n_train = int(0.8 * len(x))
    mu, sd = y[:n_train].mean(), y[:n_train].std()
    y = ((y - mu) / sd)[:, None]
    x, y = x.astype(dtype), y.astype(dtype)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:], sd


def my_rows(n, rank, world):
    """This process's rows of a batch of n: contiguous, sizes differing by at most one."""
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    return slice(bounds[rank], bounds[rank + 1])


# --------------------------------------------------------------------------- layers

# Linear, ReLU, Sequential and SGD come from numpy_layers.py, shared with the other examples.

def dense(n_in, n_out, rng, dtype):
    """A Linear layer with He initialization (normal, std sqrt(2 / n_in)) and zero bias."""
    weight = (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(dtype)
    return Linear.from_weights(weight, np.zeros(n_out, dtype))


class ShardDropout(nn.Dropout):
    """Dropout that applies this process's rows of the mask of the whole batch.

    Every process draws the whole batch's mask with the same (seed, offset), as
    ``pybn.nn.Dropout`` does in one process, keeps its rows, and advances the offset past
    the whole batch's counters."""

    def __init__(self, p, *, seed, rank, world):
        super().__init__(p, seed=seed)
        self.rank, self.world = rank, world

    def forward(self, x, total_rows):
        if not self.training:
            return x
        shape = (total_rows,) + x.shape[1:]
        n = int(np.prod(shape))
        bits = np.unpackbits(pybn.dropout_mask(shape, self.p, seed=self.seed, offset=self.offset),
                             count=n, bitorder="little").reshape(shape)
        self.mask = np.packbits(bits[my_rows(total_rows, self.rank, self.world)], bitorder="little")
        self.offset += pybn.counters_used(n)
        return pybn.dropout_apply(x, self.mask, self.p)

    def backward(self, dy):
        return pybn.dropout_apply(dy, self.mask, self.p) if self.training else dy


def build_model(dtype, rank=0, world=1):
    """The tutorial's MLP; data-parallel (world > 1) with SyncBatchNorm and ShardDropout."""
    rng = np.random.default_rng(SEED)  # the same initial weights in every process
    layers, n_in = [], 10
    for i in range(3):
        layers += [dense(n_in, WIDTH, rng, dtype), ReLU()]
        if world == 1:
            layers += [nn.Dropout(P_DROP, seed=SEED + i), nn.BatchNorm(WIDTH, dtype=dtype)]
        else:
            from pybn.distributed import SyncBatchNorm

            layers += [ShardDropout(P_DROP, seed=SEED + i, rank=rank, world=world),
                       SyncBatchNorm(WIDTH, dtype=dtype)]  # comm=None: torch.distributed's default group
        n_in = WIDTH
    layers.append(dense(n_in, 1, rng, dtype))
    return Sequential(layers)


# --------------------------------------------------------------------------- training

def forward(model, x, total_rows, training):
    """The model's forward; ShardDropout also needs the whole batch's row count."""
    model.train(training)
    for layer in model.layers:
        x = layer.forward(x, total_rows) if isinstance(layer, ShardDropout) else layer(x)
    return x


def train(epochs, dtype, rank=0, world=1, allreduce=None):
    """Train; return [(train MAE, valid MAE)] per epoch, in the target's units.

    `allreduce(float64 array) -> array` sums over the processes (None: one process)."""
    allreduce = allreduce or (lambda a: a)
    x_tr, y_tr, x_va, y_va, y_scale = load_data(dtype)
    model = build_model(dtype, rank, world)
    linears = [layer for layer in model.layers if isinstance(layer, Linear)]
    opt = SGD(model.parameters(), LR, MOMENTUM)
    curve = []
    for epoch in range(epochs):
        order = np.random.default_rng([SEED, epoch]).permutation(len(x_tr))  # the same in every process
        loss_sum = 0.0
        for start in range(0, len(order), BATCH):
            idx = order[start:start + BATCH]
            mine = idx[my_rows(len(idx), rank, world)]
            err = forward(model, x_tr[mine], len(idx), training=True) - y_tr[mine]
            # mean absolute error over the whole batch: divide by its size, not by len(mine)
            grad = (np.sign(err) / len(idx)).astype(dtype)
            model.backward(grad)
            # data parallel: one all-reduce (sum) of the dense layers' gradients and the loss
            # (SyncBatchNorm's grad_weight / grad_bias are the whole batch's already)
            local = ([g.ravel() for d in linears for g in (d.grad_weight, d.grad_bias)]
                     + [[np.abs(err).sum(dtype=np.float64)]])
            flat = allreduce(np.concatenate(local).astype(np.float64))
            pos = 0
            for d in linears:
                for name in ("grad_weight", "grad_bias"):
                    g = getattr(d, name)
                    setattr(d, name, flat[pos:pos + g.size].reshape(g.shape).astype(dtype))
                    pos += g.size
            loss_sum += flat[-1]
            opt.step()
        # validation in eval mode (running statistics, no dropout): each process its slice
        part = my_rows(len(x_va), rank, world)
        err = forward(model, x_va[part], len(x_va), training=False) - y_va[part]
        valid_sum = allreduce(np.array([np.abs(err).sum(dtype=np.float64)]))[0]
        curve.append((loss_sum / len(x_tr) * y_scale, valid_sum / len(x_va) * y_scale))
    return curve


def worker(rank, world, port, epochs, dtype, result_path):
    """One data-parallel process (started by torch.multiprocessing.spawn)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's connections stay on loopback
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a dead peer fails, not hangs

    def allreduce(a):
        t = torch.from_numpy(np.array(a, np.float64))
        dist.all_reduce(t)
        return t.numpy()

    try:
        curve = train(epochs, np.dtype(dtype), rank, world, allreduce)
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
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = parser.parse_args()
    dtype = np.dtype(args.dtype)

    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the workers: one thread each
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "curve.npy")
        # the dtype by name: an unpickled np.dtype is not numpy's own float32 / float64 object
        mp.spawn(worker, args=(args.workers, free_port(), args.epochs, args.dtype, path), nprocs=args.workers,
                 join=True)
        ddp = np.load(path)
    t_ddp = time.perf_counter() - start
    start = time.perf_counter()
    single = np.array(train(args.epochs, dtype))
    t_single = time.perf_counter() - start

    rel = np.abs(ddp - single) / np.abs(single)
    w = args.workers
    print(f"Tutorial MLP on the diabetes data ({dtype}, batch {BATCH}), mean absolute error in target units")
    print(f"{w} processes: gloo + SyncBatchNorm, {t_ddp:.1f} s with start-up; 1 process: {t_single:.1f} s\n")
    print(f"{'epoch':>5}  {f'train {w}p':>11}  {'train 1p':>11}  {f'valid {w}p':>11}  {'valid 1p':>11}  "
          f"{'rel. diff.':>10}")
    for epoch, (a, b, r) in enumerate(zip(ddp, single, rel.max(axis=1)), 1):
        print(f"{epoch:>5}  {a[0]:11.6f}  {b[0]:11.6f}  {a[1]:11.6f}  {b[1]:11.6f}  {r:10.1e}")
    tol = 1e-5
    agree = int(np.argmax(rel.max(axis=1) > tol)) if rel.max() > tol else args.epochs  # leading epochs within tol
    print(f"\nmax relative difference {rel.max():.1e}: the curves agree to {tol:g} for {agree} of "
          f"{args.epochs} epochs")
    if agree < args.epochs and dtype == np.float32:
        print("(float32: the rounding differences of the two summation orders grow as training goes on, "
              "as between any two float32 runs that sum in different orders; --dtype float64 agrees "
              "over the whole run)")
    return 0 if agree == args.epochs or dtype == np.float32 else 1


if __name__ == "__main__":
    raise SystemExit(main())
