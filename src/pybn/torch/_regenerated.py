"""Plain eager calls (pybn.torch._eager) of the operators whose backward regenerates what
their forward drew from the counter stream: alpha dropout, Gaussian dropout and noise,
DropBlock. As dropout's direct calls: one autograd Function over the same
implementations, with (seed, offset) kept as ints, so no ``[seed, offset]`` tensor is made
and neither pass takes the dispatcher; a backward with ``create_graph=True`` takes the
operators, which are differentiable again.
"""
from typing import Any, Callable, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._eager import direct_call
from ._layout import array, channels_last_physical, empty, in_layout
from .ops import _direct_counters, _philox_of

# fn(x, seed, offset, out, last): pybn's NumPy function over x's elements in memory order,
# x and out the NumPy views of a tensor and its result (channels on the last axis when `last`)
Kernel = Callable[[np.ndarray, int, int, np.ndarray, bool], Any]


class Regenerated(NamedTuple):
    """An operator's forward and backward kernels and its backward through the operators,
    given dy and an int64 [seed, offset] (both None: the gradient is dy itself)."""

    forward: Kernel
    backward: Optional[Kernel] = None
    backward_op: Optional[Callable[[Tensor, Tensor], Tensor]] = None


def run(kernel: Kernel, x: Tensor, counters: Tuple[int, int], last: bool) -> Tensor:
    """kernel over x (a tensor pybn's kernels take; copied first unless its layout is
    `last`'s): y in the layout `last`."""
    y = empty(x, last)
    kernel(array(x, last), counters[0], counters[1], array(y, last), last)
    return y


class _Direct(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, op: Regenerated, philox: Optional[Tensor]) -> Tensor:
        ctx.op, ctx.last, ctx.counters = op, channels_last_physical(x), _direct_counters(philox)
        return run(op.forward, x, ctx.counters, ctx.last)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
        op = ctx.op
        if op.backward is None or op.backward_op is None:
            return dy, None, None
        dy = in_layout(dy, ctx.last)  # the draws follow memory order
        if not torch.is_grad_enabled() and direct_call(dy):  # (dy: x's dtype, which pybn takes)
            return run(op.backward, dy, ctx.counters, ctx.last), None, None
        return op.backward_op(dy, _philox_of(ctx.counters)), None, None


def call(op: Regenerated, x: Tensor, philox: Optional[Tensor]) -> Tensor:
    """The direct call of `op` on x (pybn.torch._eager.direct_call(x, philox) holds and pybn's
    kernels take x)."""
    y: Tensor = _Direct.apply(x, op, philox)  # type: ignore[no-untyped-call]
    return y
