"""The torch section of ``python -m pybn bench``: pybn.torch against stock torch.

One table, CELLS. A cell builds two steps over the same data and the same weights (a
reference, stock torch, and a candidate, the model after ``pybn.torch.accelerate``),
checks that they compute the same thing, then times them call for call in turn
(:func:`timing.measure_alternating`, so both medians come from the same seconds); the ratio
is the reference's median over the candidate's. Operator cells are one forward and
backward through autograd of ``nn.BatchNorm2d(C)`` or ``nn.Dropout(0.5)`` in training mode;
model cells one training step (forward, backward, SGD). Cells marked ``profile`` also give,
from ``torch.profiler``, the share of the step spent inside the batch-norm and dropout
modules (forward and backward, attributed through module hooks) before and after.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from .schema import Context, Result
from .timing import TimingConfig, fmt_time, measure_alternating

SHAPES = {"A": (32, 64, 56, 56), "L": (64, 128, 56, 56)}


@dataclass(frozen=True)
class TorchCell:
    name: str
    build: Callable[[], Steps]
    target: float             # the ratio reference / candidate must be at least this
    profile: bool = False     # also the shares of batch norm and dropout in the step
    labels: tuple[str, str] = ("torch", "pybn")


@dataclass
class Steps:
    reference: Callable[[], object]
    candidate: Callable[[], object]
    check: Callable[[], None]                  # raises AssertionError when the two differ
    modules: tuple[Any, ...] = ()              # (reference model, candidate model), for the profile
    notes: list[str] = field(default_factory=list)  # lines for the report, e.g. the compile time
    # the same comparison without pybn (stock eager, stock compiled), timed in the same
    # alternation: what the candidate's ratio owes to torch alone
    stock_pair: tuple[Callable[[], object], Callable[[], object]] | None = None


# --------------------------------------------------------------------------- operators

@dataclass
class _Operator:
    """One operator module, stock and accelerated, and the data of its forward and backward."""

    stock: Any
    ours: Any
    x: Any
    dy: Any
    channels_last: bool

    def step(self, module: Any) -> Any:
        self.x.grad = None
        y = module(self.x)
        y.backward(self.dy)
        return y


def _operator(module: Callable[[int], Any], check: Callable[[_Operator], None], shape_name: str,
              channels_last: bool) -> Steps:
    """One forward and backward through autograd of ``module(C)`` in training mode."""
    import torch

    import pybn.torch

    shape = SHAPES[shape_name]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    stock = module(shape[1])
    op = _Operator(stock, pybn.torch.accelerate(copy.deepcopy(stock)), x, dy, channels_last)
    return Steps(partial(op.step, op.stock), partial(op.step, op.ours), partial(check, op))


def _batch_norm_module(channels: int) -> Any:
    from torch import nn

    return nn.BatchNorm2d(channels)


def _dropout_module(channels: int) -> Any:
    from torch import nn

    return nn.Dropout(0.5)


def _check_batch_norm(op: _Operator) -> None:
    import torch

    want, want_dx = op.step(op.stock).detach(), op.x.grad
    got, got_dx = op.step(op.ours).detach(), op.x.grad
    _close("output", got, want)
    _close("input gradient", got_dx, want_dx)
    if op.channels_last and not got.is_contiguous(memory_format=torch.channels_last):
        raise AssertionError("the output lost the channels_last layout")


def _check_dropout(op: _Operator) -> None:
    import torch

    for module in (op.stock, op.ours):
        y = op.step(module).detach()
        kept = y != 0
        fraction = kept.float().mean().item()
        if abs(fraction - 0.5) > 2 / math.sqrt(y.numel()) or not torch.allclose(y[kept], 2 * op.x.detach()[kept]):
            raise AssertionError(f"{type(module).__module__} dropout keeps {fraction:.3f} or scales wrongly")
        if not torch.equal(op.x.grad, torch.where(kept, 2 * op.dy, 0.0)):
            raise AssertionError("the gradient does not use the forward's mask")


def _close(what: str, got: Any, want: Any, rtol: float = 1e-4) -> None:
    err = (got.double() - want.double()).abs().max().item() / max(want.abs().max().item(), 1e-30)
    if not err <= rtol:
        raise AssertionError(f"{what} differs from torch's by {err:.2g} (relative)")


# --------------------------------------------------------------------------- models

ModelData = tuple[Any, Any, Any, Callable[..., Any]]   # model, input, target, loss function


def _red_wine() -> ModelData:
    import torch
    import torch.nn.functional as F

    from . import torch_models

    gen = torch.Generator().manual_seed(1)
    means = torch.tensor([8.3, 0.53, 0.27, 2.5, 0.087, 15.9, 46.5, 0.997, 3.31, 0.66, 10.4])
    x = means + torch.randn(256, 11, generator=gen) * means * 0.2
    return torch_models.red_wine(), x, torch.randn(256, 1, generator=gen) + 5.6, F.l1_loss


def _cnn() -> ModelData:
    import torch
    import torch.nn.functional as F

    from . import torch_models

    gen = torch.Generator().manual_seed(1)
    return torch_models.CNN(), torch.randn(64, 1, 28, 28, generator=gen), torch.randint(10, (64,), generator=gen), \
        F.cross_entropy


def _resnet18() -> ModelData:
    import torch
    import torch.nn.functional as F

    from . import torch_models

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 112, 112, generator=gen).contiguous(memory_format=torch.channels_last)
    # (torch's annotations of Module.to leave out memory_format)
    model = torch_models.ResNet18().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model, x, torch.randint(1000, (16,), generator=gen), F.cross_entropy


def _training_step(model: Any, x: Any, target: Any, loss_fn: Callable[..., Any],
                   lr: float = 1e-4) -> Callable[[], Any]:
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step() -> Any:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
        return loss
    return step


def _check_same_model(stock: Any, ours: Any, x: Any) -> None:
    """Evaluation mode (running statistics, no dropout) must give the same outputs."""
    import torch

    with torch.no_grad():
        want, got = stock.eval()(x), ours.eval()(x)
    stock.train()
    ours.train()
    _close("evaluation output", got, want)


def _model(data: Callable[[], ModelData], fuse: bool = False) -> Steps:
    import pybn.torch

    stock, x, target, loss_fn = data()
    # fuse: also each relu(bn(x) + r) as one call (pybn.torch.fuse_tails, which accelerates too)
    ours = (pybn.torch.fuse_tails if fuse else pybn.torch.accelerate)(copy.deepcopy(stock))
    reference, candidate = _training_step(stock, x, target, loss_fn), _training_step(ours, x, target, loss_fn)

    def check() -> None:
        _check_same_model(stock, ours, x)
        for step in (reference, candidate):
            if not step().isfinite():
                raise AssertionError("the training loss is not finite")
    return Steps(reference, candidate, check, (stock, ours))


def _compiled(data: Callable[[], ModelData], fuse: bool = False) -> Steps:
    import torch

    import pybn.torch

    stock, x, target, loss_fn = data()
    stock_compiled = torch.compile(copy.deepcopy(stock), fullgraph=True)
    eager = (pybn.torch.fuse_tails if fuse else pybn.torch.accelerate)(copy.deepcopy(stock))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    reference = _training_step(eager, x, target, loss_fn)
    candidate = _training_step(compiled, x, target, loss_fn)  # compiled's parameters are compiled_model's
    stock_pair = (_training_step(stock, x, target, loss_fn), _training_step(stock_compiled, x, target, loss_fn))

    def check() -> None:
        _check_same_model(eager, compiled_model, x)
        t0 = time.perf_counter()
        if not candidate().isfinite():
            raise AssertionError("the compiled training loss is not finite")
        steps.notes.append(f"the first compiled step (compilation) took {time.perf_counter() - t0:.1f} s")
        if not stock_pair[1]().isfinite():
            raise AssertionError("the stock compiled training loss is not finite")
    steps = Steps(reference, candidate, check, stock_pair=stock_pair)
    return steps


# --------------------------------------------------------------------------- the table

def _batch_norm(shape: str, channels_last: bool) -> Callable[[], Steps]:
    return partial(_operator, _batch_norm_module, _check_batch_norm, shape, channels_last)


def _dropout(shape: str, channels_last: bool) -> Callable[[], Steps]:
    return partial(_operator, _dropout_module, _check_dropout, shape, channels_last)


CELLS = [
    TorchCell("batch norm fwd+bwd, A NCHW", _batch_norm("A", False), 1.3),
    TorchCell("batch norm fwd+bwd, A channels_last", _batch_norm("A", True), 1.3),
    TorchCell("batch norm fwd+bwd, L NCHW", _batch_norm("L", False), 1.3),
    TorchCell("dropout fwd+bwd, A NCHW", _dropout("A", False), 50.0),
    TorchCell("dropout fwd+bwd, A channels_last", _dropout("A", True), 50.0),
    TorchCell("dropout fwd+bwd, L NCHW", _dropout("L", False), 50.0),
    TorchCell("step, Red Wine MLP, batch 256", partial(_model, _red_wine), 1.5, profile=True),
    TorchCell("step, Red Wine MLP, batch 256, fused tails", partial(_model, _red_wine, fuse=True), 1.5),
    TorchCell("step, tutorial CNN, batch 64", partial(_model, _cnn), 1.0, profile=True),
    TorchCell("step, ResNet-18 channels_last, batch 16, 112x112", partial(_model, _resnet18), 1.0, profile=True),
    TorchCell("step, ResNet-18 channels_last, batch 16, 112x112, fused tails", partial(_model, _resnet18, fuse=True),
              1.0),
    TorchCell("step, Red Wine MLP: torch.compile vs eager", partial(_compiled, _red_wine), 1.0,
              labels=("pybn eager", "compiled")),
    TorchCell("step, Red Wine MLP, fused tails: torch.compile vs eager", partial(_compiled, _red_wine, fuse=True),
              1.0, labels=("pybn eager", "compiled")),
]


def cell_names() -> list[str]:
    return [c.name for c in CELLS]


def select(spec: str | None) -> list[TorchCell]:
    """The cells whose names contain one of the comma-separated words of `spec` (all: None)."""
    if not spec:
        return list(CELLS)
    words = [w.strip().lower() for w in spec.split(",") if w.strip()]
    chosen = [c for c in CELLS if any(w in c.name.lower() for w in words)]
    if not chosen:
        raise ValueError(f"--torch-cells {spec!r} matches none of: {'; '.join(cell_names())}")
    return chosen


def run_section(cells: Sequence[TorchCell], ctx: Context) -> Result:
    return run(ctx.cfg, ctx.rounds, ctx.threads, ctx.progress, list(cells))


def failures(result: Result) -> list[str]:
    return [f"{c['name']}: {c['error']}" for c in result["cells"] if "error" in c]


def run(cfg: TimingConfig, rounds: int, threads: int, progress: Callable[[str], None],
        cells: list[TorchCell] | None = None) -> Result:
    import torch

    import pybn

    torch.set_num_threads(threads)
    pybn.set_num_threads(threads)
    results = []
    for cell in cells if cells is not None else CELLS:
        t0 = time.perf_counter()
        steps = None
        result = {"name": cell.name, "target": cell.target, "labels": list(cell.labels)}
        try:
            steps = cell.build()
            steps.check()
            fns = (steps.reference, steps.candidate, *(steps.stock_pair or ()))
            paired = [measure_alternating(fns, cfg) for _ in range(rounds)]
            ref, cand, *stock = min(paired, key=lambda p: p[1].median)
            result.update(reference_s=ref.median, candidate_s=cand.median, ratio=ref.median / cand.median,
                          reference=ref.as_dict(samples=False), candidate=cand.as_dict(samples=False))
            if stock:
                result["stock_ratio"] = stock[0].median / stock[1].median
            faults = [_page_faults_per_call(step) for step in (steps.reference, steps.candidate)]
            if None not in faults:
                result["page_faults"] = faults
            if cell.profile:
                result["shares"] = [_shares(module, step) for module, step in
                                    zip(steps.modules, (steps.reference, steps.candidate))]
            if steps.notes:
                result["note"] = "; ".join(steps.notes)
        except Exception as e:  # noqa: BLE001 - a failing cell is reported, not fatal
            result["error"] = f"{type(e).__name__}: {e}"
        results.append(result)
        ratio = f"{result['ratio']:.2f}x" if "ratio" in result else result.get("error")
        progress(f"torch {cell.name}: {ratio} ({time.perf_counter() - t0:.1f} s)")
        del steps
    return {"threads": threads, "torch": torch.__version__, "cells": results}


# --------------------------------------------------------------------------- profile

def _page_faults_per_call(step: Callable[[], object], calls: int = 5) -> int | None:
    """Median minor page faults of a call, right after the timed ones: the pages its tensors
    got fresh from the kernel (each zeroed on first touch). glibc hands blocks past its mmap
    threshold (32 MB at most) back to the kernel when they are freed, and smaller ones
    depending on its heap's state, so a step may fault on every page of its outputs
    (docs/pytorch.md). None where getrusage is missing."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    counts = []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(counts)[calls // 2]


def _shares(model: Any, step: Callable[[], object], steps: int = 3) -> dict[str, float]:
    """Shares of the step's time inside batch-norm and dropout modules (their forward and
    backward, each wrapped in a profiler range by module hooks)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd
    from torch.profiler import ProfilerActivity, profile, record_function

    handles: list[Any] = []
    for module in model.modules():
        kind = "batch norm" if isinstance(module, _BatchNorm) else "dropout" if isinstance(module, _DropoutNd) \
            else None
        if kind is not None:
            handles += _range_hooks(module, kind, record_function)
    try:
        step()  # warm-up with the hooks in place
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("bench: step"):
                    step()
    finally:
        for handle in handles:
            handle.remove()
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    whole = totals.get("bench: step", 0.0)
    return {"step_s": whole / steps / 1e6,
            **{kind: sum(t for k, t in totals.items() if k.startswith(f"bench: {kind}")) / whole if whole else 0.0
               for kind in ("batch norm", "dropout")}}


def _range_hooks(module: Any, kind: str, record_function: Any) -> list[Any]:
    """Forward and backward hooks that open and close a profiler range around the module."""
    ranges: list[Any] = []

    def enter(name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            ranges.append(record_function(f"bench: {kind} {name}"))
            ranges[-1].__enter__()
        return hook

    def leave(*_: object) -> None:
        ranges.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter("forward")), module.register_forward_hook(leave),
            module.register_full_backward_pre_hook(enter("backward")), module.register_full_backward_hook(leave)]


# --------------------------------------------------------------------------- report

def render(result: Result, meta: Result | None = None) -> str:
    lines = [f"torch section: pybn.torch vs stock torch {result['torch']}, {result['threads']} threads, float32; "
             "x = reference time / candidate time (medians, timed call for call in turn)",
             f"{'cell':<50} {'reference':>21} {'candidate':>21} {'x':>8} {'target':>7} ok"]
    for r in result["cells"]:
        if "error" in r:
            lines.append(f"{r['name']:<50} ERROR {r['error']}")
            continue
        (lr, lc), ok = r["labels"], "✓" if r["ratio"] >= r["target"] else "✗"
        lines.append(f"{r['name']:<50} {lr + ' ' + fmt_time(r['reference_s']):>21} "
                     f"{lc + ' ' + fmt_time(r['candidate_s']):>21} {r['ratio']:>7.2f}x {r['target']:>6.1f}x {ok}")
        for label, shares in zip(r["labels"], r.get("shares", ())):
            lines.append(f"{'':<4}profile {label:<10}: step {fmt_time(shares['step_s'])}, batch norm "
                         f"{100 * shares['batch norm']:.1f}%, dropout {100 * shares['dropout']:.1f}%")
        if "page_faults" in r:
            lines.append(f"{'':<4}page faults per call: {r['labels'][0]} {r['page_faults'][0]}, "
                         f"{r['labels'][1]} {r['page_faults'][1]}")
        if "stock_ratio" in r:
            lines.append(f"{'':<4}stock torch, the same model and steps: compiled vs eager {r['stock_ratio']:.2f}x")
        if r.get("note"):
            lines.append(f"{'':<4}{r['note']}")
    lines.append("operators: nn.BatchNorm2d(C) / nn.Dropout(0.5) in training mode, y = m(x); y.backward(dy); "
                 "steps: forward, loss, backward, SGD; profile shares from torch.profiler, time inside the modules' "
                 "forward and backward (module hooks) over the step. Page faults: minor faults per call (median of 5 "
                 "after the timed calls), each a fresh page the kernel zeroed: the allocator's state, not the kernels "
                 "(docs/pytorch.md, 'Memory allocator').")
    return "\n".join(lines)


__all__ = ["CELLS", "TorchCell", "run", "run_section", "failures", "render", "select", "cell_names"]
