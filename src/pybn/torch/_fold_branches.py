"""Merging parallel branches summed into one convolution (``merge_branches=True``): the
structural re-parameterization of RepVGG and MobileOne blocks, after batch norm folding.

An add (or a tree of adds, each inner one used only by the next) whose operands are, over one
input ``x``: convolutions of ``x``, a per-channel affine map of ``x`` (the identity branch's
batch norm), ``x`` itself, or numbers, equals one convolution of ``x`` whose kernel is the sum
of the branches' kernels, each placed at the offset where it reads the same input positions,
and whose bias is the sum of their biases. It is exact when the convolutions share stride,
dilation, groups and channels, pad with zeros, and every output reads the same window of ``x``
(``2 * padding - dilation * (kernel - 1)`` equal in every dimension: a 1x1 kernel with padding
0 sits at the centre of a 3x3 with padding 1). The identity and affine branches are a kernel
with one tap, at the centre, on the channel itself; they need stride 1 and in == out channels.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import fx

from ._fold_affine import FoldGraph, Ranks, Step, step_arrays, step_input, step_producing
from ._fold_modules import finite, rounded_like, to_numpy
from ._fold_ops import in_place, op, op_of, value_users
from ._fold_weights import Layer


class _Branch(NamedTuple):
    leaf: Any  # the add operand: a node, or a number
    layer: Layer | None = None  # a conv of x
    steps: tuple[Step, ...] = ()  # a per-channel map of x (empty with no layer: x itself, or a number)


def merge_branches(g: FoldGraph) -> None:
    if hasattr(g, "refresh"):
        g.refresh()
    for node in list(g.graph.nodes):
        if node not in g.erased and _is_add(node) and not _inner_add(node):
            _merge(g, node)


def _is_add(node: Any) -> bool:
    o = op(node)
    return o is not None and o.kind == "add" and o.get("alpha", 1) == 1 and o.get("other") is not o.get("input")


def _inner_add(node: fx.Node) -> bool:
    """Whether `node` is an operand of the add that alone uses it (then that add is the root)."""
    users = value_users(node)
    return len(users) == 1 and _is_add(users[0])


def _leaves(node: fx.Node, root: fx.Node, adds: list[fx.Node]) -> list[Any]:
    if not (isinstance(node, fx.Node) and _is_add(node) and (node is root or _inner_add(node))):
        return [node]
    adds.append(node)
    o = op_of(node)
    return _leaves(o.get("input"), root, adds) + _leaves(o.get("other"), root, adds)


def _classify(g: FoldGraph, leaf: Any) -> tuple[_Branch, Any] | None:
    """(the branch, its input x) of an add operand; None when it is no branch of one input."""
    if not isinstance(leaf, fx.Node):
        return (_Branch(leaf), None) if isinstance(leaf, (int, float)) and not isinstance(leaf, bool) else None
    layer = g.layer(leaf)
    if layer is not None:
        x = layer.node.args[0] if layer.node.args else None
        return (_Branch(leaf, layer), x) if layer.kind == "conv" and not layer.transposed else None
    steps: list[Step] = []
    cur = leaf
    while True:
        found = step_producing(g, cur)
        if found is None or (steps and found.owner != steps[0].owner):
            break
        steps.insert(0, found)
        cur = step_input(found)
    if steps:
        if any(len(value_users(s.out)) != 1 for s in steps):
            return None
        return _Branch(leaf, None, tuple(steps)), cur
    return _Branch(leaf), leaf  # x itself


def _merge(g: FoldGraph, root: fx.Node) -> None:
    adds: list[fx.Node] = []
    leaves = _leaves(root, root, adds)
    if any(in_place(a) and len(value_users(op_of(a).get("input"))) != 1 for a in adds):
        return  # `x += ...` changes a tensor that something else reads after the merge too
    classified = [_classify(g, leaf) for leaf in leaves]
    found = [f for f in classified if f is not None]
    if len(found) != len(classified):
        return
    branches = [b for b, _ in found]
    inputs = {id(x): x for _, x in found if x is not None}
    convs = [b.layer for b in branches if b.layer is not None]
    if len(inputs) != 1 or not convs or len(branches) < 2:
        return
    x = next(iter(inputs.values()))
    merged = _merged(g, convs, branches, x)
    if isinstance(merged, str):
        names = ", ".join(c.name for c in convs)
        for b in branches:
            for s in b.steps[:1]:
                g.report.note(s.owner, f"with {names}: branches not merged: {merged}")
        return
    main, weight, bias = merged
    g.write(main, weight, bias)
    root.replace_all_uses_with(main.node)
    erase = [*adds, *(c.node for c in convs if c is not main), *(n for b in branches for s in b.steps for n in s.nodes)]
    gone = set(erase)
    _move_first(g, main.node, [c.node for c in convs] + [n for b in branches for s in b.steps for n in s.nodes])
    for n in erase:  # what is left reading them reads only their shape, the merged conv's shape
        n.replace_all_uses_with(main.node, delete_user_cb=lambda u: u not in gone)
    g.erase(sorted(erase, key=_order(g)), [c for b in branches for s in b.steps for c in s.constants])
    for b in branches:
        for s in b.steps:
            g.folded_owners.add(s.owner)
    others = [c.name for c in convs if c is not main] + [s.owner for b in branches for s in b.steps[:1]]
    g.report.done("branches", main.name, *others)


def _move_first(g: FoldGraph, node: fx.Node, branch_nodes: list[fx.Node]) -> None:
    """Move `node` (and the constants it reads) before the first of `branch_nodes`, so that what
    read their shapes can read its shape instead. Its input x comes before every branch."""
    order = _order(g)
    first = min(branch_nodes, key=order)
    if order(node) <= order(first):
        return
    todo, moving = [node], []
    while todo:
        n = todo.pop()
        if n not in moving and order(n) > order(first):
            moving.append(n)
            todo.extend(n.all_input_nodes)
    for n in sorted(moving, key=order):
        first.prepend(n)


def _order(g: FoldGraph) -> Any:
    index = {n: k for k, n in enumerate(g.graph.nodes)}
    return lambda n: index[n]


class _Window(NamedTuple):
    kernel: tuple[int, ...]
    padding: tuple[int, ...]


def _window(layer: Layer, dilation: tuple[int, ...]) -> _Window | str:
    kernel = tuple(layer.weight.shape[2:])
    padding = layer.padding
    if padding == "valid":
        padding = (0,) * len(kernel)
    elif padding == "same":
        if any(d * (k - 1) % 2 for d, k in zip(dilation, kernel)):
            return f"{layer.name} pads 'same' unevenly"
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
    padding = tuple(padding) * (len(kernel) if len(tuple(padding)) == 1 else 1)
    return _Window(kernel, padding)


def _conv_settings(layer: Layer) -> tuple[Any, Any, str]:
    """(stride, dilation, padding mode) of a conv layer, as tuples."""
    k = layer.spatial
    if layer.module is not None:
        m: Any = layer.module
        return tuple(m.stride), tuple(m.dilation), str(m.padding_mode)
    o = op_of(layer.node)

    def tup(v: Any, default: int) -> tuple[int, ...]:
        v = default if v is None else v
        return tuple(v) * (k if len(tuple(v)) == 1 else 1) if isinstance(v, (list, tuple)) else (v,) * k
    return tup(o.get("stride", 1), 1), tup(o.get("dilation", 1), 1), "zeros"


def _merged(g: FoldGraph, convs: list[Layer], branches: list[_Branch], x: fx.Node
            ) -> tuple[Layer, torch.Tensor, torch.Tensor] | str:
    """(the conv that takes the merged weights, its weight, its bias), or why the branches do not merge."""
    for c in convs:
        if len(value_users(c.node)) != 1:
            return f"the output of {c.name} is used elsewhere"
        problem = g.layer_problem(c)
        if problem:
            return problem
    first = convs[0]
    settings = _conv_settings(first)
    if any(_conv_settings(c) != settings for c in convs) or \
            any((c.groups, c.in_channels, c.out_channels, c.weight.dtype) !=
                (first.groups, first.in_channels, first.out_channels, first.weight.dtype) for c in convs):
        return "their stride, dilation, padding mode, groups, channels or dtype differ"
    stride, dilation, mode = settings
    found = [_window(c, dilation) for c in convs]
    bad = next((w for w in found if isinstance(w, str)), None)
    if bad:
        return bad
    windows = [w for w in found if not isinstance(w, str)]
    if mode != "zeros" and any(p for w in windows for p in w.padding):
        return f"they pad with {mode!r}, not zeros"
    main_index = max(range(len(convs)), key=lambda i: np.prod(windows[i].kernel))
    main, main_window = convs[main_index], windows[main_index]
    reach = [2 * p - d * (k - 1) for p, d, k in zip(main_window.padding, dilation, main_window.kernel)]
    weight = np.zeros(tuple(main.weight.shape), np.float64)
    bias = np.zeros(main.out_channels, np.float64)
    for c, w in zip(convs, windows):
        offsets = _offsets(w, main_window, dilation, reach)
        if isinstance(offsets, str):
            return f"{c.name}: {offsets}"
        region = (slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(offsets, w.kernel))
        weight[region] += to_numpy(c.weight).astype(np.float64)
        if c.bias is not None:
            bias += to_numpy(c.bias).astype(np.float64)
    for b in branches:
        if b.layer is not None:
            continue
        if not isinstance(b.leaf, fx.Node):
            bias += float(b.leaf)
            continue
        problem = _add_identity(b, main, main_window, stride, dilation, reach, Ranks.of(g, x), weight, bias)
        if problem:
            return problem
    out_weight, out_bias = rounded_like(weight, main.weight), rounded_like(bias, main.weight)
    if not (finite(out_weight) and finite(out_bias)):
        return f"the merged weights overflow {str(main.weight.dtype)[6:]}"
    return main, out_weight, out_bias


def _offsets(w: _Window, main: _Window, dilation: tuple[int, ...], reach: list[int]) -> tuple[int, ...] | str:
    """Where the kernel of window `w` sits inside the main kernel, reading the same positions."""
    out = []
    for k, p, big_k, big_p, d, r in zip(w.kernel, w.padding, main.kernel, main.padding, dilation, reach):
        if 2 * p - d * (k - 1) != r:
            return "its output positions read another window of the input"
        shift, rest = divmod(big_p - p, d)
        if rest or shift < 0 or shift + k > big_k:
            return "its kernel does not sit inside the largest one"
        out.append(shift)
    return tuple(out)


def _add_identity(b: _Branch, main: Layer, window: _Window, stride: tuple[int, ...], dilation: tuple[int, ...],
                  reach: list[int], ranks: Ranks, weight: np.ndarray, bias: np.ndarray) -> str | None:
    """Add x, or a per-channel map of x, as one tap per channel at the centre of the kernel."""
    if any(s != 1 for s in stride) or any(r != 0 for r in reach):
        return "an identity branch needs stride 1 and an output the size of the input"
    if main.in_channels != main.out_channels:
        return "an identity branch needs as many input as output channels"
    centre = []
    for big_p, d, big_k in zip(window.padding, dilation, window.kernel):
        tap, rest = divmod(big_p, d)
        if rest or tap >= big_k:
            return "the kernel has no tap on the input position itself"
        centre.append(tap)
    n = main.out_channels
    s, t = np.ones(n), np.zeros(n)
    for step in b.steps:
        got = step_arrays(step, ranks, main, False)
        if isinstance(got, str):
            return got
        s, t = s * got[0], t * got[0] + got[1]
    per_group = n // main.groups
    channels = np.arange(n)
    weight[(channels, channels % per_group) + tuple(centre)] += s
    bias += t
    return None
