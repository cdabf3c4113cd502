"""The torch side of :func:`pybn.recalibrate`: forward hooks on a model's batch norm modules."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm_split import BatchNormStats, batch_norm_stats
from .recalibrate import _Accumulator


def _input_stats(x: torch.Tensor) -> BatchNormStats:
    """(count, mean, m2) per channel (dim 1) of a tensor, in float64, without a copy for a
    contiguous or channels-last CPU tensor of a dtype pybn takes."""
    from .torch._layout import array, channels_last_physical, pybn_takes

    x = x.detach()
    if x.dim() < 2:
        raise ValueError(f"x: a batch norm input needs at least 2 dimensions, got shape {tuple(x.shape)}")
    if not pybn_takes(x):
        x = x.to("cpu", torch.float64 if x.dtype == torch.float64 else torch.float32)
    last = channels_last_physical(x)
    return batch_norm_stats(array(x, last), axis=-1 if last else 1)


class _TorchTarget:
    """One torch batch norm module under recalibration."""

    def __init__(self, name: str, module: _BatchNorm) -> None:
        self.name, self.layer = name or "model", module
        self.channels = module.num_features
        self.acc = _Accumulator(self.channels)
        self.saved = (module.training, module.running_mean.clone(), module.running_var.clone(),  # type: ignore[union-attr]
                      None if module.num_batches_tracked is None else module.num_batches_tracked.clone())
        self.hook: Any = None

    def start(self) -> None:
        def collect(module: Any, inputs: tuple[Any, ...], output: Any) -> None:
            self.acc.add(_input_stats(inputs[0]))

        self.hook = self.layer.register_forward_hook(collect)
        self.layer.train()

    def stop(self) -> None:
        if self.hook is not None:
            self.hook.remove()
        self.layer.train(self.saved[0])

    def restore(self) -> None:
        _, mean, var, count = self.saved
        with torch.no_grad():
            self.layer.running_mean.copy_(mean)  # type: ignore[union-attr]
            self.layer.running_var.copy_(var)  # type: ignore[union-attr]
            if count is not None:
                self.layer.num_batches_tracked.copy_(count)  # type: ignore[union-attr]

    def own_comm(self) -> Any:
        """The module's process group for a synchronized module (torch's or pybn.torch's
        SyncBatchNorm, which have a ``process_group``) when it synchronizes in training
        (torch.distributed initialized, this process one of more than one in the group); else
        None (local statistics, as it trains)."""
        from .torch._sync import synchronizes

        if not hasattr(self.layer, "process_group") or not synchronizes(self.layer):
            return None
        from .distributed import _TorchComm

        return _TorchComm(self.layer.process_group)

    def set(self, stats: BatchNormStats, batches: int) -> None:
        var = stats.m2 / (float(stats.count) - 1.0)
        with torch.no_grad():
            self.layer.running_mean.copy_(torch.from_numpy(np.asarray(stats.mean)))  # type: ignore[union-attr]
            self.layer.running_var.copy_(torch.from_numpy(np.asarray(var)))  # type: ignore[union-attr]
            if self.layer.num_batches_tracked is not None:
                self.layer.num_batches_tracked.fill_(batches)


def torch_targets(model: torch.nn.Module, forward: Callable[[Any], Any] | None
                  ) -> tuple[list[_TorchTarget], Callable[[Any], Any]]:
    if forward is not None and not callable(forward):
        raise TypeError(f"forward: must be callable, got {type(forward).__name__}")
    targets = [_TorchTarget(name, m) for name, m in model.named_modules()
               if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]

    def run(batch: Any) -> Any:
        with torch.no_grad():
            if forward is not None:
                return forward(batch)
            return model(batch[0] if isinstance(batch, (list, tuple)) else batch)

    return targets, run
