"""pybn.drop_block (DropBlock, docs/dropout.md) against a float64 NumPy reference and timm.

The reference (tests/reference_dropblock.py) takes its seeds from the independent NumPy
Philox reference of the mask stream (tests/reference_dropout.py, never pybn), dilates them as
timm does and normalises by numel / kept in float64. timm's own drop_block_2d is run on the
same seeds (its Bernoulli draw replaced by them) to check that the reference is timm's
semantics.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

import pybn
import pybn.nn
import reference_dropout as rd
from error_checks import assert_raises_naming
from reference import assert_bits_equal
from reference_dropblock import drop_block_ref, gamma_ref, keep_ref, max_pool_like_timm, noise_shape_ref, seeds_ref

ml_dtypes = pytest.importorskip("ml_dtypes")


# shapes: odd sizes, H != W, blocks even and odd, blocks larger than H or W or both
CASES = [
    ((4, 3, 9, 10), 3), ((4, 3, 9, 10), 4), ((2, 5, 7, 7), 7), ((3, 2, 5, 13), 6),
    ((2, 3, 4, 3), 9), ((5, 1, 1, 17), 2), ((3, 4, 11, 1), 5), ((1, 1, 1, 1), 3),
    ((8, 2, 67, 71), 7),   # a mask of 38k elements: split over threads
]
CASE_IDS = [f"{s}-b{b}" for s, b in CASES]
OPTIONS = [dict(), dict(couple_channels=False), dict(batchwise=True),
           dict(couple_channels=False, batchwise=True), dict(scale_by_keep=False), dict(gamma_scale=2.5)]
OPTION_IDS = ["coupled", "per-channel", "batchwise", "per-channel-batchwise", "unscaled", "gamma-scale"]


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("shape, block", CASES, ids=CASE_IDS)
def test_matches_the_reference_bitwise(isa, threads, shape, block, options):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    for p, seed, offset in [(0.3, 3, 0), (0.9, 2**64 - 1, 2**64 - 16), (0.05, 12345, 77)]:
        got = pybn.drop_block(x, p, block_size=block, seed=seed, offset=offset, **options)
        assert_bits_equal(got, drop_block_ref(x, p, block, seed, offset, **options))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, ml_dtypes.bfloat16], ids=["float64", "float16", "bfloat16"])
def test_every_dtype_rounds_once(isa, dtype):
    x = (np.random.default_rng(2).standard_normal((3, 4, 13, 11)) * 100).astype(dtype)
    for block, options in [(3, {}), (4, dict(couple_channels=False))]:
        got = pybn.drop_block(x, 0.37, block_size=block, seed=8, offset=32, **options)
        assert_bits_equal(got, drop_block_ref(x, 0.37, block, 8, 32, **options))


def test_mask_and_seeds_follow_the_documented_index_space():
    """Seeds are the dropped bits of dropout_mask(noise shape, gamma); the mask is their dilation."""
    shape, p, block = (3, 5, 12, 9), 0.4, 3
    noise = pybn.dropblock.drop_block_noise_shape(shape)
    assert noise == (3, 1, 12, 9)
    gamma = pybn.dropblock.drop_block_gamma(p, block, 12, 9)
    assert gamma == gamma_ref(p, block, 12, 9)
    seeds = ~rd.unpack_mask(pybn.dropout_mask(noise, gamma, seed=6, offset=48), math.prod(noise)).reshape(noise)
    np.testing.assert_array_equal(seeds, seeds_ref(noise, p, block, 6, 48))
    mask = rd.unpack_mask(pybn.drop_block_mask(shape, p, block_size=block, seed=6, offset=48), math.prod(noise))
    np.testing.assert_array_equal(mask.reshape(noise), keep_ref(shape, p, block, 6, 48))
    packed = pybn.drop_block_mask(shape, p, block_size=block, seed=6, offset=48)
    assert packed.dtype == np.uint8 and packed.size == (math.prod(noise) + 7) // 8
    assert np.unpackbits(packed, bitorder="little")[math.prod(noise):].sum() == 0   # trailing bits zero


def test_backward_is_the_same_call_on_the_gradient():
    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((2, 3, 8, 8))
    y = pybn.drop_block(x, 0.5, block_size=3, seed=1)
    dx = pybn.drop_block(dy, 0.5, block_size=3, seed=1)
    keep = y != 0   # x has no zeros
    scale = y[keep] / x[keep]
    np.testing.assert_allclose(scale, scale[0], rtol=0)
    np.testing.assert_array_equal(dx, np.where(keep, dy * scale[0], 0.0))


def test_edges_p_zero_all_dropped_and_nonfinite():
    x = np.random.default_rng(4).standard_normal((2, 2, 5, 5)).astype(np.float32)
    assert_bits_equal(pybn.drop_block(x, 0.0, block_size=3, seed=1), x)
    # gamma 1: every element a seed, nothing kept: zeros, +0.0 (no division by zero)
    zeros = pybn.drop_block(x, 1.0, block_size=1, seed=1)
    assert np.all(zeros == 0) and not np.any(np.signbit(zeros))
    # dropped NaN and infinity give +0.0, kept ones stay (as dropout)
    x[0, 0] = np.nan
    x[1, 1] = -np.inf
    y = pybn.drop_block(x, 0.6, block_size=2, seed=7)
    assert_bits_equal(y, drop_block_ref(x, 0.6, 2, 7))
    empty = np.zeros((0, 3, 4, 4), np.float32)
    assert pybn.drop_block(empty, 0.5, block_size=3, seed=1).shape == empty.shape
    assert pybn.drop_block(np.zeros((2, 3, 0, 4)), 0.5, block_size=3, seed=1).shape == (2, 3, 0, 4)
    # an empty batch with a huge spatial extent: no mask over the noise shape (which drops
    # the empty extent: a batchwise mask of 2**40 elements was 128 GiB, a MemoryError)
    huge = np.empty((0, 1, 2**20, 2**20), np.float32)
    assert pybn.drop_block(huge, 0.3, block_size=3, seed=1, batchwise=True).shape == huge.shape


def test_in_place_and_out():
    x = np.random.default_rng(5).standard_normal((2, 3, 6, 7))
    want = drop_block_ref(x, 0.4, 3, 2)
    out = np.empty_like(x)
    assert pybn.drop_block(x, 0.4, block_size=3, seed=2, out=out) is out
    assert_bits_equal(out, want)
    assert pybn.drop_block(x, 0.4, block_size=3, seed=2, out=x) is x
    assert_bits_equal(x, want)


@pytest.mark.parametrize("block, p", [(7, 0.1), (3, 0.25), (4, 0.5)])
def test_dropped_fraction(block, p):
    """The fraction dropped is its exact expectation under the seed probability (an element
    survives when none of the seed positions whose block covers it is a seed), and close to p
    (timm's gamma is the paper's approximation: it ignores overlaps and the seeds whose
    blocks are clipped at the border)."""
    n, h, w = 2000, 28, 28
    y = pybn.drop_block(np.ones((n, 1, h, w), np.float32), p, block_size=block, seed=11)
    dropped = (y == 0).reshape(n, -1).mean(axis=1)
    q = math.floor(gamma_ref(p, block, h, w) * 65536) / 65536   # the stream's seed probability
    cover = np.zeros((h, w))   # how many seed positions cover each element
    for r in range(h):
        for c in range(w):
            one = np.zeros((1, 1, h, w), bool)
            one[0, 0, r, c] = True
            cover += max_pool_like_timm(one, block, block)[0, 0]
    expected = float(np.mean(1 - (1 - q) ** cover))
    assert abs(dropped.mean() - expected) < 5 * dropped.std() / math.sqrt(n)
    assert abs(dropped.mean() - p) < 0.35 * p


def _timm_drop_block_2d():
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (pip install timm --no-deps): the timm comparison needs it")
    # timm/layers/drop.py imports torch only; the package's __init__ needs torchvision
    path = spec.submodule_search_locations[0] + "/layers/drop.py"
    drop_spec = importlib.util.spec_from_file_location("timm_layers_drop", path)
    module = importlib.util.module_from_spec(drop_spec)
    drop_spec.loader.exec_module(module)
    return module.drop_block_2d


@pytest.mark.parametrize("options", [dict(), dict(couple_channels=False)], ids=["coupled", "per-channel"])
@pytest.mark.parametrize("shape, block", CASES[:7], ids=CASE_IDS[:7])
def test_reference_is_timms_drop_block_on_the_same_seeds(monkeypatch, shape, block, options):
    drop_block_2d = _timm_drop_block_2d()
    x = np.random.default_rng(6).standard_normal(shape)
    p, seed, offset = 0.45, 21, 160
    noise = noise_shape_ref(shape, options.get("couple_channels", True), False)
    seeds = seeds_ref(noise, p, block, seed, offset)
    gammas = []

    def seeded_bernoulli_(self, gamma):   # timm's one Bernoulli draw: the seeds of the stream
        gammas.append(gamma)
        assert tuple(self.shape) == noise
        return self.copy_(torch.from_numpy(seeds.astype(np.float64)))

    monkeypatch.setattr(torch.Tensor, "bernoulli_", seeded_bernoulli_)
    want = drop_block_2d(torch.from_numpy(x), drop_prob=p, block_size=block, **options).numpy()
    assert gammas == [pytest.approx(gamma_ref(p, block, shape[2], shape[3]), rel=1e-15)]
    got = pybn.drop_block(x, p, block_size=block, seed=seed, offset=offset, **options)
    np.testing.assert_array_equal(got == 0, want == 0)
    # timm divides by (kept + 1e-7) in float32: the same scale to float32 precision
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)
    np.testing.assert_array_equal(got, drop_block_ref(x, p, block, seed, offset, **options))


def test_counters_used_by_consecutive_masks_do_not_overlap():
    """A caller advancing offset by counters_used(prod(noise shape)) gets independent seeds."""
    shape = (2, 3, 10, 10)
    n = math.prod(pybn.dropblock.drop_block_noise_shape(shape))
    step = pybn.counters_used(n)
    both = ~rd.mask_bits(2 * n + 128, gamma_ref(0.5, 3, 10, 10), 9, 0)   # one long stream
    first = ~rd.mask_bits(n, gamma_ref(0.5, 3, 10, 10), 9, 0)
    second = ~rd.mask_bits(n, gamma_ref(0.5, 3, 10, 10), 9, step)
    np.testing.assert_array_equal(first, both[:n])
    np.testing.assert_array_equal(second, both[128 * (-(-n // 128)):][:n])
    m1 = pybn.drop_block_mask(shape, 0.5, block_size=3, seed=9)
    m2 = pybn.drop_block_mask(shape, 0.5, block_size=3, seed=9, offset=step)
    assert not np.array_equal(m1, m2)


@pytest.mark.parametrize("call, name, exc", [
    (lambda x: pybn.drop_block(x, 1.5, block_size=3, seed=0), "p", ValueError),
    (lambda x: pybn.drop_block(x, "a", block_size=3, seed=0), "p", TypeError),
    (lambda x: pybn.drop_block(x, 0.1, block_size=0, seed=0), "block_size", ValueError),
    (lambda x: pybn.drop_block(x, 0.1, block_size=2.0, seed=0), "block_size", TypeError),
    (lambda x: pybn.drop_block(x[0], 0.1, block_size=3, seed=0), "x", ValueError),
    (lambda x: pybn.drop_block(x[..., None], 0.1, block_size=3, seed=0), "x", ValueError),
    (lambda x: pybn.drop_block(x, 0.1, block_size=3, seed=-1), "seed", ValueError),
    (lambda x: pybn.drop_block(x, 0.1, block_size=3, seed=0, offset=2**64), "offset", ValueError),
    (lambda x: pybn.drop_block(x, 0.1, block_size=3, seed=0, gamma_scale=-1.0), "gamma_scale", ValueError),
    (lambda x: pybn.drop_block(x, 0.1, block_size=3, seed=0, couple_channels=1), "couple_channels", TypeError),
    (lambda x: pybn.drop_block(x, 0.1, block_size=3, seed=0, batchwise="no"), "batchwise", TypeError),
    (lambda x: pybn.drop_block(x, 0.1, block_size=3, seed=0, scale_by_keep=None), "scale_by_keep", TypeError),
    (lambda x: pybn.drop_block(x.astype(np.int32), 0.1, block_size=3, seed=0), "x", TypeError),
    (lambda x: pybn.drop_block(x, 0.1, block_size=3, seed=0, out=np.empty((2, 3, 4, 4), np.float32)), "out",
     ValueError),
    (lambda x: pybn.drop_block_mask((2, 3, 4), 0.1, block_size=3, seed=0), "shape", ValueError),
])
def test_bad_input_names_the_argument(call, name, exc):
    x = np.ones((2, 3, 5, 5), np.float32)
    assert_raises_naming(exc, name, call, x)


# --------------------------------------------------------------------------- channels-last

@pytest.mark.parametrize("options", [dict(), dict(couple_channels=False), dict(batchwise=True)],
                         ids=["coupled", "per-channel", "batchwise"])
def test_channels_last_axis_gives_the_same_mask(isa, options):
    x = np.random.default_rng(7).standard_normal((3, 4, 9, 6)).astype(np.float32)
    want = drop_block_ref(x, 0.4, 3, 5, 16, **options)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    got = pybn.drop_block(nhwc, 0.4, block_size=3, seed=5, offset=16, axis=-1, **options)
    assert_bits_equal(np.ascontiguousarray(got.transpose(0, 3, 1, 2)), want)
    assert_raises_naming(ValueError, "axis", pybn.drop_block, x, 0.4, block_size=3, seed=5, axis=2)


# --------------------------------------------------------------------------- pybn.nn.DropBlock2d

def test_layer_advances_offset_backward_regenerates_and_eval_is_identity():
    layer = pybn.nn.DropBlock2d(0.3, 3, seed=17)
    x = np.random.default_rng(8).standard_normal((2, 3, 10, 10))
    used = pybn.counters_used(2 * 10 * 10)
    y1, y2 = layer(x), layer(x)
    assert_bits_equal(y1, drop_block_ref(x, 0.3, 3, 17, 0))
    assert_bits_equal(y2, drop_block_ref(x, 0.3, 3, 17, used))
    assert layer.offset == 2 * used
    dy = np.random.default_rng(9).standard_normal(x.shape)
    assert_bits_equal(layer.backward(dy), drop_block_ref(dy, 0.3, 3, 17, used))
    layer.eval()
    assert layer(x) is x and layer.backward(dy) is dy and layer.offset == 2 * used


def test_layer_ranks_split_per_sample_masks_and_share_batchwise_ones():
    x = np.ones((2, 1, 8, 8))
    used = pybn.counters_used(2 * 64)
    ranks = [pybn.nn.DropBlock2d(0.5, 3, seed=3, rank=r, world_size=3) for r in range(3)]
    for step in range(2):
        for r, layer in enumerate(ranks):
            assert_bits_equal(layer(x), drop_block_ref(x, 0.5, 3, 3, (step * 3 + r) * used))
    shared = [pybn.nn.DropBlock2d(0.5, 3, seed=3, rank=r, world_size=3, batchwise=True) for r in range(3)]
    outs = [layer(x) for layer in shared]
    assert all(np.array_equal(o, outs[0]) for o in outs) and shared[0].offset == pybn.counters_used(64)


def test_mc_dropout_keeps_drop_block_on_with_the_documented_offsets():
    block, drop = pybn.nn.DropBlock2d(0.4, 3, seed=1).eval(), pybn.nn.Dropout(0.2, seed=2).eval()
    x = np.random.default_rng(10).standard_normal((2, 2, 7, 7))
    with pybn.nn.mc_dropout([drop, block], seed=99, sample=5):
        got = block(x)
    assert_bits_equal(got, drop_block_ref(x, 0.4, 3, 99, pybn.nn.mc_dropout_offset(1, 5)))
    assert not block.training and block.seed == 1 and block.offset == 0


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(p=1.5), ValueError, "p"), (dict(block_size=0), ValueError, "block_size"),
    (dict(gamma_scale=-1.0), ValueError, "gamma_scale"), (dict(couple_channels=None), TypeError, "couple_channels"),
    (dict(scale_by_keep=1), TypeError, "scale_by_keep"), (dict(rank=3, world_size=3), ValueError, "rank"),
    (dict(seed=-1), ValueError, "seed"),
])
def test_layer_bad_arguments(kwargs, exc, name):
    assert_raises_naming(exc, name, pybn.nn.DropBlock2d, **kwargs)


# --------------------------------------------------------------------------- PyTorch

def test_torch_module_matches_the_reference_in_both_layouts_and_autograd_regenerates():
    import pybn.torch.nn as pnn

    module = pnn.DropBlock2d(0.35, 4, seed=12)
    x = torch.randn(3, 4, 9, 11, dtype=torch.float64, requires_grad=True)
    y = module(x)
    want = drop_block_ref(x.detach().numpy(), 0.35, 4, 12, 0)
    np.testing.assert_array_equal(y.detach().numpy(), want)
    dy = torch.randn_like(x)
    y.backward(dy)
    np.testing.assert_array_equal(x.grad.numpy(), drop_block_ref(dy.numpy(), 0.35, 4, 12, 0))
    assert module.offset == pybn.counters_used(3 * 9 * 11)
    module.offset = 0
    xcl = x.detach().contiguous(memory_format=torch.channels_last)
    ycl = module(xcl)
    assert ycl.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(ycl.numpy(), want)
    assert module.eval()(x) is x


def test_torch_module_agrees_with_timms_constructor_and_refuses_what_it_lacks():
    import pybn.torch.nn as pnn

    m = pnn.DropBlock2d(0.2, 5, 1.0, False, False, False, True, seed=1)   # timm's positional order
    assert (m.drop_prob, m.block_size, m.couple_channels, m.scale_by_keep) == (0.2, 5, False, True)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    np.testing.assert_array_equal(m(x).numpy(), drop_block_ref(x.numpy(), 0.2, 5, 1, 0, couple_channels=False))
    for kwargs, name in [(dict(with_noise=True), "with_noise"), (dict(inplace=True), "inplace"),
                         (dict(drop_prob=2.0), "drop_prob"), (dict(block_size=0), "block_size")]:
        assert_raises_naming(ValueError, name, pnn.DropBlock2d, **kwargs)
    assert_raises_naming(ValueError, "x", pnn.DropBlock2d(0.2, seed=1), torch.randn(2, 3, 8))


def test_torch_functional_takes_timms_positional_order():
    # timm's drop_block_2d(x, drop_prob, block_size, gamma_scale, with_noise, inplace,
    # couple_channels, scale_by_keep): a call written for timm means the same here
    import pybn.torch.nn as pnn

    x = torch.randn(2, 3, 8, 8)
    philox = torch.tensor([5, 0])
    positional = pnn.drop_block_2d(x, 0.3, 3, 1.0, False, False, False, False, philox=philox)
    named = pnn.drop_block_2d(x, 0.3, 3, couple_channels=False, scale_by_keep=False, philox=philox)
    assert torch.equal(positional, named)
    assert not torch.equal(positional, pnn.drop_block_2d(x, 0.3, 3, philox=philox))  # (the options matter)
    for name, position in (("with_noise", 4), ("inplace", 5)):
        args = [x, 0.3, 3, 1.0, False, False]
        args[position] = True
        assert_raises_naming(ValueError, name, pnn.drop_block_2d, *args)
        args[position] = "False"
        assert_raises_naming(TypeError, name, pnn.drop_block_2d, *args)


def test_torch_unseeded_follows_torch_manual_seed():
    import pybn.torch.nn as pnn

    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(4)
    a = pnn.DropBlock2d(0.3, 3)(x)
    torch.manual_seed(4)
    b = pnn.drop_block_2d(x, 0.3, 3)
    assert torch.equal(a, b)


def test_torch_op_opcheck_and_gradcheck():
    from torch.autograd import gradcheck, gradgradcheck

    import pybn.torch  # noqa: F401  (registers the operators)

    g = torch.Generator().manual_seed(3)
    philox = torch.tensor([7, 32])
    x = torch.randn(3, 4, 7, 6, generator=g, requires_grad=True)
    xcl = torch.randn(3, 4, 7, 6, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    x16 = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.bfloat16, requires_grad=True)
    for args in [(x, 0.3, 3, philox, 1.0, True, False, True), (xcl, 0.5, 2, philox, 1.0, False, False, True),
                 (x16, 0.4, 4, philox, 1.5, True, True, False)]:
        torch.library.opcheck(torch.ops.pybn.drop_block.default, args)
    x64 = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)

    def drop(x):
        return torch.ops.pybn.drop_block(x, 0.4, 3, philox, 1.0, True, False, True)[0]
    assert gradcheck(drop, (x64,))
    assert gradgradcheck(drop, (x64,))


def test_torch_compile_fullgraph_gives_the_eager_result():
    import pybn.torch.nn as pnn

    module = pnn.DropBlock2d(0.3, 3, seed=2)
    x = torch.randn(2, 3, 8, 8)
    eager = module(x)
    module.offset = 0
    compiled = torch.compile(lambda t: pnn.drop_block_2d(t, 0.3, 3, philox=torch.tensor([2, 0])),
                             backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), eager)


def test_mc_dropout_on_a_torch_model():
    import pybn.torch.nn as pnn

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1, dtype=torch.float64), pnn.DropBlock2d(0.4, 3)).eval()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        h = model[0](x).numpy()
        with pybn.nn.mc_dropout(model, seed=7, sample=2):
            got = model(x).numpy()
    np.testing.assert_array_equal(got, drop_block_ref(h, 0.4, 3, 7, pybn.nn.mc_dropout_offset(0, 2)))
    assert model[1].seed is None and not model[1].training
