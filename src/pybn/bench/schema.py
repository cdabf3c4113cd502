"""What the benchmark's table is made of: peers, bounds, kernels, cells and sections.

A cell is one shape and one kernel, with the peers it is timed against and the bound it is
held to. The cells of every section are listed in :mod:`.table`; a section (batch norm,
dropout, folding, torch) runs its cells by its own method (docs/benchmark.md) and renders
them as one table.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Generic, Protocol, TypeVar

from .timing import TimingConfig


class Unavailable(Exception):
    """This implementation does not exist for this kernel (the cell records why)."""


class WrongResult(AssertionError):
    """An implementation returned a result that disagrees with the reference."""


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # noqa: BLE001 - a broken install counts as not installed
        return None


@dataclass(frozen=True)
class Peer:
    """An implementation pybn is compared with."""

    name: str                            # in --peers and the JSON's keys
    title: str                           # in the report's text
    column: str                          # the batch-norm table's column heading
    modules: tuple[str, ...] = ()        # what it imports; a peer that cannot import one is skipped
    out_variant: bool = False            # also timed with preallocated outputs where a shape has them
    set_threads: Callable[[int], None] | None = None   # gives it the benchmark's thread count

    def unavailable(self) -> str | None:
        """Why this peer cannot run here (its first module that fails to import, and how), or None."""
        for name in self.modules:
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 - a broken install is skipped like a missing one
                return f"cannot import {name} ({type(e).__name__}: {e})"
        return None

    def versions(self, used: bool) -> dict[str, str]:
        """Its modules' versions for the report: "not used" when not asked for, "not installed",
        and the later modules (onnx behind onnxruntime) only when the first is installed."""
        if not self.modules:
            return {}
        first, *rest = self.modules
        if not used:
            return {first: "not used"}
        version = _version(first)
        if version is None:
            return {first: "not installed"}
        return {first: version, **{m: _version(m) or "not installed" for m in rest}}


@dataclass(frozen=True)
class Bound:
    """What a kernel must move, in probe time: ``reads * t_read + streams * t_stream``
    (docs/performance.md, "The rules")."""

    reads: int
    streams: int

    @property
    def formula(self) -> str:
        terms = [(self.reads, "t_read"), (self.streams, "t_stream")]
        return " + ".join(name if n == 1 else f"{n}*{name}" for n, name in terms if n)

    def seconds(self, t_read: float, t_stream: float) -> float:
        return self.reads * t_read + self.streams * t_stream


class Named(Protocol):
    @property
    def name(self) -> str: ...


S = TypeVar("S", bound=Named)   # a section's shape type
F = TypeVar("F")                 # a section's implementation factory type


def always(shape: Any) -> bool:
    return True


@dataclass(frozen=True)
class Impl(Generic[F]):
    """One timed implementation of a kernel: pybn's, or one variant of a peer's."""

    key: str                 # its key in the JSON ("pybn", "torch", "torch_out", "nn.Dropout", ...)
    peer: str                # "pybn" or the name of the peer it belongs to
    make: F                  # builds the timed call on a section's case
    runs_on: Callable[[Any], bool] = always   # the shapes it is timed on


@dataclass(frozen=True)
class Kernel(Generic[F]):
    """One kernel of a section and every implementation of it, in the order they are timed."""

    name: str                            # in --kernels and the JSON
    title: str                           # in messages
    impls: tuple[Impl[F], ...]
    bound: Bound | None = None
    one_pass: Bound | None = None        # the floor when every input crosses the memory bus once
    short: str = ""                      # the table's kernel column (default: the name)
    aliases: tuple[str, ...] = ()        # other names --kernels accepts
    check: Callable[..., float] | None = None   # the reference check a section applies to every result
    needs_dy: bool = False               # its case needs an upstream gradient

    @property
    def label(self) -> str:
        return self.short or self.name

    @property
    def pybn(self) -> Impl[F]:
        return next(i for i in self.impls if i.peer == "pybn")

    def variants(self, peer: str, shape: Any = None) -> list[Impl[F]]:
        """The peer's implementations (on ``shape``, if given), in timing order."""
        return [i for i in self.impls if i.peer == peer and (shape is None or i.runs_on(shape))]


@dataclass(frozen=True)
class Cell(Generic[S, F]):
    """One row of a section's table: a shape, a kernel, the peers it is compared with, its bound."""

    section: str
    shape: S
    kernel: Kernel[F]
    peers: tuple[Peer, ...]
    bound: Bound | None

    def impls(self, peers: Sequence[Peer]) -> list[Impl[F]]:
        """pybn's implementation and those of the ``peers`` in use, in timing order."""
        names = {p.name for p in peers if p in self.peers} | {"pybn"}
        return [i for i in self.kernel.impls if i.peer in names and i.runs_on(self.shape)]


@dataclass(frozen=True)
class Timed:
    """A timed call and the check of its result (raises WrongResult)."""

    call: Callable[[], Any]
    check: Callable[[Any], None]


@dataclass(frozen=True)
class Context:
    """What every section runs with."""

    cfg: TimingConfig
    rounds: int
    threads: int
    peers: tuple[Peer, ...]                  # the peers in use: asked for and importable
    progress: Callable[[str], None]
    seed: int = 0

    def uses(self, peer: Peer) -> bool:
        return peer in self.peers


Result = dict[str, Any]


def _no_failures(result: Result) -> list[str]:
    return []


def _as_is(result: Result) -> Result:
    return result


@dataclass(frozen=True, eq=False)
class Section:
    """A part of the benchmark: its cells, how it runs and renders them, where its JSON goes."""

    name: str
    key: str | None                                  # its key in the JSON; None: its keys at the top
    cells: tuple[Any, ...]                           # every cell it has, in the order it runs them
    run: Callable[[Sequence[Any], Context], Result]
    render: Callable[[Result, Result], str]          # (result, meta) -> its table
    failures: Callable[[Result], list[str]] = _no_failures   # the wrong results and errors it reports
    to_json: Callable[[Result], Result] = _as_is
    needs: tuple[Peer, ...] = ()                     # it runs only when these peers are in use
