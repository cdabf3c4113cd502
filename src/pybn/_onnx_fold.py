"""The fold rules behind :func:`pybn.onnx.fold`: ``Folder`` rewrites one model (a private copy).

The rules, applied until nothing changes: Identity and inference Dropout removed; a layer
followed by a BatchNormalization or a chain of Mul/Add/Sub/Div by per-channel constants takes
it into its weights (``pybn._onnx_affine``); a BatchNormalization followed by a Gemm, MatMul or
pointwise Conv is folded into it; then, with ``merge_branches``, summed Conv branches merge
(``pybn._onnx_branches``). They read and edit the graph through ``pybn._onnx_graph.GraphEditor``;
a rule that finds a reason not to fold notes it for the report of what was left.

Private to ``pybn.onnx``, imported after its guarded ``import onnx``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import onnx

from ._onnx_affine import Affine, AffineRules, bias_base, overflow, per_column
from ._onnx_branches import BranchRules
from ._onnx_files import ExternalData
from ._onnx_graph import FLOAT_WEIGHTS, GraphEditor, attr, drop_attrs, is_default, label, subgraphs
from .fold import batch_norm_fold_problem


class FoldRecord(NamedTuple):
    """One change made by :func:`fold`.

    ``kind`` names the pattern: ``"Conv+BatchNormalization"``, ``"ConvTranspose+BatchNormalization"``,
    ``"Gemm+BatchNormalization"``, ``"MatMul+BatchNormalization"``, ``"MatMul+Add+BatchNormalization"``,
    ``"BatchNormalization+Gemm"``, ``"BatchNormalization+MatMul"``, ``"BatchNormalization+Conv"``;
    a layer and the op types of a chain by per-channel constants (``"Conv+Mul+Add"``,
    ``"MatMul+Add+Mul"``...); a layer, a Transpose, Reshape or Flatten, and a batch norm
    (``"MatMul+Transpose+BatchNormalization"``, ``"Gemm+Reshape+BatchNormalization"``...) --
    folded into one layer; ``"branches"`` (summed Conv branches merged into the first node
    listed); or ``"Dropout"``, ``"Identity"`` (removed). ``nodes`` holds the names of the
    original nodes involved, in graph order (``"<op>:<first output>"`` for a node without a
    name); for ``"branches"`` the Conv that holds the merged weights comes first.
    """

    kind: str
    nodes: tuple[str, ...]

    def __str__(self) -> str:
        verb = "merged" if self.kind == "branches" else "removed" if "+" not in self.kind else "folded"
        return f"{verb} {self.kind}: {', '.join(self.nodes)}"


class NotFolded(NamedTuple):
    """A BatchNormalization, Dropout or Identity node that :func:`fold` left in the model, or a
    Mul -> Add pair by per-channel constants (an exported frozen batch norm, kind ``"Mul+Add"``).

    ``kind`` is the node's op type, ``nodes`` its name (as in FoldRecord; both names for a
    ``"Mul+Add"``), ``reason`` why it stays: what would make folding or removing it inexact, or
    what is not known.
    """

    kind: str
    nodes: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        return f"not folded {self.kind}: {', '.join(self.nodes)}: {self.reason}"


_LAYERS_BEFORE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_LAYERS_AFTER = ("Conv", "Gemm", "MatMul")
_LEFT = ("BatchNormalization", "Dropout", "Identity")
_DEFAULT_REASON = {"BatchNormalization": "no Conv, ConvTranspose, Gemm or MatMul next to it",
                   "Dropout": "it is not in inference mode", "Identity": "it is needed"}


# --- the rewriter --------------------------------------------------------------------------

class Folder(AffineRules, BranchRules):
    """Rewrites one ModelProto (a private copy) in place; `run` returns the report.

    The rules below read and edit the graph through `graph`, a GraphEditor. A rule returns
    True when it changed the graph; when it finds a reason not to, it notes it (`_no`) for
    the report of what was left.
    """

    def __init__(self, model: onnx.ModelProto, external: ExternalData | None = None,
                 merge_branches: bool = False) -> None:
        self.graph = GraphEditor(model, external)
        self.merge_branches = merge_branches
        self.report: list[Any] = []
        self.why: dict[int, tuple[Any, list[str]]] = {}  # id(node) -> (node, reasons it stays)
        self.chains_left: dict[int, Affine] = {}

    def run(self) -> list[Any]:
        rules = (self._remove_noop, self._fold_into_previous, self._fold_chain_into_previous, self._fold_into_next)
        changed = True
        while changed:  # until nothing changes: one rule can make room for another
            changed = False
            for rule in rules:
                for node in list(self.graph.nodes):
                    if id(node) not in self.graph.removed and rule(node):
                        changed = True
                self.graph.compact()
        if self.merge_branches:
            for node in list(self.graph.nodes):
                if id(node) not in self.graph.removed:
                    self._merge_branches(node)
            self.graph.compact()
        self._finish()
        self._report_left()
        return self.report

    def _no(self, node: Any, reason: str, partner: Any = None) -> bool:
        """Note why `node` stays (with `partner`: why it does not fold with that node)."""
        if partner is not None:
            reason = f"with {label(partner)}: {reason}"
        entry = self.why.get(id(node))
        if entry is None or entry[0] is not node:
            entry = self.why[id(node)] = (node, [])
        if reason not in entry[1]:
            entry[1].append(reason)
        return False

    # --- reading a BatchNormalization --------------------------------------------------------

    def _batch_norm(self, node: Any) -> Affine | str | None:
        """The parameters of an inference-mode, per-channel BatchNormalization; why it is not
        one (str); or None for any other node."""
        if not is_default(node, "BatchNormalization"):
            return None
        if len(node.input) < 5:
            return "it has fewer than 5 inputs"
        if any(o for o in node.output[1:]):
            return "it has the training-mode outputs (running mean and variance)"
        if self.graph.opset < 7 and not attr(node, "is_test", 0):
            return "is_test=0: training mode"
        if self.graph.opset < 9 and attr(node, "spatial", 1) != 1:
            return "spatial=0: statistics per element, not per channel"
        if self.graph.opset >= 14 and attr(node, "training_mode", 0) != 0:
            return "training_mode=1"
        names = list(node.input[1:5])
        params = []
        for name in names:
            p = self.graph.const(name)
            if p is None:
                return str(self.graph.const_problem(name))
            if p.dtype not in FLOAT_WEIGHTS:
                return f"{name!r} is {p.dtype}, not a float tensor"
            params.append(p)
        c = params[0].size
        if any(p.shape != (c,) for p in params):
            return f"its parameters have shapes {', '.join(str(p.shape) for p in params)}, not one (C,)"
        eps = float(attr(node, "epsilon", 1e-5))
        problem = batch_norm_fold_problem(dict(zip(names, params)), names[3], eps)
        if problem:
            return problem
        scale, bias, mean, var = (p.astype(np.float64) for p in params)
        return Affine(node, node.input[0], node.output[0], scale, bias, mean, var, eps)

    def _remove_all(self, bn: Affine) -> None:
        for n in bn.all_nodes:
            self.graph.remove(n)

    def _record(self, kind: str, labels: tuple[str, ...]) -> bool:
        self.report.append(FoldRecord(kind, labels))
        return True

    @staticmethod
    def _labels(*nodes: Any) -> tuple[str, ...]:
        return tuple(label(n) for n in nodes if n is not None)

    # --- rule 1: Identity and inference Dropout --------------------------------------------

    def _dropout_problem(self, node: Any) -> str | None:
        if len(node.output) > 1 and node.output[1] and self.graph.used(node.output[1]):
            return "its mask output is used"
        if self.graph.opset < 7:
            return None if attr(node, "is_test", 0) else "is_test=0: training mode"
        if self.graph.opset < 12 or len(node.input) < 3 or not node.input[2]:
            return None
        mode = self.graph.const(node.input[2])
        if mode is None:
            return "its training_mode input is not a constant"
        if mode.size != 1 or bool(mode.reshape(())):
            return "training_mode is true"
        return None

    def _remove_noop(self, node: Any) -> bool:
        if not is_default(node, "Identity", "Dropout") or not node.input or not node.input[0]:
            return False
        problem = self._dropout_problem(node) if node.op_type == "Dropout" else None
        if problem:
            return self._no(node, problem)
        x, y = node.input[0], node.output[0]
        if y in self.graph.sub_refs:
            return self._no(node, f"its output {y!r} is read in a subgraph")
        if y not in self.graph.outputs:
            self.graph.remove(node)
            self.graph.rename_uses(y, x)
        else:
            # y names a graph output: the producer of x takes the name y instead
            producer = self.graph.producer.get(x)
            if (producer is None or x in self.graph.outputs or x in self.graph.inputs or x in self.graph.inits
                    or x in self.graph.sub_refs):
                return self._no(node, f"its output is a graph output and its input {x!r} cannot take that name")
            self.graph.remove(node)
            self.graph.set_output(producer, list(producer.output).index(x), y)
            self.graph.rename_uses(x, y)
        return self._record(node.op_type, self._labels(node))

    # --- rule 2: a layer followed by a BatchNormalization -----------------------------------

    def _fold_into_previous(self, node: Any) -> bool:
        bn = self._batch_norm(node)
        if not isinstance(bn, Affine):
            return bn is not None and self._no(node, bn)
        prev = self.graph.producer.get(bn.x)
        if prev is None or not is_default(prev, *_LAYERS_BEFORE, "Add", "Transpose", "Reshape", "Flatten"):
            return False
        if self.graph.single_use(bn.x) is not node:
            return self._no(node, f"its input {bn.x!r} is also used elsewhere", prev)
        if is_default(prev, "Transpose", "Reshape", "Flatten"):
            return self._reshaped_bn(prev, bn)
        if is_default(prev, "Conv", "ConvTranspose"):
            return self._conv_bn(prev, bn)
        if is_default(prev, "Gemm"):
            return self._gemm_bn(prev, bn)
        if is_default(prev, "MatMul"):
            return self._matmul_bn(prev, None, bn)
        if len(prev.input) == 2:  # Add
            for k in (0, 1):
                mm = self.graph.producer.get(prev.input[k])
                if mm is None or not is_default(mm, "MatMul"):
                    continue
                if self.graph.single_use(prev.input[k]) is not prev:
                    self._no(node, f"the output of {label(mm)} is also used elsewhere", prev)
                elif self._matmul_bn(mm, prev, bn):
                    return True
        return False

    def _conv_bn(self, conv: Any, bn: Affine) -> bool:
        if len(conv.input) < 2:
            return self._no(bn.node, "it has no weight input", conv)
        w = self.graph.weight(conv.input[1])
        if isinstance(w, str) or w.ndim < 3:
            return self._no(bn.node, w if isinstance(w, str) else f"weight of shape {w.shape}", conv)
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        b = self.graph.const(conv.input[2]) if has_bias else None
        if has_bias and (b is None or b.ndim != 1):
            return self._no(bn.node, self.graph.const_problem(conv.input[2]) if b is None else
                            f"bias of shape {b.shape}", conv)
        groups = int(attr(conv, "group", 1))
        transposed = conv.op_type == "ConvTranspose"
        if groups < 1 or (transposed and w.shape[0] % groups):
            return self._no(bn.node, f"group={groups} does not divide its weight", conv)
        out = groups * w.shape[1] if transposed else w.shape[0]
        if out != bn.channels or (b is not None and b.shape != (out,)):
            return self._no(bn.node, f"{out} output channels, the batch norm has {bn.channels}", conv)
        w2, b2 = bn.fold_after(w.astype(np.float64), None if b is None else b.astype(np.float64),
                               transposed=transposed, groups=groups)
        problem = overflow(w.dtype, w2, b2)
        if problem:
            return self._no(bn.node, problem, conv)
        labels = self._labels(conv, *bn.all_nodes)
        b_base = conv.input[2] if has_bias else bias_base(conv.input[1])
        self.graph.set_input(conv, 1, self.graph.add_init(conv.input[1], w2, w.dtype))
        self.graph.set_input(conv, 2, self.graph.add_init(b_base, b2, w.dtype))
        self._remove_all(bn)
        self.graph.set_output(conv, 0, bn.y)
        return self._record(f"{conv.op_type}+{bn.ops}", labels)

    def _gemm_operands(self, gemm: Any) -> tuple[np.ndarray, np.ndarray | None] | str:
        """Gemm's effective (out, in) weight alpha*op(B) and per-column bias beta*C, float64; or why not."""
        if self.graph.opset < 7:
            return "opset < 7 (C broadcasts only with broadcast=1)"
        b = self.graph.weight(gemm.input[1], 2)
        if isinstance(b, str):
            return b
        w = b if attr(gemm, "transB", 0) else b.T
        w = float(attr(gemm, "alpha", 1.0)) * w.astype(np.float64)
        bias = None
        if len(gemm.input) > 2 and gemm.input[2]:
            c = self.graph.const(gemm.input[2])
            if c is None:
                return str(self.graph.const_problem(gemm.input[2]))
            if c.dtype != b.dtype:
                return f"C is {c.dtype}, B {b.dtype}"
            bias = per_column(c, w.shape[0])
            if bias is None:
                return f"C of shape {c.shape} is not the same for every row"
            bias = float(attr(gemm, "beta", 1.0)) * bias
        return w, bias

    def _set_gemm(self, gemm: Any, w: np.ndarray, bias: np.ndarray, dtype: np.dtype) -> None:
        """Gemm's B and C := the (out, in) weight `w` and `bias`, with alpha = beta = 1."""
        b_new = w if attr(gemm, "transB", 0) else w.T
        c_base = gemm.input[2] if len(gemm.input) > 2 and gemm.input[2] else bias_base(gemm.input[1])
        self.graph.set_input(gemm, 1, self.graph.add_init(gemm.input[1], b_new, dtype))
        self.graph.set_input(gemm, 2, self.graph.add_init(c_base, bias, dtype))
        drop_attrs(gemm, ("alpha", "beta"))

    def _gemm_bn(self, gemm: Any, bn: Affine) -> bool:
        ops = self._gemm_operands(gemm)
        if isinstance(ops, str):
            return self._no(bn.node, ops, gemm)
        if ops[0].shape[0] != bn.channels:
            return self._no(bn.node, f"{ops[0].shape[0]} outputs, the batch norm has {bn.channels} channels", gemm)
        dtype = self.graph.const(gemm.input[1]).dtype
        w, bias = bn.fold_after(*ops)
        problem = overflow(dtype, w, bias)
        if problem:
            return self._no(bn.node, problem, gemm)
        labels = self._labels(gemm, *bn.all_nodes)
        self._set_gemm(gemm, w, bias, dtype)
        self._remove_all(bn)
        self.graph.set_output(gemm, 0, bn.y)
        return self._record(f"Gemm+{bn.ops}", labels)

    def _rank2_problem(self, value: str, what: str) -> str | None:
        """Why `value` is not known to be rank 2 (BN's axis 1 is MatMul's feature axis only then)."""
        rank = self.graph.rank(value)
        if rank == 2:
            return None
        if rank is None:
            return f"the rank of {what} {value!r} is not known" + \
                (f": {self.graph.rank_failure}" if self.graph.rank_failure else "")
        return f"{what} {value!r} has rank {rank}; the fold is exact only for rank 2"

    def _matmul_bn(self, mm: Any, add: Any, bn: Affine) -> bool:
        if self.graph.opset < 7 or len(mm.input) != 2:
            return self._no(bn.node, "opset < 7", mm)
        # BN normalizes axis 1: that is MatMul's output axis only for a rank-2 product
        problem = self._rank2_problem(mm.output[0], "its output") if bn.axis1 else None
        if problem:
            return self._no(bn.node, problem, mm)
        w = self.graph.weight(mm.input[1], 2)
        if isinstance(w, str) or w.shape[1] != bn.channels:
            return self._no(bn.node, w if isinstance(w, str) else
                            f"{w.shape[1]} outputs, the batch norm has {bn.channels} channels", mm)
        bias = None
        if add is not None:
            c_name = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
            c = self.graph.const(c_name)
            if c is None or c.dtype != w.dtype or (bias := per_column(c, w.shape[1])) is None:
                return self._no(bn.node, f"{c_name!r} is not a constant per-column bias of {label(mm)}", add)
        w2, b2 = bn.fold_after(w.T.astype(np.float64), bias)
        problem = overflow(w.dtype, w2, b2)
        if problem:
            return self._no(bn.node, problem, mm)
        labels = self._labels(mm, add, *bn.all_nodes)
        b_base = bias_base(mm.input[1])
        self.graph.set_input(mm, 1, self.graph.add_init(mm.input[1], w2.T, w.dtype))
        self._remove_all(bn)
        if add is not None:
            k = 1 if add.input[0] == mm.output[0] else 0
            self.graph.set_input(add, k, self.graph.add_init(add.input[k], b2, w.dtype))
            self.graph.set_output(add, 0, bn.y)
            return self._record(f"MatMul+Add+{bn.ops}", labels)
        # the BN becomes an Add of the folded bias (and may keep its name)
        self.graph.node_names.discard(bn.node.name)
        new = self.graph.new_node("Add", [mm.output[0], self.graph.add_init(b_base, b2, w.dtype)], [bn.y],
                                  bn.node.name)
        self.graph.insert_after(bn.node, new)
        return self._record(f"MatMul+{bn.ops}", labels)

    # --- rule 3: a BatchNormalization followed by a Gemm, MatMul or 1x1 Conv -----------------

    def _fold_into_next(self, node: Any) -> bool:
        bn = self._batch_norm(node)
        if not isinstance(bn, Affine):
            return bn is not None and self._no(node, bn)
        readers = [n for n, _ in self.graph.uses.get(bn.y, [])]
        layers = [n for n in readers if is_default(n, *_LAYERS_AFTER)]
        if not layers:
            return False
        nxt = self.graph.single_use(bn.y)
        if nxt is None:
            return self._no(node, f"its output {bn.y!r} is also used elsewhere", layers[0])
        if nxt.input[0] != bn.y:
            return self._no(node, f"its output is not the first input of {label(nxt)}", nxt)
        if is_default(nxt, "Gemm"):
            return self._bn_gemm(bn, nxt)
        if is_default(nxt, "MatMul"):
            return self._bn_matmul(bn, nxt)
        return self._bn_conv(bn, nxt)

    def _fold_before(self, bn: Affine, layer: Any, dtype: np.dtype, weight: np.ndarray, bias: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray] | None:
        """(weight, bias) of `layer` with `bn` before it, float64; None once it says why not."""
        folded = bn.fold_before(weight, bias)
        if isinstance(folded, str):
            self._no(bn.node, folded, layer)
            return None
        problem = overflow(dtype, *folded)
        if problem:
            self._no(bn.node, problem, layer)
            return None
        return folded

    def _bn_gemm(self, bn: Affine, gemm: Any) -> bool:
        if attr(gemm, "transA", 0):  # then BN's channels are Gemm's rows, not its contraction axis
            return self._no(bn.node, "transA=1: the batch norm's channels are the rows of the product", gemm)
        ops = self._gemm_operands(gemm)
        if isinstance(ops, str):
            return self._no(bn.node, ops, gemm)
        if ops[0].shape[1] != bn.channels:
            return self._no(bn.node, f"{ops[0].shape[1]} inputs, the batch norm has {bn.channels} channels", gemm)
        dtype = self.graph.const(gemm.input[1]).dtype
        folded = self._fold_before(bn, gemm, dtype, *ops)
        if folded is None:
            return False
        w, bias = folded
        labels = self._labels(bn.node, gemm)
        self._set_gemm(gemm, w, bias, dtype)
        self._remove_all(bn)
        self.graph.set_input(gemm, 0, bn.x)
        return self._record("BatchNormalization+Gemm", labels)

    def _bn_matmul(self, bn: Affine, mm: Any) -> bool:
        if self.graph.opset < 7 or len(mm.input) != 2:
            return self._no(bn.node, "opset < 7", mm)
        # BN's channels (axis 1) are MatMul's contraction axis (the last) only for rank 2
        problem = self._rank2_problem(bn.x, "its input")
        if problem:
            return self._no(bn.node, problem, mm)
        w = self.graph.weight(mm.input[1], 2)
        if isinstance(w, str) or w.shape[0] != bn.channels:
            return self._no(bn.node, w if isinstance(w, str) else
                            f"{w.shape[0]} inputs, the batch norm has {bn.channels} channels", mm)
        z = mm.output[0]
        add = self.graph.single_use(z)
        bias = None
        if add is not None and is_default(add, "Add") and len(add.input) == 2 and z in add.input \
                and add.input[0] != add.input[1]:
            c = self.graph.const(add.input[1] if add.input[0] == z else add.input[0])
            if c is not None and c.dtype == w.dtype:
                bias = per_column(c, w.shape[1])
        if bias is None:
            add = None
        folded = self._fold_before(bn, mm, w.dtype, w.T.astype(np.float64), bias)
        if folded is None:
            return False
        w2, b2 = folded
        labels = self._labels(bn.node, mm)
        b_base = bias_base(mm.input[1])
        self.graph.set_input(mm, 1, self.graph.add_init(mm.input[1], w2.T, w.dtype))
        if add is not None:
            k = 1 if add.input[0] == z else 0
            self.graph.set_input(add, k, self.graph.add_init(add.input[k], b2, w.dtype))
        else:  # MatMul -> (new name) -> a new Add of the folded bias -> z
            tmp = self.graph.fresh(z)
            self.graph.set_output(mm, 0, tmp)
            new = self.graph.new_node("Add", [tmp, self.graph.add_init(b_base, b2, w.dtype)], [z],
                                      mm.name and f"{mm.name}_bias")
            self.graph.insert_after(mm, new)
        self._remove_all(bn)
        self.graph.set_input(mm, 0, bn.x)
        return self._record("BatchNormalization+MatMul", labels)

    def _bn_conv(self, bn: Affine, conv: Any) -> bool:
        # exact only for a pointwise conv without padding: padding would see zeros, not BN(x)
        if len(conv.input) < 2 or int(attr(conv, "group", 1)) != 1:
            return self._no(bn.node, "a batch norm folds only into a Conv with group=1", conv)
        w = self.graph.weight(conv.input[1])
        if isinstance(w, str):
            return self._no(bn.node, w, conv)
        if w.ndim < 3 or any(k != 1 for k in w.shape[2:]):
            return self._no(bn.node, f"kernel {w.shape[2:]} is not 1x1 (a padded border would not see the "
                                     "batch norm's shift)", conv)
        if w.shape[1] != bn.channels:
            return self._no(bn.node, f"{w.shape[1]} input channels, the batch norm has {bn.channels}", conv)
        auto_pad = attr(conv, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad == "NOTSET" and any(attr(conv, "pads", [])):
            return self._no(bn.node, "it pads its input: the zero border would not see the batch norm's shift", conv)
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        b = self.graph.const(conv.input[2]) if has_bias else None
        if has_bias and (b is None or b.shape != (w.shape[0],)):
            return self._no(bn.node, self.graph.const_problem(conv.input[2]) if b is None else
                            f"bias of shape {b.shape}", conv)
        folded = self._fold_before(bn, conv, w.dtype, w.astype(np.float64), None if b is None else b.astype(np.float64))
        if folded is None:
            return False
        w2, b2 = folded
        labels = self._labels(bn.node, conv)
        b_base = conv.input[2] if has_bias else bias_base(conv.input[1])
        self.graph.set_input(conv, 1, self.graph.add_init(conv.input[1], w2, w.dtype))
        self.graph.set_input(conv, 2, self.graph.add_init(b_base, b2, w.dtype))
        self._remove_all(bn)
        self.graph.set_input(conv, 0, bn.x)
        return self._record("BatchNormalization+Conv", labels)

    # --- clean-up and the report ------------------------------------------------------------------

    def _finish(self) -> None:
        g = self.graph.proto
        # Constant nodes that nothing reads any more
        for n in self.graph.nodes:
            if is_default(n, "Constant") and not any(self.graph.used(o) for o in n.output):
                self.graph.remove(n)
        self.graph.compact()
        # delete in place, from the back (no copies of the weights that stay)
        for i in reversed(range(len(g.initializer))):
            name = g.initializer[i].name
            if not self.graph.used(name) and name not in self.graph.inputs:
                del g.initializer[i]
        added = [t for t in self.graph.new_inits if self.graph.used(t.name)]
        g.initializer.extend(added)
        if self.graph.model.ir_version < 4:  # (IR 3: every initializer is also a graph input)
            g.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in added)
        del g.node[:]
        g.node.extend(self.graph.nodes)
        live = self.graph.inputs | self.graph.outputs | set(self.graph.uses) | set(self.graph.producer)
        for i in reversed(range(len(g.value_info))):
            if g.value_info[i].name not in live:
                del g.value_info[i]

    def _report_left(self) -> None:
        """One NotFolded per BatchNormalization, Dropout and Identity node, and per Mul+Add pair by
        per-channel constants (a frozen batch norm), left, in graph order."""
        for n in self.graph.nodes:
            node, reasons = self.why.get(id(n), (None, []))
            reasons = reasons if node is n else []
            if is_default(n, *_LEFT):
                reason = "; ".join(reasons) or _DEFAULT_REASON[n.op_type]
                self.report.append(NotFolded(n.op_type, (label(n),), reason))
            elif self._frozen_batch_norm(n):
                nxt = self.graph.single_use(n.output[0])
                reason = "; ".join(reasons) or "no Conv, ConvTranspose, Gemm or MatMul before it"
                self.report.append(NotFolded("Mul+Add", (label(n), label(nxt)), reason))
            elif id(n) in self.chains_left and reasons:
                chain = self.chains_left[id(n)]
                self.report.append(NotFolded(chain.ops, tuple(label(c) for c in chain.all_nodes), "; ".join(reasons)))
        for n in self.graph.nodes:
            for g in subgraphs(n):
                self._report_nested(g.node, f"a subgraph of {label(n)}")
        for function in self.graph.model.functions:
            self._report_nested(function.node, f"function {function.domain}.{function.name}")

    def _frozen_batch_norm(self, n: Any) -> bool:
        """A Mul by a constant of several values whose output goes only to an Add of one."""
        if not is_default(n, "Mul") or len(n.input) != 2:
            return False
        nxt = self.graph.single_use(n.output[0])
        if nxt is None or not is_default(nxt, "Add") or len(nxt.input) != 2:
            return False
        consts = [self.graph.const(i) for i in (*n.input, *nxt.input)]
        return bool(sum(c is not None and c.size > 1 for c in consts) == 2)

    def _report_nested(self, nodes: Any, owner: str) -> None:
        for n in nodes:
            if is_default(n, *_LEFT):
                self.report.append(NotFolded(n.op_type, (label(n),), f"inside {owner}: only the main graph is folded"))
            for g in subgraphs(n):
                self._report_nested(g.node, owner)
