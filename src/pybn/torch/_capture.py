"""How pybn.torch's modules appear to torch's graph capture that runs no Python operators
of pybn's own: torch.fx's symbolic tracing and TorchScript.

torch.fx keeps torch.nn's own modules whole (its tracer's ``is_leaf_module`` looks at the
class's module path) and traces through every other module's forward. Traced through, a
pybn module's forward would meet a proxy where it needs values (the input's rank, the
training flag's effect on the running statistics) and fail, or freeze one mode into the
graph. So a proxy input makes the forward record the call of the module itself, as the tracer
does for torch's classes (:func:`leaf`): the graph then holds pybn's ``BatchNorm2d`` where
the stock model's holds torch's (tools that match exact classes, as fx's conv-BN fusion,
pass it by).

``torch.jit.script`` compiles a module's Python source into TorchScript, which cannot run
pybn's kernels (Python functions over NumPy views). Its ``__prepare_scriptable__`` hook
could hand it the stock module instead, but torch.jit.script writes what the hook returns
into the parent module: the user's model itself would lose pybn's modules. So the hook
raises a TypeError that says what to script instead (:func:`prepare_scriptable`).

``torch.onnx.export`` (TorchScript's exporter and the dynamo one) records the operators a
model calls, and ONNX has none of pybn's: ``pybn::batch_norm_infer`` failed the export of
every accelerated model. While an ONNX export captures the call (:func:`exporting_onnx`),
batch norm and unseeded dropout run torch's own functions, which export as ONNX's
BatchNormalization and Dropout; what only pybn's masks compute (a pinned seed, the noise
family, stochastic depth, DropBlock, in training mode) raises a TypeError naming the
operator (:func:`refuse_onnx_export`).
"""
import functools
from typing import Any, Callable, TypeVar

import torch
from torch import fx, nn

F = TypeVar("F", bound=Callable[..., Any])


def leaf(forward: F) -> F:
    """A module's forward that, called on torch.fx proxies, records the module's call instead."""

    @functools.wraps(forward)
    def traced_or_run(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        for a in (*args, *kwargs.values()):
            if isinstance(a, fx.Proxy) and isinstance(a.tracer, fx.Tracer):
                return a.tracer.create_proxy("call_module", a.tracer.path_of_module(self), args, kwargs)
        return forward(self, *args, **kwargs)

    return traced_or_run  # type: ignore[return-value]


def prepare_scriptable(module: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of pybn.torch's modules: a TypeError naming the module's
    class and what works instead."""
    raise TypeError(f"{type(module).__name__}: torch.jit.script cannot compile pybn.torch's modules (TorchScript "
                    f"cannot call pybn's kernels); script the model after pybn.torch.fold (inference), or the stock "
                    f"model, or capture this one with torch.jit.trace, torch.export or torch.compile")


_onnx_flags: Any
try:  # the dynamo exporter's flag (torch >= 2.5); torch.onnx.is_in_onnx_export() reads it too
    from torch.onnx._internal.exporter import _flags as _onnx_flags
except ImportError:  # pragma: no cover - older torch
    _onnx_flags = None


def exporting_onnx() -> bool:
    """Whether ``torch.onnx.export`` is capturing this call. Asked on every batch-norm and
    dropout call: about 0.1 us outside a capture. TorchScript's exporter traces with
    torch.jit's tracer; the dynamo one captures with torch.export, where dynamo replaces
    ``torch.onnx.is_in_onnx_export()`` by False (strict mode, which the exporter falls back
    to), so the flag behind it is read directly. (Flags of the process: an export in
    another thread at the same time would count too.)"""
    if torch._C._get_tracing_state() is not None:
        return bool(torch.onnx.is_in_onnx_export())
    return torch.compiler.is_compiling() and _onnx_flags is not None and bool(_onnx_flags._is_onnx_exporting)


def refuse_onnx_export(name: str) -> None:
    """The TypeError for a pybn operator met by ``torch.onnx.export``: ONNX has no operator
    drawing pybn's masks."""
    raise TypeError(f"{name}: torch.onnx.export cannot export pybn's masks (no ONNX operator draws them); export "
                    f"the model in evaluation mode (model.eval(), outside pybn.nn.mc_dropout), where dropout is "
                    f"the identity, or without a pinned seed, where pybn.torch's Dropout exports as ONNX's Dropout")
