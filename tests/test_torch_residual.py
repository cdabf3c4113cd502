"""torch.ops.pybn.batch_norm_add_relu (pybn.torch.residual) and the modules' block tail:
values and gradients against torch's composite relu(F.batch_norm(x) + r), both layouts,
every ISA; opcheck, gradcheck and double backward in float64; the fallback for what the
kernels do not take."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import pybn.torch  # noqa: F401  (registers torch.ops.pybn)
import pybn.torch.nn as pnn

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def make(shape, dtype, memory_format=torch.contiguous_format, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5).contiguous(memory_format=memory_format)
    r = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=memory_format)
    w = torch.rand(c, generator=g, dtype=dtype) + 0.5
    b = torch.randn(c, generator=g, dtype=dtype)
    dy = torch.randn(shape, generator=g, dtype=dtype)
    return x, r, w, b, dy


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def composite(x, r, w, b, rm, rv, training, relu):
    y = F.batch_norm(x, rm, rv, w, b, training=training, eps=1e-5) + r
    return torch.relu(y) if relu else y


LAYOUTS = [((5, 4, 7, 9), torch.contiguous_format), ((5, 4, 7, 9), torch.channels_last), ((6, 3, 33), None)]
LAYOUT_IDS = ["nchw", "nhwc", "ncl"]


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add-relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,fmt", LAYOUTS, ids=LAYOUT_IDS)
def test_values_and_grads_match_the_composite(isa, shape, fmt, dtype, training, relu):
    x, r, w, b, dy = make(shape, dtype, fmt or torch.contiguous_format)
    c = shape[1]
    rm0, rv0 = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    rm, rv, rm_ref, rv_ref = rm0.clone(), rv0.clone(), rm0.clone(), rv0.clone()
    xs, rs, ws, bs = leaves(x, r, w, b)
    y = pnn.batch_norm_add_relu(xs, rs, rm, rv, ws, bs, training, 0.1, 1e-5, relu)
    xt, rt, wt, bt = leaves(x, r, w, b)
    want = composite(xt, rt, wt, bt, rm_ref, rv_ref, training, relu)
    torch.testing.assert_close(y, want, **TOL[dtype])
    assert y.is_contiguous(memory_format=fmt) if fmt is not None else y.is_contiguous()
    torch.testing.assert_close(rm, rm_ref, **TOL[dtype])
    torch.testing.assert_close(rv, rv_ref, **TOL[dtype])
    y.backward(dy)
    want.backward(dy)
    for got, ref, name in ((xs, xt, "x"), (rs, rt, "residual"), (ws, wt, "weight"), (bs, bt, "bias")):
        torch.testing.assert_close(got.grad, ref.grad, **TOL[dtype], msg=name)


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add-relu"])
def test_module_block_tail(isa, relu):
    """pybn.torch.nn.BatchNorm2d(...)(x, residual=r, relu=...) against torch's module in the
    composite, training then evaluation mode."""
    x, r, w, b, dy = make((4, 5, 6, 6), torch.float32)
    mine, ref = pnn.BatchNorm2d(5), torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        for m in (mine, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
    for mode in ("train", "eval"):
        getattr(mine, mode)()
        getattr(ref, mode)()
        xs, rs = leaves(x, r)
        xt, rt = leaves(x, r)
        y = mine(xs, residual=rs, relu=relu)
        want = ref(xt) + rt
        want = torch.relu(want) if relu else want
        torch.testing.assert_close(y, want, **TOL[torch.float32])
        y.backward(dy)
        want.backward(dy)
        torch.testing.assert_close(xs.grad, xt.grad, **TOL[torch.float32])
        torch.testing.assert_close(rs.grad, rt.grad, **TOL[torch.float32])
        torch.testing.assert_close(mine.weight.grad, ref.weight.grad, **TOL[torch.float32])
        torch.testing.assert_close(mine.running_var, ref.running_var, **TOL[torch.float32])
        assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add-relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_gradcheck_and_double_backward(fmt, training, relu):
    x, r, w, b, _ = make((3, 2, 2, 3), torch.float64, fmt, seed=5)
    rm, rv = torch.tensor([0.2, -0.3], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)
    x, r, w, b = leaves(x, r, w, b)

    def tail(x, r, w, b):
        return torch.ops.pybn.batch_norm_add_relu(x, r, w, b, rm if not training else None,
                                                  rv if not training else None, training, 0.1, 1e-5, relu)[0]
    assert gradcheck(tail, (x, r, w, b))
    assert gradgradcheck(tail, (x, r, w, b))


def _opcheck_cases():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        stat = torch.float32 if dtype == torch.bfloat16 else dtype
        for fmt in (torch.contiguous_format, torch.channels_last):
            x, r, w, b, dy = make((4, 3, 5, 2), dtype, fmt, seed=7)
            x, r = x.requires_grad_(), r.requires_grad_()
            w, b = w.to(stat).requires_grad_(), b.to(stat).requires_grad_()
            rm, rv = torch.zeros(3, dtype=stat), torch.ones(3, dtype=stat)
            yield "batch_norm_add_relu", (x, r, w, b, rm, rv, True, 0.1, 1e-5, True)
            yield "batch_norm_add_relu", (x, r, None, None, rm + 1, rv + 1, False, 0.1, 1e-5, False)
            yield "batch_norm_add_relu", (x, None, w, b, None, None, True, 0.1, 1e-5, True)
            y = torch.relu(x.detach())
            mean, invstd = torch.zeros(3, dtype=stat), torch.ones(3, dtype=stat)
            yield "batch_norm_add_relu_backward", (dy, x.detach(), y, mean, invstd, w.detach(), True)


CASES = list(_opcheck_cases())


@pytest.mark.parametrize("case", range(len(CASES)))
def test_opcheck(case):
    name, args = CASES[case]
    torch.library.opcheck(getattr(torch.ops.pybn, name).default, args)


def test_a_residual_of_another_dtype_or_shape_is_refused():
    x = torch.randn(4, 3, 5)
    with pytest.raises(TypeError, match="^residual: dtype"):
        pnn.batch_norm_add_relu(x, x.double(), None, None, training=True)
    with pytest.raises(ValueError, match="^residual: shape"):
        pnn.batch_norm_add_relu(x, x[:2], None, None, training=True)


def test_fallback_for_what_the_kernels_do_not_take():
    """Running statistics pybn cannot update in place (strided views): torch's batch norm,
    add and relu, updating them as torch does."""
    x, r, w, b, dy = make((4, 3, 5), torch.float32)
    rm, rv = torch.zeros(6)[::2], torch.ones(6)[::2]
    rm_ref, rv_ref = torch.zeros(3), torch.ones(3)
    xs, rs = leaves(x, r)
    y = pnn.batch_norm_add_relu(xs, rs, rm, rv, w, b, training=True)
    xt, rt = leaves(x, r)
    want = torch.relu(F.batch_norm(xt, rm_ref, rv_ref, w, b, training=True) + rt)
    torch.testing.assert_close(y, want, **TOL[torch.float32])
    torch.testing.assert_close(rm, rm_ref, **TOL[torch.float32])
    torch.testing.assert_close(rv, rv_ref, **TOL[torch.float32])
    y.backward(dy)
    want.backward(dy)
    torch.testing.assert_close(rs.grad, rt.grad)
    torch.testing.assert_close(xs.grad, xt.grad, **TOL[torch.float32])
