"""tools/readme_figures.py: the README's headline table from ``python -m pybn bench --json``,
on a JSON the bench's own to_json writes from made-up timings (every figure known), and on
the JSON of a real quick run."""
import json
import subprocess
import sys
from pathlib import Path

from pybn.bench import report, table
from pybn.bench.probe import Probe
from pybn.bench.shapes import SHAPE
from pybn.bench.timing import Timing

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "readme_figures.py"
MS = 1e-3


def timing(seconds):
    return Timing(median=seconds, min=seconds, max=seconds, mean=seconds, reps=3, warmup=1, samples=[seconds] * 3)


def fake_cell(shape, kernel, pybn_ms, peers_ms):
    """A batch-norm cell whose probe gives t_read = 1 ms and t_stream = 2 ms."""
    (spec,) = table.make_cells("batch norm", [shape], [kernel])
    probe = Probe(nbytes=shape.nbytes, read=timing(1 * MS), stream=timing(2 * MS))
    cell = report.CellResult(spec=spec, bound=probe.bound(spec.bound), probe=probe, probe_rounds=[probe])
    for key, ms in {"pybn": pybn_ms, **peers_ms}.items():
        cell.times[key] = timing(ms * MS)
    return cell


META = {"pybn": "0.1.0", "isa": "avx2", "threads": 2, "cpu": "Test CPU 9000", "logical_cpus": 4,
        "versions": {"pybn": "0.1.0", "numpy": "2.0", "torch": "2.13", "onnxruntime": "not used", "python": "3.11"},
        "date": "2031-02-03T04:05:06+0000", "quick": False,
        "command": "python -m pybn bench --shapes A,L --json bench.json",
        "shapes": {"A": {"array_shape": [32, 64, 56, 56], "layout": "NCHW"},
                   "L": {"array_shape": [64, 128, 56, 56], "layout": "NCHW"}}}


def fixture(tmp_path):
    infer, train, backward = table.BATCH_NORM_KERNELS
    cells = [fake_cell(SHAPE["A"], infer, 2.5, {"torch": 5.0, "numpy": 10.0}),       # bound 2 ms
             fake_cell(SHAPE["A"], backward, 6.25, {"torch": 12.5, "numpy": 25.0}),  # bound 3*1 + 2 = 5 ms
             fake_cell(SHAPE["L"], train, 3.0, {"torch": 1.5, "torch_out": 6.0, "numpy": 300.0})]  # bound 3 ms
    data = report.to_json(META, {}, cells)
    data["dropout"] = {"p": 0.5, "peers": ["torch", "numpy"], "shapes": {"A": {"shape": [32, 64, 56, 56], "rows": {
        "forward": {"pybn_s": 4 * MS, "t_stream_s": 3 * MS, "peers": {"torch": 120 * MS, "numpy": 20 * MS}}}}}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return path


def figures(*args):
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def table_rows(text):
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def test_the_table_holds_percent_of_bound_and_ratios(tmp_path):
    path = fixture(tmp_path)
    text = figures(path)
    header, rule, *rows = table_rows(text)
    assert header == ["shape", "kernel", "% of bound", "x torch", "x NumPy"]   # onnxruntime did not run
    assert rule == ["---", "---", "---:", "---:", "---:"]
    assert rows == [
        ["A (32, 64, 56, 56) NCHW", "inference forward", "80%", "2.00x", "4.00x"],
        ["A (32, 64, 56, 56) NCHW", "backward (training=True)", "80%", "2.00x", "4.00x"],
        # torch's faster variant (the plain call, 1.5 ms) is the one compared
        ["L (64, 128, 56, 56) NCHW", "training forward", "100%", "0.50x", "100x"],
        ["A (32, 64, 56, 56)", "dropout forward", "75% of copy", "30.0x", "–"],
    ]
    stamp = text.splitlines()[0]
    assert stamp.startswith("Measured on Test CPU 9000 (4 logical CPUs), ISA path `avx2`, 2 threads, on 2031-02-03")
    assert "onnxruntime" not in stamp
    assert f"Produced by `python -m pybn bench --shapes A,L --json bench.json`, then " \
           f"`python tools/readme_figures.py {path}`." in text


def test_options_choose_shapes_and_leave_out_dropout(tmp_path):
    path = fixture(tmp_path)
    rows = table_rows(figures(path, "--shapes", "L", "--no-dropout"))[2:]
    assert [r[:2] for r in rows] == [["L (64, 128, 56, 56) NCHW", "training forward"]]


def test_a_file_that_is_not_bench_json_is_a_usage_error(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"command": "python -m pybn bench --torch", "torch": {}}')
    for path in (bad, tmp_path / "missing.json"):
        proc = subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith("readme_figures: ")


def test_on_a_real_quick_run(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pybn", "bench", "--quick", "--budget", "0.005", "--shapes", "T",
                           "--kernels", "infer", "--peers", "numpy", "--no-dropout", "--no-fold", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    (cell,) = data["cells"]
    header, _, row = table_rows(figures(out))
    assert header == ["shape", "kernel", "% of bound", "x NumPy"]
    assert row[:2] == ["T (1, 64, 8, 8) NCHW", "inference forward"]
    assert row[2] == f"{cell['bound_s'] / cell['pybn_s'] * 100:.0f}%"
    ratio = cell["peer_s"]["numpy"] / cell["pybn_s"]
    assert row[3].endswith("x") and abs(float(row[3][:-1]) - ratio) <= 0.01 * max(1.0, ratio)
