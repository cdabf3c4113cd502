"""pybn.nn.BatchNorm and pybn.nn.Dropout against torch.nn.BatchNorm1d/2d/3d and
nn.Dropout's semantics (outputs, autograd gradients, running statistics, state_dict),
Keras' BatchNormalization formulas written out in NumPy, and pybn.dropout's mask stream.

Contract: docs/layers.md.
"""
import math

import numpy as np
import pytest
import torch

import pybn
import pybn.nn as nn
import reference_dropout as rd
from error_checks import assert_raises_naming

DTYPES = [np.float32, np.float64]
DT_IDS = ["f32", "f64"]
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
# relative to max(1, max |expected|), as tests/test_batchnorm.py
FWD_TOL = {np.float32: 1e-5, np.float64: 1e-12}
BWD_TOL = {np.float32: 1e-4, np.float64: 1e-11}


def assert_close(got, want, tol, what):
    got = np.asarray(got)
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
    err = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def torch_bn(ndim, c, dtype, **kwargs):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[ndim]
    return cls(c, dtype=TORCH_DTYPE[dtype], **kwargs)


def randomize_affine(layer, module, rng):
    """The same random gamma and beta in both (not the trivial 1 and 0)."""
    c = layer.num_features
    layer.weight[:] = rng.uniform(0.5, 1.5, c)
    layer.bias[:] = rng.normal(size=c)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(layer.weight))
        module.bias.copy_(torch.from_numpy(layer.bias))


def torch_step(module, x, dy):
    """Forward and autograd backward through a torch module: (y, dx)."""
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    y = module(xt)
    y.backward(torch.from_numpy(dy))
    return y, xt.grad


SHAPES = [(16, 5), (8, 6, 7), (4, 3, 5, 6), (2, 4, 3, 3, 2)]


# --------------------------------------------------------------------------- BatchNorm

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_batchnorm_train_matches_torch(shape, dtype, rng):
    c = shape[1]
    layer = nn.BatchNorm(c, dtype=dtype)
    module = torch_bn(len(shape), c, dtype)
    randomize_affine(layer, module, rng)
    for step in range(4):  # several steps: the running statistics accumulate
        x = (rng.normal(size=shape) * 2 + 3).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        y = layer(x)
        dx = layer.backward(dy)
        module.zero_grad()
        y_t, dx_t = torch_step(module, x, dy)
        assert y.dtype == dtype and dx.dtype == dtype
        assert_close(y, y_t, FWD_TOL[dtype], f"step {step} y")
        assert_close(dx, dx_t, BWD_TOL[dtype], f"step {step} dx")
        assert_close(layer.grad_weight, module.weight.grad, BWD_TOL[dtype], "grad_weight")
        assert_close(layer.grad_bias, module.bias.grad, BWD_TOL[dtype], "grad_bias")
        assert_close(layer.running_mean, module.running_mean, FWD_TOL[dtype], "running_mean")
        assert_close(layer.running_var, module.running_var, FWD_TOL[dtype], "running_var")
        assert layer.num_batches_tracked == int(module.num_batches_tracked) == step + 1


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_batchnorm_eval_matches_torch(dtype, rng):
    shape = (6, 4, 5, 5)
    layer = nn.BatchNorm(4, dtype=dtype)
    module = torch_bn(4, 4, dtype)
    randomize_affine(layer, module, rng)
    state = {"running_mean": rng.normal(size=4), "running_var": rng.uniform(0.5, 2, 4),
             "num_batches_tracked": np.array(7)}
    layer.load_state_dict({**state, "weight": layer.weight, "bias": layer.bias})
    module.load_state_dict({**{k: torch.tensor(v) for k, v in state.items()},
                            "weight": module.weight, "bias": module.bias})
    assert layer.eval() is layer and not layer.training
    module.eval()
    rm_before = layer.running_mean.copy()
    x = rng.normal(size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    y = layer(x)
    dx = layer.backward(dy)
    y_t, dx_t = torch_step(module, x, dy)
    assert_close(y, y_t, FWD_TOL[dtype], "y")
    assert_close(dx, dx_t, BWD_TOL[dtype], "dx")
    assert_close(layer.grad_weight, module.weight.grad, BWD_TOL[dtype], "grad_weight")
    assert_close(layer.grad_bias, module.bias.grad, BWD_TOL[dtype], "grad_bias")
    np.testing.assert_array_equal(layer.running_mean, rm_before)  # eval does not update
    assert layer.num_batches_tracked == 7


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_batchnorm_momentum_none_is_cumulative_average(dtype, rng):
    layer = nn.BatchNorm(3, momentum=None, dtype=dtype)
    module = torch_bn(2, 3, dtype, momentum=None)
    batches = [(rng.normal(size=(10, 3)) * (i + 1) + i).astype(dtype) for i in range(5)]
    for i, x in enumerate(batches):
        layer(x)
        module(torch.from_numpy(x))
        assert_close(layer.running_mean, module.running_mean, FWD_TOL[dtype], f"running_mean {i}")
        assert_close(layer.running_var, module.running_var, FWD_TOL[dtype], f"running_var {i}")
    # and independently of torch: the plain average of the batch statistics
    xs = np.stack(batches).astype(np.float64)
    assert_close(layer.running_mean, xs.mean(axis=1).mean(axis=0), FWD_TOL[dtype], "average of means")
    assert_close(layer.running_var, xs.var(axis=1, ddof=1).mean(axis=0), FWD_TOL[dtype], "average of vars")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_without_running_stats(mode, dtype, rng):
    layer = nn.BatchNorm(5, track_running_stats=False, dtype=dtype).train(mode == "train")
    module = torch_bn(3, 5, dtype, track_running_stats=False).train(mode == "train")
    randomize_affine(layer, module, rng)
    assert layer.running_mean is None and layer.running_var is None and layer.num_batches_tracked is None
    x = rng.normal(size=(4, 5, 6)).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    y = layer(x)
    dx = layer.backward(dy)
    y_t, dx_t = torch_step(module, x, dy)
    assert_close(y, y_t, FWD_TOL[dtype], "y")  # batch statistics in eval mode too
    assert_close(dx, dx_t, BWD_TOL[dtype], "dx")
    assert_close(layer.grad_weight, module.weight.grad, BWD_TOL[dtype], "grad_weight")
    assert list(layer.state_dict()) == list(module.state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_without_affine(mode, dtype, rng):
    layer = nn.BatchNorm(4, affine=False, dtype=dtype)
    module = torch_bn(4, 4, dtype, affine=False)
    layer(rng.normal(size=(3, 4, 2, 2)).astype(dtype))  # some running statistics first
    module(torch.from_numpy(rng.normal(size=(3, 4, 2, 2)).astype(dtype)))
    module.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    layer.train(mode == "train")
    module.train(mode == "train")
    assert layer.weight is None and layer.bias is None
    x = rng.normal(size=(3, 4, 2, 2)).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    y = layer(x)
    dx = layer.backward(dy)
    y_t, dx_t = torch_step(module, x, dy)
    assert_close(y, y_t, FWD_TOL[dtype], "y")
    assert_close(dx, dx_t, BWD_TOL[dtype], "dx")
    assert layer.grad_weight is None and layer.grad_bias is None
    assert list(layer.state_dict()) == list(module.state_dict())


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(12, 5), (4, 7, 5), (3, 4, 4, 5)], ids=["2d", "NLC", "NHWC"])
def test_batchnorm_channels_last_matches_torch_on_transposed(shape, dtype, rng):
    """axis=-1 (Keras' layout) equals torch's channels-first BN on x moved to NC..."""
    c = shape[-1]
    layer = nn.BatchNorm(c, axis=-1, dtype=dtype)
    module = torch_bn(len(shape), c, dtype)
    randomize_affine(layer, module, rng)
    to_first = (0, len(shape) - 1, *range(1, len(shape) - 1))
    for mode in ["train", "train", "eval"]:
        layer.train(mode == "train")
        module.train(mode == "train")
        x = (rng.normal(size=shape) + 1).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        y = layer(x)
        dx = layer.backward(dy)
        module.zero_grad()
        y_t, dx_t = torch_step(module, np.ascontiguousarray(x.transpose(to_first)),
                               np.ascontiguousarray(dy.transpose(to_first)))
        assert_close(y.transpose(to_first), y_t, FWD_TOL[dtype], f"{mode} y")
        assert_close(dx.transpose(to_first), dx_t, BWD_TOL[dtype], f"{mode} dx")
        assert_close(layer.grad_weight, module.weight.grad, BWD_TOL[dtype], "grad_weight")
        assert_close(layer.running_var, module.running_var, FWD_TOL[dtype], "running_var")


def test_batchnorm_non_contiguous_input(rng):
    layer = nn.BatchNorm(3)
    module = torch_bn(4, 3, np.float32)
    x = rng.normal(size=(4, 3, 6, 8)).astype(np.float32)[..., ::2]
    dy = rng.normal(size=x.shape).astype(np.float32)
    y_t, dx_t = torch_step(module, np.ascontiguousarray(x), dy)
    assert_close(layer(x), y_t, 1e-5, "y")
    assert_close(layer.backward(dy), dx_t, 1e-4, "dx")


def test_batchnorm_backward_uses_the_mode_of_its_forward(rng):
    """A forward in training mode, then eval(), then backward: the training gradient."""
    layer = nn.BatchNorm(3, dtype=np.float64)
    module = torch_bn(2, 3, np.float64)
    x = rng.normal(size=(8, 3))
    dy = rng.normal(size=(8, 3))
    layer(x)
    layer.eval()
    _, dx_t = torch_step(module, x, dy)
    assert_close(layer.backward(dy), dx_t, 1e-11, "dx")
    assert_close(layer.backward(dy), dx_t, 1e-11, "dx again")  # repeatable


def test_batchnorm_train_eval_return_self():
    layer = nn.BatchNorm(2)
    assert layer.training
    assert layer.eval() is layer and layer.training is False
    assert layer.train() is layer and layer.training is True
    assert layer.train(False) is layer and layer.training is False


def test_batchnorm_initial_state_is_torchs():
    layer = nn.BatchNorm(6, dtype="float64")
    module = torch.nn.BatchNorm2d(6, dtype=torch.float64)
    state = layer.state_dict()
    want = {k: v.numpy() for k, v in module.state_dict().items()}
    assert list(state) == list(want)
    for k in want:
        assert state[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(state[k], want[k])


# ---- state_dict

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_state_dict_round_trip_with_torch(dtype, rng):
    module = torch_bn(4, 5, dtype, momentum=0.3)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
    for _ in range(3):
        module(torch.from_numpy(rng.normal(size=(4, 5, 3, 3)).astype(dtype)) * 3 + 1)
    layer = nn.BatchNorm(5, momentum=0.3, dtype=dtype)
    arrays = {k: getattr(layer, k) for k in ["weight", "bias", "running_mean", "running_var"]}
    torch_state = {k: v.numpy() for k, v in module.state_dict().items()}
    layer.load_state_dict(torch_state)
    for k, arr in arrays.items():  # copied into the existing arrays, not aliased
        assert getattr(layer, k) is arr, k
        assert not np.shares_memory(arr, torch_state[k]), k
        np.testing.assert_array_equal(arr, torch_state[k])
    assert layer.num_batches_tracked == 3

    # continue training both: still equal
    x = rng.normal(size=(4, 5, 3, 3)).astype(dtype)
    assert_close(layer(x), module(torch.from_numpy(x)), FWD_TOL[dtype], "y")
    assert_close(layer.running_mean, module.running_mean, FWD_TOL[dtype], "running_mean")

    # and back: torch accepts ours
    fresh = torch_bn(4, 5, dtype)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), layer.state_dict()[k])


def test_state_dict_is_a_copy(rng):
    layer = nn.BatchNorm(3)
    state = layer.state_dict()
    layer(rng.normal(size=(5, 3)).astype(np.float32))
    np.testing.assert_array_equal(state["running_mean"], np.zeros(3))
    assert int(state["num_batches_tracked"]) == 0
    state["running_var"][:] = 7  # and editing it leaves the layer alone
    assert not np.any(layer.running_var == 7)


def test_load_state_dict_accepts_torch_tensors_and_casts():
    module = torch.nn.BatchNorm1d(3)  # float32
    with torch.no_grad():
        module.running_mean.fill_(0.25)
    layer = nn.BatchNorm(3, dtype="float64")
    layer.load_state_dict(module.state_dict())
    assert layer.running_mean.dtype == np.float64
    np.testing.assert_array_equal(layer.running_mean, 0.25)


# ---- from_torch

@pytest.mark.parametrize("cls,shape", [(torch.nn.BatchNorm1d, (6, 4)), (torch.nn.BatchNorm1d, (6, 4, 5)),
                                       (torch.nn.BatchNorm2d, (3, 4, 5, 5)),
                                       (torch.nn.BatchNorm3d, (2, 4, 3, 3, 3))],
                         ids=["1d", "1d-3", "2d", "3d"])
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None, "eps": 1e-3}, {"affine": False},
                                    {"track_running_stats": False}], ids=["default", "cma", "noaffine", "nostats"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_from_torch(cls, shape, kwargs, dtype, rng):
    module = cls(4, dtype=TORCH_DTYPE[dtype], **kwargs)
    if module.affine:
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_()
    for _ in range(2):
        module(torch.from_numpy(rng.normal(size=shape).astype(dtype)) + 2)
    module.eval()
    layer = nn.BatchNorm.from_torch(module)
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats, layer.axis) == \
        (module.eps, module.momentum, module.affine, module.track_running_stats, 1)
    assert layer.dtype == dtype and layer.training is False
    if module.affine:
        assert not np.shares_memory(layer.weight, module.weight.detach().numpy())
    for mode in ["eval", "train", "train"]:
        layer.train(mode == "train")
        module.train(mode == "train")
        x = rng.normal(size=shape).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        y_t, dx_t = torch_step(module, x, dy)
        assert_close(layer(x), y_t, FWD_TOL[dtype], f"{mode} y")
        assert_close(layer.backward(dy), dx_t, BWD_TOL[dtype], f"{mode} dx")
        if module.track_running_stats:
            assert_close(layer.running_var, module.running_var, FWD_TOL[dtype], "running_var")
            assert layer.num_batches_tracked == int(module.num_batches_tracked)


def test_from_torch_keeps_training_mode():
    assert nn.BatchNorm.from_torch(torch.nn.BatchNorm2d(3)).training is True


def test_from_torch_rejects_other_modules():
    assert_raises_naming(TypeError, "module", nn.BatchNorm.from_torch, torch.nn.Linear(2, 2))
    assert_raises_naming(TypeError, "module", nn.BatchNorm.from_torch,
                         torch.nn.BatchNorm1d(2, dtype=torch.complex64))
    assert_raises_naming(TypeError, "dtype", nn.BatchNorm.from_torch, torch.nn.BatchNorm1d(2), dtype="int8")


HALF_TORCH = {"f16": torch.float16, "bf16": torch.bfloat16}


def numpy_16bit(tdt):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(np.float16) if tdt == torch.float16 else np.dtype(ml_dtypes.bfloat16)


def to_numpy_16bit(t):
    """A 16-bit tensor as a NumPy array of the same dtype (bfloat16: ml_dtypes')."""
    return t.detach().contiguous().view(torch.int16).numpy().view(numpy_16bit(t.dtype))


def assert_16bit_close(got, want_t, what):
    """pybn's and torch's 16-bit outputs, both computed in float32 and rounded once: within
    2 roundings of the 16-bit type (unit roundoff u) of the output's scale."""
    u = 2.0**-11 if want_t.dtype == torch.float16 else 2.0**-8
    assert got.dtype == numpy_16bit(want_t.dtype)
    assert_close(got.astype(np.float64), want_t.detach().double(), 2 * u, what)


@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}], ids=["default", "cma"])
@pytest.mark.parametrize("tdt", list(HALF_TORCH.values()), ids=list(HALF_TORCH))
def test_from_torch_16bit_module(tdt, kwargs, rng):
    """module.half() / module.to(torch.bfloat16): a 16-bit layer whose parameters and statistics
    are float32 (the module's values widened exactly), computing what torch's mixed mode (a
    float32 module holding the same values, on the same 16-bit input) computes."""
    module = torch.nn.BatchNorm2d(4, **kwargs)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2)
        module.num_batches_tracked.fill_(3)
    module = module.to(tdt).eval()
    layer = nn.BatchNorm.from_torch(module)
    assert layer.dtype == numpy_16bit(tdt) and layer.param_dtype == np.float32 and layer.training is False
    for key, value in module.state_dict().items():
        if key == "num_batches_tracked":
            assert layer.num_batches_tracked == 3
            continue
        ours = getattr(layer, key)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, value.float().numpy())
        assert not np.shares_memory(ours, value.numpy() if tdt == torch.float16 else to_numpy_16bit(value))
    mixed = torch.nn.BatchNorm2d(4, **kwargs)
    mixed.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in module.state_dict().items()})
    for mode in ["eval", "train", "train"]:
        layer.train(mode == "train")
        mixed.train(mode == "train")
        x = (torch.randn(6, 4, 5, 3) * 2 + 1).to(tdt)
        with torch.no_grad():
            y_t = mixed(x)
        assert_16bit_close(layer(to_numpy_16bit(x)), y_t, f"{mode} y")
        assert_close(layer.running_var, mixed.running_var, FWD_TOL[np.float32], f"{mode} running_var")
        assert_close(layer.running_mean, mixed.running_mean, FWD_TOL[np.float32], f"{mode} running_mean")
        assert layer.num_batches_tracked == int(mixed.num_batches_tracked)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_from_torch_float32_module_for_16bit_inputs(dtype, rng):
    """PyTorch's mixed precision keeps a batch norm module in float32 beside 16-bit activations:
    from_torch(module, dtype=...) makes a 16-bit layer keeping the module's float32 values."""
    tdt = HALF_TORCH["f16" if dtype == "float16" else "bf16"]
    module = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.1, 0.2, 0.3]))  # not 16-bit values
        module.running_var.copy_(torch.tensor([1.1, 1.2, 1.3]))
    layer = nn.BatchNorm.from_torch(module.eval(), dtype=dtype)
    assert layer.dtype == numpy_16bit(tdt) and layer.param_dtype == np.float32
    np.testing.assert_array_equal(layer.weight, module.weight.detach().numpy())
    np.testing.assert_array_equal(layer.running_var, module.running_var.numpy())
    x = torch.randn(7, 3).to(tdt)
    with torch.no_grad():
        y_t = module(x)
    assert_16bit_close(layer(to_numpy_16bit(x)), y_t, "y")


def test_load_state_dict_takes_bfloat16_tensors():
    """A bfloat16 torch state (which NumPy cannot read directly) loads, widened exactly."""
    module = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        module.running_mean.copy_(torch.tensor([0.1, -2.5, 3.0]))
    module = module.to(torch.bfloat16)
    layer = nn.BatchNorm(3, dtype=numpy_16bit(torch.bfloat16))
    layer.load_state_dict(module.state_dict())
    np.testing.assert_array_equal(layer.running_mean, module.running_mean.float().numpy())
    assert layer.running_mean[0] != np.float32(0.1)  # the bfloat16 value, not the float32 one


# ---- from_keras (no Keras here: its formulas, written out in NumPy)

def keras_train_reference(x, gamma, beta, mm, mv, momentum, epsilon):
    """Keras BatchNormalization(axis=-1) in training, float64:
    y = (x - mean) / sqrt(var + epsilon) * gamma + beta with the biased batch variance,
    moving = moving * momentum + batch * (1 - momentum)."""
    x = x.astype(np.float64).reshape(-1, x.shape[-1])
    mean, var = x.mean(axis=0), x.var(axis=0)
    y = (x - mean) / np.sqrt(var + epsilon) * gamma + beta
    new_mm = mm * momentum + mean * (1 - momentum)
    # Keras puts the biased variance into moving_variance; pybn, as PyTorch, the unbiased
    # one (documented in from_keras). Same formula otherwise.
    n = x.shape[0]
    new_mv = mv * momentum + var * n / (n - 1) * (1 - momentum)
    return y, new_mm, new_mv


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_from_keras(dtype, rng):
    c = 6
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    mm, mv = rng.normal(size=c), rng.uniform(0.5, 2, c)
    layer = nn.BatchNorm.from_keras(gamma.astype(dtype), beta.astype(dtype), mm.astype(dtype), mv.astype(dtype))
    assert layer.dtype == dtype and layer.axis == -1 and layer.eps == 1e-3
    assert layer.momentum == pytest.approx(0.01)  # Keras' 0.99 is PyTorch's 0.01
    assert layer.num_batches_tracked == 0 and layer.training
    tol = FWD_TOL[dtype]

    # inference: y = (x - moving_mean) / sqrt(moving_variance + epsilon) * gamma + beta
    x = (rng.normal(size=(3, 4, 4, c)) * 2 + 1).astype(dtype)
    want = (x.astype(np.float64) - mm) / np.sqrt(mv + 1e-3) * gamma + beta
    assert_close(layer.eval()(x), want, tol, "eval y")

    # training: two steps of Keras' update
    layer.train()
    for step in range(2):
        x = (rng.normal(size=(3, 4, 4, c)) * 2 + 1).astype(dtype)
        y_want, mm, mv = keras_train_reference(x, gamma, beta, mm, mv, 0.99, 1e-3)
        assert_close(layer(x).reshape(-1, c), y_want, tol, f"step {step} y")
        assert_close(layer.running_mean, mm, tol, f"step {step} moving_mean")
        assert_close(layer.running_var, mv, tol, f"step {step} moving_variance")


def test_from_keras_other_momentum_and_epsilon(rng):
    mm, mv = np.zeros(3), np.ones(3)
    layer = nn.BatchNorm.from_keras(None, None, mm, mv, momentum=0.9, epsilon=1e-5, axis=1)
    assert layer.dtype == np.float64 and not layer.affine and layer.axis == 1
    x = rng.normal(size=(8, 3, 2))
    layer(x)
    batch_mean = x.mean(axis=(0, 2))
    assert_close(layer.running_mean, mm * 0.9 + batch_mean * 0.1, 1e-12, "moving_mean")
    assert not np.shares_memory(layer.running_mean, mm)


@pytest.mark.parametrize("absent", ["gamma", "beta"])
def test_from_keras_without_scale_or_center(absent, rng):
    c = 4
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    mm, mv = rng.normal(size=c), rng.uniform(0.5, 2, c)
    if absent == "gamma":
        gamma_arg, beta_arg, gamma = None, beta, np.ones(c)
    else:
        gamma_arg, beta_arg, beta = gamma, None, np.zeros(c)
    layer = nn.BatchNorm.from_keras(gamma_arg, beta_arg, mm, mv).eval()
    x = rng.normal(size=(5, c))
    assert_close(layer(x), (x - mm) / np.sqrt(mv + 1e-3) * gamma + beta, 1e-12, "y")


def test_from_keras_errors():
    ones = np.ones(3)
    assert_raises_naming(ValueError, "gamma", nn.BatchNorm.from_keras, np.ones(4), None, ones, ones)
    assert_raises_naming(ValueError, "beta", nn.BatchNorm.from_keras, None, np.ones(2), ones, ones)
    assert_raises_naming(ValueError, "moving_variance", nn.BatchNorm.from_keras, None, None, ones, ones[:2])
    assert_raises_naming(ValueError, "moving_mean", nn.BatchNorm.from_keras, None, None, np.ones((3, 1)), ones)
    assert_raises_naming(ValueError, "momentum", nn.BatchNorm.from_keras, None, None, ones, ones, momentum=1.5)
    assert_raises_naming(TypeError, "moving_mean", nn.BatchNorm.from_keras, None, None, np.ones(3, int), ones)


# ---- BatchNorm errors

def test_batchnorm_backward_before_forward():
    with pytest.raises(RuntimeError, match="before any forward"):
        nn.BatchNorm(3).backward(np.ones((2, 3), np.float32))


def test_batchnorm_dy_must_match_forward(rng):
    layer = nn.BatchNorm(3)
    layer(rng.normal(size=(4, 3)).astype(np.float32))
    assert_raises_naming(ValueError, "dy", layer.backward, np.ones((4, 4), np.float32))
    assert_raises_naming(ValueError, "dy", layer.backward, np.ones((3, 4), np.float32))
    assert_raises_naming(TypeError, "dy", layer.backward, np.ones((4, 3), np.float64))
    assert_raises_naming(TypeError, "dy", layer.backward, np.ones((4, 3), np.int32))


def test_batchnorm_input_errors(rng):
    layer = nn.BatchNorm(3)
    msg = assert_raises_naming(ValueError, "x", layer, np.ones((4, 5), np.float32))
    assert "num_features" in msg
    assert_raises_naming(ValueError, "x", nn.BatchNorm(3, axis=-1), np.ones((4, 3, 5), np.float32))
    assert_raises_naming(TypeError, "x", layer, np.ones((4, 3), np.float64))
    assert_raises_naming(TypeError, "x", layer, np.ones((4, 3), np.int64))
    assert_raises_naming(ValueError, "x", layer, np.ones(3, np.float32))
    assert_raises_naming(ValueError, "x", layer, np.ones((1, 3), np.float32))  # one value per channel
    assert layer.num_batches_tracked == 0  # failed calls count nothing
    np.testing.assert_array_equal(layer.running_mean, 0)
    assert_raises_naming(ValueError, "axis", nn.BatchNorm(3, axis=2), np.ones((4, 3), np.float32))


def test_batchnorm_constructor_errors():
    assert_raises_naming(ValueError, "num_features", nn.BatchNorm, 0)
    assert_raises_naming(TypeError, "num_features", nn.BatchNorm, 3.0)
    assert_raises_naming(TypeError, "dtype", nn.BatchNorm, 3, dtype="int8")
    assert_raises_naming(TypeError, "dtype", nn.BatchNorm, 3, dtype="no-such-dtype")
    assert_raises_naming(ValueError, "eps", nn.BatchNorm, 3, eps=-1.0)
    assert_raises_naming(TypeError, "momentum", nn.BatchNorm, 3, momentum="0.1")
    assert_raises_naming(TypeError, "axis", nn.BatchNorm, 3, axis=1.0)


def test_load_state_dict_errors():
    layer = nn.BatchNorm(3)
    good = nn.BatchNorm(3).state_dict()
    before = layer.state_dict()
    for key in good:
        bad = {k: v for k, v in good.items() if k != key}
        assert_raises_naming(KeyError, key, layer.load_state_dict, bad)
    assert_raises_naming(KeyError, "extra", layer.load_state_dict, {**good, "extra": np.ones(3)})
    for key in ["weight", "bias", "running_mean", "running_var"]:
        assert_raises_naming(ValueError, key, layer.load_state_dict, {**good, key: np.ones(4)})
        assert_raises_naming(ValueError, key, layer.load_state_dict, {**good, key: np.ones((3, 1))})
    assert_raises_naming(ValueError, "num_batches_tracked", layer.load_state_dict,
                         {**good, "num_batches_tracked": np.ones(3, np.int64)})
    assert_raises_naming(TypeError, "running_var", layer.load_state_dict,
                         {**good, "running_var": np.array(["a", "b", "c"])})
    # a bad state changes nothing, even when the bad key comes last
    with pytest.raises(ValueError):
        layer.load_state_dict({**good, "running_mean": np.full(3, 5.0), "running_var": np.ones(2)})
    for k, v in before.items():
        np.testing.assert_array_equal(layer.state_dict()[k], v)
    # the keys depend on affine / track_running_stats, as torch's
    assert_raises_naming(KeyError, "weight", nn.BatchNorm(3, affine=False).load_state_dict, good)
    assert_raises_naming(KeyError, "running_mean", nn.BatchNorm(3, track_running_stats=False).load_state_dict,
                         good)


def test_a_rejected_num_batches_tracked_changes_nothing():
    """num_batches_tracked=-1 was taken, and with momentum=None the next forward divided by
    zero (1 / (num_batches_tracked + 1)); 2**64-1 was taken and state_dict() then failed."""
    layer = nn.BatchNorm(3, momentum=None)
    layer(np.arange(12, dtype=np.float32).reshape(4, 3))
    state = layer.state_dict()
    for bad in (-1, np.int64(-5), np.uint64(2**64 - 1), 2**63, 2**70):
        with pytest.raises(ValueError, match=r"^num_batches_tracked: must be in \[0, 2\*\*63\)"):
            layer.load_state_dict({**state, "num_batches_tracked": bad})
        assert layer.num_batches_tracked == 1
    layer.load_state_dict({**state, "num_batches_tracked": 2**63 - 1})
    assert layer.state_dict()["num_batches_tracked"] == 2**63 - 1
    # set directly: the forward says what is wrong instead of ZeroDivisionError
    layer.num_batches_tracked = -1
    assert_raises_naming(ValueError, "num_batches_tracked", layer, np.ones((4, 3), np.float32))


def test_load_state_dict_reads_every_value_before_writing_any():
    """A value that views another of the layer's arrays is read before that array is
    overwritten: loading {running_mean: layer.weight, weight: new} gives the old weight as
    running_mean (it gave the new one)."""
    layer = nn.BatchNorm(3)
    layer.weight[:] = [1.0, 2.0, 3.0]
    old_weight = layer.weight.copy()
    state = {**layer.state_dict(), "weight": np.array([7.0, 8.0, 9.0]), "running_mean": layer.weight,
             "bias": layer.running_var[::-1]}
    layer.load_state_dict(state)
    np.testing.assert_array_equal(layer.weight, [7.0, 8.0, 9.0])
    np.testing.assert_array_equal(layer.running_mean, old_weight)
    np.testing.assert_array_equal(layer.bias, [1.0, 1.0, 1.0])


def test_load_state_dict_into_a_rebound_read_only_array_changes_nothing(tmp_path):
    """A layer array rebound to a read-only one (a memory-mapped checkpoint, as layers.md
    allows rebinding): load_state_dict refuses naming the key before writing anything. It
    raised NumPy's bare "assignment destination is read-only" after num_batches_tracked,
    weight, bias and running_mean were overwritten."""
    layer = nn.BatchNorm(3)
    np.save(tmp_path / "var.npy", np.full(3, 0.5, np.float32))
    layer.running_var = np.load(tmp_path / "var.npy", mmap_mode="r")
    before = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
    state = {"weight": np.full(3, 2.0), "bias": np.full(3, 3.0), "running_mean": np.full(3, 4.0),
             "running_var": np.full(3, 5.0), "num_batches_tracked": 7}
    with pytest.raises(ValueError, match=r"^running_var: the layer's running_var is read-only"):
        layer.load_state_dict(state)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    layer.running_var = [1.0, 1.0, 1.0]
    with pytest.raises(TypeError, match=r"^running_var: the layer's running_var is a list"):
        layer.load_state_dict(state)
    assert layer.num_batches_tracked == 0


@pytest.mark.parametrize("value", [[1.0, 1.0, 1.0], torch.ones(3)], ids=["list", "tensor"])
def test_running_statistics_rebound_to_non_arrays_are_named_in_eval_mode(value):
    """Evaluation mode refuses them as training does (it raised AttributeError 'astype' after
    the kernel had run)."""
    layer = nn.BatchNorm(3).eval()
    layer.running_var = value
    assert_raises_naming(TypeError, "running_var", layer, np.ones((4, 3), np.float32))


def test_state_values_must_be_representable_and_a_variance_nonnegative():
    """float64 1e300 into a float32 layer became inf with a warning; a negative running
    variance was taken and gave NaN in evaluation mode (PyTorch takes both)."""
    layer = nn.BatchNorm(3)
    good = layer.state_dict()
    assert_raises_naming(ValueError, "weight", layer.load_state_dict, {**good, "weight": np.array([1.0, 1e300, 1.0])})
    assert_raises_naming(ValueError, "running_var", layer.load_state_dict,
                         {**good, "running_var": np.array([1.0, -0.5, 1.0])})
    np.testing.assert_array_equal(layer.weight, 1.0)
    # non-finite values are what they are (a diverged run's state loads as saved)
    layer.load_state_dict({**good, "running_mean": np.array([np.nan, np.inf, 1.0])})
    np.testing.assert_array_equal(layer.running_mean, [np.nan, np.inf, 1.0])
    assert_raises_naming(TypeError, "state_dict", layer.load_state_dict, [("weight", np.ones(3))])
    assert_raises_naming(TypeError, "weight", layer.load_state_dict,
                         {**good, "weight": torch.ones(3, requires_grad=True)})


def test_from_torch_on_another_device_names_the_module():
    """A module on the meta device raised torch's NotImplementedError."""
    assert_raises_naming(TypeError, "module", nn.BatchNorm.from_torch, torch.nn.BatchNorm2d(3, device="meta"))


def test_running_statistics_rebound_to_a_parameter_are_refused(rng):
    """bn.running_mean = bn.weight: batch_norm_train updated the statistic, then normalized
    with it as gamma (y wrong, no error)."""
    layer = nn.BatchNorm(3)
    layer.running_mean = layer.weight
    x = rng.normal(size=(4, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="^running_mean: shares memory with weight"):
        layer(x)
    np.testing.assert_array_equal(layer.weight, 1.0)


@pytest.mark.parametrize("make", [lambda: nn.BatchNorm(3, momentum=None), lambda: nn.Dropout(0.3, seed=7)],
                         ids=["BatchNorm", "Dropout"])
def test_pickled_layers_continue_where_they_were(make, rng):
    import pickle

    layer = make()
    x = rng.normal(size=(4, 3)).astype(np.float32)
    layer(x)
    copy = pickle.loads(pickle.dumps(layer))
    np.testing.assert_array_equal(copy(x), layer(x))
    dy = rng.normal(size=x.shape).astype(np.float32)
    np.testing.assert_array_equal(copy.backward(dy), layer.backward(dy))
    if isinstance(layer, nn.BatchNorm):
        for key, value in layer.state_dict().items():
            np.testing.assert_array_equal(copy.state_dict()[key], value)
    else:
        assert (copy.seed, copy.offset) == (layer.seed, layer.offset)


MASK_LAYERS = {
    "Dropout": lambda seed: nn.Dropout(0.3, seed=seed),
    "DropPath": lambda seed: nn.DropPath(0.3, seed=seed),
    "DropBlock2d": lambda seed: nn.DropBlock2d(0.2, 2, seed=seed),
    "AlphaDropout": lambda seed: nn.AlphaDropout(0.3, seed=seed),
    "GaussianDropout": lambda seed: nn.GaussianDropout(0.3, seed=seed),
    "GaussianNoise": lambda seed: nn.GaussianNoise(0.3, seed=seed),
}


@pytest.mark.parametrize("make", MASK_LAYERS.values(), ids=MASK_LAYERS.keys())
def test_mask_layers_state_dict_resumes_the_masks(make, rng):
    """A checkpoint's state_dict holds the mask stream's position: a fresh layer loaded from
    it draws the masks the saved one draws next."""
    x = rng.normal(size=(4, 3, 4, 4)).astype(np.float32)
    layer = make(11)
    layer(x)
    state = layer.state_dict()
    assert set(state) == {"seed", "offset"} and state["offset"].dtype == np.uint64
    assert (int(state["seed"]), int(state["offset"])) == (11, layer.offset) and layer.offset > 0
    resumed = make(5)
    resumed.load_state_dict(state)
    assert type(resumed.offset) is int
    np.testing.assert_array_equal(resumed(x), layer(x))
    np.testing.assert_array_equal(resumed(x), layer(x))


def test_mask_layer_load_state_dict_checks_before_setting():
    layer = nn.Dropout(0.3, seed=11)
    for bad, exc, name in [({"seed": 1}, KeyError, "offset"), ({"seed": 1, "offset": 0, "p": 0.5}, KeyError, "p"),
                           ({"seed": 1, "offset": -1}, ValueError, "offset"),
                           ({"seed": 2**64, "offset": 0}, ValueError, "seed"),
                           ({"seed": np.array(1.5), "offset": 0}, TypeError, "seed"),
                           ({"seed": "1", "offset": 0}, TypeError, "seed")]:
        with pytest.raises(exc, match=f"^'?{name}: "):
            layer.load_state_dict(bad)
        assert (layer.seed, layer.offset) == (11, 0)  # (nothing set)
    assert_raises_naming(TypeError, "state_dict", layer.load_state_dict, [("seed", 1)])
    layer.load_state_dict({"seed": np.uint64(2**64 - 1), "offset": torch.tensor(3)})
    assert (layer.seed, layer.offset) == (2**64 - 1, 3)


# --------------------------------------------------------------------------- Dropout

def keep_mask(shape, p, seed, offset):
    n = math.prod(shape)
    bits = np.unpackbits(pybn.dropout_mask(shape, p, seed=seed, offset=offset), count=n, bitorder="little")
    return bits.reshape(shape).astype(bool)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_dropout_offsets_advance(dtype, rng):
    shape = (5, 7, 11)  # 385 elements: 4 groups of 128, 64 counters per call
    n = math.prod(shape)
    layer = nn.Dropout(0.3, seed=1234)
    assert layer.offset == 0 and layer.seed == 1234 and layer.training
    offsets, masks = [], []
    for i in range(4):
        x = rng.normal(size=shape).astype(dtype)
        offsets.append(layer.offset)
        y = layer(x)
        np.testing.assert_array_equal(y, pybn.dropout(x, 0.3, seed=1234, offset=offsets[-1]))
        assert layer.offset == offsets[-1] + pybn.counters_used(n) == (i + 1) * 64
        dy = rng.normal(size=shape).astype(dtype)
        np.testing.assert_array_equal(layer.backward(dy), pybn.dropout(dy, 0.3, seed=1234, offset=offsets[-1]))
        masks.append(keep_mask(shape, 0.3, 1234, offsets[-1]))
    for i in range(len(masks)):
        for j in range(i):
            assert not np.array_equal(masks[i], masks[j]), (i, j)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_dropout_matches_torch_semantics(p, dtype, rng):
    """y = x * keep / P(keep) with P(drop) = p (1 - p rounded down to a multiple of 2**-16),
    and the gradient torch's autograd gives for that function (nn.Dropout's mask cannot
    be shared; the mask is pybn's)."""
    shape = (64, 256)
    layer = nn.Dropout(p, seed=99)
    x = (rng.normal(size=shape) + 3).astype(dtype)  # nonzero, so a zero output is a drop
    y = layer(x)
    keep = keep_mask(shape, p, 99, 0) if p < 1 else np.zeros(shape, bool)
    scale = torch.tensor(rd.scale64(p) if p < 1 else 0.0, dtype=TORCH_DTYPE[dtype])
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = xt * (torch.from_numpy(keep).to(xt.dtype) * scale)
    np.testing.assert_array_equal(y, yt.detach().numpy())
    dy = rng.normal(size=shape).astype(dtype)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_array_equal(layer.backward(dy), xt.grad.numpy())
    dropped = float(np.mean(y == 0))
    assert abs(dropped - p) < 0.02, dropped  # 16384 elements: sigma <= 0.004


def test_dropout_eval_is_identity_like_torch(rng):
    x = rng.normal(size=(4, 5)).astype(np.float32)
    layer = nn.Dropout(0.5, seed=3)
    assert layer.eval() is layer and not layer.training
    module = torch.nn.Dropout(0.5).eval()
    y = layer(x)
    assert y is x  # as torch, the input itself
    np.testing.assert_array_equal(y, module(torch.from_numpy(x)).numpy())
    assert layer.offset == 0  # no counters used
    dy = rng.normal(size=x.shape).astype(np.float32)
    np.testing.assert_array_equal(layer.backward(dy), dy)
    assert layer.train() is layer and layer.training
    layer(x)
    assert layer.offset == 16


def test_dropout_backward_uses_its_forward(rng):
    """Changing p, seed, offset or the mode after a forward does not change its gradient."""
    x = rng.normal(size=(10, 20))
    dy = rng.normal(size=x.shape)
    layer = nn.Dropout(0.4, seed=5)
    layer(x)
    want = pybn.dropout(dy, 0.4, seed=5, offset=0)
    layer.p, layer.seed, layer.offset = 0.9, 6, 1000
    layer.eval()
    np.testing.assert_array_equal(layer.backward(dy), want)
    np.testing.assert_array_equal(layer.backward(dy), want)


def test_dropout_seed_none():
    a, b = nn.Dropout(), nn.Dropout()
    for layer in (a, b):
        assert type(layer.seed) is int and 0 <= layer.seed < 2**64
    assert a.seed != b.seed
    x = np.ones((8, 128), np.float32)
    assert not np.array_equal(a(x), b(x))
    c = nn.Dropout(seed=a.seed)  # a logged seed reproduces the stream
    np.testing.assert_array_equal(c(x), pybn.dropout(x, 0.5, seed=a.seed, offset=0))


def test_dropout_offset_wraps_at_2_64():
    layer = nn.Dropout(0.5, seed=1)
    layer.offset = 2**64 - 16
    x = np.ones((4, 100), np.float32)  # 400 elements: 64 counters
    y = layer(x)
    np.testing.assert_array_equal(y, pybn.dropout(x, 0.5, seed=1, offset=2**64 - 16))
    assert layer.offset == 48


@pytest.mark.parametrize("noise_shape,mask_shape", [((6, 4, 1, 1), (6, 4, 1, 1)),
                                                    ((None, 4, 1, 1), (6, 4, 1, 1)),
                                                    ([1, None, 1, 5], (1, 4, 1, 5)),
                                                    ((None, None, None, None), (6, 4, 3, 5))])
def test_dropout_noise_shape(noise_shape, mask_shape, rng):
    shape = (6, 4, 3, 5)
    layer = nn.Dropout(0.5, seed=11, noise_shape=noise_shape)
    for _call in range(2):
        offset = layer.offset
        x = (rng.normal(size=shape) + 4).astype(np.float32)
        y = layer(x)
        # independent of pybn.dropout's broadcasting: the mask over mask_shape, broadcast
        keep = np.broadcast_to(keep_mask(mask_shape, 0.5, 11, offset), shape)
        np.testing.assert_array_equal(y, np.where(keep, x * np.float32(2.0), np.float32(0)))
        assert layer.offset == offset + pybn.counters_used(math.prod(mask_shape))
        dy = rng.normal(size=shape).astype(np.float32)
        np.testing.assert_array_equal(layer.backward(dy), np.where(keep, dy * np.float32(2.0), np.float32(0)))


def test_dropout2d_like_torch_statistics(rng):
    """noise_shape (N, C, 1, 1) drops whole channels, as torch.nn.Dropout2d."""
    layer = nn.Dropout(0.5, seed=8, noise_shape=(None, None, 1, 1))
    y = layer(np.ones((16, 32, 3, 3), np.float32))
    per_channel = y.reshape(16, 32, 9)
    assert np.all(per_channel.min(axis=2) == per_channel.max(axis=2))  # all or nothing
    assert set(np.unique(y)) == {0.0, 2.0}


def test_dropout_errors(rng):
    for p in [-0.1, 1.5, float("nan")]:
        assert_raises_naming(ValueError, "p", nn.Dropout, p)
    layer = nn.Dropout(0.5, seed=1)
    with pytest.raises(ValueError, match="p"):
        layer.p = 2.0
    assert layer.p == 0.5
    assert_raises_naming(TypeError, "p", nn.Dropout, "0.5")
    assert_raises_naming(ValueError, "seed", nn.Dropout, seed=-1)
    assert_raises_naming(ValueError, "seed", nn.Dropout, seed=2**64)
    assert_raises_naming(TypeError, "seed", nn.Dropout, seed=1.5)
    assert_raises_naming(TypeError, "noise_shape", nn.Dropout, noise_shape=3)
    assert_raises_naming(TypeError, "noise_shape", nn.Dropout, noise_shape=(1, 2.0))
    with pytest.raises(RuntimeError, match="before any forward"):
        layer.backward(np.ones(3, np.float32))
    layer(np.ones((2, 3), np.float32))
    assert_raises_naming(ValueError, "dy", layer.backward, np.ones((3, 2), np.float32))
    assert_raises_naming(TypeError, "dy", layer.backward, np.ones((2, 3), np.float64))
    assert_raises_naming(TypeError, "x", layer, np.ones((2, 3), np.int32))
    assert_raises_naming(ValueError, "noise_shape", nn.Dropout(noise_shape=(2, 1)), np.ones((2, 3, 4), np.float32))
    assert_raises_naming(ValueError, "noise_shape", nn.Dropout(noise_shape=(2, 2)), np.ones((2, 3), np.float32))
    layer.eval()
    layer(np.ones((2, 3), np.float32))
    assert_raises_naming(ValueError, "dy", layer.backward, np.ones((2, 4), np.float32))


def test_docstrings():
    for obj in [nn.BatchNorm, nn.Dropout]:
        assert obj.__doc__ and "Parameters" in obj.__doc__, obj
        for name in ["__init__", "forward", "backward", "train", "eval"]:
            assert getattr(obj, name).__doc__ or name == "__init__", (obj, name)
    for name in ["state_dict", "load_state_dict", "from_torch", "from_keras"]:
        assert "Returns" in getattr(nn.BatchNorm, name).__doc__ or "Raises" in getattr(nn.BatchNorm, name).__doc__


@pytest.mark.parametrize("when", ["before the kernel", "as the kernel returns"])
def test_an_interrupted_training_call_counts_the_batch_if_it_updated_the_statistics(monkeypatch, when):
    """A KeyboardInterrupt in the checks before the kernel left the batch counted but its
    statistics not applied (a momentum=None layer then weighs every later batch wrongly;
    tests/test_processes.py's Ctrl-C test caught it once in four runs). A call that ends in an
    exception is uncounted unless the statistics changed; one interrupted as the kernel
    returns (the statistics updated) stays counted."""
    import pybn.nn._batchnorm as bn_module

    real = bn_module.batch_norm_train

    def interrupted(*args, **kwargs):
        if when == "as the kernel returns":
            real(*args, **kwargs)
        raise KeyboardInterrupt

    x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
    layer = nn.BatchNorm(3, momentum=None)
    layer(x)
    monkeypatch.setattr(bn_module, "batch_norm_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        layer(x + 1)
    monkeypatch.setattr(bn_module, "batch_norm_train", real)
    replay = nn.BatchNorm(3, momentum=None)
    for batch in [x, x + 1][:layer.num_batches_tracked]:
        replay(batch)
    assert layer.num_batches_tracked == (2 if when == "as the kernel returns" else 1)
    assert np.array_equal(layer.running_mean, replay.running_mean)
    assert np.array_equal(layer.running_var, replay.running_var)


NOISE_LAYERS = {
    "Dropout": lambda: nn.Dropout(0.3, seed=5),
    "DropPath": lambda: nn.DropPath(0.3, seed=5),
    "DropPath-batch": lambda: nn.DropPath(0.3, "batch", seed=5),
    "DropBlock2d": lambda: nn.DropBlock2d(0.3, 3, seed=5),
    "AlphaDropout": lambda: nn.AlphaDropout(0.3, seed=5),
    "GaussianDropout": lambda: nn.GaussianDropout(0.3, seed=5),
    "GaussianNoise": lambda: nn.GaussianNoise(0.3, seed=5),
}


@pytest.mark.parametrize("name", NOISE_LAYERS)
@pytest.mark.parametrize("offset", [np.int64(16), np.uint64(2**64 - 3)], ids=["int64", "uint64"])
def test_numpy_integer_seed_and_offset_as_ints(name, offset):
    """A seed or offset restored from a NumPy checkpoint (np.load(...)["offset"][()]): the
    forward computed the mask, then raised OverflowError advancing the offset (uint64 + int
    is float64, or out of C long), naming nothing."""
    x = np.random.default_rng(0).standard_normal((4, 3, 6, 6)).astype(np.float32)
    layer, plain = NOISE_LAYERS[name](), NOISE_LAYERS[name]()
    layer.seed, layer.offset = np.uint64(5), offset
    plain.offset = int(offset)
    assert type(layer.seed) is int and type(layer.offset) is int
    np.testing.assert_array_equal(layer(x), plain(x))
    assert type(layer.offset) is int and layer.offset == plain.offset != int(offset)
    np.testing.assert_array_equal(layer.backward(x), plain.backward(x))


@pytest.mark.parametrize("name", NOISE_LAYERS)
def test_bad_seed_and_offset_are_refused_when_set(name):
    layer = NOISE_LAYERS[name]()
    assert_raises_naming(TypeError, "offset", setattr, layer, "offset", 1.5)
    assert_raises_naming(ValueError, "offset", setattr, layer, "offset", -1)
    assert_raises_naming(ValueError, "seed", setattr, layer, "seed", 2**64)
    assert layer.seed == 5 and layer.offset == 0  # (unchanged)


def test_torch_modules_take_numpy_integer_seeds_and_offsets():
    from pybn.torch import nn as pnn

    module = pnn.Dropout(0.5, seed=np.int64(3))
    module.offset = np.uint64(2**64 - 1)
    assert module.seed == 3 and module.offset == 2**64 - 1
