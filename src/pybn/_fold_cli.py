"""``python -m pybn fold IN.onnx OUT.onnx``: fold batch norms and remove Dropout/Identity in an
ONNX model (pybn.onnx.fold), print what changed, what was left and why, and the node counts
before and after.

Every failure is one line on stderr and exit status 1 (2 for a usage error, as argparse does;
128 + the signal's number when interrupted by SIGINT, SIGTERM or SIGHUP). OUT is written through a
temporary file in its folder and renamed into place once complete, so a failure never leaves
a partial OUT, and IN survives ``fold M.onnx M.onnx``. Tensors stored as external data are read
from IN's folder only as needed and written to one data file next to OUT.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import stat
import sys
from collections.abc import Iterator
from typing import Any

_PROTOBUF_LIMIT = 2**31 - 1  # bytes: the largest file a protobuf message can be read from


class _Failure(Exception):
    """A failure to report as the one line of its message."""


class _Interrupted(BaseException):
    """A terminating signal, raised where the program is so that temporary files are removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pybn fold",
        description="Fold inference-mode BatchNormalization, and Mul/Add chains by per-channel constants, into "
                    "the neighbouring Conv, ConvTranspose, Gemm or MatMul(+Add), and remove Dropout and "
                    "Identity, where that is exact (constant weights, a single consumer). Needs the onnx package.")
    p.add_argument("input", metavar="IN.onnx", help="the model to read")
    p.add_argument("output", metavar="OUT.onnx", help="where to write the folded model (may be IN.onnx)")
    p.add_argument("--merge-branches", action="store_true",
                   help="also merge Conv branches summed over one input (RepVGG / MobileOne blocks) into one Conv")
    return p


def _printable(text: str) -> str:
    """`text` with the bytes of a file name that is not UTF-8 (surrogate escapes, which a
    strict stream refuses: the folded model written, then "was not written") as \\xNN."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # (another lone surrogate)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(msg: str) -> None:
    lines = [line.strip() for line in str(msg).splitlines() if line.strip()]
    print(_printable(f"pybn fold: error: {lines[0] if lines else 'unknown error'}"), file=sys.stderr)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # (_onnx_files.one_line's,
    return f"{type(e).__name__}: {text}" if text else type(e).__name__                # without importing onnx)


def main(argv: list[str] | None = None) -> int:
    """Run ``fold`` with command-line arguments `argv`; returns the exit status."""
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:  # --help, or a usage error (argparse printed it)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        with _SignalsRaise():
            return _run(args.input, args.output, args.merge_branches)
    except _Failure as e:
        _error(str(e))
    except _Interrupted as e:
        _error(f"interrupted by {signal.Signals(e.signum).name}; {args.output} was not written")
        return 128 + e.signum
    except KeyboardInterrupt:
        _error(f"interrupted; {args.output} was not written")
        return 128 + signal.SIGINT
    except Exception as e:  # noqa: BLE001 - anything else is still one line, not a traceback
        _error(f"unexpected error, {args.output} was not written: {_reason(e)}")
    return 1


class _SignalsRaise:
    """SIGTERM and SIGHUP raise _Interrupted (SIGINT raises KeyboardInterrupt already) while
    the program runs, so that the temporary files of a write are removed."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            raise _Interrupted(signum)

        self.previous = {}
        for s in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread (main() called from a thread): leave them
                self.previous[s] = signal.signal(s, handler)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def _run(path_in: str, path_out: str, merge_branches: bool = False) -> int:
    try:
        from .onnx import fold_model  # (first: its import names the extra to install when onnx is missing)
        from . import _onnx_files
    except ImportError as e:
        raise _Failure(str(e)) from None
    model = _load(path_in)
    external = _onnx_files.ExternalData(os.path.dirname(os.path.abspath(path_in)))
    try:
        folded, report = fold_model(model, external, merge_branches)
    except ValueError as e:
        raise _Failure(f"{path_in} is not a valid ONNX model: {_reason_of_model(e)}") from None
    before = _counts(model)  # before save: save makes folded's tensors external
    after = _counts(folded)
    try:
        data_name = _onnx_files.save(folded, path_out, external, keep=(path_in,))
    except ValueError as e:  # an external data file of IN, or a model too large to serialize
        raise _Failure(f"cannot write {path_out}: {_reason_of_model(e)}") from None
    except OSError as e:
        raise _Failure(f"cannot write {path_out}: {_reason(e)}") from None
    try:
        for line in _summary(report, before, after):
            print(_printable(line))
        print(_printable(f"wrote {path_out}" + (f" (weights in {data_name} next to it)" if data_name else "")),
              flush=True)
    except OSError as e:  # stdout closed or full: OUT is written all the same
        _quiet_stdout()
        raise _Failure(f"{path_out} was written, but its summary could not be printed: {_reason(e)}") from None
    return 0


def _quiet_stdout() -> None:
    """After a write to the process's stdout failed (a closed pipe), what is left in its buffer
    would fail again, with a traceback, when Python flushes it at exit: its descriptor goes to
    /dev/null. Left alone when sys.stdout is another stream (a caller's capture)."""
    stdout = sys.__stdout__
    if stdout is None or sys.stdout is not stdout:
        return
    try:
        fd = stdout.fileno()
    except (OSError, ValueError):  # (no descriptor)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _reason_of_model(e: ValueError) -> str:
    text = str(e)
    return text[len("model: "):] if text.startswith("model: ") else text


def _utf8(path: str) -> bool:
    """Whether `path` is UTF-8 text: a file name of other bytes (a Latin-1 \xe9) comes to Python
    as surrogate escapes, which onnx's checker refused as "incompatible function arguments"."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _load(path: str) -> Any:
    """The model at `path`, checked by path (so external data of any size is checked in
    place), without its external data (read later, as needed)."""
    import onnx

    try:
        st = os.stat(path)
    except OSError as e:
        raise _Failure(f"cannot read {path}: {_reason(e)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _Failure(f"cannot read {path}: not a regular file")
    if st.st_size > _PROTOBUF_LIMIT:
        raise _Failure(f"{path} is not a valid ONNX model: {st.st_size} bytes, more than the 2 GiB a protobuf "
                       "file can hold (larger models keep their weights in external data files)")
    try:
        if _utf8(path):  # (onnx's checker takes a path as UTF-8 text; the fold checks the model again)
            onnx.checker.check_model(path)  # an arbitrary file often parses as some protobuf message
        return onnx.load(path, load_external_data=False)
    except OSError as e:
        raise _Failure(f"cannot read {path}: {_reason(e)}") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse or check: one line, no traceback
        raise _Failure(f"{path} is not a valid ONNX model: {_reason(e)}") from None


def _counts(model: Any) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph.node)


def _summary(report: list[Any], before: collections.Counter[str], after: collections.Counter[str]) -> Iterator[str]:
    yield from (str(rec) for rec in report)
    if all(hasattr(rec, "reason") for rec in report):  # only what was left (NotFolded)
        yield "nothing to fold"
    yield f"nodes: {sum(before.values())} -> {sum(after.values())}"
    op_types = sorted(set(before) | set(after))
    width = max((len(op) for op in op_types), default=0)
    for op in op_types:
        yield f"  {op:<{width}} {before[op]:>5} -> {after[op]}"


if __name__ == "__main__":
    sys.exit(main())
