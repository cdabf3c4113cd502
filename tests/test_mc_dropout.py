"""pybn.nn.mc_dropout: dropout kept on at inference with masks fixed by (seed, sample).

The expected masks come from the NumPy Philox reference (tests/reference_dropout.py) at
the documented offsets ``k * 2**56 + sample * 2**36`` (docs/dropout.md, "MC-dropout").
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import pybn.nn
import reference_dropout as rd
from error_checks import assert_raises_naming


def offset(k, sample):
    return k * 2**56 + sample * 2**36


def layers():
    return [pybn.nn.Dropout(0.3, seed=5), pybn.nn.BatchNorm(4, dtype="float64"),
            pybn.nn.DropPath(0.5, seed=6, rank=1, world_size=2)]


def run(model, x):
    for layer in model:
        x = layer(x)
    return x


def test_masks_are_the_documented_ones_and_the_state_comes_back(isa):
    model = layers()
    for layer in model:
        layer.eval()
    model[0].offset, model[2].offset = 32, 64
    x = np.random.default_rng(0).standard_normal((10, 4))
    bn = model[1]
    for sample in (0, 1, 7):
        with pybn.nn.mc_dropout(model, seed=99, sample=sample):
            got = run(model, x)
            assert not bn.training
        a = rd.dropout_ref(x, 0.3, 99, offset(0, sample))
        b = bn.eval()(a)   # evaluation-mode batch norm, as inside the context
        keep = rd.mask_bits(10, 0.5, 99, offset(1, sample)).reshape(10, 1)
        np.testing.assert_array_equal(got, np.where(keep, b * rd.scale64(0.5), 0.0))
    assert [(m.training, m.seed, m.offset) for m in (model[0], model[2])] == [(False, 5, 32), (False, 6, 64)]
    assert (model[2].rank, model[2].world_size) == (1, 2)
    assert model[0](x) is x   # evaluation mode again: the identity


def test_same_masks_across_calls_and_processes():
    x = np.linspace(-1, 1, 40).reshape(10, 4)

    def samples():
        model = [pybn.nn.Dropout(0.5), pybn.nn.DropPath(0.2)]   # seeds from the OS: the context's seed rules
        out = []
        for t in range(4):
            with pybn.nn.mc_dropout(model, seed=2024, sample=t):
                out.append(run(model, x))
        return np.stack(out)

    first = samples()
    np.testing.assert_array_equal(first, samples())
    assert len({s.tobytes() for s in first}) == 4   # the samples differ
    code = ("import numpy as np, pybn.nn\n"
            "x = np.linspace(-1, 1, 40).reshape(10, 4)\n"
            "model = [pybn.nn.Dropout(0.5), pybn.nn.DropPath(0.2)]\n"
            "out = []\n"
            "for t in range(4):\n"
            "    with pybn.nn.mc_dropout(model, seed=2024, sample=t):\n"
            "        y = x\n"
            "        for layer in model:\n"
            "            y = layer(y)\n"
            "    out.append(y)\n"
            "print(np.stack(out).tobytes().hex())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert bytes.fromhex(proc.stdout.strip()) == first.tobytes()


def test_state_is_restored_when_the_body_raises():
    layer = pybn.nn.Dropout(0.5, seed=3).eval()
    with pytest.raises(KeyError), pybn.nn.mc_dropout([layer], seed=1, sample=0):
        raise KeyError("body")
    assert (layer.training, layer.seed, layer.offset) == (False, 3, 0)


def test_torch_model():
    import pybn.torch.nn as pnn

    model = torch.nn.Sequential(torch.nn.Linear(4, 6, dtype=torch.float64), pnn.Dropout(0.25),
                                pnn.StochasticDepth(0.5, "row", seed=4)).eval()
    x = torch.randn(9, 4, dtype=torch.float64)
    with torch.no_grad():
        h = model[0](x).numpy()
        with pybn.nn.mc_dropout(model, seed=11, sample=3):
            got = model(x).numpy()
    a = rd.dropout_ref(h, 0.25, 11, offset(0, 3))
    keep = rd.mask_bits(9, 0.5, 11, offset(1, 3)).reshape(9, 1)
    np.testing.assert_array_equal(got, np.where(keep, a * rd.scale64(0.5), 0.0))
    assert model[1].seed is None and not model[1].training   # unseeded before: unseeded again
    assert model[2].seed == 4 and model[2].offset == 0


def test_stock_torch_dropout_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    assert_raises_naming(TypeError, ("layers",), lambda: pybn.nn.mc_dropout(model, seed=1, sample=0).__enter__())


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(sample=-1), ValueError, "sample"), (dict(sample=2**20), ValueError, "sample"),
    (dict(sample=1.0), TypeError, "sample"), (dict(seed=-1), ValueError, "seed"),
    (dict(seed=None), TypeError, "seed"), (dict(layers=5), TypeError, "layers"),
    (dict(layers=[np.ones(3), pybn.nn.BatchNorm(3)]), ValueError, "layers"),
    (dict(layers=[pybn.nn.Dropout(0.5, seed=1) for _ in range(257)]), ValueError, "layers"),
])
def test_bad_arguments(kwargs, exc, name):
    args = dict(layers=[pybn.nn.Dropout(0.5, seed=1)], seed=1, sample=0) | kwargs
    assert_raises_naming(exc, (name,), lambda: pybn.nn.mc_dropout(**args).__enter__())
