"""Hyperparameters (momentum, eps, p) as torch's float arguments take them.

torch's modules accept a 0-d tensor or a NumPy scalar where a float is meant (a momentum
schedule's ``torch.linspace(0.1, 0.01, epochs)[epoch]``), because its argument parser
converts them. pybn's operators have float arguments too, but under ``torch.compile`` such
a tensor is a FakeTensor, which no float argument takes: the modules hand their operators
the number itself.
"""
from typing import Any

import numpy as np
from torch import Tensor


def plain_number(value: Any) -> Any:
    """A 0-d tensor's or NumPy scalar's value; anything else (a float, an int, None, a
    symbolic float under torch.compile, or a value the checks will refuse) as it is."""
    if isinstance(value, np.generic) or (isinstance(value, Tensor) and value.dim() == 0 and not value.requires_grad):
        return value.item()
    return value
