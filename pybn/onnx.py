"""Fold inference-mode batch norm into the neighbouring layers of an ONNX model
(DESIGN.md, "Folding batch norm").

``fold(model)`` returns a new ``onnx.ModelProto`` (the input is not modified) in which

* a Conv, ConvTranspose (any ``group``), Gemm, MatMul or MatMul+Add whose output feeds
  only a BatchNormalization becomes one layer (:func:`pybn.fold_conv_bn`);
* a BatchNormalization whose output feeds only a Gemm, a MatMul or a pointwise Conv (every
  kernel size 1, no padding, ``group=1``) is folded into it (:func:`pybn.fold_bn_linear`);
* Identity, and Dropout in inference mode whose mask is not used, are removed;
* initializers (and Constant nodes) that nothing uses any more are dropped.

A fold happens only where it is exact: the weights and the batch norm's parameters are
constants (initializers that are not also graph inputs, or Constant nodes), the value
between the two nodes has no other consumer and is not a graph output, the batch norm is in
inference mode with per-channel statistics, and the channel axis of the batch norm (axis 1)
is the axis the layer's weight acts on. Everything else is left as it was. Only the main
graph is rewritten; a value that a subgraph (If, Loop, Scan) reads counts as used there.

The arithmetic is pybn's: every folded parameter is computed in float64 and rounded once to
the weight's dtype (float32 or float64 weights; other dtypes are left unfolded).
"""
from __future__ import annotations

import logging
import re
from typing import Any, Iterable, NamedTuple

import numpy as np

try:
    import onnx
    from onnx import numpy_helper
except ImportError as _err:  # pragma: no cover - exercised by a test that hides onnx
    raise ImportError("pybn.onnx needs the onnx package: pip install pybn[onnx]") from _err

from .fold import fold_bn_linear, fold_conv_bn

__all__ = ["fold", "FoldRecord"]

logger = logging.getLogger("pybn.onnx")

_DEFAULT_DOMAINS = ("", "ai.onnx")
_FLOAT_WEIGHTS = (np.dtype(np.float32), np.dtype(np.float64))


class FoldRecord(NamedTuple):
    """One change made by :func:`fold`.

    ``kind`` names the pattern: ``"Conv+BatchNormalization"``, ``"ConvTranspose+BatchNormalization"``,
    ``"Gemm+BatchNormalization"``, ``"MatMul+BatchNormalization"``, ``"MatMul+Add+BatchNormalization"``,
    ``"BatchNormalization+Gemm"``, ``"BatchNormalization+MatMul"``, ``"BatchNormalization+Conv"``
    (folded into one layer), or ``"Dropout"``, ``"Identity"`` (removed). ``nodes`` holds the
    names of the original nodes involved, in graph order (``"<op>:<first output>"`` for a node
    without a name).
    """

    kind: str
    nodes: tuple[str, ...]

    def __str__(self) -> str:
        verb = "removed" if "+" not in self.kind else "folded"
        return f"{verb} {self.kind}: {', '.join(self.nodes)}"


def fold(model: "onnx.ModelProto", *, return_report: bool = False) -> Any:
    """Fold batch norms and remove inference no-ops in an ONNX model.

    Parameters
    ----------
    model : onnx.ModelProto
        The model; it is not modified. Tensors stored as external data must be loaded
        (``onnx.load`` does that by default); those that are not are treated as non-constant.
    return_report : bool
        Also return the list of changes.

    Returns
    -------
    onnx.ModelProto, or (onnx.ModelProto, list[FoldRecord]) with ``return_report=True``
        A new model computing the same outputs (up to floating-point rounding). Each change
        is also logged at INFO level on the ``"pybn.onnx"`` logger.
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model: expected an onnx.ModelProto, got {type(model).__name__}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    report = _Folder(out).run()
    for rec in report:
        logger.info("%s", rec)
    logger.info("pybn.onnx.fold: %d change(s), %d -> %d nodes", len(report), len(model.graph.node),
                len(out.graph.node))
    return (out, report) if return_report else out


# --- helpers -------------------------------------------------------------------------------

def _attr(node: "onnx.NodeProto", name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _drop_attrs(node: "onnx.NodeProto", names: Iterable[str]) -> None:
    keep = [a for a in node.attribute if a.name not in names]
    del node.attribute[:]
    node.attribute.extend(keep)


def _label(node: "onnx.NodeProto") -> str:
    return node.name or f"{node.op_type}:{node.output[0] if node.output else ''}"


def _bias_base(weight_name: str) -> str:
    """A name for a new bias next to `weight_name` ("conv1.weight" -> "conv1.bias")."""
    if weight_name.endswith("weight"):
        return weight_name[:-len("weight")] + "bias"
    return f"{weight_name}_bias"


def _subgraphs(node: "onnx.NodeProto") -> list["onnx.GraphProto"]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _walk_subgraph_names(graph: "onnx.GraphProto", refs: set[str], names: set[str]) -> None:
    """Every value name a subgraph reads (`refs`) and every name it mentions (`names`)."""
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        names.add(v.name)
    for t in graph.initializer:
        names.add(t.name)
    for n in graph.node:
        refs.update(i for i in n.input if i)
        names.update(n.input)
        names.update(n.output)
        for g in _subgraphs(n):
            _walk_subgraph_names(g, refs, names)
    refs.update(o.name for o in graph.output)


def _per_column(c: np.ndarray, n: int) -> np.ndarray | None:
    """A Gemm C / Add bias that is the same for every row, as a float64 (n,) vector; else None."""
    if c.shape in ((), (1,), (1, 1)):
        return np.full(n, float(c.reshape(())), dtype=np.float64)
    if c.shape in ((n,), (1, n)):
        return c.reshape(n).astype(np.float64)
    return None


class _BN(NamedTuple):
    node: Any
    x: str
    y: str
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float

    @property
    def channels(self) -> int:
        return self.mean.shape[0]

    def fold_after(self, weight: np.ndarray, bias: np.ndarray | None, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) of the layer followed by this BN, float64 in, float64 out."""
        return fold_conv_bn(weight, bias, self.mean, self.var, self.scale, self.bias, eps=self.eps, **kw)

    def fold_before(self, weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) of this BN followed by the layer, float64 in, float64 out."""
        return fold_bn_linear(weight, bias, self.mean, self.var, self.scale, self.bias, eps=self.eps)


# --- the rewriter --------------------------------------------------------------------------

class _Folder:
    """Rewrites one ModelProto (a private copy) in place; `run` returns the report."""

    def __init__(self, model: "onnx.ModelProto") -> None:
        self.model = model
        self.graph = model.graph
        self.opset = 1
        for op in model.opset_import:
            if op.domain in _DEFAULT_DOMAINS:
                self.opset = op.version
        self.nodes: list[Any] = []
        for n in self.graph.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            self.nodes.append(c)
        self.graph_inputs = {v.name for v in self.graph.input}
        self.graph_outputs = {v.name for v in self.graph.output}
        self.inits = {t.name: t for t in self.graph.initializer}
        self.sub_refs: set[str] = set()
        self.names: set[str] = set(self.graph_inputs) | self.graph_outputs | set(self.inits)
        self.names.update(v.name for v in self.graph.value_info)
        self.names.update(t.values.name for t in self.graph.sparse_initializer)
        for n in self.nodes:
            self.names.update(n.input)
            self.names.update(n.output)
            for g in _subgraphs(n):
                _walk_subgraph_names(g, self.sub_refs, self.names)
        self.node_names = {n.name for n in self.nodes if n.name}
        self.new_inits: list[Any] = []
        self.consts: dict[str, np.ndarray | None] = {}
        self._ranks: dict[str, int] | None = None
        # removed nodes and nodes to insert after a node, applied by _compact; keyed by id(),
        # the node itself kept in the value so that the id stays unique until then
        self.removed: dict[int, Any] = {}
        self.after: dict[int, tuple[Any, list[Any]]] = {}
        self.report: list[FoldRecord] = []

    def run(self) -> list[FoldRecord]:
        rules = (self._remove_noop, self._fold_into_previous, self._fold_into_next)
        self._index()
        changed = True
        while changed:  # until nothing changes: one rule can make room for another
            changed = False
            for rule in rules:
                for node in list(self.nodes):
                    if id(node) not in self.removed and rule(node):
                        changed = True
                self._compact()
        self._finish()
        return self.report

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

    def _set_input(self, node: Any, k: int, name: str) -> None:
        """node.input[k] = name (appending empty optional inputs as needed)."""
        while len(node.input) <= k:
            node.input.append("")
        self._unuse(node, k)
        node.input[k] = name
        if name:
            self.uses.setdefault(name, []).append((node, k))

    def _set_output(self, node: Any, k: int, name: str) -> None:
        old = node.output[k]
        if self.producer.get(old) is node:
            del self.producer[old]
        node.output[k] = name
        self.producer[name] = node

    def _rename_uses(self, old: str, new: str) -> None:
        for n, k in list(self.uses.get(old, [])):
            self._set_input(n, k, new)

    def _remove(self, node: Any) -> None:
        for k in range(len(node.input)):
            self._unuse(node, k)
        for o in node.output:
            if self.producer.get(o) is node:
                del self.producer[o]
        self.removed[id(node)] = node

    def _insert_after(self, where: Any, node: Any) -> None:
        self.after.setdefault(id(where), (where, []))[1].append(node)
        self._index_node(node)

    def _ordered(self) -> list[Any]:
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

    def _compact(self) -> None:
        self.nodes = self._ordered()
        self.removed = {}
        self.after = {}

    # --- queries -----------------------------------------------------------------------------

    def _is_default(self, node: Any, *ops: str) -> bool:
        return node.op_type in ops and node.domain in _DEFAULT_DOMAINS

    def _used(self, name: str) -> bool:
        return bool(self.uses.get(name)) or name in self.graph_outputs or name in self.sub_refs

    def _single_use(self, name: str) -> Any:
        """The one node reading `name`, if nothing else reads it and it is not a graph output."""
        uses = self.uses.get(name, [])
        if len(uses) != 1 or name in self.graph_outputs or name in self.sub_refs:
            return None
        return uses[0][0]

    def _const(self, name: str) -> np.ndarray | None:
        """The value of a constant input: an initializer that is not a graph input, or a Constant."""
        if not name:
            return None
        if name in self.consts:
            return self.consts[name]
        value = None
        if name in self.inits and name not in self.graph_inputs:
            t = self.inits[name]
            if t.data_location != onnx.TensorProto.EXTERNAL:
                value = numpy_helper.to_array(t)
        elif name not in self.graph_inputs:
            node = self.producer.get(name)
            if node is not None and self._is_default(node, "Constant") and len(node.attribute) == 1 \
                    and node.attribute[0].name == "value":
                t = node.attribute[0].t
                if t.data_location != onnx.TensorProto.EXTERNAL:
                    value = numpy_helper.to_array(t)
        self.consts[name] = value
        return value

    def _weight(self, name: str, ndim: int | None = None) -> np.ndarray | None:
        w = self._const(name)
        if w is None or w.dtype not in _FLOAT_WEIGHTS or (ndim is not None and w.ndim != ndim):
            return None
        return w

    def _rank(self, name: str) -> int | None:
        """The rank of a value, from the model's type information or ONNX shape inference."""
        if self._ranks is None:
            self._ranks = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(self._original_for_inference())
                infos = list(inferred.graph.value_info)
                infos += list(inferred.graph.input) + list(inferred.graph.output)
            except Exception as e:  # shape inference is a best effort: unknown ranks only skip folds
                logger.debug("shape inference failed: %s", e)
                infos = list(self.graph.value_info) + list(self.graph.input) + list(self.graph.output)
            for v in infos:
                tt = v.type.tensor_type
                if v.type.HasField("tensor_type") and tt.HasField("shape"):
                    self._ranks[v.name] = len(tt.shape.dim)
            for init_name, t in self.inits.items():
                self._ranks.setdefault(init_name, len(t.dims))
        return self._ranks.get(name)

    def _original_for_inference(self) -> Any:
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        del m.graph.node[:]
        m.graph.node.extend(self._ordered())
        m.graph.initializer.extend(self.new_inits)
        return m

    def _batch_norm(self, node: Any) -> _BN | None:
        """The parameters of an inference-mode, per-channel BatchNormalization, else None."""
        if not self._is_default(node, "BatchNormalization") or len(node.input) < 5:
            return None
        if any(o for o in node.output[1:]):  # extra outputs: training mode
            return None
        if self.opset < 7 and not _attr(node, "is_test", 0):
            return None
        if self.opset < 9 and _attr(node, "spatial", 1) != 1:  # per-element statistics
            return None
        if self.opset >= 14 and _attr(node, "training_mode", 0) != 0:
            return None
        params = [self._const(n) for n in node.input[1:5]]
        if any(p is None or p.ndim != 1 or p.dtype.kind != "f" for p in params):
            return None
        c = params[0].shape[0]
        if any(p.shape != (c,) for p in params):
            return None
        scale, bias, mean, var = (p.astype(np.float64) for p in params)
        if np.any(var < 0):  # not a variance: leave it to the runtime
            return None
        eps = float(_attr(node, "epsilon", 1e-5))
        return _BN(node, node.input[0], node.output[0], scale, bias, mean, var, eps)

    # --- edits -------------------------------------------------------------------------------

    def _fresh(self, base: str) -> str:
        base = re.sub(r"_bnfold(_\d+)?$", "", base)
        name, k = f"{base}_bnfold", 1
        while name in self.names:
            name, k = f"{base}_bnfold_{k}", k + 1
        self.names.add(name)
        return name

    def _fresh_node_name(self, base: str) -> str:
        if not base:
            return ""
        name, k = base, 1
        while name in self.node_names:
            name, k = f"{base}_{k}", k + 1
        self.node_names.add(name)
        return name

    def _new_node(self, op: str, inputs: list[str], outputs: list[str], name: str) -> Any:
        return onnx.helper.make_node(op, inputs, outputs, name=self._fresh_node_name(name))

    def _add_init(self, base: str, value: np.ndarray, dtype: np.dtype) -> str:
        name = self._fresh(base)
        t = numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype)), name)
        self.inits[name] = t
        self.new_inits.append(t)
        self.consts[name] = numpy_helper.to_array(t)
        return name

    @staticmethod
    def _labels(*nodes: Any) -> tuple[str, ...]:
        return tuple(_label(n) for n in nodes if n is not None)

    def _record(self, kind: str, labels: tuple[str, ...]) -> bool:
        self.report.append(FoldRecord(kind, labels))
        return True

    # --- rule 1: Identity and inference Dropout --------------------------------------------

    def _dropout_is_noop(self, node: Any) -> bool:
        if len(node.output) > 1 and node.output[1] and self._used(node.output[1]):
            return False  # the mask is used
        if self.opset < 7:
            return bool(_attr(node, "is_test", 0))
        if self.opset < 12 or len(node.input) < 3 or not node.input[2]:
            return True
        mode = self._const(node.input[2])
        return mode is not None and mode.size == 1 and not bool(mode.reshape(()))

    def _remove_noop(self, node: Any) -> bool:
        if not self._is_default(node, "Identity", "Dropout") or not node.input or not node.input[0]:
            return False
        if node.op_type == "Dropout" and not self._dropout_is_noop(node):
            return False
        x, y = node.input[0], node.output[0]
        if y in self.sub_refs:
            return False
        if y not in self.graph_outputs:
            self._remove(node)
            self._rename_uses(y, x)
        else:
            # y names a graph output: the producer of x takes the name y instead
            producer = self.producer.get(x)
            if (producer is None or x in self.graph_outputs or x in self.graph_inputs or x in self.inits
                    or x in self.sub_refs):
                return False
            self._remove(node)
            self._set_output(producer, list(producer.output).index(x), y)
            self._rename_uses(x, y)
        return self._record(node.op_type, self._labels(node))

    # --- rule 2: a layer followed by a BatchNormalization -----------------------------------

    def _fold_into_previous(self, node: Any) -> bool:
        bn = self._batch_norm(node)
        if bn is None:
            return False
        prev = self.producer.get(bn.x)
        if prev is None or self._single_use(bn.x) is not node:
            return False
        if self._is_default(prev, "Conv", "ConvTranspose"):
            return self._conv_bn(prev, bn)
        if self._is_default(prev, "Gemm"):
            return self._gemm_bn(prev, bn)
        if self._is_default(prev, "MatMul"):
            return self._matmul_bn(prev, None, bn)
        if self._is_default(prev, "Add") and len(prev.input) == 2:
            for k in (0, 1):
                mm = self.producer.get(prev.input[k])
                if (mm is not None and self._is_default(mm, "MatMul") and self._single_use(prev.input[k]) is prev
                        and self._matmul_bn(mm, prev, bn)):
                    return True
        return False

    def _conv_bn(self, conv: Any, bn: _BN) -> bool:
        if len(conv.input) < 2:
            return False
        w = self._weight(conv.input[1])
        if w is None or w.ndim < 3:
            return False
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        b = self._const(conv.input[2]) if has_bias else None
        if has_bias and (b is None or b.ndim != 1):
            return False
        groups = int(_attr(conv, "group", 1))
        transposed = conv.op_type == "ConvTranspose"
        if groups < 1 or (transposed and w.shape[0] % groups):
            return False
        out = groups * w.shape[1] if transposed else w.shape[0]
        if out != bn.channels or (b is not None and b.shape != (out,)):
            return False
        labels = self._labels(conv, bn.node)
        w2, b2 = bn.fold_after(w.astype(np.float64), None if b is None else b.astype(np.float64),
                               transposed=transposed, groups=groups)
        b_base = conv.input[2] if has_bias else _bias_base(conv.input[1])
        self._set_input(conv, 1, self._add_init(conv.input[1], w2, w.dtype))
        self._set_input(conv, 2, self._add_init(b_base, b2, w.dtype))
        self._remove(bn.node)
        self._set_output(conv, 0, bn.y)
        return self._record(f"{conv.op_type}+BatchNormalization", labels)

    def _gemm_operands(self, gemm: Any) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Gemm's effective (out, in) weight alpha*op(B) and per-column bias beta*C, float64."""
        if self.opset < 7 or len(gemm.input) < 2:  # opset < 7: C broadcasts only with broadcast=1
            return None
        b = self._weight(gemm.input[1], 2)
        if b is None:
            return None
        w = b if _attr(gemm, "transB", 0) else b.T
        w = float(_attr(gemm, "alpha", 1.0)) * w.astype(np.float64)
        bias = None
        if len(gemm.input) > 2 and gemm.input[2]:
            c = self._const(gemm.input[2])
            if c is None or c.dtype != b.dtype:
                return None
            bias = _per_column(c, w.shape[0])
            if bias is None:
                return None
            bias = float(_attr(gemm, "beta", 1.0)) * bias
        return w, bias

    def _set_gemm(self, gemm: Any, w: np.ndarray, bias: np.ndarray, dtype: np.dtype) -> None:
        """Gemm's B and C := the (out, in) weight `w` and `bias`, with alpha = beta = 1."""
        b_new = w if _attr(gemm, "transB", 0) else w.T
        c_base = gemm.input[2] if len(gemm.input) > 2 and gemm.input[2] else _bias_base(gemm.input[1])
        self._set_input(gemm, 1, self._add_init(gemm.input[1], b_new, dtype))
        self._set_input(gemm, 2, self._add_init(c_base, bias, dtype))
        _drop_attrs(gemm, ("alpha", "beta"))

    def _gemm_bn(self, gemm: Any, bn: _BN) -> bool:
        ops = self._gemm_operands(gemm)
        if ops is None or ops[0].shape[0] != bn.channels:
            return False
        labels = self._labels(gemm, bn.node)
        dtype = self._const(gemm.input[1]).dtype
        w, bias = bn.fold_after(*ops)
        self._set_gemm(gemm, w, bias, dtype)
        self._remove(bn.node)
        self._set_output(gemm, 0, bn.y)
        return self._record("Gemm+BatchNormalization", labels)

    def _matmul_bn(self, mm: Any, add: Any, bn: _BN) -> bool:
        # BN normalizes axis 1: that is MatMul's output axis only for a rank-2 product
        if self.opset < 7 or len(mm.input) != 2 or self._rank(mm.output[0]) != 2:
            return False
        w = self._weight(mm.input[1], 2)
        if w is None or w.shape[1] != bn.channels:
            return False
        bias = None
        if add is not None:
            c_name = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
            c = self._const(c_name)
            if c is None or c.dtype != w.dtype or (bias := _per_column(c, w.shape[1])) is None:
                return False
        labels = self._labels(mm, add, bn.node)
        w2, b2 = bn.fold_after(w.T.astype(np.float64), bias)
        b_base = _bias_base(mm.input[1])
        self._set_input(mm, 1, self._add_init(mm.input[1], w2.T, w.dtype))
        self._remove(bn.node)
        if add is not None:
            k = 1 if add.input[0] == mm.output[0] else 0
            self._set_input(add, k, self._add_init(add.input[k], b2, w.dtype))
            self._set_output(add, 0, bn.y)
            return self._record("MatMul+Add+BatchNormalization", labels)
        # the BN becomes an Add of the folded bias (and may keep its name)
        self.node_names.discard(bn.node.name)
        new = self._new_node("Add", [mm.output[0], self._add_init(b_base, b2, w.dtype)], [bn.y], bn.node.name)
        self._insert_after(bn.node, new)
        return self._record("MatMul+BatchNormalization", labels)

    # --- rule 3: a BatchNormalization followed by a Gemm, MatMul or 1x1 Conv -----------------

    def _fold_into_next(self, node: Any) -> bool:
        bn = self._batch_norm(node)
        if bn is None:
            return False
        nxt = self._single_use(bn.y)
        if nxt is None or not nxt.input or nxt.input[0] != bn.y:
            return False
        if self._is_default(nxt, "Gemm"):
            return self._bn_gemm(bn, nxt)
        if self._is_default(nxt, "MatMul"):
            return self._bn_matmul(bn, nxt)
        if self._is_default(nxt, "Conv"):
            return self._bn_conv(bn, nxt)
        return False

    def _bn_gemm(self, bn: _BN, gemm: Any) -> bool:
        if _attr(gemm, "transA", 0):  # then BN's channels are Gemm's rows, not its contraction axis
            return False
        ops = self._gemm_operands(gemm)
        if ops is None or ops[0].shape[1] != bn.channels:
            return False
        labels = self._labels(bn.node, gemm)
        dtype = self._const(gemm.input[1]).dtype
        w, bias = bn.fold_before(*ops)
        self._set_gemm(gemm, w, bias, dtype)
        self._remove(bn.node)
        self._set_input(gemm, 0, bn.x)
        return self._record("BatchNormalization+Gemm", labels)

    def _bn_matmul(self, bn: _BN, mm: Any) -> bool:
        # BN's channels (axis 1) are MatMul's contraction axis (the last) only for rank 2
        if self.opset < 7 or len(mm.input) != 2 or self._rank(bn.x) != 2:
            return False
        w = self._weight(mm.input[1], 2)
        if w is None or w.shape[0] != bn.channels:
            return False
        z = mm.output[0]
        add = self._single_use(z)
        bias = None
        if add is not None and self._is_default(add, "Add") and len(add.input) == 2 and z in add.input \
                and add.input[0] != add.input[1]:
            c = self._const(add.input[1] if add.input[0] == z else add.input[0])
            if c is not None and c.dtype == w.dtype:
                bias = _per_column(c, w.shape[1])
        if bias is None:
            add = None
        labels = self._labels(bn.node, mm)
        w2, b2 = bn.fold_before(w.T.astype(np.float64), bias)
        b_base = _bias_base(mm.input[1])
        self._set_input(mm, 1, self._add_init(mm.input[1], w2.T, w.dtype))
        if add is not None:
            k = 1 if add.input[0] == z else 0
            self._set_input(add, k, self._add_init(add.input[k], b2, w.dtype))
        else:  # MatMul -> (new name) -> a new Add of the folded bias -> z
            tmp = self._fresh(z)
            self._set_output(mm, 0, tmp)
            new = self._new_node("Add", [tmp, self._add_init(b_base, b2, w.dtype)], [z],
                                 mm.name and f"{mm.name}_bias")
            self._insert_after(mm, new)
        self._remove(bn.node)
        self._set_input(mm, 0, bn.x)
        return self._record("BatchNormalization+MatMul", labels)

    def _bn_conv(self, bn: _BN, conv: Any) -> bool:
        # exact only for a pointwise conv without padding: padding would see zeros, not BN(x)
        if len(conv.input) < 2 or int(_attr(conv, "group", 1)) != 1:
            return False
        w = self._weight(conv.input[1])
        if w is None or w.ndim < 3 or any(k != 1 for k in w.shape[2:]) or w.shape[1] != bn.channels:
            return False
        auto_pad = _attr(conv, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad == "NOTSET" and any(_attr(conv, "pads", [])):
            return False
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        b = self._const(conv.input[2]) if has_bias else None
        if has_bias and (b is None or b.shape != (w.shape[0],)):
            return False
        labels = self._labels(bn.node, conv)
        w2, b2 = bn.fold_before(w.astype(np.float64), None if b is None else b.astype(np.float64))
        b_base = conv.input[2] if has_bias else _bias_base(conv.input[1])
        self._set_input(conv, 1, self._add_init(conv.input[1], w2, w.dtype))
        self._set_input(conv, 2, self._add_init(b_base, b2, w.dtype))
        self._remove(bn.node)
        self._set_input(conv, 0, bn.x)
        return self._record("BatchNormalization+Conv", labels)

    # --- clean-up ------------------------------------------------------------------------------

    def _finish(self) -> None:
        g = self.graph
        # Constant nodes that nothing reads any more
        for n in self.nodes:
            if self._is_default(n, "Constant") and not any(self._used(o) for o in n.output):
                self._remove(n)
        self._compact()
        # delete in place, from the back (no copies of the weights that stay)
        for i in reversed(range(len(g.initializer))):
            name = g.initializer[i].name
            if not self._used(name) and name not in self.graph_inputs:
                del g.initializer[i]
        g.initializer.extend(t for t in self.new_inits if self._used(t.name))
        del g.node[:]
        g.node.extend(self.nodes)
        live = self.graph_inputs | self.graph_outputs | set(self.uses) | set(self.producer)
        for i in reversed(range(len(g.value_info))):
            if g.value_info[i].name not in live:
                del g.value_info[i]
