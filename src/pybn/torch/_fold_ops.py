"""The operations :func:`pybn.torch.fold` recognises in a graph, in both of the dialects it reads:
torch.fx graphs of a module (``torch.conv2d``, ``F.batch_norm``, ``operator.mul``, ``x.mul(...)``)
and the ATen graphs of a ``torch.export.ExportedProgram`` (``aten.conv2d.default``...); in both,
pybn's own inference batch norm (``torch.ops.pybn.batch_norm_infer``, what :mod:`pybn.torch.nn`'s
drop-ins call in eval mode) is a batch norm too.

``Op`` says what a node computes and binds its arguments by name; ``Constants`` evaluates the
nodes whose value depends on no input (weights, buffers, and pure arithmetic on them).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, NamedTuple

import torch
from torch import fx
from torch.nn import functional as F

from . import ops as _pybn_ops  # noqa: F401 (registers torch.ops.pybn.*)
from . import residual as _pybn_residual  # noqa: F401 (registers torch.ops.pybn.batch_norm_add_relu)

aten = torch.ops.aten

# Argument names of the torch-level functions (ATen overloads carry theirs in their schema).
_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_F_BATCH_NORM = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_T_BATCH_NORM = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                 "cudnn_enabled")
_BINARY = ("input", "other")
_PYBN_BATCH_NORM = ("input", "running_mean", "running_var", "weight", "bias", "eps")

def _as_call(op: Any) -> Any:
    """`op` (operator.iadd...) as a function of this module: torch.fx prints a call of the
    operator itself as ``a += b``, which rebinds the name a in the generated code -- wrong when
    a is a number (a size) that is used again -- and a call of this one as a call."""
    def call(a: Any, b: Any) -> Any:
        return op(a, b)
    call.__name__ = call.__qualname__ = op.__name__
    call.__module__ = __name__
    return call


# Python's augmented assignments (``a += b``) as pybn's tracer records them: the graph's
# function -> the operator (in place on a tensor, a new value for a number, as in Python)
AUGMENTED: dict[Any, Any] = {_as_call(op): op for op in (
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift)}
globals().update({call.__name__: call for call in AUGMENTED})  # (importable by name, as pickled graphs refer)


# a tensor's augmented assignment as its in-place method, a number's as the plain operator
_IN_PLACE_METHODS = {operator.iadd: "add_", operator.isub: "sub_", operator.imul: "mul_", operator.itruediv: "div_"}
_PLAIN_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                    operator.imod: operator.mod, operator.ipow: operator.pow}


def as_torch_calls(graph: fx.Graph, tensors: set[str] | None = None) -> None:
    """The augmented-assignment calls of a folded graph as plain torch.fx calls: ``a.add_(b)``
    on a tensor (in place, as Python's ``a += b``), ``a + b`` on a number (a new value), so
    that the graph scripts with TorchScript and a saved graph needs nothing of pybn's to load
    and records the same calls when traced again. `tensors`: the names of the nodes that
    held tensors in a run of the graph (then every other node held something else); None:
    told from what made each node (:func:`_tensor_nodes`). A call on a value of unknown
    kind, or an operator without an in-place method, stays pybn's."""
    kinds = _tensor_nodes(graph) if tensors is None else {n: n.name in tensors for n in graph.nodes}
    for node in graph.nodes:
        op = operator_of(node.target) if node.op == "call_function" else None
        if op is None or op is node.target or len(node.args) != 2 or not isinstance(node.args[0], fx.Node):
            continue
        tensor = kinds[node.args[0]]
        if tensor and op in _IN_PLACE_METHODS:
            node.op, node.target = "call_method", _IN_PLACE_METHODS[op]
        elif tensor is False and op in _PLAIN_OPERATORS:
            node.target = _PLAIN_OPERATORS[op]


_ARITHMETIC = {*_PLAIN_OPERATORS, *_PLAIN_OPERATORS.values(), operator.neg, operator.pos}


def _tensor_nodes(graph: fx.Graph) -> dict[fx.Node, bool | None]:
    """Whether each traced node's value is a tensor (True) or a number or size (False), as far
    as what made it shows (lists of the calls known to return one tensor or a number); None
    when it does not. (In graph order: a node's inputs first.)"""
    kinds: dict[fx.Node, bool | None] = {}
    for node in graph.nodes:
        first = node.args[0] if node.args else None
        first_kind = kinds.get(first) if isinstance(first, fx.Node) else None
        kind: bool | None = None
        if node.op == "get_attr":
            kind = True  # (a parameter, buffer or constant tensor of the module)
        elif node.op == "call_module" and graph.owning_module is not None:
            kind = True if _returns_one_tensor(graph.owning_module.get_submodule(str(node.target))) else None
        elif node.op == "call_method" and first_kind:
            kind = False if node.target in _NUMBER_METHODS else (True if node.target in _TENSOR_METHODS else None)
        elif node.op == "call_function":
            target = operator_of(node.target)
            if target is getattr:
                kind = False if node.args[1] in ("shape", "ndim") else None
            elif target is operator.getitem:
                kind = first_kind  # (a tensor's slice, a size's entry)
            elif _one_of(target, _ARITHMETIC):
                operands = [kinds.get(a) if isinstance(a, fx.Node) else (False if isinstance(a, (int, float)) else None)
                            for a in node.args]
                kind = True if any(operands) else (False if all(k is False for k in operands) else None)
            elif _one_of(target, _TENSOR_FUNCTIONS):
                kind = True
        kinds[node] = kind
    return kinds


# calls known to return one tensor (of tensors: methods); anything else is of unknown kind
_NUMBER_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "item", "stride", "element_size",
                   "storage_offset", "get_device"}
_TENSOR_METHODS = {
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "relu", "relu_", "sigmoid", "sigmoid_", "tanh",
    "exp", "sqrt", "rsqrt", "abs", "neg", "pow", "clamp", "clamp_", "clamp_min", "reshape", "view", "permute",
    "transpose", "contiguous", "flatten", "unsqueeze", "squeeze", "expand", "expand_as", "reshape_as", "view_as",
    "mean", "sum", "softmax", "log_softmax", "matmul", "bmm", "clone", "detach", "float", "half", "double", "to",
    "type_as", "masked_fill", "flip", "roll", "repeat", "narrow", "t"}
_TENSOR_FUNCTIONS = {getattr(module, name) for module, names in (
    (torch, ("relu", "sigmoid", "tanh", "exp", "sqrt", "rsqrt", "abs", "neg", "pow", "clamp", "add", "sub", "mul",
             "div", "matmul", "bmm", "addmm", "cat", "stack", "flatten", "reshape", "permute", "transpose",
             "unsqueeze", "squeeze", "mean", "sum", "softmax", "conv1d", "conv2d", "conv3d", "batch_norm",
             "layer_norm", "flip", "roll")),
    (F, ("relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "leaky_relu", "elu",
         "interpolate", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d",
         "avg_pool2d", "avg_pool3d", "pad", "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
         "conv_transpose2d", "conv_transpose3d", "batch_norm", "layer_norm", "group_norm", "dropout", "dropout2d",
         "softmax", "log_softmax", "normalize"))) for name in names if hasattr(module, name)}


def _returns_one_tensor(module: Any) -> bool:
    return isinstance(module, _TENSOR_MODULES) and not getattr(module, "return_indices", False)


def _one_of(target: Any, group: set[Any]) -> bool:
    try:
        return target in group
    except TypeError:  # (an unhashable target is none of them)
        return False


# modules whose call returns one tensor
_TENSOR_MODULES = (torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.modules.batchnorm._NormBase,
                   torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.GELU, torch.nn.Hardswish,
                   torch.nn.Hardsigmoid, torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.LeakyReLU, torch.nn.Identity,
                   torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AvgPoolNd,
                   torch.nn.modules.pooling._AdaptiveAvgPoolNd, torch.nn.modules.dropout._DropoutNd,
                   torch.nn.Flatten, torch.nn.Upsample)


def operator_of(target: Any) -> Any:
    """The Python operator an augmented-assignment call of a graph stands for; else `target`."""
    try:
        return AUGMENTED.get(target, target)
    except TypeError:  # (an unhashable target is none of them)
        return target


# target -> (what it computes, its argument names; None: the operator's schema)
_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...] | None]] = {
    torch.conv1d: ("conv", _CONV), torch.conv2d: ("conv", _CONV), torch.conv3d: ("conv", _CONV),
    torch.conv_transpose1d: ("conv_transpose", _CONV_T), torch.conv_transpose2d: ("conv_transpose", _CONV_T),
    torch.conv_transpose3d: ("conv_transpose", _CONV_T),
    torch.nn.functional.linear: ("linear", ("input", "weight", "bias")),
    torch.nn.functional.batch_norm: ("batch_norm", _F_BATCH_NORM),
    torch.batch_norm: ("batch_norm", _T_BATCH_NORM),
    operator.mul: ("mul", _BINARY), operator.imul: ("mul", _BINARY), torch.mul: ("mul", _BINARY),
    operator.add: ("add", _BINARY), operator.iadd: ("add", _BINARY), torch.add: ("add", _BINARY + ("alpha",)),
    operator.sub: ("sub", _BINARY), operator.isub: ("sub", _BINARY), torch.sub: ("sub", _BINARY + ("alpha",)),
    operator.truediv: ("div", _BINARY), operator.itruediv: ("div", _BINARY),
    torch.div: ("div", _BINARY + ("rounding_mode",)),
}
for _name, _kind in (("conv1d", "conv"), ("conv2d", "conv"), ("conv3d", "conv"),
                     ("conv_transpose1d", "conv_transpose"), ("conv_transpose2d", "conv_transpose"),
                     ("conv_transpose3d", "conv_transpose")):
    for _overload in getattr(aten, _name).overloads():
        _FUNCTIONS[getattr(getattr(aten, _name), _overload)] = (_kind, None)
_FUNCTIONS.update({
    aten.convolution.default: ("convolution", None), aten.linear.default: ("linear", None),
    aten.mul.Tensor: ("mul", None), aten.mul.Scalar: ("mul", None),
    aten.add.Tensor: ("add", None), aten.add.Scalar: ("add", None),
    aten.sub.Tensor: ("sub", None), aten.sub.Scalar: ("sub", None),
    aten.div.Tensor: ("div", None), aten.div.Scalar: ("div", None),
    # in place (the training IR of torch.export keeps `out += branch(x)` as it is)
    aten.add_.Tensor: ("add", None), aten.mul_.Tensor: ("mul", None),
    # pybn's (the packet is what torch.fx records for a call of torch.ops.pybn.batch_norm_infer)
    torch.ops.pybn.batch_norm_infer.default: ("batch_norm", None),
    torch.ops.pybn.batch_norm_infer: ("batch_norm", _PYBN_BATCH_NORM),
    torch.ops.pybn.batch_norm_train.default: ("batch_norm_tuple", None),
    torch.ops.pybn.batch_norm_add_relu.default: ("batch_norm_tuple", None),
})
# Every batch norm ATen has, in the graphs torch.fx and torch.export make: aten.batch_norm (the
# training IR), what the decompositions turn it into (in eval mode with running statistics
# _native_batch_norm_legit_no_training; from the batch's statistics _native_batch_norm_legit_functional,
# or .no_stats without running statistics), the overloads a module may call directly, and the CUDA
# ones. Each is folded where it normalizes with constant running statistics, and reported otherwise.
# (The .out overloads, which write into given tensors, appear in neither kind of graph.)
_BATCH_NORM_OPS = (aten.batch_norm.default, aten.native_batch_norm.default, aten._native_batch_norm_legit.default,
                   aten._native_batch_norm_legit.no_stats, aten._native_batch_norm_legit_functional.default,
                   aten._native_batch_norm_legit_no_training.default, aten._batch_norm_with_update.default,
                   aten._batch_norm_with_update_functional.default, aten._batch_norm_no_update.default,
                   aten._batch_norm_impl_index.default, aten.cudnn_batch_norm.default,
                   aten.miopen_batch_norm.default)
_FUNCTIONS.update({o: ("batch_norm" if o is aten.batch_norm.default else "batch_norm_tuple", None)
                   for o in _BATCH_NORM_OPS})
# Arguments a schema does not have, with the value the operation implies: the _with_update ones
# and pybn's batch_norm_train always normalize with the batch's statistics.
_IMPLIED: dict[Any, dict[str, Any]] = {
    aten._batch_norm_with_update.default: {"training": True},
    aten._batch_norm_with_update_functional.default: {"training": True},
    torch.ops.pybn.batch_norm_train.default: {"training": True},
}
# What run_decompositions() makes of a call of an operator that changes its arguments.
_FUNCTIONALIZED = {torch.ops.higher_order.auto_functionalized, torch.ops.higher_order.auto_functionalized_v2}
# Schema argument names -> the names used here (ATen calls its first argument "self", pybn's "x";
# cuDNN and MIOpen name momentum and eps differently).
_RENAMED = {"self": "input", "x": "input", "exponential_average_factor": "momentum", "epsilon": "eps"}
# torch.fx records these torch functions, or an ATen/pybn operator called without its overload, as
# their own targets: each is the operator (packet) whose overload the call binds to.
_PACKETS: dict[Any, Any] = {
    torch.native_batch_norm: aten.native_batch_norm, torch._native_batch_norm_legit: aten._native_batch_norm_legit,
    torch._native_batch_norm_legit_no_training: aten._native_batch_norm_legit_no_training,
    torch._batch_norm_impl_index: aten._batch_norm_impl_index, torch.cudnn_batch_norm: aten.cudnn_batch_norm,
    torch.miopen_batch_norm: aten.miopen_batch_norm,
}

_METHODS = {"mul": "mul", "mul_": "mul", "__mul__": "mul", "__rmul__": "mul",
            "add": "add", "add_": "add", "__add__": "add", "__radd__": "add",
            "sub": "sub", "sub_": "sub", "__sub__": "sub",
            "div": "div", "div_": "div", "__truediv__": "div"}
_METHOD_ARGS = ("input", "other", "alpha")

BATCH_NORMS = ("batch_norm", "batch_norm_tuple")
ARITHMETIC = ("mul", "add", "sub", "div")
LAYERS = ("conv", "conv_transpose", "convolution", "linear")


class Op(NamedTuple):
    """What a call node computes, and its arguments by name."""

    kind: str
    args: dict[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        return self.args.get(name, default)


def op(node: Any) -> Op | None:
    """The Op of `node`, or None when it is not one fold recognises."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        kind = _METHODS.get(str(node.target))
        if kind is None:
            return None
        return _bind(kind, _METHOD_ARGS, node)
    if node.op != "call_function":
        return None
    target = operator_of(node.target)
    if target in _FUNCTIONALIZED:
        return _functionalized_op(node)
    try:
        kind, names = _FUNCTIONS.get(target, (None, None))
        packet = _PACKETS.get(target, target)
    except TypeError:  # an unhashable target is none of these
        return None
    if kind is None:
        return _packet_op(packet, node) if isinstance(packet, torch._ops.OpOverloadPacket) else None
    if names is None:  # (only ATen and custom operators' overloads have a schema)
        return _bind(kind, _schema_names(target), node, _IMPLIED.get(target))
    return _bind(kind, names, node, _IMPLIED.get(target))


def _schema_names(overload: Any) -> tuple[str, ...]:
    schema = getattr(overload, "_schema")  # noqa: B009 - only operator overloads have one
    return tuple(_RENAMED.get(a.name, a.name) for a in schema.arguments)


def _bind(kind: str, names: tuple[str, ...], node: fx.Node, implied: dict[str, Any] | None = None) -> Op | None:
    return _bind_arguments(kind, names, node.args, node.kwargs, implied)


def _bind_arguments(kind: str, names: tuple[str, ...], args: Any, kwargs: Any,
                    implied: dict[str, Any] | None) -> Op | None:
    """The Op of a call of `kind` with these arguments (`names`: the positional ones' names)."""
    kwargs = {_RENAMED.get(k, k): v for k, v in kwargs.items()}
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None  # a call this table does not describe
    bound = dict(zip(names, args))
    bound.update(kwargs)
    for k, v in (implied or {}).items():
        bound.setdefault(k, v)
    if kind == "batch_norm_tuple" and _fused(bound):
        # relu(bn(x) + residual) (pybn's batch_norm_add_relu): no per-channel affine map of x
        # that a layer could absorb. Left (and reported), never read as a batch norm of x.
        bound["fused input"] = bound.pop("input", None)
    return Op(kind, bound)


def _fused(bound: dict[str, Any]) -> bool:
    """Whether a batch norm call adds a residual or applies a ReLU too (batch_norm_add_relu),
    and normalizes with running statistics (else its batch statistics are the reason it stays)."""
    if "residual" not in bound and "relu" not in bound:
        return False
    return bound.get("training", False) is False and (bound.get("residual") is not None or
                                                      bound.get("relu", False) is not False)


def _functionalized_op(node: fx.Node) -> Op | None:
    """The Op of the call of a batch norm that changes its arguments (pybn's batch_norm_train and
    batch_norm_add_relu update the running statistics), as run_decompositions() writes it:
    auto_functionalized(op, **arguments), or auto_functionalized_v2, which passes each changed
    argument as an index into its _all_bases. The results are (op's results..., the changed
    arguments' new values)."""
    overload = node.args[0] if node.args else None
    kind, names = _FUNCTIONS.get(overload, (None, None)) if isinstance(overload, torch._ops.OpOverload) else \
        (None, None)
    if kind not in BATCH_NORMS or len(node.args) != 1:
        return None
    kwargs = dict(node.kwargs)
    bases = kwargs.pop("_all_bases", None)
    arguments: dict[str, Any] = {}
    for k, v in kwargs.items():
        if k.startswith("_") and k.endswith("_base_index"):
            if isinstance(bases, (list, tuple)) and isinstance(v, int) and 0 <= v < len(bases):
                arguments[k[1:-len("_base_index")]] = bases[v]
        elif not k.startswith("_"):  # (not a view's _size, _stride, _storage_offset)
            arguments[k] = v
    names = _schema_names(overload) if names is None else names
    return _bind_arguments(kind, names, (), arguments, _IMPLIED.get(overload))


def _packet_op(packet: Any, node: fx.Node) -> Op | None:
    """The Op of a call of an operator without its overload (torch.ops.aten.native_batch_norm(...),
    torch.native_batch_norm(...)): that of the one overload in the table the call binds to."""
    for name in packet.overloads():
        overload = getattr(packet, name)
        kind, names = _FUNCTIONS.get(overload, (None, None))
        if kind not in BATCH_NORMS:  # (the arithmetic of torch.fx graphs is recorded with its overload)
            continue
        arguments = overload._schema.arguments
        names = _schema_names(overload) if names is None else names
        required = {_RENAMED.get(a.name, a.name) for a in arguments if not a.has_default_value()}
        given = set(list(names)[:len(node.args)]) | {_RENAMED.get(k, k) for k in node.kwargs}
        if required <= given:
            found = _bind(kind, names, node, _IMPLIED.get(overload))
            if found is not None:
                return found
    return None


def op_of(node: fx.Node) -> Op:
    """The Op of a node already known to be one fold recognises."""
    o = op(node)
    assert o is not None
    return o


def in_place(node: fx.Node) -> bool:
    """Whether the call changes its first argument (x.add_(c), operator.iadd, aten.add_)."""
    if node.op == "call_method":
        return str(node.target).endswith("_")
    target = operator_of(node.target)
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    return getattr(target, "__name__", "").startswith("i") and getattr(target, "__module__", "") in ("operator",
                                                                                                   "_operator")


def layer_shape(o: Op) -> tuple[str, bool] | None:
    """(kind, transposed) of a layer Op: ("linear", False), ("conv", False), ("conv", True)."""
    if o.kind == "linear":
        return "linear", False
    if o.kind == "conv":
        return "conv", False
    if o.kind == "conv_transpose":
        return "conv", True
    if o.kind == "convolution":
        return "conv", bool(o.get("transposed"))
    return None


# --- values that do not depend on the inputs ---------------------------------------------

_PURE_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pos, operator.pow,
    operator.getitem, torch.add, torch.sub, torch.mul, torch.div, torch.rsqrt, torch.sqrt, torch.reciprocal,
    torch.neg, torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.pow, torch.square,
}
_PURE_METHODS = {"add", "sub", "mul", "div", "rsqrt", "sqrt", "reciprocal", "neg", "reshape", "view", "unsqueeze",
                 "squeeze", "flatten", "pow", "square", "float", "double", "half", "bfloat16", "contiguous", "clone",
                 "detach", "view_as", "reshape_as", "__add__", "__radd__", "__mul__", "__rmul__", "__sub__",
                 "__rsub__", "__truediv__", "__rtruediv__", "__neg__"}


def _pure(node: fx.Node) -> bool:
    """Whether the call computes its value from its arguments alone, with no side effect."""
    if node.op == "call_method":
        return str(node.target) in _PURE_METHODS
    if node.op != "call_function":
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return not node.target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in node.target.tags
    try:
        return node.target in _PURE_FUNCTIONS
    except TypeError:
        return False


class Constants:
    """The values of nodes that depend on no graph input, computed once each.

    `leaf` gives the value of a get_attr or placeholder node (a weight, a buffer), or None when
    it is an input. Pure calls on constants are evaluated (without gradients).
    """

    def __init__(self, leaf: Callable[[fx.Node], Any]) -> None:
        self._leaf = leaf
        self._values: dict[fx.Node, Any] = {}
        self._missing = object()

    def value(self, arg: Any) -> Any:
        """The value of `arg` (a node or a literal), or None when it depends on an input."""
        if not isinstance(arg, fx.Node):
            return arg
        found = self._values.get(arg, self._missing)
        if found is self._missing:
            found = self._compute(arg)
            self._values[arg] = found
        return found

    def is_constant(self, arg: Any) -> bool:
        return not isinstance(arg, fx.Node) or self.value(arg) is not None

    def _compute(self, node: fx.Node) -> Any:
        if node.op in ("get_attr", "placeholder"):
            return self._leaf(node)
        if not _pure(node):
            return None
        missing: list[fx.Node] = []
        args = fx.node.map_arg(node.args, lambda n: self._known(n, missing))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self._known(n, missing))
        if missing:
            return None
        with torch.no_grad():
            if node.op == "call_method":
                return getattr(args[0], str(node.target))(*args[1:], **kwargs)
            target: Any = node.target  # a call_function's: a callable
            return target(*args, **kwargs)

    def _known(self, n: fx.Node, missing: list[fx.Node]) -> Any:
        v = self.value(n)
        if v is None:
            missing.append(n)
        return v


# --- uses that read only a tensor's metadata --------------------------------------------

_META_ATTRS = {"ndim", "shape", "dtype", "device", "is_cuda", "layout"}
_META_METHODS = {"dim", "size", "ndimension", "numel", "nelement"}


_SHAPED_LIKE = {"reshape_as", "view_as", "expand_as"}  # y.reshape_as(x): only x's shape is read
_ATEN_SHAPED_LIKE = {torch.ops.aten.reshape_as.default, torch.ops.aten.view_as.default,
                     torch.ops.aten.expand_as.default}


def is_metadata_use(user: fx.Node, of: fx.Node) -> bool:
    """Whether `user` reads only the metadata of `of` (x.ndim, x.size(1), y.reshape_as(x)...),
    which a fold keeps."""
    if user.op == "call_function" and user.target is getattr and len(user.args) == 2:
        return user.args[0] is of and user.args[1] in _META_ATTRS
    if user.op == "call_method" and str(user.target) in _META_METHODS:
        return user.args[:1] == (of,) and of not in user.args[1:] and of not in user.kwargs.values()
    shaped_like = (user.op == "call_method" and str(user.target) in _SHAPED_LIKE) or (
        user.op == "call_function" and user.target in _ATEN_SHAPED_LIKE)
    return shaped_like and len(user.args) == 2 and user.args[1] is of and user.args[0] is not of


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of `node` that read its values (not only its shape or dtype)."""
    return [u for u in node.users if not is_metadata_use(u, node)]


def asserted_rank(node: fx.Node) -> int | None:
    """The rank the graph asserts for `node` (``torch._assert(x.ndim == 4, ...)``, as in timm's
    BatchNormAct2d), or None: every run that gets past the assertion has that rank."""
    for u in node.users:
        if not is_metadata_use(u, node) or not (
                (u.op == "call_function" and u.args[1:] == ("ndim",)) or (u.op == "call_method" and u.target == "dim"
                                                                         and len(u.args) == 1)):
            continue
        for eq in u.users:
            if eq.op == "call_function" and eq.target is operator.eq and len(eq.args) == 2:
                rank = eq.args[1] if eq.args[0] is u else eq.args[0] if eq.args[1] is u else None
                if isinstance(rank, int) and any(a.op == "call_function" and a.target is torch._assert
                                                 and a.args[:1] == (eq,) for a in eq.users):
                    return rank
    return None


def owner(node: fx.Node) -> str:
    """The qualified name of the innermost module whose forward made `node` (its own name for a
    call of no module), from the nn_module_stack torch.fx and torch.export record."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        name = list(stack.values())[-1][0]
        if isinstance(name, str) and name:
            return name
    return node.name
