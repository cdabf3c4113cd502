"""pybn.torch._layout: which tensors count as channels-last, and the arrays and outputs made
for them, against the definitions by torch.movedim (what the helpers computed before they
took shortcuts through torch's memory formats and NumPy's transpose)."""
import itertools

import numpy as np
import pytest
import torch

from pybn.torch import _layout


def by_movedim(x):
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def tensors():
    """Every permutation of small shapes with sizes of 1 (whose strides torch ignores), plus
    sliced and expanded views."""
    for shape in [(2, 3, 4), (2, 3, 4, 5), (1, 3, 1, 2), (2, 1, 3, 1), (4, 3, 1, 1), (1, 1, 1, 1), (2, 3, 2, 2, 2),
                  (1, 3, 1, 2, 1), (2, 3, 0, 2)]:
        base = torch.arange(float(np.prod(shape))).reshape(shape)
        for order in itertools.permutations(range(len(shape))):
            # memory in `order`, logical shape `shape`
            inverse = [order.index(d) for d in range(len(shape))]
            t = base.permute(order).contiguous().permute(inverse)
            yield t
            if len(shape) == 4 and shape[-1] > 1:
                yield torch.cat([t, t], dim=-1)[..., ::2]
    yield torch.zeros(2, 3, 1, 1).expand(2, 3, 4, 4)
    yield torch.zeros(2, 1, 4, 4).expand(2, 3, 4, 4)


def test_channels_last_physical_is_the_movedim_definition():
    cases = list(tensors())
    assert sum(by_movedim(t) for t in cases) > 20  # (the shortcut's cases are there)
    for t in cases:
        assert _layout.channels_last_physical(t) == by_movedim(t), (tuple(t.shape), t.stride())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_arrays_hold_the_values_in_the_layout_asked_for(dtype):
    for t in tensors():
        t = t.to(dtype).requires_grad_()
        for last in (False, True) if t.dim() > 2 else (False,):
            a = _layout.array(t, last)
            want = (t.detach().movedim(1, -1) if last else t.detach()).contiguous().numpy()
            assert a.flags.c_contiguous and a.dtype == want.dtype
            np.testing.assert_array_equal(a, want)
            if t.numel() and ((last and by_movedim(t)) or (not last and t.is_contiguous())):
                assert a.ctypes.data == t.data_ptr()  # a view, not a copy


def test_empty_has_the_strides_of_the_movedim_definition():
    for t in tensors():
        for last in (False, True) if t.dim() > 2 else (False,):
            got = _layout.empty(t, last, torch.float64)
            want = t.new_empty(t.movedim(1, -1).shape).movedim(-1, 1) if last else t.new_empty(t.shape)
            assert got.shape == t.shape and got.dtype == torch.float64 and not got.requires_grad
            assert (by_movedim(got) or got.is_contiguous()) if last else got.is_contiguous()
            # strides equal wherever torch does not ignore them (sizes of 1, empty tensors)
            assert t.numel() == 0 or all(s == w for s, w, n in zip(got.stride(), want.stride(), t.shape) if n > 1)


def test_per_channel_views_contiguous_parameters():
    w = torch.randn(7, requires_grad=True)
    a = _layout.per_channel(w)
    assert a.ctypes.data == w.data_ptr()
    np.testing.assert_array_equal(_layout.per_channel(torch.arange(14.0)[::2]), np.arange(0.0, 14.0, 2.0))
    assert _layout.per_channel(None) is None


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("rank", [3, 4, 5])
def test_batch_norm_results_have_torchs_strides(rank, training):
    """An accelerated batch norm returns what torch's does: channels-last stays so only in the
    4-D and 5-D memory formats; a BatchNorm1d over a transposed (N, L, C) tensor returns a
    contiguous result, which code after it may view (found by outside use)."""
    import pybn.torch

    shape = {3: (8, 5, 4), 4: (2, 5, 3, 4), 5: (2, 3, 4, 2, 5)}[rank]
    cls = {3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[rank]
    base = torch.randn(shape, dtype=torch.float64)
    inputs = [base, base.movedim(1, -1).contiguous().movedim(-1, 1),
              base.transpose(1, -1).contiguous().transpose(1, -1), torch.cat([base, base], dim=-1)[..., ::2]]
    if rank > 3:  # slices of a channels-last tensor: torch keeps them channels-last
        last = base.movedim(1, -1).contiguous().movedim(-1, 1)
        inputs += [last[:, :, 1:], torch.cat([last, last], dim=-1)[..., ::2]]
    for x in inputs:
        stock = cls(shape[1], dtype=torch.float64).train(training)
        fast = pybn.torch.accelerate(cls(shape[1], dtype=torch.float64).train(training))
        want, got = stock(x), fast(x)
        assert got.stride() == want.stride(), (x.stride(), got.stride(), want.stride())
        torch.testing.assert_close(got, want)
        if want.is_contiguous():
            got.view(-1)
        dy = torch.linspace(-1, 2, x.numel(), dtype=torch.float64).reshape(x.shape)
        xr = x.detach().requires_grad_()
        fast(xr).backward(dy)
        xs = x.detach().requires_grad_()
        stock(xs).backward(dy)
        torch.testing.assert_close(xr.grad, xs.grad)


def strided_views(rank, count, seed):
    """Views of random layouts: dims permuted in memory, some sliced off their start or
    stepped, sizes of 1 among them (whose strides torch reads by its own rules)."""
    g = np.random.default_rng(seed)
    for _ in range(count):
        shape = [int(g.integers(1, 5)) for _ in range(rank)]
        shape[1] = 3
        pads = [int(g.integers(0, 2)) if d != 1 else 0 for d in range(rank)]
        order = g.permutation(rank)
        base = torch.randn([shape[d] + pads[d] for d in order], dtype=torch.float64)
        x = base.permute([int(np.where(order == d)[0][0]) for d in range(rank)])
        x = x[tuple(slice(p, None) for p in pads)]
        if g.random() < 0.25 and x.shape[-1] > 2:
            x = x[..., ::2]
        yield x


@pytest.mark.parametrize("rank", [3, 4, 5])
def test_batch_norm_layout_is_torchs_for_any_strides(rank):
    """Over random strided views, the accelerated batch norm's result has the strides of
    torch's (found by review: the layout empty_like keeps is not the one torch suggests)."""
    import pybn.torch

    cls = {3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[rank]
    compared = 0
    for x in strided_views(rank, 150, seed=rank):
        if x.numel() // x.shape[1] <= 1:
            continue
        for training in (True, False):
            stock = cls(3, dtype=torch.float64).train(training)
            fast = pybn.torch.accelerate(cls(3, dtype=torch.float64).train(training))
            want, got = stock(x), fast(x)
            assert got.stride() == want.stride(), (tuple(x.shape), x.stride(), got.stride(), want.stride())
            torch.testing.assert_close(got, want)
            compared += 1
    assert compared > 100
