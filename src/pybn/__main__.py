"""Command line: ``python -m pybn info``, ``python -m pybn bench`` and ``python -m pybn fold``."""
from __future__ import annotations

import argparse
import sys


def info() -> int:
    import numpy as np

    import pybn

    print(f"pybn {pybn.__version__}")
    print(f"isa: {pybn.isa()} (supported: {', '.join(pybn.supported_isas())})")
    print(f"threads: {pybn.get_num_threads()}")
    print(f"numpy {np.__version__}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after it, --help included, is the benchmark's
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "fold":  # likewise: python -m pybn fold IN.onnx OUT.onnx
        from ._fold_cli import main as fold_main

        return fold_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m pybn", description="pybn's commands: info, bench and fold.")
    parser.add_argument("command", choices=["info", "bench", "fold"], help="info: version, ISA, threads; "
                        "bench: the side-by-side benchmark (python -m pybn bench --help); "
                        "fold: fold batch norm in an ONNX model (python -m pybn fold IN.onnx OUT.onnx)")
    parser.parse_args(argv)
    return info()


if __name__ == "__main__":
    sys.exit(main())
