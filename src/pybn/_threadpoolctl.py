"""pybn's thread pool as threadpoolctl sees it: ``threadpool_info()`` lists it and
``threadpool_limits(n)`` limits it (``user_api`` and ``internal_api`` "pybn").

threadpoolctl finds the thread pools of a process through the shared libraries loaded in
it: a controller class claims a library by its file name, and reads and sets its thread
count through the library's C symbols. pybn's pool lives in its extension module
(``pybn/_C.cpython-*.so``), which exports ``pybn_get_num_threads`` and
``pybn_set_num_threads`` for this; other extension modules named ``_C`` (torch's) lack
them, and threadpoolctl passes over those.

The controller is registered when threadpoolctl is imported: at once when it already is,
otherwise by a one-shot import hook. ``import pybn`` neither needs threadpoolctl nor pays
for importing it (about 3 ms).
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

# Before 3.3, threadpoolctl claimed a library by its file name alone: the "_c." prefix
# would then claim every extension module named _C. With an older version pybn stays
# unregistered (its thread count is still pybn.set_num_threads's).
MIN_THREADPOOLCTL = (3, 3)
SYMBOLS = ("pybn_get_num_threads", "pybn_set_num_threads")

_registered = False


def _controller_class(threadpoolctl: ModuleType) -> type:
    from . import _C

    # the base class is an attribute of the module passed in (untyped), hence not a type mypy knows
    class PybnController(threadpoolctl.LibController):  # type: ignore[name-defined,misc]
        """pybn's fork-join pool: the thread count of pybn.get_num_threads()."""

        user_api = "pybn"
        internal_api = "pybn"
        filename_prefixes = ("_c.",)  # pybn/_C.cpython-311-x86_64-linux-gnu.so, lower-cased
        check_symbols = SYMBOLS

        def get_num_threads(self) -> int | None:
            get = getattr(self.dynlib, "pybn_get_num_threads", None)
            return None if get is None else int(get())

        def set_num_threads(self, num_threads: int) -> None:
            set_ = getattr(self.dynlib, "pybn_set_num_threads", None)
            if set_ is not None:  # a limit past pybn's range is its nearest end
                set_(min(max(int(num_threads), 1), _C.MAX_THREADS))

        def get_version(self) -> str:
            return _C.__version__

    return PybnController


def _version(module: ModuleType) -> tuple[int, ...]:
    parts = []
    for part in str(getattr(module, "__version__", "0")).split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


def register(threadpoolctl: ModuleType) -> bool:
    """Register pybn's controller with this threadpoolctl module; False when it is too old
    (or registration already happened)."""
    global _registered
    if _registered or _version(threadpoolctl) < MIN_THREADPOOLCTL or not hasattr(threadpoolctl, "register"):
        return False
    threadpoolctl.register(_controller_class(threadpoolctl))
    _registered = True
    return True


def _register_or_warn(threadpoolctl: ModuleType) -> None:
    # Runs inside `import threadpoolctl`: an error here must not make that import fail.
    try:
        register(threadpoolctl)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"pybn could not register its thread pool with threadpoolctl: {e!r}",
                      RuntimeWarning, stacklevel=2)


class RegisterOnImport:
    """A meta path finder that waits for threadpoolctl's first import, makes its loader
    register pybn's controller right after running the module, and removes itself."""

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if name != "threadpoolctl":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the other finders' answer
        loader: Any = None if spec is None else spec.loader  # (its method is replaced on the instance)
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is not None:
            def exec_then_register(module: ModuleType) -> None:
                exec_module(module)
                _register_or_warn(module)

            with contextlib.suppress(AttributeError):  # a loader without instance attributes: not registered
                loader.exec_module = exec_then_register
        return spec


def register_when_imported() -> None:
    """Register now if threadpoolctl is imported, else when it is."""
    module = sys.modules.get("threadpoolctl")
    if module is not None:
        _register_or_warn(module)
    elif not any(isinstance(f, RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, RegisterOnImport())
