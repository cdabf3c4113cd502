"""One process of the pybn.torch SyncBatchNorm tests (tests/test_torch_sync.py), and the
model and data they share.

    python torch_sync_worker.py --rank R --world W --init tcp://127.0.0.1:PORT --out DIR

Each process builds the same model (Conv2d -> BatchNorm2d -> ReLU -> Linear ->
BatchNorm1d -> Linear, float64), converts its batch norms with
``pybn.torch.convert_sync_batchnorm``, wraps it in DistributedDataParallel (gloo, CPU) and
trains STEPS SGD steps on its slice of each batch (unequal slices, an empty one among 3
processes), half of the configurations in channels_last. It records its outputs, input
gradients, parameter gradients and state after every step; the parent compares them with
stock torch on the whole batch in one process. Then two calls that must fail on every
process at once: the processes disagree on the channel count, and one process passes an
input the layer cannot take.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pickle
import sys

import numpy as np
import torch
from torch import nn

STEPS = 3
LR = 0.1
CHANNELS = 4
# rows of each step's batch per process: step s rolls them by s, so each process gets each size
SIZES = {1: [16], 2: [3, 13], 3: [5, 11, 0]}
CONFIGS = {"nchw": False, "channels_last": True}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, CHANNELS, 3), nn.BatchNorm2d(CHANNELS, momentum=0.3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(CHANNELS * 3 * 3, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double()


def sizes(world: int, step: int) -> list[int]:
    return list(np.roll(SIZES[world], step))


def batch(step: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, g) of the whole batch: inputs, and the weights of the loss sum(out * g)."""
    rng = np.random.default_rng([step, rows])
    x = torch.from_numpy(2.0 + rng.standard_normal((rows, 3, 5, 5)))
    g = torch.from_numpy(rng.standard_normal((rows, 2)))
    return x, g


def rows_of(sizes_: list[int], rank: int) -> slice:
    start = sum(sizes_[:rank])
    return slice(start, start + sizes_[rank])


def run_steps(model: nn.Module, params_of, world: int, rank: int, channels_last: bool, lr: float) -> list[dict]:
    """The training steps on this process's slices (world 1: the whole batch)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    records = []
    for step in range(STEPS):
        sz = sizes(world, step)
        x, g = batch(step, sum(sz))
        part = rows_of(sz, rank)
        x = x[part].clone()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        opt.zero_grad()
        out = model(x)
        (out * g[part]).sum().backward()
        records.append({"out": out.detach().clone(), "dx": x.grad.clone(),
                        "grads": {k: p.grad.clone() for k, p in params_of().items()}})
        opt.step()
        records[-1]["state"] = {k: v.clone() for k, v in params_of(state=True).items()}
    return records


def failing_calls(world: int, rank: int) -> dict:
    """Calls that every process must refuse together (no process left waiting)."""
    import pybn.torch.nn as pnn

    out = {}
    channels = 3 if rank < world - 1 else 5  # the last process disagrees on C
    cases = {"channels": (pnn.SyncBatchNorm(channels), torch.randn(4, channels, 2)),
             "bad-input": (pnn.SyncBatchNorm(3), torch.randn(4, 3) if rank else torch.randn(4))}
    for case, (layer, x) in cases.items():
        try:
            layer(x)
            out[case] = "no error"
        except Exception as e:  # noqa: BLE001 - recorded for the parent to check
            out[case] = f"{type(e).__name__}: {e}"
    # modules alike, called out of order: the last process calls b where the others call a again
    a, b = pnn.SyncBatchNorm(3), pnn.SyncBatchNorm(3)
    x = torch.randn(4, 3)
    a(x)
    try:
        (b if rank == world - 1 else a)(x)
        out["other-module"] = "no error"
    except Exception as e:  # noqa: BLE001 - recorded for the parent to check
        out["other-module"] = f"{type(e).__name__}: {e}"
    out["other-module-counts"] = [int(a.num_batches_tracked), int(b.num_batches_tracked)]
    y = a(x.requires_grad_())
    try:
        if rank == world - 1:
            a(x)
        else:
            y.sum().backward()
        out["backward-vs-forward"] = "no error"
    except Exception as e:  # noqa: BLE001 - recorded for the parent to check
        out["backward-vs-forward"] = f"{type(e).__name__}: {e}"
    # settings that differ on the last process: eps; a cumulative average's count of batches
    # affine and track_running_stats (with momentum=None the latter failed on a NaN count)
    for case, (layer, last) in {"eps": (pnn.SyncBatchNorm(3), dict(eps=1e-3)),
                                "num_batches_tracked": (pnn.SyncBatchNorm(3, momentum=None), {}),
                                "affine": (pnn.SyncBatchNorm(3), dict(affine=False)),
                                "track_running_stats": (pnn.SyncBatchNorm(3, momentum=None),
                                                        dict(track_running_stats=False))}.items():
        if rank == world - 1:
            if "track_running_stats" in last:
                layer = pnn.SyncBatchNorm(3, momentum=None, **last)
            elif "affine" in last:
                layer = pnn.SyncBatchNorm(3, **last)
            layer.eps = last.get("eps", layer.eps)
            if case == "num_batches_tracked":
                layer.num_batches_tracked.fill_(4)
        try:
            layer(x)
            out[case] = "no error"
        except Exception as e:  # noqa: BLE001 - recorded for the parent to check
            out[case] = f"{type(e).__name__}: {e}"
    # the collectives are still matched afterwards: a normal call works
    layer = pnn.SyncBatchNorm(3)
    out["after"] = layer(torch.arange(24.0).reshape(8, 3)[rank::world]).detach()
    out["after-running-mean"] = layer.running_mean.clone()
    return out


def residual_tail(world: int, rank: int) -> dict:
    """relu(bn(x) + r) through a synchronized layer (the tail applied after the synchronized
    normalization): this process's rows of the output and of the grads of x and r."""
    import pybn.torch.nn as pnn

    x, r = (torch.from_numpy(np.random.default_rng(seed).standard_normal((8, 3, 4))) for seed in (1, 2))
    part = slice(rank, None, world)
    xs, rs = x[part].clone().requires_grad_(), r[part].clone().requires_grad_()
    layer = pnn.SyncBatchNorm(3).double()
    out = layer(xs, residual=rs, relu=True)
    out.sum().backward()
    return {"out": out.detach(), "dx": xs.grad, "dr": rs.grad}


def per_rank_offsets(rank: int) -> dict:
    """Dropout with a seed per rank under DDP, unequal local batches (4 rows of 8 on rank 0,
    64 elsewhere: 16 and 64 counters a call), with and without offsets_per_rank, also
    applied before fuse_tails: the offsets after each of 2 steps."""
    from torch.nn.parallel import DistributedDataParallel

    import pybn.torch

    out = {}
    for case in ("broadcast", "kept", "kept, then fused"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), pybn.torch.nn.Dropout(0.5, seed=100 + rank))
        dropout = model[2]
        if case != "broadcast":
            pybn.torch.offsets_per_rank(model)
        if case == "kept, then fused":
            model = pybn.torch.fuse_tails(model)
        ddp = DistributedDataParallel(model)
        offsets = []
        for _ in range(2):
            ddp(torch.ones(4 if rank == 0 else 64, 8)).sum().backward()
            offsets.append(dropout.offset)
        out[case] = offsets
    return out


def run(world: int, rank: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    import pybn.torch

    results: dict = {"rank": rank, "world": world, "configs": {}}
    for name, channels_last in CONFIGS.items():
        model, report = pybn.torch.convert_sync_batchnorm(make_model(), return_report=True)
        results["report"] = [tuple(s) for s in report]
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        ddp = DistributedDataParallel(model)

        def params_of(state=False):
            return dict(model.state_dict()) if state else dict(model.named_parameters())
        results["configs"][name] = run_steps(ddp, params_of, world, rank, channels_last, LR)
    results["failing"] = failing_calls(world, rank)
    results["residual"] = residual_tail(world, rank)
    results["offsets"] = per_rank_offsets(rank)
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(results, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--init", required=True, help="init_method, e.g. tcp://127.0.0.1:PORT")
    parser.add_argument("--timeout", type=float, default=60.0, help="process group timeout (s)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=args.timeout))
    try:
        run(args.world, args.rank, args.out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
