"""Merging parallel Conv branches summed into one Conv, for :func:`pybn.onnx.fold` with
``merge_branches=True`` (a mixin of ``pybn._onnx_fold.Folder``, run after the folds).

An Add (or a tree of Adds, each inner one read by the next alone) whose operands are, over one
input ``X``: Convs of ``X`` (their batch norms folded already), a BatchNormalization of ``X``
(the identity branch), ``X`` itself, or constants of one value per channel, equals one Conv of
``X`` whose kernel is the sum of the branch kernels, each placed where it reads the same input
positions, plus the identity branches as one tap per channel, and whose bias is the sum of the
biases. Exact when the Convs share strides, dilations, group and channels, with explicit pads
(``auto_pad`` NOTSET or VALID), and each Conv's window sits inside the largest one with the same
output size: per dimension ``begin + end - dilation * (kernel - 1)`` equal, and the begin pads
differing by a multiple of the dilation. An identity branch needs strides 1, an output the size
of the input, and as many output as input channels.

Private to ``pybn.onnx``, imported after its guarded ``import onnx``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ._onnx_affine import Affine, bias_base, overflow, per_channel
from ._onnx_graph import attr, is_default, label


class _Conv(NamedTuple):
    node: Any
    weight: np.ndarray
    bias: np.ndarray | None
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]
    group: int


class BranchRules:
    """The rule merging summed branches."""

    graph: Any

    def _batch_norm(self, node: Any) -> Affine | str | None:
        raise NotImplementedError

    def _record(self, kind: str, labels: tuple[str, ...]) -> bool:
        raise NotImplementedError

    def _no(self, node: Any, reason: str, partner: Any = None) -> bool:
        raise NotImplementedError

    def _merge_branches(self, root: Any) -> bool:
        if not self._is_add(root) or self._inner_add(root):
            return False
        adds: list[Any] = []
        leaves = self._leaves(root, adds)
        found = [self._branch(v, adds) for v in leaves]
        branches = [b for b in found if b is not None]
        if len(branches) != len(found):
            return False
        inputs = {x for kind, _, x in branches if kind != "const"}
        readable = [self._conv(node) for kind, node, _ in branches if kind == "conv"]
        if len(inputs) != 1 or not readable or len(branches) < 2:
            return False
        convs = [c for c in readable if isinstance(c, _Conv)]
        if len(convs) != len(readable):
            bad = next(c for c in readable if not isinstance(c, _Conv))
            return self._note_bns(branches, bad or "a Conv has no constant weight")
        merged = self._merged(convs, branches)
        if isinstance(merged, str):
            return self._note_bns(branches, merged)
        main, weight, bias = merged
        dtype = main.weight.dtype
        labels = tuple(label(n) for n in [main.node, *(c.node for c in convs if c is not main),
                                          *(b[1].node for b in branches if b[0] == "affine"), *adds])
        has_bias = len(main.node.input) > 2 and bool(main.node.input[2])
        self.graph.set_input(main.node, 1, self.graph.add_init(main.node.input[1], weight, dtype))
        base = main.node.input[2] if has_bias else bias_base(main.node.input[1])
        self.graph.set_input(main.node, 2, self.graph.add_init(base, bias, dtype))
        for n in [*adds, *(c.node for c in convs if c is not main), *(b[1].node for b in branches if b[0] == "affine")]:
            self.graph.remove(n)
        self.graph.set_output(main.node, 0, root.output[0])
        return self._record("branches", labels)

    def _note_bns(self, branches: list[Any], reason: str) -> bool:
        for kind, item, _ in branches:
            if kind == "affine":
                self._no(item.node, f"branches not merged: {reason}")
        return False

    def _is_add(self, node: Any) -> bool:
        return is_default(node, "Add") and len(node.input) == 2 and node.input[0] != node.input[1]

    def _inner_add(self, node: Any) -> bool:
        user = self.graph.single_use(node.output[0])
        return user is not None and self._is_add(user)

    def _leaves(self, add: Any, adds: list[Any]) -> list[str]:
        adds.append(add)
        out = []
        for v in add.input:
            p = self.graph.producer.get(v)
            if p is not None and self._is_add(p) and self.graph.single_use(v) is add:
                out += self._leaves(p, adds)
            else:
                out.append(v)
        return out

    def _branch(self, v: str, adds: list[Any]) -> tuple[str, Any, Any] | None:
        """("conv", node, X), ("affine", Affine, X), ("x", None, X) or ("const", array, None)."""
        c = self.graph.const(v)
        if c is not None:
            return "const", c, None
        p = self.graph.producer.get(v)
        single = self.graph.single_use(v) in adds
        if p is not None and is_default(p, "Conv") and single and len(p.input) > 1:
            return "conv", p, p.input[0]
        if p is not None and is_default(p, "BatchNormalization") and single:
            bn = self._batch_norm(p)
            return ("affine", bn, bn.x) if isinstance(bn, Affine) else None
        return "x", None, v

    def _conv(self, node: Any) -> _Conv | str | None:
        w = self.graph.weight(node.input[1])
        if isinstance(w, str) or w.ndim < 3:
            return w if isinstance(w, str) else None
        b = None
        if len(node.input) > 2 and node.input[2]:
            b = self.graph.const(node.input[2])
            if b is None or b.shape != (w.shape[0],):
                return f"the bias of {label(node)} is not a constant of one value per channel"
        k = w.ndim - 2
        auto_pad = attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad not in ("NOTSET", "VALID"):
            return f"{label(node)} pads with auto_pad={auto_pad}"
        pads = list(attr(node, "pads", [0] * 2 * k)) if auto_pad == "NOTSET" else [0] * 2 * k
        return _Conv(node, w, b, tuple(attr(node, "strides", [1] * k)), tuple(attr(node, "dilations", [1] * k)),
                     tuple(pads[:k]), tuple(pads[k:]), int(attr(node, "group", 1)))

    def _merged(self, convs: list[_Conv], branches: list[Any]) -> tuple[_Conv, np.ndarray, np.ndarray] | str:
        first = convs[0]
        key = (first.strides, first.dilations, first.group, first.weight.shape[:2], first.weight.dtype)
        if any((c.strides, c.dilations, c.group, c.weight.shape[:2], c.weight.dtype) != key for c in convs):
            return "their strides, dilations, group, channels or dtype differ"
        main = max(convs, key=lambda c: np.prod(c.weight.shape[2:]))
        kernel = main.weight.shape[2:]
        reach = [b + e - d * (k - 1) for b, e, d, k in zip(main.begin, main.end, main.dilations, kernel)]
        weight = np.zeros(main.weight.shape, np.float64)
        out = main.weight.shape[0]
        bias = np.zeros(out, np.float64)
        for c in convs:
            offsets = []
            for b, e, d, k, big_b, big_k, r in zip(c.begin, c.end, c.dilations, c.weight.shape[2:], main.begin,
                                                 kernel, reach):
                shift, rest = divmod(big_b - b, d)
                if b + e - d * (k - 1) != r or rest or shift < 0 or shift + k > big_k:
                    return f"the window of {label(c.node)} does not sit inside that of {label(main.node)}"
                offsets.append(shift)
            region = (slice(None), slice(None), *(slice(o, o + k) for o, k in zip(offsets, c.weight.shape[2:])))
            weight[region] += c.weight.astype(np.float64)
            if c.bias is not None:
                bias += c.bias.astype(np.float64)
        rank = main.weight.ndim
        for kind, item, _ in branches:
            if kind == "const":
                if item.dtype != main.weight.dtype:
                    return f"a constant operand is {item.dtype}, the weights {main.weight.dtype}"
                p = per_channel(item, out, rank - 1, rank)
                if isinstance(p, str):
                    return p
                bias += p
            elif kind in ("x", "affine"):
                problem = self._add_identity(main, reach, item, weight, bias)
                if problem:
                    return problem
        problem = overflow(main.weight.dtype, weight, bias)
        return problem or (main, weight, bias)

    @staticmethod
    def _add_identity(main: _Conv, reach: list[int], bn: Affine | None, weight: np.ndarray, bias: np.ndarray
                      ) -> str | None:
        out, per_group = main.weight.shape[0], main.weight.shape[1]
        if any(s != 1 for s in main.strides) or any(r != 0 for r in reach):
            return "an identity branch needs strides 1 and an output the size of the input"
        if out != per_group * main.group:
            return "an identity branch needs as many input as output channels"
        centre = []
        for b, d, k in zip(main.begin, main.dilations, main.weight.shape[2:]):
            tap, rest = divmod(b, d)
            if rest or tap >= k:
                return "the kernel has no tap on the input position itself"
            centre.append(tap)
        s, t = (np.ones(out), np.zeros(out)) if bn is None else bn.scale_shift()
        if s.shape != (out,):
            return f"the identity batch norm has {s.shape[0]} channels, the Conv {out}"
        channels = np.arange(out)
        weight[(channels, channels % per_group) + tuple(centre)] += s
        bias += t
        return None
