"""One rank of the 2-process recalibration test (tests/test_recalibrate.py).

    python recalibrate_worker.py --rank R --world W --init tcp://127.0.0.1:PORT --out DIR

Recalibrates, over this rank's batches (BATCHES, generated identically in every process
and in the parent), a pybn.distributed.SyncBatchNorm (merged over the group by itself),
a pybn.nn.BatchNorm and a torch model with a stock torch BatchNorm1d (both merged with
comm=the default group), and writes their running statistics to DIR/rank{R}.pkl.
"""
from __future__ import annotations

import argparse
import datetime
import pickle

import numpy as np

C = 3


def rank_batches(rank: int) -> list[np.ndarray]:
    """Rank r's batches: unequal sizes and shifted means, so that averaging per-batch
    statistics would be wrong; as many on every rank (a SyncBatchNorm forward is a
    collective), an empty one on each."""
    sizes = {0: [5, 17, 2, 0], 1: [9, 0, 30, 4]}[rank]
    rng = np.random.default_rng([rank, 7])
    return [rng.normal(3.0 * i - 2.0 * rank, 0.5 + i, size=(n, C, 2)) + 100.0 for i, n in enumerate(sizes)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--init", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    import pybn
    import pybn.nn
    from pybn.distributed import SyncBatchNorm

    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=60))
    batches = rank_batches(args.rank)
    sync = SyncBatchNorm(C, dtype="float64")
    pybn.recalibrate(sync, batches)
    nonempty = [b for b in batches if len(b)]  # a plain batch norm refuses an empty batch in training mode
    local = pybn.nn.BatchNorm(C, dtype="float64")
    pybn.recalibrate(local, nonempty, comm=dist.group.WORLD)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(C, dtype=torch.float64))
    pybn.recalibrate(model, [torch.from_numpy(b) for b in nonempty], comm=dist.group.WORLD)
    result = {"rank": args.rank,
              "sync": (sync.running_mean.copy(), sync.running_var.copy(), sync.num_batches_tracked),
              "local": (local.running_mean.copy(), local.running_var.copy(), local.num_batches_tracked),
              "torch": (model[0].running_mean.numpy().copy(), model[0].running_var.numpy().copy(),
                        int(model[0].num_batches_tracked))}
    dist.destroy_process_group()
    with open(f"{args.out}/rank{args.rank}.pkl", "wb") as f:
        pickle.dump(result, f)


if __name__ == "__main__":
    main()
