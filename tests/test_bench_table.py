"""The benchmark's table (pybn.bench.table): every cell's implementations run and pass their
checks on tiny shapes, a wrong result fails its check, each section runs its cells, and the
options select from the table. Figures are not judged here."""
import numpy as np
import pytest
import torch

import pybn
from pybn.bench import batchnorm_bench, cli, dropout_bench, fold_bench, report, table
from pybn.bench.reference import make_case
from pybn.bench.schema import Context, Impl, Kernel, Peer, Unavailable, WrongResult
from pybn.bench.shapes import Shape
from pybn.bench.timing import TimingConfig

TINY = TimingConfig(budget=0.001, warmup=1, min_reps=1, max_reps=2, pause=0.0)
BN_SHAPES = [Shape("n", (3, 4, 5, 6)), Shape("c", (3, 4, 5, 6), channels_last=True, out=True),
             Shape("v", (16, 8), out=True)]
# named A so that A-only implementations (aten.native_dropout) are in it too
DROPOUT_SHAPE = Shape("A", (16, 12, 4, 4))   # enough channels for the Dropout2d statistics


def context(lines=None):
    return Context(TINY, 1, 1, table.PEERS, (lines if lines is not None else []).append)


def impl_cases(kernels, shapes):
    return [pytest.param(k, i, s, id=f"{k.name}-{i.key}-{s.name}")
            for k in kernels for s in shapes for i in k.impls if i.runs_on(s)]


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads(), pybn.get_num_threads()
    yield
    torch.set_num_threads(before[0])
    pybn.set_num_threads(before[1])


def _spoil(result):
    """The result with its values replaced: zeros, or (a mask) nothing kept."""
    if isinstance(result, tuple):
        return type(result)(*(_spoil(r) for r in result)) if hasattr(result, "_fields") else \
            tuple(_spoil(r) for r in result)
    if isinstance(result, torch.Tensor):
        return torch.zeros_like(result.detach())
    return np.zeros_like(result)


# ----------------------------------------------------------------------------- the table itself

def test_every_kernel_has_pybn_first_and_only_known_peers():
    names = {p.name for p in table.PEERS}
    for section in table.SECTIONS[:3]:
        for cell in section.cells:
            impls = cell.kernel.impls
            assert impls[0].peer == "pybn" and [i.peer for i in impls].count("pybn") == 1
            assert {i.peer for i in impls[1:]} <= names
            assert len({i.key for i in impls}) == len(impls)
            assert {p.name for p in cell.peers} == {i.peer for i in impls[1:]}
            assert cell.bound is cell.kernel.bound


def test_the_table_holds_every_documented_cell():
    bn = table.BATCH_NORM.cells
    assert [(c.shape.name, c.kernel.name) for c in bn] == [
        (s, k) for s in ("A", "A'", "B", "M", "L", "L'", "T") for k in ("infer", "train", "backward")]
    assert {c.kernel.name: c.bound.formula for c in bn} == {
        "infer": "t_stream", "train": "t_read + t_stream", "backward": "3*t_read + t_stream"}
    assert [(c.shape.name, c.kernel.name) for c in table.DROPOUT.cells] == [
        ("A", "forward"), ("A", "mask"), ("A", "apply"), ("A", "2d"), ("A", "drop_path"), ("A", "dropblock"),
        ("A", "relu"), ("A", "alpha"), ("A", "g-drop"), ("A", "g-noise"), ("L", "forward"), ("L", "mask"),
        ("L", "apply")]
    assert all(c.bound.formula == "t_stream" for c in table.DROPOUT.cells)
    (fold,) = table.FOLD.cells
    assert fold.bound is None and len(fold.shape.conv_shapes) == 53
    assert table.TORCH_SECTION.needs == (table.TORCH,)


def test_a_peer_that_cannot_be_imported_says_why():
    ghost = Peer("ghost", "Ghost", "ghost", modules=("numpy", "pybn_no_such_module"))
    assert ghost.unavailable().startswith("cannot import pybn_no_such_module (ModuleNotFoundError")
    assert ghost.versions(used=True) == {"numpy": np.__version__, "pybn_no_such_module": "not installed"}
    assert ghost.versions(used=False) == {"numpy": "not used"}
    assert table.NUMPY.unavailable() is None and table.NUMPY.versions(used=True) == {}


# ----------------------------------------------------------------------------- batch norm

@pytest.mark.parametrize("kernel,impl,shape", impl_cases(table.BATCH_NORM_KERNELS, BN_SHAPES))
def test_every_batch_norm_call_passes_its_check_and_a_wrong_result_fails(kernel, impl, shape):
    case = make_case(shape, seed=3)
    try:
        runner = impl.make(case, 1)
    except Unavailable as e:
        assert impl.peer == "ort" and kernel.name != "infer", e
        return
    runner.reset()
    ret = runner.call()
    outs = runner.outputs(ret)
    state = runner.state() if runner.state is not None else None
    assert 0 <= kernel.check(case, outs, state) <= 1
    with pytest.raises(WrongResult):
        kernel.check(case, {k: np.zeros_like(v) for k, v in outs.items()}, state)


def test_batch_norm_section_runs_every_cell_and_renders_it():
    cells = table.make_cells("batch norm", BN_SHAPES, table.BATCH_NORM_KERNELS)
    lines = []
    result = batchnorm_bench.run(cells, context(lines))
    assert [(c.shape.name, c.spec.kernel.name) for c in result["cells"]] == [(c.shape.name, c.kernel.name)
                                                                             for c in cells]
    for c in result["cells"]:
        want = {"pybn", "torch", "numpy"} | ({"torch_out"} if c.shape.out else set()) \
            | ({"ort"} if c.spec.kernel.name == "infer" else set())
        assert set(c.times) == want and not c.errors, (c.shape.name, c.spec.kernel.name, c.errors)
        assert set(c.skipped) == ({"ort"} if c.spec.kernel.name != "infer" else set())
        assert c.bound > 0 and c.pybn > 0 and set(c.check_err) == want
        # the one-pass floor: every input read from memory once (backward reads dy and x, writes dx)
        p = c.probe
        floor = {"infer": p.t_stream, "train": p.t_stream, "bwd": p.t_read + p.t_stream}[c.spec.kernel.label]
        assert c.one_pass == pytest.approx(floor) and c.pct_one_pass == pytest.approx(floor / c.pybn * 100)
        assert c.as_dict()["pct_of_one_pass"] == c.pct_one_pass
    assert batchnorm_bench.failures(result) == []
    text = report.render_section(result, {"pybn": "x", "isa": "avx2", "threads": 1, "versions": {}, "cpu": "c",
                                          "logical_cpus": 2, "timing": {"min_reps": 1, "budget_s": 0.001,
                                                                        "max_reps": 2, "warmup": 1}})
    rows = [line.split()[:2] for line in text.splitlines() if line[:2] in ("n ", "c ", "v ")]
    assert rows == [[s, k] for s in "ncv" for k in ("infer", "train", "bwd")]
    assert len([line for line in lines if line.startswith("[")]) == len(cells)


def test_a_wrong_batch_norm_result_is_reported_not_timed():
    from pybn.bench import batchnorm_calls

    real = batchnorm_calls.numpy_infer

    def off_by_a_bit(case, threads):
        runner = real(case, threads)
        call = runner.call
        runner.call = lambda: call() * np.float32(1.01)
        return runner

    kernel = table.BATCH_NORM_KERNELS[0]
    broken = Kernel(kernel.name, kernel.title,
                    tuple(i if i.key != "numpy" else Impl("numpy", "numpy", off_by_a_bit) for i in kernel.impls),
                    bound=kernel.bound, check=kernel.check)
    cell = table.make_cells("batch norm", BN_SHAPES[:1], [broken])
    result = batchnorm_bench.run(cell, context())
    (c,) = result["cells"]
    assert c.errors["numpy"].startswith("wrong result: y:") and "numpy" not in c.times
    assert "pybn" in c.times and batchnorm_bench.failures(result)


# ----------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("kernel,impl,shape", impl_cases(table.DROPOUT_KERNELS, [DROPOUT_SHAPE]))
def test_every_dropout_call_passes_its_check_and_a_wrong_result_fails(kernel, impl, shape):
    torch.manual_seed(0)
    timed = impl.make(dropout_bench.make_case(shape))
    result = timed.call()
    timed.check(result)
    with pytest.raises(WrongResult):
        timed.check(_spoil(result))


def test_dropout_section_runs_every_cell():
    cells = table.make_cells("dropout", [DROPOUT_SHAPE], table.DROPOUT_KERNELS)
    torch.manual_seed(0)
    result = dropout_bench.run(cells, context())
    rows = result["shapes"]["A"]["rows"]
    assert list(rows) == ["forward", "mask", "apply", "2d", "drop_path", "dropblock", "relu"]
    assert result["peers"] == ["torch", "numpy"]
    timm = {"torch"} if dropout_bench.timm_drop_block_2d() is not None else set()
    for name, row in rows.items():
        peers = timm if name == "dropblock" else {"torch", "numpy"}   # DropBlock: timm's only
        assert row["pybn_s"] > 0 and row["t_stream_s"] > 0 and set(row["peers"]) == peers, name
    assert rows["forward"]["torch_variant"] in ("nn.Dropout", "aten.native_dropout")
    assert "torch_variant" not in rows["mask"]
    text = dropout_bench.render(result)
    assert [line.split()[:2] for line in text.splitlines()[2:2 + len(rows)]] == [["A", k] for k in rows]


@pytest.mark.parametrize("kernel,impl,shape", impl_cases(table.NOISE_KERNELS, [DROPOUT_SHAPE]))
def test_every_noise_call_passes_its_check_and_a_wrong_result_fails(kernel, impl, shape):
    torch.manual_seed(0)
    timed = impl.make(dropout_bench.make_case(shape))
    result = timed.call()
    timed.check(result)
    with pytest.raises(WrongResult):
        timed.check(_spoil(result))


def test_noise_rows_run_in_the_dropout_section():
    cells = table.make_cells("dropout", [DROPOUT_SHAPE], table.NOISE_KERNELS)
    result = dropout_bench.run(cells, context())
    rows = result["shapes"]["A"]["rows"]
    assert list(rows) == ["alpha", "g-drop", "g-noise"]
    assert set(rows["alpha"]["peers"]) == {"torch"} and set(rows["g-noise"]["peers"]) == {"torch", "numpy"}
    text = dropout_bench.render(result)
    assert [line.split()[:2] for line in text.splitlines()[2:5]] == [["A", k] for k in rows]


# ----------------------------------------------------------------------------- folding

TINY_MODEL = fold_bench.Model("tiny", ((8, 3, 3, 3), (16, 8, 1, 1)))


@pytest.mark.parametrize("impl", table.FOLD_KERNEL.impls, ids=lambda i: i.key)
def test_every_fold_call_passes_its_check_and_a_wrong_result_fails(impl):
    timed = impl.make(fold_bench.make_case(TINY_MODEL))
    result = timed.call()
    timed.check(result)
    with pytest.raises(WrongResult):
        timed.check(_spoil(result))


def test_fold_section_runs():
    result = fold_bench.run(table.make_cells("fold", [TINY_MODEL], [table.FOLD_KERNEL]), context())
    assert result["pairs"] == 2 and result["params"] == 8 * 27 + 16 * 8 and result["pybn_s"] > 0
    assert list(result["peers"]) == ["numpy", "torch"]
    assert fold_bench.render(result).startswith("fold: ResNet-50's 2 conv->BN pairs")


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("args,message", [
    (["--peers", "numpy,tf"], "unknown peer 'tf'; choose from torch, numpy, ort"),
    (["--kernels", "infer,fwd2"], "unknown kernel 'fwd2'; choose from infer, train, backward"),
    (["--shapes", "Z"], "unknown shape 'Z'"),
    (["--threads", "0"], "--threads must be in [1, 256]"),
    (["--threads", "257"], "--threads must be in [1, 256]"),
    (["--budget", "0"], "--budget must be a finite number > 0"),
    (["--budget", "nan"], "--budget must be a finite number > 0"),
    (["--budget", "inf"], "--budget must be a finite number > 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--json", "/nonexistent-dir-pybn/x.json"], "no such directory"),
    (["--json", "/"], "is a directory"),
    (["--json", "/tmp/pybn-bench-not-a-folder.json/"], "is a directory"),
])
def test_bad_options_are_usage_errors(args, message, capsys):
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_any_seed_numpy_takes_is_an_option():
    assert cli.Plan.of(cli._parser().parse_args(["--seed", str(2**130), "--no-torch"])) is not None


def test_options_select_cells_from_the_table():
    args = cli._parser().parse_args(["--shapes", "L_cl,T", "--kernels", "bwd,eval", "--peers", "numpy",
                                     "--no-dropout", "--no-torch", "--quick"])
    plan = cli.Plan.of(args)
    cells = plan.cells[table.BATCH_NORM]
    assert [(c.shape.name, c.kernel.name) for c in cells] == [("L'", "infer"), ("L'", "backward"),
                                                              ("T", "infer"), ("T", "backward")]
    assert plan.cells[table.DROPOUT] == () and plan.cells[table.TORCH_SECTION] == []
    assert plan.cells[table.FOLD] == table.FOLD.cells
    assert plan.peers == [table.NUMPY] and plan.rounds == 1 and plan.cfg == TimingConfig.quick()
    only_torch = cli.Plan.of(cli._parser().parse_args(["--torch", "--torch-cells", "cnn"]))
    assert list(only_torch.cells) == [table.TORCH_SECTION] and only_torch.peers == [table.TORCH]
