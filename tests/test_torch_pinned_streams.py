"""pybn.torch's pinned streams (modules built with ``seed=...``) where a user's program meets
them: torch.export, threads sharing a module, activation checkpointing, construction on the
meta device, inference mode. The offset is a non-persistent buffer advanced in place under a
lock (src/pybn/torch/seeded.py)."""
import threading

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import pybn  # noqa: E402
import pybn.torch.nn as pnn  # noqa: E402
from test_torch_compile_modules import SEEDED  # noqa: E402


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_an_exported_pinned_stream_walks_as_in_eager(name):
    """torch.export did not record a rebound offset attribute: every call of the exported
    program drew the masks of the offset at export (and torch warned that the attribute must
    be a buffer). The offset is a non-persistent buffer advanced in place: the exported
    program's calls are the eager module's, and checkpoints keep the stock keys."""
    eager, exported_module = SEEDED[name](), SEEDED[name]()
    x = torch.randn(16, 3, 8, 8)  # (16 samples: DropPath's masks of two calls differ)
    exported = torch.export.export(exported_module, (x,)).module()
    outputs = [exported(x) for _ in range(3)]
    for got in outputs:
        torch.testing.assert_close(got, eager(x), rtol=0, atol=0)
    assert not torch.equal(outputs[0], outputs[1])
    assert int(dict(exported.named_buffers())["_offset_t"]) == eager.offset
    assert exported_module.state_dict().keys() == SEEDED[name]().state_dict().keys()
    assert "_offset_t" not in exported_module.state_dict()


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_threads_sharing_a_pinned_module_never_share_counters(name):
    """Two threads calling one pinned module read the offset, ran the kernel (the GIL
    released) and advanced it after: 61 of 600 Dropout masks were the same and advances were
    lost. The offset is read and advanced under a lock: every call its own counters."""
    module, n_calls = SEEDED[name](), 150
    x = torch.ones(64, 3, 8, 8)
    outputs = [[], []]
    barrier = threading.Barrier(2)

    def work(out):
        barrier.wait()
        for _ in range(n_calls):
            out.append(module(x).numpy().tobytes())

    threads = [threading.Thread(target=work, args=(out,)) for out in outputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    one_thread = SEEDED[name]()
    want = {one_thread(x).numpy().tobytes() for _ in range(2 * n_calls)}
    assert set(outputs[0]) | set(outputs[1]) == want and len(want) == 2 * n_calls
    assert module.offset == one_thread.offset


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpoint_recomputing_a_pinned_stream_is_refused(reentrant):
    """torch.utils.checkpoint recomputed the forward with the offset advanced: another mask,
    weight gradients silently wrong. A pinned stream cannot replay (checkpoint restores only
    torch's generator): the recomputation raises, naming the way out; drawn seeds replay."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), pnn.Dropout(0.5, seed=3), nn.Tanh())
    x = torch.randn(4, 16, requires_grad=True)
    y = checkpoint(model, x, use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match=r"Dropout\(seed=\.\.\.\): called during a backward pass.*seed=None"):
        y.sum().backward()
    model[1].seed = None  # seeds drawn from torch's generator, which checkpoint restores
    reference = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(5)
    checkpoint(model, x, use_reentrant=reentrant).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = nn.Sequential(nn.Linear(16, 16), pnn.Dropout(0.5), nn.Tanh())
    with torch.no_grad():
        for p, r in zip(plain.parameters(), reference):
            p.copy_(r)
    torch.manual_seed(5)
    plain(x).sum().backward()
    for g, p in zip(got, plain.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_a_pinned_module_made_on_the_meta_device_starts_at_its_offset(name):
    """Built under torch.device("meta") the seed and offset tensors were meta: after
    to_empty(device="cpu") a call raised on .item() or returned uninitialized memory (the
    operators' fake implementations ran). They are CPU tensors, and the offset keeps its
    value through to_empty (moved to the meta device it has none, as any buffer)."""
    with torch.device("meta"):
        module = SEEDED[name]()
    module.to_empty(device="cpu")
    assert module.offset == 0
    x = torch.ones(4, 3, 8, 8)
    torch.testing.assert_close(module(x), SEEDED[name]()(x), rtol=0, atol=0)
    offset = module.offset
    module.to(torch.float64).to_empty(device="cpu")  # (fresh tensors for every parameter and buffer)
    assert module.offset == offset


@pytest.mark.parametrize("op", ["dropout", "alpha_dropout", "gaussian_dropout", "gaussian_noise"])
def test_operators_refuse_meta_tensors_beside_real_ones(op):
    """A meta tensor beside a real x sent the call to the fake implementation, which returned
    a real, uninitialized y (and left the running statistics alone). A meta x beside real
    counters (a model built on the meta device, run or exported on meta inputs) is fine."""
    x = torch.ones(4, 3, 2, 2)
    extra = (None,) if op == "dropout" else ()
    meta_philox = torch.zeros(2, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="^philox: a meta tensor .* beside x on cpu"):
        getattr(torch.ops.pybn, op)(x, 0.5, meta_philox, *extra)
    y, _ = getattr(torch.ops.pybn, op)(x.to("meta"), 0.5, torch.zeros(2, dtype=torch.int64), *extra)
    assert y.device.type == "meta"
    meta = torch.ones(3, device="meta")
    with pytest.raises(ValueError, match="^running_mean: a meta tensor"):
        torch.ops.pybn.batch_norm_train(x, None, None, meta, meta, 0.1, 1e-5)
    y, mean, _ = torch.ops.pybn.batch_norm_train(x.to("meta"), None, None, meta, meta, 0.1, 1e-5)
    assert y.device.type == mean.device.type == "meta" and y.shape == x.shape


def test_a_pinned_stream_made_in_inference_mode_advances_outside_it():
    """The offset is advanced in place, which an inference tensor refuses outside inference
    mode: a seed or offset set inside torch.inference_mode() (MC-dropout's) makes a normal
    tensor."""
    with torch.inference_mode():
        drop = pnn.Dropout(0.5, seed=3)
        drop(torch.ones(2, 64))
        drop.offset = 5
    drop(torch.ones(2, 64))
    assert drop.offset == 5 + pybn.counters_used(128)


def test_torch_func_training_steps_advance_the_stream():
    """torch.func.functional_call swaps in the buffers it is given, then restores the module's:
    an advance made by rebinding the buffer under grad was dropped, and every step drew the
    first step's mask. The advance is written into the tensor given (the module's own, here)."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), pnn.Dropout(0.5, seed=3))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = torch.randn(4, 8)

    def loss(p, b, x):
        return functional_call(model, (p, b), (x,)).sum()

    first, second = grad(loss)(params, buffers, x), grad(loss)(params, buffers, x)
    assert model[1].offset == 2 * pybn.counters_used(32)
    assert not torch.equal(first["0.weight"], second["0.weight"])
    assert type(model[1]._offset_t) is torch.Tensor


def test_a_pickled_stream_is_a_copy_for_other_processes():
    """torch.multiprocessing pickles tensors into shared memory: a spawned process's calls
    advanced this process's offset (and drew masks by timing). Pickles carry a copy."""
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # (registers the tensor reductions)

    drop = pnn.Dropout(0.5, seed=1)
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(drop)
    child = pickle.loads(buf.getvalue())
    child(torch.ones(2, 64))
    assert drop.offset == 0 and child.offset == pybn.counters_used(128)


def test_a_pinned_module_in_a_backward_hook_is_no_recomputation():
    """Gradient noise in a tensor hook runs a pinned module during the backward pass, with
    gradients off: not a checkpoint's recomputation (which runs with them on)."""
    drop = pnn.Dropout(0.5, seed=1)
    w = torch.randn(4, 128, requires_grad=True)
    w.register_hook(lambda g: drop(g))
    (w * 2).sum().backward()
    assert drop.offset == pybn.counters_used(512)
    assert torch.equal(w.grad, pnn.Dropout(0.5, seed=1)(torch.full((4, 128), 2.0)))


def test_module_type_keeps_the_offset_an_int64():
    """Module.type(torch.float64) casts every buffer: the [seed, offset] made from a float64
    offset lost bits. The offset comes back an int64 of the same value."""
    drop = pnn.Dropout(0.5, seed=2**63 + 5)
    drop.offset = 2**60 + 3
    drop.type(torch.float64)
    assert drop._offset_t.dtype == torch.int64 and drop.offset == 2**60 + 3
    fresh = pnn.Dropout(0.5, seed=2**63 + 5)
    fresh.offset = 2**60 + 3
    x = torch.ones(2, 64, dtype=torch.float64)
    torch.testing.assert_close(drop(x), fresh(x), rtol=0, atol=0)


def test_every_random_module_is_in_the_torch_lists():
    """The torch tests list pybn.torch.nn's random modules by hand (compiled and exported
    streams here and in test_torch_compile_modules.py, torch.func in test_torch_func.py): a
    new module missing from them would go untested there. Dropout1d and Dropout3d are
    Dropout2d's code with another rank."""
    from test_torch_func import RANDOM

    from pybn.torch.seeded import PinnedSeed

    random_classes = {getattr(pnn, name) for name in pnn.__all__
                      if isinstance(getattr(pnn, name), type) and issubclass(getattr(pnn, name), PinnedSeed)}
    same_code = {pnn.Dropout1d, pnn.Dropout3d}
    for listed in ({type(make()) for make in SEEDED.values()}, {type(make()) for make, _ in RANDOM.values()}):
        assert random_classes - same_code <= listed, random_classes - same_code - listed


def test_the_offset_tensor_is_kept_where_it_can_be_written():
    """What holds the offset tensor (DDP's buffer list, a functional_call dict, an exported
    module) keeps seeing it: mc_dropout's seed and offset are written into it. It is made
    anew where it cannot be written: to_empty() in inference mode (an inference tensor),
    share_memory() (processes never share an offset); and a setter inside torch.func.grad
    writes the tensor the transform captured."""
    from pybn.nn import mc_dropout

    drop = pnn.Dropout(0.5, seed=1)
    held = drop._offset_t
    with mc_dropout(nn.Sequential(drop), seed=3, sample=1):
        assert held is drop._offset_t and drop.offset == pybn.nn.mc_dropout_offset(0, 1)
    assert held is drop._offset_t and drop.offset == 0 and drop.seed == 1
    with torch.device("meta"):
        made = pnn.Dropout(0.5, seed=1)
    with torch.inference_mode():
        made.to_empty(device="cpu")
    assert made.offset == 0
    made(torch.ones(2, 64))
    drop.offset = 9
    drop.share_memory()
    assert not drop._offset_t.is_shared() and drop.offset == 9

    def step(x):
        drop.offset = 5
        return drop(x).sum()

    torch.func.grad(step)(torch.randn(4, 64))
    assert drop.offset == 5 + pybn.counters_used(256)


def test_offsets_per_rank_names_every_pinned_offset():
    import pybn.torch
    from pybn.torch import nn as pnn

    model = torch.nn.Sequential(pnn.Dropout(0.5, seed=1), torch.nn.Sequential(pnn.DropPath(0.1, seed=2)),
                                pnn.Dropout(0.5))  # (the last draws its seeds: no offset)
    model._ddp_params_and_buffers_to_ignore = ["0.weight_of_the_user"]
    assert pybn.torch.offsets_per_rank(model) is model
    assert model._ddp_params_and_buffers_to_ignore == ["0.weight_of_the_user", "0._offset_t", "1.0._offset_t",
                                                       "_orig_mod.0._offset_t", "_orig_mod.1.0._offset_t"]
    with pytest.raises(TypeError, match="^model: expected a torch.nn.Module"):
        pybn.torch.offsets_per_rank([1])
