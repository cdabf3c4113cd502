"""Swap pybn's modules into an existing model (:func:`accelerate`, :func:`convert_sync_batchnorm`)
and out of it (:func:`revert`)."""
import logging
from typing import Any, Callable, Dict, List, Literal, NamedTuple, Optional, Tuple, Type, Union, cast, overload

from torch import nn
from torch.nn.utils import parametrize

from .._checks import flag
from . import nn as pnn
from .seeded import PinnedSeed

__all__ = ["accelerate", "convert_sync_batchnorm", "revert", "Swapped"]

logger = logging.getLogger("pybn.torch")

# exact torch class -> pybn class (a subclass with its own forward computes something else: left alone)
ACCELERATED: Dict[Type[nn.Module], Type[nn.Module]] = {
    cls.drop_in_for: cls for cls in (pnn.BatchNorm1d, pnn.BatchNorm2d, pnn.BatchNorm3d, pnn.SyncBatchNorm,
                                     pnn.Dropout, pnn.Dropout1d, pnn.Dropout2d, pnn.Dropout3d, pnn.AlphaDropout)}
REVERTED = {pybn_cls: torch_cls for torch_cls, pybn_cls in ACCELERATED.items()}
_TO_SYNC = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
            pnn.BatchNorm1d, pnn.BatchNorm2d, pnn.BatchNorm3d)


class Swapped(NamedTuple):
    """One module replaced by :func:`accelerate` or :func:`convert_sync_batchnorm`."""

    name: str
    """Its qualified name in the model ("" for the model itself)."""
    before: str
    """The class it had, e.g. "torch.nn.BatchNorm2d"."""
    after: str
    """The class it has now, e.g. "pybn.torch.nn.BatchNorm2d"."""


@overload
def accelerate(model: nn.Module, *, return_report: Literal[False] = ...) -> nn.Module: ...
@overload
def accelerate(model: nn.Module, *, return_report: Literal[True]) -> Tuple[nn.Module, List[Swapped]]: ...
def accelerate(model: nn.Module, *, return_report: bool = False) -> Union[nn.Module, Tuple[nn.Module, List[Swapped]]]:
    """Run `model`'s batch norm and dropout layers on pybn's kernels: the one-line switch.

    Every module of exactly one of the classes ``torch.nn.BatchNorm1d/2d/3d``,
    ``SyncBatchNorm``, ``Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout`` becomes an instance
    of the :mod:`pybn.torch.nn` class of the same name: its class is changed in place, so it
    is the same object with the same parameters and buffers (an optimizer built before still
    updates them), hooks (their handles still remove them), mode and settings, and every
    reference to it sees the change; ``state_dict`` keys do not change, so
    the model saves and loads the same checkpoints as before. Subclasses of those classes
    are left alone (their ``forward`` may compute something else), but for the one
    ``torch.nn.utils.parametrize`` makes for a module with a parametrized tensor, which
    is made again over the pybn class (as :func:`revert` and
    :func:`convert_sync_batchnorm` do). As
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, `model` is changed in place and
    returned (itself also when it is such a layer).

    Parameters
    ----------
    model : torch.nn.Module
    return_report : bool
        Also return the list of :class:`Swapped` (each is logged at INFO level on the
        ``"pybn.torch"`` logger too).
    """
    return _swap(model, lambda m: ACCELERATED.get(_own_class(m)), None, return_report, "accelerate")


@overload
def convert_sync_batchnorm(model: nn.Module, process_group: Any = ..., *,
                           return_report: Literal[False] = ...) -> nn.Module: ...
@overload
def convert_sync_batchnorm(model: nn.Module, process_group: Any = ..., *,
                           return_report: Literal[True]) -> Tuple[nn.Module, List[Swapped]]: ...
def convert_sync_batchnorm(model: nn.Module, process_group: Any = None, *,
                           return_report: bool = False) -> Union[nn.Module, Tuple[nn.Module, List[Swapped]]]:
    """Every BatchNorm1d/2d/3d (torch's or pybn's) and torch SyncBatchNorm in `model` becomes a
    :class:`pybn.torch.nn.SyncBatchNorm` over `process_group` (None: the default group): its
    class is changed in place, as :func:`accelerate` does. As torch's
    ``convert_sync_batchnorm``, returns `model`, and with ``return_report=True`` the list of
    :class:`Swapped`."""
    def target(m: nn.Module) -> Optional[Type[nn.Module]]:
        return pnn.SyncBatchNorm if _own_class(m) in _TO_SYNC else None

    return _swap(model, target, process_group, return_report, "convert_sync_batchnorm")


@overload
def revert(model: nn.Module, *, return_report: Literal[False] = ...) -> nn.Module: ...
@overload
def revert(model: nn.Module, *, return_report: Literal[True]) -> Tuple[nn.Module, List[Swapped]]: ...
def revert(model: nn.Module, *, return_report: bool = False) -> Union[nn.Module, Tuple[nn.Module, List[Swapped]]]:
    """The inverse of :func:`accelerate`: every module of one of its :mod:`pybn.torch.nn` classes
    becomes an instance of the torch class it stands in for, in place as :func:`accelerate`
    does, for tools that match torch's exact classes (``torch.ao.quantization``'s
    ``fuse_modules``, ``prepare``, ``prepare_qat_fx``; ``torch.fx``'s ``fuse``). A pinned seed
    goes with its offset (torch's module draws from torch's generator). pybn's modules without
    a torch counterpart (DropPath, GaussianNoise, DropBlock2d...) are left as they are. The
    tails :func:`fuse_tails` fused (calls with ``residual=`` / ``relu=``, which torch's
    modules do not take) are first written back as separate calls; a forward of the user's
    own that passes them fails on torch's modules.

    Parameters
    ----------
    model : torch.nn.Module
    return_report : bool
        Also return the list of :class:`Swapped`.
    """
    from .fuse import unfuse_tails  # (fuse imports this module)

    flag(return_report, "return_report")  # (before the tails are unfused)
    if isinstance(model, nn.Module) and unfuse_tails(model):
        logger.info("pybn.torch.revert: the fused tails are separate calls again")
    return _swap(model, lambda m: REVERTED.get(_own_class(m)), None, return_report, "revert")


def _swap(model: nn.Module, target: Callable[[nn.Module], Optional[Type[nn.Module]]], process_group: Any,
          return_report: bool, what: str) -> Union[nn.Module, Tuple[nn.Module, List[Swapped]]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    flag(return_report, "return_report")
    report: List[Swapped] = []
    for name, module in list(model.named_modules()):  # (a module in several places: once, first name)
        cls = target(module)
        if cls is not None:
            report.append(Swapped(name, _class_name(type(module)), _class_name(cls)))
            _recast(module, cls, process_group)
            logger.info("pybn.torch.%s: %s: %s -> %s", what, name or "(the model)", *report[-1][1:])
    return (model, report) if return_report else model


def _own_class(module: nn.Module) -> type:
    """The class a swap looks at: the module's, or for a module with a parametrized tensor
    (torch.nn.utils.parametrize), the class under the one torch made for it, which only
    adds the parametrized tensors' properties."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__module__ == parametrize.__name__ and len(cls.__bases__) == 1:
        return cls.__bases__[0]
    return cls


def _recast(module: nn.Module, cls: Type[nn.Module], process_group: Any) -> None:
    """Makes module an instance of `cls` (the pybn classes add no state of their own but a pinned
    seed, and SyncBatchNorm the process group): the same object keeps its parameters, buffers and
    hooks, and so do the handles of its hooks, the load-state-dict hooks bound to it and any
    other reference to it. (A new module with the same attributes left handles taken before
    the switch removing nothing.)"""
    group = process_group if process_group is not None else getattr(module, "process_group", None)
    if isinstance(module, PinnedSeed) and not issubclass(cls, PinnedSeed):  # (revert: a torch class again)
        for name in ("_seed", "_seed_t"):
            module.__dict__.pop(name, None)
        module._buffers.pop("_offset_t", None)
        module._non_persistent_buffers_set.discard("_offset_t")
    if _own_class(module) is not type(module):  # parametrized: torch's class for it again, over cls
        made = type(module)
        cls = type(f"Parametrized{cls.__name__}", (cls,),
                   {k: v for k, v in vars(made).items() if k not in ("__dict__", "__weakref__")})
    module.__class__ = cls
    if issubclass(cls, pnn.SyncBatchNorm):
        cast(pnn.SyncBatchNorm, module).process_group = group


def _class_name(cls: type) -> str:
    module = cls.__module__
    if module.startswith("torch.nn.modules"):
        module = "torch.nn"
    elif getattr(pnn, cls.__qualname__, None) is cls:  # (AlphaDropout is defined in pybn.torch.noise)
        module = "pybn.torch.nn"
    return f"{module}.{cls.__qualname__}"
