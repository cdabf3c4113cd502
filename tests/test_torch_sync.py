"""pybn.torch.nn.SyncBatchNorm on CPU tensors under DistributedDataParallel (gloo), with 2
and 3 processes on 127.0.0.1, unequal slices (an empty one among 3).

Each launch runs tests/torch_sync_worker.py once per process; here the slices,
concatenated in rank order, are compared with stock torch (nn.BatchNorm2d/1d, no DDP) on
the whole batch in one process: outputs, input gradients, parameter gradients (DDP
averages them, so times the process count) and every parameter and buffer after each SGD
step. Every launch is bounded in time: a hung or dead process fails the test.
"""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_sync_worker as w
from test_distributed import free_port, launch, report

WORKER = Path(__file__).resolve().parent / "torch_sync_worker.py"
LAUNCH_TIMEOUT = 150.0  # seconds for a whole launch; the process groups time out after 60 s
TOL = dict(rtol=1e-10, atol=1e-12)  # float64


@pytest.fixture(scope="module", params=[2, 3], ids=["gloo-2", "gloo-3"])
def ranks(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"torch-sync-{world}")
    init = f"tcp://127.0.0.1:{free_port()}"
    cmds = [[sys.executable, str(WORKER), "--rank", str(r), "--world", str(world), "--init", init, "--out", str(out)]
            for r in range(world)]
    codes, outputs, _ = launch(cmds, LAUNCH_TIMEOUT)
    assert codes == [0] * world, f"a process failed or timed out\n{report(codes, outputs)}"
    results = []
    for r in range(world):
        with open(out / f"rank{r}.pkl", "rb") as f:
            results.append(pickle.load(f))
    assert [res["rank"] for res in results] == list(range(world))
    return results


def reference(channels_last: bool, world: int) -> list[dict]:
    """Stock torch on the whole batch, one process; DDP averages the gradients of the W
    processes' losses, so the same trajectory takes the learning rate divided by W."""
    model = w.make_model()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def params_of(state=False):
        return dict(model.state_dict()) if state else dict(model.named_parameters())
    return w.run_steps(model, params_of, 1, 0, channels_last, w.LR / world)


@pytest.mark.parametrize("config", list(w.CONFIGS))
def test_ddp_training_equals_one_process_on_the_whole_batch(ranks, config):
    world = len(ranks)
    want = reference(w.CONFIGS[config], world)
    assert ranks[0]["report"] == [("1", "torch.nn.BatchNorm2d", "pybn.torch.nn.SyncBatchNorm"),
                                  ("5", "torch.nn.BatchNorm1d", "pybn.torch.nn.SyncBatchNorm")]
    for step in range(w.STEPS):
        got = [res["configs"][config][step] for res in ranks]
        ref = want[step]
        assert [g["out"].shape[0] for g in got] == w.sizes(world, step)
        torch.testing.assert_close(torch.cat([g["out"] for g in got]), ref["out"], **TOL)
        torch.testing.assert_close(torch.cat([g["dx"] for g in got]), ref["dx"], **TOL)
        if w.CONFIGS[config]:
            assert all(g["dx"].is_contiguous(memory_format=torch.channels_last) for g in got if g["dx"].numel())
        for g in got:
            for name, grad in ref["grads"].items():
                torch.testing.assert_close(g["grads"][name] * world, grad, **TOL, msg=f"step {step} {name}")
            assert g["state"].keys() == ref["state"].keys()
            for name, value in ref["state"].items():
                torch.testing.assert_close(g["state"][name], value, **TOL, msg=f"step {step} {name}")


def test_disagreeing_processes_all_raise_instead_of_waiting(ranks):
    world = len(ranks)
    for res in ranks:
        failing = res["failing"]
        for case in ("channels", "bad-input"):
            assert failing[case].startswith("ValueError: input: the processes of the SyncBatchNorm group cannot "
                                            "normalize together"), failing[case]
        assert f"rank {world - 1}: C=5, num_features=5" in failing["channels"]
        assert "rank 0: C=-1, num_features=3 (unusable input)" in failing["bad-input"]
        # (before: the exchange mixed the two modules' statistics, no error)
        last = world - 1
        counts = ", ".join(f"rank {r}: {0 if r == last else 1}" for r in range(world))
        assert failing["other-module"] == (
            f"OutOfStep: input: the processes' SyncBatchNorm calls are out of step (the module's training forwards so "
            f"far: {counts}); every process must call the same modules in the same order")
        # a backward where another process runs a forward: both raise (before: both waited for the timeout)
        kinds = "; ".join(f"rank {r}: a pybn.torch SyncBatchNorm {'training forward' if r == last else 'backward'}"
                          for r in range(world))
        assert failing["backward-vs-forward"].startswith(
            f"OutOfStep: comm: the processes are out of step, at different collective calls ({kinds}); "), \
            failing["backward-vs-forward"]
        assert failing["other-module-counts"] == [1, 0]
        # (before: each process used its own eps, or weighed the batch by its own count)
        eps = ", ".join(f"rank {r}: {0.001 if r == last else 1e-05:g}" for r in range(world))
        assert failing["eps"].startswith(f"ValueError: eps: differs between the processes of the SyncBatchNorm group "
                                         f"({eps}); "), failing["eps"]
        counts = ", ".join(f"rank {r}: {4 if r == last else 0}" for r in range(world))
        assert failing["num_batches_tracked"].startswith(
            f"ValueError: num_batches_tracked: differs between the processes of the SyncBatchNorm group ({counts}); ")
        for case in ("affine", "track_running_stats"):
            values = ", ".join(f"rank {r}: {r != last}" for r in range(world))
            assert failing[case].startswith(f"ValueError: {case}: differs between the processes of the SyncBatchNorm "
                                            f"group ({values}); "), failing[case]
    full = torch.arange(24.0).reshape(8, 3)
    want = F.batch_norm(full, torch.zeros(3), torch.ones(3), training=True)
    for rank, res in enumerate(ranks):
        torch.testing.assert_close(res["failing"]["after"], want[rank::world])
        torch.testing.assert_close(res["failing"]["after-running-mean"], 0.1 * full.mean(0))


def test_the_block_tail_of_a_synchronized_layer(ranks):
    """SyncBatchNorm(...)(x, residual=r, relu=True) with synchronized statistics: the whole
    batch's relu(bn(x) + r), and its gradients, on every process's rows."""
    world = len(ranks)
    x, r = (torch.from_numpy(np.random.default_rng(seed).standard_normal((8, 3, 4))) for seed in (1, 2))
    x.requires_grad_()
    r.requires_grad_()
    out = torch.relu(F.batch_norm(x, None, None, training=True) + r)
    out.sum().backward()
    for rank, res in enumerate(ranks):
        got = res["residual"]
        torch.testing.assert_close(got["out"], out.detach()[rank::world], **TOL)
        torch.testing.assert_close(got["dr"], r.grad[rank::world], **TOL)
        # each process's loss is its rows' sum: the whole batch's dx
        torch.testing.assert_close(got["dx"], x.grad[rank::world], **TOL)


def test_offsets_per_rank_keeps_each_rank_its_own_stream(ranks):
    """DDP broadcasts buffers from rank 0 before each forward: a rank with more rows than rank
    0 was set back to rank 0's offset (16 counters for 4 x 8 elements) and drew part of its
    last mask again; pybn.torch.offsets_per_rank leaves the offsets out of the broadcast,
    also through fuse_tails."""
    import pybn

    for rank, res in enumerate(ranks):
        used = pybn.counters_used((4 if rank == 0 else 64) * 8)
        assert res["offsets"]["kept"] == res["offsets"]["kept, then fused"] == [used, 2 * used], res["offsets"]
        if rank:  # (broadcast: rank 0's offset, then this rank's draw from there)
            assert used != pybn.counters_used(4 * 8)
            assert res["offsets"]["broadcast"] == [used, pybn.counters_used(4 * 8) + used]
