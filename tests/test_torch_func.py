"""pybn.torch's modules under torch.func (pybn/torch/_transforms.py): grad, vjp, jacrev,
gradients of gradients and per-sample gradients (vmap over grad) give what torch's own
autograd gives through the same modules, masks included; batch norm gives what torch's
batch norm gives under the same transform. Before, every random module and batch norm
with batch statistics stopped at torch's "must override the setup_context staticmethod"
under grad (torch's register_autograd makes Functions functorch refuses)."""
import copy

import pytest
import torch
from torch.func import grad, jacrev, vjp, vmap

import pybn.torch
import pybn.torch.nn as pnn

# (warnings are errors in the tests: vmap over pybn's operators must not warn of torch's
# batching fallback)

# every random module of pybn.torch.nn, its seed pinned (a fresh module per call draws the same
# mask), and the keyword arguments of its call
RANDOM = {
    "Dropout": (lambda: pnn.Dropout(0.3, seed=11), {}),
    "Dropout relu": (lambda: pnn.Dropout(0.3, seed=11), {"relu": True}),
    "Dropout2d": (lambda: pnn.Dropout2d(0.4, seed=11), {}),
    "DropPath": (lambda: pnn.DropPath(0.5, seed=11), {}),
    "StochasticDepth batch": (lambda: pnn.StochasticDepth(0.5, "batch", seed=13), {}),
    "AlphaDropout": (lambda: pnn.AlphaDropout(0.3, seed=11), {}),
    "GaussianDropout": (lambda: pnn.GaussianDropout(0.3, seed=11), {}),
    "GaussianNoise": (lambda: pnn.GaussianNoise(0.5, seed=11), {}),
    "DropBlock2d": (lambda: pnn.DropBlock2d(0.3, 3, seed=11), {}),
}
# the modules whose per-sample input (one sample, without the batch dimension) they take
PER_SAMPLE = ["Dropout", "Dropout relu", "AlphaDropout", "GaussianDropout", "GaussianNoise"]


def fresh(name, dtype=torch.float64):
    make, kwargs = RANDOM[name]
    layer = make().to(dtype)
    return lambda x: layer(x, **kwargs)


def data(shape, seed, layout="contiguous"):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def autograd_grad(f, x, w):
    x = x.detach().clone().requires_grad_()
    (f(x) * w).sum().backward()
    return x.grad


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", sorted(RANDOM))
def test_grad_and_vjp_equal_autograd(name, layout):
    x, w = data((4, 3, 6, 6), 1, layout), data((4, 3, 6, 6), 2)
    want = autograd_grad(fresh(name), x, w)
    assert torch.count_nonzero(want) > 0
    got = grad(lambda x: (fresh(name)(x) * w).sum())(x)
    assert torch.equal(got, want)
    y, pullback = vjp(fresh(name), x)
    assert torch.equal(y, fresh(name)(x)) and torch.equal(pullback(w)[0], want)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", sorted(RANDOM))
def test_jacrev_equals_autograd_jacobian(name, layout):
    """jacrev: vmap over the backward, whose cotangents must take x's layout in each
    sample's memory (the mask follows memory order)."""
    x = data((2, 2, 5, 5), 3, layout)
    want = torch.autograd.functional.jacobian(fresh(name), x)
    got = jacrev(fresh(name))(x)
    assert got.shape == (2, 2, 5, 5) * 2 and torch.equal(got, want)


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_gradient_of_the_gradient_equals_double_backward(name):
    x = data((4, 3, 6, 6), 4)

    def f(x):
        return fresh(name)(x).pow(3).sum()

    got = grad(lambda x: grad(f)(x).square().sum())(x)
    xr = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(f(xr), xr, create_graph=True)
    (want,) = torch.autograd.grad(dx.square().sum(), xr)
    assert torch.count_nonzero(want) > 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", PER_SAMPLE)
def test_per_sample_gradients_equal_one_call_per_sample(name, dtype):
    """vmap(grad(...)): each sample's gradient, its mask that of the module called on that
    sample alone (a pinned seed gives every sample the same mask)."""
    x, w = data((5, 3, 7), 5).to(dtype), data((3, 7), 6).to(dtype)

    def loss(xi):
        return (fresh(name, dtype)(xi) * w).sum()

    got = vmap(grad(loss))(x)
    want = torch.stack([autograd_grad(fresh(name, dtype), xi, w) for xi in x])
    assert torch.count_nonzero(want) > 0
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["Dropout", "Dropout2d", "AlphaDropout", "GaussianDropout", "DropBlock2d"])
@pytest.mark.parametrize("samples", ["channels_last", "in_dims=1"])
def test_vmap_over_strided_samples_equals_one_call_per_sample(name, samples):
    """Each sample as its memory holds it: channels-last samples (the mask over their
    channels-last order) and samples along dim 1 of a 5-d tensor."""
    x = data((3, 2, 3, 5, 5), 21)
    if samples == "channels_last":
        x, in_dims = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3), 0
    else:
        in_dims = 1
    got = vmap(fresh(name), in_dims=in_dims)(x)
    want = torch.stack([fresh(name)(xi) for xi in x.unbind(in_dims)])
    assert torch.count_nonzero(want) > 0 and torch.equal(got, want)
    w = data(tuple(want.shape[1:]), 22)
    got = vmap(grad(lambda xi: (fresh(name)(xi) * w).sum()), in_dims=in_dims)(x)
    assert torch.equal(got, torch.stack([autograd_grad(fresh(name), xi, w) for xi in x.unbind(in_dims)]))


@pytest.mark.parametrize("name", ["Dropout", "Dropout2d"])
def test_ensemble_of_convolutions_and_dropout(name):
    """stack_module_state + functional_call over Conv2d -> dropout: member i's output is
    its convolution's, under the mask its module draws."""
    torch.manual_seed(23)
    members = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), RANDOM[name][0]()).double() for _ in range(3)]
    params, buffers = torch.func.stack_module_state(members)
    x = data((5, 3, 8, 8), 24)
    y = vmap(lambda p, b: torch.func.functional_call(members[0], (p, b), (x,)))(params, buffers)
    # the convolutions as vmap computes them: torch's batched convolution can differ from
    # member[0](x) in the last bits (seen in float64 on a Zen 4)
    conv = {k.removeprefix("0."): v for k, v in params.items()}
    convolved = vmap(lambda p: torch.func.functional_call(members[0][0], p, (x,)))(conv)
    for i, member in enumerate(members):
        torch.testing.assert_close(convolved[i], member[0](x), rtol=1e-12, atol=1e-12)
        assert torch.equal(y[i], fresh(name)(convolved[i]))


def test_vmap_over_an_empty_batch_is_a_clear_error():
    with pytest.raises(RuntimeError, match="size 0"):
        vmap(fresh("Dropout"))(data((0, 3, 4), 25))


def test_per_sample_gradients_follow_each_samples_own_draw():
    """Without a seed each sample draws its own (vmap's randomness="different"): every
    sample's gradient is its own mask times the scale, the mask its forward used."""
    torch.manual_seed(5)
    layer = pnn.Dropout(0.5)
    x = data((6, 64), 7).abs() + 0.5  # nonzero: the output's zeros are the dropped elements

    def f(xi):
        y = layer(xi)
        return y.sum(), y

    g, y = vmap(grad(f, has_aux=True), randomness="different")(x)
    kept = y != 0
    assert torch.equal(g, kept.to(g.dtype) * 2.0)
    assert not all(torch.equal(kept[0], kept[i]) for i in range(1, 6))  # the samples' masks differ


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_vmap_randomness_modes_are_torchs(name):
    """Without a seed the draw follows vmap's randomness, as torch's random functions do:
    "error" (the default) raises torch's error, "same" gives every sample the draw a call on
    that sample alone makes after the same torch.manual_seed, "different" one per sample."""
    make, kwargs = RANDOM[name]
    layer = make().double()
    layer.seed = None  # (draws from torch's generator)
    x = data((4, 3, 16), 19)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(lambda xi: layer(xi, **kwargs))(x)
    torch.manual_seed(20)
    same = vmap(lambda xi: layer(xi, **kwargs), randomness="same")(x)
    for i in range(4):
        torch.manual_seed(20)
        assert torch.equal(same[i], layer(x[i], **kwargs))
    different = vmap(lambda xi: layer(xi, **kwargs), randomness="different")(x[:1].expand(4, 3, 16))
    assert not any(torch.equal(different[0], different[i]) for i in range(1, 4))


@pytest.mark.parametrize("op, args", [
    ("dropout", (0.4, None, None)), ("relu_dropout", (0.4, None)), ("alpha_dropout", (0.4, None)),
    ("gaussian_dropout", (0.4, None)), ("gaussian_noise", (0.4, None)),
    ("drop_block", (0.4, 3, None, 1.0, True, False, True))])
def test_operators_under_vmap_follow_its_randomness(op, args):
    """torch.ops.pybn.* called directly under vmap without a seed: "error" raises, "same"
    draws once (every sample the call on one sample after the same manual_seed),
    "different" draws per sample."""
    fn = getattr(torch.ops.pybn, op)
    x = data((3, 2, 3, 6, 6), 26)

    def call(xi):
        return fn(xi, *args)[0]

    with pytest.raises(RuntimeError, match="randomness"):
        vmap(call)(x)
    torch.manual_seed(27)
    same = vmap(call, randomness="same")(x)
    for i in range(3):
        torch.manual_seed(27)
        assert torch.equal(same[i], call(x[i]))
    different = vmap(call, randomness="different")(x[:1].expand(3, 2, 3, 6, 6))
    assert not torch.equal(different[0], different[1])


def test_ensemble_gradients_through_functional_call():
    """The ensemble of torch.func's tutorial: stacked parameters, vmap over
    grad(functional_call) of a model with pybn's dropout and batch norm."""
    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), pnn.BatchNorm1d(8, track_running_stats=False),
                                pnn.Dropout(0.3, seed=4), torch.nn.Linear(8, 1)).double()
    members = [model] + [torch.nn.Sequential(*[m for m in model]) for _ in range(2)]
    params, buffers = torch.func.stack_module_state(members)
    x = data((10, 6), 9)

    def loss(p, b):
        return torch.func.functional_call(model, (p, b), (x,)).square().mean()

    grads = vmap(grad(loss))(params, buffers)
    model[2].offset = 0  # (the call above advanced the pinned stream once)
    model.zero_grad()
    loss(dict(model.named_parameters()), dict(model.named_buffers())).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name][0], p.grad, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- batch norm

def pair(**kwargs):
    """torch's BatchNorm2d and pybn's, with the same parameters and statistics."""
    stock = torch.nn.BatchNorm2d(3, **kwargs).double()
    with torch.no_grad():
        if stock.affine:
            stock.weight.uniform_(0.5, 1.5)
            stock.bias.uniform_(-1, 1)
        if stock.track_running_stats:
            stock.running_mean.uniform_(-1, 1)
            stock.running_var.uniform_(0.5, 2)
    ours = pnn.BatchNorm2d(3, **kwargs).double()
    ours.load_state_dict(stock.state_dict())
    return stock, ours


@pytest.mark.parametrize("mode", ["eval", "batch statistics"])
def test_batch_norm_under_grad_jvp_and_vmap_equals_torchs(mode):
    stock, ours = pair() if mode == "eval" else pair(track_running_stats=False)
    if mode == "eval":
        stock.eval(), ours.eval()
    x, w, t = data((4, 3, 5, 5), 10), data((4, 3, 5, 5), 11), data((4, 3, 5, 5), 12)
    for transform in (lambda m: grad(lambda x: (m(x) * w).square().sum())(x),
                      lambda m: torch.func.jvp(m, (x,), (t,))[1],
                      lambda m: jacrev(m)(x[:1, :, :2, :2]),
                      lambda m: vmap(grad(lambda xi: m(xi[None]).square().sum()))(x)):
        torch.testing.assert_close(transform(ours), transform(stock), rtol=1e-10, atol=1e-12)


def test_fused_block_tail_under_grad_equals_torchs_composite():
    stock, ours = pair(track_running_stats=False)
    x, r, w = data((4, 3, 5, 5), 13), data((4, 3, 5, 5), 14), data((4, 3, 5, 5), 15)
    got = grad(lambda x, r: (ours(x, r, relu=True) * w).sum(), argnums=(0, 1))(x, r)
    want = grad(lambda x, r: (torch.relu(stock(x) + r) * w).sum(), argnums=(0, 1))(x, r)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_running_statistics_under_grad_fail_as_torchs():
    """Training with running statistics mutates captured buffers: torch refuses it under
    grad, and so does pybn's module, with torch's error."""
    stock, ours = pair()
    x = data((4, 3, 5, 5), 16)
    for m in (stock, ours):
        with pytest.raises(RuntimeError, match="in-place operation"):
            grad(lambda x: m(x).sum())(x)


def test_forward_mode_and_hessian_of_an_accelerated_model_in_eval_mode():
    """jvp, jacfwd and hessian of an evaluated model (dropout off, batch norm on its running
    statistics) equal stock torch's: only training-mode random modules refuse forward mode."""
    torch.manual_seed(9)
    stock = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Dropout(0.3), torch.nn.Linear(6, 1)).double()
    with torch.no_grad():
        stock[1].running_mean.uniform_(-1, 1)
        stock[1].running_var.uniform_(0.5, 2)
    ours = pybn.torch.accelerate(copy.deepcopy(stock)).eval()
    stock.eval()
    assert isinstance(ours[1], pnn.BatchNorm1d) and isinstance(ours[3], pnn.Dropout)
    x, t = data((5, 3), 17), data((5, 3), 18)
    for transform in (lambda m: torch.func.jvp(m, (x,), (t,))[1], lambda m: torch.func.jacfwd(m)(x),
                      lambda m: torch.func.hessian(lambda xi: m(xi[None]).sum())(x[0])):
        torch.testing.assert_close(transform(ours), transform(stock), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_forward_ad_dual_tensors_through_batch_norm_equal_torchs(training, grad_mode):
    """torch.autograd.forward_ad (dual tensors, no functorch): the accelerated batch norm
    raised "You must implement the jvp function", or under no_grad returned the output
    without its tangent (None). In a dual level batch norm runs torch's own functions, as
    under torch.func, and the random modules refuse forward mode by name."""
    import torch.autograd.forward_ad as fwad

    torch.manual_seed(3)
    stock = torch.nn.BatchNorm1d(4).double().train(training)
    with torch.no_grad():
        stock.running_var.uniform_(0.5, 2)
    ours = pybn.torch.accelerate(copy.deepcopy(stock))
    x, t = data((6, 4), 21), data((6, 4), 22)
    results = []
    for m in (stock, ours):
        with fwad.dual_level(), torch.set_grad_enabled(grad_mode):
            y, tangent = fwad.unpack_dual(m(fwad.make_dual(x, t)))
        results.append((y, tangent, m.running_mean.clone()))
    (y0, t0, r0), (y1, t1, r1) = results
    assert t1 is not None
    torch.testing.assert_close(t1, t0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r1, r0, rtol=1e-10, atol=1e-12)
    drop = pnn.Dropout(0.5)
    with fwad.dual_level(), torch.set_grad_enabled(grad_mode), \
            pytest.raises(NotImplementedError, match="forward-mode AD .*forward_ad"):
        drop(fwad.make_dual(x, t))


def test_gradcheck_with_forward_ad_of_an_eval_batch_norm():
    """gradcheck(check_forward_ad=True) through functional_call reported a forward-mode
    Jacobian "mismatch" (a tangent dropped): now torch's own computation, which passes."""
    m = pybn.torch.accelerate(torch.nn.BatchNorm1d(4).double().eval())
    x = data((5, 4), 23).requires_grad_()
    w, b = data((4,), 24).requires_grad_(), data((4,), 25).requires_grad_()
    f = lambda x, w, b: torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True)
