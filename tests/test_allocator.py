"""pybn.keep_freed_memory: after the call, arrays of a training loop's sizes (1 MB, and 50 MB,
past glibc's largest dynamic mmap threshold) are reused memory, not fresh pages; checked by
the minor page faults of a child process (the setting is process-wide)."""
import json

import pytest

from child_process import run_child

LOOP = """
import json, resource, sys
import numpy as np
import pybn
kept = pybn.keep_freed_memory() if sys.argv[1] == "keep" else None

def faults_per_step(nbytes, steps=20):
    for _ in range(3):
        np.ones(nbytes // 8)  # allocated, written, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        a, b = np.ones(nbytes // 8), np.ones(nbytes // 8)
        del a, b
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps

print(json.dumps({"kept": kept, "1MB": faults_per_step(1 << 20), "50MB": faults_per_step(50 << 20)}))
"""


def _run(mode):
    proc = run_child(LOOP, mode)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_freed_memory_is_reused():
    glibc = run_child("import pybn._allocator as a; print(a._glibc() is not None)")
    if glibc.stdout.strip() != "True":
        pytest.skip("the C library is not glibc: keep_freed_memory returns False and changes nothing")
    default, kept = _run("default"), _run("keep")
    assert kept["kept"] is True
    # Without it, 50 MB blocks are fresh mappings on every step (past the largest threshold
    # glibc raises itself to): 563 faults a step here, NumPy advising them for huge pages;
    # 27 with it. Two fresh 1 MB blocks are 512 pages (469 a step here without, 13 with).
    assert kept["50MB"] * 10 < default["50MB"], (kept, default)
    assert kept["1MB"] < 64, kept


def test_returns_false_without_glibc(monkeypatch):
    import pybn
    import pybn._allocator as allocator

    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert pybn.keep_freed_memory() is False


@pytest.mark.parametrize("library", ["libjemalloc.so.2", "libtcmalloc_minimal.so.4"])
def test_returns_false_with_another_allocator_preloaded(library):
    """With jemalloc or tcmalloc in LD_PRELOAD, glibc's mallopt tunes an allocator nobody
    uses (tcmalloc's own accepts and ignores it): True said the settings took."""
    import os

    found = [os.path.join(d, library) for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                                                 "/usr/lib64", "/usr/lib") if os.path.exists(os.path.join(d, library))]
    if not found:
        pytest.skip(f"{library} is not installed (Debian: libjemalloc2, libtcmalloc-minimal4)")
    proc = run_child("import pybn; print(pybn.keep_freed_memory())", env={"LD_PRELOAD": found[0]})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
