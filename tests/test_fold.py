"""pybn.fold_conv_bn / pybn.fold_bn_linear: against an independent float64 NumPy reference
(bit for bit on the weights), and against the unfolded pair run by torch in eval mode."""
import numpy as np
import pytest
import torch

import pybn
from error_checks import assert_raises_naming

DTYPES = [np.float32, np.float64]
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def bn_params(rng, c, affine=True):
    mean = rng.normal(0.5, 2.0, c)
    var = rng.uniform(0.1, 3.0, c)
    gamma = rng.uniform(0.5, 2.0, c) * rng.choice([-1, 1], c) if affine else None
    beta = rng.normal(0, 1, c) if affine else None
    return mean, var, gamma, beta


def ref_scale(var, gamma, eps):
    return (np.ones_like(var) if gamma is None else gamma) / np.sqrt(var + eps)


def ref_fold_conv_bn(w, b, mean, var, gamma, beta, eps, transposed, groups):
    """Float64 reference, written from the formula: W' = W * s along the output channels."""
    s = ref_scale(var, gamma, eps)
    w64 = w.astype(np.float64)
    if transposed:
        cin, cout_g = w.shape[:2]
        # output channel of weight[i, j] is (i // (cin // groups)) * cout_g + j
        oc = (np.arange(cin)[:, None] // (cin // groups)) * cout_g + np.arange(cout_g)[None, :]
        scale = s[oc].reshape(oc.shape + (1,) * (w.ndim - 2))
    else:
        scale = s.reshape((-1,) + (1,) * (w.ndim - 1))
    b64 = np.zeros(len(s)) if b is None else b.astype(np.float64)
    bias = (b64 - mean) * s + (0 if beta is None else beta)
    return (w64 * scale).astype(w.dtype), bias.astype(w.dtype)


def ref_fold_bn_linear(w, b, mean, var, gamma, beta, eps):
    s = ref_scale(var, gamma, eps)
    t = (0 if beta is None else beta) - mean * s
    w2 = w.reshape(w.shape[0], w.shape[1]).astype(np.float64)
    b64 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
    w_out = (w.astype(np.float64) * s.reshape((1, -1) + (1,) * (w.ndim - 2))).astype(w.dtype)
    return w_out, (b64 + w2 @ t).astype(w.dtype)


def assert_bias_close(got, want, magnitude):
    """The bias of fold_bn_linear sums in another order than NumPy: equal up to the final
    rounding plus float64 summation error, bounded by cols * eps64 * sum(|terms|)."""
    bound = 2 * np.finfo(got.dtype).eps * np.abs(want) + 2 * magnitude.shape[-1] * 2.0**-52 * magnitude.sum(-1)
    assert np.all(np.abs(got.astype(np.float64) - want) <= bound), (got, want)


# --- every ISA path and thread count, with tails of every length ------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_conv_bn_matches_reference_bitwise(isa, threads, dtype, rng):
    for k in range(1, 20):  # runs of k elements per output channel: every tail length
        w = rng.standard_normal((5, 3, k)).astype(dtype)
        b = rng.standard_normal(5).astype(dtype)
        mean, var, gamma, beta = bn_params(rng, 5)
        got = pybn.fold_conv_bn(w, b, mean, var, gamma, beta, eps=1e-3)
        want = ref_fold_conv_bn(w, b, mean, var, gamma, beta, 1e-3, False, 1)
        np.testing.assert_array_equal(got.weight, want[0])
        np.testing.assert_array_equal(got.bias, want[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_conv_bn_transposed_grouped_bitwise(isa, threads, dtype, rng):
    for groups, cin, cout_g, k in [(1, 3, 5, (3,)), (2, 4, 3, (2, 2)), (4, 4, 1, (3, 3)), (3, 6, 2, (1,)),
                                   (2, 6, 17, (1, 1, 1))]:
        w = rng.standard_normal((cin, cout_g) + k).astype(dtype)
        mean, var, gamma, beta = bn_params(rng, groups * cout_g)
        got = pybn.fold_conv_bn(w, None, mean, var, gamma, beta, transposed=True, groups=groups)
        want = ref_fold_conv_bn(w, None, mean, var, gamma, beta, 1e-5, True, groups)
        np.testing.assert_array_equal(got.weight, want[0])
        np.testing.assert_array_equal(got.bias, want[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_bn_linear_matches_reference(isa, threads, dtype, rng):
    for cin in list(range(1, 68)) + [1000]:  # rows of every tail length on every path
        w = rng.standard_normal((3, cin)).astype(dtype)
        b = rng.standard_normal(3).astype(dtype)
        mean, var, gamma, beta = bn_params(rng, cin)
        got = pybn.fold_bn_linear(w, b, mean, var, gamma, beta)
        want = ref_fold_bn_linear(w, b, mean, var, gamma, beta, 1e-5)
        np.testing.assert_array_equal(got.weight, want[0])
        t = beta - mean * ref_scale(var, gamma, 1e-5)
        assert_bias_close(got.bias, want[1].astype(np.float64), np.abs(w * t))


def test_large_weights_same_on_one_and_two_threads(rng):
    # big enough to be split between threads
    w = rng.standard_normal((512, 256, 3, 3)).astype(np.float32)
    params = bn_params(rng, 512)
    lin = rng.standard_normal((512, 4096)).astype(np.float32)
    lparams = bn_params(rng, 4096)
    prev = pybn.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            pybn.set_num_threads(n)
            results.append((pybn.fold_conv_bn(w, None, *params), pybn.fold_bn_linear(lin, None, *lparams)))
    finally:
        pybn.set_num_threads(prev)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a.weight, b.weight)
        np.testing.assert_array_equal(a.bias, b.bias)


# --- against torch: the folded layer equals layer-then-BN in eval mode -------------------


def torch_bn(c, dims, params, dtype):
    mean, var, gamma, beta = params
    bn = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dims](
        c, eps=1e-3, affine=gamma is not None, dtype=TORCH_DTYPE[dtype])
    bn.running_mean.copy_(torch.from_numpy(mean))
    bn.running_var.copy_(torch.from_numpy(var))
    if gamma is not None:
        bn.weight.data.copy_(torch.from_numpy(gamma))
        bn.bias.data.copy_(torch.from_numpy(beta))
    return bn.eval()


def layer_weights(layer):
    w = layer.weight.detach().numpy()
    return w, None if layer.bias is None else layer.bias.detach().numpy()


def assert_outputs_close(got, want, dtype):
    tol = 2e-5 if dtype == np.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


# (name, layer factory, input shape, BN dims)
AFTER = [
    ("linear", lambda: torch.nn.Linear(7, 6), (4, 7), 1),
    ("conv1d", lambda: torch.nn.Conv1d(4, 6, 3), (2, 4, 9), 1),
    ("conv2d", lambda: torch.nn.Conv2d(4, 6, 3, padding=1), (2, 4, 7, 7), 2),
    ("conv3d", lambda: torch.nn.Conv3d(2, 4, 2), (2, 2, 4, 4, 4), 3),
    ("conv2d-grouped", lambda: torch.nn.Conv2d(4, 6, 3, groups=2), (2, 4, 6, 6), 2),
    ("conv2d-depthwise", lambda: torch.nn.Conv2d(6, 6, 3, groups=6), (2, 6, 6, 6), 2),
    ("conv2d-no-bias", lambda: torch.nn.Conv2d(4, 6, 3, bias=False), (2, 4, 6, 6), 2),
    ("convT1d", lambda: torch.nn.ConvTranspose1d(4, 6, 3), (2, 4, 5), 1),
    ("convT2d", lambda: torch.nn.ConvTranspose2d(4, 6, 3, stride=2), (2, 4, 5, 5), 2),
    ("convT3d", lambda: torch.nn.ConvTranspose3d(2, 4, 2), (2, 2, 3, 3, 3), 3),
    ("convT2d-groups2", lambda: torch.nn.ConvTranspose2d(4, 6, 3, groups=2), (2, 4, 5, 5), 2),
    ("convT2d-depthwise", lambda: torch.nn.ConvTranspose2d(6, 6, 3, groups=6), (2, 6, 5, 5), 2),
    ("convT3d-groups2-no-bias", lambda: torch.nn.ConvTranspose3d(4, 8, 2, groups=2, bias=False), (1, 4, 3, 3, 3), 3),
]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,make,shape,dims", AFTER, ids=[a[0] for a in AFTER])
def test_fold_conv_bn_equals_torch_pair(name, make, shape, dims, dtype, affine, rng):
    torch.manual_seed(0)
    layer = make().to(TORCH_DTYPE[dtype]).eval()
    transposed = isinstance(layer, torch.nn.modules.conv._ConvTransposeNd)
    c_out = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
    bn = torch_bn(c_out, dims, bn_params(rng, c_out, affine), dtype)
    w, b = layer_weights(layer)
    w_before, b_before = w.copy(), None if b is None else b.copy()
    groups = getattr(layer, "groups", 1)
    fw, fb = pybn.fold_conv_bn(w, b, bn.running_mean.numpy(), bn.running_var.numpy(),
                               None if bn.weight is None else bn.weight.detach().numpy(),
                               None if bn.bias is None else bn.bias.detach().numpy(),
                               eps=bn.eps, transposed=transposed, groups=groups)
    np.testing.assert_array_equal(w, w_before)  # inputs are never modified
    if b is not None:
        np.testing.assert_array_equal(b, b_before)
    assert fw.dtype == dtype and fb.dtype == dtype and fw.shape == w.shape and fb.shape == (c_out,)
    folded = make().to(TORCH_DTYPE[dtype]).eval()
    folded.weight.data = torch.from_numpy(fw)
    folded.bias = torch.nn.Parameter(torch.from_numpy(fb))
    x = torch.from_numpy(rng.standard_normal(shape).astype(dtype))
    with torch.no_grad():
        assert_outputs_close(folded(x), bn(layer(x)), dtype)


BEFORE = [
    ("linear", lambda: torch.nn.Linear(7, 5), (6, 7), 1),
    ("conv1x1", lambda: torch.nn.Conv2d(7, 5, 1), (2, 7, 4, 4), 2),
    ("conv1x1-strided-no-bias", lambda: torch.nn.Conv2d(7, 5, 1, stride=2, bias=False), (2, 7, 5, 5), 2),
    ("conv1d-pointwise", lambda: torch.nn.Conv1d(7, 5, 1), (3, 7, 6), 1),
]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,make,shape,dims", BEFORE, ids=[a[0] for a in BEFORE])
def test_fold_bn_linear_equals_torch_pair(name, make, shape, dims, dtype, affine, rng):
    torch.manual_seed(0)
    layer = make().to(TORCH_DTYPE[dtype]).eval()
    c_in = layer.in_features if isinstance(layer, torch.nn.Linear) else layer.in_channels
    bn = torch_bn(c_in, dims, bn_params(rng, c_in, affine), dtype)
    w, b = layer_weights(layer)
    fw, fb = pybn.fold_bn_linear(w, b, bn.running_mean.numpy(), bn.running_var.numpy(),
                                 None if bn.weight is None else bn.weight.detach().numpy(),
                                 None if bn.bias is None else bn.bias.detach().numpy(), eps=bn.eps)
    assert fw.dtype == dtype and fw.shape == w.shape
    folded = make().to(TORCH_DTYPE[dtype]).eval()
    folded.weight.data = torch.from_numpy(fw)
    folded.bias = torch.nn.Parameter(torch.from_numpy(fb))
    x = torch.from_numpy(rng.standard_normal(shape).astype(dtype))
    with torch.no_grad():
        assert_outputs_close(folded(x), layer(bn(x)), dtype)


def test_torch_fuser_fails_on_grouped_transposed_conv_and_pybn_does_not(rng):
    # The motivating case: torch 2.13 mixes up the axes of a grouped ConvTranspose.
    conv = torch.nn.ConvTranspose2d(4, 6, 3, groups=2).eval()
    bn = torch_bn(6, 2, bn_params(rng, 6), np.float32)
    bn.eps = 1e-5
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    try:
        fused = fuse_conv_bn_eval(conv, bn, transpose=True)
    except RuntimeError:
        fused = None
    fw, fb = pybn.fold_conv_bn(*layer_weights(conv), bn.running_mean.numpy(), bn.running_var.numpy(),
                               bn.weight.detach().numpy(), bn.bias.detach().numpy(), transposed=True, groups=2)
    x = torch.from_numpy(rng.standard_normal((2, 4, 5, 5)).astype(np.float32))
    folded = torch.nn.ConvTranspose2d(4, 6, 3, groups=2).eval()
    folded.weight.data, folded.bias.data = torch.from_numpy(fw), torch.from_numpy(fb)
    with torch.no_grad():
        want = bn(conv(x))
        assert_outputs_close(folded(x), want, np.float32)
        if fused is not None:  # if a later torch fixes it, it must at least not be wrong silently
            assert not torch.allclose(fused(x), want, atol=1e-4) or fused.weight.shape == conv.weight.shape


# --- dtypes and arguments ----------------------------------------------------------------


def test_results_take_the_weight_dtype(rng):
    w = rng.standard_normal((4, 3)).astype(np.float32)
    fw, fb = pybn.fold_conv_bn(w, np.zeros(4), *bn_params(rng, 4))  # float64 statistics
    assert fw.dtype == np.float32 and fb.dtype == np.float32
    fw, fb = pybn.fold_bn_linear(w.astype(np.float64), None, *[
        None if p is None else p.astype(np.float32) for p in bn_params(rng, 3)])
    assert fw.dtype == np.float64 and fb.dtype == np.float64


def test_array_likes_and_noncontiguous_weights(rng):
    w = rng.standard_normal((6, 8)).astype(np.float32)
    params = bn_params(rng, 6)
    want = pybn.fold_conv_bn(w, None, *params)
    got = pybn.fold_conv_bn(np.asfortranarray(w), None, *[p.tolist() for p in params])
    np.testing.assert_array_equal(got.weight, want.weight)
    np.testing.assert_array_equal(got.bias, want.bias)
    assert got.weight.flags.c_contiguous


def test_empty_weights(rng):
    w = np.zeros((0, 3, 3, 3), np.float32)
    fw, fb = pybn.fold_conv_bn(w, None, np.zeros(0), np.ones(0))
    assert fw.shape == w.shape and fb.shape == (0,)
    fw, fb = pybn.fold_bn_linear(np.zeros((4, 0), np.float64), None, np.zeros(0), np.ones(0))
    assert fw.shape == (4, 0)
    np.testing.assert_array_equal(fb, np.zeros(4))


BAD = [
    ("int weight", TypeError, "weight", lambda p: pybn.fold_conv_bn(np.ones((2, 3), int), None, *p(2))),
    ("1-d weight", ValueError, "weight", lambda p: pybn.fold_conv_bn(np.ones(3), None, *p(3))),
    ("complex weight", TypeError, "weight",
     lambda p: pybn.fold_conv_bn(np.ones((2, 3), np.complex64), None, *p(2))),
    ("bias length", ValueError, "bias", lambda p: pybn.fold_conv_bn(np.ones((2, 3)), np.ones(3), *p(2))),
    ("mean length", ValueError, "running_mean",
     lambda p: pybn.fold_conv_bn(np.ones((2, 3)), None, np.zeros(3), np.ones(2))),
    ("var length", ValueError, "running_var",
     lambda p: pybn.fold_conv_bn(np.ones((2, 3)), None, np.zeros(2), np.ones(3))),
    ("negative var", ValueError, "running_var",
     lambda p: pybn.fold_conv_bn(np.ones((2, 3)), None, np.zeros(2), -np.ones(2))),
    ("gamma length", ValueError, "gamma",
     lambda p: pybn.fold_conv_bn(np.ones((2, 3)), None, np.zeros(2), np.ones(2), np.ones(3))),
    ("beta dtype", TypeError, "beta",
     lambda p: pybn.fold_conv_bn(np.ones((2, 3)), None, np.zeros(2), np.ones(2), None, np.ones(2, complex))),
    ("mean None", TypeError, "running_mean", lambda p: pybn.fold_conv_bn(np.ones((2, 3)), None, None, np.ones(2))),
    ("eps negative", ValueError, "eps", lambda p: pybn.fold_conv_bn(np.ones((2, 3)), None, *p(2), eps=-1.0)),
    ("eps nan", ValueError, "eps", lambda p: pybn.fold_conv_bn(np.ones((2, 3)), None, *p(2), eps=float("nan"))),
    ("eps str", TypeError, "eps", lambda p: pybn.fold_bn_linear(np.ones((2, 3)), None, *p(3), eps="1e-5")),
    ("groups 0", ValueError, "groups", lambda p: pybn.fold_conv_bn(np.ones((2, 3)), None, *p(2), groups=0)),
    ("groups float", TypeError, "groups", lambda p: pybn.fold_conv_bn(np.ones((2, 3)), None, *p(2), groups=1.0)),
    ("groups do not divide out", ValueError, "groups",
     lambda p: pybn.fold_conv_bn(np.ones((3, 1, 3)), None, *p(3), groups=2)),
    ("transposed in not divisible", ValueError, "groups",
     lambda p: pybn.fold_conv_bn(np.ones((3, 2, 3)), None, *p(4), transposed=True, groups=2)),
    ("transposed channel count", ValueError, "running_mean",
     lambda p: pybn.fold_conv_bn(np.ones((4, 2, 3)), None, *p(2), transposed=True, groups=2)),
    ("bn before 3x3 conv", ValueError, "weight",
     lambda p: pybn.fold_bn_linear(np.ones((2, 3, 3, 3)), None, *p(3))),
    ("bn before linear: stats of out", ValueError, "running_mean",
     lambda p: pybn.fold_bn_linear(np.ones((2, 3)), None, *p(2))),
]


@pytest.mark.parametrize("label,exc,name,call", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_name_the_argument(label, exc, name, call):
    assert_raises_naming(exc, name, call, lambda c: (np.zeros(c), np.ones(c)))


def test_bn_before_larger_kernel_says_why():
    with pytest.raises(ValueError, match="padding"):
        pybn.fold_bn_linear(np.ones((2, 3, 3, 3)), None, np.zeros(3), np.ones(3))


@pytest.mark.parametrize("case", ["gamma-inf", "var-zero-eps-zero", "huge-bias"])
def test_non_finite_statistics_propagate_without_warnings(case):
    """NaN and infinities in a batch norm's parameters give the IEEE results of the float64
    formula, rounded to the weight's dtype, and no NumPy warning escapes (the suite turns
    warnings into errors). Finite values past the dtype's range (huge-bias) give infinities
    too, silently (a check would cost a pass over the weights; the folders check)."""
    w = np.array([[1.0, -2.0, 0.0], [0.5, 0.25, 3.0]], np.float32)
    mean, var, gamma, beta, eps = np.zeros(2), np.ones(2), np.ones(2), np.zeros(2), 1e-5
    bias = np.zeros(2)
    if case == "gamma-inf":
        gamma = np.array([np.inf, 1.0])
    elif case == "var-zero-eps-zero":
        var, eps = np.array([0.0, 1.0]), 0.0
    else:
        bias = np.array([1e300, 0.0])
    with np.errstate(all="ignore"):
        s = gamma / np.sqrt(var + eps)
        want_w = (w.astype(np.float64) * s[:, None]).astype(np.float32)
        want_b = ((bias - mean) * s + beta).astype(np.float32)
    got = pybn.fold_conv_bn(w, bias, mean, var, gamma, beta, eps=eps)
    np.testing.assert_array_equal(got.weight, want_w)
    np.testing.assert_array_equal(got.bias, want_b)
    with np.errstate(all="ignore"):
        t = beta - mean * s
        want_w2 = (w.T.astype(np.float64) * s[None, :]).astype(np.float32)  # BN before a Linear (2 -> 3)
    got2 = pybn.fold_bn_linear(w.T.copy(), None, mean, var, gamma, beta, eps=eps)
    np.testing.assert_array_equal(got2.weight, want_w2)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(got2.bias, (w.T.astype(np.float64) @ t).astype(np.float32))
