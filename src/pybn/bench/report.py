"""Cells, targets, the printed table and the JSON file."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .probe import BOUND_FORMULA
from .shapes import KERNEL_TITLES
from .timing import Timing, fmt_time

PEERS = ("torch", "numpy", "ort")
PEER_TITLES = {"torch": "torch", "numpy": "NumPy", "ort": "onnxruntime"}
KERNEL_SHORT = {"infer": "infer", "train": "train", "backward": "bwd"}


@dataclass
class Cell:
    """One shape x kernel: pybn's time, the bound, every peer's time."""

    shape: object
    kernel: str
    bound: float
    times: dict = field(default_factory=dict)    # impl -> Timing ("pybn", "torch", "torch_out", "numpy", "ort")
    labels: dict = field(default_factory=dict)   # impl -> the exact call
    errors: dict = field(default_factory=dict)   # impl -> why it has no time (wrong result, exception)
    skipped: dict = field(default_factory=dict)  # impl -> why it was not run (not installed, no such op)
    check_err: dict = field(default_factory=dict)  # impl -> worst |error| / tolerance of the check
    rounds: dict = field(default_factory=dict)   # impl -> [Timing of each round]; times[impl] is the best
    probe: object = None                         # the probe timed with pybn's best round (gives the bound)
    probe_rounds: list = field(default_factory=list)  # the probe timed with pybn's batch, in each round

    # --- derived
    def t(self, impl):
        tm = self.times.get(impl)
        return tm.median if tm is not None else None

    @property
    def pybn(self):
        return self.t("pybn")

    def torch_choice(self):
        """The torch variant reported: the faster of the plain call and the out= call."""
        cands = [(self.t(k), k) for k in ("torch", "torch_out") if self.t(k) is not None]
        return min(cands)[1] if cands else None

    def peer_time(self, peer):
        if peer == "torch":
            k = self.torch_choice()
            return self.t(k) if k else None
        return self.t(peer)

    def ratio(self, peer):
        tp, t = self.peer_time(peer), self.pybn
        if tp is None or t is None or t <= 0:
            return None
        return tp / t

    @property
    def pct_bound(self):
        t = self.pybn
        return None if t is None or t <= 0 else self.bound / t * 100.0

    @property
    def wrong(self):
        return sorted(self.errors)

    def misses(self) -> list:
        """Why this cell misses its target ([] when it meets it)."""
        s = self.shape
        out = []
        if "pybn" in self.errors:
            return ["pybn result WRONG"]
        if self.pybn is None:
            return ["pybn not measured"]
        if s.target_kind == "bound":
            if self.pct_bound < s.target:
                out.append(f"{self.pct_bound:.0f}% of bound < {s.target:.0f}%")
        elif s.target_kind == "torch":
            r = self.ratio("torch")
            if r is None:
                out.append("no torch time to compare")
            elif r < s.target:
                out.append(f"{r:.2f}x torch < {s.target:.1f}x")
        for peer in PEERS:
            r = self.ratio(peer)
            if r is None:
                continue
            if peer == "torch" and s.target_kind == "torch":
                continue  # its own threshold above (T: not slower, B: 1.3x)
            if r <= 1.0:
                out.append(f"not faster than {PEER_TITLES[peer]} ({r:.2f}x)")
        return out

    def as_dict(self) -> dict:
        d = {"shape": self.shape.name, "kernel": self.kernel, "bound_s": self.bound,
             "bound_formula": BOUND_FORMULA[self.kernel],
             "probe": self.probe.as_dict(samples=False) if self.probe is not None else None,
             "probe_rounds": [p.as_dict() for p in self.probe_rounds],
             "pybn_s": self.pybn, "pct_of_bound": self.pct_bound,
             "torch_variant": self.torch_choice(),
             "ratios": {p: self.ratio(p) for p in PEERS},
             "peer_s": {p: self.peer_time(p) for p in PEERS},
             "target": self.shape.target_text(), "meets_target": not self.misses(),
             "misses": self.misses(),
             "timings": {k: v.as_dict(samples=False) for k, v in self.times.items()},
             "rounds": {k: [t.as_dict() for t in v] for k, v in self.rounds.items()},
             "calls": self.labels, "errors": self.errors, "skipped": self.skipped,
             "check_worst_err_over_tol": self.check_err}
        return d


def _marks():
    enc = (getattr(sys.stdout, "encoding", None) or "ascii").lower()
    try:
        "\u2713\u2717".encode(enc)
        return "\u2713", "\u2717"
    except (UnicodeEncodeError, LookupError):
        return "ok", "MISS"


def _ratio(r):
    return "-" if r is None else f"{r:.2f}x"


def render(meta: dict, probes: dict, cells: list) -> str:
    ok_mark, bad_mark = _marks()
    lines = []
    th = meta['threads']
    lines.append(f"pybn {meta['pybn']} bench: float32, {th} thread{'s' if th != 1 else ''}, ISA {meta['isa']}")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    lines.append(f"cpu: {meta['cpu']} ({meta['logical_cpus']} logical CPUs)")
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
    lines.append("  stream GB/s counts bytes read + written. Bounds: infer = t_stream, train = t_read + t_stream,")
    lines.append("  bwd = 3*t_read + t_stream; t_read and t_stream the medians of the probe calls made in turn")
    lines.append("  with pybn's calls in pybn's best round of that cell (the same seconds, the same machine state).")
    lines.append("")

    cols = [("shape", 5, "<"), ("kernel", 6, "<"), ("pybn", 10, ">"), ("bound", 10, ">"),
            ("%bound", 6, ">"), ("torch", 11, ">"), ("x", 6, ">"), ("numpy", 10, ">"),
            ("x", 6, ">"), ("ORT", 10, ">"), ("x", 6, ">"), ("target", 13, "<"), ("ok", 2, "<")]

    def row(vals):
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
        if "pybn" in c.errors:
            pybn_s = "WRONG"
        else:
            pybn_s = fmt_time(c.pybn) + ("*" if c.shape.out else " ")
        pct = "-" if c.pct_bound is None else f"{c.pct_bound:.0f}%"
        tv = c.torch_choice()
        if tv is None and ("torch" in c.errors or "torch_out" in c.errors):
            torch_s = "WRONG"
        else:
            torch_s = fmt_time(c.peer_time("torch")) + ("*" if tv == "torch_out" else " ")
        vals = [c.shape.name, KERNEL_SHORT[c.kernel], pybn_s, fmt_time(c.bound), pct,
                torch_s, _ratio(c.ratio("torch"))]
        for p in ("numpy", "ort"):
            if p in c.errors:
                vals += ["WRONG", "-"]
            else:
                vals += [fmt_time(c.peer_time(p)), _ratio(c.ratio(p))]
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
        lines.append(f"  {bad_mark} {c.shape.name} {KERNEL_TITLES[c.kernel]}: " + "; ".join(m))
    wrong = [(c, k, v) for c in cells for k, v in c.errors.items()]
    if wrong:
        lines.append("")
        lines.append("WRONG RESULTS OR ERRORS (not timed):")
        for c, k, v in wrong:
            lines.append(f"  {c.shape.name} {KERNEL_TITLES[c.kernel]} {k}: {v}")
    return "\n".join(lines)


def to_json(meta: dict, probes: dict, cells: list) -> dict:
    return {"meta": meta,
            "probe": probes,
            "cells": [c.as_dict() for c in cells]}
