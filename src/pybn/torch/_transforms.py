"""pybn's random operators under torch.func's reverse-mode transforms and vmap.

``torch.library.register_autograd`` wraps an operator's backward in an autograd Function
without a ``setup_context`` staticmethod, and functorch refuses such a Function: through
any operator so registered, ``torch.func.grad``, ``vjp``, ``jacrev`` and ``vmap(grad(...))``
(per-sample gradients) stop at "it must override the setup_context staticmethod" (torch
issues 168393, 170834, 179652, open on torch 2.13). The dispatcher cannot be taught
otherwise: by the time an operator's Autograd kernel runs, functorch's layers have been
peeled off and a Function applied there finds no kernel. So the call sites ask
:func:`operator` what to call: the operator itself, or, while a transform is active, the
same operator through a Function of this module, which has ``setup_context`` (the
operator's own) and lets functorch derive its vmap rule from the operator's, which runs
each sample on its own (:func:`_per_sample`). Its backward is the operator's registered
backward, whose calls go through :func:`operator` again, so gradients of gradients work
too. A call without a seed draws it in :func:`operator`, where vmap's randomness mode
applies to the draw.

Batch norm does not come here: under a transform pybn.torch.nn's batch norm runs torch's
own functions (pybn/torch/nn.py), whose functorch rules (running statistics under vmap,
forward mode) are torch's to keep.
"""
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch.autograd import forward_ad as _forward_ad

from ._capture import exporting_onnx, refuse_onnx_export

# a custom operator (torch.library.custom_op's object) -> its Function for transforms and the
# position of its optional [seed, offset] (None: it has none)
_TRANSFORMABLE: Dict[Any, Tuple[Any, Optional[int]]] = {}


# Whether a torch.func transform (grad, vjp, jacrev, vmap, jvp, ...) is running: torch's
# function itself (every batch-norm call asks; a Python frame around it costs in a step)
active: Callable[[], bool] = torch._C._are_functorch_transforms_active


def register_autograd(op: Any, backward: Callable[..., Any], setup_context: Callable[..., None],
                      philox_at: Optional[int] = None) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)``, the same formula for
    :func:`operator`'s calls under transforms, and op's vmap rule (:func:`_per_sample`;
    `philox_at`: the position of op's optional ``[seed, offset]``, None drawing one)."""
    op.register_autograd(backward, setup_context=setup_context)
    if hasattr(torch.library, "register_vmap"):  # (torch >= 2.4 has it; without it, torch's fallback)
        torch.library.register_vmap(op, _per_sample(op, philox_at))

    class Transformable(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args: Any) -> Any:
            with torch._C._AutoDispatchBelowAutograd():  # (the gradient is this Function's)
                return op(*args)

        @staticmethod
        def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            return backward(ctx, *grads)

    # (named after the operator in tracebacks: one such class per operator)
    Transformable.__name__ = Transformable.__qualname__ = f"Transformable[{getattr(op, '_qualname', op)}]"
    _TRANSFORMABLE[op] = Transformable, philox_at


def _per_sample(op: Any, philox_at: Optional[int]) -> Callable[..., Any]:
    """op's vmap rule: op on each sample alone, as torch's fallback for operators without a
    rule does (and warns of, "performance drop", for every call). A random operator must
    run per sample: each sample's mask is the one its own (seed, offset) gives it. A call
    without a seed follows vmap's randomness as torch's random functions do: an error in
    mode "error", one seed drawn for every sample in "same", a draw per sample in
    "different"."""
    name = getattr(op, "_qualname", op)  # ("pybn::dropout")

    # in_dims: an int for a batched tensor; None (a list of Nones for a list argument) otherwise
    def rule(info: Any, in_dims: Tuple[Any, ...], *args: Any) -> Any:
        if info.batch_size == 0:
            raise RuntimeError(f"{name}: vmap over a dimension of size 0 is not supported (one call per sample)")
        if philox_at is not None and args[philox_at] is None and info.randomness != "different":
            if info.randomness == "error":  # (torch's words for its own random functions)
                raise RuntimeError(f"vmap: called random operation ({name}) while in randomness error mode. Please "
                                   "either use the 'same' or 'different' randomness flags on vmap or pass philox")
            args = _with_seed(args, philox_at)
        outputs = []
        with torch._C._AutoDispatchBelowAutograd():
            for b in range(info.batch_size):
                outputs.append(op(*(a.select(d, b) if isinstance(d, int) else a for a, d in zip(args, in_dims))))
        if isinstance(outputs[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*outputs)), (0,) * len(outputs[0])
        return torch.stack(outputs), 0
    return rule


def _with_seed(args: Tuple[Any, ...], philox_at: int) -> Tuple[Any, ...]:
    """args with a fresh ``[seed, 0]`` from torch's generator at philox_at."""
    from .ops import draw_philox  # (ops imports this module)

    return args[:philox_at] + (draw_philox(),) + args[philox_at + 1:]


def operator(op: Any) -> Callable[..., Any]:
    """What a call site calls for the custom operator `op` (registered through
    :func:`register_autograd`): `op`, or under a reverse-mode transform or vmap its
    Function; forward mode is refused (no rule). Under a transform a call without a seed
    draws it here, at the caller's level, where vmap's randomness mode applies to the
    draw (torch's error in mode "error", one seed for every sample in "same", one per
    sample in "different"); left to the operator, a call whose inputs are all unbatched
    would draw once below vmap whatever the mode."""
    if exporting_onnx():
        refuse_onnx_export(getattr(op, "_qualname", str(op)))
    if not active() and not dual_level():
        return op  # type: ignore[no-any-return]
    refuse_forward_mode()
    function, philox_at = _TRANSFORMABLE[op]
    if philox_at is None:
        return function.apply  # type: ignore[no-any-return]

    def call(*args: Any) -> Any:
        return function.apply(*(_with_seed(args, philox_at) if args[philox_at] is None else args))
    return call


def dual_level() -> bool:
    """Whether torch.autograd.forward_ad's dual level is open (dual tensors may come): batch
    norm then runs torch's own functions, which have forward-mode rules, as under a
    transform."""
    return _forward_ad._current_level >= 0


def refuse_forward_mode() -> None:
    """Raise under torch.func.jvp (and jacfwd, hessian) and in a forward_ad dual level:
    pybn's operators have no forward-mode rule, and through a custom operator without one
    torch carries a zero tangent on, without an error (or, outside functorch, drops it)."""
    functorch = torch._C._functorch
    stack = functorch.get_interpreter_stack() if hasattr(functorch, "get_interpreter_stack") else \
        [functorch.peek_interpreter_stack()]
    if dual_level() or any(i is not None and i.key() == functorch.TransformType.Jvp for i in stack or ()):
        raise NotImplementedError("pybn.torch: forward-mode AD (torch.func.jvp, jacfwd, hessian, "
                                  "torch.autograd.forward_ad) is not supported by pybn's dropout-family operators "
                                  "(no forward-mode rule)")
