"""Transparent huge pages for the large outputs pybn.torch allocates
(csrc/include/pybn/huge_pages.h, pybn.torch._layout.empty): the advice reaches the kernel
(a mapping's VmFlags in /proc/self/smaps gain `hg`); pybn.torch asks it for exactly its
outputs of 4 MiB or more, never for the fake tensors of torch.compile and torch.export, and
not when NumPy's own advice is switched off."""
import copy
import mmap
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pybn.torch  # (also registers torch.ops.pybn)
from pybn import _C
from pybn.torch import _layout

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists()
                               or "[never]" in THP.read_text(), reason="needs Linux with transparent huge pages")
_numpy_switch = (np._core if hasattr(np, "_core") else np.core).multiarray


def vm_flags(address, nbytes):
    """The VmFlags of the mapping that holds the middle of [address, address + nbytes)
    (Linux's /proc/self/smaps; the advice covers whole pages, so not the first bytes)."""
    address += nbytes // 2
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.fixture
def numpy_advice_off():
    before = _numpy_switch._set_madvise_hugepage(False)
    yield
    _numpy_switch._set_madvise_hugepage(before)


@needs_thp
def test_advice_reaches_the_mapping():
    # an anonymous mapping of its own: its flags are not those of a heap or a neighbour
    # that an earlier advice changed
    region = mmap.mmap(-1, 16 << 20)
    a = np.frombuffer(region, np.float32)
    assert "hg" not in vm_flags(a.ctypes.data, a.nbytes)
    assert _C.advise_huge_pages(a) is True
    assert "hg" in vm_flags(a.ctypes.data, a.nbytes)
    del a
    region.close()


def test_advice_arguments_are_checked():
    with pytest.raises(TypeError, match="a: expected a numpy.ndarray"):
        _C.advise_huge_pages([1.0, 2.0])
    with pytest.raises(ValueError, match="a: must be C-contiguous"):
        _C.advise_huge_pages(np.zeros((4, 4))[:, ::2])
    read_only = np.zeros(1 << 20)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="a: is read-only"):
        _C.advise_huge_pages(read_only)
    assert _C.advise_huge_pages(np.zeros(16)) is False  # no whole page inside


@pytest.fixture
def advised(monkeypatch):
    """The (address, nbytes) of every array pybn.torch advises (which mapping the memory is in,
    and so what its flags already are, depends on the allocator's history)."""
    calls = []
    monkeypatch.setattr(_layout._C, "advise_huge_pages", lambda a: calls.append((a.ctypes.data, a.nbytes)))
    return calls


@pytest.mark.parametrize("channels_last", [False, True])
def test_large_torch_outputs_are_advised(advised, channels_last):
    x = torch.randn(8, 64, 32, 32)  # 2 MiB: not advised
    big = torch.randn(32, 64, 32, 32)  # 8 MiB
    if channels_last:
        x, big = (t.contiguous(memory_format=torch.channels_last) for t in (x, big))
    torch.ops.pybn.dropout(x, 0.5, None, None)
    assert advised == []
    y = torch.ops.pybn.dropout(big, 0.5, None, None)[0]
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert advised == [(y.data_ptr(), y.nbytes)]


def test_numpy_switch_turns_the_advice_off(advised, numpy_advice_off):
    torch.ops.pybn.dropout(torch.randn(32, 64, 32, 32), 0.5, None, None)
    assert advised == []


@pytest.mark.parametrize("numel, expected", [((4 << 20) // 4 - 1, False), ((4 << 20) // 4, True)])
def test_only_outputs_of_4_mib_or_more_are_advised(advised, numel, expected):
    for last in (False, True):
        _layout.empty(torch.empty(1, 1, numel), last)
    assert [nbytes for _, nbytes in advised] == ([numel * 4] * 2 if expected else [])


def test_fake_tensors_are_not_advised():
    with FakeTensorMode():
        x = torch.empty(1, 8, 1 << 20)
        y = _layout.empty(x, False)
        z = _layout.empty(x, True)
    assert y.shape == z.shape == x.shape


def test_symbolic_shapes_compile_and_export():
    """torch.compile's dynamic shapes and torch.export's dims give the fake implementations
    tensors whose nbytes cannot be computed: the advice must not ask them."""
    torch.manual_seed(0)
    eager = pybn.torch.accelerate(torch.nn.Sequential(torch.nn.BatchNorm2d(8), torch.nn.ReLU()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's own deprecation warnings while compiling)
        compiled = torch.compile(copy.deepcopy(eager), dynamic=True)
        for n in (2, 3):
            x = torch.randn(n, 8, 6, 6)
            torch.testing.assert_close(compiled(x), eager(x))
        batch = torch.export.Dim("batch", min=2, max=1024)
        program = torch.export.export(eager.eval(), (torch.randn(4, 8, 6, 6),), dynamic_shapes=({0: batch},))
    x = torch.randn(7, 8, 6, 6)
    torch.testing.assert_close(program.module()(x), eager(x))
