"""One worker of the SyncBatchNorm tests (tests/test_distributed.py), and the data they share.

Run as a script, once per rank:

    python distributed_worker.py torch --rank R --world W --init tcp://127.0.0.1:PORT --out DIR
    mpirun -n W python distributed_worker.py mpi --out DIR

Each worker trains one ``pybn.distributed.SyncBatchNorm`` per entry of CONFIGS on its slice
of a batch that every worker (and the parent, for the reference) generates identically
from a seed, then writes what it saw to ``DIR/rank{R}.pkl``. The parent compares the
slices, concatenated in rank order, with single-process pybn and torch on the whole batch.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pickle
import sys
import time

import numpy as np

# name -> layer keywords, the per-sample shape (the batch axis is prepended) and the data's offset
CONFIGS = {
    "float64-NCL": dict(num_features=4, sample=(4, 6), axis=1, dtype="float64", momentum=0.1, offset=2.0),
    "float32-NCHW": dict(num_features=3, sample=(3, 5, 4), axis=1, dtype="float32", momentum=0.1, offset=-1.0),
    "float64-NHWC-axis-1": dict(num_features=3, sample=(5, 4, 3), axis=-1, dtype="float64", momentum=0.25,
                                offset=0.5),
    "float64-NC-cumulative-offset1e4": dict(num_features=5, sample=(5,), axis=1, dtype="float64", momentum=None,
                                            offset=1e4),
    "float32-NC-no-affine": dict(num_features=6, sample=(6,), axis=1, dtype="float32", momentum=0.1, offset=0.0,
                                 affine=False),
    "float64-NCL-no-running-stats": dict(num_features=2, sample=(2, 3), axis=1, dtype="float64", momentum=0.1,
                                         offset=1.0, track_running_stats=False),
}
LAYER_KEYS = ("axis", "dtype", "momentum", "affine", "track_running_stats")
EPS = 1e-4
STEPS = 3
LR = 0.1
# rows of the batch per rank; step s uses the sizes rolled by s, so every rank is the
# empty one at some step in the 3-worker case
BASE_SIZES = {1: [16], 2: [3, 13], 3: [5, 11, 0]}
EVAL_SIZES = {1: [7], 2: [4, 3], 3: [0, 3, 4]}


def layer_kwargs(cfg: dict) -> dict:
    return {k: cfg[k] for k in LAYER_KEYS if k in cfg} | {"eps": EPS}


def sizes(world: int, step: int) -> list[int]:
    return list(np.roll(BASE_SIZES[world], step))


def batch(name: str, step: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, dy) of the whole batch of `step` (step -1: the evaluation batch), in the config's dtype."""
    cfg = CONFIGS[name]
    seed = [sorted(CONFIGS).index(name), step + 1, rows]
    rng = np.random.default_rng(seed)
    shape = (rows,) + cfg["sample"]
    x = cfg["offset"] + rng.uniform(0.5, 2.0, cfg["num_features"]).reshape(channel_shape(cfg)) * \
        rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    return x.astype(cfg["dtype"]), dy.astype(cfg["dtype"])


def channel_shape(cfg: dict) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector over one sample."""
    shape = [1] * len(cfg["sample"])
    shape[cfg["axis"] - 1 if cfg["axis"] > 0 else cfg["axis"]] = cfg["num_features"]
    return tuple(shape)


def rows_of(sizes_: list[int], rank: int) -> slice:
    start = sum(sizes_[:rank])
    return slice(start, start + sizes_[rank])


def train(layer, name: str, world: int, rank: int, counter=None) -> dict:
    """The training steps and the evaluation forward on this rank's slices; what the tests compare.

    With world=1, rank=0 and a plain BatchNorm this is the single-process reference."""
    out: dict = {k: [] for k in ("y", "dx", "grad_weight", "grad_bias", "running_mean", "running_var",
                                 "num_batches_tracked", "collectives")}
    for step in range(STEPS):
        sz = sizes(world, step)
        x, dy = batch(name, step, sum(sz))
        part = rows_of(sz, rank)
        calls = [counter.snapshot() if counter else None]
        y = layer(x[part])
        calls.append(counter.snapshot() if counter else None)
        dx = layer.backward(dy[part])
        calls.append(counter.snapshot() if counter else None)
        out["y"].append(y)
        out["dx"].append(dx)
        out["grad_weight"].append(None if layer.grad_weight is None else layer.grad_weight.copy())
        out["grad_bias"].append(None if layer.grad_bias is None else layer.grad_bias.copy())
        out["running_mean"].append(None if layer.running_mean is None else layer.running_mean.copy())
        out["running_var"].append(None if layer.running_var is None else layer.running_var.copy())
        out["num_batches_tracked"].append(layer.num_batches_tracked)
        out["collectives"].append(calls)
        if layer.affine:  # SGD: the gradients are the whole batch's, so every worker takes the same step
            layer.weight -= LR * layer.grad_weight
            layer.bias -= LR * layer.grad_bias
    out["weight"] = None if layer.weight is None else layer.weight.copy()
    out["bias"] = None if layer.bias is None else layer.bias.copy()
    if layer.track_running_stats:  # evaluation mode: running statistics, no communication
        layer.eval()
        sz = EVAL_SIZES[world]
        x, dy = batch(name, -1, sum(sz))
        part = rows_of(sz, rank)
        before = counter.snapshot() if counter else None
        out["eval_y"] = layer(x[part])
        out["eval_dx"] = layer.backward(dy[part])
        out["eval_collectives"] = [before, counter.snapshot() if counter else None]
    return out


class CollectiveCounter:
    """Counts the calls of pybn.distributed's collectives (wraps the adapters' methods)."""

    def __init__(self) -> None:
        import pybn.distributed as d

        self.calls = {"allgather": 0, "allreduce_sum": 0}
        for cls in (d._TorchComm, d._MPIComm):
            for method in self.calls:
                setattr(cls, method, self._wrap(getattr(cls, method), method))

    def _wrap(self, fn, method):
        def wrapped(*args, **kwargs):
            self.calls[method] += 1
            return fn(*args, **kwargs)
        return wrapped

    def snapshot(self) -> tuple[int, int]:
        return self.calls["allgather"], self.calls["allreduce_sum"]


def error_cases(make_layer, world: int, rank: int) -> dict:
    """Too few values over all workers: ValueError on every worker, and the layer still works."""
    out = {}
    for case, rows in (("one-value", [1] + [0] * (world - 1)), ("all-empty", [0] * world)):
        layer = make_layer(3)
        x = np.arange(3 * rows[rank], dtype=np.float32).reshape(rows[rank], 3)
        try:
            layer(x)
            out[case] = None
        except ValueError as e:
            out[case] = str(e)
        out[case + "-unchanged"] = (layer.num_batches_tracked, layer.running_mean.tolist())
    # a residual (or relu) in training mode: refused on every worker together
    layer = make_layer(3)
    x = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)[rank::world]
    try:
        layer(x, x.copy(), relu=True)
        out["residual"] = None
    except ValueError as e:
        out["residual"] = str(e)
    out["residual-unchanged"] = (layer.num_batches_tracked, layer.running_mean.tolist())
    # the collectives are still matched after the errors: a normal step works
    layer = make_layer(3)
    x = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)[rank::world]
    out["after-errors"] = layer(x)
    out["after-errors-rm"] = layer.running_mean.copy()
    return out


# misconfigurations between the workers: what differs on worker 1 (the others use BASE)
MISMATCHES = {
    "num_features": dict(num_features=6),
    "dtype": dict(dtype="float64"),
    "axis": dict(axis=-1),
    "eps": dict(eps=1e-3),
    "momentum": dict(momentum=None),
    "affine": dict(affine=False),
    "track_running_stats": dict(track_running_stats=False),
    "num_batches_tracked": {},  # both average cumulatively (momentum=None); worker 1 has counted 3 batches
    "x-channels": {},    # the layers agree; worker 1's x has one channel too few
    "x-dtype": {},       # ... or is float64 for a float32 layer
    "weight-shape": {},  # ... or its weight was rebound to one of 5 values
    "dy-shape": {},      # the forward works; worker 1's dy has the wrong shape
    "weight-backward": {},  # ... or its weight is rebound to 5 values before the backward
}
BASE = dict(num_features=4, dtype="float32", axis=1, eps=1e-5, momentum=0.1)


def mismatch_cases(comm, rank: int) -> dict:
    """Each misconfiguration once: every worker records its error; then a well-configured
    layer trains one step, showing the workers' collectives are still in step."""
    from pybn.distributed import SyncBatchNorm

    out = {}
    for kind, differs in MISMATCHES.items():
        kw = {**BASE, **(differs if rank == 1 else {})}
        if kind == "num_batches_tracked":
            kw["momentum"] = None
        c = kw.pop("num_features")
        layer = SyncBatchNorm(c, comm=comm, **kw)
        if kind == "num_batches_tracked" and rank == 1:
            layer.num_batches_tracked = 3
        shape = (5, c, 3) if layer.axis == 1 else (5, 3, c)
        x = np.random.default_rng(rank).standard_normal(shape).astype(layer.dtype)
        if rank == 1 and kind == "x-channels":
            x = x[:, :c - 1]
        if rank == 1 and kind == "x-dtype":
            x = x.astype(np.float64)
        if rank == 1 and kind == "weight-shape":
            layer.weight = np.ones(c + 1, np.float32)
        got: dict = {"error": None}
        try:
            layer(x)
            if kind == "dy-shape":
                got["forward-done"] = True
                layer.backward(np.ones_like(x) if rank == 0 else np.ones((2, 2), x.dtype))
            if kind == "weight-backward":
                got["forward-done"] = True
                if rank == 1:
                    layer.weight = np.ones(c + 1, np.float32)
                layer.backward(np.ones_like(x))
        except Exception as e:  # noqa: BLE001 - recorded for the parent to check
            got["error"] = f"{type(e).__name__}: {e}"
        got["num_batches_tracked"] = layer.num_batches_tracked
        got["running_mean"] = None if layer.running_mean is None else layer.running_mean.tolist()
        good = SyncBatchNorm(3, comm=comm)
        good(np.arange(12, dtype=np.float32).reshape(4, 3) * (rank + 1))
        got["after"] = good.running_mean.tolist()
        out[kind] = got
    return out


ORDER_CASES = ("other-width", "other-count", "backward-vs-forward")


def order_cases(comm, rank: int) -> dict:
    """Layers a and b, each trained once in the same order; then worker 1 calls another
    layer than worker 0 (`other-width`: b of 6 channels where 0 calls a of 4; `other-count`:
    b, alike but untrained, where 0 calls a again), or a forward where 0 calls a's backward.
    Every worker records its error and both layers' num_batches_tracked; then a good layer
    trains one step."""
    from pybn.distributed import SyncBatchNorm

    out = {}
    rng = np.random.default_rng(rank)
    for case in ORDER_CASES:
        a = SyncBatchNorm(4, comm=comm)
        b = SyncBatchNorm(6 if case == "other-width" else 4, comm=comm)
        xa = rng.standard_normal((5, 4)).astype(np.float32)
        xb = rng.standard_normal((5, b.num_features)).astype(np.float32)
        got: dict = {"error": None}
        try:
            a(xa)
            if case == "other-width":
                b(xb)
            if case == "backward-vs-forward" and rank == 0:
                a.backward(np.ones_like(xa))
            else:
                (a if rank == 0 else b)(xa if rank == 0 else xb)
        except Exception as e:  # noqa: BLE001 - recorded for the parent to check
            got["error"] = f"{type(e).__name__}: {e}"
        got["counts"] = [a.num_batches_tracked, b.num_batches_tracked]
        good = SyncBatchNorm(3, comm=comm)
        good(np.arange(12, dtype=np.float32).reshape(4, 3) * (rank + 1))
        got["after"] = good.running_mean.tolist()
        out[case] = got
    return out


def run_mismatches(comm, rank: int, out_dir: str) -> None:
    results = {"rank": rank, "cases": mismatch_cases(comm, rank), "order": order_cases(comm, rank)}
    path = os.path.join(out_dir, f"mismatch{rank}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(results, f)
    os.replace(path + ".tmp", path)


def pickled_collectives(layer, rank: int, counter) -> list:
    """(all-gathers, all-reduces) of the first training forward of a pickled copy of a
    layer that has trained: a copy starts its count of forwards again (every worker copies)."""
    x = np.arange(12, dtype=np.float32).reshape(4, 3) * (rank + 1)
    layer(x)
    copy = pickle.loads(pickle.dumps(layer))
    before = counter.snapshot()
    copy(x)
    return np.subtract(counter.snapshot(), before).tolist()


def explicit_comm(comm_kind: str, comm):
    """A communicator that cannot be pickled: torch's default group, a duplicate of COMM_WORLD."""
    if comm_kind == "torch":
        import torch.distributed as dist

        return dist.group.WORLD
    return comm.Dup()


def copy_error(layer) -> str:
    """The error of a deep copy of `layer` (built with an explicit communicator)."""
    import copy

    try:
        copy.deepcopy(layer)
    except Exception as e:  # noqa: BLE001 - recorded for the parent to check
        return f"{type(e).__name__}: {e}"
    return "no error"


def run(comm_kind: str, comm, world: int, rank: int, out_dir: str, comm_null=None) -> None:
    from pybn.distributed import SyncBatchNorm

    counter = CollectiveCounter()
    results: dict = {"rank": rank, "world": world, "configs": {}}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        layer_comm = comm
        if comm_kind == "torch" and i % 2 == 1:  # an explicit group half the time, the default group else
            import torch.distributed as dist
            layer_comm = dist.group.WORLD
        layer = SyncBatchNorm(cfg["num_features"], comm=layer_comm, **layer_kwargs(cfg))
        results["configs"][name] = train(layer, name, world, rank, counter)
    results["errors"] = error_cases(lambda c: SyncBatchNorm(c, comm=comm), world, rank)
    if comm_kind == "torch":  # (the default group: comm=None)
        results["pickled"] = pickled_collectives(SyncBatchNorm(3, comm=comm), rank, counter)
    results["copy_with_comm"] = copy_error(SyncBatchNorm(3, comm=explicit_comm(comm_kind, comm)))
    if comm_kind == "mpi":  # COMM_WORLD pickles by name (mpi4py >= 4): a layer on it copies
        results["copy_on_comm_world"] = copy_error(SyncBatchNorm(3, comm=comm))
    if comm_null is not None:
        try:
            SyncBatchNorm(3, comm=comm_null)
            results["comm_null"] = "no error"
        except Exception as e:  # noqa: BLE001 - recorded for the parent to check
            results["comm_null"] = f"{type(e).__name__}: {e}"
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(results, f)
    os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["torch", "mpi"])
    parser.add_argument("--rank", type=int)
    parser.add_argument("--world", type=int)
    parser.add_argument("--init", help="torch: init_method, e.g. tcp://127.0.0.1:PORT")
    parser.add_argument("--timeout", type=float, default=60.0, help="torch: process group timeout (s)")
    parser.add_argument("--die", action="store_true", help="exit at once after joining (a dead worker)")
    parser.add_argument("--stall", action="store_true", help="sleep after joining (a hung worker)")
    parser.add_argument("--mismatch", action="store_true", help="run the misconfiguration cases (MISMATCHES)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.engine == "torch":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world,
                                timeout=datetime.timedelta(seconds=args.timeout))
        if args.die:
            os._exit(3)
        if args.stall:
            time.sleep(600)
        try:
            if args.mismatch:
                run_mismatches(None, args.rank, args.out)
            else:
                run("torch", None, args.world, args.rank, args.out)
        finally:
            dist.destroy_process_group()
    else:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        if args.mismatch:
            run_mismatches(comm, comm.Get_rank(), args.out)
        else:
            run("mpi", comm, comm.Get_size(), comm.Get_rank(), args.out, comm_null=MPI.COMM_NULL)


if __name__ == "__main__":
    sys.exit(main())
