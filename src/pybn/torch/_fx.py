"""torch.fx's symbolic tracing of pybn.torch's modules: each stays one ``call_module`` node.

torch.fx keeps torch.nn's own modules whole (its tracer's ``is_leaf_module`` looks at the
class's module path) and traces through every other module's forward. Traced through, a
pybn module's forward would meet a proxy where it needs values (the input's rank, the
training flag's effect on the running statistics) and fail, or freeze one mode into the
graph. So a proxy input makes the forward record the call of the module itself, as the tracer
does for torch's classes: the graph then holds a ``BatchNorm2d`` (pybn's subclass) where
the stock model's has torch's, and fx-based tools (quantization's ``prepare_fx``, fx fusion,
feature extraction) see the same structure.
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
