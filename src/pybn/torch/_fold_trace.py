"""Tracing a model with torch.fx for :func:`pybn.torch.fold`, and what the traced graph needs.

The tracer keeps as one call (a leaf) every module with hooks, :mod:`pybn.torch.nn`'s drop-ins
(folded like the torch classes they replace), and every module whose own
forward torch.fx cannot trace (timm's ``Conv2dSame`` pads by an amount computed from the
input's size): the nodes its attempt added are removed and the module is called as a whole.
So one untraceable module no longer stops the folds in the rest of the model; only the
model's own forward must be traceable.
"""
from __future__ import annotations

import collections
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ._fold_modules import copy_sharing_parameters, global_hooks, has_hooks
from ._fold_ops import AUGMENTED
from ._fold_observe import first_line


class Tracer(fx.Tracer):
    """torch.fx's tracer, keeping as one call every module with hooks and every module it cannot
    trace through (`opaque`: qualified name -> why).

    Traced through, a module's hooks would run once, at trace time, on proxies: their side
    effects would be lost and their results frozen into the graph.
    """

    def __init__(self) -> None:
        super().__init__()
        self.opaque: dict[str, str] = {}
        self._opaque_ids: set[int] = set()
        self._proxy_cache: dict[str, Any] = {}
        # id -> (tensor, qualified name): torch.fx looks a tensor up by scanning every parameter
        # (buffer) of the model at every read, quadratic in the model's size; the first name
        # each has in named_parameters() (named_buffers()) order, as that scan finds
        self._params: dict[int, tuple[torch.Tensor, str]] = {}
        self._buffers: dict[int, tuple[torch.Tensor, str]] = {}

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        if isinstance(root, nn.Module):
            for n, p in root.named_parameters():
                self._params.setdefault(id(p), (p, n))
            for n, b in root.named_buffers():
                self._buffers.setdefault(id(b), (b, n))
        return super().trace(root, concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)  # (augmented assignments kept in place)

    def _name(self, table: dict[int, tuple[torch.Tensor, str]], t: Any) -> str | None:
        found = table.get(id(t))
        return found[1] if found is not None and found[0] is t else None

    def create_arg(self, a: Any) -> Any:
        name = self._name(self._params, a) if isinstance(a, nn.Parameter) else \
            self._name(self._buffers, a) if isinstance(a, torch.Tensor) else None
        if name is not None:
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # global hooks: every module call must stay a call for them to run
        return id(m) in self._opaque_ids or has_hooks(m) or global_hooks() or \
            getattr(type(m), "drop_in_for", None) is not None or super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        self._proxy_cache = parameter_proxy_cache  # to forget the proxies of nodes removed by call_module
        name = self._name(self._params, attr_val) if isinstance(attr_val, nn.Parameter) else None
        if name is not None and not self.param_shapes_constant:
            if name not in parameter_proxy_cache:
                parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
            return parameter_proxy_cache[name]
        if not isinstance(attr_val, nn.Parameter) and not self.proxy_buffer_attributes:
            return attr_val  # (what torch.fx returns for anything but a parameter, without a scan)
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        last = next(iter(reversed(self.graph.nodes)), None)
        stack = collections.OrderedDict(self.module_stack)
        calls = dict(getattr(self, "num_calls", {}))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever stops tracing m: call it as a whole
            self._remove_nodes_after(last)
            self.module_stack = stack
            if hasattr(self, "num_calls"):
                self.num_calls = calls
            self.opaque[name] = f"{type(exc).__name__}: {first_line(exc)}"
            self._opaque_ids.add(id(m))
            return super().call_module(m, forward, args, kwargs)

    def _remove_nodes_after(self, last: fx.Node | None) -> None:
        removed = []
        for node in reversed(self.graph.nodes):
            if node is last:
                break
            removed.append(node)
        for node in removed:  # users come after their inputs: last first
            self.graph.erase_node(node)
        gone = {id(n) for n in removed}
        for key in [k for k, proxy in self._proxy_cache.items() if id(getattr(proxy, "node", None)) in gone]:
            del self._proxy_cache[key]


def trace(model: nn.Module, *, restore: bool = False) -> tuple[fx.GraphModule | None, dict[str, str], str]:
    """(the traced module, the modules called as a whole because they cannot be traced, "") or
    (None, {}, why torch.fx cannot trace `model`'s own forward faithfully).

    Tracing runs forward once on proxies; an in-place change of a tensor that is not proxied, or
    an attribute assigned, happens then, once, for real, and is not in the graph: the traced
    module would lack it (a call counter that never counts). So state changed by tracing is a
    failure to trace. With `restore` (a model of the user's own, not a copy) that state is
    then put back (:class:`_Snapshot` says what can be).
    """
    before = state(model)
    tracer = Tracer()
    snapshot = _Snapshot(model) if restore else None
    try:
        graph = tracer.trace(model)
        changed = [name for name, value in state(model).items() if before.get(name) != value]
        traced = None if changed else fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # noqa: BLE001 - any failure to trace means: use the fallback
        return None, {}, f"{type(exc).__name__}: {first_line(exc)}"
    finally:
        if snapshot is not None:
            snapshot.restore()
    if traced is None:
        return None, {}, f"forward changes {', '.join(sorted(changed)[:3])}, which a traced graph would not"
    return traced, tracer.opaque, ""


class _Snapshot:
    """What a forward run on proxies can change in a model's modules, to be put back: their
    attributes (a counter; a buffer rebound to a proxy by ``self.running_mean += ...``), the
    parameters, buffers, children and non-persistent buffer names registered, and the values
    of buffers changed in place (``num_batches_tracked.add_(1)`` on a tensor that is not
    proxied; their version counters stay advanced). Not put back: parameters changed in
    place (not copied: they can be most of a model's memory), containers changed in place (a
    list appended to), buffers without values (lazy) or in inference mode."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules),
                         set(m._non_persistent_buffers_set),
                         {name: (b, b._version, b.detach().clone()) for name, b in m._buffers.items()
                          if b is not None and not nn.parameter.is_lazy(b) and not b.is_inference()})
                        for m in model.modules()]

    def restore(self) -> None:
        for m, attrs, parameters, buffers, children, non_persistent, values in self.modules:
            for name in [n for n in vars(m) if n not in attrs]:
                del m.__dict__[name]
            m.__dict__.update(attrs)
            for table, saved in ((m._parameters, parameters), (m._buffers, buffers), (m._modules, children)):
                table.clear()
                table.update(saved)  # type: ignore[arg-type]  # (each table with its own saved copy)
            m._non_persistent_buffers_set.clear()
            m._non_persistent_buffers_set.update(non_persistent)
            for b, version, value in values.values():
                if b._version != version:
                    with torch.no_grad():
                        b.copy_(value)


def _recorded(op: Any) -> Any:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


class _InPlaceProxy(fx.Proxy):
    """A proxy that records ``a += b`` (and the other augmented assignments) as a call of the
    in-place operator (``_fold_ops.AUGMENTED``). torch.fx's own proxies have no in-place
    methods, so Python falls back to ``a = a + b``: the graph then loses the write, and any
    other name for `a` (another variable, a view) keeps its old value, which the eager
    forward would not."""


for _call in AUGMENTED:
    setattr(_InPlaceProxy, f"__{_call.__name__}__", _recorded(_call))  # __iadd__: iadd, ...


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def state(model: nn.Module) -> dict[str, Any]:
    """What identifies the state of every module: its tensors (object and in-place version) and
    its plain Python attributes."""
    plain = (int, float, bool, str, bytes, type(None))
    found: dict[str, Any] = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            # (an inference tensor has no version counter, and is not written outside inference mode)
            counted = isinstance(t, torch.Tensor) and (nn.parameter.is_lazy(t) or not t.is_inference())
            found[join(prefix, name)] = (id(t), t._version if counted else None)  # (a proxy bound there: another id)
        for name, value in vars(m).items():
            if isinstance(value, plain):
                found[join(prefix, name)] = repr(value)  # (a NaN equals itself as text)
    return found


def copy_hooks(source: nn.Module, target: nn.Module) -> None:
    """Register `source`'s own hooks on `target`, in their order and with their options.

    torch.fx traces ``forward`` itself, so the traced module would lose them.
    """
    for key, hook in source._forward_pre_hooks.items():
        target.register_forward_pre_hook(hook, with_kwargs=key in source._forward_pre_hooks_with_kwargs)
    for key, hook in source._forward_hooks.items():
        target.register_forward_hook(hook, with_kwargs=key in source._forward_hooks_with_kwargs,
                                     always_call=key in source._forward_hooks_always_called)
    for hook in source._backward_pre_hooks.values():
        target.register_full_backward_pre_hook(hook)
    for hook in source._backward_hooks.values():
        if source._is_full_backward_hook:
            target.register_full_backward_hook(hook)
        else:
            target.register_backward_hook(hook)


def node_ranks(gm: fx.GraphModule, example_inputs: Any) -> tuple[dict[str, int], str, Any]:
    """(the rank of every tensor node's value when a copy of `gm` runs on the example, "", the
    output) or ({}, why that run failed, None).

    The traced graph has no control flow: every node runs, so every rank is known.
    """
    ranks: dict[str, int] = {}

    class Recording(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                ranks[n.name] = out.dim()
            return out

    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        with torch.no_grad():
            out = Recording(copy_sharing_parameters(gm)).run(*inputs)
    except Exception as exc:  # noqa: BLE001 - a graph that cannot run what forward ran is not used
        return {}, f"running the traced graph on example_inputs failed ({type(exc).__name__}: {first_line(exc)})", None
    return ranks, "", out


def same_output(a: Any, b: Any) -> bool:
    """Whether two results are the same structure of equal tensors (NaN equal to NaN) and equal
    other values. Anything that cannot be compared counts as different."""
    try:
        la, lb = pytree.tree_flatten(a), pytree.tree_flatten(b)
        if la[1] != lb[1]:
            return False
        for x, y in zip(la[0], lb[0]):
            if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
                return False
            if isinstance(x, torch.Tensor):
                if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(*(
                        torch.nan_to_num(t) if t.is_floating_point() else t for t in (x, y))):
                    return False
            elif not (x is y or bool(x == y)):
                return False
    except Exception:  # noqa: BLE001 - values without a plain equality
        return False
    return True
