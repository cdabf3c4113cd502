"""Layers for NumPy training loops (docs/layers.md).

:class:`BatchNorm` and :class:`Dropout` wrap the pybn kernels in PyTorch-style modules:
``y = layer(x)`` runs the forward pass, ``dx = layer.backward(dy)`` the backward pass of
the most recent forward, and ``train()`` / ``eval()`` switch the mode. The layers hold no
autograd graph: each keeps just what its backward needs from the last forward.

Errors follow PyTorch where it has one: ``backward`` before any ``forward`` is a
``RuntimeError`` (what PyTorch raises for a gradient without a graph); wrong arguments are
``TypeError`` / ``ValueError`` naming the argument, and ``load_state_dict`` problems a
``KeyError`` (missing or unexpected key) or ``ValueError`` (wrong shape) naming the key.

One module per layer family: ``_batchnorm``, ``_dropout``, ``_drop_path``, ``_noise``
(alpha, Gaussian), ``_dropblock``, ``_mc_dropout``, over what ``_layer`` gives them all.
"""
from ._batchnorm import BatchNorm
from ._drop_path import DropPath
from ._dropblock import DropBlock2d
from ._dropout import Dropout
from ._mc_dropout import mc_dropout, mc_dropout_offset
from ._noise import AlphaDropout, GaussianDropout, GaussianNoise

__all__ = ["BatchNorm", "Dropout", "DropPath", "AlphaDropout", "GaussianDropout", "GaussianNoise", "DropBlock2d",
           "mc_dropout", "mc_dropout_offset"]

# The public names live here: pickles, reprs and the API reference say pybn.nn.BatchNorm,
# whichever file defines it.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
