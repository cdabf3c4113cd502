"""pybn.torch's direct calls (pybn.torch._eager): in plain eager mode the modules call the
operators' implementations without the dispatcher; the results must be the dispatcher's bit
for bit, and anything that watches operator calls must still see the operators."""
import copy

import pytest
import torch

import pybn.torch.nn as pnn
from pybn.torch import _eager, dropblock, noise, ops, residual

HALF = [torch.float16] + ([torch.bfloat16] if ops.pybn_takes(torch.zeros(1, dtype=torch.bfloat16)) else [])
DTYPES = [torch.float32, torch.float64, *HALF]
LAYOUTS = ["contiguous", "channels_last"]


def operator_events(fn):
    """The names of pybn's operators the dispatcher ran during fn()."""
    with torch.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("pybn::")}


@pytest.fixture
def through_dispatcher(monkeypatch):
    """Within the test, every call takes torch.ops.pybn.* (what direct calls must equal)."""
    def use():
        for module in (ops, residual, noise, dropblock):
            monkeypatch.setattr(module, "direct_call", lambda *tensors: False)
    return use


def test_the_dispatcher_fixture_reaches_every_operator(through_dispatcher):
    """The comparisons below mean something only if the fixture sends each module's calls
    through the operators."""
    x = make_input((4, 6, 5, 7), torch.float32, "contiguous", 14)
    r = make_input((4, 6, 5, 7), torch.float32, "contiguous", 15)
    bn, drop = pnn.BatchNorm2d(6), pnn.Dropout(0.3)
    frozen = pnn.BatchNorm2d(6).eval()
    runs = {"train": lambda: bn(x).sum().backward(), "fused": lambda: bn(x, r, relu=True).sum().backward(),
            "dropout": lambda: drop(x).sum().backward(), "frozen": lambda: frozen(x).sum().backward()}
    assert all(operator_events(run) == set() for run in runs.values())
    through_dispatcher()
    assert operator_events(runs["train"]) == {"pybn::batch_norm_train", "pybn::batch_norm_backward"}
    assert operator_events(runs["fused"]) == {"pybn::batch_norm_add_relu", "pybn::batch_norm_add_relu_backward"}
    assert operator_events(runs["dropout"]) == {"pybn::dropout"}
    assert operator_events(runs["frozen"]) == {"pybn::batch_norm_infer", "pybn::batch_norm_backward"}
    bn.eval()
    with torch.no_grad():
        assert operator_events(lambda: bn(x)) == {"pybn::batch_norm_infer"}


def test_jit_trace_records_the_operators():
    """torch.jit.trace sees only dispatched calls: a direct call would leave the traced
    graph with an uninitialized output and no batch norm."""
    x = torch.randn(4, 6, 5, 7)
    model = torch.nn.Sequential(torch.nn.Conv2d(6, 6, 1), pnn.BatchNorm2d(6)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        traced = torch.jit.trace(model, x)
        assert "pybn::batch_norm_infer" in str(traced.inlined_graph)
        assert torch.equal(traced(x), model(x))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("make", [lambda: pnn.Dropout2d(0.3), lambda: pnn.Dropout1d(0.3), lambda: pnn.DropPath(0.3),
                                  lambda: pnn.StochasticDepth(0.3, "batch")],
                         ids=["Dropout2d", "Dropout1d", "DropPath", "StochasticDepth batch"])
def test_jit_trace_of_masks_shaped_from_the_input(make):
    """A mask shape read from the input (channel-wise dropout, stochastic depth) is traced as
    the example's sizes (torch warns that the graph keeps them); the traced training call
    draws its seed from torch's generator as the module does."""
    module = make()
    x = torch.randn(2, 4, 3, 3)[..., 0] if isinstance(module, pnn.Dropout1d) else torch.randn(2, 4, 3, 3)
    traced = torch.jit.trace(module, x, check_trace=False)
    assert "pybn::dropout" in str(traced.inlined_graph)
    torch.manual_seed(7)
    want = module(x)
    torch.manual_seed(7)
    assert torch.equal(traced(x), want)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_running_statistics_versions(training, fused, through_dispatcher):
    """The dispatcher advances the versions of the running statistics an operator declares
    mutated (the training forward's, the fused residual's in both modes); the direct eager
    calls leave them, as torch's own BatchNorm1d does (a backward that saved them, torch's
    batch norm's, still runs: tests/test_torch_nn.py)."""
    x, r = torch.randn(8, 4, 5), torch.randn(8, 4, 5)

    def advance(cls=pnn.BatchNorm1d):
        m = cls(4).train(training)
        before = m.running_mean._version, m.running_var._version
        m(x, r, relu=True) if fused else m(x)
        return m.running_mean._version - before[0], m.running_var._version - before[1]

    assert advance() == (0, 0)
    if not fused:  # (torch's module takes no residual)
        assert advance(torch.nn.BatchNorm1d) == (0, 0)
    through_dispatcher()
    # (eval-mode inference reads them and declares nothing; the fused operator declares them
    # mutated in both modes)
    assert (min(advance()) > 0) == (training or fused)


def make_input(shape, dtype, layout, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def bn_step(module, x, dy):
    x.grad = None
    module.zero_grad()
    y = module(x)
    y.backward(dy)
    grads = [x.grad] + ([module.weight.grad, module.bias.grad] if module.affine else [])
    return [y.detach(), *grads, module.running_mean.clone(), module.running_var.clone()]


INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride()
        as_int = INT_OF[g.element_size()]
        assert torch.equal(g.contiguous().view(as_int), w.contiguous().view(as_int))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_direct_equals_the_dispatcher(dtype, layout, affine, through_dispatcher):
    shape = (6, 5, 7, 9)
    x, dy = make_input(shape, dtype, layout, 1), make_input(shape, dtype, layout, 2).detach()
    params = torch.float64 if dtype == torch.float64 else torch.float32  # (16-bit x: float32 parameters)
    module = pnn.BatchNorm2d(5, affine=affine, dtype=params)
    if affine:
        with torch.no_grad():
            module.weight.uniform_(0.5, 2.0)
            module.bias.uniform_(-1.0, 1.0)
    ref = pnn.BatchNorm2d(5, affine=affine, dtype=params)
    ref.load_state_dict(module.state_dict())
    steps = [bn_step(module, x, dy) for _ in range(2)]
    module.eval()
    steps.append(bn_step(module, x, dy))  # frozen statistics, gradients through them
    with torch.no_grad():
        steps.append([module(x)])
    through_dispatcher()
    want = [bn_step(ref, x, dy) for _ in range(2)]
    ref.eval()
    want.append(bn_step(ref, x, dy))
    with torch.no_grad():
        want.append([ref(x)])
    for got, expected in zip(steps, want):
        same_bits(got, expected)


def test_batch_norm_direct_call_skips_the_dispatcher_and_modes_do_not():
    x = make_input((8, 4, 5, 5), torch.float32, "contiguous", 3)
    module = pnn.BatchNorm2d(4)

    def step():
        module(x).sum().backward()

    assert operator_events(step) == set()
    with torch.device("cpu"):  # a function mode: the operators, as fold's recorder needs
        assert operator_events(step) == {"pybn::batch_norm_train", "pybn::batch_norm_backward"}
    module.eval()
    with torch.no_grad():
        assert operator_events(lambda: module(x)) == set()
    # a gradient through eval-mode batch norm (frozen statistics) too
    assert operator_events(lambda: module(x).sum().backward()) == set()
    with torch.device("cpu"):
        assert operator_events(lambda: module(x).sum().backward()) == {"pybn::batch_norm_infer",
                                                                       "pybn::batch_norm_backward"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_frozen_batch_norm_direct_gradients_check(layout):
    """Eval-mode batch norm with gradients (frozen statistics, as in fine-tuning) is a direct
    call; its gradients agree with finite differences in float64, and a second derivative
    (create_graph=True) takes torch's formula."""
    x = make_input((3, 2, 2, 3), torch.float64, layout, 16)
    w = torch.tensor([0.7, -1.3], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.2, 0.5], dtype=torch.float64, requires_grad=True)
    rm, rv = torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)

    def frozen(x, w, b):
        return pnn.batch_norm(x, rm, rv, w, b, training=False)

    assert operator_events(lambda: frozen(x, w, b).sum().backward()) == set()
    assert torch.autograd.gradcheck(frozen, (x, w, b))
    assert torch.autograd.gradgradcheck(frozen, (x, w, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("module", ["Dropout", "Dropout2d"])
def test_dropout_direct_equals_the_dispatcher(dtype, layout, module, through_dispatcher):
    x = make_input((4, 6, 9, 11), dtype, layout, 5)
    dy = make_input((4, 6, 9, 11), dtype, layout, 6).detach()

    def run():
        torch.manual_seed(123)  # the seed each call draws
        m = getattr(pnn, module)(0.3)
        y = m(x)
        (dx,) = torch.autograd.grad(y, x, dy)
        return [y.detach(), dx]

    got = run()
    assert operator_events(run) == set()
    through_dispatcher()
    same_bits(got, run())


# the modules whose backward regenerates their draws (pybn.torch._regenerated), with the
# operators the dispatcher runs for a forward and backward
REGENERATED = {
    "AlphaDropout": (lambda: pnn.AlphaDropout(0.3), {"pybn::alpha_dropout", "pybn::alpha_dropout_backward"}),
    "GaussianDropout": (lambda: pnn.GaussianDropout(0.3), {"pybn::gaussian_dropout"}),
    "GaussianNoise": (lambda: pnn.GaussianNoise(0.5), {"pybn::gaussian_noise"}),
    "DropBlock2d": (lambda: pnn.DropBlock2d(0.2, 3), {"pybn::drop_block"}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("module", sorted(REGENERATED))
@pytest.mark.parametrize("seeded", [False, True])
def test_regenerated_direct_equals_the_dispatcher(dtype, layout, module, seeded, through_dispatcher):
    """Alpha dropout, the Gaussian noises and DropBlock skip the dispatcher in eager mode
    (pybn.torch._regenerated) with the operators' values and gradients, bit for bit, with
    a seed drawn from torch's generator or a pinned one (two calls: the offset advances)."""
    x = make_input((4, 6, 9, 11), dtype, layout, 17)
    dy = make_input((4, 6, 9, 11), dtype, layout, 18).detach()
    make, operators = REGENERATED[module]

    def run():
        torch.manual_seed(21)  # the seed each unseeded call draws
        m = make()
        if seeded:
            m.seed = 2**64 - 5
        out = []
        for _ in range(2):
            y = m(x)
            (dx,) = torch.autograd.grad(y, x, dy)
            out += [y.detach(), dx]
        return out

    got = run()
    assert operator_events(run) == set()
    through_dispatcher()
    assert operator_events(run) == operators
    same_bits(got, run())


@pytest.mark.parametrize("module", sorted(REGENERATED))
def test_regenerated_gradients_check_and_double_backward_takes_the_operators(module, through_dispatcher):
    x = make_input((4, 3, 5, 6), torch.float64, "contiguous", 19)
    dy = make_input((4, 3, 5, 6), torch.float64, "contiguous", 20)
    m = REGENERATED[module][0]()
    m.seed = 77

    def pinned(x):
        m.offset = 0  # (gradcheck calls it again and again: the same draws each time)
        return m(x)

    assert torch.autograd.gradcheck(pinned, (x,))
    second_order_equals_the_dispatchers(pinned, x, dy, through_dispatcher)


@pytest.mark.parametrize("module", sorted(REGENERATED))
def test_regenerated_direct_equals_the_dispatcher_without_autograd(module, through_dispatcher):
    x = torch.randn(4, 6, 9, 11, generator=torch.Generator().manual_seed(23))

    def run():
        torch.manual_seed(24)
        m = REGENERATED[module][0]()
        with torch.inference_mode():
            a = m(x)
        with torch.no_grad():
            b = m(x)
        return [a.clone(), b]

    got = run()
    through_dispatcher()
    same_bits(got, run())


def test_alpha_dropout_in_place_and_p_one_and_dropblock_dimensions_as_the_dispatcher(through_dispatcher):
    def run():
        torch.manual_seed(25)
        x = torch.randn(4, 6, 9, 11, generator=torch.Generator().manual_seed(26))
        y = noise.alpha_dropout(x, 0.3, True, True)
        ones = pnn.AlphaDropout(1.0)(torch.ones(3, 5, requires_grad=True))
        errors = []
        for shape in [(6, 9, 11), (2, 3, 6, 9, 11)]:
            with pytest.raises(ValueError) as e:
                pnn.DropBlock2d(0.2, 3)(torch.randn(shape))
            errors.append(str(e.value))
        return [y is x, x.clone(), ones.detach()], errors

    (same, *got), errors = run()
    assert same
    through_dispatcher()
    (same, *want), want_errors = run()
    same_bits(got, want)
    assert errors == want_errors and "4-d" in errors[0]


# every module a transform may meet, by name (a 4-d input of 2 channels)
TRANSFORMED = {"BatchNorm2d (eval)": lambda: pnn.BatchNorm2d(2).eval(), "Dropout": lambda: pnn.Dropout(0.3),
               "Dropout2d": lambda: pnn.Dropout2d(0.3), "DropPath": lambda: pnn.DropPath(0.3),
               **{name: make for name, (make, _) in REGENERATED.items()}}


@pytest.mark.parametrize("module", ["BatchNorm2d (eval)", "Dropout", *sorted(REGENERATED)])
def test_plain_tensors_inside_functorch_transforms_take_the_operators(module):
    """Under vmap or grad even a plain tensor (the batch of an ensemble's functional_call)
    takes the operators (batch norm: torch's function): a direct call's autograd Function
    has no functorch rules."""
    torch.manual_seed(22)
    layer = TRANSFORMED[module]()
    model = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(50, 2))
    members = [model]
    for _ in range(2):
        members.append(copy.deepcopy(model))
        with torch.no_grad():
            members[-1][2].weight.uniform_(-1.0, 1.0)
    params, buffers = torch.func.stack_module_state(members)
    x = torch.randn(4, 2, 5, 5)
    y = torch.vmap(lambda p, b: torch.func.functional_call(model, (p, b), (x,)), randomness="different")(params,
                                                                                                     buffers)
    assert y.shape == (3, 4, 2) and torch.isfinite(y).all()
    if module == "BatchNorm2d (eval)":  # deterministic: each member's own call
        for i, member in enumerate(members):
            torch.testing.assert_close(y[i], member(x))
        z = torch.randn(4, 2, 5, 5)
        (dz,) = torch.func.grad(lambda z: (layer(x) * z).sum(), argnums=(0,))(z)
        torch.testing.assert_close(dz, layer(x))


@pytest.mark.parametrize("module", sorted(set(TRANSFORMED) - {"BatchNorm2d (eval)"}))
def test_forward_mode_transforms_are_refused_not_given_zero_tangents(module):
    """Through pybn's operators torch.func.jvp would carry a zero tangent on without an error
    (they have no forward-mode rule): it is refused, naming forward mode. (Batch norm runs
    torch's function under transforms, forward mode included: test_torch_func.py.)"""
    layer = TRANSFORMED[module]()
    x, t = torch.randn(4, 2, 5, 5), torch.randn(4, 2, 5, 5)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(layer, (x,), (t,))
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.vmap(lambda x, t: torch.func.jvp(layer, (x,), (t,))[1])(x[None], t[None])


def second_order_equals_the_dispatchers(forward, x, dy, through_dispatcher):
    """dx taken with create_graph=True and its derivative in dy: not zero, and the bits the
    operators give."""
    def second_order():
        (dx,) = torch.autograd.grad(forward(x), x, dy, create_graph=True)
        (ddy,) = torch.autograd.grad(dx, dy, torch.ones_like(dx))
        return [dx.detach(), ddy]

    got = second_order()
    assert torch.count_nonzero(got[1]) > 0
    through_dispatcher()
    same_bits(got, second_order())


def test_dropout_double_backward_takes_the_differentiable_operator(through_dispatcher):
    x = make_input((64, 33), torch.float64, "contiguous", 7)
    dy = make_input((64, 33), torch.float64, "contiguous", 8)

    def forward(x):
        torch.manual_seed(9)
        return pnn.Dropout(0.4)(x)

    second_order_equals_the_dispatchers(forward, x, dy, through_dispatcher)


def test_direct_call_refuses_what_needs_the_dispatcher():
    x = torch.randn(3, 4)
    assert _eager.direct_call(x, None, torch.nn.Parameter(torch.ones(4)))
    with torch.device("cpu"):
        assert not _eager.direct_call(x)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not _eager.direct_call(mode.from_tensor(x))
    assert not _eager.direct_call(x.to("meta"))

    seen = []

    def f(t):
        seen.append(_eager.direct_call(t))
        return t.sum()

    torch.func.grad(f)(x)
    assert seen == [False]

    @torch.compile(backend="eager", fullgraph=True)
    def compiled(t):
        return t + 1 if _eager.direct_call(t) else t - 1

    assert torch.equal(compiled(x), x - 1)


@pytest.mark.parametrize("module", ["BatchNorm1d", "Dropout"])
def test_direct_calls_under_inference_mode_and_no_grad(module, through_dispatcher):
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(10))

    def run(context):
        torch.manual_seed(5)
        m = getattr(pnn, module)(8) if module == "BatchNorm1d" else pnn.Dropout(0.25)
        with context():
            y = m(x)
        return [y.clone()] + ([m.running_mean.clone(), m.running_var.clone()] if module == "BatchNorm1d" else [])

    got = [run(torch.inference_mode), run(torch.no_grad)]
    through_dispatcher()
    for g, w in zip(got, [run(torch.inference_mode), run(torch.no_grad)]):
        same_bits(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_fused_residual_direct_equals_the_dispatcher(dtype, layout, relu, training, through_dispatcher):
    if dtype == torch.bfloat16 and dtype not in HALF:
        pytest.skip("bfloat16 tensors need ml_dtypes")
    shape = (4, 6, 5, 7)
    x, r = make_input(shape, dtype, layout, 11), make_input(shape, dtype, layout, 12)
    dy = make_input(shape, dtype, layout, 13).detach()
    params = torch.float64 if dtype == torch.float64 else torch.float32

    def run():
        torch.manual_seed(0)
        m = pnn.BatchNorm2d(6, dtype=params)
        with torch.no_grad():
            m.weight.uniform_(0.5, 2.0)
            m.bias.uniform_(-1.0, 1.0)
            m.running_var.uniform_(0.5, 2.0)
        m.train(training)
        y = m(x, r, relu=relu)
        grads = torch.autograd.grad(y, (x, r, m.weight, m.bias), dy)
        return [y.detach(), *grads, m.running_mean.clone(), m.running_var.clone()]

    got = run()
    assert operator_events(run) == set()
    through_dispatcher()
    same_bits(got, run())
