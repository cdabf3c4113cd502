"""The optional pinned Philox stream that pybn.torch's dropout, stochastic-depth, DropBlock and
noise modules share: without a seed every training call draws one from torch's default CPU
generator; with ``seed=...`` the calls walk ``(seed, offset)``, each advancing ``offset`` by
the counters it used (docs/dropout.md).

The offset is kept in a tensor and counted in torch's integer arithmetic: torch.compile
guards on a Python int it reads (a new graph for every offset, one per call) and fixes a
size pybn's own checks read (one graph per batch size under ``dynamic=True``), but keeps
tensors and symbolic sizes as they are. That tensor is a non-persistent buffer advanced in
place, which torch.export records as a mutation (an attribute rebound to a new tensor it
does not: every call of the exported program would draw the masks of one offset); being
non-persistent it stays out of state_dict, so checkpoints are those of the stock modules.
"""
import os
import threading
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from ..dropout import _counter_arg
from ._capture import exporting_onnx, refuse_onnx_export

U64 = 1 << 64
_TAKING = threading.Lock()  # held while a call reads and advances its module's offset


def _new_lock_in_child() -> None:  # (a fork while another thread held it would leave it held)
    global _TAKING
    _TAKING = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def as_int64(value: int) -> int:
    """A 64-bit counter or key as the int64 torch stores it (two's complement)."""
    return value - U64 if value >= 2**63 else value


def mask_counters(n: Any) -> Any:
    """``pybn.counters_used(n)`` for a size torch.compile may keep symbolic."""
    return 16 * ((n + 127) // 128)


def normal_counters(n: Any) -> Any:
    """``pybn.normal_counters_used(n)`` for a size torch.compile may keep symbolic."""
    return 16 * ((n + 63) // 64)


def rank_and_world_size(rank: object, world_size: object) -> Tuple[int, int]:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: must be an int in [0, world_size), got {rank!r}")
    return rank, world_size


def _counter_tensor(value: int) -> Tensor:
    """[value] as int64, a normal tensor even when made in inference mode (it is advanced in
    place, which an inference tensor refuses outside inference mode)."""
    with torch.inference_mode(False):
        return torch.tensor([as_int64(value)], dtype=torch.int64, device="cpu")  # (even under torch.device("meta"))


def _rebind() -> bool:
    """Whether to advance the offset by binding a new tensor rather than in place. In place is
    what torch.export records (not a rebound buffer), what reaches the buffer a caller handed
    torch.func.functional_call (a rebound one is dropped when the call restores the module's),
    and what other processes sharing the tensor see. Under torch.compile a rebound one makes
    dynamo refuse a checkpointed region, which would otherwise recompute the forward from the
    written offset (another mask); torch < 2.6 cannot tell export from compile and rebinds."""
    return torch.compiler.is_compiling() and not _is_exporting()


_is_exporting: Callable[[], bool] = getattr(torch.compiler, "is_exporting", lambda: False)  # (torch >= 2.6)


def _write(offset_t: Tensor, add: Any = None, value: Optional[int] = None) -> None:
    """offset_t += add, or offset_t = value, in place; on the plain tensor under torch.func's
    wrappers (the transforms refuse to write a tensor captured from outside them, and the
    counters are no value they differentiate or batch)."""
    if torch._C._are_functorch_transforms_active():
        with torch._C._DisableFuncTorch():
            _write_plain(_plain(offset_t), add, value)
    else:
        _write_plain(offset_t, add, value)


def _write_plain(offset_t: Tensor, add: Any, value: Optional[int]) -> None:
    if value is None:
        offset_t.add_(add)
    else:
        with torch.no_grad():
            offset_t.fill_(as_int64(value))


def _plain(t: Tensor) -> Tensor:
    """The tensor under torch.func's wrappers (which have no storage of their own)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _writable(offset_t: Optional[Tensor]) -> bool:
    """Whether a new offset can be written into this tensor (kept, so that what holds it, DDP's
    buffer list, a functional_call dict or an exported module, sees the change): an int64
    with values, not an inference tensor (later advanced outside inference mode, which
    refuses that), and not one shared with other processes (torch.multiprocessing,
    Module.share_memory())."""
    if offset_t is None or offset_t.dtype != torch.int64 or offset_t.device.type == "meta":
        return False
    if torch.compiler.is_compiling():  # (a traced tensor: neither, and dynamo would break the graph on them)
        return True
    offset_t = _plain(offset_t)
    return not offset_t.is_inference() and not offset_t.is_shared()


class PinnedSeed:
    """``seed`` and ``offset`` properties and the ``[seed, offset]`` tensor of a call."""

    # [the next call's offset] (int64, two's complement), a buffer (see the module docstring);
    # absent or None: no seed
    _offset_t: Optional[Tensor]
    _seed_t: Optional[Tensor] = None  # the seed as [seed] (int64), made once
    _seed: Optional[int] = None
    _buffers: "dict[str, Optional[Tensor]]"

    @property
    def seed(self) -> Optional[int]:
        """The pinned Philox seed, or None: a fresh seed from torch's generator per call."""
        return self._seed

    @seed.setter
    def seed(self, seed: Optional[int]) -> None:
        self._seed = None if seed is None else _counter_arg(seed, "seed")
        self._seed_t = None if self._seed is None else _counter_tensor(self._seed)
        if seed is None:
            self._set_offset_tensor(None)
        else:
            self._set_offset(0)

    @property
    def offset(self) -> Optional[int]:
        """The Philox offset of the next training call (pinned seed only, else None)."""
        offset_t = self._offset_tensor()
        return None if offset_t is None else int(offset_t) % U64

    @offset.setter
    def offset(self, offset: int) -> None:
        if self._seed is None:
            raise ValueError("offset: only a module built with seed=... (or given .seed) has an offset")
        self._set_offset(_counter_arg(offset, "offset"))

    def _set_offset(self, value: int) -> None:
        offset_t = self._offset_tensor()
        if _writable(offset_t):
            assert offset_t is not None
            _write(offset_t, value=value)
        else:
            self._set_offset_tensor(_counter_tensor(value))

    def _offset_tensor(self) -> Optional[Tensor]:
        # (a module made a pybn one by accelerate has none yet; one unpickled from before the
        # buffer has it as a plain attribute)
        return getattr(self, "_offset_t", None)

    def _set_offset_tensor(self, offset_t: Optional[Tensor]) -> None:
        self.__dict__.pop("_offset_t", None)
        if "_offset_t" in self._buffers:
            self._buffers["_offset_t"] = offset_t
        else:
            self.register_buffer("_offset_t", offset_t, persistent=False)  # type: ignore[attr-defined]

    def _take(self, skip: Any = 0, stride: Any = 0) -> Tensor:
        """This call's ``[seed, offset + skip]`` (int64; int64 sums wrap as the uint64 counters
        do), the offset advanced by `stride` in the same step: calls from other threads never
        read the same offset (torch's generator is locked the same way)."""
        if exporting_onnx():  # (refused before the offset moves)
            refuse_onnx_export(f"{type(self).__name__}(seed=...)")
        offset_t = self._offset_tensor()
        assert self._seed_t is not None and offset_t is not None
        if _rebind():  # (compiling: one graph's calls run in order, and dynamo traces no lock)
            philox = self._philox_at(offset_t, skip)
            self._set_offset_tensor(offset_t + stride)
            return philox
        if torch._C._current_autograd_node() is not None and torch.is_grad_enabled():
            # (a forward run by the backward pass with gradients on: a checkpoint's recomputation,
            # or a backward hook under create_graph=True, which is refused too; hooks of a plain
            # backward run with gradients off)
            raise RuntimeError(
                f"{type(self).__name__}(seed=...): called during a backward pass, as torch.utils.checkpoint "
                "recomputes a forward: a pinned stream cannot draw the forward's masks again (torch's checkpoint "
                "restores only torch's generator). Leave seed=None in checkpointed code: seeds drawn from the "
                "generator are replayed.")
        with _TAKING:
            philox = self._philox_at(offset_t, skip)
            _write(offset_t, add=stride)
        return philox

    def _philox_at(self, offset_t: Tensor, skip: Any) -> Tensor:
        assert self._seed_t is not None
        return torch.cat([self._seed_t.to(offset_t.device), offset_t + skip])  # (the buffer follows .to())

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # The offset's value survives what replaces every tensor of a module: to_empty() after
        # a construction on the meta device would leave it uninitialized memory
        offset_t = self._offset_tensor()
        offset = None if offset_t is None or offset_t.device.type == "meta" else self.offset
        module = super()._apply(fn, recurse)  # type: ignore[misc]
        if offset is not None and self._offset_tensor() is not None:
            # (also an int64 again after Module.type(torch.float64), which casts every buffer,
            # and a private tensor after share_memory(): processes never share an offset)
            self._set_offset(offset)
        return module

    def __getstate__(self) -> Any:
        # A copy of the offset for pickles: torch.multiprocessing moves the tensors it pickles
        # to shared memory, and a spawned process's calls would advance this one's offset
        state = self.__dict__.copy()
        if state.get("_offset_t") is not None:  # (a module unpickled from before the buffer)
            state["_offset_t"] = state["_offset_t"].clone()
        offset_t = state.get("_buffers", {}).get("_offset_t")
        if offset_t is not None:
            state["_buffers"] = {**state["_buffers"], "_offset_t": offset_t.clone()}
        return state

    def _seed_repr(self) -> str:
        return "" if self._seed is None else f", seed={self._seed}"


def offsets_per_rank(model: Any) -> Any:
    """Keep the pinned dropout offsets of `model` (modules built with ``seed=``) each rank's
    own under ``DistributedDataParallel``: call it before wrapping the model. DDP broadcasts
    every buffer from rank 0 before each forward, the offsets (``_offset_t``) too: with a
    seed per rank (``seed=base + rank``) and unequal local batches, a rank that drew more
    counters than rank 0 was set back into the range it had just used, and drew part of its
    last masks again. This adds the offsets to the buffers DDP leaves alone (torch's
    ``_ddp_params_and_buffers_to_ignore``; also under the names a ``torch.compile``d wrapper
    gives them, and :func:`fuse_tails` keeps the list); every other buffer is still
    broadcast. It names the offsets that exist when it is called: call it after the seeds
    are set. Modules that share one seed (``rank=``, ``world_size=``) are named too; they
    advance alike on every rank when the local batches are equal, as they must be.
    Returns `model`.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise TypeError("model: call offsets_per_rank on the model before wrapping it in DistributedDataParallel "
                        "(DDP reads the buffers to leave alone when it is built)")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    names = [f"{name}._offset_t" if name else "_offset_t" for name, m in model.named_modules()
             if isinstance(m, PinnedSeed) and m._offset_tensor() is not None]
    names += [f"_orig_mod.{n}" for n in names]  # (DDP(torch.compile(model)) names them so)
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, ignored + [n for n in names if n not in ignored])
    return model
