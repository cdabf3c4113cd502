"""The control exchanges that keep pybn's collectives in step across processes.

Every collective call is made by every process of a group, in the same order; the
transports trust that. A process one call ahead or behind (a layer skipped in evaluation
mode, layers called in another order, one more batch than the others) pairs its exchange
with another one: with sizes that differ gloo aborts the process and MPI truncates or
reads past the message (no error on the receiving side); with equal sizes the numbers
are mixed silently. So before any exchange whose size depends on the data (statistics of
C channels), pybn's synchronized batch norms and :func:`pybn.recalibrate` make a control
exchange of one fixed size, whatever they are doing: ``[MAGIC, kind, fields...]``. Two
control exchanges of different kinds paired with each other are told apart on every
process, which then raises :class:`OutOfStep`; so are two of one kind whose `fields`
(a layer's channels, the count of its training calls) disagree, as each caller checks.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ROW = 16  # numbers per process in every control exchange (room for the fields of every kind)
MAGIC = 20240601.0  # the first number: a row from anything else is not a control row

# the kinds of control exchange, and what a process at each is doing
FORWARD, BACKWARD, TORCH_FORWARD, TORCH_BACKWARD, RECALIBRATE_BATCH, RECALIBRATE_AGREE, RECALIBRATE_LAYER = range(1, 8)
KINDS = {
    FORWARD: "a pybn.distributed.SyncBatchNorm training forward",
    BACKWARD: "a pybn.distributed.SyncBatchNorm backward",
    TORCH_FORWARD: "a pybn.torch SyncBatchNorm training forward",
    TORCH_BACKWARD: "a pybn.torch SyncBatchNorm backward",
    RECALIBRATE_BATCH: "pybn.recalibrate, before a batch or after the last one",
    RECALIBRATE_AGREE: "pybn.recalibrate's agreement after the batches",
    RECALIBRATE_LAYER: "pybn.recalibrate's agreement on one layer",
}


class OutOfStep(RuntimeError):
    """Processes met at different collective calls (every process raises it)."""

    __module__ = "pybn.distributed"  # (its public name)

    def __init__(self, message: str, kinds: frozenset[int] = frozenset()) -> None:
        super().__init__(message)
        self._kinds = kinds  # the kinds of control exchange the processes were at (pybn.recalibrate reads it)


def exchange(comm: Any, kind: int, fields: Sequence[float]) -> np.ndarray:
    """All-gathers this process's control row; returns the (W, ROW) rows of every process,
    kinds unchecked (see :func:`fields_of`)."""
    row = np.zeros(ROW)
    row[0], row[1] = MAGIC, kind
    row[2:2 + len(fields)] = fields
    rows: np.ndarray = comm.allgather(row)
    return rows


def fields_of(rows: np.ndarray, kind: int, count: int) -> np.ndarray:
    """The (W, count) fields of control rows that are all of `kind`; else OutOfStep,
    saying what each process was doing."""
    if all_of(rows, kind):
        return rows[:, 2:2 + count]
    doing = "; ".join(f"rank {r}: {describe(row)}" for r, row in enumerate(rows))
    raise OutOfStep(f"comm: the processes are out of step, at different collective calls ({doing}); every process "
                    "must make the same synchronized calls in the same order",
                    frozenset(int(k) for k in rows[rows[:, 0] == MAGIC, 1]))


def all_of(rows: np.ndarray, kind: int) -> bool:
    """Whether every process sent a control row of `kind`."""
    return bool(np.all(rows[:, 0] == MAGIC) and np.all(rows[:, 1] == kind))


def agree(comm: Any, kind: int, fields: Sequence[float]) -> np.ndarray:
    """:func:`exchange` then :func:`fields_of`."""
    return fields_of(exchange(comm, kind, fields), kind, len(fields))


def describe(row: np.ndarray) -> str:
    if row[0] != MAGIC:
        return "an exchange of data, not a control row"
    return KINDS.get(int(row[1]), f"an unknown control exchange ({row[1]!r})")


def differs(values: np.ndarray) -> bool:
    """Whether the processes' values of one field differ (NaN equal to NaN)."""
    return not np.all((values == values[0]) | (np.isnan(values) & np.isnan(values[0])))


def require_same(values: np.ndarray, head: str, what: str, tail: str = "") -> None:
    """OutOfStep, ``head (what: rank 0: a, rank 1: b)tail``, where the processes' values of a
    field that must agree (a count of calls, a layer's channels) differ."""
    if differs(values):
        raise OutOfStep(f"{head} ({what}: {per_rank(values)}){tail}")


def per_rank(values: np.ndarray) -> str:
    return ", ".join(f"rank {r}: {round(float(v))}" for r, v in enumerate(values))
