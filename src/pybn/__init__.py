"""pybn: SIMD CPU kernels for batch normalization and dropout, with a NumPy API."""
from __future__ import annotations

from ._C import __version__
from ._allocator import keep_freed_memory
from ._runtime import get_num_threads, isa, set_num_threads, supported_isas
from .batchnorm import (BatchNormGrads, BatchNormResidualGrads, BatchNormTrainResult, batch_norm_backward,
                        batch_norm_infer, batch_norm_train)
from .batchnorm_split import (BatchNormGradSums, BatchNormStats, batch_norm_apply,
                              batch_norm_backward_apply, batch_norm_backward_reduce, batch_norm_invstd,
                              batch_norm_merge_stats, batch_norm_stats)
from .drop_path import drop_path
from .dropblock import drop_block, drop_block_mask
from .dropout import counters_used, dropout, dropout_apply, dropout_mask, dropout_scale, relu_dropout_backward
from .fold import FoldedWeights, fold_bn_linear, fold_conv_bn
from .noise import alpha_dropout, alpha_dropout_backward, gaussian_dropout, gaussian_noise, normal_counters_used
from .recalibrate import recalibrate

__all__ = [
    "__version__",
    "isa",
    "supported_isas",
    "get_num_threads",
    "set_num_threads",
    "keep_freed_memory",
    "batch_norm_train",
    "batch_norm_infer",
    "batch_norm_backward",
    "BatchNormTrainResult",
    "BatchNormGrads",
    "BatchNormResidualGrads",
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
    "relu_dropout_backward",
    "counters_used",
    "drop_path",
    "alpha_dropout", "alpha_dropout_backward", "gaussian_dropout", "gaussian_noise", "normal_counters_used",
    "drop_block",
    "drop_block_mask",
    "recalibrate",
    "fold_conv_bn",
    "fold_bn_linear",
    "FoldedWeights",
]
