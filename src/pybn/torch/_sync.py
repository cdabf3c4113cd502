"""SyncBatchNorm's synchronized training call on CPU tensors, over torch.distributed (gloo).

pybn's split-phase kernels inside an autograd.Function, as :mod:`pybn.distributed` does
for NumPy: the forward all-gathers each process's ``[count, mean (C), m2 (C)]`` (float64)
and merges them exactly (:func:`pybn.batch_norm_merge_stats`); the backward all-reduces
``[sum(dy), sum(dy * xhat)]``. Before each, one control all-gather (:mod:`pybn._lockstep`:
the forward's ``[C, num_features, ok, forwards so far, eps, momentum, ...]``, the backward's
``[C, its forward's number]``) lets every process see whether all can go on, so that an input
one process cannot use, a disagreement on C or a setting, a backward met by a forward, or
modules with different counts of training calls met in one exchange make every process
raise instead of leaving the others waiting in a collective or mixing the statistics of
different modules. (Modules alike in settings and counts cannot be told apart.)
"""
from typing import TYPE_CHECKING, Any, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

import pybn
from pybn import _lockstep
from pybn.batchnorm_split import _update_running_stats
from pybn.distributed import _TorchComm

from ._capture import outside_graph
from ._layout import PYBN_DTYPES, array, batch_norm_last, empty, per_channel

if TYPE_CHECKING:
    from .nn import SyncBatchNorm

_Group = Optional["dist.ProcessGroup"]  # (a name torch.distributed has only where it is available)


def wants_cpu_sync(module: "SyncBatchNorm", input: Tensor) -> bool:
    """A training call on a CPU tensor with more than one process in the module's group."""
    return module.training and input.device.type == "cpu" and synchronizes(module)


def synchronizes(module: Any) -> bool:
    """Whether a synchronized batch norm's group (torch's SyncBatchNorm or pybn.torch's) has
    more than one process: torch.distributed is initialized and this process is one of them
    (outside the group, torch's world size is -1 and the module normalizes alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(_group(module)) > 1


def _group(module: "SyncBatchNorm") -> _Group:
    return module.process_group if module.process_group is not None else dist.group.WORLD


@outside_graph
def sync_batch_norm(module: "SyncBatchNorm", input: Tensor) -> Tensor:
    """The module's synchronized training forward of `input` (this process's slice)."""
    group = _group(module)
    # (an attribute of the instance: pybn's class is also swapped into existing modules)
    forwards = module.__dict__.get("_pybn_sync_forwards", 0)
    _agree(group, input, module, forwards)
    module._pybn_sync_forwards = forwards + 1
    momentum = module._momentum_for_this_call()
    running = (module.running_mean, module.running_var) if module.track_running_stats else (None, None)
    work = input if input.dtype in PYBN_DTYPES else input.float()
    y: Tensor = _SyncBatchNorm.apply(  # type: ignore[no-untyped-call]  # (torch's, unannotated)
        work, module.weight, module.bias, running, momentum, module.eps, group, forwards)
    return y.to(input.dtype)


def _agree(group: _Group, input: Tensor, module: "SyncBatchNorm", forwards: int) -> None:
    """Every process learns whether every process's input is usable, all agree on C, eps
    and momentum (and, for a cumulative average, the batches counted) and all are at the
    same call of the module; if not, all raise the same ValueError (OutOfStep for the calls)."""
    problem = _local_problem(input, module.num_features)
    channels = input.shape[1] if input.dim() >= 2 else -1
    batches = module.num_batches_tracked
    settings = {"eps": module.eps, "momentum": np.nan if module.momentum is None else module.momentum,
                "affine": float(module.affine), "track_running_stats": float(module.track_running_stats),
                "num_batches_tracked": np.nan if module.momentum is not None or batches is None else int(batches)}
    fields = _lockstep.agree(_TorchComm(group), _lockstep.TORCH_FORWARD,
                             [channels, module.num_features, problem is not None, forwards, *settings.values()])
    rows = fields[:, :3].astype(np.int64).tolist()
    if any(r != rows[0] for r in rows) or rows[0][2]:
        per_rank = ", ".join(f"rank {i}: C={c}, num_features={f}{' (unusable input)' if bad else ''}"
                             for i, (c, f, bad) in enumerate(rows))
        raise ValueError(f"input: the processes of the SyncBatchNorm group cannot normalize together ({per_rank})"
                         + (f"; here: {problem}" if problem else ""))
    for j, name in enumerate(settings, start=4):  # (before: each process used its own, silently)
        if _lockstep.differs(fields[:, j]):
            values = ", ".join(f"rank {r}: {_show(name, v)}" for r, v in enumerate(fields[:, j]))
            raise ValueError(f"{name}: differs between the processes of the SyncBatchNorm group ({values}); every "
                             "process's module must be configured alike (with momentum=None, a cumulative average, "
                             "also have counted the same batches)")
    _lockstep.require_same(fields[:, 3], "input: the processes' SyncBatchNorm calls are out of step",
                           "the module's training forwards so far", "; every process must call the same modules in "
                           "the same order")


def _show(setting: str, value: float) -> str:
    if setting in ("momentum", "num_batches_tracked") and np.isnan(value):  # (None; or not counted, not kept)
        return "None"
    if setting in ("affine", "track_running_stats"):
        return str(bool(value))
    return str(int(value)) if setting == "num_batches_tracked" else repr(float(value))


def _local_problem(input: Tensor, num_features: int) -> Optional[str]:
    if input.dim() < 2:
        return f"expected at least 2 dimensions (batch and channels), got shape {tuple(input.shape)}"
    if input.shape[1] != num_features:
        return f"{input.shape[1]} channels, but the layer has num_features={num_features}"
    if not input.is_floating_point():
        return f"dtype {input.dtype} is not a floating-point type"
    return None


class _SyncBatchNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running: Tuple[Optional[Tensor], Optional[Tensor]], momentum: float, eps: float,
                group: _Group, forward_number: int) -> Tensor:
        last = batch_norm_last(x)
        axis = -1 if last else 1
        xa = array(x, last)
        c = x.shape[1]
        local = pybn.batch_norm_stats(xa, axis=axis)
        packed = np.concatenate([[local.count], local.mean, local.m2])
        rows = _TorchComm(group).allgather(packed)  # (processes, 2C + 1)
        stats = pybn.batch_norm_merge_stats(rows[:, 0], rows[:, 1:c + 1], rows[:, c + 1:])
        count = round(float(stats.count))  # exact: counts are integers below 2**53
        if count < 2:  # the same total on every process: all raise alike
            raise ValueError(f"input: training needs more than 1 value per channel over the {rows.shape[0]} "
                             f"processes, got {count} in all (this process's input has shape {tuple(x.shape)})")
        invstd = pybn.batch_norm_invstd(stats, eps)
        y = empty(x, last)
        pybn.batch_norm_apply(xa, stats.mean, invstd, per_channel(weight), per_channel(bias), axis=axis,
                              out=array(y, last))
        _update_running(running, stats, momentum)
        dtype = xa.dtype
        saved_mean, saved_invstd = torch.from_numpy(stats.mean.astype(dtype)), torch.from_numpy(invstd.astype(dtype))
        ctx.save_for_backward(x, weight, saved_mean, saved_invstd)
        ctx.count, ctx.group, ctx.last, ctx.forward_number = count, group, last, forward_number
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        last = ctx.last
        axis = -1 if last else 1
        dya, xa, m, s = array(dy.to(x.dtype), last), array(x, last), mean.numpy(), invstd.numpy()
        local = pybn.batch_norm_backward_reduce(dya, xa, m, s, axis=axis)
        c = x.shape[1]
        # the backward of the same forward of a module of as many channels on every process
        fields = _lockstep.agree(_TorchComm(ctx.group), _lockstep.TORCH_BACKWARD, [c, ctx.forward_number])
        for j, what in enumerate(("channels of the module whose backward runs", "its training forward")):
            _lockstep.require_same(fields[:, j], "input: the processes' SyncBatchNorm backward calls are out of step",
                                   what)
        total = torch.from_numpy(np.concatenate([local.sum_dy, local.sum_dy_xhat]))
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        sums = total.numpy()
        dx = empty(x, last)
        pybn.batch_norm_backward_apply(dya, xa, m, s, sums[:c], sums[c:], ctx.count, per_channel(weight),
                                       axis=axis, out=array(dx, last))
        # this process's share of the parameters' gradients, as torch's SyncBatchNorm (DDP averages them)
        dweight = torch.from_numpy(local.sum_dy_xhat).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = torch.from_numpy(local.sum_dy).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None, None, None


def _update_running(running: Tuple[Optional[Tensor], Optional[Tensor]], stats: pybn.BatchNormStats,
                    momentum: float) -> None:
    """PyTorch's update, in float64 and rounded once, identical on every process: pybn's
    (the single-process forward's) on float64 copies, written back in the statistics' dtype."""
    if all(stat is None for stat in running):
        return
    with torch.no_grad():
        mean, var = (None if stat is None else stat.detach().to(torch.float64, copy=True).numpy()
                     for stat in running)
        _update_running_stats(mean, var, stats, momentum)
        for stat, new in zip(running, (mean, var)):
            if stat is not None:
                stat.copy_(torch.from_numpy(new))
