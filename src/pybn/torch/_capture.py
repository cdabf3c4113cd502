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
"""
import functools
from typing import Any, Callable, TypeVar

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
