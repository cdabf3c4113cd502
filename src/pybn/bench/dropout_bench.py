"""The dropout section of ``python -m pybn bench``: dropout at copy speed.

Cells (:mod:`.table`): the fused forward, the packed mask alone, applying a stored mask,
Dropout2d's per-channel mask (noise_shape=(N, C, 1, 1)), dropout(relu(x)) in one pass and DropBlock (block 7, against
timm's ``drop_block_2d`` when timm is installed), on float32 x, p = 0.5, outputs
preallocated (out=), the same arrays for everyone, each result checked before it is
timed. pybn is timed call for call in turn with the copy bound (``t_stream``, pybn's probe on
the same array), in every round; the peers (torch: ``nn.Dropout`` in training mode and
``aten.native_dropout``, the faster reported; the NumPy recipe ``x * (rng.random(shape) >= p)
/ (1 - p)``) get one round each, as they take up to 0.4 s a call.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .probe import Prober
from .report import rows_with_peers
from .schema import Cell, Context, Result, Timed, WrongResult
from .shapes import Shape
from .timing import fmt_time, measure, measure_alternating

P = 0.5
SEED = 1234
NUMPY_SEED = 5


@dataclass
class DropoutCase:
    """The arrays of one shape, made once and shared by every implementation."""

    shape: Shape
    x: np.ndarray
    y: np.ndarray                 # the preallocated output
    scale: np.float32             # 1 / (1 - p)
    mask: np.ndarray              # pybn's packed mask for SEED
    keep: np.ndarray              # the mask as booleans
    expected: np.ndarray          # x * scale where kept, else 0
    channels: tuple[int, ...]     # Dropout2d's noise shape (N, C, 1, 1)
    keep2d: np.ndarray            # pybn's per-channel mask for SEED, as booleans
    rng: np.random.Generator      # the NumPy recipe's generator

    @property
    def dims(self) -> tuple[int, ...]:
        return self.shape.logical


def make_case(shape: Shape) -> DropoutCase:
    import pybn

    dims = shape.logical
    x = np.random.default_rng(0).standard_normal(dims, dtype=np.float32)
    scale = np.float32(pybn.dropout_scale(P))
    mask = pybn.dropout_mask(dims, P, seed=SEED)
    keep = _unpack(mask, dims)
    channels = dims[:2] + (1,) * (len(dims) - 2)
    return DropoutCase(shape, x, np.empty_like(x), scale, mask, keep, np.where(keep, x * scale, np.float32(0)),
                       channels, _unpack(pybn.dropout_mask(channels, P, seed=SEED), channels),
                       np.random.default_rng(NUMPY_SEED))


def _unpack(mask: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    return np.unpackbits(mask, count=math.prod(dims), bitorder="little").reshape(dims).astype(bool)


# ----------------------------------------------------------------------------- checks

def _fail_unless(ok: bool, what: str) -> None:
    if not ok:
        raise WrongResult(f"dropout bench: {what}")


def check_fraction(what: str, kept: np.ndarray) -> None:
    """The kept fraction within 6 standard deviations of 1 - p (a sound test at any size)."""
    fraction, n = float(np.mean(kept)), kept.size
    tol = 6 * math.sqrt(P * (1 - P) / n)
    _fail_unless(abs(fraction - (1 - P)) <= tol, f"{what} keeps {fraction:.4f} of {n}, not {1 - P} +- {tol:.2g}")


def _check_equal(what: str, got: Any, want: np.ndarray) -> None:
    _fail_unless(np.array_equal(np.asarray(got), want), f"{what} differs from its mask")


def _check_dropped(what: str, y: Any, case: DropoutCase, per_channel: bool = False) -> None:
    """A dropout with a mask of its own: kept values scaled by 1 / (1 - p), the kept fraction right."""
    y = np.asarray(y)
    kept = y != 0
    _fail_unless(np.allclose(y[kept], case.x[kept] * case.scale), f"{what} scales the kept values wrongly")
    check_fraction(what, kept.any(axis=tuple(range(2, y.ndim))) if per_channel else kept)


# ----------------------------------------------------------------------------- pybn

def pybn_forward(case: DropoutCase) -> Timed:
    import pybn

    x, y = case.x, case.y
    return Timed(lambda: pybn.dropout(x, P, seed=SEED, out=y),
                 lambda r: _check_equal("pybn.dropout", r, case.expected))


def pybn_mask(case: DropoutCase) -> Timed:
    import pybn

    dims = case.dims
    return Timed(lambda: pybn.dropout_mask(dims, P, seed=SEED),
                 lambda r: check_fraction("pybn.dropout_mask", _unpack(np.asarray(r), dims)))


def pybn_apply(case: DropoutCase) -> Timed:
    import pybn

    x, y, mask = case.x, case.y, case.mask
    return Timed(lambda: pybn.dropout_apply(x, mask, P, out=y),
                 lambda r: _check_equal("pybn.dropout_apply", r, case.expected))


def pybn_2d(case: DropoutCase) -> Timed:
    import pybn

    x, y, channels = case.x, case.y, case.channels
    return Timed(lambda: pybn.dropout(x, P, seed=SEED, noise_shape=channels, out=y),
                 lambda r: _check_equal("pybn Dropout2d", r, np.where(case.keep2d, x * case.scale, np.float32(0))))


# ----------------------------------------------------------------------------- torch

def torch_module(case: DropoutCase) -> Timed:
    import torch

    xt, drop = torch.from_numpy(case.x), torch.nn.Dropout(P).train()
    return Timed(lambda: drop(xt), lambda r: _check_dropped("torch nn.Dropout", r.numpy(), case))


def torch_native(case: DropoutCase) -> Timed:
    import torch

    xt, native = torch.from_numpy(case.x), torch.ops.aten.native_dropout
    return Timed(lambda: native(xt, P, True), lambda r: _check_dropped("torch aten.native_dropout", r[0].numpy(), case))


def torch_mask(case: DropoutCase) -> Timed:
    import torch

    dims = case.dims
    return Timed(lambda: torch.empty(dims).bernoulli_(1 - P),
                 lambda r: check_fraction("torch bernoulli_", r.numpy() != 0))


def torch_apply(case: DropoutCase) -> Timed:
    import torch

    xt, mt, scale = torch.from_numpy(case.x), torch.from_numpy(case.keep), float(case.scale)
    return Timed(lambda: xt * mt * scale,
                 lambda r: _fail_unless(np.allclose(r.numpy(), case.expected), "torch mask apply differs"))


def torch_2d(case: DropoutCase) -> Timed:
    import torch

    xt, drop2d = torch.from_numpy(case.x), torch.nn.Dropout2d(P).train()
    return Timed(lambda: drop2d(xt), lambda r: _check_dropped("torch nn.Dropout2d", r.numpy(), case, per_channel=True))


# ----------------------------------------------------------------------------- NumPy

def numpy_forward(case: DropoutCase) -> Timed:
    x, rng, dims, f32 = case.x, case.rng, case.dims, np.float32
    return Timed(lambda: x * (rng.random(dims, dtype=f32) >= P) / f32(1 - P),
                 lambda r: _check_dropped("numpy recipe", r, case))


def numpy_mask(case: DropoutCase) -> Timed:
    rng, dims = case.rng, case.dims
    return Timed(lambda: rng.random(dims, dtype=np.float32) >= P,
                 lambda r: check_fraction("numpy rng.random(shape) >= p", np.asarray(r)))


def numpy_apply(case: DropoutCase) -> Timed:
    x, y, keep, scale = case.x, case.y, case.keep, case.scale
    return Timed(lambda: np.multiply(x * keep, scale, out=y),
                 lambda r: _fail_unless(np.allclose(r, case.expected), "numpy mask apply differs"))


def numpy_2d(case: DropoutCase) -> Timed:
    x, rng, channels, f32 = case.x, case.rng, case.channels, np.float32
    return Timed(lambda: x * (rng.random(channels, dtype=f32) >= P) / f32(1 - P),
                 lambda r: _check_dropped("numpy Dropout2d recipe", r, case, per_channel=True))


# ----------------------------------------------------------------------------- drop path

def _check_rows(what: str, y: Any, case: DropoutCase) -> None:
    """Stochastic depth with a draw of its own: each sample all zeros or x * scale, some of each
    (with p = 0.5 and 32 samples, all kept or all dropped has probability 2**-31)."""
    y = np.asarray(y)
    kept = (y != 0).reshape(y.shape[0], -1).any(axis=1)
    for n in range(y.shape[0]):
        want = case.x[n] * case.scale if kept[n] else np.zeros_like(case.x[n])
        _fail_unless(np.allclose(y[n], want), f"{what}: sample {n} is neither dropped nor scaled")
    _fail_unless(0 < kept.mean() < 1, f"{what} keeps {kept.mean():.3f} of the samples")


def pybn_drop_path(case: DropoutCase) -> Timed:
    import pybn

    x, y = case.x, case.y
    rows = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = _unpack(pybn.dropout_mask(rows, P, seed=SEED), rows)
    expected = np.where(keep, x * case.scale, np.float32(0))
    return Timed(lambda: pybn.drop_path(x, P, seed=SEED, out=y),
                 lambda r: _check_equal("pybn.drop_path", r, expected))


def torch_drop_path(case: DropoutCase) -> Timed:
    """torchvision's ``stochastic_depth(x, p, "row")`` (timm's ``drop_path`` is the same
    recipe): a per-sample ``bernoulli_`` divided by the survival rate, times x."""
    import torch

    xt = torch.from_numpy(case.x)
    rows = [xt.shape[0]] + [1] * (xt.ndim - 1)

    def stochastic_depth() -> Any:
        noise = torch.empty(rows, dtype=xt.dtype).bernoulli_(1 - P)
        noise.div_(1 - P)
        return xt * noise

    return Timed(stochastic_depth, lambda r: _check_rows("torchvision stochastic_depth", r.numpy(), case))


def numpy_drop_path(case: DropoutCase) -> Timed:
    x, rng, f32 = case.x, case.rng, np.float32
    rows = (x.shape[0],) + (1,) * (x.ndim - 1)
    return Timed(lambda: x * ((rng.random(rows, dtype=f32) >= P) / f32(1 - P)),
                 lambda r: _check_rows("numpy drop path recipe", r, case))


# ----------------------------------------------------------------------------- dropout(relu(x))

def pybn_relu(case: DropoutCase) -> Timed:
    import pybn

    x, y = case.x, case.y
    expected = np.where(case.keep, np.maximum(x, 0) * case.scale, np.float32(0))
    return Timed(lambda: pybn.dropout(x, P, seed=SEED, relu=True, out=y),
                 lambda r: _check_equal("pybn.dropout(relu=True)", r, expected))


def _check_relu_dropped(what: str, y: Any, case: DropoutCase) -> None:
    """dropout(relu(x)) with a mask of its own: nothing where x <= 0, kept positives scaled."""
    y = np.asarray(y)
    positive = case.x > 0
    _fail_unless(not y[~positive].any(), f"{what} keeps a value where x <= 0")
    kept = y != 0
    _fail_unless(np.allclose(y[kept], case.x[kept] * case.scale), f"{what} scales the kept values wrongly")
    check_fraction(what, kept[positive])


def torch_relu(case: DropoutCase) -> Timed:
    """Eager torch's ReLU then Dropout: two passes."""
    import torch

    xt, drop = torch.from_numpy(case.x), torch.nn.Dropout(P).train()
    return Timed(lambda: drop(torch.relu(xt)), lambda r: _check_relu_dropped("torch relu, nn.Dropout", r.numpy(), case))


def numpy_relu(case: DropoutCase) -> Timed:
    x, rng, dims, f32 = case.x, case.rng, case.dims, np.float32
    return Timed(lambda: np.maximum(x, f32(0)) * (rng.random(dims, dtype=f32) >= P) / f32(1 - P),
                 lambda r: _check_relu_dropped("numpy relu dropout recipe", r, case))


# ----------------------------------------------------------------------------- DropBlock

BLOCK = 7   # DropBlock's block size (the paper's and timm's default)


def _block(case: DropoutCase) -> int:
    """BLOCK, or a quarter of a smaller feature map's side (the tests' tiny shapes)."""
    return min(BLOCK, max(1, min(case.dims[2:]) // 4))


def _scaled_blocks(what: str, y: np.ndarray, case: DropoutCase) -> None:
    """A DropBlock with a mask of its own: kept values times numel / kept (of one spatial mask
    per sample, shared by the channels), some dropped."""
    kept = y != 0
    per_sample = kept.any(axis=1)
    _fail_unless(bool(np.all(kept == per_sample[:, None])), f"{what}: the channels do not share one mask")
    _fail_unless(0 < per_sample.mean() < 1, f"{what} keeps {per_sample.mean():.3f} of the units")
    scale = per_sample.size / per_sample.sum()
    _fail_unless(np.allclose(y[kept], case.x[kept] * scale, rtol=1e-5), f"{what} scales the kept values wrongly")


def pybn_dropblock(case: DropoutCase) -> Timed:
    import pybn

    x, y = case.x, case.y
    block = _block(case)
    mask = pybn.drop_block_mask(x.shape, P, block_size=block, seed=SEED)
    noise = (x.shape[0], 1) + x.shape[2:]
    keep = _unpack(mask, noise)
    expected = np.where(keep, x * np.float32(keep.size / keep.sum()), np.float32(0))
    return Timed(lambda: pybn.drop_block(x, P, block_size=block, seed=SEED, out=y),
                 lambda r: _check_equal("pybn.drop_block", r, expected))


@functools.lru_cache(maxsize=1)
def timm_drop_block_2d() -> Any:
    """timm's ``drop_block_2d``, loaded from its file (timm's package needs torchvision), or None."""
    import importlib.util

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    drop = importlib.util.spec_from_file_location("_timm_layers_drop",
                                                  spec.submodule_search_locations[0] + "/layers/drop.py")
    if drop is None or drop.loader is None:
        return None
    module = importlib.util.module_from_spec(drop)
    drop.loader.exec_module(module)
    return module.drop_block_2d


def timm_dropblock(case: DropoutCase) -> Timed:
    import torch

    drop_block_2d, xt, block = timm_drop_block_2d(), torch.from_numpy(case.x), _block(case)
    return Timed(lambda: drop_block_2d(xt, P, block),
                 lambda r: _scaled_blocks("timm drop_block_2d", r.numpy(), case))


# ----------------------------------------------------------------------------- the section

DropoutCell = Cell[Shape, Callable[[DropoutCase], Timed]]


def _checked(timed: Timed) -> Timed:
    timed.check(timed.call())
    return timed


def run(cells: Sequence[DropoutCell], ctx: Context) -> Result:
    """Time ``cells`` (grouped by shape, in the order given); one row per cell."""
    shapes: dict[str, Any] = {}
    for shape, group in itertools.groupby(cells, key=lambda c: c.shape):
        case = make_case(shape)
        prober = Prober(case.x)
        shapes[shape.name] = {"shape": list(shape.logical),
                              "rows": {cell.kernel.name: _run_cell(cell, case, prober, ctx) for cell in group}}
        prober.close()
        del case, prober
    peers = dict.fromkeys(p.name for c in cells for p in c.peers)
    return {"p": P, "peers": list(peers), "shapes": shapes}


def _run_cell(cell: DropoutCell, case: DropoutCase, prober: Prober, ctx: Context) -> Result:
    # pybn and the copy bound call for call (see measure_alternating); the round with pybn's
    # best median is reported, with the bound's median from the same round
    assert cell.bound is not None
    pybn = _checked(cell.kernel.pybn.make(case))
    paired = [measure_alternating((pybn.call, *prober.calls(cell.bound)), ctx.cfg) for _ in range(ctx.rounds)]
    t, bound = min((p[0].median, prober.seconds(cell.bound, p[1:])) for p in paired)
    row: Result = {"pybn_s": t, "t_stream_s": bound, "peers": {}}
    ctx.progress(f"dropout {cell.shape.name} {cell.kernel.name:<8} pybn {fmt_time(t)} | copy bound {fmt_time(bound)}")
    for peer in (p for p in cell.peers if ctx.uses(p)):
        if not cell.kernel.variants(peer.name, cell.shape):
            continue   # (timm's DropBlock when timm is not installed)
        timed = {v.key: measure(_checked(v.make(case)).call, ctx.cfg).median
                 for v in cell.kernel.variants(peer.name, cell.shape)}
        fastest = min(timed, key=lambda k: timed[k])
        row["peers"][peer.name] = timed[fastest]
        if len(cell.kernel.variants(peer.name)) > 1:
            row[f"{peer.name}_variant"] = fastest
        ctx.progress(f"dropout {cell.shape.name} {cell.kernel.name:<8} {peer.name} {fmt_time(timed[fastest])}")
    return row


def render(result: Result, meta: Result | None = None) -> str:
    lines = [f"dropout: x float32, p = {result['p']}, out= preallocated; copy bound = t_stream (pybn's "
             "non-temporal copy of x, timed call for call in turn with pybn's); x = peer time / pybn time",
             f"{'shape':<5} {'kernel':<9} {'pybn':>10} {'copy':>10} {'% copy':>7}"
             + "".join(f" {peer:>11} {'x':>6}" for peer in result["peers"])]

    def first_cells(shape_name: str, name: str, r: Result) -> list[str]:
        t, b = r["pybn_s"], r["t_stream_s"]
        return [f"{shape_name:<5}", f"{name:<9}", f"{fmt_time(t):>10}", f"{fmt_time(b):>10}", f"{b / t * 100:>6.0f}%"]

    lines += rows_with_peers(result, first_cells)
    lines.append("forward: pybn.dropout(x, p, seed=, out=y) vs torch nn.Dropout / aten.native_dropout (faster shown);"
                 " mask: pybn.dropout_mask (packed bits) vs torch bernoulli_ and NumPy rng.random(shape) >= p;"
                 " apply: pybn.dropout_apply(x, mask, p, out=y) vs x * mask * scale;"
                 " 2d: pybn.dropout(x, p, noise_shape=(N, C, 1, 1), out=y) vs torch nn.Dropout2d;"
                 " alpha: pybn.alpha_dropout vs torch nn.AlphaDropout; g-drop / g-noise:"
                 " pybn.gaussian_dropout(x, 0.5) / gaussian_noise(x, 0.5) vs x * (1 + randn) / x + 0.5 * randn"
                 " (torch randn_like, NumPy standard_normal);"
                 " relu: pybn.dropout(x, p, relu=True, out=y), dropout(relu(x)) in one pass, vs torch relu then"
                 " nn.Dropout and the NumPy recipe on np.maximum(x, 0);"
                 " drop_path: pybn.drop_path(x, p, seed=, out=y) vs torchvision's stochastic_depth recipe"
                 " (x * bernoulli_(1 - p) / (1 - p) per sample);"
                 f" dropblock: pybn.drop_block(x, p, block_size={BLOCK}, out=y) vs timm's drop_block_2d.")
    return "\n".join(lines)
