"""Layers for NumPy training loops (docs/layers.md).

:class:`BatchNorm` and :class:`Dropout` wrap the pybn kernels in PyTorch-style modules:
``y = layer(x)`` runs the forward pass, ``dx = layer.backward(dy)`` the backward pass of
the most recent forward, and ``train()`` / ``eval()`` switch the mode. The layers hold no
autograd graph: each keeps just what its backward needs from the last forward.

Errors follow PyTorch where it has one: ``backward`` before any ``forward`` is a
``RuntimeError`` (what PyTorch raises for a gradient without a graph); wrong arguments are
``TypeError`` / ``ValueError`` naming the argument, and ``load_state_dict`` problems a
``KeyError`` (missing or unexpected key) or ``ValueError`` (wrong shape) naming the key.
"""
from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import numpy as np

from ._checks import (DTYPE_NAMES, as_array, channel_layout, float_array, float_dtype, integer, is_float_dtype,
                      flag, param_dtype, real_number)
from .batchnorm import (BatchNormResidualGrads, batch_norm_backward, batch_norm_infer, batch_norm_train,
                        residual_input)
from .drop_path import drop_path, drop_path_noise_shape
from .dropblock import drop_block, drop_block_noise_shape, noise_shape_of
from .dropout import counters_used, dropout, relu_dropout_backward, relu_of
from .noise import (alpha_dropout, alpha_dropout_backward, gaussian_dropout, gaussian_dropout_stddev,
                    gaussian_noise, normal_counters_used)

__all__ = ["BatchNorm", "Dropout", "DropPath", "AlphaDropout", "GaussianDropout", "GaussianNoise", "DropBlock2d",
           "mc_dropout", "mc_dropout_offset"]

_U64 = 1 << 64
_I64 = 1 << 63  # num_batches_tracked is an int64 in PyTorch's state_dict
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


def _check_dy(dy: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """dy must match the last forward's input exactly; say so in the layer's own terms."""
    array = float_array(dy, "dy")
    if array.shape != shape:
        raise ValueError(f"dy: shape {array.shape} does not match the last forward's input {shape}")
    if array.dtype != dtype:
        raise TypeError(f"dy: dtype {array.dtype} does not match the last forward's input ({dtype})")
    return array


# --------------------------------------------------------------------------- BatchNorm

class BatchNorm(_Layer):
    """Batch normalization over every axis but the channel axis, with PyTorch's semantics.

    One layer covers ``nn.BatchNorm1d/2d/3d`` (``axis=1``) and channels-last inputs such
    as Keras' ``BatchNormalization`` (``axis=-1``). In training mode the batch statistics
    normalize ``x`` and the running statistics are updated in place,
    ``r = (1 - momentum) * r + momentum * batch_stat`` (variance unbiased); in evaluation
    mode the running statistics normalize ``x``.

    Parameters
    ----------
    num_features : int
        Number of channels C (the extent of ``x`` along `axis`).
    axis : int, default 1
        The channel axis; negative counts from the end (-1 for NHWC / Keras).
    eps : float, default 1e-5
        Added to the variance before the square root. 0 is allowed: a channel whose values
        are all equal then normalizes to 0 (PyTorch's layer refuses eps <= 0 in training).
    momentum : float or None, default 0.1
        PyTorch's momentum (the weight of the new batch). ``None`` is the cumulative
        moving average: momentum ``1 / num_batches_tracked`` (after counting this batch).
    affine : bool, default True
        Learnable per-channel ``weight`` (gamma, starts at 1) and ``bias`` (beta, 0).
    track_running_stats : bool, default True
        Keep running statistics. When False they are None and batch statistics are used
        in evaluation mode too (as PyTorch).
    dtype : str or numpy dtype, default "float32"
        The inputs' dtype: float32 or float64, for which parameters and statistics have
        this dtype too; or float16 or bfloat16 (ml_dtypes'), with float32 parameters and
        statistics (docs/dtypes.md).

    Attributes
    ----------
    weight, bias : ndarray of shape (C,) or None
        The affine parameters (None when ``affine=False``). Update them in place or
        rebind them, e.g. ``bn.weight -= lr * bn.grad_weight``.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        Set (overwritten, not accumulated) by :meth:`backward`; None before it and when
        ``affine=False``.
    running_mean, running_var : ndarray of shape (C,) or None
        Updated in place by training-mode forwards (None without running statistics).
    num_batches_tracked : int or None
        Training-mode forwards so far (None without running statistics).
    training : bool
        The current mode; new layers start in training mode.

    Notes
    -----
    :meth:`backward` differentiates the most recent forward, in the mode that forward
    ran in, and may be called more than once. It reads that forward's input and the
    current ``weight``, so modify neither in place between the two (update the
    parameters after ``backward``, as an optimizer step does).

    A ResNet block's tail, ``relu(bn(x) + identity)``, is one call and one pass:
    ``bn(x, identity, relu=True)``; its backward returns ``(dx, d_identity)``
    (docs/batchnorm.md, "Fused residual").

    Examples
    --------
    >>> bn = BatchNorm(64)
    >>> y = bn(x)                    # x of shape (N, 64, ...)
    >>> dx = bn.backward(dy)
    >>> bn.weight -= lr * bn.grad_weight
    >>> bn.bias -= lr * bn.grad_bias
    >>> y = bn(x, identity, relu=True)   # relu(bn(x) + identity)
    >>> dx, d_identity = bn.backward(dy)
    """

    def __init__(self, num_features: int, *, axis: int = 1, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dtype: Any = "float32") -> None:
        self.num_features = integer(num_features, "num_features")
        if self.num_features < 1:
            raise ValueError(f"num_features: must be >= 1, got {self.num_features}")
        self.axis = integer(axis, "axis")
        self.eps = real_number(eps, "eps", minimum=0.0)
        self.momentum = None if momentum is None else real_number(momentum, "momentum")
        self.affine = flag(affine, "affine")
        self.track_running_stats = flag(track_running_stats, "track_running_stats")
        self.dtype = _float_dtype(dtype)
        self.param_dtype = param_dtype(self.dtype)  # of weight, bias and the statistics
        self.training = True

        c, dt = self.num_features, self.param_dtype
        if c * dt.itemsize >= _I64:
            raise ValueError(f"num_features: {c} channels of {dt} do not fit in memory")
        self.weight = np.ones(c, dt) if self.affine else None
        self.bias = np.zeros(c, dt) if self.affine else None
        self.grad_weight: np.ndarray | None = None
        self.grad_bias: np.ndarray | None = None
        if self.track_running_stats:
            self.running_mean: np.ndarray | None = np.zeros(c, dt)
            self.running_var: np.ndarray | None = np.ones(c, dt)
            self.num_batches_tracked: int | None = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        # (x, mean, invstd, training) of the last forward, for backward
        self._saved: tuple[np.ndarray, np.ndarray, np.ndarray, bool] | None = None
        # (whether it added a residual, its output y when it fused a ReLU) of the last forward
        self._tail: tuple[bool, np.ndarray | None] = (False, None)

    def __repr__(self) -> str:
        return (f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, dtype={self.dtype.name!r})")

    # ---- forward / backward

    def forward(self, x: Any, residual: Any = None, *, relu: bool = False) -> np.ndarray:
        """Normalize `x`: batch statistics in training mode (or without running
        statistics), the running statistics in evaluation mode.

        Parameters
        ----------
        x : array_like of the layer's dtype, ndim >= 2
            Its extent along `axis` must be `num_features`.
        residual : array_like of x's shape and dtype, optional
            Added to the normalized values in the same pass: ``y = bn(x) + residual``.
            Then :meth:`backward` returns ``(dx, d_residual)``.
        relu : bool, default False
            ``y = max(., 0)``, fused in the same pass (after the residual's add).

        Returns
        -------
        ndarray
            y, C-contiguous, the shape and dtype of x.

        Raises
        ------
        TypeError
            x (or residual) is not of the layer's dtype.
        ValueError
            x's channel count is not `num_features`, residual's shape is not x's, or
            (when using batch statistics) there is only one value per channel.
        """
        x = self._check_input(x)
        r = residual_input(residual, x)
        relu = flag(relu, "relu")
        if self.training or not self.track_running_stats:
            y = self._forward_batch_stats(x, r, relu)
        else:
            y = self._forward_running_stats(x, r, relu)
        self._tail = (r is not None, y if relu else None)
        return y

    def _check_input(self, x: Any) -> np.ndarray:
        array = float_array(x, "x")
        if array.dtype != self.dtype:
            raise TypeError(f"x: dtype {array.dtype} does not match the layer's dtype {self.dtype} "
                            f"(cast x, or build the layer with dtype={array.dtype.name!r})")
        _, _, channels, _ = channel_layout(array.shape, self.axis)
        if channels != self.num_features:
            raise ValueError(f"x: has {channels} channels along axis {self.axis} (shape {array.shape}), "
                             f"but num_features is {self.num_features}")
        return array

    def _forward_batch_stats(self, x: np.ndarray, residual: np.ndarray | None = None,
                             relu: bool = False) -> np.ndarray:
        update = self.training and self.track_running_stats
        kwargs: dict[str, Any] = {}
        if update:
            kwargs = dict(running_mean=self.running_mean, running_var=self.running_var,
                          momentum=self._momentum_for_next_batch())
            # counted before the kernel, as torch does: a KeyboardInterrupt that arrived during
            # the kernel is raised as it returns, having updated the statistics, and then the
            # count agrees with them (one arriving during the few microseconds of checks before
            # the kernel leaves the batch counted, unapplied); an error of the call (its
            # arguments, memory) uncounts it
            assert self.num_batches_tracked is not None  # (tracking running statistics)
            self.num_batches_tracked += 1
        try:
            y, mean, invstd = batch_norm_train(x, self.weight, self.bias, eps=self.eps, axis=self.axis, relu=relu,
                                               residual=residual, **kwargs)
        except Exception:
            if update:
                self.num_batches_tracked -= 1  # type: ignore[operator]  # (counted above)
            raise
        self._saved = (x, mean, invstd, True)
        return y

    def _momentum_for_next_batch(self) -> float:
        if self.momentum is not None:
            return self.momentum
        count = integer(self.num_batches_tracked, "num_batches_tracked")
        if count < 0:
            raise ValueError(f"num_batches_tracked: must be >= 0 (batches counted so far), got {count}")
        return 1.0 / (count + 1)  # cumulative moving average, as PyTorch

    def _forward_running_stats(self, x: np.ndarray, residual: np.ndarray | None = None,
                               relu: bool = False) -> np.ndarray:
        assert self.running_mean is not None and self.running_var is not None  # (tracking running statistics)
        y = batch_norm_infer(x, self.running_mean, self.running_var, self.weight, self.bias,
                             eps=self.eps, axis=self.axis, relu=relu, residual=residual)
        # copies: a later load_state_dict or training step must not change this gradient
        invstd = (1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)).astype(self.param_dtype)
        self._saved = (x, self.running_mean.copy(), invstd, False)
        return y

    def backward(self, dy: Any) -> Any:
        """Gradient of the most recent forward; sets `grad_weight` and `grad_bias`.

        After a forward with batch statistics the gradient includes the path through
        them; after an evaluation-mode forward it is ``dy * weight / sqrt(running_var + eps)``.
        After a forward with ``relu=True``, dy is masked where its output was <= 0 (the
        forward's output is kept for this: do not modify it in place before backward).

        Parameters
        ----------
        dy : array_like
            Gradient of the loss with respect to the forward's output (same shape and dtype).

        Returns
        -------
        ndarray
            dx, the gradient with respect to the forward's input.
        (ndarray, ndarray)
            ``(dx, d_residual)`` when the forward added a residual: d_residual is dy (masked
            by the ReLU when fused; dy itself, not a copy, otherwise).

        Raises
        ------
        RuntimeError
            No forward pass yet.
        ValueError, TypeError
            dy's shape or dtype differs from the forward's input.
        """
        x, mean, invstd, training = self._saved_or_raise(self._saved)
        dy = _check_dy(dy, x.shape, x.dtype)
        added, y = self._tail
        grads = batch_norm_backward(dy, x, mean, invstd, self.weight, training=training, axis=self.axis, y=y,
                                    residual=added)
        if self.affine:
            self.grad_weight, self.grad_bias = grads.dweight, grads.dbias
        if isinstance(grads, BatchNormResidualGrads):
            return grads.dx, grads.d_residual
        return grads.dx

    # ---- state

    def state_dict(self) -> dict[str, np.ndarray]:
        """The parameters and buffers under PyTorch's names, as copies.

        Keys, in PyTorch's order: ``weight``, ``bias`` (when affine), ``running_mean``,
        ``running_var``, ``num_batches_tracked`` (a 0-d int64 array; when tracking running
        statistics). Unlike PyTorch the arrays are copies, so a saved state does not change
        as the layer trains. ``torch_module.load_state_dict({k: torch.from_numpy(v) ...})``
        accepts it.

        Returns
        -------
        dict of str to ndarray
        """
        state = {name: getattr(self, name).copy() for name in self._array_keys()}
        if self.track_running_stats:
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, np.int64)
        return state

    def _array_keys(self) -> list[str]:
        return (["weight", "bias"] if self.affine else []) + \
               (["running_mean", "running_var"] if self.track_running_stats else [])

    def _state_keys(self) -> list[str]:
        return self._array_keys() + (["num_batches_tracked"] if self.track_running_stats else [])

    def load_state_dict(self, state_dict: Any) -> None:
        """Copy a state (ours, or a torch BatchNorm's) into the existing arrays.

        Every value is checked before anything is copied, so a bad state changes nothing.
        Values may be ndarrays, torch CPU tensors (bfloat16 ones too) or array-likes; they
        are cast to the layer's ``param_dtype`` (float32 for a 16-bit layer).

        Parameters
        ----------
        state_dict : mapping
            Exactly the keys :meth:`state_dict` gives, e.g.
            ``{k: v.numpy() for k, v in torch_bn.state_dict().items()}``.

        Raises
        ------
        KeyError
            A key is missing or unexpected (the message names it).
        ValueError
            A value has the wrong shape, a finite value overflows the layer's dtype,
            ``running_var`` has a negative entry or ``num_batches_tracked`` is outside
            [0, 2**63) (the message names the key).
        TypeError
            `state_dict` is not a mapping, or a value is not numeric (a torch tensor that
            requires grad, a masked array: pass ``.detach()`` / plain arrays).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict: must be a mapping of names to arrays, got {type(state_dict).__name__}")
        expected = self._state_keys()
        for key in expected:
            if key not in state_dict:
                raise KeyError(f"{key}: missing from the state_dict (expected keys: {', '.join(expected)})")
        for key in state_dict:
            if key not in expected:
                raise KeyError(f"{key}: unexpected key in the state_dict (expected keys: {', '.join(expected)})")
        arrays = {key: _state_array(state_dict[key], key, (self.num_features,), self.param_dtype)
                  for key in self._array_keys()}
        if self.track_running_stats:
            count = _batch_count(state_dict["num_batches_tracked"])
            self.num_batches_tracked = count
        for key, value in arrays.items():  # fresh copies: a value viewing another key's array is read first
            getattr(self, key)[...] = value  # in place: references stay valid

    # ---- construction from other frameworks

    @classmethod
    def from_torch(cls, module: Any, *, dtype: Any = None) -> BatchNorm:
        """A layer equal to a torch ``nn.BatchNorm1d/2d/3d`` (``axis=1``).

        Copies eps, momentum (None included), affine, track_running_stats, the mode and
        the state; the result shares no memory with the module.

        Parameters
        ----------
        module : torch.nn.modules.batchnorm._BatchNorm
            On the CPU, of float32, float64, float16 or bfloat16 (``module.half()``,
            ``module.to(torch.bfloat16)``; bfloat16 with ml_dtypes).
        dtype : str or numpy dtype, optional
            The layer's input dtype (see the class); default the module's. A 16-bit module
            makes a 16-bit layer whose parameters and statistics are float32 (``param_dtype``,
            docs/dtypes.md), the module's values widened exactly. PyTorch's mixed precision
            keeps batch norm modules in float32 beside 16-bit activations: pass
            ``dtype="bfloat16"`` (or ``"float16"``) for such a module, whose values are kept
            as they are. Other combinations cast the values as :meth:`load_state_dict` does.

        Returns
        -------
        BatchNorm
        """
        try:
            import torch  # optional dependency: only this constructor needs it
        except ImportError:
            raise ImportError("BatchNorm.from_torch needs torch (pip install 'pybn-kernels[torch]')") from None

        if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"module: expected a torch BatchNorm1d/2d/3d, got {type(module).__name__}")
        tensors = [t for t in (module.weight, module.running_mean) if t is not None]
        devices = {t.device.type for t in module.state_dict().values()}
        if devices - {"cpu"}:
            raise TypeError(f"module: its tensors are on {', '.join(sorted(devices - {'cpu'}))}; pybn reads CPU "
                            "tensors (module.cpu())")
        if dtype is None:
            torch_dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
            dtype = str(torch_dtype).replace("torch.", "")
            if dtype not in DTYPE_NAMES:
                raise TypeError(f"module: dtype {torch_dtype} is not supported (pybn takes "
                                f"{', '.join(DTYPE_NAMES)})")
        layer = cls(module.num_features, axis=1, eps=module.eps, momentum=module.momentum,
                    affine=module.affine, track_running_stats=module.track_running_stats, dtype=dtype)
        layer.load_state_dict({k: v.detach() for k, v in module.state_dict().items()})
        return layer.train(module.training)

    @classmethod
    def from_keras(cls, gamma: Any, beta: Any, moving_mean: Any, moving_variance: Any, *,
                   momentum: float = 0.99, epsilon: float = 1e-3, axis: int = -1) -> BatchNorm:
        """A layer from the weights of a Keras ``BatchNormalization``.

        Pass ``layer.get_weights()`` in Keras' order (``gamma`` and ``beta`` only exist
        with ``scale=True`` / ``center=True``; give None for an absent one) and the layer's
        ``momentum``, ``epsilon`` and ``axis``.

        Keras and PyTorch define momentum the other way round: Keras updates
        ``moving = moving * momentum + batch * (1 - momentum)``, so Keras' ``momentum=0.99``
        is PyTorch's ``momentum=0.01``. This converts it (``1 - momentum``).

        Parameters
        ----------
        gamma, beta : array_like of shape (C,) or None
            Scale and offset. An absent one becomes the identity (1 or 0); with both
            absent the layer has ``affine=False``. A present-but-fixed one is still
            returned in ``weight`` / ``bias`` and given a gradient: leave it out of your
            optimizer's update to keep Keras' behaviour.
        moving_mean, moving_variance : array_like of shape (C,)
            The running statistics; their dtype is the layer's (float32 or float64; float16
            or bfloat16 statistics make a layer of that dtype, with float32 parameters).
        momentum : float in [0, 1], default 0.99
            Keras' momentum.
        epsilon : float, default 1e-3
            Keras' default differs from PyTorch's 1e-5.
        axis : int, default -1
            The channel axis (Keras' default, channels-last).

        Returns
        -------
        BatchNorm
            In training mode, ``num_batches_tracked = 0``.

        Notes
        -----
        Keras updates ``moving_variance`` with the biased batch variance; this layer, like
        PyTorch, uses the unbiased one (a factor ``n/(n-1)`` on the batch term, where n is
        the number of values per channel). The outputs and ``moving_mean`` follow Keras'
        formulas exactly.
        """
        momentum = real_number(momentum, "momentum")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum: Keras' momentum must be in [0, 1], got {momentum}")
        epsilon = real_number(epsilon, "epsilon", minimum=0.0)
        mean = float_array(moving_mean, "moving_mean")
        if mean.ndim != 1 or mean.size < 1:
            raise ValueError(f"moving_mean: expected shape (C,), got {mean.shape}")
        layer = cls(mean.size, axis=axis, eps=epsilon, momentum=1.0 - momentum,
                    affine=gamma is not None or beta is not None, dtype=mean.dtype)
        values = {"running_mean": mean, "running_var": moving_variance}
        if layer.affine:  # an absent gamma / beta keeps the identity the constructor set
            values.update(weight=layer.weight if gamma is None else gamma,
                          bias=layer.bias if beta is None else beta)
        values = {k: _state_array(v, _KERAS_NAMES[k], (mean.size,), layer.param_dtype) for k, v in values.items()}
        layer.load_state_dict({**values, "num_batches_tracked": 0})
        return layer


_KERAS_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                "running_var": "moving_variance"}


def _float_dtype(dtype: Any) -> np.dtype:
    named = float_dtype(dtype) if isinstance(dtype, str) and dtype in DTYPE_NAMES else None
    try:
        dt: np.dtype = named if named is not None else np.dtype(dtype)
    except TypeError:
        if isinstance(dtype, str) and dtype == "bfloat16":  # (NumPy has no such dtype without ml_dtypes)
            raise TypeError("dtype: bfloat16 needs ml_dtypes (pip install ml_dtypes)") from None
        raise TypeError(f"dtype: {dtype!r} is not a dtype (pybn takes {', '.join(DTYPE_NAMES)})") from None
    if not is_float_dtype(dt):
        raise TypeError(f"dtype: {dt} is not supported (pybn takes {', '.join(DTYPE_NAMES)})")
    return dt


def _state_array(value: Any, key: str, shape: tuple[int, ...], dtype: np.dtype | None = None) -> np.ndarray:
    """A state value as an ndarray of `shape` (torch CPU tensors convert via __array__, a
    bfloat16 one, which NumPy cannot read, widened exactly to float32 first); with `dtype`, a
    fresh array of that dtype, refused when a finite value overflows it and, for a variance,
    when an entry is negative."""
    if str(getattr(value, "dtype", "")) == "torch.bfloat16":
        value = value.float()
    arr = as_array(value, key)
    if not (is_float_dtype(arr.dtype) or np.issubdtype(arr.dtype, np.floating) or
            np.issubdtype(arr.dtype, np.integer)):  # (ml_dtypes' bfloat16 is no np.floating)
        raise TypeError(f"{key}: dtype {arr.dtype} is not numeric")
    if arr.shape != shape:
        raise ValueError(f"{key}: expected shape {shape}, got {arr.shape}")
    if dtype is None:
        return arr
    with np.errstate(over="ignore"):
        cast = arr.astype(dtype)
    if np.any(np.isinf(cast) & np.isfinite(arr)):
        raise ValueError(f"{key}: a value overflows {dtype} (largest finite: {np.finfo(dtype).max:.4g})")
    if key in ("running_var", "moving_variance") and np.any(cast < 0):
        raise ValueError(f"{key}: a variance must be >= 0, got a negative entry")
    return cast


def _batch_count(value: Any) -> int:
    """num_batches_tracked of a state: an integer in [0, 2**63) (PyTorch keeps an int64)."""
    count = integer(_state_array(value, "num_batches_tracked", ()).item(), "num_batches_tracked")
    if not 0 <= count < _I64:
        raise ValueError(f"num_batches_tracked: must be in [0, 2**63) (batches counted so far), got {count}")
    return count


# --------------------------------------------------------------------------- Dropout

class Dropout(_Layer):
    """Inverted dropout with a reproducible counter-based mask (PyTorch's ``nn.Dropout``).

    In training mode each element is dropped with probability `p` and the kept ones are
    scaled by ``pybn.dropout_scale(p)`` (``1/(1-p)`` for p a multiple of 2**-16, so that
    ``E[y] = x`` for every p); in evaluation mode the layer is the identity. Call i draws its
    mask with ``pybn.dropout(x, p, seed=seed, offset=offset)`` and then advances
    ``offset`` by ``pybn.counters_used(n)`` (n mask elements), so no two calls share
    random counters and a run is reproduced exactly from its seed.

    Parameters
    ----------
    p : float in [0, 1], default 0.5
        Probability of dropping an element (PyTorch's ``p``, Keras' ``rate``).
    seed : int in [0, 2**64), optional
        Key of the random stream. None draws one from the operating system's entropy
        (as ``np.random.SeedSequence()``); it is kept in the ``seed`` attribute, so log
        it to reproduce the run.
    noise_shape : sequence of int or None, optional
        Keras semantics: the mask is drawn over this shape and broadcast over the axes
        where it is 1, e.g. ``(N, C, 1, 1)`` is PyTorch's ``Dropout2d``. A None entry
        takes x's extent on that axis (handy for the batch axis).

    Attributes
    ----------
    seed : int
    offset : int
        The first Philox counter of the next training-mode mask (starts at 0). Set it
        together with `seed` to resume a stream.
    training : bool

    Notes
    -----
    Only ``(seed, offset)`` of the last forward is kept: :meth:`backward` regenerates
    the mask, so no mask is stored. Backward after an evaluation-mode forward passes
    the gradient through. An MLP's hidden tail ``dropout(relu(x))`` is one call and one
    pass: ``layer(x, relu=True)``; the layer then keeps its output, whose backward needs
    no mask (``pybn.relu_dropout_backward``): do not modify it in place before
    :meth:`backward`.
    """

    def __init__(self, p: float = 0.5, *, seed: int | None = None, noise_shape: Any = None) -> None:
        self.p = p
        self.seed = _seed_or_entropy(seed)
        self.noise_shape = _noise_shape(noise_shape)
        self.offset = 0
        self.training = True
        # (p, seed, offset, mask shape or None for identity, x's shape, x's dtype) of the last
        # forward: attributes changed in between must not change its gradient
        self._saved: tuple[float, int, int, tuple[int, ...] | None, tuple[int, ...], np.dtype] | None = None
        self._relu_output: np.ndarray | None = None  # the last output of a forward with relu=True

    @property
    def p(self) -> float:
        """The drop probability, in [0, 1]."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        p = real_number(value, "p")
        if not 0.0 <= p <= 1.0:  # as torch.nn.Dropout, a ValueError
            raise ValueError(f"p: the drop probability must be in [0, 1], got {p}")
        self._p = p

    def __repr__(self) -> str:
        return f"Dropout(p={self.p}, seed={self.seed}, noise_shape={self.noise_shape})"

    def forward(self, x: Any, *, relu: bool = False) -> np.ndarray:
        """Drop and scale in training mode; return `x` itself in evaluation mode.

        Parameters
        ----------
        x : array_like, float32, float64, float16 or bfloat16
        relu : bool, default False
            ``dropout(relu(x))`` in one pass (in evaluation mode ``relu(x)``, as
            ``torch.relu``).

        Returns
        -------
        ndarray
            A new C-contiguous array in training mode; x unchanged (not copied) in
            evaluation mode, as PyTorch.
        """
        array = float_array(x, "x")
        relu = flag(relu, "relu")
        mask_shape = self._mask_shape(array.shape) if self.training else None
        self._saved = (self.p, self.seed, self.offset, mask_shape, array.shape, array.dtype)
        if mask_shape is None:
            y = relu_of(array) if relu else array
        else:
            y = dropout(array, self.p, seed=self.seed, offset=self.offset, noise_shape=mask_shape, relu=relu)
            self.offset = (self.offset + counters_used(math.prod(mask_shape))) % _U64
        self._relu_output = y if relu else None
        return y

    def _mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The noise shape with None entries filled in from x (x's shape without one)."""
        if self.noise_shape is None:
            return shape
        if len(self.noise_shape) != len(shape):
            raise ValueError(f"noise_shape: {self.noise_shape} has {len(self.noise_shape)} entries, "
                             f"x has {len(shape)} dimensions (shape {shape})")
        return tuple(s if d is None else d for d, s in zip(self.noise_shape, shape))

    def backward(self, dy: Any) -> np.ndarray:
        """Gradient of the most recent forward: dy through the same mask and scale.

        Parameters
        ----------
        dy : array_like
            Same shape and dtype as the forward's input.

        Returns
        -------
        ndarray
            dx; after an evaluation-mode forward, dy itself.

        Raises
        ------
        RuntimeError
            No forward pass yet.
        ValueError, TypeError
            dy's shape or dtype differs from the forward's input.
        """
        p, seed, offset, mask_shape, shape, dtype = self._saved_or_raise(self._saved)
        grad = _check_dy(dy, shape, dtype)
        if self._relu_output is not None:  # y > 0 exactly where the ReLU and the mask pass dy
            return relu_dropout_backward(grad, self._relu_output, 0.0 if mask_shape is None else p)
        if mask_shape is None:
            return grad
        return dropout(grad, p, seed=seed, offset=offset, noise_shape=mask_shape)


def _noise_shape(noise_shape: Any) -> tuple[int | None, ...] | None:
    if noise_shape is None:
        return None
    try:
        entries = tuple(noise_shape)
    except TypeError:
        raise TypeError(f"noise_shape: must be a sequence of ints (or None entries), got {noise_shape!r}") from None
    ns = tuple(None if d is None else integer(d, "noise_shape") for d in entries)
    if any(d is not None and d < 0 for d in ns):
        raise ValueError(f"noise_shape: negative extent in {ns}")
    return ns


def _u64(value: Any, name: str) -> int:
    v = integer(value, name)
    if not 0 <= v < _U64:
        raise ValueError(f"{name}: must be in [0, 2**64), got {v}")
    return v


def _seed_or_entropy(seed: Any) -> int:
    """`seed` checked, or (None) a fresh one from the operating system's entropy."""
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
    return _u64(seed, "seed")


def _rank_and_world_size(rank: Any, world_size: Any) -> tuple[int, int]:
    w = integer(world_size, "world_size")
    if w < 1:
        raise ValueError(f"world_size: must be >= 1, got {w}")
    r = integer(rank, "rank")
    if not 0 <= r < w:
        raise ValueError(f"rank: must be in [0, world_size) = [0, {w}), got {r}")
    return r, w


# --------------------------------------------------------------------------- DropPath

class DropPath(_Layer):
    """Stochastic depth (torchvision's ``StochasticDepth``, timm's ``DropPath``) with a
    reproducible counter-based mask (docs/dropout.md, "Stochastic depth").

    In training mode :func:`pybn.drop_path` drops whole samples of a residual branch
    (mode "row") or the whole branch (mode "batch") with probability `p` and scales the
    kept ones by ``pybn.dropout_scale(p)``; in evaluation mode the layer is the identity.
    Like :class:`Dropout`, each training call uses ``(seed, offset)`` and then advances
    ``offset`` by the counters its decisions used, so the masks of a run follow from its
    seed.

    Parameters
    ----------
    p : float in [0, 1]
        Probability of dropping a sample (or the branch).
    mode : "row" or "batch", default "row"
    seed : int in [0, 2**64), optional
        Key of the random stream; None draws one from the operating system's entropy.
        Under data parallelism give every rank the same seed.
    rank, world_size : int, default 0 and 1
        For data-parallel training with mode "row": rank r draws its decisions at
        ``offset + r * counters_used(N)`` and every rank advances ``offset`` by
        ``world_size * counters_used(N)``, so the ranks' samples get distinct decisions
        from one seed while ``offset`` stays the same on every rank (the local batch size
        N must be the same on every rank). Mode "batch" ignores them: every rank draws the
        one shared decision at ``offset``.

    Attributes
    ----------
    seed, offset : int
    training : bool
    """

    def __init__(self, p: float, mode: str = "row", *, seed: int | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        self.p = p
        drop_path_noise_shape((1,), mode)  # checks mode
        self.mode = mode
        self.seed = _seed_or_entropy(seed)
        self.rank, self.world_size = _rank_and_world_size(rank, world_size)
        self.offset = 0
        self.training = True
        # (p, seed, offset, mode, x's shape, x's dtype, training) of the last forward
        self._saved: tuple[float, int, int, str, tuple[int, ...], np.dtype, bool] | None = None

    @property
    def p(self) -> float:
        """The drop probability, in [0, 1]."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        p = real_number(value, "p")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: the drop probability must be in [0, 1], got {p}")
        self._p = p

    def __repr__(self) -> str:
        return (f"DropPath(p={self.p}, mode={self.mode!r}, seed={self.seed}, rank={self.rank}, "
                f"world_size={self.world_size})")

    def forward(self, x: Any) -> np.ndarray:
        """Drop samples (or the branch) in training mode; return `x` itself in evaluation mode."""
        array = float_array(x, "x")
        if not self.training:
            self._saved = (self.p, self.seed, self.offset, self.mode, array.shape, array.dtype, False)
            return array
        offset, stride = self._counters(array.shape)
        y = drop_path(array, self.p, seed=self.seed, offset=offset, mode=self.mode)
        self._saved = (self.p, self.seed, offset, self.mode, array.shape, array.dtype, True)
        self.offset = (self.offset + stride) % _U64
        return y

    def _counters(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(this rank's offset for this call, the advance of `offset` on every rank)."""
        if self.mode == "batch":
            return self.offset, counters_used(1)
        used = counters_used(shape[0] if shape else 1)
        return (self.offset + self.rank * used) % _U64, self.world_size * used

    def backward(self, dy: Any) -> np.ndarray:
        """Gradient of the most recent forward: dy through the same decisions and scale."""
        p, seed, offset, mode, shape, dtype, training = self._saved_or_raise(self._saved)
        grad = _check_dy(dy, shape, dtype)
        if not training:
            return grad
        return drop_path(grad, p, seed=seed, offset=offset, mode=mode)


# --------------------------------------------------------------------------- the noise layers

class _NoiseLayer(_Layer):
    """What AlphaDropout, GaussianDropout and GaussianNoise share with :class:`Dropout`:
    ``seed`` and ``offset`` (advanced after every training call by the counters the call
    used), the identity in evaluation mode, and a backward that regenerates the forward's
    randomness from the saved ``(seed, offset)``."""

    def __init__(self, seed: int | None) -> None:
        self.seed = _seed_or_entropy(seed)
        self.offset = 0
        self.training = True
        # (the layer's parameter, seed, offset, x's shape, x's dtype, training) of the last forward
        self._saved: tuple[float, int, int, tuple[int, ...], np.dtype, bool] | None = None

    def _parameter(self) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def _draw(self, x: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _gradient(self, dy: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _counters(self, n: int) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: Any) -> np.ndarray:
        """The noise in training mode; `x` itself (not copied) in evaluation mode.

        Parameters
        ----------
        x : array_like, float32, float64, float16 or bfloat16

        Returns
        -------
        ndarray
        """
        array = float_array(x, "x")
        value = self._parameter()
        self._saved = (value, self.seed, self.offset, array.shape, array.dtype, self.training)
        if not self.training:
            return array
        y = self._draw(array, value, self.seed, self.offset)
        self.offset = (self.offset + self._counters(array.size)) % _U64
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """Gradient of the most recent forward (dy itself after an evaluation-mode one).

        Raises
        ------
        RuntimeError
            No forward pass yet.
        ValueError, TypeError
            dy's shape or dtype differs from the forward's input.
        """
        value, seed, offset, shape, dtype, training = self._saved_or_raise(self._saved)
        grad = _check_dy(dy, shape, dtype)
        if not training:
            return grad
        return self._gradient(grad, value, seed, offset)


class AlphaDropout(_NoiseLayer):
    """Alpha dropout for SELU networks (PyTorch's ``nn.AlphaDropout``) with a reproducible
    mask: :func:`pybn.alpha_dropout` in training mode, the identity in evaluation mode.
    Call i uses ``(seed, offset)`` and advances ``offset`` by ``pybn.counters_used(n)``;
    its kept elements are those ``pybn.nn.Dropout(p)`` would keep at that offset.

    Parameters
    ----------
    p : float in [0, 1], default 0.5
    seed : int in [0, 2**64), optional
        None draws one from the operating system's entropy (kept in ``seed``).
    """

    def __init__(self, p: float = 0.5, *, seed: int | None = None) -> None:
        self.p = p
        super().__init__(seed)

    @property
    def p(self) -> float:
        """The drop probability, in [0, 1]."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        p = real_number(value, "p")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: the drop probability must be in [0, 1], got {p}")
        self._p = p

    def __repr__(self) -> str:
        return f"AlphaDropout(p={self.p}, seed={self.seed})"

    def _parameter(self) -> float:
        return self.p

    def _draw(self, x: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:
        return alpha_dropout(x, value, seed=seed, offset=offset)

    def _gradient(self, dy: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:
        return alpha_dropout_backward(dy, value, seed=seed, offset=offset)

    def _counters(self, n: int) -> int:
        return counters_used(n)


class GaussianDropout(_NoiseLayer):
    """Keras' ``GaussianDropout(rate)``: ``x * N(1, rate / (1 - rate))`` in training mode
    (:func:`pybn.gaussian_dropout`), the identity in evaluation mode. Call i uses
    ``(seed, offset)`` and advances ``offset`` by ``pybn.normal_counters_used(n)``.

    Parameters
    ----------
    rate : float in [0, 1)
    seed : int in [0, 2**64), optional
    """

    def __init__(self, rate: float, *, seed: int | None = None) -> None:
        self.rate = rate
        super().__init__(seed)

    @property
    def rate(self) -> float:
        """The drop rate the noise imitates, in [0, 1)."""
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        gaussian_dropout_stddev(value)  # checks it
        self._rate = float(value)

    def __repr__(self) -> str:
        return f"GaussianDropout(rate={self.rate}, seed={self.seed})"

    def _parameter(self) -> float:
        return self.rate

    def _draw(self, x: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:
        return gaussian_dropout(x, value, seed=seed, offset=offset)

    def _gradient(self, dy: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:
        return gaussian_dropout(dy, value, seed=seed, offset=offset)  # dy times the same multiplier

    def _counters(self, n: int) -> int:
        return normal_counters_used(n)


class GaussianNoise(_NoiseLayer):
    """Keras' ``GaussianNoise(stddev)``: ``x + N(0, stddev**2)`` in training mode
    (:func:`pybn.gaussian_noise`), the identity in evaluation mode; the gradient is dy.
    Call i uses ``(seed, offset)`` and advances ``offset`` by ``pybn.normal_counters_used(n)``.

    Parameters
    ----------
    stddev : float >= 0
    seed : int in [0, 2**64), optional
    """

    def __init__(self, stddev: float, *, seed: int | None = None) -> None:
        self.stddev = stddev
        super().__init__(seed)

    @property
    def stddev(self) -> float:
        """The standard deviation of the noise, >= 0."""
        return self._stddev

    @stddev.setter
    def stddev(self, value: float) -> None:
        sd = real_number(value, "stddev")
        if sd < 0:
            raise ValueError(f"stddev: must be >= 0, got {sd}")
        self._stddev = sd

    def __repr__(self) -> str:
        return f"GaussianNoise(stddev={self.stddev}, seed={self.seed})"

    def _parameter(self) -> float:
        return self.stddev

    def _draw(self, x: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:
        return gaussian_noise(x, value, seed=seed, offset=offset)

    def _gradient(self, dy: np.ndarray, value: float, seed: int, offset: int) -> np.ndarray:
        return dy

    def _counters(self, n: int) -> int:
        return normal_counters_used(n)


# --------------------------------------------------------------------------- DropBlock2d

class DropBlock2d(_Layer):
    """DropBlock (timm's ``DropBlock2d``) with a reproducible counter-based mask
    (docs/dropout.md, "DropBlock").

    In training mode :func:`pybn.drop_block` drops square blocks of each (N, C, H, W)
    feature map and rescales by ``mask elements / kept``; in evaluation mode, or with
    ``p == 0``, the layer is the identity. Each training call draws its seeds at
    ``(seed, offset)`` and then advances ``offset`` by the counters they used, as
    :class:`Dropout`.

    Parameters
    ----------
    p : float in [0, 1], default 0.1
        timm's ``drop_prob``.
    block_size : int >= 1, default 7
    seed : int in [0, 2**64), optional
        Key of the random stream; None draws one from the operating system's entropy.
    gamma_scale : float >= 0, default 1.0
    couple_channels, batchwise, scale_by_keep : bool
        As :func:`pybn.drop_block` (defaults True, False, True: timm's).
    rank, world_size : int, default 0 and 1
        Data parallelism, as :class:`DropPath` mode "row": rank r draws at
        ``offset + r * counters_used(m)`` (m seed elements) and every rank advances
        ``offset`` by ``world_size * counters_used(m)``. With ``batchwise=True`` the mask is
        one shared decision: every rank draws at ``offset``. The rescaling counts the local
        mask only (as timm on each process).

    Attributes
    ----------
    seed, offset : int
    training : bool
    """

    def __init__(self, p: float = 0.1, block_size: int = 7, *, seed: int | None = None, gamma_scale: float = 1.0,
                 couple_channels: bool = True, batchwise: bool = False, scale_by_keep: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        self.p = p
        self.block_size = integer(block_size, "block_size")
        if self.block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {self.block_size}")
        self.gamma_scale = real_number(gamma_scale, "gamma_scale", minimum=0.0)
        drop_block_noise_shape((1, 1, 1, 1), couple_channels=couple_channels, batchwise=batchwise)  # checks
        self.couple_channels, self.batchwise = bool(couple_channels), bool(batchwise)  # (checked above)
        self.scale_by_keep = flag(scale_by_keep, "scale_by_keep")
        self.seed = _seed_or_entropy(seed)
        self.rank, self.world_size = _rank_and_world_size(rank, world_size)
        self.offset = 0
        self.training = True
        # (keyword arguments of drop_block, x's shape, x's dtype) of the last forward; None
        # arguments for an identity forward
        self._saved: tuple[dict[str, Any] | None, tuple[int, ...], np.dtype] | None = None

    @property
    def p(self) -> float:
        """The drop probability, in [0, 1]."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        p = real_number(value, "p")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: the drop probability must be in [0, 1], got {p}")
        self._p = p

    def __repr__(self) -> str:
        return (f"DropBlock2d(p={self.p}, block_size={self.block_size}, seed={self.seed}, "
                f"gamma_scale={self.gamma_scale}, couple_channels={self.couple_channels}, "
                f"batchwise={self.batchwise}, scale_by_keep={self.scale_by_keep}, rank={self.rank}, "
                f"world_size={self.world_size})")

    def forward(self, x: Any) -> np.ndarray:
        """Drop blocks in training mode; return `x` itself in evaluation mode or for p == 0."""
        array = float_array(x, "x")
        if not self.training or self.p == 0.0:
            self._saved = (None, array.shape, array.dtype)
            return array
        noise = noise_shape_of(array.shape, self.couple_channels, self.batchwise, "x")
        used = counters_used(math.prod(noise))
        offset, stride = (self.offset, used) if self.batchwise else \
            ((self.offset + self.rank * used) % _U64, self.world_size * used)
        kwargs: dict[str, Any] = dict(p=self.p, block_size=self.block_size, seed=self.seed, offset=offset,
                      gamma_scale=self.gamma_scale, couple_channels=self.couple_channels,
                      batchwise=self.batchwise, scale_by_keep=self.scale_by_keep)
        y = drop_block(array, **kwargs)
        self._saved = (kwargs, array.shape, array.dtype)
        self.offset = (self.offset + stride) % _U64
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """Gradient of the most recent forward: dy through the same mask and scale."""
        kwargs, shape, dtype = self._saved_or_raise(self._saved)
        grad = _check_dy(dy, shape, dtype)
        if kwargs is None:
            return grad
        return drop_block(grad, **kwargs)


# --------------------------------------------------------------------------- MC-dropout

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
    seed = _u64(seed, "seed")
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
    from .torch.drop_path import StochasticDepth
    from .torch.dropblock import DropBlock2d as TorchDropBlock2d
    from .torch.nn import _DropoutForward
    from .torch.noise import _SeededNoise

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
