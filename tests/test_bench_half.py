"""The 16-bit section of ``python -m pybn bench`` (pybn.bench.half_bench) on tiny shapes: its
cells, every call checked against the float64 reference, a wrong result flagged and not
timed, the JSON's numbers, the options, and bfloat16 skipped without ml_dtypes. Figures
are not judged here."""
import json

import ml_dtypes
import numpy as np
import pytest
import torch
from child_process import run_child

import pybn
import pybn._checks
from pybn.bench import cli, half_bench, table
from pybn.bench.half_bench import HalfCase, HalfShape, ShapeCases
from pybn.bench.schema import Context, Impl, Kernel, WrongResult
from pybn.bench.shapes import Shape
from pybn.bench.timing import TimingConfig

TINY = TimingConfig(budget=0.001, warmup=1, min_reps=1, max_reps=2, pause=0.0)
BASES = [Shape("A", (4, 6, 5, 4)), Shape("c", (4, 6, 5, 4), channels_last=True, out=True)]
SHAPES = [HalfShape(b, d) for b in BASES for d in half_bench.DTYPES]
KERNELS = (*table.HALF_BATCH_NORM_KERNELS, table.HALF_DROPOUT_KERNEL)


def context(lines=None, rounds=1):
    return Context(TINY, rounds, 1, table.PEERS, (lines if lines is not None else []).append)


def half_case(shape):
    return HalfCase(ShapeCases(shape.base, 3), pybn._checks.float_dtype(shape.dtype))


def tiny_cells():
    return [c for s in SHAPES for c in table.make_cells("16-bit", [s], KERNELS)]


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads(), pybn.get_num_threads()
    yield
    torch.set_num_threads(before[0])
    pybn.set_num_threads(before[1])


def test_the_table_holds_the_documented_cells():
    cells = [(c.shape.name, c.shape.dtype, c.kernel.name) for c in table.HALF.cells]
    assert cells == [(s, d, k) for s in ("A", "A'", "L") for d in ("bfloat16", "float16")
                     for k in ("infer", "train", "backward") + (("dropout",) if s == "A" else ())]
    assert {c.kernel.name: c.bound.formula for c in table.HALF.cells} == {
        "infer": "t_stream", "train": "t_read + t_stream", "backward": "3*t_read + t_stream", "dropout": "t_stream"}
    for c in table.HALF.cells:
        keys = [i.key for i in c.kernel.impls]
        assert keys[:2] == ["pybn", "float32"] and {i.peer for i in c.kernel.impls[2:]} == {"torch"}
        assert c.peers == (table.TORCH,)
    # (the float32 twin is no peer: the section times it in turn with pybn's 16-bit call)
    assert [i.key for i in table.HALF.cells[0].impls(table.PEERS)] == ["pybn", "torch"]
    assert [i.key for i in table.HALF.cells[-1].impls(table.PEERS)] == ["pybn", "torch", "torch_out"]


def test_the_probe_reads_the_bytes_of_the_16_bit_array():
    x = np.linspace(-3, 3, 64 * 6).astype(ml_dtypes.bfloat16).reshape(64, 6)
    view = half_bench.bytes_as_float32(x)
    assert view.dtype == np.float32 and view.nbytes == x.nbytes and np.shares_memory(view, x)
    assert np.isfinite(view).all()
    h = np.linspace(-60000, 60000, 1000).astype(np.float16)
    assert np.isfinite(half_bench.bytes_as_float32(h)).all()
    with pytest.raises(ValueError, match="^a: "):
        half_bench.bytes_as_float32(np.zeros(5, np.float16))
    with pytest.raises(ValueError, match="^a: "):
        half_bench.bytes_as_float32(np.zeros((4, 4), np.float16)[:, ::2])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.base.name}-{s.dtype}")
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_every_call_passes_its_check_on_its_dtype(kernel, shape):
    hc = half_case(shape)
    for impl in kernel.impls:
        if not impl.runs_on(shape):
            continue
        checked = impl.make(hc, 1)
        result = checked.call()
        err = checked.check(result)
        assert err is None or 0 <= err <= 1, impl.key
        dtype = (result[0] if isinstance(result, tuple) else result).dtype
        if impl.key == "float32":
            assert dtype in (np.float32, torch.float32)
        elif impl.key != "torch_out":
            assert str(dtype).endswith(shape.dtype), (impl.key, dtype)
    hc.close()


@pytest.mark.parametrize("dtype", half_bench.DTYPES)
@pytest.mark.parametrize("kernel", table.HALF_BATCH_NORM_KERNELS, ids=lambda k: k.name)
def test_a_16_bit_output_two_units_in_the_last_place_off_fails_its_check(kernel, dtype):
    """The check's tolerance is one unit of the storage dtype: pybn's own output passes,
    the same output moved by two units (of a bfloat16/float16) does not."""
    hc = half_case(HalfShape(BASES[0], dtype))
    case = hc.half
    (float32_kernel,) = [k for k in table.BATCH_NORM_KERNELS if k.name == kernel.name]
    runner = float32_kernel.pybn.make(case, 1)
    runner.reset()
    outs = runner.outputs(runner.call())
    state = runner.state() if runner.state is not None else None
    assert kernel.check(case, outs, state) <= 1
    key = "dx" if "dx" in outs else "y"
    eps = float(pybn._checks.finfo(case.x.dtype).eps)  # (np.finfo refuses bfloat16 under NumPy 1.x)
    bad = dict(outs)
    bad[key] = (outs[key].astype(np.float64) * (1 + 2 * eps) + 2e-4).astype(case.x.dtype)
    with pytest.raises(WrongResult, match=f"^{key}: "):
        kernel.check(case, bad, state)
    with pytest.raises(WrongResult, match="dtype float32"):
        kernel.check(case, {**outs, key: outs[key].astype(np.float32)}, state)


@pytest.mark.parametrize("dtype", half_bench.DTYPES)
def test_a_wrong_dropout_is_flagged(dtype):
    hc = half_case(HalfShape(BASES[0], dtype))
    for make in (half_bench.pybn_dropout, half_bench.torch_dropout):
        checked = make(hc, 1)
        result = checked.call()
        checked.check(result)
        with pytest.raises(WrongResult):
            checked.check(result * 3 if isinstance(result, torch.Tensor) else (result * 3).astype(result.dtype))


def test_the_section_runs_every_cell_and_its_json_holds_every_number():
    cells = tiny_cells()
    lines = []
    result = half_bench.run(cells, context(lines, rounds=2))
    rows = result["rows"]
    assert [(r.shape, r.dtype, r.cell.kernel.name) for r in rows] == [
        (c.shape.name, c.shape.dtype, c.kernel.name) for c in cells]
    assert half_bench.failures(result) == [] and result["skipped"] == {}
    data = json.loads(json.dumps(half_bench.to_json(result)))
    assert data["dtypes"] == ["bfloat16", "float16"] and data["threads"] == 1
    assert data["targets"] == {"pct_of_bound": 80.0, "x_float32": 1.6, "x_float32_shapes": ["L"],
                               "x_torch_above": 1.0}
    for r, d in zip(rows, data["rows"]):
        assert d["pybn_s"] > 0 and d["float32_s"] > 0 and d["torch_s"] > 0 and d["bound_s"] > 0
        assert d["pct_of_bound"] == pytest.approx(d["bound_s"] / d["pybn_s"] * 100)
        assert d["x_float32"] == pytest.approx(d["float32_s"] / d["pybn_s"])
        assert d["x_torch"] == pytest.approx(d["torch_s"] / d["pybn_s"])
        x = r.cell.shape.base.size
        assert d["probe_bytes"] == 2 * x                    # the 16-bit array's bytes
        # probe_read (train, backward) and probe_stream, from pybn's best round
        assert len(d["rounds"]) == 2 and len(d["timings"]["probe"]) == (1 + (d["kernel"] in ("train", "backward")))
        assert set(d["calls"]) >= {"pybn", "float32", d["torch_variant"]} and d["errors"] == {}
        assert d["kernel"] == "dropout" or set(d["check_worst_err_over_tol"]) >= {"pybn", "float32"}
        assert isinstance(d["misses"], list) and d["meets_target"] == (not d["misses"])
    text = half_bench.render(result)
    table_rows = [line.split()[:3] for line in text.splitlines() if line.split()[:1] in (["A"], ["c"])]
    assert table_rows == [[r.shape, r.dtype, r.cell.kernel.label] for r in rows]
    assert ">= 80% of bound" in text and ">= 1.6x pybn float32 on L" in text
    assert len([line for line in lines if line.startswith("16-bit ")]) == len(rows)


def test_a_wrong_result_is_reported_and_not_timed():
    real = half_bench.pybn_dropout

    def off(hc, threads):
        checked = real(hc, threads)
        return half_bench.Checked(lambda: np.nextafter(checked.call(), np.float16(9)), checked.check)

    broken = Kernel("dropout", "dropout forward", (Impl("pybn", "pybn", off), *table.HALF_DROPOUT_KERNEL.impls[1:]),
                    bound=table.HALF_DROPOUT_KERNEL.bound)
    shape = HalfShape(BASES[0], "float16")
    lines = []
    result = half_bench.run(table.make_cells("16-bit", [shape], [broken]), context(lines))
    (row,) = result["rows"]
    assert row.errors["pybn"].startswith("wrong result: pybn.dropout on float16")
    assert row.pybn is None and row.float32 is not None and row.torch_s is not None
    assert half_bench.failures(result) and any(line.startswith("ERROR: pybn") for line in lines)
    assert "WRONG" in half_bench.render(result)


@pytest.mark.parametrize("args,message", [(["--half", "--no-half"], "exclude each other"),
                                          (["--half", "--torch"], "exclude each other")])
def test_bad_options(args, message, capsys):
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_options_select_the_section():
    plan = cli.Plan.of(cli._parser().parse_args(["--quick"]))
    assert plan.cells[table.HALF] == table.HALF.cells
    assert list(plan.cells).index(table.HALF) == list(plan.cells).index(table.DROPOUT) + 1
    assert plan.cells[table.HALF] == table.HALF.cells
    assert cli.Plan.of(cli._parser().parse_args(["--no-half"])).cells[table.HALF] == ()
    alone = cli.Plan.of(cli._parser().parse_args(["--half"]))
    assert list(alone.cells) == [table.HALF]


WITHOUT_ML_DTYPES = """
import json, sys
sys.modules["ml_dtypes"] = None     # as if it were not installed
from pybn.bench import half_bench, table
from pybn.bench.schema import Context
from pybn.bench.shapes import Shape
from pybn.bench.timing import TimingConfig
base = Shape("A", (4, 6, 5, 4))
cells = [c for d in half_bench.DTYPES for c in table.make_cells(
    "16-bit", [half_bench.HalfShape(base, d)], (*table.HALF_BATCH_NORM_KERNELS, table.HALF_DROPOUT_KERNEL))]
ctx = Context(TimingConfig(budget=0.001, warmup=1, min_reps=1, max_reps=2, pause=0.0), 1, 1, table.PEERS, print)
result = half_bench.run(cells, ctx)
print(half_bench.render(result))
print("JSON " + json.dumps(half_bench.to_json(result)))
"""


def test_bfloat16_rows_are_skipped_in_one_line_without_ml_dtypes():
    out = run_child(WITHOUT_ML_DTYPES, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    skipped = [line for line in out.stdout.splitlines() if "skipped," in line and not line.startswith("JSON")]
    assert skipped == ["16-bit bfloat16: skipped, bfloat16 needs ml_dtypes (pip install ml_dtypes)",
                       "bfloat16: skipped, bfloat16 needs ml_dtypes (pip install ml_dtypes)"], out.stdout
    data = json.loads(out.stdout.split("JSON ", 1)[1])
    assert data["skipped"] == {"bfloat16": "bfloat16 needs ml_dtypes (pip install ml_dtypes)"}
    assert [(r["dtype"], r["kernel"]) for r in data["rows"]] == [
        ("float16", k) for k in ("infer", "train", "backward", "dropout")]
    assert all(r["errors"] == {} and r["pybn_s"] > 0 for r in data["rows"])
