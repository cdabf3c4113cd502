"""Per-channel affine maps in an ONNX graph, for :func:`pybn.onnx.fold`.

``Affine`` holds the parameters of a BatchNormalization, or of a chain of Mul, Add, Sub and Div
nodes by constants (what a FrozenBatchNorm2d, ``x * scale + shift``, exports to), as the
statistics of a batch norm: a chain's ``x * s + t`` is ``mean=0, var=1, epsilon=0, scale=s,
bias=t``, which pybn's arithmetic turns into exactly ``s`` and ``t``.

``AffineRules`` are fold rules of ``pybn._onnx_fold.Folder`` (a mixin):

* ``_fold_chain_into_previous``: a Conv, ConvTranspose, Gemm, MatMul or MatMul+Add followed by
  such a chain (each value in it read by the next node alone) takes the chain into its weights.
  A constant must be one value per channel of the layer's output: a shape of ones but on the
  channel axis (counted from the right, as ONNX broadcasts), no more dimensions than the output
  (a Conv's output has its weight's rank; a Gemm's is 2; a MatMul's is inferred), the output's
  element type, finite values.
* ``_reshaped_bn``: a MatMul (+Add) or Gemm, then a Transpose, Reshape or Flatten that keeps its
  channel axis as axis 1, then a BatchNormalization: the batch norm folds into the layer's
  weights and bias, before the Transpose/Reshape/Flatten. A Transpose keeps it when ``perm[1]``
  is the last axis; a Reshape when its output is ``(rows, C, 1, ..., 1)`` for a ``(..., C)``
  input of ``rows`` rows (static shapes, by ONNX shape inference); a Flatten when its axis is
  the last (its input's rank known): ``(rows, C)``, as torch's exporter writes timm LeViT's
  ``bn(linear(x).flatten(0, 1))``.

Private to ``pybn.onnx``, imported after its guarded ``import onnx``.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ._checks import round_to
from ._onnx_graph import attr, is_default, label
from .fold import cancellation_problem, fold_bn_linear, fold_conv_bn

_CHAIN_OPS = ("Mul", "Add", "Sub", "Div")


class Affine(NamedTuple):
    """A per-channel map ``x -> y`` in batch norm form (float64 parameters)."""

    node: Any  # the (first) node computing it
    x: str
    y: str
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float
    nodes: tuple[Any, ...] = ()  # every node computing it (empty: `node` alone)
    ops: str = "BatchNormalization"  # for the report: "BatchNormalization", "Mul+Add"...
    axis1: bool = True  # it acts on axis 1 (a BatchNormalization); else on the layer's channel axis

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def all_nodes(self) -> tuple[Any, ...]:
        return self.nodes or (self.node,)

    def fold_after(self, weight: np.ndarray, bias: np.ndarray | None, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) of the layer followed by this map, float64 in, float64 out."""
        return fold_conv_bn(weight, bias, self.mean, self.var, self.scale, self.bias, eps=self.eps, **kw)

    def fold_before(self, weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | str:
        """(weight, bias) of this map followed by the layer, float64 in, float64 out; or why
        the layer would lose precision to cancellation."""
        return cancellation_problem(self.mean, self.var, self.eps, self.scale, self.bias) or \
            fold_bn_linear(weight, bias, self.mean, self.var, self.scale, self.bias, eps=self.eps)

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """(s, t) of ``x * s + t``, float64."""
        s = self.scale / np.sqrt(self.var + self.eps)
        return s, self.bias - self.mean * s


def bias_base(weight_name: str) -> str:
    """A name for a new bias next to `weight_name` ("conv1.weight" -> "conv1.bias")."""
    if weight_name.endswith("weight"):
        return weight_name[:-len("weight")] + "bias"
    return f"{weight_name}_bias"


def per_column(c: np.ndarray, n: int) -> np.ndarray | None:
    """A Gemm C / Add bias that is the same for every row, as a float64 (n,) vector; else None."""
    if c.shape in ((), (1,), (1, 1)):
        return np.full(n, float(c.reshape(())), dtype=np.float64)
    if c.shape in ((n,), (1, n)):
        return c.reshape(n).astype(np.float64)
    return None


def overflow(dtype: np.dtype, *arrays: np.ndarray) -> str | None:
    """Why the folded float64 `arrays` cannot be stored as `dtype` (None: they can)."""
    if all(np.all(np.isfinite(round_to(a, dtype).astype(np.float64))) for a in arrays):
        return None
    return f"the folded weights would not be finite in {np.dtype(dtype).name}"




def from_scale_shift(nodes: list[Any], x: str, y: str, s: np.ndarray, t: np.ndarray) -> Affine:
    n = s.shape[0]
    return Affine(nodes[0], x, y, s, t, np.zeros(n), np.ones(n), 0.0, tuple(nodes),
                  "+".join(node.op_type for node in nodes), False)


def per_channel(c: np.ndarray, channels: int, from_end: int, rank: int | None) -> np.ndarray | str:
    """Constant `c` as one float64 value per channel of a tensor of rank `rank` (None: unknown,
    at least 1) whose channels are axis `from_end` counted from the right; or why it is not."""
    if c.ndim > (1 if rank is None else rank):
        return f"its constant of shape {c.shape} has more dimensions than the layer's output"
    axis = c.ndim - from_end
    if any(n != 1 for i, n in enumerate(c.shape) if i != axis) or (axis >= 0 and c.shape[axis] not in (1, channels)):
        return f"its constant of shape {c.shape} is not one value per channel"
    v = c.astype(np.float64).reshape(-1)
    v = np.full(channels, v[0]) if v.size == 1 else v
    if not np.all(np.isfinite(v)):
        return "its constant is not finite"
    return v


class AffineRules:
    """The fold rules of per-channel chains and of batch norms behind a Transpose or Reshape."""

    graph: Any
    chains_left: dict[int, Affine]  # id(first node) -> a chain whose fold into its layer was refused

    def _no(self, node: Any, reason: str, partner: Any = None) -> bool:
        raise NotImplementedError

    def _record(self, kind: str, labels: tuple[str, ...]) -> bool:
        raise NotImplementedError

    # --- Conv/ConvTranspose/Gemm/MatMul(+Add) -> Mul/Add/Sub/Div by constants -----------------

    def _fold_chain_into_previous(self, node: Any) -> bool:
        if not is_default(node, *_CHAIN_OPS) or len(node.input) != 2:
            return False
        found = self._chain_layer(node)
        if found is None:
            return False
        layer, add, v, channels, from_end, rank, dtype = found
        chain = self._chain(node, v, channels, from_end, rank, dtype)
        if isinstance(chain, str):
            return self._no(node, chain, layer)
        if self.graph.single_use(v) is not node:
            return self._no(node, f"its input {v!r} is also used elsewhere", layer)
        if is_default(layer, "Conv", "ConvTranspose"):
            done = self._conv_bn(layer, chain)
        elif is_default(layer, "Gemm"):
            done = self._gemm_bn(layer, chain)
        else:
            done = self._matmul_bn(layer, add, chain)
        if not done:  # (reported with the reasons noted: a fold the dtype cannot hold, ...)
            self.chains_left[id(node)] = chain
        return done

    def _chain_layer(self, node: Any) -> tuple[Any, ...] | None:
        """(layer, its bias Add or None, the value the chain starts from, channels, channel axis
        from the right, output rank or None, weight dtype) when a chain starting at `node`
        follows a layer; else None."""
        for v in node.input:
            if self.graph.const(v) is not None:
                continue
            p = self.graph.producer.get(v)
            if p is None:
                return None
            if is_default(p, "Conv", "ConvTranspose") and len(p.input) > 1:
                w = self.graph.const(p.input[1])
                if w is None or w.ndim < 3:
                    return None
                groups = int(attr(p, "group", 1))
                out = groups * w.shape[1] if p.op_type == "ConvTranspose" else w.shape[0]
                return p, None, v, out, w.ndim - 1, w.ndim, w.dtype
            if is_default(p, "Gemm") and len(p.input) > 1:
                w = self.graph.const(p.input[1])
                if w is None or w.ndim != 2:
                    return None
                return p, None, v, w.shape[0 if attr(p, "transB", 0) else 1], 1, 2, w.dtype
            mm, add = (p, None) if is_default(p, "MatMul") else self._matmul_add(p)
            if mm is None or (add is None and is_default(node, "Add")):
                return None  # an Add right after a MatMul is its bias: the chain starts after it
            w = self.graph.const(mm.input[1]) if len(mm.input) == 2 else None
            if w is None or w.ndim != 2:
                return None
            return mm, add, v, w.shape[1], 1, self.graph.rank(mm.output[0]), w.dtype
        return None

    def _matmul_add(self, p: Any) -> tuple[Any, Any]:
        """(MatMul, Add) when `p` is an Add of a MatMul's output (read by it alone) and a constant."""
        if not is_default(p, "Add") or len(p.input) != 2:
            return None, None
        for k in (0, 1):
            mm = self.graph.producer.get(p.input[k])
            if mm is not None and is_default(mm, "MatMul") and self.graph.single_use(p.input[k]) is p \
                    and self.graph.const(p.input[1 - k]) is not None:
                return mm, p
        return None, None

    def _chain(self, node: Any, v: str, channels: int, from_end: int, rank: int | None, dtype: Any
               ) -> Affine | str:
        """The chain of Mul/Add/Sub/Div by constants from `node` (reading `v`) as one Affine:
        every node whose constant is one value per channel, each value read by the next alone."""
        s, t = np.ones(channels), np.zeros(channels)
        nodes: list[Any] = []
        cur, n = v, node
        while n is not None and is_default(n, *_CHAIN_OPS) and len(n.input) == 2 and \
                (not nodes or self.graph.single_use(cur) is n):
            k = 0 if n.input[0] == cur else 1 if n.input[1] == cur else None
            c = self.graph.const(n.input[1 - k]) if k is not None and n.input[0] != n.input[1] else None
            if c is None or k is None:
                break
            got = self._step(n.op_type, k, c, channels, from_end, rank, dtype, s, t)
            if isinstance(got, str):
                if not nodes:
                    return got
                break
            s, t = got
            nodes.append(n)
            cur = n.output[0]
            n = self.graph.single_use(cur)
        if not nodes:
            return "no constant per-channel operand"
        return from_scale_shift(nodes, v, cur, s, t)

    @staticmethod
    def _step(op: str, k: int, c: np.ndarray, channels: int, from_end: int, rank: int | None, dtype: Any,
              s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray] | str:
        """(s, t) after one more node: `op` with the running value as input `k`, constant `c`."""
        if c.dtype != dtype:
            return f"its constant is {c.dtype}, the layer's weight {np.dtype(dtype)}"
        p = per_channel(c, channels, from_end, rank)
        if isinstance(p, str):
            return p
        if op == "Mul":
            return s * p, t * p
        if op == "Add":
            return s, t + p
        if op == "Sub":
            return (s, t - p) if k == 0 else (-s, p - t)
        if k == 1:
            return "it divides a constant by the layer's output"
        if np.any(p == 0):
            return "it divides by 0 in some channel"
        return s / p, t / p

    # --- MatMul(+Add) or Gemm -> Transpose/Reshape -> BatchNormalization ------------------------

    def _reshaped_bn(self, shaper: Any, bn: Affine) -> bool:
        v = shaper.input[0] if shaper.input else ""
        if self.graph.single_use(v, shapes_too=False) is not shaper:  # (the layer's output keeps its name)
            return self._no(bn.node, f"the input of {label(shaper)} is also used elsewhere", shaper)
        p = self.graph.producer.get(v)
        if p is None:
            return False
        mm, add = (p, None) if is_default(p, "MatMul") else self._matmul_add(p)
        if mm is None and not is_default(p, "Gemm"):
            return False
        problem = self._channel_kept(shaper, v, bn.x)
        if problem:
            return self._no(bn.node, problem, shaper)
        s, t = bn.scale_shift()
        affine = from_scale_shift([bn.node], bn.x, bn.y, s, t)._replace(ops="BatchNormalization")
        layer = p if mm is None else mm
        done = self._fold_last_axis(layer, add, affine, v)
        if isinstance(done, str):
            return self._no(bn.node, done, layer)
        labels = tuple(label(n) for n in (layer, add, shaper, bn.node) if n is not None)
        self.graph.remove(bn.node)
        self.graph.set_output(shaper, 0, bn.y)
        return self._record(f"{layer.op_type}{'+Add' if add is not None else ''}+{shaper.op_type}+BatchNormalization",
                            labels)

    def _channel_kept(self, shaper: Any, v: str, out: str) -> str | None:
        """Why axis 1 of `out` (what `shaper` makes of `v`) may not be the last axis of `v`."""
        if is_default(shaper, "Transpose"):
            rank = self.graph.rank(v)
            if rank is None:
                return f"the rank of {v!r} is not known"
            perm = attr(shaper, "perm", None)
            perm = list(range(rank))[::-1] if perm is None else list(perm)
            if len(perm) < 2 or perm[1] != rank - 1:
                return f"perm={perm} does not move the channel axis (the last) to axis 1"
            return None
        if is_default(shaper, "Flatten"):
            rank = self.graph.rank(v)
            if rank is None:
                return f"the rank of {v!r} is not known"
            axis = attr(shaper, "axis", 1)
            if rank < 2 or axis % rank != rank - 1:  # (axis may count from the end)
                return f"Flatten(axis={axis}) of a rank-{rank} input does not keep the channel axis (the last) whole"
            return None
        if not is_default(shaper, "Reshape"):
            return f"{shaper.op_type} is not Transpose, Reshape or Flatten"
        shape_in, shape_out = self.graph.shape(v), self.graph.shape(out)
        if shape_in is None or shape_out is None:
            return "the shapes around the Reshape are not static"
        if len(shape_out) < 2 or shape_out[1] != shape_in[-1] or math.prod(shape_out[2:]) != 1 or \
                shape_out[0] != math.prod(shape_in[:-1]):
            return f"reshaping {shape_in} to {shape_out} does not keep the channel axis as axis 1"
        return None

    def _fold_last_axis(self, layer: Any, add: Any, affine: Affine, v: str) -> str | None:
        """Fold `affine` (per last axis) into a Gemm or MatMul(+Add) whose output `v` keeps its
        name; None when done."""
        if is_default(layer, "Gemm"):
            ops = self._gemm_operands(layer)
            if isinstance(ops, str):
                return ops
            if ops[0].shape[0] != affine.channels:
                return f"{ops[0].shape[0]} outputs, the batch norm has {affine.channels} channels"
            dtype = self.graph.const(layer.input[1]).dtype
            w_gemm, b_gemm = affine.fold_after(*ops)
            problem = overflow(dtype, w_gemm, b_gemm)
            if problem:
                return problem
            self._set_gemm(layer, w_gemm, b_gemm, dtype)
            return None
        w = self.graph.weight(layer.input[1], 2) if len(layer.input) == 2 else "it has no constant weight"
        if isinstance(w, str):
            return w
        if w.shape[1] != affine.channels:
            return f"{w.shape[1]} outputs, the batch norm has {affine.channels} channels"
        bias = None
        if add is not None:
            k = 1 if add.input[0] == layer.output[0] else 0
            c = self.graph.const(add.input[k])
            bias = per_column(c, w.shape[1]) if c is not None and c.dtype == w.dtype else None
            if bias is None:
                return f"{add.input[k]!r} is not a constant per-column bias of {label(layer)}"
        w2, b2 = affine.fold_after(w.T.astype(np.float64), bias)
        problem = overflow(w.dtype, w2, b2)
        if problem:
            return problem
        self.graph.set_input(layer, 1, self.graph.add_init(layer.input[1], w2.T, w.dtype))
        base = bias_base(layer.input[1])
        if add is not None:
            self.graph.set_input(add, k, self.graph.add_init(add.input[k], b2, w.dtype))
        else:  # MatMul -> (new name) -> a new Add of the folded bias -> v
            tmp = self.graph.fresh(v)
            self.graph.set_output(layer, 0, tmp)
            new = self.graph.new_node("Add", [tmp, self.graph.add_init(base, b2, w.dtype)], [v],
                                      layer.name and f"{layer.name}_bias")
            self.graph.insert_after(layer, new)
        return None

    # provided by the Folder
    def _conv_bn(self, conv: Any, bn: Affine) -> bool:
        raise NotImplementedError

    def _gemm_bn(self, gemm: Any, bn: Affine) -> bool:
        raise NotImplementedError

    def _matmul_bn(self, mm: Any, add: Any, bn: Affine) -> bool:
        raise NotImplementedError

    def _gemm_operands(self, gemm: Any) -> Any:
        raise NotImplementedError

    def _set_gemm(self, gemm: Any, w: np.ndarray, bias: np.ndarray, dtype: np.dtype) -> None:
        raise NotImplementedError
