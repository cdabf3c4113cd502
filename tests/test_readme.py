"""The README's Python quick starts run as written, and what they claim holds."""
import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_numpy_and_pytorch_quick_starts():
    blocks = python_blocks()
    assert len(blocks) == 2
    assert "import pybn\n" in blocks[0] and "import pybn.torch\n" in blocks[1]


def test_numpy_quick_start_runs_and_matches_a_float64_reference():
    ns = {}
    exec(python_blocks()[0], ns)
    x, y = ns["x"].astype(np.float64), ns["y"]
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    expected = np.maximum((x - mean) / np.sqrt(var + 1e-5), 0)   # gamma 1, beta 0, ReLU
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    # the training call updated the running statistics in place (momentum 0.1, unbiased
    # variance), and inference used them
    n = x.size // x.shape[1]
    running_mean = 0.1 * mean.ravel()
    running_var = 0.9 + 0.1 * var.ravel() * n / (n - 1)
    np.testing.assert_allclose(ns["running_mean"], running_mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ns["running_var"], running_var, rtol=1e-5)
    x_nhwc = ns["x_nhwc"].astype(np.float64)
    np.testing.assert_allclose(ns["y_nhwc"], (x_nhwc - running_mean) / np.sqrt(running_var + 1e-5),
                               rtol=1e-5, atol=1e-6)
    # the backward regenerates the forward's mask: zeros in the same places
    h, dh = ns["h"], ns["dh"]
    np.testing.assert_array_equal(h == 0, dh == 0)
    assert abs((h == 0).mean() - 0.3) < 0.01


def test_pytorch_quick_start_runs_and_folds():
    pytest.importorskip("torch")
    ns = {}
    exec(python_blocks()[1], ns)   # it asserts the folded model's output itself
    names = {type(m).__name__ for m in ns["deployed"].modules()}
    assert not names & {"BatchNorm2d", "Dropout"}, names
