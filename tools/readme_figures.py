#!/usr/bin/env python3
"""Print the README's headline table from the JSON of ``python -m pybn bench --json PATH``.

    python -m pybn bench --json bench.json
    python tools/readme_figures.py bench.json

One markdown table: per shape and batch-norm kernel, pybn's time as a % of the
memory-bandwidth bound and the ratios peer time / pybn time for each peer that ran; per
dropout row, pybn's time as a % of a copy of x and the ratio to torch. Above it, the machine
(CPU model, logical CPUs, ISA path, threads) and the date from the JSON; below it, the
commands that produced it. How the numbers are measured: docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pybn.bench.table import BATCH_NORM_KERNELS, PEERS

PEER_TITLES = {p.name: p.title for p in PEERS}            # in column order
KERNEL_TITLES = {k.name: k.title for k in BATCH_NORM_KERNELS}
DROPOUT_PEERS = ("torch",)                                  # the dropout rows' ratios


def _pct(part: float | None, whole: float | None) -> str:
    if part is None or whole is None or whole <= 0:
        return "–"
    return f"{part / whole * 100:.0f}%"


def _ratio(r: float | None) -> str:
    if r is None:
        return "–"
    return f"{r:.2f}x" if r < 10 else f"{r:.1f}x" if r < 100 else f"{r:.0f}x"


def _shape_text(name: str, meta: dict[str, Any]) -> str:
    s = meta["shapes"].get(name)
    if s is None:
        return name
    return f"{name} {tuple(s['array_shape'])} {s['layout']}"


def _peers_run(data: dict[str, Any]) -> list[str]:
    """The peers with a time in some batch-norm cell, in column order."""
    timed = {p for c in data["cells"] for p, t in c["peer_s"].items() if t is not None}
    return [p for p in PEER_TITLES if p in timed]


def _batch_norm_rows(data: dict[str, Any], peers: list[str], shapes: list[str] | None) -> list[list[str]]:
    rows = []
    for c in data["cells"]:
        if shapes is not None and c["shape"] not in shapes:
            continue
        pct = "WRONG" if "pybn" in c["errors"] else _pct(c["bound_s"], c["pybn_s"])
        rows.append([_shape_text(c["shape"], data["meta"]), KERNEL_TITLES.get(c["kernel"], c["kernel"]), pct]
                    + [_ratio(c["ratios"].get(p)) for p in peers])
    return rows


def _dropout_rows(data: dict[str, Any], peers: list[str], shapes: list[str] | None) -> list[list[str]]:
    dropout = data.get("dropout")
    if not dropout:
        return []
    rows = []
    for name, shape in dropout["shapes"].items():
        if shapes is not None and name not in shapes:
            continue
        for kernel, r in shape["rows"].items():
            t = r["pybn_s"]
            ratios = [_ratio(r["peers"][p] / t) if p in DROPOUT_PEERS and p in r["peers"] else "–" for p in peers]
            rows.append([f"{name} {tuple(shape['shape'])}", f"dropout {kernel}", _pct(r["t_stream_s"], t) + " of copy"]
                        + ratios)
    return rows


def _stamp(meta: dict[str, Any]) -> str:
    threads = meta["threads"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v not in ("not used", "not installed"))
    return (f"Measured on {meta['cpu']} ({meta['logical_cpus']} logical CPUs), ISA path `{meta['isa']}`, "
            f"{threads} thread{'s' if threads != 1 else ''}, on {meta['date'][:10]} ({versions}).")


def render(data: dict[str, Any], path: str, shapes: list[str] | None = None, dropout: bool = True) -> str:
    """The markdown: the stamp, the table, the commands."""
    meta = data["meta"]
    peers = _peers_run(data)
    header = ["shape", "kernel", "% of bound"] + [f"x {PEER_TITLES[p]}" for p in peers]
    rows = _batch_norm_rows(data, peers, shapes) + (_dropout_rows(data, peers, shapes) if dropout else [])
    lines = [_stamp(meta), "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["",
              "% of bound: the memory-bandwidth bound of the kernel (measured by pybn's probe in the same run) "
              "over pybn's time; for dropout, a copy of x. x peer: the peer's time over pybn's (above 1, pybn "
              "is faster); –: not run. Method: docs/benchmark.md.",
              "",
              f"Produced by `{meta['command']}`, then `python tools/readme_figures.py {path}`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the README's headline table from the JSON of "
                                                 "`python -m pybn bench --json PATH`.")
    parser.add_argument("json", metavar="PATH", help="the JSON written by python -m pybn bench --json PATH")
    parser.add_argument("--shapes", metavar="A,B", help="only these shapes (default: every shape in the file)")
    parser.add_argument("--no-dropout", action="store_true", help="leave out the dropout rows")
    args = parser.parse_args(argv)
    try:
        with open(args.json) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        print(f"readme_figures: cannot read {args.json}: {e}", file=sys.stderr)
        return 2
    if "meta" not in data or "cells" not in data:
        print(f"readme_figures: {args.json} has no batch-norm results (made with --torch?)", file=sys.stderr)
        return 2
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()] if args.shapes else None
    print(render(data, args.json, shapes, dropout=not args.no_dropout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
