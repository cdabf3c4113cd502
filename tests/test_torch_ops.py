"""torch.ops.pybn: values against torch's own kernels, layouts, autograd (gradcheck,
double backward), torch.library.opcheck, the fallbacks, dropout's masks, torch.compile
and torch.export."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import pybn
import pybn.torch  # registers torch.ops.pybn
import pybn.torch.ops as ops
import reference_dropout

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}
DTYPES = [torch.float32, torch.float64]


def dropout_scale(p):
    # the scale pybn multiplies kept values by; switch to pybn.dropout_scale once every branch has it
    return pybn.dropout_scale(p) if hasattr(pybn, "dropout_scale") else 1.0 / (1.0 - p)


def layout(x, name):
    """x in one of the layouts the operators take."""
    if name == "contiguous":
        return x.contiguous()
    if name == "channels_last":
        return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    if name == "nlc":  # an (N, L, C) tensor seen as (N, C, L)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if name == "strided":  # every other element of the last axis: neither fast layout
        wide = torch.cat([x, x], dim=-1)
        return wide[..., ::2].copy_(x)
    raise ValueError(name)


LAYOUT_CASES = [((6, 4, 5, 3), "contiguous"), ((6, 4, 5, 3), "channels_last"), ((3, 4, 2, 3, 5), "channels_last"),
                ((7, 5, 6), "nlc"), ((9, 4), "contiguous"), ((6, 4, 5, 3), "strided")]
LAYOUT_IDS = [f"{len(s)}d-{name}" for s, name in LAYOUT_CASES]


def has_layout(t, name):
    if name in ("channels_last", "nlc"):
        return ops.channels_last_physical(t)
    return t.is_contiguous()


def batch_norm_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = 3.0 + torch.randn(shape, generator=g, dtype=torch.float64) * torch.rand(c, generator=g,
                                                                               dtype=torch.float64).add(0.5).reshape(
        (1, c) + (1,) * (len(shape) - 2))
    weight = torch.randn(c, generator=g, dtype=torch.float64)
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


# --------------------------------------------------------------------------- batch norm values

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape,name", LAYOUT_CASES, ids=LAYOUT_IDS)
def test_batch_norm_train_forward_and_backward_equal_torch(shape, name, dtype):
    """Against torch's kernels run in float64 on the same values (the reference)."""
    x0, weight0, bias0 = batch_norm_inputs(shape, dtype)
    c = shape[1]
    results = []
    for impl, work in (("pybn", dtype), ("torch", torch.float64)):
        x = layout(x0.to(work, copy=True), name).requires_grad_()
        weight, bias = weight0.to(work, copy=True).requires_grad_(), bias0.to(work, copy=True).requires_grad_()
        rm, rv = torch.full((c,), 0.5, dtype=work), torch.full((c,), 2.0, dtype=work)
        if impl == "pybn":
            y, mean, invstd = torch.ops.pybn.batch_norm_train(x, weight, bias, rm, rv, 0.3, 1e-3)
            assert mean.dtype == invstd.dtype == dtype
        else:
            y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, rm, rv, True, 0.3, 1e-3)
            assert y.stride() == results[0][0].stride()  # torch's layout (a 3-D "nlc" x: contiguous)
        dy = torch.linspace(-1, 2, y.numel(), dtype=dtype).reshape(y.shape).to(work)
        y.backward(dy)
        results.append([y, mean, invstd, rm, rv, x.grad, weight.grad, bias.grad])
    for got, want, what in zip(*results, ["y", "save_mean", "save_invstd", "running_mean", "running_var", "dx",
                                          "dweight", "dbias"]):
        assert got.dtype == dtype, what
        torch.testing.assert_close(got, want.to(dtype), **TOL[dtype], msg=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape,name", LAYOUT_CASES, ids=LAYOUT_IDS)
def test_batch_norm_infer_forward_and_backward_equal_torch(shape, name, dtype):
    """Against torch's kernels run in float64 on the same values (the reference)."""
    x0, weight0, bias0 = batch_norm_inputs(shape, dtype, seed=1)
    c = shape[1]
    results = []
    for impl, work in (("pybn", dtype), ("torch", torch.float64)):
        rm, rv = torch.linspace(2, 4, c, dtype=dtype).to(work), torch.linspace(0.5, 3, c, dtype=dtype).to(work)
        x = layout(x0.to(work, copy=True), name).requires_grad_()
        weight, bias = weight0.to(work, copy=True).requires_grad_(), bias0.to(work, copy=True).requires_grad_()
        if impl == "pybn":
            y = torch.ops.pybn.batch_norm_infer(x, rm, rv, weight, bias, 1e-3)
        else:
            y = F.batch_norm(x, rm, rv, weight, bias, False, 0.1, 1e-3)
            assert y.stride() == results[0][0].stride()
        dy = torch.linspace(-1, 2, y.numel(), dtype=dtype).reshape(y.shape).to(work)
        y.backward(dy)
        results.append([y, x.grad, weight.grad, bias.grad])
    for got, want, what in zip(*results, ["y", "dx", "dweight", "dbias"]):
        torch.testing.assert_close(got, want.to(dtype), **TOL[dtype], msg=what)


def test_train_without_affine_or_running_statistics_equals_torch():
    x, _, _ = batch_norm_inputs((8, 3, 4), torch.float64)
    y, mean, invstd = torch.ops.pybn.batch_norm_train(x, None, None, None, None, 0.1, 1e-5)
    want = torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    for got, w in zip((y, mean, invstd), want):
        torch.testing.assert_close(got, w, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", ["batch_norm_train", "dropout"])
def test_fast_layouts_reach_the_kernels_without_a_copy(op, name, monkeypatch):
    """The arrays pybn receives are views of the tensors' own memory (x in, y out)."""
    seen = {}
    real = getattr(pybn, op)

    def spy(x, *args, out=None, **kwargs):
        seen["x"], seen["out"] = x.ctypes.data, out.ctypes.data
        return real(x, *args, out=out, **kwargs)

    monkeypatch.setattr(pybn, op, spy)
    x = layout(torch.randn(4, 3, 5, 6), name)
    if op == "dropout":
        y, _ = torch.ops.pybn.dropout(x, 0.5, torch.tensor([1, 0]), None)
    else:
        y, _, _ = torch.ops.pybn.batch_norm_train(x, None, None, None, None, 0.1, 1e-5)
    assert seen == {"x": x.data_ptr(), "out": y.data_ptr()}
    assert y.stride() == x.stride()


def test_batch_norm_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^x: training needs more than 1 value per channel"):
        torch.ops.pybn.batch_norm_train(torch.randn(1, 3), None, None, None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match=r"^x: needs at least 2 dimensions"):
        torch.ops.pybn.batch_norm_infer(torch.randn(5), torch.zeros(5), torch.ones(5), None, None, 1e-5)


# --------------------------------------------------------------------------- fallbacks

def ulps16(a, b):
    """Distance of two 16-bit float tensors in units of their last place."""
    def position(t):
        bits = t.view(torch.int16).to(torch.int64) & 0xFFFF
        return torch.where(bits >= 0x8000, -(bits & 0x7FFF), bits)
    return (position(a) - position(b)).abs()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_16_bit_batch_norm_runs_pybns_kernels_without_a_copy(dtype, monkeypatch):
    """16-bit CPU tensors reach pybn's kernels as NumPy views of their own memory (bfloat16
    through ml_dtypes), with float32 statistics; the results agree with torch's own kernels
    (y and dx within 1 ulp of the storage type where they do not cancel, the statistics and
    parameter gradients as float32 computes them)."""
    pytest.importorskip("ml_dtypes")
    x0, w0, b0 = batch_norm_inputs((6, 4, 5, 3), torch.float32)
    seen = []
    real = pybn.batch_norm_train

    def spy(x, *args, **kwargs):
        seen.append((x.dtype.name, x.ctypes.data, kwargs["out"].ctypes.data))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(pybn, "batch_norm_train", spy)
    results = []
    for impl in ("pybn", "torch"):
        x, w, b = x0.to(dtype).requires_grad_(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
        rm, rv = torch.zeros(4), torch.ones(4)
        if impl == "pybn":
            y, mean, invstd = torch.ops.pybn.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)
            assert seen == [(str(dtype).replace("torch.", ""), x.data_ptr(), y.data_ptr())]
        else:
            y, mean, invstd = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
        y.backward(torch.ones_like(y) + x.detach())
        results.append([y, mean, invstd, rm, rv, x.grad, w.grad, b.grad])
        assert y.dtype == dtype and mean.dtype == torch.float32
    (y, mean, invstd, rm, rv, dx, dw, db), (ty, tmean, tinvstd, trm, trv, tdx, tdw, tdb) = results
    assert ulps16(y, ty).max() <= 1
    for got, want in ((mean, tmean), (invstd, tinvstd), (rm, trm), (rv, trv)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, tdw, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(db, tdb, rtol=1e-3, atol=1e-3)
    scale = tdx.float().abs().max()
    assert ((ulps16(dx, tdx) <= 1) | ((dx.float() - tdx.float()).abs() <= scale * 2**-12)).all()
    y = torch.ops.pybn.batch_norm_infer(x0.to(dtype), torch.zeros(4), torch.ones(4), w0, b0, 1e-5)
    want = F.batch_norm(x0.to(dtype), torch.zeros(4), torch.ones(4), w0, b0, False, 0.1, 1e-5)
    assert y.dtype == dtype and ulps16(y, want).max() <= 1


# --------------------------------------------------------------------------- autograd

def _bn_train(x, w, b):
    return torch.ops.pybn.batch_norm_train(x, w, b, None, None, 0.1, 1e-5)[0]


@pytest.mark.parametrize("name", ["contiguous", "channels_last"])
def test_gradcheck_and_double_backward_of_batch_norm(name):
    x, w, b = batch_norm_inputs((3, 2, 2, 3), torch.float64)
    x = layout(x, name).requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    assert gradcheck(_bn_train, (x, w, b))
    assert gradgradcheck(_bn_train, (x, w, b))
    rm, rv = torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)

    def infer(x, w, b):
        return torch.ops.pybn.batch_norm_infer(x, rm, rv, w, b, 1e-5)
    assert gradcheck(infer, (x, w, b))
    assert gradgradcheck(infer, (x, w, b))


def test_gradcheck_and_double_backward_of_dropout():
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    philox = torch.tensor([12345, 64])
    for noise in (None, [4, 3, 1]):
        def drop(x):
            return torch.ops.pybn.dropout(x, 0.4, philox, noise)[0]
        assert gradcheck(drop, (x,))
        assert gradgradcheck(drop, (x,))


def test_backward_only_computes_the_gradients_asked_for():
    x, w, b = batch_norm_inputs((5, 3), torch.float32)
    x.requires_grad_()
    y = torch.ops.pybn.batch_norm_train(x, w, b, None, None, 0.1, 1e-5)[0]
    (dx,) = torch.autograd.grad(y.square().sum(), (x,))
    want_x = x.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(F.batch_norm(want_x, None, None, w, b, True).square().sum(), (want_x,))
    torch.testing.assert_close(dx, want, **TOL[torch.float32])


# --------------------------------------------------------------------------- opcheck

def _opcheck_cases():
    g = torch.Generator().manual_seed(3)

    def rnd(*shape, dtype=torch.float32, grad=False):
        return torch.randn(shape, generator=g, dtype=dtype).requires_grad_(grad)

    philox = torch.tensor([7, 32])
    for dtype in (torch.float32, torch.bfloat16):  # pybn's kernels; torch's (and dropout's float32 copy)
        d = dict(dtype=dtype)
        x, xcl = rnd(4, 3, 5, 2, grad=True, **d), rnd(4, 3, 5, 2, **d).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        stat = torch.float32 if dtype == torch.bfloat16 else dtype
        w, b = rnd(3, dtype=stat, grad=True), rnd(3, dtype=stat, grad=True)
        rm, rv = torch.zeros(3, dtype=stat), torch.ones(3, dtype=stat)
        mean, invstd = rnd(3, dtype=stat), torch.rand(3, generator=g, dtype=stat) + 0.5
        yield "batch_norm_train", (x, w, b, rm, rv, 0.1, 1e-5)
        yield "batch_norm_train", (xcl, None, None, None, None, 0.1, 1e-5)
        yield "batch_norm_infer", (xcl, rm + 1, rv + 1, w, b, 1e-5)
        yield "batch_norm_backward", (rnd(4, 3, 5, 2, **d), x.detach(), mean, invstd, w.detach(), True)
        yield "batch_norm_backward", (rnd(4, 3, 5, 2, **d), xcl.detach(), mean, invstd, None, False)
        yield "dropout", (x, 0.3, philox, None)
        yield "dropout", (xcl, 0.3, philox, [4, 3, 1, 1])
    yield "batch_norm_train", (rnd(6, 4, grad=True), None, None, torch.zeros(4), torch.ones(4), 0.1, 1e-5)
    x64 = rnd(5, 2, 3, dtype=torch.float64, grad=True)
    yield "batch_norm_train", (x64, None, None, torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                               0.1, 1e-5)
    yield "dropout", (x64, 0.5, philox, [5, 2, 1])


@pytest.mark.parametrize("case", list(range(len(list(_opcheck_cases())))))
def test_opcheck(case):
    name, args = list(_opcheck_cases())[case]
    torch.library.opcheck(getattr(torch.ops.pybn, name).default, args)


def test_opcheck_of_dropout_drawing_its_seed():
    """With philox=None each call draws a new seed, so eager and traced results differ by
    design: the schema, autograd and fake-tensor checks still hold."""
    x = torch.randn(4, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.pybn.dropout.default, (x, 0.5, None, None),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# --------------------------------------------------------------------------- dropout

def keep_of(shape, p, seed, offset):
    n = math.prod(shape)
    return torch.from_numpy(np.unpackbits(pybn.dropout_mask(shape, p, seed=seed, offset=offset), count=n,
                                          bitorder="little").reshape(shape).astype(bool))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_dropout_mask_is_pybns_on_every_isa_and_thread_count(isa, threads, dtype):
    x = torch.randn(37, 129, dtype=dtype) + 2.0
    seed, offset = 2**64 - 5, 2**64 - 16  # the counter wraps past 2**64 inside the mask
    philox = torch.tensor([seed - 2**64, offset - 2**64])
    y, used = torch.ops.pybn.dropout(x, 0.3, philox, None)
    assert torch.equal(used, philox)
    keep = keep_of(x.shape, 0.3, seed, offset)
    assert torch.equal(y, torch.where(keep, x * x.new_tensor(dropout_scale(0.3)), torch.zeros_like(x)))
    # and the mask is the independent reference's
    ref = reference_dropout.mask_bits(x.numel(), 0.3, seed, offset).reshape(x.shape)
    assert torch.equal(keep, torch.from_numpy(ref))


def test_dropout_mask_follows_memory_order_without_copies():
    """Element-wise: the mask covers the elements in memory order (for channels_last, the
    (N, H, W, C) order), so both fast layouts go to the kernel without a copy; other
    strides are made contiguous. Channel-wise: the same (N, C) mask in both layouts."""
    x = torch.randn(4, 6, 5, 3)
    philox = torch.tensor([99, 0])
    want, _ = torch.ops.pybn.dropout(x, 0.5, philox, None)
    assert torch.equal(want, torch.where(keep_of(x.shape, 0.5, 99, 0), x * 2, 0.0))
    xcl = layout(x.clone(), "channels_last")
    ycl, _ = torch.ops.pybn.dropout(xcl, 0.5, philox, None)
    keep_nhwc = keep_of((4, 5, 3, 6), 0.5, 99, 0).permute(0, 3, 1, 2)
    assert torch.equal(ycl, torch.where(keep_nhwc, x * 2, 0.0)) and ops.channels_last_physical(ycl)
    ystrided, _ = torch.ops.pybn.dropout(layout(x.clone(), "strided"), 0.5, philox, None)
    assert torch.equal(ystrided, want) and ystrided.is_contiguous()
    want2d, _ = torch.ops.pybn.dropout(x, 0.5, philox, [4, 6, 1, 1])
    y2d, _ = torch.ops.pybn.dropout(xcl, 0.5, philox, [4, 6, 1, 1])
    assert torch.equal(y2d, want2d) and ops.channels_last_physical(y2d)
    keep = keep_of((4, 6), 0.5, 99, 0)[:, :, None, None]
    assert torch.equal(want2d, torch.where(keep, x * 2, torch.zeros_like(x)))


@pytest.mark.parametrize("x_layout,dy_layout", [("channels_last", "contiguous"), ("contiguous", "channels_last"),
                                                ("strided", "channels_last")])
def test_dropout_gradient_in_another_layout_uses_the_forward_mask(x_layout, dy_layout):
    x = layout(torch.randn(4, 6, 5, 3), x_layout).requires_grad_()
    y, _ = torch.ops.pybn.dropout(x, 0.5, torch.tensor([7, 0]), None)
    dy = layout(torch.randn(4, 6, 5, 3), dy_layout)
    y.backward(dy)
    assert torch.equal(x.grad, torch.where(y != 0, 2 * dy, 0.0))


def test_dropout_draws_its_seed_from_torchs_generator():
    x = torch.randn(300)
    torch.manual_seed(42)
    y, used = torch.ops.pybn.dropout(x, 0.5, None, None)
    torch.manual_seed(42)
    seed = int(torch.randint(2**63 - 1, ()))  # the documented draw
    assert used.tolist() == [seed, 0]
    assert torch.equal(y, torch.where(keep_of(x.shape, 0.5, seed, 0), x * 2, torch.zeros_like(x)))
    assert not torch.equal(torch.ops.pybn.dropout(x, 0.5, None, None)[0], y)


def test_dropout_gradient_uses_the_forward_mask():
    x = torch.randn(50, 40, requires_grad=True)
    torch.manual_seed(1)
    y, used = torch.ops.pybn.dropout(x, 0.25, None, None)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = keep_of(x.shape, 0.25, int(used[0]), 0)
    assert torch.equal(x.grad, torch.where(keep, dy * dy.new_tensor(dropout_scale(0.25)), torch.zeros_like(dy)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_16_bit_dropout_uses_pybns_mask(dtype):
    x = torch.randn(8, 33).to(dtype)
    y, _ = torch.ops.pybn.dropout(x, 0.5, torch.tensor([3, 0]), None)
    assert y.dtype == dtype
    want = torch.where(keep_of(x.shape, 0.5, 3, 0), x.float() * 2, torch.zeros(x.shape)).to(dtype)
    assert torch.equal(y, want)


def test_dropout_p_0_and_1_and_errors():
    x = torch.randn(5, 7)
    assert torch.equal(torch.ops.pybn.dropout(x, 0.0, torch.tensor([1, 0]), None)[0], x)
    assert torch.equal(torch.ops.pybn.dropout(x, 1.0, torch.tensor([1, 0]), None)[0], torch.zeros_like(x))
    with pytest.raises(TypeError, match=r"^x: dropout needs a floating-point tensor"):
        torch.ops.pybn.dropout(torch.ones(3, dtype=torch.int64), 0.5, torch.tensor([1, 0]), None)
    with pytest.raises(ValueError, match=r"^p:"):
        torch.ops.pybn.dropout(x, 1.5, torch.tensor([1, 0]), None)
    with pytest.raises(ValueError, match=r"^noise_shape:"):
        torch.ops.pybn.dropout(x, 0.5, torch.tensor([1, 0]), [5, 2])


# --------------------------------------------------------------------------- compile and export

def _all_ops(x, w, b, rm, rv, philox):
    y = torch.ops.pybn.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)[0]
    y = torch.ops.pybn.dropout(torch.relu(y), 0.2, philox, None)[0]
    return torch.ops.pybn.batch_norm_infer(y, rm, rv, w, b, 1e-5)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_runs_the_same_kernels(dynamic):
    compiled = torch.compile(_all_ops, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    philox = torch.tensor([5, 0])
    for n in (6, 9):
        results = []
        for fn in (_all_ops, compiled):
            x = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(n)).contiguous(
                memory_format=torch.channels_last).requires_grad_()
            w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
            rm, rv = torch.zeros(3), torch.ones(3)
            y = fn(x, w, b, rm, rv, philox)
            y.sum().backward()
            results.append([y, rm, rv, x.grad, w.grad, b.grad])
        for got, want in zip(*results):
            assert torch.equal(got, want)
        assert results[1][0].stride() == results[0][0].stride()


@pytest.mark.filterwarnings("ignore:.isinstance.treespec, LeafSpec.. is deprecated:FutureWarning")  # in torch.export
def test_export_keeps_the_operators_and_the_running_statistics_update():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(3))
            self.register_buffer("rm", torch.zeros(3))
            self.register_buffer("rv", torch.ones(3))

        def forward(self, x, philox):
            return _all_ops(x, self.w, self.b, self.rm, self.rv, philox)

    x, philox = torch.randn(6, 3, 4, 4), torch.tensor([5, 0])
    program = torch.export.export(Block(), (x, philox))
    targets = {str(n.target) for n in program.graph.nodes}
    assert {"pybn.batch_norm_train.default", "pybn.dropout.default", "pybn.batch_norm_infer.default"} <= targets
    eager, exported = Block(), program.module()
    assert torch.equal(exported(x, philox), eager(x, philox))
    assert torch.equal(dict(exported.named_buffers())["rv"], eager.rv) and not torch.equal(eager.rv, torch.ones(3))
    decomposed = program.run_decompositions()
    assert set(decomposed.graph_signature.buffers_to_mutate.values()) == {"rm", "rv"}
