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
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
from torch import fx, nn

F = TypeVar("F", bound=Callable[..., Any])


def leaf(forward: F) -> F:
    """A module's forward that, called on torch.fx proxies, records the module's call instead."""

    @functools.wraps(forward)
    def traced_or_run(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        for a in (*args, *kwargs.values()):
            # (not when reached through a subclass's own forward, super().forward(x): the module's
            # call would run that whole forward again; traced through, pybn's checks refuse proxies)
            if isinstance(a, fx.Proxy) and isinstance(a.tracer, fx.Tracer) and type(self).forward is traced_or_run:
                return a.tracer.create_proxy("call_module", a.tracer.path_of_module(self), args, kwargs)
        return forward(self, *args, **kwargs)

    return traced_or_run  # type: ignore[return-value]


def outside_graph(fn: F) -> F:
    """`fn`, run outside torch.compile's graphs as ``torch.compiler.disable(fn)`` runs.

    torch.compiler.disable imports torch._dynamo, which doubles the time of ``import torch``;
    a process that never compiles need not pay it. So the function returned calls `fn` itself
    until torch._dynamo is imported (by torch.compile, torch.export...: before any tracing),
    then the disabled `fn`, which dynamo, tracing the call, finds marked and leaves out of the
    graph (:func:`_after_dynamo_import`)."""
    target: list[Callable[..., Any]] = [fn]

    def disable() -> None:
        target[0] = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return target[0](*args, **kwargs)

    _after_dynamo_import(disable)
    return call  # type: ignore[return-value]


# (kept across importlib.reload of this module: the modules that registered them are not reloaded)
_dynamo_callbacks: list[Callable[[], None]] = globals().get("_dynamo_callbacks", [])


def _after_dynamo_import(callback: Callable[[], None]) -> None:
    """Run `callback` right after torch._dynamo is first imported, or now if it is already.
    (A finder put ahead of ours that loads torch._dynamo itself would bypass it: dynamo then
    traces into the functions, with the same results and more graph breaks.)"""
    if "torch._dynamo" in sys.modules:
        callback()
        return
    _dynamo_callbacks.append(callback)
    if not any(isinstance(f, _DynamoImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _DynamoImport())


def _run_dynamo_callbacks() -> None:
    while _dynamo_callbacks:
        callback = _dynamo_callbacks.pop(0)
        try:
            callback()
        except Exception as e:  # noqa: BLE001  # (never fail torch's import: the function then runs traced)
            warnings.warn(f"pybn.torch: torch.compiler.disable failed after torch._dynamo was imported: {e!r}",
                          RuntimeWarning, stacklevel=2)


class _DynamoImport(importlib.abc.MetaPathFinder):
    """A finder ahead of the others on ``sys.meta_path`` that, when torch._dynamo is
    imported, lets the other finders find it and has its loader run the callbacks once the
    module has executed (a post-import hook, as wrapt's). It stays until they have run: a
    find_spec probe that imports nothing, or a first import that fails, leaves it waiting."""

    _finding = False  # (its own find_spec call below asks the finders again, itself included)

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
                  ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != "torch._dynamo" or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module
        finder = self

        def exec_then_call_back(module: ModuleType) -> None:
            exec_module(module)  # (raising: the finder stays for the next attempt)
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            _run_dynamo_callbacks()

        loader.exec_module = exec_then_call_back  # type: ignore[method-assign]
        return spec


def prepare_scriptable(module: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of pybn.torch's modules: a TypeError naming the module's
    class and what works instead."""
    raise TypeError(f"{type(module).__name__}: torch.jit.script cannot compile pybn.torch's modules (TorchScript "
                    f"cannot call pybn's kernels); script the model after pybn.torch.fold (inference), or the stock "
                    f"model, or capture this one with torch.jit.trace, torch.export or torch.compile")


def exporting_onnx() -> bool:
    """Whether ``torch.onnx.export`` is capturing this call. Asked on every batch-norm and
    dropout call: about 0.1 us outside a capture. TorchScript's exporter traces with
    torch.jit's tracer; the dynamo one captures with torch.export, where dynamo replaces
    ``torch.onnx.is_in_onnx_export()`` by False (strict mode, which the exporter falls back
    to), so the flag behind it is read directly. (Flags of the process: an export in
    another thread at the same time would count too.)"""
    if torch._C._get_tracing_state() is not None:
        return bool(torch.onnx.is_in_onnx_export())
    if not torch.compiler.is_compiling():
        return False
    try:  # the dynamo exporter's flag (torch >= 2.5), imported here: torch.onnx costs 20 ms at import
        from torch.onnx._internal.exporter import _flags
    except ImportError:  # pragma: no cover - older torch
        return False
    return bool(_flags._is_onnx_exporting)


def refuse_onnx_export(name: str) -> None:
    """The TypeError for a pybn operator met by ``torch.onnx.export``: ONNX has no operator
    drawing pybn's masks."""
    raise TypeError(f"{name}: torch.onnx.export cannot export pybn's masks (no ONNX operator draws them); export "
                    f"the model in evaluation mode (model.eval(), outside pybn.nn.mc_dropout), where dropout is "
                    f"the identity, or without a pinned seed, where pybn.torch's Dropout exports as ONNX's Dropout")
