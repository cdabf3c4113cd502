"""The graph editor behind :func:`pybn.onnx.fold`: a working copy of the nodes of an ONNX
model's main graph, with an index of which node produces and which nodes read each value, kept
up to date by every edit.

``GraphEditor`` answers the questions a fold rule asks (who reads this value, is it a constant,
what is its rank) and makes the edits a rule needs (rewire an input or an output, remove a
node, insert one, add an initializer under a fresh name). Removals and insertions reach the
node list at ``compact`` (``ordered`` shows the result before that). The edits stay in the
working copy; writing them back into the model is the caller's (``pybn.onnx``) last step.
The small functions before the class read and edit single nodes.

Private to ``pybn.onnx``, which imports it only after its own guarded ``import onnx`` (that is
where a missing onnx is reported).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ._checks import bfloat16, round_to
from ._onnx_files import SMALL, ExternalData, one_line, light_copy

logger = logging.getLogger("pybn.onnx")  # fold's logger: this module is part of fold

DEFAULT_DOMAINS = ("", "ai.onnx")
# the dtypes folded: those of pybn's fold functions (bfloat16 when ml_dtypes gives NumPy the
# dtype onnx reads BFLOAT16 tensors as; onnx imports ml_dtypes itself); every fold is
# computed in float64 and rounded once
_BFLOAT16 = bfloat16()
FLOAT_WEIGHTS = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)) + \
    ((_BFLOAT16,) if _BFLOAT16 is not None else ())
_WEIGHT_NAMES = ", ".join(dt.name for dt in FLOAT_WEIGHTS[:-1]) + f" and {FLOAT_WEIGHTS[-1].name}"


# --- single nodes ------------------------------------------------------------------------------

def is_default(node: onnx.NodeProto, *ops: str) -> bool:
    """Whether `node` is one of the standard (default-domain) operators `ops`."""
    return node.op_type in ops and node.domain in DEFAULT_DOMAINS


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def drop_attrs(node: onnx.NodeProto, names: Iterable[str]) -> None:
    keep = [a for a in node.attribute if a.name not in names]
    del node.attribute[:]
    node.attribute.extend(keep)


def label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}:{node.output[0] if node.output else ''}"


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def walk_subgraph_names(graph: onnx.GraphProto, refs: set[str], names: set[str]) -> None:
    """Every value name a subgraph reads (`refs`) and every name it mentions (`names`)."""
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        names.add(v.name)
    for t in graph.initializer:
        names.add(t.name)
    for n in graph.node:
        refs.update(i for i in n.input if i)
        names.update(n.input)
        names.update(n.output)
        for g in subgraphs(n):
            walk_subgraph_names(g, refs, names)
    refs.update(o.name for o in graph.output)


# --- the editor --------------------------------------------------------------------------------

# A Constant's number and list forms, and the type ONNX gives each
_CONSTANT_NUMBERS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                     "value_ints": np.int64}


class GraphEditor:
    """Edits `nodes`, a working copy of the nodes of `model`'s main graph (`proto`). The edits,
    and the initializers added (`new_inits`), reach `proto` only when the caller writes them back.

    The index: `producer` maps a value to the node writing it, `uses` a value to the
    (node, input position) pairs reading it. `inputs` and `outputs` are the names of the graph's
    inputs and outputs; values read in a subgraph (If, Loop, Scan) are in `sub_refs`, and like
    graph outputs count as used.
    """

    def __init__(self, model: onnx.ModelProto, external: ExternalData | None = None) -> None:
        self.model = model
        self.external = external  # where tensors stored as external data are read (None: they are not)
        self.proto = model.graph  # the main graph
        self.opset = 1
        for op in model.opset_import:
            if op.domain in DEFAULT_DOMAINS:
                self.opset = op.version
        self.nodes: list[Any] = []
        for n in self.proto.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            self.nodes.append(c)
        self.inputs = {v.name for v in self.proto.input}
        self.outputs = {v.name for v in self.proto.output}
        self.inits = {t.name: t for t in self.proto.initializer}
        self.sub_refs: set[str] = set()
        self.names: set[str] = set(self.inputs) | self.outputs | set(self.inits)
        self.names.update(v.name for v in self.proto.value_info)
        self.names.update(t.values.name for t in self.proto.sparse_initializer)
        for n in self.nodes:
            self.names.update(n.input)
            self.names.update(n.output)
            for g in subgraphs(n):
                walk_subgraph_names(g, self.sub_refs, self.names)
        self.node_names = {n.name for n in self.nodes if n.name}
        self.new_inits: list[Any] = []
        self.consts: dict[str, np.ndarray | None] = {}
        self._shapes: dict[str, tuple[int | None, ...]] | None = None
        self.rank_failure = ""  # why shape inference failed, if it did
        # removed nodes and nodes to insert after a node, applied by compact; keyed by id(),
        # the node itself kept in the value so that the id stays unique until then
        self.removed: dict[int, Any] = {}
        self.after: dict[int, tuple[Any, list[Any]]] = {}
        self._index()

    # --- the indices, kept up to date by every edit --------------------------------------------

    def _index(self) -> None:
        self.producer: dict[str, Any] = {}
        self.uses: dict[str, list[tuple[Any, int]]] = {}
        for n in self.nodes:
            self._index_node(n)

    def _index_node(self, n: Any) -> None:
        for o in n.output:
            if o:
                self.producer[o] = n
        for k, i in enumerate(n.input):
            if i:
                self.uses.setdefault(i, []).append((n, k))

    def _unuse(self, node: Any, k: int) -> None:
        name = node.input[k]
        if name:
            rest = [(n, j) for n, j in self.uses.get(name, []) if not (n is node and j == k)]
            if rest:
                self.uses[name] = rest
            else:
                self.uses.pop(name, None)

    def set_input(self, node: Any, k: int, name: str) -> None:
        """node.input[k] = name (appending empty optional inputs as needed)."""
        while len(node.input) <= k:
            node.input.append("")
        self._unuse(node, k)
        node.input[k] = name
        if name:
            self.uses.setdefault(name, []).append((node, k))

    def set_output(self, node: Any, k: int, name: str) -> None:
        old = node.output[k]
        if self.producer.get(old) is node:
            del self.producer[old]
        node.output[k] = name
        self.producer[name] = node

    def rename_uses(self, old: str, new: str) -> None:
        for n, k in list(self.uses.get(old, [])):
            self.set_input(n, k, new)

    def remove(self, node: Any) -> None:
        for k in range(len(node.input)):
            self._unuse(node, k)
        for o in node.output:
            if self.producer.get(o) is node:
                del self.producer[o]
        self.removed[id(node)] = node

    def insert_after(self, where: Any, node: Any) -> None:
        self.after.setdefault(id(where), (where, []))[1].append(node)
        self._index_node(node)

    def ordered(self) -> list[Any]:
        """The nodes in graph order, with the removals and insertions so far applied."""
        out: list[Any] = []

        def emit(n: Any) -> None:
            if id(n) not in self.removed:
                out.append(n)
            for a in self.after.get(id(n), (None, []))[1]:
                emit(a)

        for n in self.nodes:
            emit(n)
        return out

    def compact(self) -> None:
        self.nodes = self.ordered()
        self.removed = {}
        self.after = {}

    # --- queries -----------------------------------------------------------------------------

    def used(self, name: str) -> bool:
        return bool(self.uses.get(name)) or name in self.outputs or name in self.sub_refs

    def single_use(self, name: str, shapes_too: bool = True) -> Any:
        """The one node reading `name`, if nothing else reads it and it is not a graph output.
        ``shapes_too=False``: not counting Shape nodes, which read only its shape (for a fold
        that changes the values of `name` and keeps the name, as timm LeViT's
        ``bn(linear(x).flatten(0, 1)).reshape_as(...)`` reads the Linear's output's shape)."""
        uses = [u for u in self.uses.get(name, []) if shapes_too or not is_default(u[0], "Shape")]
        if len(uses) != 1 or name in self.outputs or name in self.sub_refs:
            return None
        return uses[0][0]

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant input: an initializer that is not a graph input, or a Constant."""
        if not name:
            return None
        if name in self.consts:
            return self.consts[name]
        value = None
        t = self.const_tensor(name)
        if t is not None and not t.HasField("segment"):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                value = numpy_helper.to_array(t)  # (fold checked its size first)
            elif self.external is not None:
                value = self.external.array(t)
        self.consts[name] = value
        return value

    def const_tensor(self, name: str) -> Any:
        """The TensorProto of a constant input: an initializer that is not a graph input, or a Constant."""
        if name in self.inputs:
            return None
        if name in self.inits:
            return self.inits[name]
        node = self.producer.get(name)
        if node is None or not is_default(node, "Constant") or len(node.attribute) != 1:
            return None
        a = node.attribute[0]
        if a.name == "value":
            return a.t
        if a.name in _CONSTANT_NUMBERS:  # value_floats=[...] and the like (opset 12)
            values = np.asarray(onnx.helper.get_attribute_value(a), dtype=_CONSTANT_NUMBERS[a.name])
            return numpy_helper.from_array(values, name)
        return None

    def const_problem(self, name: str) -> str:
        """Why `name` has no constant value (for the report)."""
        if name in self.inputs:
            return f"{name!r} is a graph input, not a constant"
        t = self.const_tensor(name)
        if t is not None and t.data_location == onnx.TensorProto.EXTERNAL and self.external is None:
            return f"{name!r} is external data that was not loaded"
        if t is not None:
            return f"{name!r} cannot be read"
        node = self.producer.get(name)
        if node is not None:
            return f"{name!r} is computed by {label(node)}, not a constant"
        return f"{name!r} is not a constant"

    def weight(self, name: str, ndim: int | None = None) -> np.ndarray | str:
        """A constant, finite input of a dtype in FLOAT_WEIGHTS (of rank `ndim` if given), else why not."""
        w = self.const(name)
        if w is None:
            return self.const_problem(name)
        if w.dtype not in FLOAT_WEIGHTS:
            return f"{name!r} is {w.dtype} (only {_WEIGHT_NAMES} weights are folded)"
        if ndim is not None and w.ndim != ndim:
            return f"{name!r} has shape {w.shape}, not {ndim}-D"
        if not np.all(np.isfinite(w)):
            return f"{name!r} has values that are not finite"
        return w

    def rank(self, name: str) -> int | None:
        """The rank of a value, from ONNX shape inference run by this editor.

        Never from the model's own annotations (value_info, output shapes), which nothing
        checks: a stale one would fold on the wrong axis. Inference runs in strict mode on a
        copy without them (graph input shapes stay: runtimes check those); if it fails, no
        rank is known.
        """
        shape = self._inferred().get(name)
        return None if shape is None else len(shape)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The static shape of a value, from the same shape inference; None unless every dim is known."""
        shape = self._inferred().get(name)
        dims = () if shape is None else tuple(d for d in shape if d is not None)
        return None if shape is None or len(dims) != len(shape) else dims

    def _inferred(self) -> dict[str, tuple[int | None, ...]]:
        if self._shapes is None:
            self._shapes = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(self._model_for_inference(), strict_mode=True)
            except Exception as e:  # noqa: BLE001 - unknown ranks only skip the folds that need them
                self.rank_failure = f"shape inference failed ({one_line(e)})"
                logger.debug("pybn.onnx.fold: %s", self.rank_failure)
                return self._shapes
            g = inferred.graph
            for v in list(g.value_info) + list(g.input) + list(g.output):
                tt = v.type.tensor_type
                if v.type.HasField("tensor_type") and tt.HasField("shape"):
                    self._shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                                 for d in tt.shape.dim)
            for init_name, t in self.inits.items():
                self._shapes.setdefault(init_name, tuple(t.dims))
        return self._shapes

    def _model_for_inference(self) -> Any:
        """The graph as edited so far, without the model's value_info, output shapes and weights.
        An initializer that is also a graph input is only a default the caller may replace (a
        Reshape's shape, say): inference sees the input, not the default's value."""
        m = light_copy(self.model, big_initializers="inputs")
        g = m.graph
        kept = [t for t in g.initializer if t.name not in self.inputs]
        if len(kept) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(kept)
        m.ir_version = max(m.ir_version, 4)  # (below 4 inference ignores an initializer not also an input)
        del g.node[:]
        g.node.extend(self.ordered())
        del g.value_info[:]
        for v in g.output:
            if v.type.HasField("tensor_type"):
                v.type.tensor_type.ClearField("shape")
        for t in self.new_inits:
            if t.ByteSize() > SMALL:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            else:
                g.initializer.add().CopyFrom(t)
        return m

    # --- new names, nodes and initializers -------------------------------------------------------

    def fresh(self, base: str) -> str:
        """An unused value name: `base` (less any "_bnfold" suffix) + "_bnfold", "_bnfold_1", ..."""
        base = re.sub(r"_bnfold(_\d+)?$", "", base)
        name, k = f"{base}_bnfold", 1
        while name in self.names:
            name, k = f"{base}_bnfold_{k}", k + 1
        self.names.add(name)
        return name

    def fresh_node_name(self, base: str) -> str:
        if not base:
            return ""
        name, k = base, 1
        while name in self.node_names:
            name, k = f"{base}_{k}", k + 1
        self.node_names.add(name)
        return name

    def new_node(self, op: str, inputs: list[str], outputs: list[str], name: str) -> Any:
        """A new node (not yet in the graph: see insert_after), named `name` or a variant of it."""
        return onnx.helper.make_node(op, inputs, outputs, name=self.fresh_node_name(name))

    def add_init(self, base: str, value: np.ndarray, dtype: np.dtype) -> str:
        """A new initializer holding the float64 `value` rounded once to `dtype`, under a fresh
        name based on `base`."""
        name = self.fresh(base)
        t = numpy_helper.from_array(np.ascontiguousarray(round_to(value, dtype)), name)
        self.inits[name] = t
        self.new_inits.append(t)
        self.consts[name] = numpy_helper.to_array(t)
        return name
