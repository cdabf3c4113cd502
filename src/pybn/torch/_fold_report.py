"""What :func:`pybn.torch.fold` did and left: the report entries, and the report under construction."""
from __future__ import annotations

import logging
from typing import NamedTuple

logger = logging.getLogger("pybn.torch")


class Folded(NamedTuple):
    """One simplification made by :func:`pybn.torch.fold`.

    Attributes
    ----------
    kind : str
        ``"conv+bn"`` (a Conv or ConvTranspose followed by a batch norm: a batch norm module
        or a ``batch_norm`` call, such as the one inside timm's ``BatchNormAct2d``),
        ``"linear+bn"``, ``"bn+linear"`` (a batch norm followed by a Linear), ``"bn+conv"``
        (a batch norm followed by a pointwise conv), ``"conv+affine"`` / ``"linear+affine"``
        (a per-channel multiply and/or add by constants after the layer, such as
        torchvision's ``FrozenBatchNorm2d``), ``"branches"`` (parallel conv branches and an
        identity branch summed, merged into one conv: ``merge_branches=True``), ``"dropout"``
        (a dropout module) or ``"functional dropout"`` (a ``torch.nn.functional`` dropout call).
    names : tuple of str
        The names involved, in data-flow order: qualified module names (the module a
        ``batch_norm`` call or an affine computation belongs to), or for a computation of no
        module, its graph node's name (a functional dropout: e.g. ``"dropout_1"``). The first
        one of a pair is the layer that holds the folded weights; for ``"branches"``, the
        conv that holds the merged weights comes first.
    """

    kind: str
    names: tuple[str, ...]


class NotFolded(NamedTuple):
    """A batch norm, per-channel affine module or dropout that :func:`pybn.torch.fold` left in
    the model, and why.

    Attributes
    ----------
    kind : str
        ``"batch norm"`` (a module or a ``batch_norm`` call), ``"affine"`` (a module whose
        whole computation is a per-channel multiply and add by constants, such as
        ``FrozenBatchNorm2d``), ``"dropout"`` (a dropout module) or ``"functional dropout"``.
    names : tuple of str
        The module's qualified name (a computation of no module: its graph node's name).
    reason : str
        Why it stays: what makes folding or removing it inexact, or what is unknown
        (and, where an argument of :func:`pybn.torch.fold` would tell, which one).
    """

    kind: str
    names: tuple[str, ...]
    reason: str


class Report:
    """The report under construction: the changes, and why each batch norm was not folded."""

    def __init__(self, entries: list[Folded | NotFolded]) -> None:
        self.entries = entries
        self.why: dict[str, list[str]] = {}  # batch norm name -> reasons, in the order found

    def done(self, kind: str, *names: str) -> None:
        self.entries.append(Folded(kind, tuple(names)))
        logger.info("pybn.torch.fold: %s: %s", kind, " -> ".join(names))

    def note(self, name: str, reason: str) -> None:
        """Remember why the batch norm (or affine module) `name` did not fold with a partner."""
        reasons = self.why.setdefault(name, [])
        if reason not in reasons:
            reasons.append(reason)

    def reasons(self, name: str) -> str:
        return "; ".join(self.why.get(name, ()))

    def left(self, kind: str, name: str, reason: str) -> None:
        self.entries.append(NotFolded(kind, (name,), reason))
        logger.info("pybn.torch.fold: not folded: %s %s: %s", kind, name, reason)

    def batch_norm_left(self, name: str, problem: str | None, default: str, kind: str = "batch norm") -> None:
        """Report a batch norm left: its own problem, else why it did not pair, else `default`."""
        self.left(kind, name, problem or self.reasons(name) or default)
