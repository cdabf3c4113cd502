"""The torch section of ``python -m pybn bench``, on small shapes (it runs, checks results
before timing, reports ratios and profile shares; figures are not judged here)."""
import subprocess
import sys
import time
import types

import pytest
import torch

import pybn
import pybn.torch
from pybn.bench import timing, torch_bench
from pybn.bench.timing import TimingConfig

TINY = TimingConfig(budget=0.001, warmup=1, min_reps=1, max_reps=2, pause=0.0)


@pytest.fixture(autouse=True)
def restore_threads():
    """The section sets torch's and pybn's thread counts: put them back for the other tests."""
    before = torch.get_num_threads(), pybn.get_num_threads()
    yield
    torch.set_num_threads(before[0])
    pybn.set_num_threads(before[1])


def test_cells_run_check_and_render(monkeypatch):
    monkeypatch.setitem(torch_bench.SHAPES, "A", (4, 3, 5, 5))
    monkeypatch.setitem(torch_bench.SHAPES, "L", (2, 3, 4, 4))
    cells = torch_bench.select("fwd+bwd,cnn")
    assert len(cells) == 7
    lines = []
    result = torch_bench.run(TINY, 1, 1, lines.append, cells)
    assert [c["name"] for c in result["cells"]] == [c.name for c in cells]
    for c in result["cells"]:
        assert "error" not in c, c
        assert c["reference_s"] > 0 and c["candidate_s"] > 0 and c["ratio"] == c["reference_s"] / c["candidate_s"]
        assert len(c["page_faults"]) == 2 and all(n >= 0 for n in c["page_faults"])
    cnn = result["cells"][-1]
    stock, ours = cnn["shares"]
    assert 0 < stock["batch norm"] < 1 and 0 < stock["dropout"] < 1 and 0 < ours["dropout"] < 1
    text = torch_bench.render(result)
    assert "step, tutorial CNN" in text and "profile pybn" in text and len(lines) == 7
    assert text.count("page faults per call: torch ") == 7


def test_a_wrong_candidate_is_reported_not_timed(monkeypatch):
    """The check runs before the timing: a candidate that computes something else is an error."""
    monkeypatch.setitem(torch_bench.SHAPES, "A", (4, 3, 5, 5))
    real = pybn.torch.accelerate

    def broken(model, **kwargs):
        model = real(model, **kwargs)
        model.register_forward_hook(lambda m, i, out: out * 1.01)
        return model

    monkeypatch.setattr(pybn.torch, "accelerate", broken)
    result = torch_bench.run(TINY, 1, 1, lambda _: None, torch_bench.select("batch norm fwd+bwd, A NCHW"))
    assert result["cells"][0]["error"].startswith("AssertionError: output differs from torch's")
    assert "ratio" not in result["cells"][0]


def test_a_stock_pair_is_timed_in_the_same_alternation_and_reported(monkeypatch):
    """The steps advance a fake clock by their nominal time, so that the ratios are exact
    whatever else the machine runs (busy loops measured 2.5x for 0.5x under a build)."""
    calls = []
    clock = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], sleep=time.sleep))

    def step(name, seconds):
        def call():
            calls.append(name)
            clock[0] += seconds
        return call

    steps = torch_bench.Steps(step("ref", 0.002), step("cand", 0.001), lambda: None,
                              stock_pair=(step("stock eager", 0.001), step("stock compiled", 0.002)))
    cell = torch_bench.TorchCell("a compile cell", lambda: steps, 1.0, labels=("pybn eager", "compiled"))
    result = torch_bench.run(TINY, 1, 1, lambda _: None, [cell])
    (r,) = result["cells"]
    assert 0.3 < r["stock_ratio"] < 0.7 and 1.4 < r["ratio"] < 2.6
    assert calls[:4] == ["ref", "cand", "stock eager", "stock compiled"]  # one alternation
    assert "stock torch, the same model and steps: compiled vs eager 0.5" in torch_bench.render(result)


def test_page_faults_count_the_fresh_pages_a_call_touches():
    import mmap

    pages = 2048

    def touch_fresh_pages():
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as m:  # anonymous: every page new, zeroed on first touch
            for i in range(pages):
                m[i * mmap.PAGESIZE] = 1

    assert pages <= torch_bench._page_faults_per_call(touch_fresh_pages) <= pages + 64
    assert torch_bench._page_faults_per_call(lambda: None) <= 16


def test_every_cell_has_a_target_and_a_unique_name():
    names = torch_bench.cell_names()
    assert len(set(names)) == len(names) == len(torch_bench.CELLS)
    assert all(c.target > 0 for c in torch_bench.CELLS)
    with pytest.raises(ValueError, match="matches none"):
        torch_bench.select("nothing-like-this")


@pytest.mark.parametrize("args,message", [(["--torch", "--no-torch"], "exclude each other"),
                                          (["--torch", "--torch-cells", "zzz"], "matches none")])
def test_command_line_errors(args, message):
    proc = subprocess.run([sys.executable, "-m", "pybn", "bench", *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and message in proc.stderr

