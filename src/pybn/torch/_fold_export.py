"""Folding a ``torch.export.ExportedProgram`` (:func:`pybn.torch.fold` given one).

The program's ATen graph reads parameters, buffers and constants as placeholders, listed in its
graph signature with their names in its state dict. Layers are ``conv*d`` / ``convolution`` /
``linear`` calls whose weight (and bias) are parameters or buffers read by nothing else; the
per-channel steps around them are ``batch_norm`` calls in eval mode and arithmetic by constants
(``pybn.torch._fold_affine``). Shapes are in the graph (``meta["val"]``), so every rank is known.

The result is a new program: a copy of the graph with the folds made, the folded weights in
place of the old ones in its state dict, a bias parameter added (``<layer>.bias``) where a layer
had none, and the parameters and buffers nothing reads any more dropped from the signature and
the state dict. The input program is not modified.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, OutputSpec, TensorArgument

from ._fold_affine import FoldGraph, affine_modules_left, batch_norm_calls_left, call_problem
from ._fold_graph import fold_layers, functional_layer, functional_layer_problem, set_arg
from ._fold_ops import owner
from ._fold_report import Folded, NotFolded, Report
from ._fold_weights import Layer

_CONSTANT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
_MATMULS = (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)


class ExportGraph(FoldGraph):
    """A copy of an ExportedProgram's graph, with its parameters, buffers and constants."""

    example = True  # every rank is known (or the node has no tensor value)

    def __init__(self, ep: ExportedProgram, report: Report) -> None:
        graph, copies = fx.Graph(), dict[fx.Node, fx.Node]()
        graph.output(graph.graph_copy(ep.graph, copies))
        for old, new in copies.items():  # (fx renames a node named like a builtin: "input" -> "input_1")
            if new.name != old.name:
                new.name = old.name
        super().__init__(fx.GraphModule(ep.graph_module, graph), report)
        self.specs = list(ep.graph_signature.input_specs)
        self.state_dict = dict(ep.state_dict)
        self.constants = dict(ep.constants)
        self.mutated = {s.target for s in ep.graph_signature.output_specs if s.target}
        self.added: set[str] = set()
        self.read_before = {n.name for n in graph.nodes if n.op == "placeholder" and n.users}

    def spec(self, node: Any) -> InputSpec | None:
        return next((s for s in self.specs if getattr(s.arg, "name", None) == getattr(node, "name", None)), None)

    def target_of(self, node: Any) -> str:
        """The state-dict name of a parameter or buffer placeholder (a layer's weight)."""
        target = self.spec_of(node).target
        assert target is not None
        return target

    def spec_of(self, node: Any) -> InputSpec:
        """The spec of a placeholder known to be a parameter, buffer or constant (a layer's weight)."""
        spec = self.spec(node)
        assert spec is not None
        return spec

    def leaf(self, node: fx.Node) -> Any:
        if node.op != "placeholder":
            return None
        spec = self.spec(node)
        if spec is None or spec.kind not in _CONSTANT_KINDS or spec.target in self.mutated:
            return None
        value = self.constants.get(spec.target) if spec.kind == InputKind.CONSTANT_TENSOR else \
            self.state_dict.get(spec.target)
        return value if isinstance(value, torch.Tensor) else None

    def rank(self, node: fx.Node) -> int | None:
        val = node.meta.get("val")
        return val.dim() if isinstance(val, torch.Tensor) else None

    def layer(self, node: Any) -> Layer | None:
        if not isinstance(node, fx.Node):
            return None
        if node.op == "call_function" and node.target in _MATMULS:
            return self._matmul(node)
        found = functional_layer(self, node, ("placeholder",))
        if found is None:
            return None
        spec = self.spec(found.node.args[1]) if len(found.node.args) > 1 else None
        return found if spec is not None and spec.kind != InputKind.CONSTANT_TENSOR else None

    def _matmul(self, node: fx.Node) -> Layer | None:
        """A Linear decomposed by run_decompositions: addmm(bias, x, permute(weight, [1, 0])) or
        mm(x, permute(weight, [1, 0])), weight and bias parameters or buffers."""
        addmm = node.target == torch.ops.aten.addmm.default
        args = node.args
        if node.kwargs or len(args) != (3 if addmm else 2):
            return None
        mat2 = args[-1]
        if not (isinstance(mat2, fx.Node) and mat2.target == torch.ops.aten.permute.default
                and isinstance(mat2.args[1], (list, tuple)) and list(mat2.args[1]) == [1, 0]
                and isinstance(mat2.args[0], fx.Node)):
            return None
        weight = self.leaf(mat2.args[0])
        bias = self.leaf(args[0]) if addmm and isinstance(args[0], fx.Node) else None
        if weight is None or weight.dim() != 2 or (addmm and (bias is None or bias.dim() != 1)):
            return None
        return Layer(node, "linear", False, 0, 1, weight, bias, owner(node), "Linear", input_index=len(args) - 2)

    def layer_problem(self, layer: Layer) -> str | None:
        if layer.node.target in _MATMULS:
            mat2 = layer.node.args[-1]
            readers = [(mat2, layer.node), (mat2.args[0], mat2)]
            if layer.node.target == torch.ops.aten.addmm.default:
                readers.append((layer.node.args[0], layer.node))
            if any(list(n.users) != [user] for n, user in readers):
                return "its weight or bias is also read elsewhere"
            return None
        return functional_layer_problem(self, layer, lambda n: 1)

    def write(self, layer: Layer, weight: torch.Tensor, bias: torch.Tensor) -> None:
        if layer.node.target in _MATMULS:
            self._write_matmul(layer, weight, bias)
            return
        args = layer.node.args
        self._store(self.spec_of(args[1]), weight)
        b = args[2] if len(args) > 2 else layer.node.kwargs.get("bias")
        if isinstance(b, fx.Node):
            self._store(self.spec_of(b), bias)
        else:
            set_arg(layer.node, 2, "bias", self._new_parameter(self.target_of(args[1]), bias, args[1]))
        self.consts = type(self.consts)(self.leaf)  # the cached values of the weights changed

    def _write_matmul(self, layer: Layer, weight: torch.Tensor, bias: torch.Tensor) -> None:
        node = layer.node
        w_node = node.args[-1].args[0]
        self._store(self.spec_of(w_node), weight)
        if node.target == torch.ops.aten.addmm.default:
            self._store(self.spec_of(node.args[0]), bias)
        else:  # mm -> addmm with a new bias
            b = self._new_parameter(self.target_of(w_node), bias, w_node)
            node.target = torch.ops.aten.addmm.default
            node.args = (b, *node.args)
        self.consts = type(self.consts)(self.leaf)

    def _store(self, spec: InputSpec, value: torch.Tensor) -> None:
        old = self.state_dict[spec.target]
        self.state_dict[spec.target] = nn.Parameter(value, requires_grad=old.requires_grad) \
            if isinstance(old, nn.Parameter) else value

    def _new_parameter(self, weight_target: str, value: torch.Tensor, weight_node: fx.Node) -> fx.Node:
        """A new parameter placeholder `<layer>.bias` holding `value`, placed after the parameters."""
        parent = weight_target.rpartition(".")[0]
        target, k = f"{parent}.bias" if parent else "bias", 1
        while target in self.state_dict:
            target, k = f"{parent}.bias_folded{k}", k + 1
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        params = [n for n in placeholders if getattr(self.spec(n), "kind", None) == InputKind.PARAMETER]
        with self.graph.inserting_after(params[-1]) if params else self.graph.inserting_before(placeholders[0]):
            node = self.graph.placeholder("p_" + target.replace(".", "_"))
        fake = weight_node.meta.get("val")
        if fake is not None and hasattr(fake, "fake_mode"):
            node.meta["val"] = fake.fake_mode.from_tensor(value)
        where = max((i for i, s in enumerate(self.specs) if s.kind == InputKind.PARAMETER), default=-1) + 1
        self.specs.insert(where, InputSpec(InputKind.PARAMETER, TensorArgument(node.name), target, None))
        self.state_dict[target] = nn.Parameter(value, requires_grad=False)
        self.added.add(node.name)
        return node


def fold_exported(ep: ExportedProgram, *, merge_branches: bool) -> tuple[ExportedProgram, list[Any]]:
    entries: list[Folded | NotFolded] = []
    report = Report(entries)
    g = ExportGraph(ep, report)
    _remove_dropout(g, report)
    fold_layers(g)
    if merge_branches:
        from ._fold_branches import merge_branches as merge

        merge(g)
    _drop_unused_inputs(g)
    g.graph.lint()
    g.gm.recompile()
    for name, node in batch_norm_calls_left(g).items():
        report.batch_norm_left(name, call_problem(node), "no Linear or convolution next to it")
    for name in affine_modules_left(g):
        report.batch_norm_left(name, None, "no Linear or convolution next to it", "affine")
    signature = ExportGraphSignature(input_specs=g.specs, output_specs=_output_specs(g, ep))
    result = ExportedProgram(root=g.gm, graph=g.graph, graph_signature=signature, state_dict=g.state_dict,
                             range_constraints=ep.range_constraints, module_call_graph=ep.module_call_graph,
                             example_inputs=getattr(ep, "example_inputs", None), constants=g.constants,
                             verifiers=list(getattr(ep, "verifiers", []) or []) or None)
    return result, entries


def _output_specs(g: ExportGraph, ep: ExportedProgram) -> list[OutputSpec]:
    """The program's output specs, naming the nodes the folded graph returns: a fold of the last
    step (a batch norm, a dropout) makes the layer before it the output."""
    output = next(n for n in reversed(g.graph.nodes) if n.op == "output")
    specs = []
    for spec, value in zip(ep.graph_signature.output_specs, output.args[0]):
        if isinstance(spec.arg, TensorArgument) and isinstance(value, fx.Node) and value.name != spec.arg.name:
            spec = OutputSpec(spec.kind, TensorArgument(value.name), spec.target)
        specs.append(spec)
    return specs


def _remove_dropout(g: ExportGraph, report: Report) -> None:
    """aten.dropout with train=False is the identity; train=True drops units in eval mode too."""
    for node in list(g.graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.dropout.default,):
            continue
        name = owner(node)
        kind = "dropout" if name != node.name else "functional dropout"
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
        if train is not False:
            report.left(kind, name, "train=True: it drops units in eval mode too")
            continue
        node.replace_all_uses_with(node.args[0])
        g.graph.erase_node(node)
        report.done(kind, name)


def _drop_unused_inputs(g: ExportGraph) -> None:
    """Remove the parameter, buffer and constant placeholders a fold left unread, with their
    specs and values, and then the other unread tensors of a module none of whose tensors is
    read any more (a batch norm's num_batches_tracked)."""
    tensors = [n for n in g.graph.nodes if n.op == "placeholder" and getattr(g.spec(n), "kind", None) in
               _CONSTANT_KINDS and g.spec_of(n).target not in g.mutated]

    def module_of(n: fx.Node) -> str:
        return str(g.spec_of(n).target).rpartition(".")[0]
    dropped = [n for n in tensors if not n.users and (n.name in g.read_before or n.name in g.added)]
    emptied = {module_of(n) for n in dropped} - {module_of(n) for n in tensors if n.users}
    dropped += [n for n in tensors if not n.users and n not in dropped and module_of(n) in emptied]
    for n in dropped:
        spec = g.spec_of(n)
        g.specs.remove(spec)
        if spec.kind == InputKind.CONSTANT_TENSOR:
            g.constants.pop(spec.target, None)
        elif not any(s.target == spec.target for s in g.specs):
            g.state_dict.pop(spec.target, None)
        g.graph.erase_node(n)
