"""The folding row of ``python -m pybn bench``: every conv -> BN pair of a ResNet-50
(53 pairs, 23.5M conv weights, float32) folded with pybn.fold_conv_bn, against torch's
``fuse_conv_bn_weights`` and the NumPy formula on the same arrays, each result checked first
(the last pair's folded weights against the float64 formula); every implementation is timed
in ``rounds`` batches of its own, the best median reported.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .schema import Cell, Context, Result, Timed, WrongResult
from .timing import fmt_time, measure

EPS = 1e-5
Pair = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]   # weight, mean, var, gamma, beta


def resnet50_conv_shapes() -> list[tuple[int, ...]]:
    """Weight shapes of ResNet-50's convolutions (each followed by a BN)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7)]
    c_in = 64
    for width, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for b in range(blocks):
            shapes += [(width, c_in, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            if b == 0:
                shapes.append((4 * width, c_in, 1, 1))  # the downsample branch
            c_in = 4 * width
    return shapes


@dataclass(frozen=True)
class Model:
    """The folding row's "shape": the weight shapes of a model's conv -> BN pairs."""

    name: str
    conv_shapes: tuple[tuple[int, ...], ...]


RESNET50 = Model("ResNet-50", tuple(resnet50_conv_shapes()))


@dataclass
class FoldCase:
    pairs: list[Pair]

    @property
    def params(self) -> int:
        return sum(p[0].size for p in self.pairs)


def make_case(model: Model) -> FoldCase:
    rng = np.random.default_rng(0)
    pairs = []
    for shape in model.conv_shapes:
        c = shape[0]
        pairs.append((rng.standard_normal(shape, dtype=np.float32), rng.normal(0, 1, c).astype(np.float32),
                      rng.uniform(0.5, 2, c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32),
                      rng.normal(0, 1, c).astype(np.float32)))
    return FoldCase(pairs)


def _numpy_fold(w: np.ndarray, mean: np.ndarray, var: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    s = gamma / np.sqrt(var + eps)
    return w * s.reshape((-1,) + (1,) * (w.ndim - 1)).astype(w.dtype), beta - mean * s


def _check_last(what: str, case: FoldCase, weight_of: Callable[[Any], Any]) -> Callable[[object], None]:
    """The check of a call returning the last pair's folding: its weight (``weight_of`` the
    result) against the float64 formula."""
    w, mean, var, gamma, beta = case.pairs[-1]
    want = _numpy_fold(w.astype(np.float64), mean, var, gamma, beta)[0]

    def check(folded: object) -> None:
        if not np.allclose(np.asarray(weight_of(folded)), want, rtol=1e-6, atol=1e-6):
            raise WrongResult(f"fold bench: {what} differs from the formula")
    return check


def pybn_fold(case: FoldCase) -> Timed:
    import pybn

    pairs = case.pairs

    def call() -> object:
        for w, mean, var, gamma, beta in pairs:
            folded = pybn.fold_conv_bn(w, None, mean, var, gamma, beta)
        return folded

    return Timed(call, _check_last("pybn.fold_conv_bn", case, lambda folded: folded.weight))


def numpy_fold(case: FoldCase) -> Timed:
    pairs = case.pairs

    def call() -> object:
        for w, mean, var, gamma, beta in pairs:
            folded = _numpy_fold(w, mean, var, gamma, beta)
        return folded

    return Timed(call, _check_last("the NumPy formula", case, lambda folded: folded[0]))


def torch_fold(case: FoldCase) -> Timed:
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    tpairs = [tuple(torch.from_numpy(a) for a in p) for p in case.pairs]
    bias = [torch.zeros(p[0].shape[0]) for p in tpairs]

    def call() -> object:
        with torch.no_grad():
            for (w, mean, var, gamma, beta), b in zip(tpairs, bias):
                folded = fuse_conv_bn_weights(w, b, mean, var, EPS, gamma, beta)
        return folded

    return Timed(call, _check_last("torch fuse_conv_bn_weights", case, lambda folded: folded[0].detach().numpy()))


FoldCell = Cell[Model, Callable[[FoldCase], Timed]]


def run(cells: Sequence[FoldCell], ctx: Context) -> Result:
    (cell,) = cells
    case = make_case(cell.shape)
    times: dict[str, float] = {}
    for impl in cell.impls(ctx.peers):
        timed = impl.make(case)
        timed.check(timed.call())
        times[impl.key] = min(measure(timed.call, ctx.cfg).median for _ in range(ctx.rounds))
    ctx.progress(f"fold resnet50 pybn {fmt_time(times['pybn'])}")
    return {"pairs": len(case.pairs), "params": case.params, "pybn_s": times.pop("pybn"), "peers": times}


def render(result: Result, meta: Result | None = None) -> str:
    t = result["pybn_s"]
    cells = [f"pybn {fmt_time(t)}"] + [f"{peer} {fmt_time(tp)} ({tp / t:.1f}x)" for peer, tp in result["peers"].items()]
    return (f"fold: ResNet-50's {result['pairs']} conv->BN pairs ({result['params'] / 1e6:.1f}M float32 weights), "
            f"pybn.fold_conv_bn vs torch fuse_conv_bn_weights and the NumPy formula: " + ", ".join(cells))

