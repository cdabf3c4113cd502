"""BatchNorm, the layer (docs/layers.md), and the checks of the state it loads."""
from __future__ import annotations

from typing import Any

import numpy as np

from .._checks import (DTYPE_NAMES, as_array, channel_layout, finfo, flag, float_array, float_dtype, integer,
                       is_float_dtype, param_dtype, real_number, updated_array)
from ..batchnorm import (BatchNormResidualGrads, batch_norm_backward, batch_norm_infer, batch_norm_train,
                         residual_input)
from ._layer import _check_dy, _Layer, check_state_keys

_I64 = 1 << 63  # num_batches_tracked is an int64 in PyTorch's state_dict


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
            # counted before the kernel, as torch does; a call that ends in an exception
            # without having updated the statistics is uncounted: an error of its arguments or
            # memory, or a KeyboardInterrupt in the checks before the kernel. One that arrived
            # during the kernel is raised as it returns, the statistics updated: it stays counted
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None  # (tracking running statistics)
            stats = (self.running_mean, self.running_var)
            before = (stats[0].copy(), stats[1].copy())  # (C values each)
            self.num_batches_tracked += 1
        try:
            y, mean, invstd = batch_norm_train(x, self.weight, self.bias, eps=self.eps, axis=self.axis, relu=relu,
                                               residual=residual, **kwargs)
        except BaseException:
            if update and all(np.array_equal(b, a, equal_nan=True) for b, a in zip(before, stats)):
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
        for key in ("running_mean", "running_var"):  # (as training refuses them; read below as arrays)
            updated_array(getattr(self, key), key)
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
        check_state_keys(state_dict, self._state_keys())
        arrays = {key: _state_array(state_dict[key], key, (self.num_features,), self.param_dtype)
                  for key in self._array_keys()}
        for key in arrays:  # (the layer's own arrays, which a user may have rebound)
            _destination(getattr(self, key), key, self.num_features)
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


def _destination(array: Any, key: str, channels: int) -> None:
    """Refuses a layer array that load_state_dict cannot copy `key`'s value into."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{key}: the layer's {key} is a {type(array).__name__}, not a numpy.ndarray that "
                        "load_state_dict can copy into; nothing was loaded")
    if not array.flags.writeable or array.shape != (channels,):
        why = "read-only" if not array.flags.writeable else f"of shape {array.shape}"
        raise ValueError(f"{key}: the layer's {key} is {why}, so load_state_dict cannot copy into it; nothing "
                         f"was loaded (rebind it to a writable array of shape ({channels},))")


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
        raise ValueError(f"{key}: a value overflows {dtype} (largest finite: {finfo(dtype).max:.4g})")
    if key in ("running_var", "moving_variance") and np.any(cast < 0):
        raise ValueError(f"{key}: a variance must be >= 0, got a negative entry")
    return cast


def _batch_count(value: Any) -> int:
    """num_batches_tracked of a state: an integer in [0, 2**63) (PyTorch keeps an int64)."""
    # (a Python int past int64 would make an array of objects: its range is the error)
    state = value if isinstance(value, int) and not isinstance(value, bool) else \
        _state_array(value, "num_batches_tracked", ()).item()
    count = integer(state, "num_batches_tracked")
    if not 0 <= count < _I64:
        raise ValueError(f"num_batches_tracked: must be in [0, 2**63) (batches counted so far), got {count}")
    return count
