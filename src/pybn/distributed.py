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
- backward: one all-reduce (sum) of ``[sum(dy), sum(dy * xhat), failed]`` (2C+1 float64)
  gives the whole batch's sums, hence dx, and ``grad_bias`` / ``grad_weight`` of the whole
  batch, identical on every worker.

Evaluation mode uses the running statistics and communicates nothing.

Misconfiguration fails on every worker, never in the transport: the first training forward
of a layer on a communicator all-gathers a fixed-size description of the layer
(num_features, dtype, axis, eps, momentum, affine, track_running_stats), so a layer built
differently on one worker is a ValueError naming the setting on all of them, before the
first exchange whose size depends on num_features. A worker whose input (x, or dy) is
rejected still takes part in the exchange, marked as failed, so every worker raises at once
instead of waiting for the engine's timeout.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .batchnorm_split import (_update_running_stats, batch_norm_apply, batch_norm_backward_apply,
                              batch_norm_backward_reduce, batch_norm_invstd, batch_norm_merge_stats, batch_norm_stats)
from . import _C
from ._checks import in_place, written_apart
from .nn import BatchNorm
from .nn._layer import _check_dy

__all__ = ["SyncBatchNorm"]

# the layer's settings every worker must share, in the order of the all-gathered description
_CONFIG = ("num_features", "dtype", "axis", "eps", "momentum", "affine", "track_running_stats")
_CONFIG_TAG = 20240601.0  # first entry of the description: a row from something else is not one

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

    - training forward: one all-gather of ``2C + 1`` numbers (count, mean, m2) per worker,
      merged exactly with Chan's formula, as PyTorch's ``SyncBatchNorm`` all-gathers
      (mean, invstd, count) (a plain sum of per-worker moments needs a shared shift to be
      exact, and loses precision at large offsets without one);
    - backward of a training forward: one all-reduce (sum) of ``2C + 1`` numbers (the
      sums, and a count of workers whose dy was rejected);
    - evaluation mode: nothing. With ``track_running_stats=False`` an evaluation-mode
      forward normalizes with the worker's own batch, as PyTorch's ``SyncBatchNorm`` does.

    ``grad_weight`` and ``grad_bias`` are the gradients of the whole batch (summed over the
    workers), identical on every worker: update the layer's parameters with them directly
    and do not all-reduce them again. (PyTorch's ``SyncBatchNorm`` leaves each worker's
    own part in ``.grad`` and relies on ``DistributedDataParallel`` to average them.) The
    gradients of other layers (e.g. Linear) must still be summed over the workers.

    If the whole batch has fewer than 2 values per channel the training forward raises
    ``ValueError`` on every worker. So does a layer configured differently on one worker
    (checked once per layer and communicator, at the first training forward: one more
    all-gather of 8 numbers), and an input x or dy that one worker rejects (wrong dtype
    or channel count): that worker raises its own error, the others a ValueError naming
    it; no worker changes its state.

    Only a worker that never reaches the collective (dead, hung, in evaluation mode while
    the others train) leaves the others waiting: with torch.distributed until the process
    group's timeout (``init_process_group(timeout=...)``, then a RuntimeError); MPI has no
    timeout, so they wait until the job is killed (e.g. ``mpirun --timeout``).

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
        # (total count per channel, comm) when the last forward was synchronized, else None
        self._sync: tuple[int, Any] | None = None
        # the communicator whose workers were found to share this layer's configuration
        self._config_checked: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # a copy (pickled, deep-copied) checks the workers' configuration again: it may be
        # loaded into other processes, next to other layers
        state = self.__dict__.copy()
        state["_config_checked"] = None
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

    def _config_row(self) -> np.ndarray:
        momentum = np.nan if self.momentum is None else self.momentum
        dtype = _C.DTYPES.index(self.dtype.name)  # float16 and bfloat16 have one itemsize
        return np.array([_CONFIG_TAG, self.num_features, dtype, self.axis, self.eps, momentum,
                         self.affine, self.track_running_stats], np.float64)

    def _check_config(self, comm: Any) -> None:
        """Once per communicator: every worker's layer has the same settings (a fixed-size
        all-gather, safe whatever they are), so the exchanges that follow have one size."""
        if self._config_checked is comm:
            return
        rows = comm.allgather(self._config_row())  # (W, 1 + len(_CONFIG))
        if not np.all(rows[:, 0] == _CONFIG_TAG):
            raise RuntimeError("comm: a worker sent something else than a SyncBatchNorm configuration: the "
                               "workers' collectives are out of step")
        for j, name in enumerate(_CONFIG, start=1):
            column = rows[:, j]
            if not np.all((column == column[0]) | (np.isnan(column) & np.isnan(column[0]))):
                raise ValueError(f"{name}: differs between the workers ({_describe(name, column)}); every "
                                 "worker's SyncBatchNorm must be configured alike")
        self._config_checked = comm

    # ---- forward / backward

    def forward(self, x: Any, residual: Any = None, *, relu: bool = False) -> np.ndarray:
        if not self.training:  # evaluation mode: local, no communication
            return super().forward(x, residual, relu=relu)
        comm = self._communicator()
        self._check_config(comm)
        try:
            x = self._check_input(x)
            if residual is not None or relu:
                name = "residual" if residual is not None else "relu"
                raise ValueError(f"{name}: SyncBatchNorm's training forward fuses no residual or ReLU; add and "
                                 "apply them to its output")
        except Exception:
            _join_failed(comm, 2 * self.num_features + 1)  # the others raise too, instead of waiting
            raise
        return self._forward_synchronized(x, comm)

    def _forward_batch_stats(self, x: np.ndarray, residual: np.ndarray | None = None,
                             relu: bool = False) -> np.ndarray:
        # reached in evaluation mode without running statistics only: local, as torch
        y = super()._forward_batch_stats(x, residual, relu)
        self._sync = None
        return y

    def _forward_synchronized(self, x: np.ndarray, comm: Any) -> np.ndarray:
        c = self.num_features
        try:  # everything that can fail on this worker alone, before the collective
            momentum = self._check_running_stats() if self.track_running_stats else None
            local = batch_norm_stats(x, axis=self.axis)
        except Exception:
            _join_failed(comm, 2 * c + 1)
            raise
        packed = np.empty(2 * c + 1)
        packed[0] = local.count
        packed[1:c + 1] = local.mean
        packed[c + 1:] = local.m2
        rows = comm.allgather(packed)  # (W, 2C+1): the one collective of the forward
        _raise_if_failed(rows[:, 0] < 0, "x")
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
        self._sync = (n, comm)
        return y

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

        After a training-mode forward this is a collective (one all-reduce of 2C+1 numbers):
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
        count, comm = self._sync
        c = self.num_features
        sums = np.zeros(2 * c + 1)  # [sum(dy), sum(dy * xhat), workers that failed]
        try:
            dy = _check_dy(dy, x.shape, x.dtype)
            local = batch_norm_backward_reduce(dy, x, mean, invstd, axis=self.axis)
        except Exception:
            sums[2 * c] = 1.0
            comm.allreduce_sum(sums)  # the others raise too, instead of waiting
            raise
        sums[:c], sums[c:2 * c] = local.sum_dy, local.sum_dy_xhat
        total = comm.allreduce_sum(sums)  # the one collective
        if total[2 * c] > 0:
            raise ValueError(f"dy: rejected on {int(total[2 * c])} other worker(s) (see the error there); "
                             "no gradient was computed")
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
        return str(int(v)) if name in ("num_features", "axis") else repr(float(v))
    return ", ".join(f"{show(v)} on worker {r}" for r, v in enumerate(column))


def _join_failed(comm: Any, size: int) -> None:
    """Takes part in the forward's all-gather as a worker whose input was rejected (count -1),
    so that every worker raises instead of waiting for it."""
    row = np.zeros(size)
    row[0] = -1.0
    comm.allgather(row)


def _raise_if_failed(failed: np.ndarray, name: str) -> None:
    workers = np.flatnonzero(failed)
    if workers.size:
        raise ValueError(f"{name}: rejected on worker(s) {', '.join(map(str, workers))} (see the error there); "
                         "no worker changed its state")
