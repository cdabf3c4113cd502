import zlib

import numpy as np
import pytest

import pybn
import pybn._runtime

ISAS = list(pybn.supported_isas())


@pytest.fixture(params=ISAS, ids=ISAS)
def isa(request):
    """Run the test on every kernel path this CPU supports."""
    name = request.param
    with pybn._runtime.use_isa(name):
        assert pybn.isa() == name
        yield name


@pytest.fixture(params=[1, 2], ids=["t1", "t2"])
def threads(request):
    """Run the test with 1 and with 2 pybn threads; restore afterwards."""
    prev = pybn.get_num_threads()
    pybn.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        pybn.set_num_threads(prev)


@pytest.fixture
def rng(request):
    # deterministic per test id
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


# ------------------------------------------------- reliability: opt-in markers and profiles

OPT_IN_MARKERS = ("slow", "huge", "bigmodel", "realmodels")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (valgrind), huge (> 8 GB of memory), bigmodel (an ONNX model past
    2 GiB) or realmodels (torchvision and timm architectures) run only when the -m expression
    names their marker, e.g. ``python -m pytest -m slow``."""
    expr = config.getoption("markexpr") or ""
    for item in items:
        for name in OPT_IN_MARKERS:
            if item.get_closest_marker(name) is not None and name not in expr:
                item.add_marker(pytest.mark.skip(reason=f"opt-in: select with -m {name}"))


def _signal_state():
    """SIGINT's and SIGTERM's handlers and the signals blocked on this thread: what child
    processes inherit (an ignored or blocked SIGINT stays so in them)."""
    import signal

    return (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
            frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, [])))


SIGNAL_STATE_CHANGES = []  # (test, before, after) for each test that left the state changed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = _signal_state()  # setup, call and teardown: fixtures may change it too
    yield
    after = _signal_state()
    if after != before:
        SIGNAL_STATE_CHANGES.append((item.nodeid, before, after))


def pytest_terminal_summary(terminalreporter):
    """Print the size of the input-validation matrix and the figures the reliability tests
    measured (test_concurrency, test_memory, test_huge), when those modules ran, and any
    test that left the process's signal handling changed."""
    import sys

    for nodeid, before, after in SIGNAL_STATE_CHANGES:
        terminalreporter.write_line(f"signal state changed by {nodeid}: {before} -> {after}")

    matrix = sys.modules.get("test_input_matrix")
    if matrix is not None:
        terminalreporter.write_line(matrix.summary())
    for name in ("test_fuzz", "test_concurrency", "test_memory", "test_huge"):
        for line in getattr(sys.modules.get(name), "FIGURES", ()):
            terminalreporter.write_line(line)


def _hypothesis_profiles():
    """"ci" (the default): derandomized, so every run draws the same examples, and small
    enough for the whole suite; "long": HYPOTHESIS_PROFILE=long for a search by hand."""
    import os

    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # pragma: no cover
        return
    quiet = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", derandomize=True, max_examples=100, deadline=None,
                              suppress_health_check=quiet, print_blob=True)
    settings.register_profile("long", max_examples=20000, deadline=None,
                              suppress_health_check=quiet, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_hypothesis_profiles()
