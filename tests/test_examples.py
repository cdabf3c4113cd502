"""The scripts in examples/ run end to end (with --quick: a few epochs of small models).

Each runs as a subprocess from a temporary directory, as a user would run it, with
RuntimeWarnings (overflow, invalid values: a numerical problem in the training) made
errors. The examples need scikit-learn (bundled datasets) and matplotlib (plots), which
are in the `examples` extra, not the `test` extra: without them these tests are skipped.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the examples need scikit-learn: pip install .[examples]")
pytest.importorskip("matplotlib", reason="the examples need matplotlib: pip install .[examples]")
pytest.importorskip("threadpoolctl", reason="the examples need threadpoolctl (a scikit-learn dependency)")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args, cwd):
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", str(EXAMPLES / name), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_mlp_tabular(tmp_path):
    out = run_example("mlp_tabular.py", "--quick", cwd=tmp_path)
    assert "train MAE" in out and "valid MAE" in out
    rows = re.findall(r"^(raw|standardized)\s+(yes|no)\s+(0\.3|-)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    assert len(rows) == 5, out  # 2 inputs x 2 dropout, plus the reference without batch norm
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    assert (tmp_path / "mlp_tabular.png").stat().st_size > 0  # the default --out, in the cwd

    # fixed seeds: a second run prints the same table; --out names the plot
    again = run_example("mlp_tabular.py", "--quick", "--out", "curves.png", cwd=tmp_path)
    assert again == out.replace("mlp_tabular.png", "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_cnn_digits(tmp_path):
    # the script itself exits non-zero when a folded prediction differs; check the table too
    out = run_example("cnn_digits.py", "--quick", cwd=tmp_path)
    acc = re.search(r"^test accuracy\s+([\d.]+)\s+([\d.]+)", out, re.M)
    assert acc, out
    assert acc.group(1) == acc.group(2)
    assert float(acc.group(1)) > 0.5  # two epochs already learn the digits (chance: 0.1)
    same = re.search(r"^same predicted class\s+(\d+)/(\d+)", out, re.M)
    assert same and same.group(1) == same.group(2), out
    diff = re.search(r"^max \|logit difference\|\s+(\S+)", out, re.M)
    assert diff and float(diff.group(1)) < 1e-3, out
    assert re.search(r"^speed-up\s+[\d.]+x", out, re.M), out


def test_mc_dropout(tmp_path):
    # the script exits non-zero when a second pass over the samples gives other bits
    out = run_example("mc_dropout.py", "--quick", cwd=tmp_path)
    values = dict(re.findall(r"^(RMSE, dropout off|RMSE, MC mean|mean predictive std)\s+([\d.]+)$", out, re.M))
    assert len(values) == 3, out
    assert 0 < float(values["mean predictive std"]) < float(values["RMSE, MC mean"]) < 200, out
    assert re.search(r"^repeat of the passes\s+identical$", out, re.M), out
    # fixed seeds, masks fixed by (seed, sample): another process prints the same table
    assert run_example("mc_dropout.py", "--quick", cwd=tmp_path) == out
