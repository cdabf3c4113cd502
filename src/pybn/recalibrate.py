"""Exact re-estimation of batch norm's running statistics (docs/recalibration.md).

:func:`recalibrate` runs a model over a set of batches and sets every batch norm layer's
``running_mean`` and ``running_var`` to the mean and the unbiased variance of *all* the
values the layer saw, over every batch (and, for synchronized layers or with `comm`, every
process): the per-batch ``(count, mean, m2)`` of :func:`pybn.batch_norm_stats` (float64)
are merged with Chan's formula (:func:`pybn.batch_norm_merge_stats`), which is exact for
any batch sizes. Running averages of per-batch statistics (``momentum=None``, as
``torch.optim.swa_utils.update_bn`` does) average the per-batch variances instead, which
leaves out the spread of the batch means and weights unequal batches wrongly.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from . import _lockstep
from ._checks import integer
from .batchnorm_split import BatchNormStats, batch_norm_merge_stats, batch_norm_stats
from .nn import BatchNorm
from .nn._layer import _Layer

__all__ = ["recalibrate"]


class _Accumulator:
    """(count, mean, m2) of the values seen so far, merged batch by batch (float64)."""

    def __init__(self, channels: int) -> None:
        self.stats = BatchNormStats(0, np.zeros(channels), np.zeros(channels))
        self.batches = 0

    def add(self, stats: BatchNormStats) -> None:
        merged = batch_norm_merge_stats([self.stats.count, stats.count], np.stack([self.stats.mean, stats.mean]),
                                        np.stack([self.stats.m2, stats.m2]))
        self.stats = merged
        self.batches += 1


def recalibrate(model: Any, batches: Iterable[Any], *, forward: Callable[[Any], Any] | None = None,
                comm: Any = None) -> list[BatchNormStats]:
    """Set the running statistics of every batch norm layer of `model` to the exact
    statistics of the values it sees over all `batches`.

    The batch norm layers are put in training mode for the pass (they normalize with each
    batch's statistics, as ``torch.optim.swa_utils.update_bn`` runs them), every other
    layer keeps its mode; afterwards each layer gets back its mode, and
    ``running_mean`` = the mean, ``running_var`` = the unbiased variance
    (``m2 / (count - 1)``, as torch's), both of the union of the batches, and
    ``num_batches_tracked`` = the number of batches (over processes: of every process for a
    layer merged by `comm`, of each process for a synchronized layer, as training counts).
    If anything fails, every layer's state is left as it was.

    Parameters
    ----------
    model : pybn.nn.BatchNorm, iterable of pybn.nn layers, or torch.nn.Module
        pybn layers (:class:`pybn.nn.BatchNorm`, :class:`pybn.distributed.SyncBatchNorm`;
        other pybn.nn layers are skipped), or a torch model whose ``_BatchNorm`` modules
        with running statistics (torch's, pybn.torch's, SyncBatchNorm) are recalibrated
        through forward hooks.
    batches : iterable
        What `forward` is called with, once each.
    forward : callable, optional
        Runs the model on one batch. Default: ``model(batch)`` for a torch model (its
        first element for a list or tuple batch, as ``update_bn``) and for a single pybn
        layer; required for a list of pybn layers.
    comm : torch.distributed ProcessGroup or mpi4py.MPI.Comm, optional
        Merge every layer's statistics over the processes of `comm` too, so that every
        process ends with the same statistics of all the processes' batches. Without it a
        synchronized layer (pybn.distributed.SyncBatchNorm, a torch or pybn.torch
        SyncBatchNorm) merges over its own process group and the others stay local.

    Returns
    -------
    list of BatchNormStats
        The merged (count, mean, m2) of each layer, in float64, in the order of the layers.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        from ._recalibrate_torch import torch_targets
        targets, run = torch_targets(model, forward)
    else:
        targets, run = _pybn_targets(model, forward)
    return _recalibrate(targets, batches, run, comm)


_NONE = object()  # (no attribute)


class _PybnTarget:
    """One pybn.nn.BatchNorm under recalibration: collects the stats of its inputs."""

    def __init__(self, layer: BatchNorm) -> None:
        self.layer = layer
        self.channels = layer.num_features
        self.acc = _Accumulator(self.channels)
        self.saved = (layer.training, layer.running_mean.copy(), layer.running_var.copy(),  # type: ignore[union-attr]
                      layer.num_batches_tracked)
        self.own_forward: Any = _NONE  # a forward set on the instance (a user's wrapper), put back by stop()

    def start(self) -> None:
        layer, original = self.layer, self.layer.forward
        self.own_forward = layer.__dict__.get("forward", _NONE)

        def collecting(x: Any, *args: Any, **kwargs: Any) -> np.ndarray:
            # training mode: checks x, normalizes with the batch's statistics (a residual too)
            y = original(x, *args, **kwargs)
            assert layer._saved is not None  # (set by the forward)
            self.acc.add(batch_norm_stats(layer._saved[0], axis=layer.axis))
            return y

        layer.forward = collecting  # type: ignore[method-assign]
        layer.train()

    def stop(self) -> None:
        if self.own_forward is _NONE:
            self.layer.__dict__.pop("forward", None)
        else:
            self.layer.__dict__["forward"] = self.own_forward
        self.layer.train(self.saved[0])

    def restore(self) -> None:
        layer, (_, mean, var, count) = self.layer, self.saved
        layer.running_mean[...] = mean  # type: ignore[index]
        layer.running_var[...] = var  # type: ignore[index]
        layer.num_batches_tracked = count

    def own_comm(self) -> Any:
        from .distributed import SyncBatchNorm

        return self.layer._communicator() if isinstance(self.layer, SyncBatchNorm) else None

    def set(self, stats: BatchNormStats, batches: int) -> None:
        layer = self.layer
        layer.running_mean[...] = stats.mean  # type: ignore[index]
        layer.running_var[...] = stats.m2 / (float(stats.count) - 1.0)  # type: ignore[index]
        layer.num_batches_tracked = batches


def _pybn_targets(model: Any, forward: Callable[[Any], Any] | None) -> tuple[list[Any], Callable[[Any], Any]]:
    if isinstance(model, BatchNorm):
        layers: list[Any] = [model]
        run = forward if forward is not None else model
    else:
        try:
            layers = list(model)
        except TypeError:
            raise TypeError(f"model: must be a pybn.nn.BatchNorm, an iterable of pybn.nn layers or a "
                            f"torch.nn.Module, got {type(model).__name__}") from None
        for layer in layers:
            if not isinstance(layer, _Layer):
                raise TypeError(f"model: expected pybn.nn layers, got a {type(layer).__name__}")
        # (without a layer to recalibrate, _recalibrate's ValueError says so, after telling
        # the other processes)
        if forward is None and any(_recalibrated(layer) for layer in layers):
            raise TypeError("forward: is required for a list of layers (a callable that runs them on one batch)")
        run = forward if forward is not None else _no_pass
    if not callable(run):
        raise TypeError(f"forward: must be callable, got {type(run).__name__}")
    unique = list({id(layer): layer for layer in layers if _recalibrated(layer)}.values())  # a layer listed twice once
    return [_PybnTarget(layer) for layer in unique], run


def _no_pass(batch: Any) -> None:
    """The pass of a list without a layer to recalibrate: never run."""


def _recalibrated(layer: Any) -> bool:
    return isinstance(layer, BatchNorm) and layer.track_running_stats


_NOTHING = "model: has no batch norm layer with running statistics to recalibrate"


def _recalibrate(targets: list[Any], batches: Iterable[Any], run: Callable[[Any], Any],
                 comm: Any) -> list[BatchNormStats]:
    shared = _shared(comm)
    own = [target.own_comm() for target in targets]
    comms = [shared] * len(targets) if comm is not None else own
    try:  # (an exchange of the pass's end can fail too, the layers' statistics changed by the pass)
        failed = _run_pass(targets, batches, run, _distinct(c for c in own if c is not None))
        problem = _agree(targets, comms, shared, failed is not None)
        error = failed if failed is not None else problem
        if error is not None:
            raise error
        results = [_merged(target, c) for target, c in zip(targets, comms)]
        for target, (stats, _) in zip(targets, results):
            _check_count(target, stats)
    except BaseException:
        for target in targets:
            target.restore()
        raise
    finally:
        # an exception held by a local would hold this frame through its traceback, and with it
        # the communicators' process group, until a collection; one after torch.distributed's
        # teardown (at exit) aborted the process
        failed = problem = error = None
    for target, (stats, count) in zip(targets, results):
        target.set(stats, count)
    return [stats for stats, _ in results]


def _run_pass(targets: list[Any], batches: Iterable[Any], run: Callable[[Any], Any],
              lockstep: list[Any]) -> BaseException | None:
    """Runs every batch with the targets collecting; returns this process's error, if any
    (raised after the other processes are told). A synchronized layer makes each of its
    forwards a collective, so with such layers (`lockstep`: their communicators) every
    process says before each batch that it has one, and after the last that it has no
    more, or that it failed: the processes run the same batches together, and one with
    fewer batches or an error makes all stop (:func:`_finish_pass`)."""
    failed: BaseException | None = None
    try:
        if not targets:
            raise ValueError(_NOTHING)
        try:
            iterator = iter(batches)
        except TypeError:
            raise TypeError(f"batches: must be an iterable of batches, got {type(batches).__name__}") from None
        for target in targets:
            target.start()
        try:
            for batch in iterator:
                for c in lockstep:
                    _before_batch(c)
                run(batch)
        finally:
            for target in targets:
                target.stop()
    except BaseException as exc:  # noqa: BLE001
        failed = exc
    return _finish_pass(lockstep, failed) if lockstep else failed


# a process's state in the lockstep of the pass: a batch to run, or done (its batches ended,
# it failed, or it stopped because another process did not go on with it)
_HAS_BATCH, _ENDED, _FAILED, _STOPPED = 1.0, 0.0, 2.0, 3.0


class _Stopped(Exception):
    """Another process did not go on to the next batch with this one."""


def _before_batch(comm: Any) -> None:
    rows = _lockstep.exchange(comm, _lockstep.RECALIBRATE_BATCH, [_HAS_BATCH])
    if not (_lockstep.all_of(rows, _lockstep.RECALIBRATE_BATCH) and np.all(rows[:, 2] == _HAS_BATCH)):
        raise _Stopped


def _finish_pass(lockstep: list[Any], failed: BaseException | None) -> BaseException | None:
    """The end of the pass with synchronized layers: this process's state is sent until
    every process has sent one that ends its pass (a process still inside a batch meets it
    at its next control exchange, raises there and sends its own), then all know the
    outcome: None (every process ran out of batches together), or the error to raise."""
    if failed is None:
        mine = _ENDED
    elif isinstance(failed, _Stopped) or (isinstance(failed, _lockstep.OutOfStep) and
                                          _lockstep.RECALIBRATE_BATCH in failed._kinds):
        mine = _STOPPED  # (another process's pass ended while this one was inside a batch)
    else:
        mine = _FAILED
    states: list[float] = []
    for comm in lockstep:
        # two exchanges do: a process inside a batch meets this row at its next control exchange
        # and raises, then sends its own state at the one after (a bound, not a wait)
        for _ in range(4):
            rows = _lockstep.exchange(comm, _lockstep.RECALIBRATE_BATCH, [mine])
            if _lockstep.all_of(rows, _lockstep.RECALIBRATE_BATCH) and np.all(rows[:, 2] != _HAS_BATCH):
                break
        else:
            return _lockstep.OutOfStep("comm: the processes did not end recalibrate's pass together: " +
                                       "; ".join(f"rank {r}: {_lockstep.describe(row)}" for r, row in enumerate(rows)))
        states += list(rows[:, 2])
    if mine == _FAILED:
        return failed
    if _FAILED in states:
        return _failed_elsewhere()
    if _STOPPED in states:
        if _ENDED in states:
            return ValueError("batches: the processes passed different numbers of batches; with a synchronized batch "
                              "norm (whose every training forward is a collective call) every process must pass the "
                              "same number")
        return _lockstep.OutOfStep("comm: the processes made different synchronized calls within a batch (every "
                                   "process's model must call its synchronized layers alike)")
    return None


def _distinct(comms: Iterable[Any]) -> list[Any]:
    """One communicator adapter per process group or MPI communicator."""
    seen: dict[int, Any] = {}
    for c in comms:
        seen.setdefault(id(getattr(c, "group", getattr(c, "comm", None))), c)
    return list(seen.values())


def _shared(comm: Any) -> Any:
    """The adapter of `comm`, which merges every layer, or None."""
    if comm is None:
        return None
    from .distributed import _communicator

    return _communicator(comm)


def _agree(targets: list[Any], comms: list[Any], shared: Any, failed: bool) -> Exception | None:
    """Before any statistics are exchanged, whether every process's pass went through and
    its layers match (the numbers of layers and of channels): fixed-size exchanges that every
    process makes whatever it finds, so that none is left waiting in an exchange the others
    have given up, and all then raise alike (a failed process its own error). With a
    `shared` communicator one exchange says whether all went through (also a process with
    no layer or unusable batches) and how many layers each has, then one per layer its
    channels; else each layer's own communicator (a synchronized layer's group) carries all
    three. The error to raise, or None."""
    if shared is not None:
        rows = _lockstep.agree(shared, _lockstep.RECALIBRATE_AGREE, [failed, len(targets)])
        if np.any(rows[:, 0]):
            return _failed_elsewhere()
        if np.any(rows[:, 1] != len(targets)):
            return _layer_counts_differ(rows[:, 1])
    problem: Exception | None = None
    for target, comm in zip(targets, comms):
        if comm is None:
            continue
        rows = _lockstep.agree(comm, _lockstep.RECALIBRATE_LAYER, [failed, target.channels, len(targets)])
        if np.any(rows[:, 2] != len(targets)):  # (every process sees this at the same exchange)
            return _layer_counts_differ(rows[:, 2])
        if problem is None and np.any(rows[:, 0]):
            problem = _failed_elsewhere()
        elif problem is None and np.any(rows[:, 1] != target.channels):
            problem = ValueError(f"model: the layer {_name(target)} has different numbers of channels on the "
                                 f"processes ({_lockstep.per_rank(rows[:, 1])})")
    return problem


def _layer_counts_differ(counts: np.ndarray) -> ValueError:
    return ValueError(f"model: the processes recalibrate different numbers of batch norm layers "
                      f"({_lockstep.per_rank(counts)})")


def _failed_elsewhere() -> RuntimeError:
    return RuntimeError("batches: the recalibration failed on another process (see its error)")


def _name(target: Any) -> str:
    return str(target.name) if hasattr(target, "name") else repr(target.layer)


def _merged(target: Any, comm: Any) -> tuple[BatchNormStats, int]:
    """The target's statistics merged over the processes of `comm` (all of them merge the
    same rows in rank order, so all get the same bits; _agree made the rows one size), and
    its num_batches_tracked: the batches of every process for a layer merged by `comm=`,
    whose training counts its own process's batches; this process's for a synchronized
    layer, each of whose batches was one batch of all processes (as its training counts)."""
    local, c = target.acc.stats, target.channels
    if comm is None:
        return local, target.acc.batches
    row = np.empty(2 * c + 2)
    row[0], row[1] = float(local.count), target.acc.batches
    row[2:c + 2], row[c + 2:] = local.mean, local.m2
    rows = comm.allgather(row)
    counts = [round(float(v)) for v in rows[:, 0]]  # exact: counts are integers below 2**53
    merged = batch_norm_merge_stats(counts, rows[:, 2:c + 2], rows[:, c + 2:])
    synchronized = target.own_comm() is not None
    return merged, target.acc.batches if synchronized else round(float(rows[:, 1].sum()))


def _check_count(target: Any, stats: BatchNormStats) -> None:
    count = integer(round(float(stats.count)), "count")
    if count < 2:
        raise ValueError(f"batches: the layer {_name(target)} saw "
                         f"{count} value(s) per channel; an unbiased variance needs at least 2")
