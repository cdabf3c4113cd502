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
