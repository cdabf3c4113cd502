"""The fused-residual section of the benchmark (pybn.bench.residual_bench): every call passes
its check on tiny shapes of both layouts, a wrong result fails it, the section runs and
renders its cells. Figures are not judged here."""
import numpy as np
import pytest
import torch

import pybn
from pybn.bench import residual_bench, table
from pybn.bench.schema import Context, WrongResult
from pybn.bench.shapes import Shape
from pybn.bench.timing import TimingConfig

TINY = TimingConfig(budget=0.001, warmup=1, min_reps=1, max_reps=2, pause=0.0)
SHAPES = [Shape("n", (3, 4, 5, 6)), Shape("c", (3, 4, 5, 6), channels_last=True)]


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads(), pybn.get_num_threads()
    yield
    torch.set_num_threads(before[0])
    pybn.set_num_threads(before[1])


@pytest.mark.parametrize("kernel,impl,shape", [
    pytest.param(k, i, s, id=f"{k.name}-{i.key}-{s.name}")
    for k in table.RESIDUAL_KERNELS for s in SHAPES for i in k.impls])
def test_every_call_passes_its_check_and_a_wrong_result_fails(kernel, impl, shape):
    timed = impl.make(residual_bench.make_case(shape))
    result = timed.call()
    timed.check(result)
    spoiled = torch.zeros_like(result) if isinstance(result, torch.Tensor) else np.zeros_like(result)
    with pytest.raises(WrongResult):
        timed.check(spoiled)


def test_the_section_runs_every_cell_and_renders_it():
    assert table.RESIDUAL in table.SECTIONS
    assert all(c.bound.formula == "t_read + t_stream" for c in table.RESIDUAL.cells)
    cells = table.make_cells("fused residual", SHAPES, table.RESIDUAL_KERNELS)
    lines = []
    result = residual_bench.run(cells, Context(TINY, 1, 1, table.PEERS, lines.append))
    assert result["peers"] == ["torch", "numpy"]
    for shape in ("n", "c"):
        rows = result["shapes"][shape]["rows"]
        assert list(rows) == ["train", "infer"]
        for row in rows.values():
            assert row["pybn_s"] > 0 and row["bound_s"] > 0 and set(row["peers"]) == {"torch", "numpy"}
            assert row["floor_s"] == row["bound_s"]  # small arrays: x's second read is from the cache
            assert row["torch_variant"] in ("torch", "torch_in_place") and row["numpy_variant"] == "pybn+numpy"
    text = residual_bench.render(result)
    assert [line.split()[:2] for line in text.splitlines()[2:6]] == [
        ["n", "train"], ["n", "infer"], ["c", "train"], ["c", "infer"]]


def test_the_floor_reads_channels_last_x_twice_only_in_training_past_the_l3():
    cells = {(c.shape.name, c.kernel.name): c for c in table.RESIDUAL.cells}
    assert residual_bench._reads_x_twice(cells["L'", "train"])  # 103 MB, past any L3 pybn reads
    assert not residual_bench._reads_x_twice(cells["L'", "infer"])
    assert not residual_bench._reads_x_twice(cells["L", "train"])  # channel blocks: the cache
    assert not residual_bench._reads_x_twice(cells["A", "train"])
