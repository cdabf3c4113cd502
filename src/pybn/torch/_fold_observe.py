"""What one forward call on the example inputs shows :func:`pybn.torch.fold`.

The call runs on a copy of the model (forward may change state) in eval mode without
gradients, with a pre- and a post-hook on every module and a TorchFunctionMode that sees every
torch function called on a tensor. It shows, keyed by the ids of the model's own modules:

* how often each module was called;
* for a Linear/Conv/ConvTranspose subclass with its own forward: whether that forward used the
  weight and bias only as those of one call of the layer's function (``F.linear``,
  ``torch.conv2d``...) whose result it returned and nothing else read;
* which module's output went to which module's first argument and nowhere else: no torch
  function outside that second module's call read it, no other module took it, and the model
  did not return it (modules returning their input unchanged, as ``nn.Identity`` and dropout
  in eval mode do, are seen through). Tensors are told apart by identity; every tensor the call
  makes is kept alive until it ends, so that no id is reused;
* which modules had a parameter or buffer of their own read outside their own calls (by the
  model's forward, another module or a hook): folding would change what that read sees;
* which modules were called with more than their first argument (pybn's ``bn(x, residual,
  relu=True)``, ``dropout(x, relu=True)``): ``nn.Identity`` cannot stand in for them.

The call gets copies of the example inputs, and the arguments forward got are kept as copies
taken before it ran: the caller's tensors are never written, and a forward that changes its
input in place is run again on what it got.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from . import _fold_modules as mods


class Seen(NamedTuple):
    """What the example call showed."""

    calls: dict[int, int]  # id(module) -> how many times it was called
    layer_calls: dict[int, str | None]  # id(layer with its own forward) -> None: computed like its class; else why not
    feeds: dict[int, tuple[int, int]]  # id(module) -> (id(the module its output went to, alone), that output's rank)
    read_outside: dict[int, str]  # id(module) -> the name of its own tensor read outside its calls
    forward_args: Any = None  # the arguments the model's forward got (after its pre-hooks); None: keywords too
    output: Any = None  # what the model's forward returned (before its forward hooks)
    extra_args: frozenset[int] = frozenset()  # id(module) called with more than its first argument


def fresh(value: Any) -> Any:
    """`value` with every tensor in it cloned."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, value)


def first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


def observe(model: nn.Module, example_inputs: Any) -> Seen:
    """Run a copy of `model` once on `example_inputs`; what it shows, keyed by `model`'s module ids."""
    scratch = mods.copy_sharing_parameters(model)
    recorder = _Recorder(scratch)
    recorder.run(fresh(example_inputs))
    # deepcopy keeps the structure: the k-th module of the copy is the k-th of `model`
    ids: dict[int, int] = {}
    pairs = zip(scratch.named_modules(remove_duplicate=False), model.named_modules(remove_duplicate=False))
    for (_, a), (_, b) in pairs:
        ids[id(a)] = id(b)
    seen = recorder.summary()
    return Seen({ids[k]: v for k, v in seen.calls.items()},
                {ids[k]: v for k, v in seen.layer_calls.items()},
                {ids[k]: (ids[b], rank) for k, (b, rank) in seen.feeds.items()},
                {ids[k]: v for k, v in seen.read_outside.items()}, recorder.forward_args, recorder.output,
                frozenset(ids[k] for k in recorder.extra_args))


# Torch functions that read a tensor's metadata, not its values: they do not count as uses.
_META_ATTRIBUTES = {torch._C.TensorBase.__dict__[name] for name in
                    ("shape", "ndim", "dtype", "device", "layout", "is_cuda", "requires_grad", "is_sparse",
                     "is_quantized", "is_meta") if name in torch._C.TensorBase.__dict__}
_META_METHODS = {getattr(torch._C.TensorBase, name) for name in
                 ("dim", "size", "numel", "ndimension", "nelement", "is_floating_point", "is_contiguous",
                  "element_size", "get_device", "stride", "is_complex") if hasattr(torch._C.TensorBase, name)}
_META_METHODS.add(torch.Tensor.__len__)


def _is_metadata(func: Any) -> bool:
    return func in _META_METHODS or getattr(func, "__self__", None) in _META_ATTRIBUTES


class _Call(NamedTuple):
    module: nn.Module
    parents: tuple[int, ...]  # indices of the module calls active when it started
    first: Any  # its first positional argument


class _Use:
    """One use of a tensor: by a module call (as an argument) or by a torch function."""

    __slots__ = ("call", "passes", "position", "within")

    def __init__(self, call: int | None, position: int, within: tuple[int, ...]) -> None:
        self.call = call  # the module call taking the tensor as an argument; None: a torch function
        self.position = position  # its position among that call's arguments (-1: a function)
        self.within = within  # the module calls active when it was used
        self.passes = False  # it returned the tensor itself, unchanged (dropout in eval, nn.Identity)


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[_Call] = []
        self.outputs: dict[int, Any] = {}  # call index -> its output
        self.stack: list[int] = []
        self.uses: dict[int, list[_Use]] = {}  # id(tensor) -> its uses
        self.producer: dict[int, int] = {}  # id(tensor) -> the innermost module call that returned it
        self.keep: list[Any] = []  # every tensor seen, alive until the call ends
        self.in_hook = False
        # for layer subclasses with their own forward: call index -> [(func, args, kwargs, out)]
        self.watched = {id(m) for m in model.modules() if mods.layer(m) is not None and not mods.keeps_forward(m)}
        self.functions: dict[int, list[tuple[Any, tuple[Any, ...], dict[str, Any], Any]]] = {}
        self.model_outputs: set[int] = set()
        self.forward_args: Any = None
        self.output: Any = None
        self.arguments: dict[int, list[tuple[torch.Tensor, _Use, int]]] = {}  # active call -> its arguments
        self.extra_args: set[int] = set()  # id(module) called with more than its first argument

    def _use(self, value: Any, call: int | None, position: int) -> list[tuple[torch.Tensor, _Use, int]]:
        """Record a use of every tensor in `value`: [(tensor, use, its version then)]."""
        found = []
        for t in pytree.tree_leaves(value):
            if isinstance(t, torch.Tensor):
                use = _Use(call, position, tuple(self.stack))
                self.keep.append(t)
                self.uses.setdefault(id(t), []).append(use)
                found.append((t, use, t._version))
        return found

    @staticmethod
    def _passed(found: list[tuple[torch.Tensor, _Use, int]], out: Any) -> None:
        for t, use, version in found:
            use.passes = out is t and t._version == version  # (an in-place change bumps the version)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.in_hook or _is_metadata(func):
            return func(*args, **kwargs)
        found = self._use((args, kwargs), None, -1)
        out = func(*args, **kwargs)
        self._passed(found, out)
        self.keep.extend(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        if self.stack and id(self.calls[self.stack[-1]].module) in self.watched:
            self.functions.setdefault(self.stack[-1], []).append((func, args, kwargs, out))
        return out

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.in_hook = True
        index = len(self.calls)
        self.calls.append(_Call(module, tuple(self.stack), args[0] if args else None))
        if len(args) > 1 or kwargs:
            self.extra_args.add(id(module))
        found = []
        for k, a in enumerate(args):
            found += self._use(a, index, k)
        found += self._use(kwargs, index, len(args))
        self.arguments[index] = found
        self.stack.append(index)
        self.in_hook = False

    def _forward_args(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.in_hook = True
        self.forward_args = None if kwargs else fresh(args)  # (as they were before forward ran)
        self.in_hook = False

    def _forward_output(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        self.output = out

    def _after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        self.in_hook = True
        index = self.stack.pop()
        self.outputs[index] = out
        self._passed(self.arguments.pop(index, []), out)
        if isinstance(out, torch.Tensor):
            self.keep.append(out)
            self.producer.setdefault(id(out), index)
        self.in_hook = False

    def run(self, example_inputs: Any) -> None:
        handles = []
        for m in self.model.modules():
            handles.append(m.register_forward_pre_hook(self._before, with_kwargs=True))
            handles.append(m.register_forward_hook(self._after, with_kwargs=True, always_call=True))
        # what the model's own forward gets and returns: after the pre-hooks, before the forward hooks
        handles.append(self.model.register_forward_pre_hook(self._forward_args, with_kwargs=True))
        handles.append(self.model.register_forward_hook(self._forward_output, prepend=True))
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        try:
            with torch.no_grad(), self:
                out = self.model(*inputs)
        except Exception as exc:
            raise ValueError(f"example_inputs: calling the model on them raised {type(exc).__name__}: "
                             f"{first_line(exc)}") from exc
        finally:
            for handle in handles:
                handle.remove()
        self.keep.append(out)
        self.model_outputs = {id(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}

    # --- the summary ---------------------------------------------------------------------

    def summary(self) -> Seen:
        calls: dict[int, int] = {}
        for c in self.calls:
            calls[id(c.module)] = calls.get(id(c.module), 0) + 1
        layer_calls: dict[int, str | None] = {}
        for index, c in enumerate(self.calls):
            if id(c.module) in self.watched:
                problem = layer_calls.get(id(c.module)) or self._layer_call_problem(index)
                layer_calls[id(c.module)] = problem
        feeds: dict[int, tuple[int, int]] = {}
        for index, c in enumerate(self.calls):
            if calls[id(c.module)] != 1 or index not in self.outputs:
                continue
            target = self._sole_consumer(index)
            if target is not None and calls[id(self.calls[target].module)] == 1:
                feeds[id(c.module)] = (id(self.calls[target].module), self.outputs[index].dim())
        return Seen(calls, layer_calls, feeds, self._read_outside())

    def _read_outside(self) -> dict[int, str]:
        """id(module) -> the name of a parameter or buffer of its own that was read while no call
        of it was running."""
        calls_of: dict[int, set[int]] = {}
        for index, c in enumerate(self.calls):
            calls_of.setdefault(id(c.module), set()).add(index)
        found: dict[int, str] = {}
        for m in self.model.modules():
            mine = calls_of.get(id(m), set())
            for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                if any(mine.isdisjoint(u.within) for u in self.uses.get(id(t), [])):
                    found[id(m)] = name
                    break
        return found

    def _sole_consumer(self, index: int) -> int | None:
        """The module call that alone took the output of call `index` (as its first argument).

        Uses that returned the tensor itself unchanged (dropout in eval mode, nn.Identity) are
        seen through; every other use must be that call, or inside it.
        """
        t = self.outputs[index]
        if not isinstance(t, torch.Tensor) or self.producer.get(id(t)) != index or id(t) in self.model_outputs:
            return None
        uses = [u for u in self.uses.get(id(t), []) if not u.passes]
        outer = [u for u in uses if u.call is not None and not any(w.call is not None and w.call in u.within
                                                                     for w in uses)]
        if len(outer) != 1 or outer[0].position != 0:
            return None
        target = outer[0].call
        if all(u is outer[0] or target in u.within for u in uses):
            return target
        return None

    def _layer_call_problem(self, index: int) -> str | None:
        """Why the call `index` of a layer with its own forward did not compute like its class."""
        m = self.calls[index].module
        found = mods.layer(m)
        assert found is not None  # (only the calls of layers are recorded)
        kind = found[0]
        own = [w for w in (m.weight, m.bias) if w is not None]
        uses = [u for w in own for u in self.uses.get(id(w), [])]
        if any(u.call is not None or u.within[-1:] != (index,) for u in uses):
            return "its weight or bias is read outside its own forward"
        reading = [(f, a, k, o) for f, a, k, o in self.functions.get(index, [])
                   if any(t is w for t in pytree.tree_leaves((a, k)) for w in own)]
        if len(reading) != 1 or len(uses) != len(own):
            return f"its forward read its weight or bias in {len(reading)} torch calls, not in one"
        func, args, kwargs, out = reading[0]
        name = getattr(func, "__name__", str(func))
        if func not in mods.LAYER_FUNCTIONS[kind]:
            return f"its forward passed its weight to {name}"
        names = {"linear": ("input", "weight", "bias"),
                 "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                 "conv_transpose": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
                                    "dilation")}[kind]
        bound = dict(zip(names, args))
        bound.update(kwargs)
        if bound.get("weight") is not m.weight or bound.get("bias") is not m.bias:
            return f"its forward did not pass its own weight and bias to {name}"
        if kind != "linear" and bound.get("groups", 1) != m.groups:
            return f"its forward called {name} with groups={bound.get('groups', 1)}, not {m.groups}"
        if self.outputs.get(index) is not out:
            return f"its forward did not return the result of {name}"
        if any(index in u.within for u in self.uses.get(id(out), [])):
            return f"its forward used the result of {name} before returning it"
        return None
