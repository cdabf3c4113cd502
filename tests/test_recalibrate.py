"""pybn.recalibrate: running statistics equal to the statistics of the union of the batches.

References are float64 NumPy statistics of the concatenated data (np.mean, np.var with
ddof=1), never pybn. torch.optim.swa_utils.update_bn is compared: it averages per-batch
variances, which leaves out the spread of the batch means (the figures are printed).
"""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pybn
import pybn.nn
import recalibrate_worker as rw
from test_distributed import free_port, launch, report

HERE = Path(__file__).resolve().parent
C = 3


def shifted_batches(sizes, seed=0, offset=1e4, dtype=np.float64):
    """Batches (n, C, 4) whose means differ by several standard deviations, on a large
    offset (a cancellation-prone E[x^2] - E[x]^2 would lose the variance)."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(2.0 * i, 0.3 + 0.2 * i, size=(n, C, 4)) + offset).astype(dtype) for i, n in enumerate(sizes)]


def union_stats(batches, axis=1):
    """(mean, unbiased variance) per channel of the concatenation, float64."""
    x = np.concatenate([np.moveaxis(np.asarray(b, np.float64), axis, -1).reshape(-1, C) for b in batches])
    return x.mean(axis=0), x.var(axis=0, ddof=1), len(x)


def normalized(x, eps):
    """Training-mode batch norm of x (N, C, L) with its own statistics, float64 (weight 1, bias 0)."""
    mean = x.mean(axis=(0, 2), keepdims=True)
    var = x.var(axis=(0, 2), keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


# --------------------------------------------------------------------------- pybn.nn

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_single_layer_equals_the_statistics_of_the_concatenation(isa, threads, dtype):
    batches = shifted_batches([7, 1, 33, 2, 128], dtype=dtype)
    layer = pybn.nn.BatchNorm(C, dtype=dtype).eval()
    layer.running_mean[...] = 5.0
    stats = pybn.recalibrate(layer, batches)
    mean, var, n = union_stats(batches)
    assert stats[0].count == n
    np.testing.assert_allclose(stats[0].mean, mean, rtol=1e-15)
    # float64 data: the merge's rounding only (at an offset of 1e4 sigma-relative 1e-12);
    # float32 data: pybn.batch_norm_stats takes float32 deviations (1e-7 relative here)
    rtol = 1e-11 if dtype == "float64" else 1e-6
    np.testing.assert_allclose(stats[0].m2 / (n - 1), var, rtol=rtol)
    np.testing.assert_allclose(layer.running_mean, mean.astype(dtype), rtol=1e-15)
    np.testing.assert_allclose(layer.running_var, var.astype(dtype), rtol=rtol)
    assert layer.num_batches_tracked == len(batches)
    assert not layer.training   # the mode is restored
    assert "forward" not in vars(layer)


def test_a_chain_of_layers_sees_the_upstream_batch_normalization():
    """Two layers with a linear map between: the second one's statistics are those of the
    values it sees with the first normalizing each batch by its own statistics (as in
    training, and as update_bn runs the model)."""
    eps = 1e-5
    batches = shifted_batches([6, 11, 40], seed=3, offset=10.0)
    weight = np.random.default_rng(4).normal(size=(C, C))
    bn1 = pybn.nn.BatchNorm(C, dtype="float64", eps=eps)
    bn2 = pybn.nn.BatchNorm(C, dtype="float64", eps=eps)
    drop = pybn.nn.Dropout(0.5, seed=1).eval()   # not batch norm: keeps its (evaluation) mode

    def forward(x):
        return bn2(np.einsum("dc,ncl->ndl", weight, drop(bn1(x))))

    pybn.recalibrate([bn1, drop, bn2], batches, forward=forward)
    second = [np.einsum("dc,ncl->ndl", weight, normalized(b, eps)) for b in batches]
    for layer, seen in ((bn1, batches), (bn2, second)):
        mean, var, _ = union_stats(seen)
        np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(layer.running_var, var, rtol=1e-12)
    assert not drop.training and drop.offset == 0


def test_a_layer_called_as_a_block_tail_is_recalibrated_from_its_input():
    """A model calling bn(x, residual, relu=True): recalibration runs that call, and the
    statistics are x's alone (the residual is added after the normalization)."""
    batches = shifted_batches([6, 11, 40], seed=5, offset=3.0)
    layer = pybn.nn.BatchNorm(C, dtype="float64")

    def forward(x):
        return layer(x, np.ones_like(x), relu=True)

    pybn.recalibrate(layer, batches, forward=forward)
    mean, var, _ = union_stats(batches)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layer.running_var, var, rtol=1e-12)


def test_a_layer_listed_twice_counts_each_value_once():
    layer = pybn.nn.BatchNorm(C, dtype="float64")
    batches = shifted_batches([4, 9])
    stats = pybn.recalibrate([layer, layer], batches, forward=layer)
    mean, var, n = union_stats(batches)
    assert len(stats) == 1 and stats[0].count == n and layer.num_batches_tracked == 2
    np.testing.assert_allclose(layer.running_var, var, rtol=1e-11)


def test_a_failed_pass_changes_nothing():
    layer = pybn.nn.BatchNorm(C, dtype="float64").eval()
    layer.running_mean[...] = [1.0, 2.0, 3.0]
    before = layer.state_dict()
    batches = shifted_batches([5, 5])

    def forward(x):
        if forward.calls == 1:
            raise KeyError("the data loader broke")
        forward.calls += 1
        return layer(x)
    forward.calls = 0

    with pytest.raises(KeyError, match="data loader"):
        pybn.recalibrate([layer], batches, forward=forward)
    for key, value in before.items():
        np.testing.assert_array_equal(layer.state_dict()[key], value)
    assert not layer.training and "forward" not in vars(layer)


@pytest.mark.parametrize("fails", [False, True])
def test_a_forward_the_user_set_on_the_layer_is_kept(fails):
    """A wrapper assigned to layer.forward (logging, a hook) ran during the pass and was gone
    after it: recalibration removed the instance's forward instead of putting it back."""
    layer = pybn.nn.BatchNorm(C, dtype="float64")
    seen = []
    inner = layer.forward

    def logged(x, *args, **kwargs):
        seen.append(x.shape)
        if fails and len(seen) == 2:
            raise KeyError("the data loader broke")
        return inner(x, *args, **kwargs)
    layer.forward = logged
    batches = shifted_batches([4, 6, 5])
    if fails:
        with pytest.raises(KeyError):
            pybn.recalibrate(layer, batches)
    else:
        pybn.recalibrate(layer, batches)
        mean, var, n = union_stats(batches)
        np.testing.assert_allclose(layer.running_var, var, rtol=1e-11)
    assert vars(layer)["forward"] is logged
    calls = len(seen)
    layer(batches[0])
    assert len(seen) == calls + 1


def test_too_few_values_is_a_value_error_and_changes_nothing():
    layer = pybn.nn.BatchNorm(C, dtype="float64")
    before = layer.state_dict()
    with pytest.raises(ValueError, match="^batches"):
        pybn.recalibrate(layer, [])
    for key, value in before.items():
        np.testing.assert_array_equal(layer.state_dict()[key], value)


# --------------------------------------------------------------------------- torch

def torch_model(bn):
    return torch.nn.Sequential(torch.nn.Conv1d(C, C, 1, dtype=torch.float64), bn,
                               torch.nn.Dropout(0.5)).eval()


def conv_outputs(model, batches):
    with torch.no_grad():
        return [model[0](torch.from_numpy(b)).numpy() for b in batches]


@pytest.mark.parametrize("kind", ["torch", "pybn.torch"])
def test_torch_model_equals_the_concatenation_and_update_bn_does_not(kind, capsys):
    import pybn.torch.nn as pnn

    torch.manual_seed(0)
    make = torch.nn.BatchNorm1d if kind == "torch" else pnn.BatchNorm1d
    model = torch_model(make(C, dtype=torch.float64))
    batches = shifted_batches([8, 3, 50, 16], seed=5, offset=100.0)
    tensors = [torch.from_numpy(b) for b in batches]
    swa = torch_model(make(C, dtype=torch.float64))
    swa.load_state_dict(model.state_dict())

    stats = pybn.recalibrate(model, tensors)
    mean, var, n = union_stats(conv_outputs(model, batches))
    bn = model[1]
    np.testing.assert_allclose(bn.running_mean.numpy(), mean, rtol=1e-13)
    np.testing.assert_allclose(bn.running_var.numpy(), var, rtol=1e-12)
    assert int(bn.num_batches_tracked) == len(batches) and stats[0].count == n
    assert not model.training and not model[2].training   # every module's mode restored

    torch.optim.swa_utils.update_bn([(t,) for t in tensors], swa)
    seen = conv_outputs(swa, batches)
    per_batch_var = np.mean([union_stats([s])[1] for s in seen], axis=0)   # update_bn: a cumulative average
    np.testing.assert_allclose(swa[1].running_var.numpy(), per_batch_var, rtol=1e-12)
    swa_err_var = np.max(np.abs(swa[1].running_var.numpy() / var - 1))
    swa_err_mean = np.max(np.abs(swa[1].running_mean.numpy() - mean) / np.sqrt(var))
    ours_var = np.max(np.abs(bn.running_var.numpy() / var - 1))
    with capsys.disabled():
        print(f"\n[recalibration {kind}] running_var relative error: recalibrate {ours_var:.1e}, "
              f"update_bn {swa_err_var:.1e}; update_bn's mean error {swa_err_mean:.2f} standard deviations")
    assert swa_err_var > 0.1   # the batches' means differ: averaging per-batch variances misses that


def test_torch_channels_last_conv_model():
    import pybn.torch.nn as pnn

    x = [torch.randn(n, C, 5, 4, dtype=torch.float32).to(memory_format=torch.channels_last) * 3 + 7
         for n in (4, 9, 2)]
    model = torch.nn.Sequential(pnn.BatchNorm2d(C))
    pybn.recalibrate(model, x)
    flat = np.concatenate([t.permute(0, 2, 3, 1).reshape(-1, C).double().numpy() for t in x])
    np.testing.assert_allclose(model[0].running_mean.numpy(), flat.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(model[0].running_var.numpy(), flat.var(axis=0, ddof=1), rtol=1e-6)


class _OneProcess:
    """A communicator adapter of one process whose `fail_at`-th all-gather raises, as a
    transport does when a peer dies."""

    def __init__(self, fail_at):
        self.calls, self.fail_at = 0, fail_at

    def allgather(self, a):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("Connection closed by peer")
        return np.asarray(a, np.float64)[None]


@pytest.mark.parametrize("fail_at", [4, 7], ids=["in the pass", "at its end"])
def test_a_transport_error_during_a_synchronized_pass_leaves_the_state(fail_at):
    """A collective failing during the pass, or in the exchange that ends it, raises with every
    layer's statistics as they were (before: the end's exchange raised outside the restoring
    block, and the statistics the pass's training forwards wrote stayed)."""
    from pybn.distributed import SyncBatchNorm

    layer = SyncBatchNorm(3, dtype="float64", comm=None)
    layer._comm = _OneProcess(fail_at)  # (per batch: the batch's, the forward's control and statistics)
    batches = [np.random.default_rng(i).standard_normal((4, 3)) + 5 for i in range(2)]
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        pybn.recalibrate(layer, batches)
    assert not layer.running_mean.any() and (layer.running_var == 1).all() and layer.num_batches_tracked == 0


def test_torch_model_without_batch_norm_is_a_value_error():
    with pytest.raises(ValueError, match="^model"):
        pybn.recalibrate(torch.nn.Linear(2, 2), [torch.zeros(3, 2)])


# --------------------------------------------------------------------------- across processes

def test_a_rank_outside_a_synchronized_layers_group_recalibrates_alone(tmp_path):
    """A pybn.torch SyncBatchNorm over a group of rank 0 alone: each rank gets its own
    batches' statistics, as it trains (rank 1, outside the group, failed on an exchange with
    no process: "stack expects a non-empty TensorList")."""
    world = 2
    init = f"tcp://127.0.0.1:{free_port()}"
    cmds = [[sys.executable, str(HERE / "recalibrate_worker.py"), "--rank", str(r), "--world", str(world),
             "--init", init, "--out", str(tmp_path), "--outside"] for r in range(world)]
    codes, outputs, _ = launch(cmds, 180.0)
    assert codes == [0] * world, report(codes, outputs)
    for r in range(world):
        got = pickle.loads((tmp_path / f"outside{r}.pkl").read_bytes())
        assert not isinstance(got, str), got
        own_mean, _, _ = union_stats([b for b in rw.rank_batches(r) if len(b)])
        np.testing.assert_allclose(got, own_mean, rtol=1e-14)


def test_two_gloo_processes_get_the_statistics_of_all_batches_identically(tmp_path):
    world = 2
    init = f"tcp://127.0.0.1:{free_port()}"
    cmds = [[sys.executable, str(HERE / "recalibrate_worker.py"), "--rank", str(r), "--world", str(world),
             "--init", init, "--out", str(tmp_path)] for r in range(world)]
    codes, outputs, _ = launch(cmds, 180.0)
    assert codes == [0] * world, report(codes, outputs)
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    everything = [b for r in range(world) for b in rw.rank_batches(r)]
    mean, var, _ = union_stats(everything)
    batches = sum(len(rw.rank_batches(r)) for r in range(world))
    # num_batches_tracked: a synchronized layer's batches are steps of both ranks (as its
    # training counts them); a plain layer merged by comm= counts every rank's batches
    for key, n_batches in (("sync", len(rw.rank_batches(0))), ("local", batches - 2), ("torch", batches - 2)):
        for res in ranks:
            got_mean, got_var, got_batches = res[key]
            np.testing.assert_allclose(got_mean, mean, rtol=1e-14)
            np.testing.assert_allclose(got_var, var, rtol=1e-11)
            assert got_batches == n_batches, key
        for a, b in zip(ranks[0][key][:2], ranks[1][key][:2]):   # the same bits on every rank
            np.testing.assert_array_equal(a, b)
    # a pass failing on one rank (two layers, each merged over the group): every rank raises,
    # the failed one its own error, nothing changes, and the group still works
    assert ranks[0]["errors"]["failed pass"] == (
        "RuntimeError", "batches: the recalibration failed on another process (see its error)", True)
    assert ranks[1]["errors"]["failed pass"] == ("KeyError", "'the pass failed on rank 1'", True)
    # layers of other channel counts (rank 1's has 4): a ValueError on every rank, not an abort
    for r, res in enumerate(ranks):
        kind, message, unchanged = res["errors"]["channels"]
        assert kind == "ValueError" and unchanged
        assert message.startswith(f"model: the layer BatchNorm({rw.C + r}, ") and message.endswith(
            "has different numbers of channels on the processes (rank 0: 3, rank 1: 4)")
        assert res["all_reduce after"] == 3.0
    # an error of rank 1's own before its pass (no layer, no batches): rank 0 is told, not left waiting
    for kind, own in (("no layer", ("ValueError", "model: has no batch norm layer with running statistics to "
                                                  "recalibrate", True)),
                      ("bad batches", ("TypeError", "batches: must be an iterable of batches, got NoneType", True))):
        assert ranks[0]["errors"][kind] == (
            "RuntimeError", "batches: the recalibration failed on another process (see its error)", True), kind
        assert ranks[1]["errors"][kind] == own, kind
    # a synchronized layer (every forward a collective) and rank 0 with one batch more: the
    # same ValueError on both (before: rank 0's extra exchange met rank 1's agreement, an
    # abort inside gloo, or a wrong "different numbers of layers")
    for kind in ("uneven sync", "uneven torch sync"):
        for res in ranks:
            assert res["errors"][kind] == (
                "ValueError", "batches: the processes passed different numbers of batches; with a synchronized batch "
                "norm (whose every training forward is a collective call) every process must pass the same number",
                True), kind
    # rank 1's pass failing before the synchronized layer while rank 0 waits in it
    assert ranks[0]["errors"]["sync pass fails"] == (
        "RuntimeError", "batches: the recalibration failed on another process (see its error)", True)
    assert ranks[1]["errors"]["sync pass fails"] == ("KeyError", "'the pass failed on rank 1'", True)
