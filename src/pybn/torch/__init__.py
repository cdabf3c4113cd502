"""pybn for PyTorch models (``pip install 'pybn-kernels[torch]'``; ``import pybn`` alone never imports torch).

- :func:`accelerate` swaps pybn's drop-in modules (:mod:`pybn.torch.nn`) for a model's
  batch norm and dropout layers; :func:`convert_sync_batchnorm` makes its batch norms
  synchronized across processes, on CPU tensors too; :func:`revert` swaps torch's classes
  back (for tools that match them exactly, as quantization's).
- :mod:`pybn.torch.ops` registers the operators ``torch.ops.pybn.*`` (autograd,
  ``torch.compile``, ``torch.export``).
- :func:`fuse_tails` rewrites a model's ``relu(bn(x) + r)`` tails into one fused call each
  (training and inference).
- :func:`fold` folds batch norm and removes dropout for inference.
- :func:`offsets_per_rank` keeps pinned dropout offsets per rank under
  ``DistributedDataParallel``.
"""
from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # torch is an optional dependency of pybn
    raise ImportError("pybn.torch needs PyTorch, which could not be imported; "
                      "install it with: pip install 'pybn-kernels[torch]' (the CPU-only build: add "
                      "--extra-index-url https://download.pytorch.org/whl/cpu)") from exc

from . import nn, ops
from ._fold import Folded, NotFolded, fold
from .accelerate import Swapped, accelerate, convert_sync_batchnorm, revert
from .fuse import Fused, fuse_tails
from .seeded import offsets_per_rank

__all__ = ["fold", "Folded", "NotFolded", "accelerate", "convert_sync_batchnorm", "revert", "Swapped", "fuse_tails",
           "Fused", "offsets_per_rank", "nn", "ops"]
