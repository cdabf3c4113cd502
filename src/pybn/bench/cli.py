"""``python -m pybn bench``: pybn against torch, NumPy, onnxruntime and the bandwidth bound."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import numpy as np

from . import peers as P
from .probe import BOUND_FORMULA, Prober, summarize
from .reference import WrongResult, check, make_case
from .report import Cell, render, to_json
from .shapes import KERNEL_TITLES, parse_kernels, parse_shapes, shape_names
from .timing import TimingConfig, fmt_time, measure, measure_alternating

IMPLS = ("torch", "numpy", "ort")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pybn bench",
        description="Time pybn's batch-norm kernels against torch, NumPy and onnxruntime and "
                    "against the memory-bandwidth bound measured by pybn's own probe "
                    "(float32, one process, the same arrays). See docs/benchmark.md.")
    p.add_argument("--shapes", metavar="A,B",
                   help=f"comma-separated shapes to run, of {', '.join(shape_names())} "
                        "(A_cl and L_cl also name A' and L'); default: all")
    p.add_argument("--kernels", metavar="K,K",
                   help="comma-separated kernels of infer, train, backward; default: all")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for pybn, torch and onnxruntime (default: pybn.get_num_threads())")
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions: one round of 0.06 s per measurement")
    p.add_argument("--budget", type=float, metavar="S",
                   help="seconds of timed repetitions per round (default 0.15, --quick 0.06)")
    p.add_argument("--rounds", type=int, metavar="R",
                   help="timing rounds per implementation and cell, taken in turn; the best "
                        "round's median is reported (default 2, --quick 1)")
    p.add_argument("--peers", metavar="P,P", default="torch,numpy,ort",
                   help="peers to run, of torch, numpy, ort (default: all that are installed)")
    p.add_argument("--json", metavar="PATH", help="write every number (and every sample) to PATH")
    p.add_argument("--seed", type=int, default=0, help="seed of the random data (default 0)")
    p.add_argument("--no-dropout", action="store_true", help="skip the dropout rows")
    p.add_argument("--no-fold", action="store_true", help="skip the folding row")
    p.add_argument("--torch", action="store_true",
                   help="run only the torch section (pybn.torch against stock torch through autograd)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch section")
    p.add_argument("--torch-cells", metavar="W,W",
                   help="torch section: only the cells whose names contain one of these words "
                        "(e.g. 'dropout,resnet'); default: all")
    return p


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


def _loadavg():
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


def _versions(pybn, want) -> dict:
    v = {"pybn": pybn.__version__, "numpy": np.__version__}
    if "torch" in want:
        torch = P.torch_module()
        v["torch"] = torch.__version__ if torch is not None else "not installed"
    else:
        v["torch"] = "not used"
    if "ort" in want:
        ort, onnx = P.ort_modules()
        v["onnxruntime"] = ort.__version__ if ort is not None else "not installed"
        if ort is not None:
            v["onnx"] = onnx.__version__ if onnx is not None else "not installed"
    else:
        v["onnxruntime"] = "not used"
    v["python"] = platform.python_version()
    return v


def _run_impl(cell: Cell, impl: str, make, case, cfg: TimingConfig, round_: int, alongside: tuple = ()):
    """One timing round of one implementation, in its own batch; the calls ``alongside`` (the
    probe's) are timed call for call with it. Returns its Timing and theirs, or None and ().

    Round 0 first checks the result of one call against the float64 reference (that call is
    the first warm-up call); a wrong result is reported and never timed.
    """
    kernel = cell.kernel
    if impl in cell.errors or impl in cell.skipped:
        return None, ()
    try:
        runner = make()
    except P.Unavailable as e:
        cell.skipped[impl] = str(e)
        return None, ()
    except Exception as e:  # noqa: BLE001 - a failing implementation is reported, not fatal
        cell.errors[impl] = f"setup raised {type(e).__name__}: {e}"
        _progress(f"ERROR: {impl} {KERNEL_TITLES[kernel]} on {case.shape.name}: setup raised "
                  f"{type(e).__name__}: {e}")
        return None, ()
    cell.labels[impl] = runner.label
    try:
        runner.reset()
        t0 = time.perf_counter()
        ret = runner.call()
        dt = time.perf_counter() - t0
        if round_ == 0:
            outs = runner.outputs(ret)
            state = runner.state() if runner.state is not None else None
            cell.check_err[impl] = check(kernel, case, outs, state)
            del outs, state
        del ret
    except WrongResult as e:
        cell.errors[impl] = f"wrong result: {e}"
        _progress(f"ERROR: {impl} {KERNEL_TITLES[kernel]} on {case.shape.name} is WRONG: {e}")
        return None, ()
    except Exception as e:  # noqa: BLE001
        cell.errors[impl] = f"raised {type(e).__name__}: {e}"
        _progress(f"ERROR: {impl} {KERNEL_TITLES[kernel]} on {case.shape.name} raised "
                  f"{type(e).__name__}: {e}")
        return None, ()
    try:
        if alongside:
            timing, *others = measure_alternating((runner.call, *alongside), cfg)
        else:
            timing, others = measure(runner.call, cfg, calls_done=1, last_call_s=dt), ()
    except Exception as e:  # noqa: BLE001
        cell.errors[impl] = f"raised {type(e).__name__} while timed: {e}"
        _progress(f"ERROR: {impl} {KERNEL_TITLES[kernel]} on {case.shape.name} raised "
                  f"{type(e).__name__} while timed: {e}")
        return None, ()
    cell.rounds.setdefault(impl, []).append(timing)
    best = cell.times.get(impl)
    if best is None or timing.median < best.median:
        cell.times[impl] = timing
    del runner
    return timing, tuple(others)


def run(args) -> int:
    try:
        shapes = parse_shapes(args.shapes)
        kernels = parse_kernels(args.kernels)
        want = [p.strip().lower() for p in (args.peers or "").split(",") if p.strip()]
        for p in want:
            if p not in IMPLS:
                raise ValueError(f"unknown peer {p!r}; choose from {', '.join(IMPLS)}")
        if args.threads is not None and args.threads < 1:
            raise ValueError("--threads must be >= 1")
        if args.budget is not None and args.budget <= 0:
            raise ValueError("--budget must be > 0")
        if args.rounds is None:
            args.rounds = 1 if args.quick else 2
        if args.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        if args.torch and args.no_torch:
            raise ValueError("--torch and --no-torch exclude each other")
        torch_cells = _torch_cells(args.torch_cells) if not args.no_torch else None
        if args.json:
            folder = os.path.dirname(os.path.abspath(args.json))
            if not os.path.isdir(folder):
                raise ValueError(f"--json {args.json}: no such directory {folder}")
    except ValueError as e:
        print(f"python -m pybn bench: error: {e}", file=sys.stderr)
        return 2

    import pybn

    # A peer that is not installed is left out, in one line; pybn, NumPy and the bound still run.
    requested = want
    unavailable = {p: why for p in want if (why := P.cannot_import(p)) is not None}
    for p, why in unavailable.items():
        _progress(f"{p}: skipped, {why}")
    want = [p for p in want if p not in unavailable]
    if args.threads is not None:
        pybn.set_num_threads(args.threads)
    threads = pybn.get_num_threads()
    torch = P.torch_module() if "torch" in want else None
    if torch is not None:
        torch.set_num_threads(threads)
    cfg = TimingConfig.quick() if args.quick else TimingConfig()
    if args.budget is not None:
        cfg = TimingConfig(budget=args.budget, warmup=cfg.warmup, min_reps=cfg.min_reps,
                           max_reps=cfg.max_reps, pause=cfg.pause)
    if args.torch:
        return _run_torch_only(args, cfg, threads, torch_cells)

    meta = {
        "pybn": pybn.__version__, "isa": pybn.isa(), "threads": threads,
        "versions": _versions(pybn, requested), "skipped_peers": unavailable,
        "cpu": _cpu_name(), "logical_cpus": os.cpu_count(),
        "dtype": "float32", "quick": bool(args.quick), "seed": args.seed,
        "timing": {"budget_s": cfg.budget, "warmup": cfg.warmup, "min_reps": cfg.min_reps,
                   "max_reps": cfg.max_reps, "rounds": args.rounds,
                   "statistic": "median (the lowest of the rounds' medians)"},
        "bounds": BOUND_FORMULA,
        "shapes": {s.name: {"array_shape": list(s.array_shape), "logical_nchw": list(s.logical),
                            "axis": s.axis, "layout": s.layout, "out": s.out,
                            "target": s.target_text(), "note": s.note} for s in shapes},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": _loadavg(),
        "command": "python -m pybn bench " + " ".join(args.argv),
    }
    _progress(f"pybn {pybn.__version__} bench: ISA {pybn.isa()}, {threads} threads, "
              f"shapes {','.join(s.name for s in shapes)}, kernels {','.join(kernels)}"
              + (" (quick)" if args.quick else ""))
    probes = {}
    cells = []
    n_cells = len(shapes) * len(kernels)
    t_start = time.perf_counter()
    for shape in shapes:
        t_shape = time.perf_counter()
        case = make_case(shape, seed=args.seed, need_backward="backward" in kernels)
        prober = Prober(case.x)
        _progress(f"{shape.name:<3} {shape.describe()}: data, float64 reference and probe check "
                  f"{time.perf_counter() - t_shape:.1f} s")
        for kernel in kernels:
            t_cell = time.perf_counter()
            cell = Cell(shape=shape, kernel=kernel, bound=float("nan"))
            impls = [("pybn", lambda: P.make_pybn(case, kernel, out=shape.out))]
            if "torch" in want:
                impls.append(("torch", lambda: P.make_torch(case, kernel, out=False)))
                if shape.out:
                    impls.append(("torch_out", lambda: P.make_torch(case, kernel, out=True)))
            if "numpy" in want:
                impls.append(("numpy", lambda: P.make_numpy(case, kernel)))
            if "ort" in want:
                impls.append(("ort", lambda: P.make_ort(case, kernel, threads=threads)))
            paired = []   # (pybn's median, the probe timed with it), per round
            for round_ in range(args.rounds):
                for impl, make in impls:
                    if impl == "pybn":
                        # The bound's probes are timed call for call with pybn's kernel, so all
                        # three medians come from the same seconds of a machine whose memory
                        # changes speed every few seconds (docs/benchmark.md, "The bound").
                        timing, probe = _run_impl(cell, impl, make, case, cfg, round_, alongside=prober.calls())
                        if timing is not None:
                            paired.append((timing.median, prober.record(*probe)))
                    else:
                        _run_impl(cell, impl, make, case, cfg, round_)
                    # (no gc.collect() here: with torch loaded it costs ~70 ms; arrays are freed
                    # by reference counting as soon as a runner goes)
            cell.probe_rounds = [p for _, p in paired]
            # the bound from the probe of pybn's best round (alone, if pybn gave no time)
            cell.probe = (min(paired, key=lambda p: p[0])[1] if paired
                          else prober.record(*measure_alternating(prober.calls(), cfg)))
            cell.bound = cell.probe.bound(kernel)
            cells.append(cell)
            parts = []
            for impl, _ in impls:
                if impl in cell.times:
                    parts.append(f"{impl} {fmt_time(cell.t(impl))}")
                elif impl in cell.errors:
                    parts.append(f"{impl} WRONG")
            pct = cell.pct_bound
            _progress(f"[{len(cells):2d}/{n_cells}] {shape.name:<3} {kernel:<8} "
                      + " | ".join(parts)
                      + f" | bound {fmt_time(cell.bound)}"
                      + (f", {pct:.0f}%" if pct is not None else "")
                      + f"  ({time.perf_counter() - t_cell:.1f} s)")
        probes[shape.name] = summarize(prober.history)
        prober.close()
        del case, prober
        gc.collect()
    dropout_result = None
    if not args.no_dropout:
        from . import dropout_bench

        dropout_result = dropout_bench.run(cfg, args.rounds, want, torch, _progress)
    fold_result = None
    if not args.no_fold:
        from . import fold_bench

        fold_result = fold_bench.run(cfg, args.rounds, want, torch, _progress)
    torch_result = None
    if not args.no_torch and torch is not None:
        from . import torch_bench

        torch_result = torch_bench.run(cfg, args.rounds, threads, _progress, torch_cells)
    elapsed = time.perf_counter() - t_start
    meta["elapsed_s"] = elapsed
    meta["loadavg_end"] = _loadavg()
    _progress(f"done in {elapsed:.1f} s")

    print(render(meta, probes, cells))
    if dropout_result is not None:
        print()
        print(dropout_bench.render(dropout_result))
    if fold_result is not None:
        print()
        print(fold_bench.render(fold_result))
    if torch_result is not None:
        print()
        print(torch_bench.render(torch_result))
    if args.json:
        try:
            with open(args.json, "w") as f:
                data = to_json(meta, probes, cells)
                data["dropout"] = dropout_result
                data["fold"] = fold_result
                data["torch"] = torch_result
                json.dump(data, f, indent=1)
                f.write("\n")
        except OSError as e:
            print(f"python -m pybn bench: cannot write {args.json}: {e}", file=sys.stderr)
            return 2
        _progress(f"wrote {args.json}")
    wrong = [(c, k) for c in cells for k in c.errors]
    if wrong:
        print(f"\nERROR: {len(wrong)} implementation(s) returned wrong results; see above.",
              file=sys.stderr)
        return 1
    return 0


def _torch_cells(spec):
    from .torch_bench import select

    return select(spec)


def _run_torch_only(args, cfg: TimingConfig, threads: int, cells) -> int:
    """``--torch``: the torch section alone."""
    from . import torch_bench

    if P.torch_module() is None:
        print("python -m pybn bench: error: --torch needs torch (pip install 'pybn-kernels[bench]')", file=sys.stderr)
        return 2
    _progress(f"pybn torch section: {threads} threads, {len(cells)} cells" + (" (quick)" if args.quick else ""))
    result = torch_bench.run(cfg, args.rounds, threads, _progress, cells)
    print(torch_bench.render(result))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump({"command": "python -m pybn bench " + " ".join(args.argv), "torch": result}, f, indent=1)
                f.write("\n")
        except OSError as e:
            print(f"python -m pybn bench: cannot write {args.json}: {e}", file=sys.stderr)
            return 2
    return 1 if any("error" in c for c in result["cells"]) else 0


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
