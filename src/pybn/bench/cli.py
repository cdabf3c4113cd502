"""``python -m pybn bench``: pybn against torch, NumPy, onnxruntime and the bandwidth bound."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import table, torch_bench
from .schema import Context, Kernel, Peer, Section
from .shapes import Shape, parse_shapes, shape_names
from .table import parse_kernels, parse_peers
from .timing import TimingConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pybn bench",
        description="Time pybn's batch-norm kernels against torch, NumPy and onnxruntime and "
                    "against the memory-bandwidth bound measured by pybn's own probe "
                    "(float32, one process, the same arrays). See docs/benchmark.md.")
    parser.add_argument("--shapes", metavar="A,B",
                   help=f"comma-separated shapes to run, of {', '.join(shape_names())} "
                        "(A_cl and L_cl also name A' and L'); default: all")
    parser.add_argument("--kernels", metavar="K,K",
                   help=f"comma-separated kernels of {', '.join(k.name for k in table.BATCH_NORM_KERNELS)}; "
                        "default: all")
    parser.add_argument("--threads", type=int, metavar="N",
                   help="threads for pybn, torch and onnxruntime (default: pybn.get_num_threads())")
    parser.add_argument("--quick", action="store_true",
                   help="fewer repetitions: one round of 0.06 s per measurement")
    parser.add_argument("--budget", type=float, metavar="S",
                   help="seconds of timed repetitions per round (default 0.15, --quick 0.06)")
    parser.add_argument("--rounds", type=int, metavar="R",
                   help="timing rounds per implementation and cell, taken in turn; the best "
                        "round's median is reported (default 2, --quick 1)")
    peers = [peer.name for peer in table.PEERS]
    parser.add_argument("--peers", metavar="P,P", default=",".join(peers),
                   help=f"peers to run, of {', '.join(peers)} (default: all that are installed)")
    parser.add_argument("--json", metavar="PATH", help="write every number (and every sample) to PATH")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data (default 0)")
    parser.add_argument("--no-dropout", action="store_true", help="skip the dropout rows")
    parser.add_argument("--no-half", action="store_true", help="skip the 16-bit rows (bfloat16, float16)")
    parser.add_argument("--half", action="store_true",
                   help="run only the 16-bit section (bfloat16 and float16 against pybn float32, torch "
                        "and the bound)")
    parser.add_argument("--no-fold", action="store_true", help="skip the folding row")
    parser.add_argument("--no-residual", action="store_true",
                        help="skip the fused-residual rows (relu(bn(x) + r); of the --shapes A, A', L, L')")
    parser.add_argument("--torch", action="store_true",
                   help="run only the torch section (pybn.torch against stock torch through autograd)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch section")
    parser.add_argument("--torch-cells", metavar="W,W",
                   help="torch section: only the cells whose names contain one of these words "
                        "(e.g. 'dropout,resnet'); default: all")
    return parser


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


@dataclass(frozen=True)
class Plan:
    """What the options ask for: the cells of each section, the peers, the timing."""

    cells: dict[Section, Sequence[Any]]
    peers: list[Peer]
    shapes: list[Shape]
    kernels: list[Kernel[Any]]
    cfg: TimingConfig
    rounds: int

    @classmethod
    def of(cls, args: argparse.Namespace) -> Plan:
        """Raises ValueError, naming the option, for a bad one."""
        from .._runtime import MAX_THREADS

        shapes, kernels, peers = parse_shapes(args.shapes), parse_kernels(args.kernels), parse_peers(args.peers)
        if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
            raise ValueError(f"--threads must be in [1, {MAX_THREADS}]")
        if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
            raise ValueError("--budget must be a finite number > 0")
        if args.seed < 0:  # (NumPy's generators take any other int)
            raise ValueError("--seed must be >= 0")
        rounds = args.rounds if args.rounds is not None else 1 if args.quick else 2
        if rounds < 1:
            raise ValueError("--rounds must be >= 1")
        if args.torch and args.no_torch:
            raise ValueError("--torch and --no-torch exclude each other")
        if args.half and (args.no_half or args.torch):
            raise ValueError(f"--half and {'--no-half' if args.no_half else '--torch'} exclude each other")
        torch_cells = [] if args.no_torch else torch_bench.select(args.torch_cells)
        if args.json:  # (checked before the run, not after it)
            folder = os.path.dirname(os.path.abspath(args.json))
            if not os.path.isdir(folder):
                raise ValueError(f"--json {args.json}: no such directory {folder}")
            if os.path.isdir(args.json) or os.path.basename(args.json) in ("", ".", ".."):
                raise ValueError(f"--json {args.json}: is a directory")
        cfg = TimingConfig.quick() if args.quick else TimingConfig()
        if args.budget is not None:
            cfg = replace(cfg, budget=args.budget)
        cells: dict[Section, Sequence[Any]] = {
            table.BATCH_NORM: table.batch_norm_cells(shapes, kernels),
            table.DROPOUT: () if args.no_dropout else table.DROPOUT.cells,
            table.HALF: () if args.no_half else table.HALF.cells,
            table.FOLD: () if args.no_fold else table.FOLD.cells,
            table.TORCH_SECTION: torch_cells,
            table.RESIDUAL: () if args.no_residual else [c for c in table.RESIDUAL.cells if c.shape in shapes]}
        if args.torch:
            cells = {table.TORCH_SECTION: torch_cells}
            peers = [table.TORCH]
        if args.half:
            cells = {table.HALF: table.HALF.cells}
        return cls(cells, peers, shapes, kernels, cfg, rounds)


def _usage_error(message: str) -> int:
    print(f"python -m pybn bench: error: {message}", file=sys.stderr)
    return 2


def _available(peers: list[Peer]) -> tuple[tuple[Peer, ...], dict[str, str]]:
    """The peers that can run here, and why each other one cannot (said in one line each)."""
    missing = {p.name: why for p in peers if (why := p.unavailable()) is not None}
    for name, why in missing.items():
        _progress(f"{name}: skipped, {why}")
    return tuple(p for p in peers if p.name not in missing), missing


def _meta(args: argparse.Namespace, plan: Plan, ctx: Context, missing: dict[str, str]) -> dict[str, Any]:
    import pybn

    versions = {"pybn": pybn.__version__, "numpy": np.__version__}
    for peer in table.PEERS:
        versions.update(peer.versions(used=peer in plan.peers))
    versions["python"] = platform.python_version()
    cfg = ctx.cfg
    return {
        "pybn": pybn.__version__, "isa": pybn.isa(), "threads": ctx.threads,
        "versions": versions, "skipped_peers": missing, "cpu": _cpu_name(), "logical_cpus": os.cpu_count(),
        "cache_bytes": dict(zip(("l2", "l3"), pybn._C.cache_sizes())),
        "dtype": "float32", "quick": bool(args.quick), "seed": args.seed,
        "timing": {"budget_s": cfg.budget, "warmup": cfg.warmup, "min_reps": cfg.min_reps,
                   "max_reps": cfg.max_reps, "rounds": ctx.rounds,
                   "statistic": "median (the lowest of the rounds' medians)"},
        "bounds": {k.name: k.bound.formula for k in table.BATCH_NORM_KERNELS if k.bound is not None},
        "one_pass": {k.name: k.one_pass.formula for k in table.BATCH_NORM_KERNELS if k.one_pass is not None},
        "shapes": {s.name: {"array_shape": list(s.array_shape), "logical_nchw": list(s.logical),
                            "axis": s.axis, "layout": s.layout, "out": s.out,
                            "target": s.target_text(), "note": s.note} for s in plan.shapes},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": _loadavg(),
        "command": _command(args),
    }


def _command(args: argparse.Namespace) -> str:
    return "python -m pybn bench " + " ".join(args.argv)


def _write_json(path: str, data: dict[str, Any]) -> bool:
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
    except OSError as e:
        print(f"python -m pybn bench: cannot write {path}: {e}", file=sys.stderr)
        return False
    return True


def run(args: argparse.Namespace) -> int:
    try:
        plan = Plan.of(args)
    except ValueError as e:
        return _usage_error(str(e))
    import pybn

    if args.torch and table.TORCH.unavailable() is not None:
        return _usage_error("--torch needs torch (pip install 'pybn-kernels[bench]')")
    peers, missing = _available(plan.peers)
    if args.threads is not None:
        pybn.set_num_threads(args.threads)
    ctx = Context(plan.cfg, plan.rounds, pybn.get_num_threads(), peers, _progress, args.seed)
    for peer in peers:
        if peer.set_threads is not None:
            peer.set_threads(ctx.threads)
    sections = [s for s, cells in plan.cells.items() if cells and all(ctx.uses(p) for p in s.needs)]
    data: dict[str, Any] = {"command": _command(args)} if args.torch else {"meta": _meta(args, plan, ctx, missing)}
    _progress(_header(args, plan, ctx))
    t_start = time.perf_counter()
    results = {s: s.run(plan.cells[s], ctx) for s in sections}
    if not args.torch:
        data["meta"].update(elapsed_s=time.perf_counter() - t_start, loadavg_end=_loadavg())
        _progress(f"done in {data['meta']['elapsed_s']:.1f} s")
    print("\n\n".join(s.render(results[s], data.get("meta", {})) for s in sections))
    for s in plan.cells:
        if s.key is None:
            data.update(s.to_json(results[s]))
        else:
            data[s.key] = s.to_json(results[s]) if s in results else None
    if args.json:
        if not _write_json(args.json, data):
            return 2
        _progress(f"wrote {args.json}")
    failed = [f for s in sections for f in s.failures(results[s])]
    if failed:
        print(f"\nERROR: {len(failed)} implementation(s) or cell(s) returned wrong results or failed; see above.",
              file=sys.stderr)
        return 1
    return 0


def _header(args: argparse.Namespace, plan: Plan, ctx: Context) -> str:
    import pybn

    quick = " (quick)" if args.quick else ""
    if args.torch:
        return f"pybn torch section: {ctx.threads} threads, {len(plan.cells[table.TORCH_SECTION])} cells{quick}"
    if args.half:
        return f"pybn {pybn.__version__} 16-bit section: ISA {pybn.isa()}, {ctx.threads} threads{quick}"
    return (f"pybn {pybn.__version__} bench: ISA {pybn.isa()}, {ctx.threads} threads, "
            f"shapes {','.join(s.name for s in plan.shapes)}, kernels {','.join(k.name for k in plan.kernels)}{quick}")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error (argparse printed it)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    args.argv = argv
    return run(args)
