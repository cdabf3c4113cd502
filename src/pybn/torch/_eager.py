"""When a call may go straight to an operator's implementation instead of through torch's
dispatcher.

A call of ``torch.ops.pybn.*`` passes the dispatcher twice (the Autograd kernel, then the
implementation) and the Python layers of ``torch.library.custom_op``: about 75 us per call
on the Zen 4 machine of docs/pytorch.md, more than the kernels take on a layer of 256 x 1024.
In plain eager mode nothing needs those layers, so :mod:`pybn.torch.nn`'s batch norm (with or
without the fused residual, in either mode), dropout, stochastic depth, alpha dropout, the
Gaussian noises and DropBlock call the same implementations through a
``torch.autograd.Function`` (the same bits, the same gradients). Anything that
watches or transforms operator calls takes the dispatcher: ``torch.compile`` and
``torch.export`` (the fake implementations), ``torch.jit.trace``, dispatch modes (fake
tensors, functionalization, ``make_fx``, ``opcheck``), function modes (``pybn.torch.fold``'s
recorder, ``with torch.device(...)``), functorch transforms (through
:mod:`pybn.torch._transforms`), and tensor subclasses. Eager
calls that skip it do not appear as ``pybn::`` events in ``torch.profiler``, and leave the
running statistics' version counters as torch's own batch norm does (the dispatcher
advances them for an operator that declares them mutated: a backward that saved them then
refuses to run; torch's modules and ``F.batch_norm`` do not, and a forward calling both
trains with torch).
"""
from typing import Optional

import torch
from torch import Tensor

from . import _transforms
from ._layout import is_wrapped

_PLAIN = (Tensor, torch.nn.Parameter)


def direct_call(*tensors: Optional[Tensor]) -> bool:
    """Whether an operator call on these tensors (None: an absent optional one) may skip the
    dispatcher: eager mode, no tracer, no dispatch or function mode, plain CPU tensors."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return False
    # (a transform's plain tensors too: vmap over functional_call with a batch from outside)
    if _transforms.active() or _transforms.dual_level():
        _transforms.refuse_forward_mode()
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return False
    # (is_cpu: device.type makes a Device object per tensor, and a call checks several)
    return all(t is None or (type(t) in _PLAIN and t.is_cpu and not is_wrapped(t)) for t in tensors)

