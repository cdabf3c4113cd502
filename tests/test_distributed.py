"""pybn.distributed.SyncBatchNorm across processes: torch.distributed (gloo) with 2 and 3
workers, and MPI (mpi4py under mpirun) with 3, on localhost.

Each launch runs tests/distributed_worker.py once per rank: several training steps of
every configuration in distributed_worker.CONFIGS with unequal slices (an empty one among
the 3 workers), then an evaluation forward. Here the slices, concatenated in rank order,
are compared with single-process ``pybn.nn.BatchNorm`` and with torch's BatchNorm on the
whole batch (what torch's SyncBatchNorm computes). Network use stays on 127.0.0.1 and every
launch is bounded in time: a dead or hung worker fails the test.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import distributed_worker as dw
import pybn
import pybn.nn
from pybn.distributed import SyncBatchNorm

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
EXAMPLE = HERE.parent / "examples" / "ddp_mlp.py"
LAUNCH_TIMEOUT = 180.0  # seconds for a whole launch; the process groups time out after 60 s
ENGINES = ["gloo-2", "gloo-3", "mpi-3"]
LOOPBACK_ENV = {
    "GLOO_SOCKET_IFNAME": "lo",  # gloo's connections between the workers: loopback only
    "OMP_NUM_THREADS": "1",  # 3 workers on 2 cores: no oversubscription
    "OMPI_MCA_btl": "self,vader",  # Open MPI: shared memory between local ranks, no TCP
    "OMPI_MCA_oob_tcp_if_include": "lo",  # Open MPI's runtime: loopback only
    "OMPI_ALLOW_RUN_AS_ROOT": "1",  # CI runs as root
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
}


# --------------------------------------------------------------------------- launching

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmds: list[list[str]], timeout: float, *, done=None) -> tuple[list, list[str], float]:
    """Run the commands at once, each in its own session; return (exit codes, outputs, seconds).

    Once ``done(codes)`` holds (default: one has exited non-zero; None is still running),
    or past `timeout`, the others are killed with their process groups (exit code None),
    so nothing outlives the test."""
    if done is None:
        def done(codes):
            return any(c not in (None, 0) for c in codes)
    env = {**os.environ, **LOOPBACK_ENV}
    logs, procs = [], []
    start = time.monotonic()
    try:
        for cmd in cmds:
            log = tempfile.TemporaryFile("w+")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            if time.monotonic() - start > timeout or done(codes):
                break
            time.sleep(0.05)
    finally:
        codes = [p.poll() for p in procs]
        for p, code in zip(procs, codes):
            if code is None:
                with contextlib.suppress(ProcessLookupError):  # exited just now
                    os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
    elapsed = time.monotonic() - start
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return codes, outputs, elapsed


def report(codes, outputs) -> str:
    return "\n".join(f"--- worker {i}: exit code {c}\n{out[-4000:]}" for i, (c, out) in enumerate(zip(codes, outputs)))


def mpi_available() -> str | None:
    """Why the MPI test cannot run here (None: it can)."""
    if shutil.which("mpirun") is None:
        return "no MPI runtime: mpirun not found (apt-get install openmpi-bin)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install mpi4py)"
    return None


@pytest.fixture(scope="module", params=ENGINES)
def run(request, tmp_path_factory):
    """Per-rank results of one launch of every configuration."""
    engine, world = request.param.split("-")
    world = int(world)
    out = tmp_path_factory.mktemp(request.param)
    if engine == "gloo":
        init = f"tcp://127.0.0.1:{free_port()}"
        cmds = [[sys.executable, str(WORKER), "torch", "--rank", str(r), "--world", str(world), "--init", init,
                 "--out", str(out)] for r in range(world)]
    else:
        reason = mpi_available()
        if reason:
            pytest.skip(reason)
        version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30).stdout
        extra = ["--oversubscribe"] if "Open MPI" in version else []  # 3 ranks on 2 cores; MPICH allows it anyway
        cmds = [["mpirun", "-n", str(world), *extra, sys.executable, str(WORKER), "mpi", "--out", str(out)]]
    codes, outputs, _ = launch(cmds, LAUNCH_TIMEOUT)
    assert codes == [0] * len(cmds), f"{request.param}: a launch failed or timed out\n{report(codes, outputs)}"
    ranks = []
    for r in range(world):
        with open(out / f"rank{r}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    assert [res["rank"] for res in ranks] == list(range(world))
    assert all(res["world"] == world for res in ranks)
    if engine == "mpi":
        for res in ranks:  # checked in the MPI workers
            assert res["comm_null"].startswith("ValueError: comm: MPI.COMM_NULL"), res["comm_null"]
    return ranks


# --------------------------------------------------------------------------- references

def reference_pybn(name: str) -> dict:
    """Single-process pybn.nn.BatchNorm on the whole batch, the same steps."""
    cfg = dw.CONFIGS[name]
    layer = pybn.nn.BatchNorm(cfg["num_features"], **dw.layer_kwargs(cfg))
    return dw.train(layer, name, world=1, rank=0)


def reference_torch(name: str) -> dict:
    """torch.nn.BatchNorm{1,2,3}d on the whole batch with autograd, the same steps."""
    cfg = dw.CONFIGS[name]
    kw = dw.layer_kwargs(cfg)
    ndim = len(cfg["sample"]) + 1
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[ndim]
    m = cls(cfg["num_features"], eps=kw["eps"], momentum=kw["momentum"], affine=kw.get("affine", True),
            track_running_stats=kw.get("track_running_stats", True), dtype=getattr(torch, kw["dtype"]))
    axis = cfg["axis"]

    def fwd_bwd(x, dy):
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, axis, 1))).requires_grad_()
        y = m(xt)
        y.backward(torch.from_numpy(np.ascontiguousarray(np.moveaxis(dy, axis, 1))))
        return np.moveaxis(y.detach().numpy(), 1, axis), np.moveaxis(xt.grad.numpy(), 1, axis)

    def copy(t):
        return None if t is None else t.detach().numpy().copy()

    out = {k: [] for k in ("y", "dx", "grad_weight", "grad_bias", "running_mean", "running_var",
                           "num_batches_tracked")}
    for step in range(dw.STEPS):
        x, dy = dw.batch(name, step, sum(dw.sizes(1, step)))
        y, dx = fwd_bwd(x, dy)
        out["y"].append(y)
        out["dx"].append(dx)
        out["grad_weight"].append(copy(m.weight.grad) if m.affine else None)
        out["grad_bias"].append(copy(m.bias.grad) if m.affine else None)
        out["running_mean"].append(copy(m.running_mean))
        out["running_var"].append(copy(m.running_var))
        out["num_batches_tracked"].append(None if m.num_batches_tracked is None else int(m.num_batches_tracked))
        if m.affine:
            with torch.no_grad():
                m.weight -= dw.LR * m.weight.grad
                m.bias -= dw.LR * m.bias.grad
                m.weight.grad = m.bias.grad = None
    out["weight"] = copy(m.weight)
    out["bias"] = copy(m.bias)
    if m.track_running_stats:
        m.eval()
        x, dy = dw.batch(name, -1, sum(dw.EVAL_SIZES[1]))
        out["eval_y"], out["eval_dx"] = fwd_bwd(x, dy)
    return out


PER_SAMPLE = ("y", "dx")  # sliced over the workers: concatenated in rank order
SHARED = ("grad_weight", "grad_bias", "running_mean", "running_var")  # the same on every worker


def assert_close(got, want, tol, what):
    if want is None:
        assert got is None, what
        return
    assert got is not None, what
    assert (got.shape, got.dtype) == (want.shape, want.dtype), \
        f"{what}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=what)


def compare(ranks: list[dict], name: str, want: dict, tol: float) -> None:
    got = [r["configs"][name] for r in ranks]
    for step in range(dw.STEPS):
        for key in PER_SAMPLE:
            parts = [g[key][step] for g in got]
            assert [len(p) for p in parts] == dw.sizes(len(ranks), step)
            assert_close(np.concatenate(parts), want[key][step], tol, f"{key}, step {step}")
        for key in SHARED:
            for g in got[1:]:  # identical on every worker, bit for bit
                if got[0][key][step] is None:
                    assert g[key][step] is None
                else:
                    np.testing.assert_array_equal(g[key][step], got[0][key][step], err_msg=f"{key}, step {step}")
            assert_close(got[0][key][step], want[key][step], tol, f"{key}, step {step}")
        assert [g["num_batches_tracked"][step] for g in got] == [want["num_batches_tracked"][step]] * len(got)
    for key in ("weight", "bias"):
        for g in got:
            assert_close(g[key], want[key], tol, f"{key} after the SGD steps")
    if "eval_y" in want:
        for key in ("eval_y", "eval_dx"):
            assert_close(np.concatenate([g[key] for g in got]), want[key], tol, key)
    else:
        assert all("eval_y" not in g for g in got)


# float32: both sides round the same float64 statistics; torch accumulates differently
TOL_PYBN = {"float64": 1e-12, "float32": 2e-6}
TOL_TORCH = {"float64": 1e-12, "float32": 1e-5}


def tolerance(name: str, table: dict) -> float:
    # the rounding error of the statistics (so of x - mean) is relative to the data's
    # offset, not to its spread (about 1): scale by the offset where it is large
    cfg = dw.CONFIGS[name]
    return table[cfg["dtype"]] * max(1.0, abs(cfg["offset"]))


@pytest.mark.parametrize("name", list(dw.CONFIGS))
def test_equals_single_process_pybn_on_the_whole_batch(run, name):
    compare(run, name, reference_pybn(name), tolerance(name, TOL_PYBN))


@pytest.mark.parametrize("name", list(dw.CONFIGS))
def test_equals_torch_batchnorm_on_the_whole_batch(run, name):
    # torch's SyncBatchNorm computes batch norm over the concatenated batch, so torch's
    # BatchNorm on that batch in one process is its result (torch's SyncBatchNorm itself
    # refuses CPU tensors: "expected input tensor to be on GPU or XPU or privateuseone")
    compare(run, name, reference_torch(name), tolerance(name, TOL_TORCH))


def test_a_control_exchange_then_one_collective_per_training_forward_and_backward_none_in_eval(run):
    for res in run:
        for name, got in res["configs"].items():
            for before, after_forward, after_backward in got["collectives"]:
                # (all-gathers, all-reduces) of the forward, then of the backward: each first
                # all-gathers its fixed-size control row
                assert np.subtract(after_forward, before).tolist() == [2, 0], name
                assert np.subtract(after_backward, after_forward).tolist() == [1, 1], name
            if "eval_collectives" in got:
                before, after = got["eval_collectives"]
                assert before == after, f"{name}: evaluation mode communicated"


def test_a_pickled_copy_starts_its_count_of_forwards_again(run):
    if "pickled" not in run[0]:
        pytest.skip("run with torch's default group only")
    for res in run:
        assert res["pickled"] == [2, 0]  # the control row's all-gather, then the statistics'


def test_a_copy_of_a_layer_with_a_communicator_is_a_type_error_naming_comm(run):
    """A process group or an mpi4py communicator cannot be pickled: the transport's own error
    ("cannot pickle 'ProcessGroup' object") named nothing of the layer's."""
    for res in run:
        assert res["copy_with_comm"].startswith("TypeError: comm: a SyncBatchNorm built with this communicator ("), \
            res["copy_with_comm"]
        if "copy_on_comm_world" in res:
            import mpi4py

            if int(mpi4py.__version__.split(".")[0]) >= 4:
                assert res["copy_on_comm_world"] == "no error"


def test_too_few_values_over_all_workers_raise_on_every_worker(run):
    world = len(run)
    for res in run:
        errors = res["errors"]
        for case in ("one-value", "all-empty"):
            assert errors[case] is not None, f"rank {res['rank']}: {case} did not raise"
            assert "more than 1 value per channel" in errors[case], errors[case]
            assert f"over all {world} workers" in errors[case], errors[case]
            assert errors[case + "-unchanged"] == (0, [0.0, 0.0, 0.0])  # a failed call changes nothing
        assert errors["residual"].startswith("residual: SyncBatchNorm's training forward fuses no residual"), \
            errors["residual"]
        assert errors["residual-unchanged"] == (0, [0.0, 0.0, 0.0])
    # and the workers are still in step: a normal forward follows
    x = np.arange(18, dtype=np.float32).reshape(6, 3)
    want = pybn.nn.BatchNorm(3)
    want(np.concatenate([x[r::world] for r in range(world)]))
    for res in run:
        np.testing.assert_allclose(res["errors"]["after-errors-rm"], want.running_mean, rtol=1e-6)


# --------------------------------------------------------------------------- failures are bounded

@pytest.mark.parametrize("mode", ["--die", "--stall"])
def test_a_dead_or_hung_worker_fails_instead_of_hanging(mode, tmp_path):
    timeout = 5  # the process group's timeout, seconds
    init = f"tcp://127.0.0.1:{free_port()}"
    cmds = [[sys.executable, str(WORKER), "torch", "--rank", str(r), "--world", "2", "--init", init,
             "--timeout", str(timeout), "--out", str(tmp_path)] + ([mode] if r == 1 else []) for r in range(2)]
    # wait for rank 0 to give up by itself (a stalled rank 1 is killed then)
    codes, outputs, elapsed = launch(cmds, timeout=60, done=lambda codes: codes[0] is not None)
    assert codes[0] not in (None, 0), f"rank 0 did not fail by itself\n{report(codes, outputs)}"
    assert "RuntimeError" in outputs[0], report(codes, outputs)
    if mode == "--die":
        assert codes[1] == 3
    else:
        assert codes[1] is None  # still asleep: killed by launch()
        assert re.search(r"[Tt]imed out", outputs[0]), report(codes, outputs)
    assert elapsed < 40, f"rank 0 took {elapsed:.0f} s to fail"
    assert not (tmp_path / "rank0.pkl").exists()


# --------------------------------------------------------------------------- misconfigured workers

MISMATCH_TIMEOUT = 30  # the process group's timeout, seconds: no case may wait for it


@pytest.fixture(scope="module", params=["gloo", "mpi"])
def mismatches(request, tmp_path_factory):
    """Per-rank results of distributed_worker.MISMATCHES, 2 workers, in one launch."""
    out = tmp_path_factory.mktemp(f"mismatch-{request.param}")
    if request.param == "gloo":
        init = f"tcp://127.0.0.1:{free_port()}"
        cmds = [[sys.executable, str(WORKER), "torch", "--rank", str(r), "--world", "2", "--init", init,
                 "--timeout", str(MISMATCH_TIMEOUT), "--mismatch", "--out", str(out)] for r in range(2)]
    else:
        reason = mpi_available()
        if reason:
            pytest.skip(reason)
        # MPI has no timeout of its own: a hang is bounded by the launch's
        cmds = [["mpirun", "-n", "2", sys.executable, str(WORKER), "mpi", "--mismatch", "--out", str(out)]]
    codes, outputs, elapsed = launch(cmds, timeout=120)
    assert codes == [0] * len(cmds), f"{request.param}: a worker died or hung\n{report(codes, outputs)}"
    assert elapsed < MISMATCH_TIMEOUT, f"{request.param}: took {elapsed:.0f} s (a worker waited for the timeout)"
    ranks = []
    for r in range(2):
        with open(out / f"mismatch{r}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    return ranks


# what each worker raises: (worker 0, worker 1); worker 1 is the odd one
MISMATCH_ERRORS = {
    "num_features": ("ValueError: num_features: differs between the workers (4 on worker 0, 6 on worker 1)",) * 2,
    "dtype": ("ValueError: dtype: differs between the workers (float32 on worker 0, float64 on worker 1)",) * 2,
    "axis": ("ValueError: axis: differs between the workers (1 on worker 0, -1 on worker 1)",) * 2,
    "eps": ("ValueError: eps: differs between the workers (1e-05 on worker 0, 0.001 on worker 1)",) * 2,
    "momentum": ("ValueError: momentum: differs between the workers (0.1 on worker 0, None on worker 1)",) * 2,
    "affine": ("ValueError: affine: differs between the workers (True on worker 0, False on worker 1)",) * 2,
    "track_running_stats": ("ValueError: track_running_stats: differs between the workers (True on worker 0, "
                            "False on worker 1)",) * 2,
    # (before: not compared; the workers' running statistics drifted apart silently)
    "num_batches_tracked": ("ValueError: num_batches_tracked: differs between the workers (0 on worker 0, 3 on "
                            "worker 1)",) * 2,
    "x-channels": ("ValueError: x: rejected on worker(s) 1", "ValueError: x: has 3 channels along axis 1"),
    "x-dtype": ("ValueError: x: rejected on worker(s) 1", "TypeError: x: dtype float64 does not match"),
    # (before: checked after the exchange, so worker 1 raised alone and the workers fell out of step)
    "weight-shape": ("ValueError: x: rejected on worker(s) 1", "ValueError: weight: expected shape (4,)"),
    "dy-shape": ("ValueError: dy: rejected on worker(s) 1", "ValueError: dy: shape (2, 2) does not match"),
    "weight-backward": ("ValueError: dy: rejected on worker(s) 1", "ValueError: weight: expected shape (4,)"),
}


@pytest.mark.parametrize("kind", list(dw.MISMATCHES))
def test_a_misconfigured_worker_fails_on_every_worker(mismatches, kind):
    """A layer configured differently, or an input rejected, on one worker: every worker
    raises a clear error at once (before: num_features 4 against 6 aborted one worker inside
    gloo and gave the other garbage), changes nothing, and the workers stay in step."""
    assert MISMATCH_ERRORS.keys() == dw.MISMATCHES.keys()
    for rank, want in enumerate(MISMATCH_ERRORS[kind]):
        got = mismatches[rank]["cases"][kind]
        assert got["error"] is not None and got["error"].startswith(want), (rank, got["error"])
        if kind in ("dy-shape", "weight-backward"):  # the forward went through on both
            assert got["forward-done"] and got["num_batches_tracked"] == 1
        else:
            assert got["num_batches_tracked"] in ((0, 3)[rank] if kind == "num_batches_tracked" else 0, None)
            assert got["running_mean"] in ([0.0] * 4, [0.0] * 6, None)
    # a well-configured layer afterwards: the statistics of both workers' batches
    ref = pybn.nn.BatchNorm(3)
    ref(np.concatenate([np.arange(12, dtype=np.float32).reshape(4, 3) * (r + 1) for r in range(2)]))
    for rank in range(2):
        np.testing.assert_allclose(mismatches[rank]["cases"][kind]["after"], ref.running_mean, rtol=1e-6)


# what each worker raises when the workers call layers out of order (distributed_worker.ORDER_CASES)
ORDER_ERRORS = {
    "other-width": ("ValueError: num_features: differs between the workers (4 on worker 0, 6 on worker 1)",) * 2,
    "other-count": ("OutOfStep: comm: the workers' SyncBatchNorm calls are out of step (the layer's training "
                    "forwards so far: rank 0: 1, rank 1: 0)",) * 2,
    "backward-vs-forward": ("OutOfStep: comm: the processes are out of step, at different collective calls (rank 0: "
                            "a pybn.distributed.SyncBatchNorm backward; rank 1: a pybn.distributed.SyncBatchNorm "
                            "training forward)",) * 2,
}


@pytest.mark.parametrize("case", list(ORDER_ERRORS))
def test_layers_called_out_of_order_fail_on_every_worker(mismatches, case):
    """Worker 1 calls another layer than worker 0 (of other width, or alike but at another
    count of forwards), or a forward where worker 0 calls a backward: every worker raises
    at the control exchange, neither layer changes, and the workers stay in step (before:
    with MPI, worker 0 got MPI_ERR_TRUNCATE and worker 1 normalized with a row of worker 0's
    numbers and memory past them, no error; with gloo one worker aborted)."""
    assert ORDER_ERRORS.keys() == set(dw.ORDER_CASES)
    for rank, want in enumerate(ORDER_ERRORS[case]):
        got = mismatches[rank]["order"][case]
        assert got["error"] is not None and got["error"].startswith(want), (rank, got["error"])
        assert got["counts"] == [1, 1 if case == "other-width" else 0], rank  # the first step's batches only
    ref = pybn.nn.BatchNorm(3)
    ref(np.concatenate([np.arange(12, dtype=np.float32).reshape(4, 3) * (r + 1) for r in range(2)]))
    for rank in range(2):
        np.testing.assert_allclose(mismatches[rank]["order"][case]["after"], ref.running_mean, rtol=1e-6)


# --------------------------------------------------------------------------- in-process API checks

def test_wrong_comm_type_is_a_type_error():
    for comm in (object(), "gloo", 3, np.zeros(2)):
        with pytest.raises(TypeError, match=r"^comm: expected None .* torch.distributed ProcessGroup or an "
                                            r"mpi4py.MPI.Comm, got"):
            SyncBatchNorm(4, comm=comm)
    with pytest.raises(TypeError, match="comm: .* got torch.Tensor"):
        SyncBatchNorm(4, comm=torch.zeros(2))
    # what new_group returns on a process outside the group
    with pytest.raises(ValueError, match="comm: this process is not a member of the process group"):
        SyncBatchNorm(4, comm=torch.distributed.GroupMember.NON_GROUP_MEMBER)


def test_uninitialized_torch_distributed_is_a_runtime_error_with_the_hint():
    assert not torch.distributed.is_initialized()
    bn = SyncBatchNorm(4)  # building it needs no process group yet
    x = np.ones((3, 4), np.float32)
    with pytest.raises(RuntimeError, match=r"torch.distributed is not initialized: call "
                                           r'torch.distributed.init_process_group\("gloo"'):
        bn(x)
    assert bn.num_batches_tracked == 0


def test_eval_mode_needs_no_communication_and_equals_batchnorm(rng):
    # no process group exists here: evaluation mode must not touch one
    assert not torch.distributed.is_initialized()
    ref = pybn.nn.BatchNorm(5, axis=-1, dtype="float64")
    ref.running_mean[:] = rng.standard_normal(5)
    ref.running_var[:] = rng.uniform(0.5, 2, 5)
    ref.weight[:] = rng.uniform(0.5, 2, 5)
    bn = SyncBatchNorm.from_batchnorm(ref.eval())
    assert isinstance(bn, pybn.nn.BatchNorm) and not bn.training and bn.comm is None
    x = rng.standard_normal((4, 3, 5))
    dy = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(bn(x), ref(x))
    np.testing.assert_array_equal(bn.backward(dy), ref.backward(dy))
    np.testing.assert_array_equal(bn.grad_weight, ref.grad_weight)
    assert bn.state_dict().keys() == ref.state_dict().keys()
    assert repr(bn).startswith("SyncBatchNorm(5, axis=-1") and repr(bn).endswith("comm=None)")


def test_eval_mode_fuses_a_residual_as_batchnorm_does(rng):
    """Evaluation mode is BatchNorm's, the block tail included: bn(x, r, relu=True), and the
    backward's (dx, d_residual)."""
    ref = pybn.nn.BatchNorm(3, dtype="float64")
    ref.running_mean[:] = rng.standard_normal(3)
    bn = SyncBatchNorm.from_batchnorm(ref.eval())
    x, r, dy = (rng.standard_normal((4, 3, 5)) for _ in range(3))
    np.testing.assert_array_equal(bn(x, r, relu=True), ref(x, r, relu=True))
    for got, want in zip(bn.backward(dy), ref.backward(dy)):
        np.testing.assert_array_equal(got, want)


def test_eval_without_running_stats_uses_the_local_batch_without_communication(rng):
    # as torch's SyncBatchNorm: only training mode synchronizes
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    bn = SyncBatchNorm(3, track_running_stats=False).eval()
    ref = pybn.nn.BatchNorm(3, track_running_stats=False).eval()
    np.testing.assert_array_equal(bn(x), ref(x))
    np.testing.assert_array_equal(bn.backward(x), ref.backward(x))


def test_missing_torch_is_an_import_error_with_the_alternatives(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.distributed", None)  # as if torch were not installed
    bn = SyncBatchNorm(3)
    with pytest.raises(ImportError, match=r"comm: None means the default torch.distributed process group, "
                                          r"but torch is not installed .*mpi4py"):
        bn(np.ones((4, 3), np.float32))


def test_from_batchnorm_copies_the_state():
    ref = pybn.nn.BatchNorm(3, momentum=None, eps=1e-3, dtype="float64")
    ref.weight[:] = 2.0
    ref.num_batches_tracked = 7
    bn = SyncBatchNorm.from_batchnorm(ref)
    assert (bn.momentum, bn.eps, bn.dtype, bn.num_batches_tracked) == (None, 1e-3, np.float64, 7)
    np.testing.assert_array_equal(bn.weight, ref.weight)
    assert bn.weight is not ref.weight
    with pytest.raises(TypeError, match="bn: expected a pybn.nn.BatchNorm"):
        SyncBatchNorm.from_batchnorm(torch.nn.BatchNorm1d(3))


# --------------------------------------------------------------------------- the example

@pytest.mark.parametrize("dtype,epochs,tol", [("float64", 10, 1e-8), ("float32", 1, 1e-5)])
def test_example_ddp_mlp_gives_the_single_process_loss_curve(dtype, epochs, tol):
    # float64 over a longer run: the data-parallel step is the single-process step. float32
    # for one epoch only: later the two summation orders' rounding can flip a ReLU or the
    # sign of an error, and when that happens depends even on the SIMD path (PYBN_ISA)
    pytest.importorskip("sklearn", reason="examples/ddp_mlp.py needs scikit-learn: pip install .[examples]")
    cmd = [sys.executable, str(EXAMPLE), "--epochs", str(epochs), "--dtype", dtype]
    codes, outputs, elapsed = launch([cmd], timeout=LAUNCH_TIMEOUT)
    out = outputs[0]
    assert codes == [0], report(codes, outputs)
    assert f"({dtype}, batch" in out, out
    rows = re.findall(r"^ *(\d+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+e[+-]\d+) *$", out, re.M)
    assert [int(r[0]) for r in rows] == list(range(1, epochs + 1)), out
    curves = np.array([[float(v) for v in r[1:5]] for r in rows])
    # columns: train on 2 processes, train on 1, validation on 2, validation on 1
    np.testing.assert_allclose(curves[:, 0], curves[:, 1], rtol=max(tol, 1e-6), err_msg=out)  # 6 decimals printed
    np.testing.assert_allclose(curves[:, 2], curves[:, 3], rtol=max(tol, 1e-6), err_msg=out)
    rel = np.array([float(r[5]) for r in rows])
    assert rel.max() <= tol, out
    if epochs > 1:
        assert curves[-1, 0] < 0.8 * curves[0, 0], f"the model did not learn\n{out}"
    assert f"the curves agree to 1e-05 for {epochs} of {epochs} epochs" in out, out
