"""``python -m pybn fold IN.onnx OUT.onnx``: fold batch norms and remove Dropout/Identity in an
ONNX model (pybn.onnx.fold), print what changed and the node counts before and after."""
from __future__ import annotations

import argparse
import collections
import sys
from typing import Any


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pybn fold",
        description="Fold inference-mode BatchNormalization into the neighbouring Conv, ConvTranspose, "
                    "Gemm or MatMul(+Add), and remove Dropout and Identity, where that is exact "
                    "(constant weights, a single consumer). Needs the onnx package.")
    p.add_argument("input", metavar="IN.onnx", help="the model to read")
    p.add_argument("output", metavar="OUT.onnx", help="where to write the folded model")
    return p


def _error(msg: str) -> int:
    lines = [line.strip() for line in str(msg).splitlines() if line.strip()]
    print(f"pybn fold: error: {lines[0] if lines else 'unknown error'}", file=sys.stderr)
    return 1


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _load(path: str) -> Any:
    import onnx

    model = onnx.load(path)  # external data next to the model is loaded too
    onnx.checker.check_model(model)  # an arbitrary file often parses as some protobuf message
    return model


def _counts(model: Any) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def main(argv: list[str] | None = None) -> int:
    """Run ``fold`` with command-line arguments `argv`; returns the exit status."""
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:  # --help, or a usage error (argparse printed it)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        import onnx

        from . import onnx as pybn_onnx
    except ImportError as e:
        return _error(str(e))
    try:
        model = _load(args.input)
    except OSError as e:
        return _error(f"cannot read {args.input}: {_reason(e)}")
    except Exception as e:  # noqa: BLE001 - any failure to parse or check: one line, no traceback
        return _error(f"{args.input} is not a valid ONNX model: {_reason(e)}")
    folded, report = pybn_onnx.fold(model, return_report=True)
    try:
        onnx.save(folded, args.output)
    except (OSError, ValueError) as e:
        return _error(f"cannot write {args.output}: {_reason(e)}")

    for rec in report:
        print(rec)
    if not report:
        print("nothing to fold")
    before, after = _counts(model), _counts(folded)
    print(f"nodes: {sum(before.values())} -> {sum(after.values())}")
    op_types = sorted(set(before) | set(after))
    width = max((len(op) for op in op_types), default=0)
    for op in op_types:
        print(f"  {op:<{width}} {before[op]:>5} -> {after[op]}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
