"""Fold batch norm and remove dropout in a PyTorch module for inference (DESIGN.md, "Folding
batch norm").

``import pybn.torch`` needs PyTorch (``pip install pybn[torch]``); ``import pybn`` does not.
The arithmetic is :func:`pybn.fold_conv_bn` / :func:`pybn.fold_bn_linear`; this module only
finds the pairs, checks that folding them is exact, and writes the new weights back.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, NamedTuple, Sequence

try:
    import torch
    from torch import fx, nn
    from torch.nn.utils import parametrize
except ImportError as exc:  # torch is an optional dependency of pybn
    raise ImportError("pybn.torch needs PyTorch, which could not be imported; "
                      "install it with: pip install pybn[torch]") from exc

import numpy as np

from ..fold import fold_bn_linear, fold_conv_bn

__all__ = ["fold", "Folded"]

logger = logging.getLogger("pybn.torch")


class Folded(NamedTuple):
    """One simplification made by :func:`fold`.

    Attributes
    ----------
    kind : str
        ``"conv+bn"`` (a Conv or ConvTranspose followed by a batch norm), ``"linear+bn"``,
        ``"bn+linear"`` (a batch norm followed by a Linear), ``"bn+conv"`` (a batch norm
        followed by a pointwise conv), ``"dropout"`` (a dropout module) or
        ``"functional dropout"`` (a ``torch.nn.functional`` dropout call).
    names : tuple of str
        The qualified module names involved, in data-flow order (the first one of a pair
        is kept and holds the folded weights; the batch norm is gone). For a functional
        dropout, the name of its torch.fx node (e.g. ``"dropout_1"``).
    """

    kind: str
    names: tuple[str, ...]


_CONVS: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_TRANSPOSES: dict[type[nn.Module], int] = {
    nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_BATCH_NORMS: dict[type[nn.Module], int] = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout)

# functional dropout -> (name of its `training` argument, its position, its default)
_FUNCTIONAL_DROPOUTS: dict[Callable[..., Any], tuple[str, int, bool | None]] = {
    nn.functional.dropout: ("training", 2, True),
    nn.functional.dropout1d: ("training", 2, True),
    nn.functional.dropout2d: ("training", 2, True),
    nn.functional.dropout3d: ("training", 2, True),
    nn.functional.alpha_dropout: ("training", 2, False),
    nn.functional.feature_alpha_dropout: ("training", 2, False),
    torch.dropout: ("train", 2, None),
    torch.alpha_dropout: ("train", 2, None),
    torch.feature_dropout: ("train", 2, None),
    torch.feature_alpha_dropout: ("train", 2, None),
}


def fold(module: nn.Module, *, example_inputs: Any = None,
         return_report: bool = False) -> nn.Module | tuple[nn.Module, list[Folded]]:
    """A copy of `module` for inference, with batch norm folded and dropout removed.

    In eval mode a batch norm with running statistics is a per-channel affine map, so it
    can be merged into the Linear or convolution next to it, and dropout is the identity.
    The result computes the same function as ``module.eval()`` (up to float rounding) with
    fewer layers.

    Parameters
    ----------
    module : torch.nn.Module
        The model. It is not modified, nor is its train/eval mode (it is deep-copied).
    example_inputs : Tensor or tuple of Tensors, optional
        Positional arguments for one forward call. When given, that call is run once (in
        eval mode, without gradients) to see the rank of every batch norm's input, and a
        batch norm is folded only if its rank is the one that makes the fold exact (see
        Notes). Without it, the layer types alone decide.
    return_report : bool
        Also return the list of what was done.

    Returns
    -------
    torch.nn.Module
        A new module in eval mode. When `module` can be traced with
        ``torch.fx.symbolic_trace`` it is a ``torch.fx.GraphModule`` (so methods other than
        ``forward`` of `module`'s class are not there); otherwise it is a copy of `module`
        of the same class.
    list of Folded
        Only with ``return_report=True``: one :class:`Folded` per fold or removed dropout,
        in the order done. Each is also logged at INFO level on the ``"pybn.torch"`` logger.

    Notes
    -----
    What is folded (every module involved must be used exactly once, be a plain torch
    class -- a subclass overriding ``forward`` is left alone -- and have no hooks or
    parametrizations):

    * ``Conv{k}d`` or ``ConvTranspose{k}d`` (any groups, depthwise included) whose output
      goes only to a ``BatchNorm{k}d``; ``Linear`` whose output goes only to a
      ``BatchNorm1d``. The batch norm is removed and the layer gets the folded weight and
      a bias (added if it had none).
    * A ``BatchNorm1d`` whose output goes only to a ``Linear`` with ``in_features ==
      num_features``, and a ``BatchNorm{k}d`` whose output goes only to a ``Conv{k}d``
      with every kernel size 1, zero padding and ``groups=1`` (with padding, the conv's
      zero border would not see the batch norm's shift, so that fold is not exact).
      Pairs where the batch norm follows a layer are folded first.
    * Dropout modules and functional dropout calls whose ``training`` argument is False
      (e.g. ``F.dropout(x, p, training=self.training)``) are removed. A call with
      ``training=True`` -- ``F.dropout``'s default -- drops units in eval mode too, so it
      is kept.
    * Only batch norms with running statistics (``track_running_stats=True``); affine or
      not.

    The rank rule: a batch norm normalizes dimension 1, while a Linear works on the last
    dimension. They agree only on 2-D ``(N, C)`` tensors; on a 3-D ``(N, C, L)`` tensor a
    Linear would act on ``L``. BatchNorm2d/3d check their input rank themselves, but
    BatchNorm1d accepts 2-D and 3-D inputs, and torch.fx does not know ranks. So without
    `example_inputs`, BatchNorm1d next to a Linear is assumed to see ``(N, C)`` and next
    to a Conv1d ``(N, C, L)``, the common layouts. A model that applies BatchNorm1d to
    ``(N, C, L)`` next to a Linear acting on ``L`` (possible only when ``L`` equals the
    channel count) or to an unbatched Conv1d's 2-D output would be folded wrongly: pass
    `example_inputs` for such models, and a batch norm is then folded only where its
    input had rank 2 (next to a Linear) or ``k + 2`` (next to a ``Conv{k}d``); one the
    example does not reach, or reaches with several ranks, is left alone.

    When ``torch.fx.symbolic_trace`` fails (e.g. ``if x.sum() > 0:`` in ``forward``), the
    fallback folds adjacent pairs inside every ``nn.Sequential`` (ignoring
    ``nn.Identity`` between them) and replaces every dropout module with
    ``nn.Identity``; it assumes a Sequential's children are called only by that
    Sequential. Functional dropout calls then stay.

    The result is for inference only: it is traced in eval mode (``self.training`` is
    False in the recorded ``forward``) and has no batch norm left to train, so calling
    ``.train()`` on it does not bring training behaviour back.

    Folded weights keep the original weight's dtype, device and ``requires_grad``
    (float16 and bfloat16 weights are folded in float32 and rounded back).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    model = copy.deepcopy(module).eval()
    ranks = None if example_inputs is None else _batch_norm_input_ranks(model, example_inputs)
    report: list[Folded] = []
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # any failure to trace means: use the fallback
        logger.info("pybn.torch.fold: torch.fx cannot trace %s (%s: %s); folding inside "
                    "nn.Sequential containers only", type(module).__name__, type(exc).__name__, exc)
        _fold_sequentials(model, ranks, report)
        result = model
    else:
        _fold_graph(traced, ranks, report)
        result = traced
    result.eval()
    return (result, report) if return_report else result


# ---------------------------------------------------------------------------------------
# Which modules may be folded


def _plain(module: nn.Module, classes: Sequence[type[nn.Module]]) -> bool:
    """`module` is one of `classes` (or a subclass keeping its forward, or one of
    pybn.torch.nn's drop-ins for it, which compute the same function), unhooked.

    A subclass with its own forward (e.g. weight standardization) computes something
    else; hooks and parametrizations would be lost or broken by changing the weights.
    """
    if not any(isinstance(module, c) and (type(module).forward is c.forward
                                          or getattr(type(module), "drop_in_for", None) is c) for c in classes):
        return False
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
    return not any(hooks) and not parametrize.is_parametrized(module)


def _layer(module: nn.Module) -> tuple[str, int] | None:
    """("linear", 0), ("conv", k) or ("conv_transpose", k) for a foldable layer; else None."""
    tables = (("linear", {nn.Linear: 0}), ("conv", _CONVS), ("conv_transpose", _CONV_TRANSPOSES))
    for kind, table in tables:
        for cls, k in table.items():
            if _plain(module, [cls]):
                return kind, k
    return None


def _batch_norm_dims(module: nn.Module) -> int | None:
    """k of a foldable BatchNorm{k}d: plain, with running statistics; else None."""
    for cls, k in _BATCH_NORMS.items():
        if _plain(module, [cls]) and module.track_running_stats and module.running_mean is not None \
                and module.running_var is not None:
            return k
    return None


def _rank_ok(bn: nn.Module, expected: int, ranks: dict[int, set[int]] | None) -> bool:
    """The rank rule of fold's Notes (ranks None: no example inputs, trust the types)."""
    return ranks is None or ranks.get(id(bn)) == {expected}


# In both checks a layer with k spatial dims (Linear: 0) pairs with BatchNorm{max(k, 1)}d
# on tensors of rank k + 2: (N, C) for a Linear, (N, C, *spatial) for a conv.


def _layer_then_bn_ok(layer: nn.Module, bn: nn.Module, ranks: dict[int, set[int]] | None) -> bool:
    found, bn_k = _layer(layer), _batch_norm_dims(bn)
    if found is None or bn_k is None or bn_k != max(found[1], 1):
        return False
    out = layer.out_features if found[0] == "linear" else layer.out_channels
    return out == bn.num_features and _rank_ok(bn, found[1] + 2, ranks)


def _bn_then_layer_ok(bn: nn.Module, layer: nn.Module, ranks: dict[int, set[int]] | None) -> bool:
    found, bn_k = _layer(layer), _batch_norm_dims(bn)
    # Not ConvTranspose: with stride > 1 some outputs get no kernel tap, so no BN shift.
    if found is None or found[0] == "conv_transpose" or bn_k is None or bn_k != max(found[1], 1):
        return False
    if not _rank_ok(bn, found[1] + 2, ranks):
        return False
    if found[0] == "linear":
        return layer.in_features == bn.num_features
    pointwise = all(size == 1 for size in layer.kernel_size)
    # The array API cannot see padding: zero padding would not get BN's shift at the border.
    # ("same" with a 1-wide kernel pads nothing; padding_mode is moot without padding.)
    no_padding = layer.padding in ("valid", "same") or all(p == 0 for p in layer.padding)
    # A grouped conv's weight (out, in/groups, 1...) is not the (out, in) fold_bn_linear takes.
    return pointwise and no_padding and layer.groups == 1 and layer.in_channels == bn.num_features


def _is_dropout(module: nn.Module) -> bool:
    return _plain(module, _DROPOUTS)


def _batch_norm_input_ranks(model: nn.Module, example_inputs: Any) -> dict[int, set[int]]:
    """id(batch norm) -> the ranks of its inputs in one eval-mode forward call."""
    ranks: dict[int, set[int]] = {}

    def record(bn: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            ranks.setdefault(id(bn), set()).add(args[0].dim())

    handles = [m.register_forward_pre_hook(record) for m in model.modules()
               if isinstance(m, tuple(_BATCH_NORMS))]
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return ranks


# ---------------------------------------------------------------------------------------
# Writing the folded weights


def _to_numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    if tensor is None:
        return None
    t = tensor.detach().cpu()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()  # pybn folds float32/float64; half types are rounded back afterwards
    return t.numpy()


def _bn_arrays(bn: nn.Module) -> dict[str, Any]:
    return dict(running_mean=_to_numpy(bn.running_mean), running_var=_to_numpy(bn.running_var),
                gamma=_to_numpy(bn.weight), beta=_to_numpy(bn.bias), eps=bn.eps)


def _set_weights(layer: nn.Module, weight: np.ndarray, bias: np.ndarray) -> None:
    """Give `layer` the folded weights, like its old weight in dtype, device and grad."""
    old = layer.weight

    def param(values: np.ndarray) -> nn.Parameter:
        data = torch.from_numpy(values).to(device=old.device, dtype=old.dtype)
        return nn.Parameter(data, requires_grad=old.requires_grad)

    layer.weight = param(weight)
    layer.bias = param(bias)  # a layer without bias now has one: BN's shift lives there


def _fold_layer_then_bn(layer: nn.Module, bn: nn.Module) -> None:
    transposed = _layer(layer)[0] == "conv_transpose"
    groups = getattr(layer, "groups", 1)
    w, b = fold_conv_bn(_to_numpy(layer.weight), _to_numpy(layer.bias), **_bn_arrays(bn),
                        transposed=transposed, groups=groups)
    _set_weights(layer, w, b)


def _fold_bn_then_layer(bn: nn.Module, layer: nn.Module) -> None:
    w, b = fold_bn_linear(_to_numpy(layer.weight), _to_numpy(layer.bias), **_bn_arrays(bn))
    _set_weights(layer, w, b)


def _record(report: list[Folded], kind: str, *names: str) -> None:
    report.append(Folded(kind, names))
    logger.info("pybn.torch.fold: %s: %s", kind, " -> ".join(names))


def _pair_kind(first: nn.Module, second: nn.Module) -> str:
    """The Folded.kind of a folded pair ("conv" covers ConvTranspose)."""
    if isinstance(first, tuple(_BATCH_NORMS)):
        return "bn+linear" if _layer(second)[0] == "linear" else "bn+conv"
    return "linear+bn" if _layer(first)[0] == "linear" else "conv+bn"


# ---------------------------------------------------------------------------------------
# The torch.fx path


def _fold_graph(gm: fx.GraphModule, ranks: dict[int, set[int]] | None, report: list[Folded]) -> None:
    """Fold in place in `gm`'s graph and submodules (which belong to our copy)."""
    # Dropout first: "Linear -> Dropout -> BN" becomes the foldable "Linear -> BN".
    _remove_graph_dropout(gm, report)
    # Layer -> BN before BN -> layer: a BN between two layers goes into the one before.
    _fold_graph_pairs(gm, ranks, report, bn_first=False)
    _fold_graph_pairs(gm, ranks, report, bn_first=True)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()


def _fold_graph_pairs(gm: fx.GraphModule, ranks: dict[int, set[int]] | None, report: list[Folded], *,
                      bn_first: bool) -> None:
    """Fold every "layer -> BN" pair (bn_first: "BN -> layer") of single-use modules."""
    modules = dict(gm.named_modules())
    uses = _module_uses(gm)
    check, fold_pair = (_bn_then_layer_ok, _fold_bn_then_layer) if bn_first else \
        (_layer_then_bn_ok, _fold_layer_then_bn)

    def single_module(node: fx.Node | None) -> nn.Module | None:
        """The module `node` calls on one input, if nothing else uses that module."""
        if node is None or node.op != "call_module" or uses(str(node.target)) != 1 \
                or len(node.args) != 1 or node.kwargs:
            return None
        return modules[str(node.target)]

    erased: set[fx.Node] = set()
    for first_node in list(gm.graph.nodes):
        if first_node in erased:
            continue
        second_node = _only_user(first_node)
        first, second = single_module(first_node), single_module(second_node)
        if first is None or second is None or not check(first, second, ranks):
            continue
        fold_pair(first, second)
        if bn_first:  # the layer now reads the BN's input
            second_node.replace_input_with(first_node, first_node.args[0])
            bn_node = first_node
        else:  # the layer's output replaces the BN's
            second_node.replace_all_uses_with(first_node)
            bn_node = second_node
        gm.graph.erase_node(bn_node)
        erased.add(bn_node)
        _record(report, _pair_kind(first, second), str(first_node.target), str(second_node.target))


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _module_uses(gm: fx.GraphModule) -> Callable[[str], int]:
    """name -> how many graph nodes use that submodule.

    A module called twice, or one whose parameters the graph also reads directly
    (get_attr of ``conv.weight``), or one inside a called parent module, must keep its
    weights: folding one use would change the others.
    """
    targets = [str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")]

    def uses(name: str) -> int:
        return sum(t == name or t.startswith(name + ".") or name.startswith(t + ".") for t in targets)
    return uses


def _remove_graph_dropout(gm: fx.GraphModule, report: list[Folded]) -> None:
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and _is_dropout(modules[node.target]):
            kind, name = "dropout", node.target
        elif node.op == "call_function" and _is_inactive_functional_dropout(node):
            kind, name = "functional dropout", node.name
        else:
            continue
        source = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(source, fx.Node):
            continue
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        _record(report, kind, name)


def _is_inactive_functional_dropout(node: fx.Node) -> bool:
    """A dropout function call with a literal training=False: the identity."""
    try:
        spec = _FUNCTIONAL_DROPOUTS.get(node.target)
    except TypeError:  # an unhashable target is no dropout function
        return False
    if spec is None:
        return False
    name, position, default = spec
    if name in node.kwargs:
        training = node.kwargs[name]
    elif len(node.args) > position:
        training = node.args[position]
    else:
        training = default
    return training is False


# ---------------------------------------------------------------------------------------
# The fallback for modules torch.fx cannot trace


def _fold_sequentials(model: nn.Module, ranks: dict[int, set[int]] | None, report: list[Folded]) -> None:
    """Fold adjacent pairs inside every nn.Sequential; replace dropout by nn.Identity.

    Folded batch norms become nn.Identity too, so the Sequentials keep their indices.
    """
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if _is_dropout(child):
                setattr(parent, child_name, nn.Identity())
                _record(report, "dropout", _join(parent_name, child_name))
    for seq_name, seq in list(model.named_modules()):
        if isinstance(seq, nn.Sequential) and type(seq).forward is nn.Sequential.forward:
            _fold_sequential(seq_name, seq, lambda m: uses.get(id(m)) == 1, ranks, report)


def _fold_sequential(seq_name: str, seq: nn.Sequential, unshared: Callable[[nn.Module], bool],
                     ranks: dict[int, set[int]] | None, report: list[Folded]) -> None:
    children = [(name, m) for name, m in seq.named_children() if type(m) is not nn.Identity]
    # Layer -> BN first (as on the fx path); a BN folded there is no longer a candidate.
    for fold_pair, check in ((_fold_layer_then_bn, _layer_then_bn_ok), (_fold_bn_then_layer, _bn_then_layer_ok)):
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if unshared(a) and unshared(b) and check(a, b, ranks):
                fold_pair(a, b)
                bn_name = name_b if fold_pair is _fold_layer_then_bn else name_a
                setattr(seq, bn_name, nn.Identity())
                _record(report, _pair_kind(a, b), _join(seq_name, name_a), _join(seq_name, name_b))
        children = [(name, m) for name, m in seq.named_children() if type(m) is not nn.Identity]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
