"""Pooling kernels: max_pool, avg_pool, l2_pool (1-3 spatial dims), and local_response_norm.

Padding follows the MIL reference (coremltools `mil/ops/defs/iOS15/pool.py`): `valid`, `custom` (`pad`
holds before/after per spatial dim), `same` (an odd extra row goes after) and `same_lower` (before).
`ceil_mode` rounds the output size up as PyTorch does: the last window may run past the padded input;
the part past it holds nothing (max ignores it, avg does not count it). avg_pool divides by the window's
input and padding cells, or only its input cells with `exclude_padding_from_average`. Sums accumulate in
float32; the interpreter rounds the result once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from anefx.mil.ops_linear import conv_pads
from anefx.mil.registry import as_float, as_int, as_ints, kernel

F32 = np.float32


@dataclass(frozen=True)
class PoolAxis:
    """One spatial dim of a pooling: window size, stride, padding, output size, ceil-mode overhang."""
    size: int
    stride: int
    before: int
    after: int
    out: int
    overhang: int  # cells past the padded input that the last window covers (ceil_mode only)

    def taps(self, offset: int) -> slice:
        """Where window cell `offset` reads, for every output position, in the padded input."""
        return slice(offset, offset + (self.out - 1) * self.stride + 1, self.stride)


def pool_axes(spatial, kernel_sizes, strides, pad_type, pad, ceil_mode) -> list[PoolAxis]:
    """The geometry of each spatial dim, with MIL's output-size rule (`spatial_dimensions_out_shape`)."""
    kernel_sizes = as_ints(kernel_sizes)
    strides = as_ints(strides) if strides is not None else [1] * len(spatial)
    pads = conv_pads(pad_type, pad, tuple(spatial), tuple(kernel_sizes), strides, [1] * len(spatial))
    axes = []
    for n, k, s, (before, after) in zip(spatial, kernel_sizes, strides, pads, strict=True):
        total = before + after
        if not ceil_mode:
            out = (n + total - k) // s + 1
        else:
            out = (n + total - k + s - 1) // s + 1
            if (out - 1) * s >= n + total / 2 and total > 0:
                out -= 1
        overhang = max(0, (out - 1) * s + k - (n + total))
        axes.append(PoolAxis(k, s, before, after, out, overhang))
    return axes


def _padded(x: np.ndarray, axes: list[PoolAxis], pad_value: float, overhang_value: float) -> np.ndarray:
    lead = [(0, 0)] * (x.ndim - len(axes))
    out = np.pad(x, lead + [(a.before, a.after) for a in axes], constant_values=pad_value)
    if any(a.overhang for a in axes):
        out = np.pad(out, lead + [(0, a.overhang) for a in axes], constant_values=overhang_value)
    return out


def _window_reduce(x: np.ndarray, axes: list[PoolAxis], combine) -> np.ndarray:
    """combine(...) over the window cells: one strided slice of `x` per cell (x is already padded)."""
    lead = (slice(None),) * (x.ndim - len(axes))
    result = None
    for offsets in itertools.product(*(range(a.size) for a in axes)):
        taps = x[lead + tuple(a.taps(o) for a, o in zip(axes, offsets, strict=True))]
        result = taps.copy() if result is None else combine(result, taps)
    return result


def _cell_counts(spatial, axes: list[PoolAxis], count_padding: bool) -> np.ndarray:
    """How many input cells (and padding cells, if counted) each window covers."""
    inside = np.ones(spatial, F32)
    return _window_reduce(_padded(inside, axes, 1.0 if count_padding else 0.0, 0.0), axes, np.add)


def _check_windows(ctx, x: np.ndarray, axes: list[PoolAxis]) -> None:
    if (_cell_counts(x.shape[2:], axes, count_padding=False) == 0).any():
        raise ctx.error("a pooling window covers no input cell (padding or ceil_mode larger than the window); "
                        "MIL leaves its value undefined. Use less padding or ceil_mode=False.")


def _geometry(x, kernel_sizes, strides, pad_type, pad, ceil_mode) -> list[PoolAxis]:
    return pool_axes(x.shape[2:], kernel_sizes, strides, pad_type, pad, bool(ceil_mode))


@kernel("max_pool")
def max_pool(ctx, x, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False):
    axes = _geometry(x, kernel_sizes, strides, pad_type, pad, ceil_mode)
    _check_windows(ctx, x, axes)
    return _window_reduce(_padded(x, axes, -np.inf, -np.inf), axes, np.maximum)


@kernel("avg_pool")
def avg_pool(ctx, x, kernel_sizes, strides=None, pad_type="valid", pad=None, exclude_padding_from_average=False,
             ceil_mode=False):
    axes = _geometry(x, kernel_sizes, strides, pad_type, pad, ceil_mode)
    _check_windows(ctx, x, axes)
    total = _window_reduce(_padded(x, axes, 0.0, 0.0), axes, np.add)
    return total / _cell_counts(x.shape[2:], axes, count_padding=not bool(exclude_padding_from_average))


@kernel("l2_pool")
def l2_pool(ctx, x, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False):
    axes = _geometry(x, kernel_sizes, strides, pad_type, pad, ceil_mode)
    _check_windows(ctx, x, axes)
    return np.sqrt(_window_reduce(_padded(np.square(x), axes, 0.0, 0.0), axes, np.add))


@kernel("local_response_norm")
def local_response_norm(ctx, x, size, alpha=1e-4, beta=0.75, k=1.0):
    """x / (k + alpha/size · Σ x²)^beta over `size` neighbouring channels (size//2 before, (size-1)//2 after).

    The channel axis is axis -3, as CoreML runs the op (its rank-3 reference output normalises each
    element by itself alone, i.e. over a channel axis of size 1), which is axis 1 for rank-4 inputs.
    """
    size, axis = as_int(size), x.ndim - 3
    widths = [(0, 0)] * x.ndim
    widths[axis] = (size // 2, (size - 1) // 2)
    squares = np.pad(np.square(x), widths)
    window_sum = sum(np.take(squares, range(o, o + x.shape[axis]), axis=axis) for o in range(size))
    scale = F32(as_float(k)) + F32(as_float(alpha) / size) * window_sum
    return x / np.power(scale, F32(as_float(beta)))
