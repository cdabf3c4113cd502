"""When a call may go straight to an operator's implementation instead of through torch's
dispatcher.

A call of ``torch.ops.pybn.*`` passes the dispatcher twice (the Autograd kernel, then the
implementation) and the Python layers of ``torch.library.custom_op``: about 75 us per call
on the Zen 4 machine of docs/pytorch.md, more than the kernels take on a layer of 256 x 1024.
In plain eager mode nothing needs those layers, so :mod:`pybn.torch.nn` calls the same
implementations through a ``torch.autograd.Function`` (the same bits, the same gradients).
Anything that watches or transforms operator calls takes the dispatcher: ``torch.compile``
and ``torch.export`` (the fake implementations), dispatch modes (fake tensors,
functionalization, ``make_fx``, ``opcheck``), function modes (``pybn.torch.fold``'s recorder,
``with torch.device(...)``), functorch transforms, and tensor subclasses.
"""
import importlib
from typing import Callable, Optional

import torch
from torch import Tensor

_PLAIN = (Tensor, torch.nn.Parameter)


def _compiling_check() -> Callable[[], bool]:
    compiler = getattr(torch, "compiler", None)
    check = getattr(compiler, "is_compiling", None)
    if check is None:  # torch < 2.3
        check = importlib.import_module("torch._dynamo").is_compiling
    return check  # type: ignore[no-any-return]


_is_compiling = _compiling_check()
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
_function_modes = getattr(torch._C, "_len_torch_function_stack", None)
_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def direct_call(*tensors: Optional[Tensor]) -> bool:
    """Whether an operator call on these tensors (None: an absent optional one) may skip the
    dispatcher: eager mode, no dispatch or function mode, plain CPU tensors. Where torch
    lacks a query this needs, False (the dispatcher is always right)."""
    if _is_compiling() or _dispatch_modes is None or _function_modes is None or _functorch_wrapped is None:
        return False
    if _dispatch_modes() or _function_modes():
        return False
    return all(t is None or (type(t) in _PLAIN and t.device.type == "cpu" and not _functorch_wrapped(t))
               for t in tensors)


def note_mutation(*tensors: Optional[Tensor]) -> None:
    """Advance the version counters of tensors written through NumPy views, as the
    dispatcher does for the arguments an operator declares mutated (autograd then refuses
    a backward that saved their old values)."""
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None:
        for t in tensors:
            if t is not None and not t.is_inference():  # (inference tensors have no counter)
                bump(t)
