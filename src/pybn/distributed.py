"""Synchronized batch norm across processes: torch.distributed (gloo, CPU) or MPI (mpi4py).

Data-parallel training splits each batch over workers; batch norm must still use the
statistics of the whole batch. :class:`SyncBatchNorm` is a :class:`pybn.nn.BatchNorm`
whose training forward and backward combine the per-worker results of pybn's split-phase
kernels (:func:`pybn.batch_norm_stats`, :func:`pybn.batch_norm_backward_reduce`) with one
collective each, over an existing engine: a ``torch.distributed`` process group or an
``mpi4py.MPI.Comm``. pybn brings no transport of its own; torch and mpi4py are optional
imports, needed only by the engine you use.

The result equals single-process :class:`pybn.nn.BatchNorm` on the concatenation of the
workers' slices (in rank order), for unequal and empty slices alike:

- forward: each worker packs ``[count, mean (C), m2 (C)]`` (float64, 2C+1 numbers) and
  all-gathers it; every worker merges the W rows with Chan's formula
  (:func:`pybn.batch_norm_merge_stats`, exact for any counts, no ``E[x^2] - E[x]^2``
  cancellation), normalizes its slice and updates its running statistics with the merged
  ones, so the running statistics stay identical on every worker;
- backward: one all-reduce (sum) of ``[sum(dy), sum(dy * xhat)]`` (2C float64; a failure
  travels in the control row below) gives the whole batch's sums, hence dx, and
  ``grad_bias`` / ``grad_weight`` of the whole batch, identical on every worker.

Evaluation mode uses the running statistics and communicates nothing.

Misconfiguration and calls out of step fail on every worker, never in the transport: each
synchronized forward and backward first all-gathers a fixed-size control row
(:mod:`pybn._lockstep`) with the layer's description (num_features, dtype, axis, eps,
momentum, affine, track_running_stats; with ``momentum=None``, a cumulative average, also
num_batches_tracked), the count of its synchronized forwards so far, and
whether this worker's input was usable. A layer built differently on one worker (or another
layer of other settings called there) is a ValueError naming the setting on all of them; a
worker whose input (x, or dy) is rejected raises its error and the others a ValueError
naming it; workers at different kinds of call, or at layers with different counts of
forwards, all raise :class:`OutOfStep`; in each case before the exchange whose size depends
on num_features, and no worker changes its state. Two layers alike in every setting and
count (the layers of one model, trained every step) cannot be told apart: called in
another order on one worker, their statistics are merged with each other's.
"""
from __future__ import annotations

import pickle

import sys
from typing import Any

import numpy as np

from .batchnorm_split import (_update_running_stats, batch_norm_apply, batch_norm_backward_apply,
                              batch_norm_backward_reduce, batch_norm_invstd, batch_norm_merge_stats, batch_norm_stats)
from . import _C, _lockstep
from ._checks import in_place, per_channel, written_apart
from ._lockstep import OutOfStep
from .nn import BatchNorm
from .nn._layer import _check_dy

__all__ = ["SyncBatchNorm", "OutOfStep"]

# what every worker's layer must share, in the order of the control row's fields; the
# batches counted matter to a cumulative average only (momentum=None: NaN otherwise)
_CONFIG = ("num_features", "dtype", "axis", "eps", "momentum", "affine", "track_running_stats",
           "num_batches_tracked")

_INIT_HINT = ('call torch.distributed.init_process_group("gloo", init_method=..., rank=..., '
              'world_size=...) in every worker before the first training forward, or pass an '
              'explicit comm (a torch.distributed process group or an mpi4py.MPI.Comm)')


# --------------------------------------------------------------------------- communicators

class _TorchComm:
    """Collectives over a torch.distributed process group (None: the default group)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def _dist(self) -> Any:
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("comm: this torch build has no torch.distributed support")
        if not dist.is_initialized():
            raise RuntimeError(f"comm: torch.distributed is not initialized: {_INIT_HINT}")
        return dist

    def allgather(self, a: np.ndarray) -> np.ndarray:
        import torch

        dist = self._dist()
        t = torch.from_numpy(np.array(a, np.float64))  # a fresh, writable float64 copy
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, t, group=self.group)
        return torch.stack(parts).numpy()

    def allreduce_sum(self, a: np.ndarray) -> np.ndarray:
        import torch

        dist = self._dist()
        t = torch.from_numpy(np.array(a, np.float64))
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.numpy()


class _MPIComm:
    """Collectives over an mpi4py intracommunicator (float64 buffers, no pickling)."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm

    def allgather(self, a: np.ndarray) -> np.ndarray:
        from mpi4py import MPI

        a = np.ascontiguousarray(a, np.float64)
        out = np.empty((self.comm.Get_size(),) + a.shape, np.float64)
        self.comm.Allgather([a, MPI.DOUBLE], [out, MPI.DOUBLE])
        return out

    def allreduce_sum(self, a: np.ndarray) -> np.ndarray:
        from mpi4py import MPI

        a = np.ascontiguousarray(a, np.float64)
        out = np.empty_like(a)
        self.comm.Allreduce([a, MPI.DOUBLE], [out, MPI.DOUBLE], op=MPI.SUM)
        return out


def _communicator(comm: Any) -> _TorchComm | _MPIComm:
    """The adapter for `comm`, told apart by the module of its type (so neither torch nor
    mpi4py is imported unless the caller already uses it)."""
    if comm is None:
        try:
            import torch.distributed  # noqa: F401
        except ImportError as e:
            raise ImportError("comm: None means the default torch.distributed process group, but torch "
                              "is not installed (pip install 'pybn-kernels[torch]'); or pass an mpi4py.MPI.Comm "
                              "(pip install mpi4py)") from e
        return _TorchComm(None)
    module = type(comm).__module__ or ""
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is not None and isinstance(comm, int) and comm == torch_dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("comm: this process is not a member of the process group (new_group returned "
                         "GroupMember.NON_GROUP_MEMBER): only its members may use the layer")
    if module.split(".")[0] == "torch":
        import torch.distributed as dist

        if isinstance(comm, dist.ProcessGroup):
            return _TorchComm(comm)
    elif module.split(".")[0] == "mpi4py":
        from mpi4py import MPI

        if isinstance(comm, MPI.Comm):
            if comm == MPI.COMM_NULL:
                raise ValueError("comm: MPI.COMM_NULL has no processes to synchronize with")
            if comm.Is_inter():
                raise TypeError("comm: an MPI intercommunicator is not supported (use an intracommunicator, "
                                "e.g. MPI.COMM_WORLD or comm.Split(...))")
            return _MPIComm(comm)
    raise TypeError(f"comm: expected None (the default torch.distributed group), a "
                    f"torch.distributed ProcessGroup or an mpi4py.MPI.Comm, got {type(comm).__module__}."
                    f"{type(comm).__qualname__}")


# --------------------------------------------------------------------------- SyncBatchNorm

def _check_picklable(comm: Any) -> None:
    """A TypeError naming `comm` when the communicator cannot be pickled (a torch process
    group, a duplicated mpi4py communicator: a live connection to the other workers), whose
    own error ("cannot pickle 'ProcessGroup' object") named nothing of the layer's. mpi4py
    pickles its predefined communicators (COMM_WORLD) by name: those pass."""
    if comm is None:
        return
    try:
        pickle.dumps(comm)
    except Exception as e:  # (whatever the transport raises)
        raise TypeError(f"comm: a SyncBatchNorm built with this communicator ({type(comm).__name__}) cannot be "
                        "pickled or deep-copied (the communicator cannot: a live connection to the other workers); "
                        "copy its state_dict() into a new layer instead") from e


class SyncBatchNorm(BatchNorm):
    """:class:`pybn.nn.BatchNorm` with the statistics of the batch over every worker.

    Each worker calls the layer on its own slice of the batch (any size, empty included);
    the outputs, the input gradients, ``grad_weight`` / ``grad_bias`` and the running
    statistics equal those of one :class:`~pybn.nn.BatchNorm` on the concatenated batch
    (PyTorch's ``SyncBatchNorm``). Every worker must call each training forward and
    backward the same number of times, in the same order (the calls are collectives).

    Parameters
    ----------
    num_features : int
        Number of channels C.
    comm : optional
        Whom to synchronize with: None (default) is torch.distributed's default process
        group, which must be initialized before the first training forward (e.g.
        ``torch.distributed.init_process_group("gloo", ...)`` on CPU); a
        ``torch.distributed`` ``ProcessGroup`` (e.g. from ``new_group``); or an
        ``mpi4py.MPI.Comm`` intracommunicator (e.g. ``MPI.COMM_WORLD``).
    **kwargs
        The keywords of :class:`pybn.nn.BatchNorm`: ``axis``, ``eps``, ``momentum``
        (None: cumulative average), ``affine``, ``track_running_stats``, ``dtype``.

    Notes
    -----
    Communication, per call and per worker (float64 numbers):

    - training forward: one all-gather of a 16-number control row (the layer's settings,
      the count of its synchronized forwards, whether the input is usable), then one of
      ``2C + 1`` numbers (count, mean, m2) per worker, merged exactly with Chan's formula,
      as PyTorch's ``SyncBatchNorm`` all-gathers (mean, invstd, count) (a plain sum of
      per-worker moments needs a shared shift to be exact, and loses precision at large
      offsets without one);
    - backward of a training forward: one control all-gather, then one all-reduce (sum)
      of ``2C`` numbers (the sums);
    - evaluation mode: nothing. With ``track_running_stats=False`` an evaluation-mode
      forward normalizes with the worker's own batch, as PyTorch's ``SyncBatchNorm`` does.

    ``grad_weight`` and ``grad_bias`` are the gradients of the whole batch (summed over the
    workers), identical on every worker: update the layer's parameters with them directly
    and do not all-reduce them again. (PyTorch's ``SyncBatchNorm`` leaves each worker's
    own part in ``.grad`` and relies on ``DistributedDataParallel`` to average them.) The
    gradients of other layers (e.g. Linear) must still be summed over the workers.

    If the whole batch has fewer than 2 values per channel the training forward raises
    ``ValueError`` on every worker. So does a layer configured differently on one worker,
    and an input x or dy that one worker rejects (wrong dtype or channel count): that
    worker raises its own error, the others a ValueError naming it. A worker calling
    another layer than the others (layers called in another order) makes all raise when
    the layers differ: a ValueError if in a setting, :class:`OutOfStep` (a RuntimeError) if
    in their counts of training forwards so far; so do workers at different kinds of call
    (a forward here, a backward there). In every case no worker changes its state. Layers
    alike in every setting and count (those of one model, trained every step) cannot be
    told apart: swapped on one worker, each merges the other's statistics.

    The exchanges are matched by their order, as every collective's: what cannot be told
    apart is a worker one whole step behind. One that runs a step in evaluation mode while
    the others train makes no exchange then: the others' training call is answered by its
    next training call, a step later, with no error, and the steps stay shifted (as with
    PyTorch's ``SyncBatchNorm``). Every worker must make the same training calls; a worker
    that never reaches the collective (dead, hung, evaluating from then on) leaves the
    others waiting: with torch.distributed until the process group's timeout
    (``init_process_group(timeout=...)``, then a RuntimeError); MPI has no timeout, so
    they wait until the job is killed (e.g. ``mpirun --timeout``).

    Examples
    --------
    >>> import torch.distributed as dist
    >>> dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29500",
    ...                         rank=rank, world_size=world)
    >>> bn = SyncBatchNorm(64)           # or SyncBatchNorm(64, comm=MPI.COMM_WORLD)
    >>> y = bn(x_local)                  # statistics of the whole batch
    >>> dx = bn.backward(dy_local)
    >>> bn.weight -= lr * bn.grad_weight # the same update on every worker
    """

    def __init__(self, num_features: int, *, comm: Any = None, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self._comm_arg = comm
        # an explicit comm is checked now; None (torch's default group) at the first use,
        # so the layer may be built before init_process_group
        self._comm = None if comm is None else _communicator(comm)
        # (total count per channel, comm, its number among the synchronized forwards) when
        # the last forward was synchronized, else None
        self._sync: tuple[int, Any, int] | None = None
        # synchronized forwards so far: every worker's layer must be at the same one
        self._forwards = 0

    def __getstate__(self) -> dict[str, Any]:
        # a copy (pickled, deep-copied) is another layer, whose count starts again: a worker
        # that calls it where the others call the original is out of step
        _check_picklable(self._comm_arg)
        state = self.__dict__.copy()
        state["_forwards"] = 0
        state["_sync"] = None
        return state

    @property
    def comm(self) -> Any:
        """The communicator given to the constructor (None: torch's default group)."""
        return self._comm_arg

    def __repr__(self) -> str:
        return super().__repr__().replace("BatchNorm(", "SyncBatchNorm(", 1)[:-1] + f", comm={self._comm_arg!r})"

    @classmethod
    def from_batchnorm(cls, bn: BatchNorm, comm: Any = None) -> SyncBatchNorm:
        """A SyncBatchNorm with `bn`'s configuration, mode and state (copied, not shared).

        Parameters
        ----------
        bn : pybn.nn.BatchNorm
        comm : optional
            As in the constructor.
        """
        if not isinstance(bn, BatchNorm):
            raise TypeError(f"bn: expected a pybn.nn.BatchNorm, got {type(bn).__name__}")
        layer = cls(bn.num_features, comm=comm, axis=bn.axis, eps=bn.eps, momentum=bn.momentum,
                    affine=bn.affine, track_running_stats=bn.track_running_stats, dtype=bn.dtype)
        layer.load_state_dict(bn.state_dict())
        return layer.train(bn.training)

    def _communicator(self) -> _TorchComm | _MPIComm:
        if self._comm is None:
            self._comm = _communicator(None)
        return self._comm

    # ---- the configuration every worker shares

    def _config_row(self) -> list[float]:
        momentum = np.nan if self.momentum is None else self.momentum
        dtype = _C.DTYPES.index(self.dtype.name)  # float16 and bfloat16 have one itemsize
        batches = np.nan if self.momentum is not None or self.num_batches_tracked is None else self.num_batches_tracked
        return [self.num_features, dtype, self.axis, self.eps, momentum, self.affine, self.track_running_stats,
                batches]

    def _check_config(self, fields: np.ndarray) -> None:
        """Every worker's layer has the same settings (the first fields of the control rows)."""
        for j, name in enumerate(_CONFIG):
            if _lockstep.differs(fields[:, j]):
                raise ValueError(f"{name}: differs between the workers ({_describe(name, fields[:, j])}); every "
                                 "worker's SyncBatchNorm must be configured alike (with momentum=None, a cumulative "
                                 "average, also have counted the same batches), and the layers called in the same "
                                 "order")

    # ---- forward / backward

    def forward(self, x: Any, residual: Any = None, *, relu: bool = False) -> np.ndarray:
        if not self.training:  # evaluation mode: local, no communication
            return super().forward(x, residual, relu=relu)
        comm = self._communicator()
        problem: Exception | None = None
        try:  # everything that can fail on this worker alone, before the collectives
            x = self._check_input(x)
            if residual is not None or relu:
                name = "residual" if residual is not None else "relu"
                raise ValueError(f"{name}: SyncBatchNorm's training forward fuses no residual or ReLU; add and "
                                 "apply them to its output")
            momentum = self._check_running_stats() if self.track_running_stats else None
            self._check_affine()  # (as batch_norm_apply will, after the exchange)
            local = batch_norm_stats(x, axis=self.axis)
        except Exception as e:  # noqa: BLE001  (raised after the other workers are told)
            problem = e
        config = self._config_row()
        fields = _lockstep.agree(comm, _lockstep.FORWARD, [*config, self._forwards, problem is not None])
        self._check_config(fields)
        _in_step(fields[:, len(config)], "the layer's training forwards so far")
        if problem is not None:
            raise problem
        _raise_if_failed(fields[:, len(config) + 1], "x")
        self._forwards += 1
        return self._forward_synchronized(x, local, momentum, comm)

    def _forward_batch_stats(self, x: np.ndarray, residual: np.ndarray | None = None,
                             relu: bool = False) -> np.ndarray:
        # reached in evaluation mode without running statistics only: local, as torch
        y = super()._forward_batch_stats(x, residual, relu)
        self._sync = None
        return y

    def _forward_synchronized(self, x: np.ndarray, local: Any, momentum: float | None, comm: Any) -> np.ndarray:
        c = self.num_features
        packed = np.empty(2 * c + 1)
        packed[0] = local.count
        packed[1:c + 1] = local.mean
        packed[c + 1:] = local.m2
        rows = comm.allgather(packed)  # (W, 2C+1): the forward's exchange of statistics
        stats = batch_norm_merge_stats(rows[:, 0], rows[:, 1:c + 1], rows[:, c + 1:])
        n = round(float(stats.count))  # exact: counts are integers below 2**53
        if n < 2:  # the same total on every worker: all raise alike
            raise ValueError(f"x: training needs more than 1 value per channel over all {rows.shape[0]} "
                             f"workers, got {n} in all (this worker's x has shape {x.shape}, "
                             f"channel axis {self.axis})")
        invstd = batch_norm_invstd(stats, self.eps)
        y = batch_norm_apply(x, stats.mean, invstd, self.weight, self.bias, axis=self.axis)
        if momentum is not None:  # (tracking running statistics)
            # counted before the update, as BatchNorm counts before its kernel
            assert self.num_batches_tracked is not None  # (tracking running statistics)
            self.num_batches_tracked += 1
            _update_running_stats(self.running_mean, self.running_var, stats, momentum)
        # saved in the parameters' dtype, as the single-process forward saves them
        self._saved = (x, stats.mean.astype(self.param_dtype), invstd.astype(self.param_dtype), True)
        self._sync = (n, comm, self._forwards)
        return y

    def _check_affine(self) -> None:
        """weight and bias are usable (the user may have rebound them since the last call)."""
        for name in ("weight", "bias"):
            per_channel(getattr(self, name), name, self.num_features, self.param_dtype)

    def _check_running_stats(self) -> float:
        """The running statistics can be updated as batch_norm_train would (it checks them
        for the single-process layer); returns the momentum of this batch."""
        c = self.num_features
        rm = in_place(self.running_mean, "running_mean", c, self.param_dtype)
        rv = in_place(self.running_var, "running_var", c, self.param_dtype)
        written_apart((("running_mean", rm), ("running_var", rv)), (("weight", self.weight), ("bias", self.bias)))
        return self._momentum_for_next_batch()

    def _forward_running_stats(self, x: np.ndarray, residual: np.ndarray | None = None,
                               relu: bool = False) -> np.ndarray:
        y = super()._forward_running_stats(x, residual, relu)
        self._sync = None
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """Gradient of the most recent forward; sets `grad_weight` and `grad_bias`.

        After a training-mode forward this is a collective (a control all-gather, then one
        all-reduce of 2C numbers):
        dx is this worker's slice of the whole batch's input gradient, and `grad_weight`
        / `grad_bias` are the whole batch's (identical on every worker). Otherwise it is
        :meth:`pybn.nn.BatchNorm.backward`, without communication.

        Parameters
        ----------
        dy : array_like
            This worker's slice of the gradient of the loss with respect to the output.

        Returns
        -------
        ndarray
            dx, this worker's slice.
        """
        if self._sync is None:
            grads: np.ndarray = super().backward(dy)  # a forward without a residual: dx
            return grads
        x, mean, invstd, _ = self._saved_or_raise(self._saved)
        count, comm, forward = self._sync
        c = self.num_features
        problem: Exception | None = None
        try:
            dy = _check_dy(dy, x.shape, x.dtype)
            self._check_affine()  # (as batch_norm_backward_apply will, after the exchange)
            local = batch_norm_backward_reduce(dy, x, mean, invstd, axis=self.axis)
        except Exception as e:  # noqa: BLE001  (raised after the other workers are told)
            problem = e
        fields = _lockstep.agree(comm, _lockstep.BACKWARD, [c, forward, problem is not None])
        _in_step(fields[:, 0], "the channels of the layer whose backward is called")
        _in_step(fields[:, 1], "the training forward the backward belongs to")
        if problem is not None:
            raise problem
        _raise_if_failed(fields[:, 2], "dy")
        total = comm.allreduce_sum(np.concatenate([local.sum_dy, local.sum_dy_xhat]))  # the backward's exchange
        sum_dy, sum_dy_xhat = total[:c], total[c:2 * c]
        dx: np.ndarray = batch_norm_backward_apply(dy, x, mean, invstd, sum_dy, sum_dy_xhat, count, self.weight,
                                                   axis=self.axis)
        if self.affine:
            self.grad_weight = sum_dy_xhat.astype(self.param_dtype)
            self.grad_bias = sum_dy.astype(self.param_dtype)
        return dx


def _describe(name: str, column: np.ndarray) -> str:
    """A setting's value per worker, for the message of a mismatch."""
    def show(v: float) -> str:
        if name == "dtype":
            return _C.DTYPES[int(v)]
        if name == "momentum" and np.isnan(v):
            return "None"
        if name in ("affine", "track_running_stats"):
            return str(bool(v))
        return str(int(v)) if name in ("num_features", "axis", "num_batches_tracked") else repr(float(v))
    return ", ".join(f"{show(v)} on worker {r}" for r, v in enumerate(column))


def _in_step(counts: np.ndarray, what: str) -> None:
    """The workers' values of a control field that must agree (a count of calls, or the
    channels of the layer a backward belongs to); else OutOfStep on every worker."""
    _lockstep.require_same(counts, "comm: the workers' SyncBatchNorm calls are out of step", what,
                           "; every worker must make each layer's training forward and backward calls in the same "
                           "order (none skipped, e.g. in evaluation mode)")


def _raise_if_failed(failed: np.ndarray, name: str) -> None:
    workers = np.flatnonzero(failed)
    if workers.size:
        raise ValueError(f"{name}: rejected on worker(s) {', '.join(map(str, workers))} (see the error there); "
                         "no worker changed its state")
