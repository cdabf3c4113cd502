"""What the layers share: train/eval, the forward call, the check of dy against the last
forward, and the checks of seeds and ranks."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np

from .._checks import flag, float_array, integer
from ..dropout import _counter_arg, _probability

_U64 = 1 << 64
_L = TypeVar("_L", bound="_Layer")


class _Layer:
    """Mode switching shared by the layers (PyTorch's ``nn.Module.train`` / ``eval``)."""

    training: bool = True

    def train(self: _L, mode: bool = True) -> _L:
        """Set training mode (``mode=False`` is :meth:`eval`).

        Parameters
        ----------
        mode : bool, default True

        Returns
        -------
        self
        """
        self.training = flag(mode, "mode")
        return self

    def eval(self: _L) -> _L:
        """Set evaluation (inference) mode.

        Returns
        -------
        self
        """
        return self.train(False)

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """The forward pass, ``self.forward(x, ...)``."""
        return self.forward(x, *args, **kwargs)

    def forward(self, x: Any) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def _saved_or_raise(self, saved: Any) -> Any:
        # PyTorch raises RuntimeError when there is no graph to differentiate through.
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward: called before any forward pass "
                               "(nothing saved to differentiate)")
        return saved


class _DropProbability:
    """The ``p`` of the dropout layers: a drop probability, checked when set (a ValueError
    outside [0, 1], as torch.nn.Dropout)."""

    _p: float

    @property
    def p(self) -> float:
        """The drop probability, in [0, 1]."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = _probability(value)


class _Counter:
    """A dropout layer's ``seed`` or ``offset``: an int in [0, 2**64), checked when set. A
    NumPy integer restored from a checkpoint becomes an int (np.uint64 made the offset's
    advance raise OverflowError after the mask was computed). Kept in the instance's
    ``__dict__`` under its own name, where pickles of earlier layers have it."""

    name: str

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__[self.name]
        except KeyError:  # (not set yet: getattr's default and hasattr work as for any attribute)
            raise AttributeError(self.name) from None

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = _counter_arg(value, self.name)


class _PhiloxStream:
    """The ``seed`` and ``offset`` of the dropout layers' masks (see :class:`_Counter`)."""

    seed: int = _Counter()  # type: ignore[assignment]  # (a descriptor giving ints)
    offset: int = _Counter()  # type: ignore[assignment]

    def state_dict(self) -> dict[str, np.ndarray]:
        """The mask stream's position, to save beside a checkpoint and resume a run's masks:
        ``seed`` and ``offset`` as 0-d uint64 arrays (torch's dropout modules have no state;
        pybn's masks do).

        Returns
        -------
        dict of str to ndarray
        """
        return {"seed": np.array(self.seed, np.uint64), "offset": np.array(self.offset, np.uint64)}

    def load_state_dict(self, state_dict: Any) -> None:
        """Set ``seed`` and ``offset`` from a :meth:`state_dict`; both are checked (a
        missing or unexpected key is a KeyError, a value outside [0, 2**64) a ValueError)
        before either is set.

        Parameters
        ----------
        state_dict : mapping
            Exactly the keys ``seed`` and ``offset``: ints, or 0-d integer arrays.
        """
        check_state_keys(state_dict, ["seed", "offset"])
        seed, offset = (_counter_arg(state_dict[k], k) for k in ("seed", "offset"))
        self.seed, self.offset = seed, offset

    def __setstate__(self, state: dict[str, Any]) -> None:
        # (a pickle restores __dict__ past the descriptors: one from before them may hold a
        # NumPy integer)
        self.__dict__.update(state)
        for name in ("seed", "offset"):
            if name in state:
                setattr(self, name, state[name])


def check_state_keys(state_dict: Any, expected: list[str]) -> None:
    """A state_dict must be a mapping with exactly the `expected` keys (KeyError naming the
    first missing or unexpected one)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: must be a mapping of names to values, got {type(state_dict).__name__}")
    for key in expected:
        if key not in state_dict:
            raise KeyError(f"{key}: missing from the state_dict (expected keys: {', '.join(expected)})")
    for key in state_dict:
        if key not in expected:
            raise KeyError(f"{key}: unexpected key in the state_dict (expected keys: {', '.join(expected)})")


def _check_dy(dy: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """dy must match the last forward's input exactly; say so in the layer's own terms."""
    array = float_array(dy, "dy")
    if array.shape != shape:
        raise ValueError(f"dy: shape {array.shape} does not match the last forward's input {shape}")
    if array.dtype != dtype:
        raise TypeError(f"dy: dtype {array.dtype} does not match the last forward's input ({dtype})")
    return array


def _seed_or_entropy(seed: Any) -> int:
    """`seed` checked, or (None) a fresh one from the operating system's entropy."""
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
    return _counter_arg(seed, "seed")


def _rank_and_world_size(rank: Any, world_size: Any) -> tuple[int, int]:
    w = integer(world_size, "world_size")
    if w < 1:
        raise ValueError(f"world_size: must be >= 1, got {w}")
    r = integer(rank, "rank")
    if not 0 <= r < w:
        raise ValueError(f"rank: must be in [0, world_size) = [0, {w}), got {r}")
    return r, w
