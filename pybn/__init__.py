"""pybn: SIMD CPU kernels for batch normalization and dropout, with a NumPy API."""
from __future__ import annotations


def _find_compiled_module() -> None:
    """Let a source checkout use the compiled module of the installed pybn.

    ``python -m pybn`` puts the current directory first on sys.path, so inside a checkout
    this source package shadows the installed one, which alone holds the compiled ``_C``.
    Adding the installed package's folder to ``__path__`` finds it there.
    """
    import importlib.util
    import os
    import sys

    if importlib.util.find_spec(f"{__name__}._C") is not None:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), __name__)
        if os.path.abspath(candidate) != here and os.path.isdir(candidate):
            if any(f.startswith("_C.") for f in os.listdir(candidate)):
                __path__.append(candidate)
                return


_find_compiled_module()

from ._C import __version__  # noqa: E402
from ._runtime import get_num_threads, isa, set_num_threads, supported_isas  # noqa: E402
from .batchnorm import (BatchNormGrads, BatchNormTrainResult, batch_norm_backward,  # noqa: E402
                        batch_norm_infer, batch_norm_train)
from .batchnorm_split import (BatchNormGradSums, BatchNormStats, batch_norm_apply,  # noqa: E402
                              batch_norm_backward_apply, batch_norm_backward_reduce, batch_norm_invstd,
                              batch_norm_merge_stats, batch_norm_stats)
from .dropout import counters_used, dropout, dropout_apply, dropout_mask, dropout_scale  # noqa: E402
from .fold import FoldedWeights, fold_bn_linear, fold_conv_bn  # noqa: E402

__all__ = [
    "__version__",
    "isa",
    "supported_isas",
    "get_num_threads",
    "set_num_threads",
    "batch_norm_train",
    "batch_norm_infer",
    "batch_norm_backward",
    "BatchNormTrainResult",
    "BatchNormGrads",
    "batch_norm_stats",
    "batch_norm_merge_stats",
    "batch_norm_invstd",
    "batch_norm_apply",
    "batch_norm_backward_reduce",
    "batch_norm_backward_apply",
    "BatchNormStats",
    "BatchNormGradSums",
    "dropout",
    "dropout_mask",
    "dropout_apply",
    "dropout_scale",
    "counters_used",
    "fold_conv_bn",
    "fold_bn_linear",
    "FoldedWeights",
]
