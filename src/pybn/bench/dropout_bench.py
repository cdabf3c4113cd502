"""The dropout rows of ``python -m pybn bench`` (issue: dropout at copy speed).

Shapes A = (32, 64, 56, 56) and L = (64, 128, 56, 56) float32, p = 0.5, outputs
preallocated (out=), the same arrays for everyone, each result checked before it is
timed. Rows: the fused forward, the packed mask alone, applying a stored mask, and (on A)
Dropout2d's per-channel mask (noise_shape=(N, C, 1, 1)) against torch's nn.Dropout2d.
Peers: torch (``nn.Dropout`` in training mode and ``aten.native_dropout``, the faster
reported), the NumPy recipe ``x * (rng.random(shape) >= p) / (1 - p)``, and the copy bound
``t_stream`` from pybn's probe on the same array, timed call for call in turn with pybn.
"""
from __future__ import annotations

import numpy as np

from .timing import TimingConfig, fmt_time, measure, measure_alternating

SHAPES = {"A": (32, 64, 56, 56), "L": (64, 128, 56, 56)}
P = 0.5
SEED = 1234


def _check(name: str, ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"dropout bench: {name} is wrong: {what}")


def _best(fn, cfg: TimingConfig, rounds: int) -> float:
    return min(measure(fn, cfg).median for _ in range(rounds))


def run(cfg: TimingConfig, rounds: int, want: list, torch, progress) -> dict:
    return {"p": P, "shapes": {name: _run_shape(name, shape, cfg, rounds, want, torch, progress)
                               for name, shape in SHAPES.items()}}


def _run_shape(name_: str, SHAPE: tuple, cfg: TimingConfig, rounds: int, want: list, torch, progress) -> dict:
    import pybn
    from pybn._C import diagnostics

    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    y = np.empty_like(x)
    dst = np.empty_like(x)
    scale = np.float32(pybn.dropout_scale(P))
    mask = pybn.dropout_mask(SHAPE, P, seed=SEED)
    keep = np.unpackbits(mask, count=x.size, bitorder="little").reshape(SHAPE).astype(bool)
    expected = np.where(keep, x * scale, np.float32(0))
    _check("pybn.dropout", np.array_equal(pybn.dropout(x, P, seed=SEED, out=y), expected), "differs from its mask")
    _check("pybn.dropout_apply", np.array_equal(pybn.dropout_apply(x, mask, P, out=y), expected), "differs")
    _check("pybn mask", abs(keep.mean() - (1 - P)) < 1e-3, f"kept fraction {keep.mean()}")

    rows = {}

    # Dropout2d: one mask bit per (sample, channel), broadcast over H and W
    channels = SHAPE[:2] + (1,) * (len(SHAPE) - 2)
    keep2d = np.unpackbits(pybn.dropout_mask(channels, P, seed=SEED), count=int(np.prod(channels)),
                           bitorder="little").reshape(channels).astype(bool)
    _check("pybn Dropout2d", np.array_equal(pybn.dropout(x, P, seed=SEED, noise_shape=channels, out=y),
                                            np.where(keep2d, x * scale, np.float32(0))), "differs from its mask")

    # pybn and the copy bound call for call (see measure_alternating); the round with pybn's
    # best median is reported, with the bound's median from the same round
    for name, fn in [("forward", lambda: pybn.dropout(x, P, seed=SEED, out=y)),
                     ("mask", lambda: pybn.dropout_mask(SHAPE, P, seed=SEED)),
                     ("apply", lambda: pybn.dropout_apply(x, mask, P, out=y)),
                     ("2d", lambda: pybn.dropout(x, P, seed=SEED, noise_shape=channels, out=y))][:4 if name_ == "A" else 3]:
        paired = [measure_alternating((fn, lambda: diagnostics.probe_stream(x, dst)), cfg) for _ in range(rounds)]
        t, bound = min((a.median, b.median) for a, b in paired)
        rows[name] = {"pybn_s": t, "t_stream_s": bound, "peers": {}}
        progress(f"dropout {name_} {name:<8} pybn {fmt_time(t)} | copy bound {fmt_time(bound)}")

    if torch is not None:
        xt = torch.from_numpy(x)
        drop = torch.nn.Dropout(P).train()
        yt = drop(xt).numpy()
        kept = yt != 0
        _check("torch nn.Dropout", np.array_equal(yt[kept], x[kept] * scale) and abs(kept.mean() - 0.5) < 1e-2,
               "kept values or fraction")
        # Peers are 50-100x slower than pybn (up to 0.4 s a call on L): one round each, and
        # aten.native_dropout (what nn.Dropout calls) on A only, to keep the run under a minute.
        t_mod = _best(lambda: drop(xt), cfg, 1)
        t_native = _best(lambda: torch.ops.aten.native_dropout(xt, P, True), cfg, 1) if name_ == "A" else t_mod
        rows["forward"]["peers"]["torch"] = min(t_mod, t_native)
        if "2d" in rows:
            drop2d = torch.nn.Dropout2d(P).train()
            y2d = drop2d(xt).numpy()
            kept_channels = (y2d != 0).any(axis=(2, 3))
            _check("torch nn.Dropout2d", abs(kept_channels.mean() - 0.5) < 0.05, "kept fraction of channels")
            rows["2d"]["peers"]["torch"] = _best(lambda: drop2d(xt), cfg, 1)
        rows["forward"]["torch_variant"] = "nn.Dropout" if t_mod <= t_native else "aten.native_dropout"
        rows["mask"]["peers"]["torch"] = _best(lambda: torch.empty(SHAPE).bernoulli_(1 - P), cfg, 1)
        mt = torch.from_numpy(keep)
        yt = xt * mt * float(scale)
        _check("torch mask apply", np.allclose(yt.numpy(), expected), "differs")
        rows["apply"]["peers"]["torch"] = _best(lambda: xt * mt * float(scale), cfg, 1)
        progress("dropout torch done")
    if "numpy" in want:
        rng = np.random.default_rng(5)
        yn = x * (rng.random(SHAPE, dtype=np.float32) >= P) / np.float32(1 - P)
        kept = yn != 0
        _check("numpy recipe", np.allclose(yn[kept], x[kept] * scale) and abs(kept.mean() - 0.5) < 1e-2, "kept")
        rows["forward"]["peers"]["numpy"] = _best(
            lambda: x * (rng.random(SHAPE, dtype=np.float32) >= P) / np.float32(1 - P), cfg, 1)
        rows["mask"]["peers"]["numpy"] = _best(lambda: rng.random(SHAPE, dtype=np.float32) >= P, cfg, 1)
        rows["apply"]["peers"]["numpy"] = _best(lambda: np.multiply(x * keep, scale, out=y), cfg, 1)
        if "2d" in rows:
            rows["2d"]["peers"]["numpy"] = _best(
                lambda: x * (rng.random(channels, dtype=np.float32) >= P) / np.float32(1 - P), cfg, 1)
        progress("dropout numpy done")
    return {"shape": list(SHAPE), "rows": rows}


def render(result: dict) -> str:
    lines = [f"dropout: x float32, p = {result['p']}, out= preallocated; copy bound = t_stream (pybn's "
             "non-temporal copy of x, timed call for call in turn with pybn's); x = peer time / pybn time",
             f"{'shape':<5} {'kernel':<8} {'pybn':>10} {'copy':>10} {'% copy':>7} {'torch':>11} {'x':>6} "
             f"{'numpy':>11} {'x':>6}"]
    for shape_name, res in result["shapes"].items():
        for name, r in res["rows"].items():
            t, b = r["pybn_s"], r["t_stream_s"]
            cols = [f"{shape_name:<5}", f"{name:<8}", f"{fmt_time(t):>10}", f"{fmt_time(b):>10}", f"{b / t * 100:>6.0f}%"]
            for peer in ("torch", "numpy"):
                tp = r["peers"].get(peer)
                cols += [f"{fmt_time(tp):>11}", f"{tp / t:>5.1f}x" if tp else f"{'-':>6}"]
            lines.append(" ".join(cols))
    lines.append("forward: pybn.dropout(x, p, seed=, out=y) vs torch nn.Dropout / aten.native_dropout (faster shown);"
                 " mask: pybn.dropout_mask (packed bits) vs torch bernoulli_ and NumPy rng.random(shape) >= p;"
                 " apply: pybn.dropout_apply(x, mask, p, out=y) vs x * mask * scale;"
                 " 2d: pybn.dropout(x, p, noise_shape=(N, C, 1, 1), out=y) vs torch nn.Dropout2d.")
    return "\n".join(lines)
