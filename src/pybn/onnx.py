"""Fold inference-mode batch norm into the neighbouring layers of an ONNX model.

``fold(model)`` returns a new ``onnx.ModelProto`` (the input is not modified) in which

* a Conv, ConvTranspose (any ``group``), Gemm, MatMul or MatMul+Add whose output feeds
  only a BatchNormalization becomes one layer (:func:`pybn.fold_conv_bn`);
* likewise when it feeds only a chain of Mul, Add, Sub and Div nodes by per-channel constants
  (what a frozen batch norm, ``x * scale + shift``, exports to), each value in the chain read by
  the next node alone;
* a MatMul (+Add) or Gemm, then a Transpose or Reshape that keeps its channel axis as axis 1,
  then a BatchNormalization: the batch norm folds into the layer, before the Transpose/Reshape;
* a BatchNormalization whose output feeds only a Gemm, a MatMul or a pointwise Conv (every
  kernel size 1, no padding, ``group=1``) is folded into it (:func:`pybn.fold_bn_linear`);
* Identity, and Dropout in inference mode whose mask is not used, are removed;
* with ``merge_branches=True``, Convs of one input summed with an identity branch (a
  BatchNormalization of that input, or the input itself) become one Conv;
* initializers (and Constant nodes) that nothing uses any more are dropped.

A fold happens only where it is exact: the weights and the batch norm's parameters are
constants (initializers that are not also graph inputs, or Constant nodes) with finite
values, the value between the two nodes has no other consumer and is not a graph output,
the batch norm is in inference mode with per-channel statistics, a variance >= 0 and
``var + epsilon > 0``, the channel axis of the batch norm (axis 1) is the axis the layer's
weight acts on (for MatMul: a rank-2 tensor, by ONNX shape inference run by fold itself),
a constant of a Mul/Add chain is one value per channel of the layer's output (broadcasting
from the right, with no more dimensions than that output), and the folded weights are
finite in the weight's dtype. Everything else is left as it was and reported with the
reason. Only the main graph is rewritten; a value that a subgraph (If, Loop, Scan) reads
counts as used there.

The arithmetic is pybn's: every folded parameter is computed in float64 and rounded once to
the weight's dtype, which every initializer keeps (a float16 graph stays float16, and no Cast
is added). Weights of float32, float64, float16 and bfloat16 (with ml_dtypes) are folded,
other dtypes are left unfolded; a batch norm's parameters may be of another float type than
its input (float32 statistics beside a float16 input, as ONNX allows). See docs/folding.md.

This module holds the public API (``fold``, ``FoldRecord``, ``NotFolded``); the rules are
``pybn._onnx_fold.Folder`` (with ``pybn._onnx_affine`` and ``pybn._onnx_branches``), which
edits the graph through ``pybn._onnx_graph.GraphEditor``; ``pybn._onnx_files`` checks models
and reads and writes their files.
"""
from __future__ import annotations

import logging
from typing import Any

try:
    import onnx
except ImportError as _err:  # pragma: no cover - exercised by a test that hides onnx
    raise ImportError("pybn.onnx needs the onnx package: pip install 'pybn-kernels[onnx]'") from _err

# after the guarded import above: these import onnx unguarded
from ._checks import flag
from ._onnx_files import ExternalData, check
from ._onnx_fold import Folder, FoldRecord, NotFolded

__all__ = ["fold", "FoldRecord", "NotFolded"]

logger = logging.getLogger("pybn.onnx")


def fold(model: onnx.ModelProto, *, merge_branches: bool = False, return_report: bool = False) -> Any:
    """Fold batch norms and remove inference no-ops in an ONNX model.

    Parameters
    ----------
    model : onnx.ModelProto
        The model; it is not modified. It must pass ``onnx.checker.check_model``, and every
        tensor must hold exactly the data its shape and type need. Tensors stored as
        external data must be loaded (``onnx.load`` does that by default); those that are
        not are treated as non-constant (``python -m pybn fold`` reads them from the
        model's folder as needed).
    merge_branches : bool
        Also merge Conv branches summed over one input (RepVGG / MobileOne blocks: a KxK
        Conv, a 1x1 Conv and an identity BatchNormalization) into one Conv. Off by default:
        it changes the architecture, not only the weights.
    return_report : bool
        Also return the list of changes, and of what was left in place.

    Returns
    -------
    onnx.ModelProto, or (onnx.ModelProto, list of FoldRecord and NotFolded) with ``return_report=True``
        A new model computing the same outputs (up to floating-point rounding). The report
        has one FoldRecord per change, in the order made, then one NotFolded per
        BatchNormalization, Dropout and Identity node left (subgraphs included), and per Mul
        and Add pair by per-channel constants (an exported frozen batch norm) left. Each entry
        is also logged at INFO level on the ``"pybn.onnx"`` logger.

    Raises
    ------
    TypeError
        `model` is not an ``onnx.ModelProto``; `merge_branches` is not a bool.
    ValueError
        `model` is not a valid model (the checker's first complaint, or a tensor whose data
        does not match its shape).
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model: expected an onnx.ModelProto, got {type(model).__name__}")
    flag(merge_branches, "merge_branches")
    flag(return_report, "return_report")
    out, report = fold_model(model, merge_branches=merge_branches)
    return (out, report) if return_report else out


def fold_model(model: onnx.ModelProto, external: ExternalData | None = None,
               merge_branches: bool = False) -> tuple[Any, list[Any]]:
    """fold(), with tensors stored as external data read through `external` (the command line)."""
    check(model, external)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    report = Folder(out, external, merge_branches).run()
    for rec in report:
        logger.info("%s", rec)
    changes = sum(isinstance(rec, FoldRecord) for rec in report)
    logger.info("pybn.onnx.fold: %d change(s), %d -> %d nodes", changes, len(model.graph.node),
                len(out.graph.node))
    return out, report


