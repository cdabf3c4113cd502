"""Out of memory: every kernel raises MemoryError or returns the right result, never a signal.

Each test runs tests/memory_limit_child.py in a child process (with a timeout, so the suite
can neither die nor hang): it calls kernels under an address-space limit (RLIMIT_AS) swept
from nothing above what is mapped to past every kernel's scratch, with 1 and 2 threads.
An allocation that fails inside a parallel region would end the child with SIGABRT
("terminate called after throwing an instance of 'std::bad_alloc'"); the kernels allocate
their scratch before their parallel regions, so a failure reaches Python as MemoryError.

glibc serves large allocations from recycled heap memory once it has seen them freed
(its mmap threshold adapts), so they would need no new address space and the limit would
not bite; the child runs with a fixed threshold (MALLOC_MMAP_THRESHOLD_) instead.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import memory_limit_child as child

CHILD = Path(__file__).with_name("memory_limit_child.py")
GROUPS = {
    "nchw": [c for c in child.CASES if c.endswith("-nchw")],
    "nchw-blocked": [c for c in child.CASES if c.endswith("-nchw-blocked")],
    "nhwc": [c for c in child.CASES if c.endswith("-nhwc")],
    "wide": [c for c in child.CASES if c.endswith("-wide")],
    "wide-rows": [c for c in child.CASES if c.endswith("-wide-rows")],
    "dropout-fold": ["dropout", "dropout-noise-shape", "dropout-mask-apply", "drop-block", "fold"],
}
# Groups whose kernels need enough scratch (or Python-side arrays) that the sweep must see
# both outcomes: a sweep that never fails would test nothing.
MUST_FAIL = {"wide", "wide-rows", "dropout-fold"}


def test_groups_cover_every_case():
    assert sorted(c for g in GROUPS.values() for c in g) == sorted(child.CASES)


@pytest.mark.parametrize("threads", [1, 2], ids=["t1", "t2"])
@pytest.mark.parametrize("group", list(GROUPS))
def test_out_of_memory_raises_memory_error(group, threads):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONFAULTHANDLER="1")
    proc = subprocess.run([sys.executable, str(CHILD), str(threads), *GROUPS[group]], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    where = lines[-1] if lines else "(no output)"
    assert proc.returncode >= 0, (f"killed by {signal.Signals(-proc.returncode).name} at '{where}'\n"
                                  + proc.stderr[-2000:])
    assert proc.returncode == 0 and lines and lines[-1] == "done", proc.stdout[-2000:] + proc.stderr[-2000:]
    outcomes = {}
    for line in lines[:-1]:
        name, margin, outcome = line.split()
        outcomes.setdefault(name, []).append(outcome)
    assert set(outcomes) == set(GROUPS[group])
    for name, seen in outcomes.items():
        assert len(seen) == len(child.MARGINS), name
        assert set(seen) <= {"ok", "MemoryError"}, f"{name}: {seen}"
        assert seen[-1] == "ok", f"{name}: fails even with {child.MARGINS[-1]} bytes to spare"
    if group in MUST_FAIL:
        assert any("MemoryError" in seen for seen in outcomes.values()), "the limit never bit"
