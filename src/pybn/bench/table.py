"""The benchmark's one table: every cell (shape, kernel, peers, bound) of every section.

A new peer is one entry of PEERS plus its calls; a new kernel one entry of its section's
kernel list, naming each implementation's call; a new batch-norm shape one line of
``shapes.SHAPES``. A cell's peers are the peers its kernel has an implementation for; its
bound is its kernel's. The sections run their cells in the order listed here, each by its
own method (docs/benchmark.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, Callable

from . import batchnorm_bench, dropout_bench, fold_bench, half_bench, noise_bench, report, residual_bench, torch_bench
from . import batchnorm_calls as bn
from .reference import check_backward, check_infer, check_train
from .schema import Bound, Cell, Impl, Kernel, Peer, Section
from .shapes import SHAPE, SHAPES, Shape


def _torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


TORCH = Peer("torch", "torch", "torch", modules=("torch",), out_variant=True, set_threads=_torch_threads)
NUMPY = Peer("numpy", "NumPy", "numpy")
ORT = Peer("ort", "onnxruntime", "ORT", modules=("onnxruntime", "onnx"))   # onnx builds its model
PEERS = (TORCH, NUMPY, ORT)

# What a kernel must move, in the probe's time (t_read: read the array once; t_stream: read it
# and write another).
COPY = Bound(reads=0, streams=1)
READ_THEN_COPY = Bound(reads=1, streams=1)
BACKWARD_BYTES = Bound(reads=3, streams=1)


# ----------------------------------------------------------------------------- batch norm

def _has_out(shape: Shape) -> bool:
    return shape.out


def _batch_norm(name: str, title: str, pybn: Any, torch: Any, numpy: Any, ort: Any, bound: Bound,
                check: Callable[..., float], **more: Any) -> Kernel[Any]:
    """A batch-norm kernel: pybn, torch (and its out= call on the shapes with preallocated
    outputs), NumPy and onnxruntime."""
    impls = (Impl("pybn", "pybn", pybn),
             Impl("torch", "torch", partial(torch, out=False)),
             Impl("torch_out", "torch", partial(torch, out=True), runs_on=_has_out),
             Impl("numpy", "numpy", numpy),
             Impl("ort", "ort", ort))
    return Kernel(name, title, impls, bound=bound, check=check, **more)


BATCH_NORM_KERNELS = (
    _batch_norm("infer", "inference forward", bn.pybn_infer, bn.torch_infer, bn.numpy_infer, bn.ort_infer,
                COPY, check_infer, one_pass=COPY, aliases=("inference", "eval")),
    _batch_norm("train", "training forward", bn.pybn_train, bn.torch_train, bn.numpy_train, bn.ort_training,
                READ_THEN_COPY, check_train, one_pass=COPY, aliases=("training", "forward")),
    _batch_norm("backward", "backward (training=True)", bn.pybn_backward, bn.torch_backward, bn.numpy_backward,
                bn.ort_training, BACKWARD_BYTES, check_backward, one_pass=READ_THEN_COPY, short="bwd",
                aliases=("bwd", "grad"),
                needs_dy=True),
)


# ----------------------------------------------------------------------------- dropout

def _on(*names: str) -> Callable[[Shape], bool]:
    return lambda shape: shape.name in names


DROPOUT_KERNELS = (
    Kernel("forward", "dropout forward", (
        Impl("pybn", "pybn", dropout_bench.pybn_forward),
        Impl("nn.Dropout", "torch", dropout_bench.torch_module),
        # up to 0.4 s a call on L: on A only, to keep the run under a minute
        Impl("aten.native_dropout", "torch", dropout_bench.torch_native, runs_on=_on("A")),
        Impl("numpy", "numpy", dropout_bench.numpy_forward)), bound=COPY),
    Kernel("mask", "dropout mask", (
        Impl("pybn", "pybn", dropout_bench.pybn_mask),
        Impl("torch", "torch", dropout_bench.torch_mask),
        Impl("numpy", "numpy", dropout_bench.numpy_mask)), bound=COPY),
    Kernel("apply", "dropout with a stored mask", (
        Impl("pybn", "pybn", dropout_bench.pybn_apply),
        Impl("torch", "torch", dropout_bench.torch_apply),
        Impl("numpy", "numpy", dropout_bench.numpy_apply)), bound=COPY),
    Kernel("2d", "Dropout2d forward", (
        Impl("pybn", "pybn", dropout_bench.pybn_2d),
        Impl("torch", "torch", dropout_bench.torch_2d),
        Impl("numpy", "numpy", dropout_bench.numpy_2d)), bound=COPY),
    Kernel("drop_path", "stochastic depth forward (mode row)", (
        Impl("pybn", "pybn", dropout_bench.pybn_drop_path),
        Impl("torch", "torch", dropout_bench.torch_drop_path),
        Impl("numpy", "numpy", dropout_bench.numpy_drop_path)), bound=COPY),
    Kernel("dropblock", "DropBlock forward", (   # timm's drop_block_2d when timm is installed
        Impl("pybn", "pybn", dropout_bench.pybn_dropblock),
        Impl("timm", "torch", dropout_bench.timm_dropblock,
             runs_on=lambda shape: dropout_bench.timm_drop_block_2d() is not None)), bound=COPY),
    Kernel("relu", "dropout(relu(x)) forward", (
        Impl("pybn", "pybn", dropout_bench.pybn_relu),
        Impl("torch", "torch", dropout_bench.torch_relu),
        Impl("numpy", "numpy", dropout_bench.numpy_relu)), bound=COPY),
)

# alpha dropout and the Gaussian noises, on A: pybn vs torch's module / randn recipe and NumPy
NOISE_KERNELS = (
    Kernel("alpha", "alpha dropout forward", (
        Impl("pybn", "pybn", noise_bench.pybn_alpha),
        Impl("torch", "torch", noise_bench.torch_alpha)), bound=COPY),
    Kernel("g-drop", "Gaussian dropout forward", (
        Impl("pybn", "pybn", noise_bench.pybn_gaussian_dropout),
        Impl("torch", "torch", noise_bench.torch_gaussian_dropout),
        Impl("numpy", "numpy", noise_bench.numpy_gaussian_dropout)), bound=COPY),
    Kernel("g-noise", "Gaussian noise forward", (
        Impl("pybn", "pybn", noise_bench.pybn_gaussian_noise),
        Impl("torch", "torch", noise_bench.torch_gaussian_noise),
        Impl("numpy", "numpy", noise_bench.numpy_gaussian_noise)), bound=COPY),
)

# ----------------------------------------------------------------------------- 16-bit
# The batch-norm kernels above, called on 16-bit x (and dy) with float32 parameters: pybn's
# call, the same call on the float32 arrays (the "float32" implementation, timed in turn with
# it) and torch's calls on tensors of the same dtype; and the dropout forward.

def _half(kernel: Kernel[Any]) -> Kernel[half_bench.HalfMake]:
    assert kernel.check is not None
    check = kernel.check
    return Kernel(kernel.name, kernel.title, (
        Impl("pybn", "pybn", half_bench.on_case(kernel.pybn.make, check, "half")),
        Impl("float32", "float32", half_bench.on_case(kernel.pybn.make, check, "float32")),
        *(Impl(i.key, i.peer, half_bench.on_case(i.make, check, "half"), i.runs_on)
          for i in kernel.variants("torch"))), bound=kernel.bound, short=kernel.short, check=check)


HALF_BATCH_NORM_KERNELS = tuple(_half(k) for k in BATCH_NORM_KERNELS)
HALF_DROPOUT_KERNEL = Kernel("dropout", "dropout forward", (
    Impl("pybn", "pybn", half_bench.pybn_dropout),
    Impl("float32", "float32", half_bench.float32_dropout),
    Impl("nn.Dropout", "torch", half_bench.torch_dropout),
    Impl("aten.native_dropout", "torch", half_bench.torch_native_dropout)), bound=COPY)
HALF_SHAPES = tuple(half_bench.HalfShape(SHAPE[s], dtype) for s in ("A", "A'", "L") for dtype in half_bench.DTYPES)

# ----------------------------------------------------------------------------- folding

FOLD_KERNEL = Kernel("fold", "folding every conv -> BN pair", (
    Impl("pybn", "pybn", fold_bench.pybn_fold),
    Impl("numpy", "numpy", fold_bench.numpy_fold),
    Impl("torch", "torch", fold_bench.torch_fold)))


# ----------------------------------------------------------------------------- fused residual
# relu(bn(x) + r) in one pass, against pybn unfused (the "numpy" peer: bn, then NumPy's add
# and maximum) and torch's composite.

def _residual(name: str, title: str, pybn: Any, unfused: Any) -> Kernel[Any]:
    return Kernel(name, title, (
        Impl("pybn", "pybn", pybn),
        Impl("pybn+numpy", "numpy", unfused),
        Impl("torch", "torch", residual_bench.torch_composite(name)),
        Impl("torch_in_place", "torch", residual_bench.torch_in_place(name))), bound=READ_THEN_COPY)


RESIDUAL_KERNELS = (
    _residual("train", "training forward + residual + relu", residual_bench.pybn_train, residual_bench.unfused_train),
    _residual("infer", "inference forward + residual + relu", residual_bench.pybn_infer, residual_bench.unfused_infer),
)


# ----------------------------------------------------------------------------- the cells

def make_cells(section: str, shapes: Iterable[Any], kernels: Sequence[Kernel[Any]]) -> tuple[Cell[Any, Any], ...]:
    """Every (shape, kernel) of ``shapes`` x ``kernels``, shape by shape."""
    return tuple(Cell(section, shape, kernel, tuple(p for p in PEERS if kernel.variants(p.name)), kernel.bound)
                 for shape in shapes for kernel in kernels)


BATCH_NORM = Section("batch norm", None, make_cells("batch norm", SHAPES, BATCH_NORM_KERNELS),
                     batchnorm_bench.run, report.render_section, batchnorm_bench.failures, report.section_json)
DROPOUT = Section("dropout", "dropout",
                  make_cells("dropout", [SHAPE["A"]], DROPOUT_KERNELS)
                  + make_cells("dropout", [SHAPE["A"]], NOISE_KERNELS)
                  # Dropout2d, drop_path, DropBlock, dropout(relu(x)) on A only
                  + make_cells("dropout", [SHAPE["L"]], DROPOUT_KERNELS[:3]),
                  dropout_bench.run, dropout_bench.render)
HALF = Section("16-bit", "half",
               tuple(cell for h in HALF_SHAPES
                     for cell in make_cells("16-bit", [h], HALF_BATCH_NORM_KERNELS
                                            + ((HALF_DROPOUT_KERNEL,) if h.name == "A" else ()))),
               half_bench.run, half_bench.render, half_bench.failures, half_bench.to_json)
FOLD = Section("fold", "fold", make_cells("fold", [fold_bench.RESNET50], [FOLD_KERNEL]),
               fold_bench.run, fold_bench.render)
TORCH_SECTION = Section("torch", "torch", tuple(torch_bench.CELLS), torch_bench.run_section, torch_bench.render,
                        torch_bench.failures, needs=(TORCH,))
RESIDUAL = Section("fused residual", "residual",
                   make_cells("fused residual", [SHAPE[s] for s in ("A", "A'", "L", "L'")], RESIDUAL_KERNELS),
                   residual_bench.run, residual_bench.render)
SECTIONS = (BATCH_NORM, DROPOUT, FOLD, TORCH_SECTION, HALF, RESIDUAL)


# ----------------------------------------------------------------------------- lookups

def parse_kernels(spec: str | None) -> list[Kernel[Any]]:
    """``"infer,bwd"`` -> batch-norm kernels, in the table's order."""
    if not spec:
        return list(BATCH_NORM_KERNELS)
    names = {alias: k for k in BATCH_NORM_KERNELS for alias in (k.name, *k.aliases)}
    chosen = set()
    for token in spec.split(","):
        token = token.strip().lower()
        if not token:
            continue
        if token not in names:
            raise ValueError(f"unknown kernel {token!r}; choose from "
                             f"{', '.join(k.name for k in BATCH_NORM_KERNELS)}")
        chosen.add(names[token].name)
    return [k for k in BATCH_NORM_KERNELS if k.name in chosen]


def parse_peers(spec: str | None) -> list[Peer]:
    """``"torch,numpy"`` -> peers, in the table's order."""
    names = {p.name: p for p in PEERS}
    chosen = set()
    for token in (spec or "").split(","):
        token = token.strip().lower()
        if not token:
            continue
        if token not in names:
            raise ValueError(f"unknown peer {token!r}; choose from {', '.join(names)}")
        chosen.add(token)
    return [p for p in PEERS if p.name in chosen]


def batch_norm_cells(shapes: Sequence[Shape], kernels: Sequence[Kernel[Any]]) -> list[Cell[Any, Any]]:
    """The batch-norm cells of ``shapes`` (in the order given) and ``kernels``."""
    return [c for shape in shapes for c in BATCH_NORM.cells if c.shape is shape and c.kernel in kernels]
