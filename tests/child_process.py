"""Run a Python snippet in a child process that cannot hang the test run.

The child gets its own session: on timeout the whole process group is killed (a forked
grandchild that hangs too), and the test fails saying the child hung.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest


def run_child(code: str | os.PathLike, *args: str, timeout: float = 120, env: dict | None = None,
              cwd: str | os.PathLike | None = None, **popen) -> subprocess.CompletedProcess:
    """Run ``python -c code args`` (``python code args`` for a path) in a clean folder (so the
    installed pybn is imported, not the source tree) without PYBN_ISA; fail the test if it
    outlives `timeout` seconds."""
    full_env = dict(os.environ)
    full_env.pop("PYBN_ISA", None)
    full_env.update(env or {})
    source = [os.fspath(code)] if isinstance(code, os.PathLike) else ["-c", textwrap.dedent(code)]
    cmd = [sys.executable, *source, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=cwd or tempfile.gettempdir(),
                            start_new_session=True, **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the child process hung (killed after {timeout} s)\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
