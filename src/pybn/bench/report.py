"""The batch-norm section's results: targets, the printed table and the JSON."""

from __future__ import annotations

import math
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

from .probe import Probe
from .schema import Cell, Peer, Result
from .shapes import Shape
from .timing import Timing, fmt_time


@dataclass
class CellResult:
    """One cell's measurements: pybn's time, the bound, every peer's time."""

    spec: Cell[Shape, Any]
    bound: float
    one_pass: float = float("nan")     # the kernel's one-pass floor (Kernel.one_pass), from the same probe
    times: dict[str, Timing] = field(default_factory=dict)    # impl key ("pybn", "torch", "torch_out", ...) -> best
    labels: dict[str, str] = field(default_factory=dict)      # impl key -> the exact call
    errors: dict[str, str] = field(default_factory=dict)      # impl key -> why it has no time (wrong result, exception)
    skipped: dict[str, str] = field(default_factory=dict)     # impl key -> why it was not run (no such operator)
    check_err: dict[str, float] = field(default_factory=dict)  # impl key -> worst |error| / tolerance of the check
    rounds: dict[str, list[Timing]] = field(default_factory=dict)  # impl key -> every round; times[key] the best
    probe: Probe | None = None                  # the probe timed with pybn's best round (gives the bound)
    probe_rounds: list[Probe] = field(default_factory=list)  # the probe timed with pybn's batch, in each round
    order: list[str] = field(default_factory=list)           # the implementations run, in timing order

    @property
    def shape(self) -> Shape:
        return self.spec.shape

    @property
    def peers(self) -> tuple[Peer, ...]:
        return self.spec.peers

    # --- derived
    def t(self, key: str) -> float | None:
        tm = self.times.get(key)
        return tm.median if tm is not None else None

    @property
    def pybn(self) -> float | None:
        return self.t("pybn")

    def variant(self, peer: str) -> str | None:
        """The peer's variant reported: the fastest of its calls (torch: the plain call and the out= call)."""
        timed = [i.key for i in self.spec.kernel.variants(peer, self.shape) if self.t(i.key) is not None]
        return min(timed, key=lambda k: self.t(k) or 0.0) if timed else None

    def peer_time(self, peer: str) -> float | None:
        key = self.variant(peer)
        return self.t(key) if key else None

    def peer_wrong(self, peer: str) -> bool:
        """No time for ``peer`` because a variant of it failed."""
        return self.variant(peer) is None and any(i.key in self.errors for i in self.spec.kernel.variants(peer))

    def ratio(self, peer: str) -> float | None:
        tp, t = self.peer_time(peer), self.pybn
        if tp is None or t is None or t <= 0:
            return None
        return tp / t

    @property
    def pct_bound(self) -> float | None:
        t = self.pybn
        return None if t is None or t <= 0 else self.bound / t * 100.0

    @property
    def pct_one_pass(self) -> float | None:
        t = self.pybn
        return None if t is None or t <= 0 or math.isnan(self.one_pass) else self.one_pass / t * 100.0

    @property
    def wrong(self) -> list[str]:
        return sorted(self.errors)

    def misses(self) -> list[str]:
        """Why this cell misses its target ([] when it meets it)."""
        s = self.shape
        out = []
        if "pybn" in self.errors:
            return ["pybn result WRONG"]
        pct = self.pct_bound
        if pct is None:
            return ["pybn not measured"]
        if s.target_kind == "bound":
            if pct < s.target:
                out.append(f"{pct:.0f}% of bound < {s.target:.0f}%")
        else:  # a ratio to the peer named by target_kind
            r = self.ratio(s.target_kind)
            if r is None:
                out.append(f"no {s.target_kind} time to compare")
            elif r < s.target:
                out.append(f"{r:.2f}x {s.target_kind} < {s.target:.1f}x")
        for peer in self.peers:
            r = self.ratio(peer.name)
            if r is None or peer.name == s.target_kind:
                continue  # not measured, or its own threshold above (T: not slower, B: 1.3x)
            if r <= 1.0:
                out.append(f"not faster than {peer.title} ({r:.2f}x)")
        return out

    def as_dict(self) -> dict[str, Any]:
        peers = [p.name for p in self.peers]
        bound, one_pass = self.spec.bound, self.spec.kernel.one_pass
        return {"shape": self.shape.name, "kernel": self.spec.kernel.name, "bound_s": self.bound,
                "bound_formula": bound.formula if bound is not None else None,
                "probe": self.probe.as_dict(samples=False) if self.probe is not None else None,
                "probe_rounds": [p.as_dict() for p in self.probe_rounds],
                "pybn_s": self.pybn, "pct_of_bound": self.pct_bound,
                "one_pass_s": self.one_pass if self.pct_one_pass is not None else None,
                "one_pass_formula": one_pass.formula if one_pass is not None else None,
                "pct_of_one_pass": self.pct_one_pass,
                "torch_variant": self.variant("torch"),
                "ratios": {p: self.ratio(p) for p in peers},
                "peer_s": {p: self.peer_time(p) for p in peers},
                "target": self.shape.target_text(), "meets_target": not self.misses(),
                "misses": self.misses(),
                "timings": {k: v.as_dict(samples=False) for k, v in self.times.items()},
                "rounds": {k: [t.as_dict() for t in v] for k, v in self.rounds.items()},
                "calls": self.labels, "errors": self.errors, "skipped": self.skipped,
                "check_worst_err_over_tol": self.check_err}


def _peer_time(c: CellResult, peer: Peer) -> str:
    """A peer's column: its time (marked '*' when its out= variant was the faster), or WRONG."""
    if c.peer_wrong(peer.name):
        return "WRONG"
    if not peer.out_variant:
        return fmt_time(c.peer_time(peer.name))
    variant = c.variant(peer.name)
    return fmt_time(c.peer_time(peer.name)) + ("*" if variant is not None and variant != peer.name else " ")


def _marks() -> tuple[str, str]:
    enc = (getattr(sys.stdout, "encoding", None) or "ascii").lower()
    try:
        "\u2713\u2717".encode(enc)
        return "\u2713", "\u2717"
    except (UnicodeEncodeError, LookupError):
        return "ok", "MISS"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def render(meta: Result, probes: Result, cells: list[CellResult]) -> str:
    ok_mark, bad_mark = _marks()
    lines = []
    th = meta['threads']
    lines.append(f"pybn {meta['pybn']} bench: float32, {th} thread{'s' if th != 1 else ''}, ISA {meta['isa']}")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    caches = meta.get("cache_bytes")
    sizes = f"; L2 {caches['l2'] >> 10} KiB a core, L3 counted {caches['l3'] >> 20} MiB" if caches else ""
    lines.append(f"cpu: {meta['cpu']} ({meta['logical_cpus']} logical CPUs{sizes})")
    load = meta.get("loadavg_start")
    if load is not None and meta.get("logical_cpus"):
        note = ""
        if load[0] > 0.25 * meta["logical_cpus"]:
            note = " -- other processes were running: expect noisy times"
        lines.append(f"load average at start (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}{note}")
    t = meta["timing"]
    rounds = t.get("rounds", 1)
    lines.append(f"timing: median of >= {t['min_reps']} calls and >= {t['budget_s']:g} s "
                 f"(3 calls for slow ones, at most {t['max_reps']}) after {t['warmup']} warm-up "
                 f"calls, each implementation in its own batch (pybn's with the probe's calls in turn)"
                 + (f"; {rounds} rounds in turn, the best round's median" if rounds > 1 else "")
                 + (" [--quick]" if meta.get("quick") else ""))
    lines.append("")
    lines.append(f"bandwidth probe (pybn._C, {th} thread{'s' if th != 1 else ''}, same array size), "
                 "timed call for call with pybn in every round;")
    lines.append("median [min-max] over the shape's probe batches:")
    lines.append(f"  {'shape':<6} {'array':>9} {'t_read':>10} {'[min-max]':>19} {'read':>10}"
                 f" {'t_stream':>10} {'[min-max]':>19} {'stream':>10}")
    for name, p in probes.items():
        rng_r = f"[{fmt_time(p['t_read_min_s'])}-{fmt_time(p['t_read_max_s'])}]"
        rng_s = f"[{fmt_time(p['t_stream_min_s'])}-{fmt_time(p['t_stream_max_s'])}]"
        lines.append(f"  {name:<6} {p['bytes'] / 1e6:>6.1f} MB {fmt_time(p['t_read_s']):>10} {rng_r:>19} "
                     f"{p['read_GBps']:>5.1f} GB/s {fmt_time(p['t_stream_s']):>10} {rng_s:>19} "
                     f"{p['stream_GBps']:>5.1f} GB/s")
    kernels = list(dict.fromkeys(c.spec.kernel for c in cells))
    nbsp = "\N{NO-BREAK SPACE}"   # each "kernel = bound" stays on one line
    bounds = ", ".join(f"{k.label} = {k.bound.formula}".replace(" ", nbsp) for k in kernels if k.bound is not None)
    floors = ", ".join(f"{k.label} = {k.one_pass.formula}".replace(" ", nbsp) for k in kernels
                       if k.one_pass is not None)
    note = (f"stream GB/s counts bytes read + written. Bounds: {bounds}; t_read and t_stream the medians of the "
            "probe calls made in turn with pybn's calls in pybn's best round of that cell (the same seconds, "
            "the same machine state)."
            + (f" One-pass floors (%1pass, each input read from memory once): {floors}." if floors else ""))
    lines += [line.replace(nbsp, " ") for line in
              textwrap.wrap(note, width=100, initial_indent="  ", subsequent_indent="  ")]
    lines.append("")

    peers = cells[0].peers if cells else ()
    cols = [("shape", 5, "<"), ("kernel", 6, "<"), ("pybn", 10, ">"), ("bound", 10, ">"), ("%bound", 6, ">"),
            ("%1pass", 6, ">")]
    for peer in peers:   # a peer with an out= variant gets room for its '*'
        cols += [(peer.column, 11 if peer.out_variant else 10, ">"), ("x", 6, ">")]
    cols += [("target", 13, "<"), ("ok", 2, "<")]

    def row(vals: list[str]) -> str:
        return " ".join(f"{v:{a}{w}}" for v, (_, w, a) in zip(vals, cols)).rstrip()

    lines.append(row([c[0] for c in cols]))
    lines.append(row(["-" * c[1] for c in cols]))
    n_ok = 0
    misses = []
    prev = None
    for c in cells:
        if prev is not None and prev != c.shape.name:
            lines.append("")
        prev = c.shape.name
        pybn_s = "WRONG" if "pybn" in c.errors else fmt_time(c.pybn) + ("*" if c.shape.out else " ")
        pct = "-" if c.pct_bound is None else f"{c.pct_bound:.0f}%"
        pct1 = "-" if c.pct_one_pass is None else f"{c.pct_one_pass:.0f}%"
        vals = [c.shape.name, c.spec.kernel.label, pybn_s, fmt_time(c.bound), pct, pct1]
        for peer in peers:
            vals += [_peer_time(c, peer), _ratio(c.ratio(peer.name))]
        m = c.misses()
        if not m:
            n_ok += 1
        else:
            misses.append((c, m))
        vals += [c.shape.target_text(), ok_mark if not m else bad_mark]
        lines.append(row(vals))
    lines.append("")
    lines.append("x = peer time / pybn time (> 1: pybn is faster). %bound = bound / pybn time * 100. "
                 "ok: the target met and pybn faster than every peer measured.")
    lines.append("%1pass = one-pass floor / pybn time * 100: the floor channels-first arrays can reach by reading "
                 "each input once; channels-last arrays past the L3 cache cannot (docs/performance.md).")
    outs = sorted({c.shape.name for c in cells if c.shape.out})
    if outs:
        lines.append(f"* = preallocated output (out=): pybn always on {', '.join(outs)}; torch on these shapes "
                     "is the faster of its plain call and its out= call, * where out= won.")
    if any(c.shape.channels_last for c in cells):
        lines.append("channels-last rows: torch gets the NCHW-logical tensor in channels_last memory format; "
                     "onnxruntime gets the (N*H*W, C) view.")
    lines.append("")
    lines.append(f"targets met in {n_ok} of {len(cells)} cells")
    for c, m in misses:
        lines.append(f"  {bad_mark} {c.shape.name} {c.spec.kernel.title}: " + "; ".join(m))
    wrong = [(c, k, v) for c in cells for k, v in c.errors.items()]
    if wrong:
        lines.append("")
        lines.append("WRONG RESULTS OR ERRORS (not timed):")
        for c, k, v in wrong:
            lines.append(f"  {c.shape.name} {c.spec.kernel.title} {k}: {v}")
    return "\n".join(lines)


def to_json(meta: Result, probes: Result, cells: list[CellResult]) -> Result:
    return {"meta": meta,
            "probe": probes,
            "cells": [c.as_dict() for c in cells]}


def render_section(result: Result, meta: Result) -> str:
    return render(meta, result["probe"], result["cells"])


def section_json(result: Result) -> Result:
    """The section's part of the JSON: "probe" and "cells" (at the top level, beside "meta")."""
    return {"probe": result["probe"], "cells": [c.as_dict() for c in result["cells"]]}


def rows_with_peers(result: Result, first_cells: Callable[[str, str, Result], list[str]]) -> list[str]:
    """The lines of a section's table (dropout, residual): for each shape and row,
    `first_cells(shape, row name, row)`, then each peer's time and pybn's speed-up over it."""
    lines = []
    for shape_name, res in result["shapes"].items():
        for name, r in res["rows"].items():
            cols = first_cells(shape_name, name, r)
            for peer in result["peers"]:
                tp = r["peers"].get(peer)
                cols += [f"{fmt_time(tp):>11}", f"{tp / r['pybn_s']:>5.1f}x" if tp else f"{'-':>6}"]
            lines.append(" ".join(cols))
    return lines
