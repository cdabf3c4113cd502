"""MC-dropout: dropout kept on at inference with masks fixed by (seed, sample)
(docs/dropout.md, \"MC-dropout\")."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from .._checks import integer
from ..dropout import _counter_arg
from ._drop_path import DropPath
from ._dropblock import DropBlock2d
from ._dropout import Dropout
from ._noise import _NoiseLayer

MC_MAX_LAYERS = 256
MC_MAX_SAMPLES = 1 << 20
_MC_LAYER_SHIFT, _MC_SAMPLE_SHIFT = 56, 36


def mc_dropout_offset(layer_index: int, sample: int) -> int:
    """The first counter of the masks of dropout layer `layer_index` in MC sample `sample`:
    ``layer_index * 2**56 + sample * 2**36``, so every (layer, sample) pair has its own
    range of 2**36 counters (masks of up to 2**39 elements) under one seed."""
    layer_index, sample = integer(layer_index, "layer_index"), integer(sample, "sample")
    if not 0 <= layer_index < MC_MAX_LAYERS:
        raise ValueError(f"layer_index: must be in [0, {MC_MAX_LAYERS}), got {layer_index}")
    if not 0 <= sample < MC_MAX_SAMPLES:
        raise ValueError(f"sample: must be in [0, 2**20), got {sample}")
    return (layer_index << _MC_LAYER_SHIFT) | (sample << _MC_SAMPLE_SHIFT)


@contextlib.contextmanager
def mc_dropout(layers: Any, *, seed: int, sample: int) -> Iterator[None]:
    """Monte Carlo dropout: dropout on at inference, with masks fixed by (seed, sample).

    Inside the context the dropout layers among `layers` (:class:`Dropout`,
    :class:`DropPath`, :class:`DropBlock2d`, :class:`AlphaDropout`, :class:`GaussianDropout`,
    :class:`GaussianNoise`, other objects are left alone; or the pybn.torch dropout and
    noise modules of a torch model) drop as in
    training, the k-th of them (in the order given, or ``model.modules()`` order) with
    key `seed` from offset ``mc_dropout_offset(k, sample)``; every other layer keeps its
    mode (batch norm stays in evaluation mode). On exit each layer's mode, seed and offset
    are restored. So ``for t in range(T): with mc_dropout(layers, seed=s, sample=t): ...``
    draws T masks that are the same in every call and every process for the same input
    batch (the mask of a row depends on its position in the batch). docs/dropout.md,
    "MC-dropout", says why this design.

    Parameters
    ----------
    layers : iterable of layers, or a torch.nn.Module
        A torch model must hold pybn.torch dropout modules (``pybn.torch.accelerate``
        swaps them in); a stock torch dropout module is refused, its masks being torch's.
    seed : int in [0, 2**64)
    sample : int in [0, 2**20)
        The index of the MC sample.
    """
    seed = _counter_arg(seed, "seed")
    modules = _mc_modules(layers)
    if len(modules) > MC_MAX_LAYERS:
        raise ValueError(f"layers: at most {MC_MAX_LAYERS} dropout layers, got {len(modules)}")
    offsets = [mc_dropout_offset(k, sample) for k in range(len(modules))]
    saved = [_mc_state(m) for m in modules]
    try:
        for module, offset in zip(modules, offsets):
            _mc_set(module, seed, offset)
        yield
    finally:
        for module, state in zip(modules, saved):
            _mc_restore(module, state)


def _mc_modules(layers: Any) -> list[Any]:
    torch_nn = _torch_nn_if_module(layers)
    if torch_nn is not None:
        return _mc_torch_modules(layers, torch_nn)
    try:
        items = list(layers)
    except TypeError:
        raise TypeError(f"layers: must be an iterable of pybn.nn layers or a torch.nn.Module, got "
                        f"{type(layers).__name__}") from None
    found = [item for item in items if isinstance(item, (Dropout, DropPath, DropBlock2d, _NoiseLayer))]  # others: any
    if not found:
        raise ValueError("layers: holds no pybn.nn dropout or noise layer (Dropout, DropPath, DropBlock2d, "
                         "AlphaDropout, GaussianDropout, GaussianNoise) to keep on")
    return found


def _torch_nn_if_module(obj: Any) -> Any:
    """torch.nn when `obj` is a torch module (torch is imported only if the caller has it)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        return torch.nn
    return None


def _mc_torch_modules(model: Any, torch_nn: Any) -> list[Any]:
    from ..torch.drop_path import StochasticDepth
    from ..torch.dropblock import DropBlock2d as TorchDropBlock2d
    from ..torch.nn import _DropoutForward
    from ..torch.noise import _SeededNoise

    found = []
    for name, module in model.named_modules():
        if isinstance(module, (_DropoutForward, StochasticDepth, TorchDropBlock2d, _SeededNoise)):
            found.append(module)
        elif isinstance(module, torch_nn.modules.dropout._DropoutNd):
            raise TypeError(f"layers: {name or 'the model'} is a {type(module).__name__} of torch, whose masks "
                            "pybn does not set (swap it with pybn.torch.accelerate first)")
    return found


def _mc_state(module: Any) -> tuple[Any, ...]:
    return (module.training, module.seed, module.offset, getattr(module, "rank", None),
            getattr(module, "world_size", None))


def _mc_set(module: Any, seed: int, offset: int) -> None:
    module.seed = seed
    module.offset = offset
    if getattr(module, "world_size", None) is not None:  # one process's masks: the same on every rank
        module.rank, module.world_size = 0, 1
    module.train(True)


def _mc_restore(module: Any, state: tuple[Any, ...]) -> None:
    training, seed, offset, rank, world_size = state
    module.seed = seed
    if seed is not None:
        module.offset = offset
    if world_size is not None:
        module.rank, module.world_size = rank, world_size
    module.train(training)
