"""``python -m pybn bench``: pybn's batch-norm kernels against torch, NumPy, onnxruntime
and the memory-bandwidth bound. The method is described in docs/benchmark.md."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line arguments ``argv``; returns the exit status."""
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
