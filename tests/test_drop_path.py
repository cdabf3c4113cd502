"""pybn.drop_path (stochastic depth), pybn.nn.DropPath and pybn.torch's StochasticDepth / DropPath.

The reference is torchvision's ``stochastic_depth`` semantics, written here in NumPy:
``noise`` of shape (N, 1, ..., 1) (mode "row") or (1, ..., 1) (mode "batch") holding the
keep decisions, ``y = x * noise / q`` for kept samples, 0 for dropped ones, p = 0 the
identity and p = 1 zeros. The keep decisions come from the independent NumPy Philox
reference of the mask stream (tests/reference_dropout.py), never from pybn, and q is the
keep probability of the 16-bit test (torchvision's 1 - p for p a multiple of 2**-16).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pybn
import pybn.nn
import reference_dropout as rd
from error_checks import assert_raises_naming


def stochastic_depth_ref(x, p, seed, offset, mode):
    """torchvision's stochastic_depth (training) on the reference's Bernoulli draws."""
    x = np.asarray(x)
    if p == 0.0:
        return x.copy()
    shape = (x.shape[0],) + (1,) * (x.ndim - 1) if mode == "row" else (1,) * x.ndim
    if p == 1.0:
        return np.zeros_like(x)
    keep = rd.mask_bits(math.prod(shape), p, seed, offset).reshape(shape)
    survival = x.dtype.type(rd.scale64(p))   # 1 / q, rounded once to x's dtype (as pybn's dropout)
    return np.where(keep, x * survival, x.dtype.type(0))


SHAPES = [(7, 3, 5, 4), (300, 9), (129,), (1, 4, 4), (5, 1), (0, 3)]


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torchvision_semantics_on_the_reference_stream(isa, threads, mode, shape, dtype):
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    for p, seed, offset in [(0.5, 3, 0), (0.2, 2**64 - 1, 2**64 - 16), (0.9, 12345, 77)]:
        got = pybn.drop_path(x, p, seed=seed, offset=offset, mode=mode)
        np.testing.assert_array_equal(got, stochastic_depth_ref(x, p, seed, offset, mode))


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_p_edges(isa, mode):
    x = np.random.default_rng(2).standard_normal((6, 4)).astype(np.float32)
    np.testing.assert_array_equal(pybn.drop_path(x, 0.0, seed=1, mode=mode), x)
    zeros = pybn.drop_path(x, 1.0, seed=1, mode=mode)
    assert np.all(zeros == 0) and not np.any(np.signbit(zeros))
    tiny = 2.0**-16   # threshold 1: only the 16-bit word 0 drops
    np.testing.assert_array_equal(pybn.drop_path(x, tiny, seed=5, mode=mode),
                                  stochastic_depth_ref(x, tiny, 5, 0, mode))
    near_one = 1.0 - 2.0**-16
    np.testing.assert_array_equal(pybn.drop_path(x, near_one, seed=5, mode=mode),
                                  stochastic_depth_ref(x, near_one, 5, 0, mode))


def test_whole_samples_are_kept_or_dropped_and_scale_is_torchvisions():
    x = np.ones((4000, 3, 2), np.float64)
    y = pybn.drop_path(x, 0.25, seed=9)
    rows = y.reshape(4000, -1)
    assert np.all((rows == 0).all(axis=1) | (rows == 1 / 0.75).all(axis=1))   # torchvision: x / (1 - p)
    kept = (rows[:, 0] != 0).mean()
    assert abs(kept - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 4000)


def test_keep_bits_are_dropout_mask_with_the_noise_shape():
    """The documented contract: row decisions are dropout_mask(N), the batch one dropout_mask(1)."""
    x = np.ones((200, 3), np.float32)
    y = pybn.drop_path(x, 0.5, seed=4, offset=32)
    bits = np.unpackbits(pybn.dropout_mask(200, 0.5, seed=4, offset=32), count=200, bitorder="little")
    np.testing.assert_array_equal(y[:, 0] != 0, bits.astype(bool))
    np.testing.assert_array_equal(y, pybn.dropout(x, 0.5, seed=4, offset=32, noise_shape=(200, 1)))
    one = np.unpackbits(pybn.dropout_mask(1, 0.5, seed=4, offset=32), count=1, bitorder="little")[0]
    assert bool(np.all(pybn.drop_path(x, 0.5, seed=4, offset=32, mode="batch") != 0)) == bool(one)


def test_backward_by_regeneration_equals_torch_autograd():
    x = np.random.default_rng(3).standard_normal((33, 4, 3))
    dy = np.random.default_rng(4).standard_normal(x.shape)
    keep = torch.from_numpy(rd.mask_bits(33, 0.3, 8, 16).reshape(33, 1, 1).astype(np.float64))
    xt = torch.from_numpy(x).requires_grad_()
    (xt * keep * rd.scale64(0.3)).backward(torch.from_numpy(dy))
    dx = pybn.drop_path(dy, 0.3, seed=8, offset=16)
    np.testing.assert_array_equal(dx, xt.grad.numpy())


def test_an_empty_array_draws_no_mask():
    # mode "row" draws over (N, 1, ...): with another extent 0 and N = 2**40, that mask was
    # 128 GiB (a MemoryError) for an empty result
    x = np.empty((2**40, 0, 1), np.float32)
    assert pybn.drop_path(x, 0.3, seed=1).shape == x.shape
    assert pybn.dropout(x, 0.3, seed=1, noise_shape=(2**40, 1, 1)).shape == x.shape


def test_out_and_in_place():
    x = np.random.default_rng(5).standard_normal((9, 5)).astype(np.float32)
    want = stochastic_depth_ref(x, 0.5, 1, 0, "row")
    out = np.empty_like(x)
    assert pybn.drop_path(x, 0.5, seed=1, out=out) is out
    np.testing.assert_array_equal(out, want)
    pybn.drop_path(x, 0.5, seed=1, out=x)
    np.testing.assert_array_equal(x, want)


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(mode="rows"), ValueError, "mode"),
    (dict(mode=None), TypeError, "mode"),
    (dict(p=1.5), ValueError, "p"),
    (dict(p=-0.1), ValueError, "p"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.0), TypeError, "seed"),
    (dict(offset=2**64), ValueError, "offset"),
    (dict(x=np.float32(1.0)), ValueError, "x"),
    (dict(x=np.ones((2, 2), np.int32)), TypeError, "x"),
])
def test_bad_input(kwargs, exc, name):
    args = dict(x=np.ones((2, 2), np.float32), p=0.5, seed=1) | kwargs
    assert_raises_naming(exc, (name,), pybn.drop_path, **args)


def test_batch_mode_takes_a_0d_array():
    x = np.array(2.0)
    y = pybn.drop_path(x, 0.5, seed=1, mode="batch")
    np.testing.assert_array_equal(y, stochastic_depth_ref(x, 0.5, 1, 0, "batch"))


# --------------------------------------------------------------------------- pybn.nn.DropPath

def test_layer_advances_offset_and_backward_regenerates():
    layer = pybn.nn.DropPath(0.4, seed=11)
    x = np.random.default_rng(6).standard_normal((300, 2)).astype(np.float32)
    y1, y2 = layer(x), layer(x)
    np.testing.assert_array_equal(y1, stochastic_depth_ref(x, 0.4, 11, 0, "row"))
    np.testing.assert_array_equal(y2, stochastic_depth_ref(x, 0.4, 11, 48, "row"))   # 16 * ceil(300 / 128)
    assert layer.offset == 96
    dy = np.ones_like(x)
    np.testing.assert_array_equal(layer.backward(dy), stochastic_depth_ref(dy, 0.4, 11, 48, "row"))
    layer.eval()
    assert layer(x) is x
    np.testing.assert_array_equal(layer.backward(dy), dy)


def test_layer_batch_mode_advances_by_one_group():
    layer = pybn.nn.DropPath(0.5, mode="batch", seed=2)
    x = np.ones((5, 3), np.float64)
    got = [layer(x) for _ in range(8)]
    for i, y in enumerate(got):
        np.testing.assert_array_equal(y, stochastic_depth_ref(x, 0.5, 2, 16 * i, "batch"))


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(p=2.0), ValueError, "p"), (dict(mode="col"), ValueError, "mode"), (dict(seed=-1), ValueError, "seed"),
    (dict(rank=2, world_size=2), ValueError, "rank"), (dict(world_size=0), ValueError, "world_size"),
    (dict(rank=1.0), TypeError, "rank"),
])
def test_layer_bad_arguments(kwargs, exc, name):
    assert_raises_naming(exc, (name,), pybn.nn.DropPath, **(dict(p=0.5) | kwargs))


def test_layer_backward_before_forward_is_a_runtime_error():
    with pytest.raises(RuntimeError, match="backward"):
        pybn.nn.DropPath(0.5, seed=1).backward(np.ones(3))


# --------------------------------------------------------------------------- rank consistency

def test_ranks_share_batch_decisions_and_split_row_decisions():
    """Simulated ranks (the masks are pure functions of the arguments, so one process shows
    what separate processes compute; test_recalibrate runs the real 2-process case of
    recalibration): with one seed, mode "batch" gives every rank the same decision at every
    step, and mode "row" gives the ranks the counter ranges of consecutive slices, never
    the same counters, at every step."""
    world, n, steps = 4, 130, 5   # 130 samples: 32 counters per rank and step
    x = np.ones((n, 2), np.float32)
    batch = [pybn.nn.DropPath(0.5, "batch", seed=7, rank=r, world_size=world) for r in range(world)]
    row = [pybn.nn.DropPath(0.5, "row", seed=7, rank=r, world_size=world) for r in range(world)]
    for step in range(steps):
        shared = [layer(x) for layer in batch]
        for y in shared[1:]:
            np.testing.assert_array_equal(y, shared[0])
        np.testing.assert_array_equal(shared[0], stochastic_depth_ref(x, 0.5, 7, 16 * step, "batch"))
        per_rank = [layer(x)[:, 0] != 0 for layer in row]
        for r, keep in enumerate(per_rank):   # rank r: counters (step * world + r) * 32 onwards
            want = rd.mask_bits(n, 0.5, 7, (step * world + r) * 32)
            np.testing.assert_array_equal(keep, want)
        assert len({k.tobytes() for k in per_rank}) == world
        assert len({layer.offset for layer in row}) == 1   # the same state on every rank


# --------------------------------------------------------------------------- pybn.torch

def test_torch_module_matches_the_reference_and_autograd_regenerates():
    from pybn.torch.nn import DropPath, StochasticDepth

    module = StochasticDepth(0.3, "row", seed=21)
    x = torch.randn(140, 3, 4, dtype=torch.float64, requires_grad=True)
    y = module(x)
    np.testing.assert_array_equal(y.detach().numpy(), stochastic_depth_ref(x.detach().numpy(), 0.3, 21, 0, "row"))
    dy = torch.randn_like(x)
    y.backward(dy)
    np.testing.assert_array_equal(x.grad.numpy(), stochastic_depth_ref(dy.numpy(), 0.3, 21, 0, "row"))
    assert module.offset == 32
    module.eval()
    assert module(x) is x
    timm_like = DropPath(0.3, seed=21)
    np.testing.assert_array_equal(timm_like(x).detach().numpy(), y.detach().numpy())


def test_torch_module_channels_last_and_batch_mode():
    from pybn.torch.nn import StochasticDepth

    x = torch.randn(6, 3, 4, 5).to(memory_format=torch.channels_last)
    y = StochasticDepth(0.5, "row", seed=3)(x)
    np.testing.assert_array_equal(y.numpy(), stochastic_depth_ref(x.contiguous().numpy(), 0.5, 3, 0, "row"))
    yb = StochasticDepth(0.5, "batch", seed=3)(x)
    np.testing.assert_array_equal(yb.numpy(), stochastic_depth_ref(x.contiguous().numpy(), 0.5, 3, 0, "batch"))


def test_torch_functional_unseeded_follows_torch_manual_seed():
    from pybn.torch.nn import stochastic_depth

    x = torch.randn(50, 4)
    torch.manual_seed(0)
    a = stochastic_depth(x, 0.5, "row")
    torch.manual_seed(0)
    b = stochastic_depth(x, 0.5, "row")
    assert torch.equal(a, b)
    assert stochastic_depth(x, 0.5, "row", training=False) is x
    assert stochastic_depth(x, 0.0, "row") is x
    assert torch.equal(stochastic_depth(x, 1.0, "batch"), torch.zeros_like(x))


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(p=1.5), ValueError, "p"), (dict(mode="rows"), ValueError, "mode"), (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"), (dict(rank=3, world_size=2), ValueError, "rank"),
])
def test_torch_module_bad_arguments(kwargs, exc, name):
    from pybn.torch.nn import StochasticDepth

    assert_raises_naming(exc, (name,), StochasticDepth, **(dict(p=0.5) | kwargs))
