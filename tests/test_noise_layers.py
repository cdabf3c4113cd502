"""pybn.nn.AlphaDropout / GaussianDropout / GaussianNoise and their PyTorch operators and
modules (pybn.torch.nn): the layer API of Dropout (offsets, eval identity, backward by
regeneration, mc_dropout), values against the NumPy functions and torch's AlphaDropout,
opcheck, gradcheck in float64, layouts and other dtypes."""
import math

import numpy as np
import pytest

import pybn
import pybn.nn
from reference_dropout import keep_mask
from reference_noise import normal_variates

torch = pytest.importorskip("torch")
import pybn.torch  # noqa: E402  (registers torch.ops.pybn)
import pybn.torch.nn as pnn  # noqa: E402
from torch.autograd import gradcheck, gradgradcheck  # noqa: E402

ALPHA = 1.7580993408473766


# ------------------------------------------------------------------ pybn.nn

LAYERS = [
    (lambda seed: pybn.nn.AlphaDropout(0.3, seed=seed), pybn.counters_used),
    (lambda seed: pybn.nn.GaussianDropout(0.3, seed=seed), pybn.normal_counters_used),
    (lambda seed: pybn.nn.GaussianNoise(0.5, seed=seed), pybn.normal_counters_used),
]


def reference_forward(layer, x, offset):
    """The layer's documented forward from the NumPy references."""
    if isinstance(layer, pybn.nn.AlphaDropout):
        keep = keep_mask(x.shape, layer.p, layer.seed, offset)
        a, b, c = pybn.noise.alpha_dropout_coefficients(layer.p)
        return np.where(keep, x * a + b, b - c), np.where(keep, a, 0.0)
    z = normal_variates(x.size, layer.seed, offset).reshape(x.shape).astype(np.float64)
    if isinstance(layer, pybn.nn.GaussianDropout):
        n = 1 + math.sqrt(layer.rate / (1 - layer.rate)) * z
        return x * n, n
    return x + layer.stddev * z, np.ones_like(x)


@pytest.mark.parametrize("make, counters", LAYERS, ids=["alpha", "gaussian_dropout", "gaussian_noise"])
def test_layer_offsets_forward_backward_and_eval(make, counters, rng):
    layer = make(2**64 - 3)
    x = rng.standard_normal((6, 70))
    offset = 0
    for _ in range(3):
        y = layer(x)
        want_y, grad_factor = reference_forward(layer, x, offset)
        np.testing.assert_array_equal(y, want_y)
        dy = rng.standard_normal(x.shape)
        layer.offset += 16  # changing the layer after the forward must not change its gradient
        layer.offset -= 16
        np.testing.assert_array_equal(layer.backward(dy), dy * grad_factor)
        offset = (offset + counters(x.size)) % 2**64
        assert layer.offset == offset
    layer.eval()
    assert layer(x) is x
    assert layer.backward(x) is x
    assert layer.offset == offset


def test_layer_errors():
    with pytest.raises(RuntimeError, match="before any forward"):
        pybn.nn.GaussianNoise(1.0, seed=1).backward(np.ones(3))
    layer = pybn.nn.AlphaDropout(0.5, seed=1)
    layer(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="^dy:"):
        layer.backward(np.ones((3, 2), np.float32))
    with pytest.raises(TypeError, match="^dy:"):
        layer.backward(np.ones((2, 3)))
    for make, exc, prefix in [(lambda: pybn.nn.AlphaDropout(1.5), ValueError, "p:"),
                              (lambda: pybn.nn.GaussianDropout(1.0), ValueError, "rate:"),
                              (lambda: pybn.nn.GaussianNoise(-1.0), ValueError, "stddev:"),
                              (lambda: pybn.nn.GaussianNoise(1.0, seed=-1), ValueError, "seed:"),
                              (lambda: pybn.nn.GaussianDropout(0.1, seed=1.0), TypeError, "seed:")]:
        with pytest.raises(exc) as info:
            make()
        assert str(info.value).startswith(prefix)


def test_mc_dropout_takes_the_noise_layers():
    layers = [pybn.nn.AlphaDropout(0.5, seed=1), pybn.nn.GaussianNoise(0.5, seed=2),
              pybn.nn.GaussianDropout(0.2, seed=3)]
    for layer in layers:
        layer.eval()
    x = np.ones((4, 8), np.float32)
    with pybn.nn.mc_dropout(layers, seed=99, sample=5):
        got = [layer(x) for layer in layers]
    for k, (layer, y) in enumerate(zip(layers, got)):
        assert not layer.training and layer.offset == 0 and layer.seed == k + 1  # restored
        offset = pybn.nn.mc_dropout_offset(k, 5)
        want = {0: pybn.alpha_dropout, 1: pybn.gaussian_noise, 2: pybn.gaussian_dropout}[k](
            x, [0.5, 0.5, 0.2][k], seed=99, offset=offset)
        np.testing.assert_array_equal(y, want)


# ------------------------------------------------------------------ PyTorch

def test_alpha_dropout_module_is_a_drop_in_for_torchs(rng):
    module = pnn.AlphaDropout(0.5, seed=12)
    assert isinstance(module, torch.nn.AlphaDropout)
    assert module.state_dict() == torch.nn.AlphaDropout(0.5).state_dict()
    x = torch.from_numpy(rng.standard_normal((8, 33)).astype(np.float32))
    y = module(x)
    torch.testing.assert_close(y, torch.from_numpy(pybn.alpha_dropout(x.numpy(), 0.5, seed=12)), rtol=0, atol=0)
    # torch's formula (ATen's alpha dropout) given pybn's mask, bit for bit
    noise = torch.from_numpy(keep_mask(tuple(x.shape), 0.5, 12, 0).astype(np.float32))
    a = 1.0 / math.sqrt((ALPHA * ALPHA * 0.5 + 1) * 0.5)
    b = noise.add(-1).mul_(ALPHA * a).add_(ALPHA * a * 0.5)
    torch.testing.assert_close(y, x * noise.mul_(a) + b, rtol=0, atol=0)
    assert module.offset == pybn.counters_used(x.numel())
    module.eval()
    assert module(x) is x
    swapped = pybn.torch.accelerate(torch.nn.Sequential(torch.nn.AlphaDropout(0.2)))
    assert type(swapped[0]) is pnn.AlphaDropout and swapped[0].p == 0.2
    # inplace=True: torch's module ignores it (its input is never written), so does pybn's
    for make in (torch.nn.AlphaDropout, pnn.AlphaDropout):
        base = x.clone()
        y = make(0.5, inplace=True)(base[:4])
        assert y.data_ptr() != base.data_ptr() and torch.equal(base, x) and base._version == 0


def test_torch_modules_and_functions_follow_the_numpy_functions(rng):
    x = torch.from_numpy(rng.standard_normal((4, 3, 5, 7)).astype(np.float32))
    for module, fn, value in [(pnn.GaussianDropout(0.25, seed=5), pybn.gaussian_dropout, 0.25),
                              (pnn.GaussianNoise(0.7, seed=5), pybn.gaussian_noise, 0.7)]:
        y0, y1 = module(x), module(x)
        torch.testing.assert_close(y0, torch.from_numpy(fn(x.numpy(), value, seed=5)), rtol=0, atol=0)
        torch.testing.assert_close(y1, torch.from_numpy(fn(x.numpy(), value, seed=5, offset=module.offset // 2)),
                                   rtol=0, atol=0)
        assert module.offset == 2 * pybn.normal_counters_used(x.numel())
        module.eval()
        assert module(x) is x
    # without a seed: drawn from torch's generator, so manual_seed reproduces the values
    torch.manual_seed(4)
    a = pnn.gaussian_noise(x, 1.0)
    torch.manual_seed(4)
    torch.testing.assert_close(pnn.gaussian_noise(x, 1.0), a, rtol=0, atol=0)


def test_channels_last_and_other_dtypes(rng):
    x = torch.from_numpy(rng.standard_normal((2, 3, 4, 5)).astype(np.float32))
    cl = x.contiguous(memory_format=torch.channels_last)
    philox = torch.tensor([3, 48])
    for op in (torch.ops.pybn.alpha_dropout, torch.ops.pybn.gaussian_dropout):
        y = op(cl, 0.3, philox)[0]
        assert y.is_contiguous(memory_format=torch.channels_last)
        # memory order: the NumPy function of x.movedim(1, -1)
        flat = {torch.ops.pybn.alpha_dropout: pybn.alpha_dropout,
                torch.ops.pybn.gaussian_dropout: pybn.gaussian_dropout}[op]
        want = flat(cl.movedim(1, -1).contiguous().numpy(), 0.3, seed=3, offset=48)
        torch.testing.assert_close(y.movedim(1, -1), torch.from_numpy(want), rtol=0, atol=0)
    # float16 runs on the kernels; an int tensor is refused naming x
    h = x.half()
    torch.testing.assert_close(torch.ops.pybn.gaussian_noise(h, 0.5, philox)[0],
                               torch.from_numpy(pybn.gaussian_noise(h.numpy(), 0.5, seed=3, offset=48)),
                               rtol=0, atol=0)
    with pytest.raises(TypeError, match="^x:"):
        torch.ops.pybn.gaussian_noise(torch.ones(3, dtype=torch.int32), 0.5, philox)


def test_gradients_are_the_regenerated_ones():
    x = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    philox = torch.tensor([77, 16])
    dy = torch.randn(5, 40, dtype=torch.float64)
    y = torch.ops.pybn.alpha_dropout(x, 0.4, philox)[0]
    (dx,) = torch.autograd.grad(y, x, dy)
    a = pybn.noise.alpha_dropout_coefficients(0.4)[0]
    keep = torch.from_numpy(keep_mask((5, 40), 0.4, 77, 16).copy())
    torch.testing.assert_close(dx, torch.where(keep, dy * a, torch.zeros(())), rtol=0, atol=0)
    y = torch.ops.pybn.gaussian_dropout(x, 0.4, philox)[0]
    (dx,) = torch.autograd.grad(y, x, dy)
    n = torch.from_numpy(pybn.gaussian_dropout(np.ones((5, 40)), 0.4, seed=77, offset=16))
    torch.testing.assert_close(dx, dy * n, rtol=0, atol=0)
    y = torch.ops.pybn.gaussian_noise(x, 0.4, philox)[0]
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx, dy, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["alpha_dropout", "gaussian_dropout", "gaussian_noise"])
def test_gradcheck_and_double_backward(name):
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    philox = torch.tensor([12345, 64])
    op = getattr(torch.ops.pybn, name)

    def f(x):
        return op(x, 0.3, philox)[0]
    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))


def _opcheck_cases():
    g = torch.Generator().manual_seed(3)
    philox = torch.tensor([7, 32])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn((4, 3, 5, 2), generator=g).to(dtype).requires_grad_()
        xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        for name in ("alpha_dropout", "gaussian_dropout", "gaussian_noise"):
            yield name, (x, 0.3, philox)
            yield name, (xcl, 0.3, philox)
        yield "alpha_dropout_backward", (x, 0.3, philox)


@pytest.mark.parametrize("case", list(range(len(list(_opcheck_cases())))))
def test_opcheck(case):
    name, args = list(_opcheck_cases())[case]
    torch.library.opcheck(getattr(torch.ops.pybn, name).default, args)


def test_compiled_module_gives_the_eager_values():
    x = torch.randn(8, 16)
    philox = torch.tensor([5, 0])

    def f(x):
        return (torch.ops.pybn.gaussian_dropout(x, 0.2, philox)[0] + torch.ops.pybn.alpha_dropout(x, 0.2, philox)[0])
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


def test_mc_dropout_finds_the_torch_noise_modules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), pnn.AlphaDropout(0.5, seed=1), pnn.GaussianNoise(0.3))
    model.eval()
    x = torch.ones(2, 4)
    with pybn.nn.mc_dropout(model, seed=7, sample=0):
        a = model(x)
    with pybn.nn.mc_dropout(model, seed=7, sample=0):
        b = model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, model(x))
    assert model[1].seed == 1 and model[2].seed is None and not model[1].training


def test_torch_argument_errors():
    x = torch.ones(3)
    for call, exc, prefix in [(lambda: pnn.alpha_dropout(x, 1.5, True), ValueError, "p:"),
                              (lambda: pnn.gaussian_dropout(x, 1.0), ValueError, "rate:"),
                              (lambda: pnn.gaussian_dropout(x, float("nan")), ValueError, "rate:"),
                              (lambda: pnn.gaussian_noise(x, -0.1), ValueError, "stddev:"),
                              (lambda: pnn.gaussian_noise(x, "1"), TypeError, "stddev:"),
                              (lambda: pnn.GaussianNoise(float("inf")), ValueError, "stddev:"),
                              (lambda: pnn.GaussianDropout(0.1, seed=-2), ValueError, "seed:"),
                              (lambda: pnn.AlphaDropout(0.1, seed=1.5), TypeError, "seed:")]:
        with pytest.raises(exc) as info:
            call()
        assert str(info.value).startswith(prefix), str(info.value)
