"""pybn for PyTorch models (``pip install pybn[torch]``; ``import pybn`` alone never imports torch).

:func:`fold` folds batch norm and removes dropout for inference.
"""
from __future__ import annotations

from ._fold import Folded, fold

__all__ = ["fold", "Folded"]
