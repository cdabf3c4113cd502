"""``python -m pybn bench`` on a machine with only NumPy: each peer that cannot be imported
is skipped in one line, and the tables still compare pybn with NumPy and the bound."""
import re

from child_process import run_child

# None in sys.modules makes `import name` fail, as for a package that is not installed.
BENCH_WITHOUT = """
import sys
for name in {hidden!r}:
    sys.modules[name] = None
from pybn.bench import main
sys.exit(main(["--quick", "--budget", "0.005", "--shapes", "T", *{extra!r}]))
"""


def run_bench_without(*hidden, extra=()):
    out = run_child(BENCH_WITHOUT.format(hidden=hidden, extra=extra), timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_bench_skips_missing_peers_in_one_line_each_and_compares_numpy_and_the_bound():
    out = run_bench_without("torch", "onnxruntime", "onnx")
    skipped = [line for line in out.stderr.splitlines() if ": skipped," in line]
    assert len(skipped) == 2, out.stderr
    assert skipped[0].startswith("torch: skipped, cannot import torch"), skipped
    assert skipped[1].startswith("ort: skipped, cannot import onnxruntime"), skipped
    assert "Traceback" not in out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if re.match(r"T +(infer|train|bwd) ", line)]
    assert [r[1] for r in rows] == ["infer", "train", "bwd"], out.stdout
    time_re = r"[0-9.]+(ns|us|ms|s)\*?"
    for r in rows:
        # shape kernel pybn unit bound unit %bound %1pass torch x numpy unit x ORT x target ok
        pybn_t, bound_t, pct, pct1 = " ".join(r[2:4]), " ".join(r[4:6]), r[6], r[7]
        assert re.fullmatch(time_re, pybn_t.replace(" ", "")) and re.fullmatch(time_re, bound_t.replace(" ", "")), r
        assert pct.endswith("%") and pct1.endswith("%"), r
        assert r[8:10] == ["-", "-"], r                 # no torch
        assert re.fullmatch(time_re, "".join(r[10:12])) and r[12].endswith("x"), r   # NumPy timed
        assert r[13:15] == ["-", "-"], r                # no onnxruntime
    assert "torch not installed" in out.stdout and "onnxruntime not installed" in out.stdout
    # the dropout and folding sections run on NumPy alone too
    assert re.search(r"^A +forward .* - +- +[0-9.]+ ms", out.stdout, re.M), out.stdout
    assert re.search(r"^fold: .*pybn [0-9.]+ ms, numpy [0-9.]+ ms", out.stdout, re.M), out.stdout
    # and the 16-bit section against pybn float32 and the bound (no torch column)
    assert re.search(r"^L +float16 +bwd +[0-9.]+ ms .*x +- +- (ok|MISS)$", out.stdout, re.M), out.stdout


def test_bench_with_onnx_but_not_onnxruntime_names_the_missing_module():
    out = run_bench_without("onnxruntime", extra=("--peers", "numpy,ort", "--no-dropout", "--no-fold", "--no-half"))
    skipped = [line for line in out.stderr.splitlines() if ": skipped," in line]
    assert len(skipped) == 1 and skipped[0].startswith("ort: skipped, cannot import onnxruntime"), out.stderr
