"""The folding row of ``python -m pybn bench``: every conv -> BN pair of a ResNet-50
(53 pairs, 23.5M conv weights, float32) folded with pybn.fold_conv_bn, against torch's
``fuse_conv_bn_weights`` and the NumPy formula on the same arrays, results checked first.
"""
from __future__ import annotations

import numpy as np

from .timing import TimingConfig, fmt_time, measure


def resnet50_conv_shapes() -> list[tuple[int, ...]]:
    """Weight shapes of ResNet-50's convolutions (each followed by a BN)."""
    shapes = [(64, 3, 7, 7)]
    c_in = 64
    for width, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for b in range(blocks):
            shapes += [(width, c_in, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            if b == 0:
                shapes.append((4 * width, c_in, 1, 1))  # the downsample branch
            c_in = 4 * width
    return shapes


def _numpy_fold(w, mean, var, gamma, beta, eps=1e-5):
    s = gamma / np.sqrt(var + eps)
    return w * s.reshape((-1,) + (1,) * (w.ndim - 1)).astype(w.dtype), beta - mean * s


def run(cfg: TimingConfig, rounds: int, want: list, torch, progress) -> dict:
    import pybn

    rng = np.random.default_rng(0)
    pairs = []
    for shape in resnet50_conv_shapes():
        c = shape[0]
        pairs.append((rng.standard_normal(shape, dtype=np.float32), rng.normal(0, 1, c).astype(np.float32),
                      rng.uniform(0.5, 2, c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32),
                      rng.normal(0, 1, c).astype(np.float32)))
    params = sum(p[0].size for p in pairs)
    w, mean, var, gamma, beta = pairs[5]
    got = pybn.fold_conv_bn(w, None, mean, var, gamma, beta)
    ref = _numpy_fold(w.astype(np.float64), mean, var, gamma, beta)
    if not np.allclose(got.weight, ref[0], rtol=1e-6, atol=1e-6):
        raise AssertionError("fold bench: pybn.fold_conv_bn differs from the formula")

    def pybn_all():
        for w, mean, var, gamma, beta in pairs:
            pybn.fold_conv_bn(w, None, mean, var, gamma, beta)

    def numpy_all():
        for w, mean, var, gamma, beta in pairs:
            _numpy_fold(w, mean, var, gamma, beta)

    t = min(measure(pybn_all, cfg).median for _ in range(rounds))
    peers = {}
    if "numpy" in want:
        peers["numpy"] = min(measure(numpy_all, cfg).median for _ in range(rounds))
    if torch is not None:
        from torch.nn.utils.fusion import fuse_conv_bn_weights

        tpairs = [tuple(torch.from_numpy(a) for a in p) for p in pairs]
        bias = [torch.zeros(p[0].shape[0]) for p in tpairs]

        def torch_all():
            with torch.no_grad():
                for (w, mean, var, gamma, beta), b in zip(tpairs, bias):
                    fuse_conv_bn_weights(w, b, mean, var, 1e-5, gamma, beta)

        peers["torch"] = min(measure(torch_all, cfg).median for _ in range(rounds))
    progress(f"fold resnet50 pybn {fmt_time(t)}")
    return {"pairs": len(pairs), "params": params, "pybn_s": t, "peers": peers}


def render(result: dict) -> str:
    t = result["pybn_s"]
    cells = [f"pybn {fmt_time(t)}"] + [f"{peer} {fmt_time(tp)} ({tp / t:.1f}x)" for peer, tp in result["peers"].items()]
    return (f"fold: ResNet-50's {result['pairs']} conv->BN pairs ({result['params'] / 1e6:.1f}M float32 weights), "
            f"pybn.fold_conv_bn vs torch fuse_conv_bn_weights and the NumPy formula: " + ", ".join(cells))
