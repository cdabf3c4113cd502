"""Drop-in replacements for torch.nn's batch norm and dropout modules, on pybn's kernels.

Each class subclasses its torch counterpart (named by its ``drop_in_for``; SyncBatchNorm
subclasses torch's ``_BatchNorm``) and changes only ``forward``: the constructor
arguments, parameters, buffers, ``state_dict`` keys (``num_batches_tracked`` included),
``momentum=None``, ``affine=False``, ``track_running_stats=False`` and train/eval are
torch's, so checkpoints load either way. CPU tensors of float32 and float64 run pybn's
kernels through ``torch.ops.pybn`` (:mod:`pybn.torch.ops`); batch norm on other devices
and dtypes runs torch's kernels through the same operators, and dropout on other devices
runs torch's own ``F.dropout*``.

Dropout masks: in training mode each call draws a fresh seed from torch's default CPU
generator (so ``torch.manual_seed`` reproduces a run) and uses offset 0: the mask is
``pybn.dropout_mask(shape, p, seed=seed, offset=0)`` over x's elements in memory order
(``shape`` is x's for a contiguous x, ``x.movedim(1, -1)``'s for a channels-last one), or
over ``(N, C)`` for the channel-wise Dropout1d/2d/3d in either layout. Built with
``seed=...``, a module instead keeps its own Philox stream: the first call uses
``(seed, 0)`` and every training call advances ``offset`` by ``pybn.counters_used(n)``, n
the mask's element count, with no draw from torch's generator. Kept values are scaled by
``pybn``'s dropout scale. ``p = 0`` returns the input itself (torch's behaviour): nothing
drawn, no offset advanced.
"""
import math
from typing import TYPE_CHECKING, Any, Callable, List, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .._checks import flag, scalar_value
from . import ops as _ops
from . import residual as _residual
from . import _transforms
from ._capture import exporting_onnx, leaf, outside_graph, prepare_scriptable
from .seeded import PinnedSeed, mask_counters

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "Dropout", "Dropout1d", "Dropout2d",
           "Dropout3d", "batch_norm", "batch_norm_add_relu", "dropout"]


# --------------------------------------------------------------------------- batch norm

def _check_arguments(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     training: bool, eps: float) -> None:
    flag(training, "training")
    # torch's rule for eps (F.batch_norm): a constant channel's variance is 0 in training
    if training and not eps > 0:
        raise ValueError(f"eps: must be > 0 in training (a constant channel's variance is 0), got {eps}")
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    if training:  # (an empty input is torch's: no statistics, an empty output)
        channels = input.shape[1] if input.dim() >= 2 else 1
        if channels and input.numel() // channels == 1:
            raise ValueError(f"input: training needs more than 1 value per channel, got input of shape "
                             f"{tuple(input.shape)}")
    elif running_mean is None or running_var is None:
        raise ValueError("running_mean: running_mean and running_var are required when training=False")


def _empty_batch(input: Tensor, training: bool) -> bool:
    """Whether a call with batch statistics has an input without elements, which torch's
    function answers with an empty output (with running statistics pybn's kernels take it).
    Not asked of torch.fx's proxies nor while torch.jit traces (sizes are recorded values
    there); under torch.compile a size known only at run time counts as not empty (a guard
    on it would fail the compilation): pybn's operator then refuses an empty batch."""
    if not training or not isinstance(input, Tensor) or torch._C._get_tracing_state() is not None:
        return False
    if not torch.compiler.is_compiling():
        return input.numel() == 0
    # (imported here: symbolic_shapes loads dynamo and sympy, a second at import, which
    # torch.compile has loaded already; guard_or_false is torch >= 2.7's, before which a size
    # known only at run time fails the compilation)
    try:
        from torch.fx.experimental.symbolic_shapes import guard_or_false
    except ImportError:  # pragma: no cover - older torch
        return bool(input.numel() == 0)
    return guard_or_false(input.numel() == 0)


def _torch_functions_run(input: Tensor, training: bool) -> bool:
    """Whether batch norm runs torch's own functions (:func:`_torch_tail`): under a torch.func
    transform or forward-mode AD, on an empty batch, and while torch.onnx.export captures the
    call (ONNX has no pybn operators; torch's export as BatchNormalization)."""
    return _transforms.active() or _transforms.dual_level() or _empty_batch(input, training) or exporting_onnx()


def _torch_tail(input: Tensor, residual: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                momentum: float, eps: float, relu: bool) -> Tensor:
    """relu(bn(input) + residual) in torch's functions: what batch norm runs under a
    torch.func transform, whose rules (running statistics under vmap, forward mode) are
    torch's to keep (pybn/torch/_transforms.py), on an empty input, where torch's
    function returns an empty output and leaves the running statistics alone, and in an
    ONNX export."""
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    y = y if residual is None else y + residual
    return torch.relu(y) if relu else y


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.batch_norm`` on pybn's kernels (same arguments, same result)."""
    _check_arguments(input, running_mean, running_var, training, eps)
    if _torch_functions_run(input, training):
        return _torch_tail(input, None, running_mean, running_var, weight, bias, training, momentum, eps, False)
    if training:
        y: Tensor = _ops.batch_norm_train_call(input, weight, bias, running_mean, running_var, momentum, eps)[0]
        return y
    assert running_mean is not None and running_var is not None  # (checked above)
    return _ops.batch_norm_infer_call(input, running_mean, running_var, weight, bias, eps)


def batch_norm_add_relu(input: Tensor, residual: Optional[Tensor], running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                        training: bool = False, momentum: float = 0.1, eps: float = 1e-5, relu: bool = True) -> Tensor:
    """A ResNet block's tail in one pass: ``relu(F.batch_norm(input, ...) + residual)`` (without
    the relu for ``relu=False``; without the add for ``residual=None``). Arguments as
    :func:`batch_norm`'s; autograd gives the gradients of input, weight, bias and residual."""
    _check_arguments(input, running_mean, running_var, training, eps)
    if _torch_functions_run(input, training):
        return _torch_tail(input, residual, running_mean, running_var, weight, bias, training, momentum, eps, relu)
    y: Tensor = _residual.batch_norm_add_relu_call(input, residual, weight, bias, running_mean, running_var,
                                                   training, momentum, eps, relu)[0]
    return y


# The mixins below are used before a torch class (class BatchNorm2d(_BatchNormForward,
# nn.BatchNorm2d)) and use its attributes; the type checker sees that class as their base.
if TYPE_CHECKING:
    _BatchNormBase = _BatchNorm
    _DropoutBase = _DropoutNd
else:
    _BatchNormBase = _DropoutBase = object


class _BatchNormForward(_BatchNormBase):
    """The forward shared by the batch norm classes: torch's rules for momentum, the
    running statistics and num_batches_tracked, with pybn's operators."""

    __prepare_scriptable__ = prepare_scriptable  # torch.jit.script: a TypeError saying what to script instead

    @leaf
    def forward(self, input: Tensor, residual: Optional[Tensor] = None, *, relu: bool = False) -> Tensor:
        """torch's forward; with `residual` and/or ``relu=True``, ``relu(bn(input) + residual)``
        in the same pass (:func:`batch_norm_add_relu`)."""
        if self.momentum is None and self.training and torch.compiler.is_compiling():
            # a cumulative average's momentum is another float every step, on which compiled
            # code guards (a new graph per step): the layer runs eagerly, as torch's own ends up
            y: Tensor = _run_eagerly(self._forward, input, residual, relu)
            return y
        return self._forward(input, residual, relu)

    def _forward(self, input: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
        self._check_input_dim(input)  # type: ignore[no-untyped-call]  # (torch's, unannotated)
        # (named here: the user gave neither weight nor statistics; without either, torch takes
        # any channel count; not while torch.jit traces, where sizes are recorded values)
        if (self.affine or self.running_mean is not None) and \
                torch._C._get_tracing_state() is None and input.shape[1] != self.num_features:
            raise ValueError(f"input: has {input.shape[1]} channels (dim 1) but the module was built with "
                             f"num_features={self.num_features}")
        momentum = self._momentum_for_this_call()
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # in eval mode with track_running_stats=False the batch's own statistics are used and
        # nothing is updated; in training without running statistics nothing is updated either
        keep = not self.training or self.track_running_stats
        stats = (self.running_mean if keep else None, self.running_var if keep else None)
        eps = scalar_value(self.eps)
        if residual is None and not relu:
            return batch_norm(input, *stats, self.weight, self.bias, batch_stats, momentum, eps)
        return batch_norm_add_relu(input, residual, *stats, self.weight, self.bias, batch_stats, momentum, eps, relu)

    def _momentum_for_this_call(self) -> float:
        momentum = 0.0 if self.momentum is None else scalar_value(self.momentum)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        return momentum


@outside_graph
def _run_eagerly(forward: Callable[..., Tensor], *args: Any) -> Tensor:
    """forward(*args) outside the compiled graph (the module's hooks ran already)."""
    return forward(*args)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on pybn's kernels: (N, C) or (N, C, L) input."""

    drop_in_for = nn.BatchNorm1d


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on pybn's kernels: (N, C, H, W), contiguous or channels_last."""

    drop_in_for = nn.BatchNorm2d


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on pybn's kernels: (N, C, D, H, W), contiguous or channels_last_3d."""

    drop_in_for = nn.BatchNorm3d


class SyncBatchNorm(_BatchNormForward, _BatchNorm):
    """``torch.nn.SyncBatchNorm`` that also works on CPU tensors (gloo), on pybn's kernels.

    Same constructor (``process_group=None``: the default group) and state_dict as
    torch's. In training mode, with ``torch.distributed`` initialized and more than one
    process in the group, CPU inputs are normalized with the statistics of the whole
    batch over the group: per call, the forward all-gathers each process's channel count
    (checked: if the processes disagree on C, or one got an unusable input, every
    process raises ValueError instead of waiting) and its 2C+1 float64 statistics
    (count, mean, m2), merged exactly; the backward all-reduces 2C float64 sums. Outputs,
    input gradients and running statistics equal one BatchNorm on the concatenated batch;
    ``weight.grad`` / ``bias.grad`` hold this process's share, as with torch's
    SyncBatchNorm, and ``DistributedDataParallel`` averages them. Tensors on other devices
    go to torch's SyncBatchNorm code; otherwise this is BatchNorm on the local batch.
    ``torch.compile`` runs the synchronized call outside the graph (a graph break).

    It is not a subclass of ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses
    those on the CPU.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device: Any = None, dtype: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **kwargs)
        self.process_group = process_group

    drop_in_for = nn.SyncBatchNorm
    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    @leaf
    def forward(self, input: Tensor, residual: Optional[Tensor] = None, *, relu: bool = False) -> Tensor:
        from . import _sync

        if _sync.wants_cpu_sync(self, input):
            # the input is checked on every process together, so that none is left waiting
            y = _sync.sync_batch_norm(self, input)
        elif input.device.type != "cpu" and self.training:
            y = nn.SyncBatchNorm.forward(self, input)  # type: ignore[arg-type]  # its code, on this module
        else:
            return _BatchNormForward.forward(self, input, residual, relu=relu)
        # synchronized statistics: the block's tail after the normalization, unfused
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Every BatchNorm1d/2d/3d (torch's or pybn's) and torch SyncBatchNorm in `module`
        becomes a pybn SyncBatchNorm sharing its parameters and buffers (its class changed in
        place, :func:`pybn.torch.convert_sync_batchnorm`); returns `module`."""
        from .accelerate import convert_sync_batchnorm

        return convert_sync_batchnorm(module, process_group)


# --------------------------------------------------------------------------- dropout

def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
            philox: Optional[Tensor] = None, noise_shape: Optional[List[int]] = None) -> Tensor:
    """``torch.nn.functional.dropout`` with pybn's masks; ``philox`` as in
    :func:`pybn.torch.ops.dropout` (None: a seed from torch's default CPU generator)."""
    inplace = flag(inplace, "inplace")
    if not flag(training, "training") or p == 0.0:  # (torch's: the input itself, nothing drawn)
        return input
    if philox is None and noise_shape is None and exporting_onnx():  # (ONNX's Dropout; the rest refused)
        return F.dropout(input, p, True, inplace)
    y = _ops.dropout_call(input, p, philox, noise_shape)
    return input.copy_(y) if inplace else y


class _DropoutForward(PinnedSeed, _DropoutBase):
    """Shared by the dropout classes: the mask's shape for this input (None: torch's own
    function handles it), and the optional pinned Philox stream (seed.py)."""

    __prepare_scriptable__ = prepare_scriptable  # torch.jit.script: a TypeError saying what to script instead

    _spatial: Optional[int] = None  # channel-wise dropout over this many spatial dims; None: element-wise

    def __init__(self, p: float = 0.5, inplace: bool = False, *, seed: Optional[int] = None) -> None:
        super().__init__(p, inplace)
        self.seed = seed

    @leaf
    def forward(self, input: Tensor, relu: bool = False) -> Tensor:
        """The dropout of `input`, or with ``relu=True`` of ``relu(input)``: for an element-wise
        mask on a CPU tensor one fused pass (``pybn::relu_dropout``), whose backward needs the
        output only (:func:`pybn.torch.fuse_tails` rewrites ``dropout(relu(x))`` into it)."""
        if relu and (not self.training or self.p == 0.0 or input.device.type != "cpu" or self._spatial is not None
                     or exporting_onnx()):
            return self.forward(torch.relu(input))
        if not self.training:
            return input
        if self._seed is None and exporting_onnx():  # (ONNX's Dropout; a pinned stream is refused by _take)
            return self._torch_forward(input)
        noise = self._noise_shape(input)
        if input.device.type != "cpu" or noise is False:
            return self._torch_forward(input)
        if self.p == 0.0:  # (torch's: the input itself, nothing drawn or advanced)
            # (an unbatched channel-wise input: torch's function, whose unsqueeze and squeeze
            # return a view, and an in-place call on a leaf that requires grad an error)
            unbatched = self._spatial is not None and input.dim() == self._spatial + 1
            return self._torch_forward(input) if unbatched else input
        philox = None if self._seed is None else \
            self._take(stride=mask_counters(math.prod(noise) if noise is not None else input.numel()))
        p = scalar_value(self.p)
        y = _ops.relu_dropout_call(input, p, philox) if relu else _ops.dropout_call(input, p, philox, noise)
        return input.copy_(y) if self.inplace and not relu else y

    def _noise_shape(self, input: Tensor) -> Union[List[int], Literal[False], None]:
        """None for element-wise dropout; the channel-wise mask's shape; False for an input
        rank torch's function handles with its own warnings or errors."""
        if self._spatial is None:
            return None
        k, dims = self._spatial, input.dim()
        if dims == k + 2:  # (N, C, *spatial)
            return list(input.shape[:2]) + [1] * k
        if dims == k + 1 and k != 2:  # unbatched (C, *spatial); torch reads a 3-D Dropout2d input as (N, C, L)
            return [input.shape[0]] + [1] * k
        return False

    def _torch_forward(self, input: Tensor) -> Tensor:
        """Torch's own function of this class, for what pybn's masks do not cover."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return super().extra_repr() + self._seed_repr()


class Dropout(_DropoutForward, nn.Dropout):
    """``torch.nn.Dropout(p, inplace)`` with pybn's masks; ``seed=`` pins a Philox stream."""

    drop_in_for = nn.Dropout

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, True, self.inplace)


class Dropout1d(_DropoutForward, nn.Dropout1d):
    """``torch.nn.Dropout1d``: whole channels of (N, C, L) or (C, L) inputs, pybn's masks."""

    drop_in_for = nn.Dropout1d

    _spatial = 1

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.dropout1d(input, self.p, True, self.inplace)


class Dropout2d(_DropoutForward, nn.Dropout2d):
    """``torch.nn.Dropout2d``: whole channels of (N, C, H, W) inputs, pybn's masks (other
    ranks go to torch's ``F.dropout2d``, which warns about them)."""

    drop_in_for = nn.Dropout2d

    _spatial = 2

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.dropout2d(input, self.p, True, self.inplace)


class Dropout3d(_DropoutForward, nn.Dropout3d):
    """``torch.nn.Dropout3d``: whole channels of (N, C, D, H, W) or (C, D, H, W) inputs, pybn's masks."""

    drop_in_for = nn.Dropout3d

    _spatial = 3

    def _torch_forward(self, input: Tensor) -> Tensor:
        return F.dropout3d(input, self.p, True, self.inplace)


# --------------------------------------------------------------------------- stochastic depth

from .drop_path import DropPath, StochasticDepth, stochastic_depth  # noqa: E402  (it needs the operators above)

__all__ += ["StochasticDepth", "DropPath", "stochastic_depth"]

# --------------------------------------------------------------------------- alpha dropout and Gaussian noise

from .noise import (AlphaDropout, GaussianDropout, GaussianNoise, alpha_dropout, gaussian_dropout,  # noqa: E402
                    gaussian_noise)

__all__ += ["AlphaDropout", "GaussianDropout", "GaussianNoise", "alpha_dropout", "gaussian_dropout", "gaussian_noise"]

from .dropblock import DropBlock2d, drop_block_2d  # noqa: E402  (it needs the operators above)
__all__ += ["DropBlock2d", "drop_block_2d"]
