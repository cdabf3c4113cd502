"""PyTorch integration of pybn: fold batch norm and remove dropout in a module for inference.

``import pybn.torch`` needs PyTorch (``pip install pybn[torch]``); ``import pybn`` does not.
"""
from __future__ import annotations

try:
    import torch  # noqa: F401 - only to fail here, with the extra to install, when torch is missing
except ImportError as exc:  # torch is an optional dependency of pybn
    raise ImportError("pybn.torch needs PyTorch, which could not be imported; "
                      "install it with: pip install pybn[torch]") from exc

from ._fold import Folded, NotFolded, fold

__all__ = ["fold", "Folded", "NotFolded"]
