"""Computing folded weights for :func:`pybn.torch.fold`: a layer (a module or a call in a graph)
and the per-channel scale and shift folded into it.

A batch norm is passed as the keyword arguments of :func:`pybn.fold_conv_bn` (its statistics);
any other per-channel affine map ``x * s + t`` as ``running_mean=0, running_var=1, gamma=s,
beta=t, eps=0``, which the same arithmetic turns into exactly ``s`` and ``t``. Weights are folded
in float64 by pybn and rounded once to the weight's dtype (float16 and bfloat16 too).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..fold import fold_bn_linear, fold_conv_bn
from ._fold_modules import finite, rounded_like, to_numpy


class Layer(NamedTuple):
    """A Linear, Conv or ConvTranspose computation whose weights a fold may rewrite."""

    node: Any  # the fx.Node of the call (None for a module seen only by the example call)
    kind: str  # "linear" or "conv"
    transposed: bool
    spatial: int  # k of a conv{k}d; 0 for a linear
    groups: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    name: str  # for the report
    label: str  # its class or function, for messages
    padding: Any = 0  # a conv's padding: ints, or "valid" / "same"
    module: nn.Module | None = None  # the module called, when it is one
    input_index: int = 0  # which argument of `node` is the layer's input

    @property
    def out_channels(self) -> int:
        w = self.weight
        return self.groups * w.shape[1] if self.transposed else w.shape[0]

    @property
    def in_channels(self) -> int:
        w = self.weight
        return w.shape[0] if self.transposed else self.groups * w.shape[1] if self.kind == "conv" else w.shape[1]

    @property
    def channel_from_end(self) -> int:
        """Where its output channels are, counted from the last dimension (1: the last)."""
        return self.spatial + 1


def affine_arrays(scale: np.ndarray, shift: np.ndarray) -> dict[str, Any]:
    """The fold_conv_bn keyword arguments of the per-channel map x * scale + shift (float64)."""
    n = scale.shape[0]
    return dict(running_mean=np.zeros(n), running_var=np.ones(n), gamma=scale, beta=shift, eps=0.0)


def folded(layer: Layer, bn: dict[str, Any], *, before: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of `layer` followed (before=True: preceded) by the batch norm `bn`, as
    tensors like the layer's weight."""
    w, b = to_numpy(layer.weight), to_numpy(layer.bias)
    if before:
        fw, fb = fold_bn_linear(w, b, **bn)
    else:
        fw, fb = fold_conv_bn(w, b, **bn, transposed=layer.transposed, groups=layer.groups)
    return rounded_like(fw, layer.weight), rounded_like(fb, layer.weight)


def overflow_problem(layer: Layer, weight: torch.Tensor, bias: torch.Tensor) -> str | None:
    if finite(weight) and finite(bias):
        return None
    return f"the folded weights of {layer.label} overflow {str(weight.dtype).replace('torch.', '')}"


def set_module_weights(module: Any, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Give `module` the folded weights, with its old weight's requires_grad."""
    grad = module.weight.requires_grad
    module.weight = nn.Parameter(weight, requires_grad=grad)
    module.bias = nn.Parameter(bias, requires_grad=grad)  # a layer without bias now has one: BN's shift lives there
