"""Gather and scatter kernels, with MIL's index rules.

Before iOS17 an index in [-D, D) counts from the end when negative; from iOS17 on a negative index is
out of bound. An out-of-bound index is undefined behaviour on device, so the interpreter refuses it
(MilRuntimeError) instead of inventing a value.
"""

from __future__ import annotations

import numpy as np

from anefx.mil.registry import as_int, kernel


def _checked(ctx, indices: np.ndarray, size: int) -> np.ndarray:
    indices = indices.astype(np.int64)
    low = -size if ctx.opset_version < 17 else 0
    bad = (indices < low) | (indices >= size)
    if bad.any():
        value = int(indices[bad].reshape(-1)[0])
        rule = ("indices must lie in [-D, D)" if low < 0 else
                "from iOS17 on, MIL gathers treat negative indices as out of bound (undefined on device)")
        raise ctx.error(f"index {value} is out of bound for a dimension of size {size}; {rule}. Make the "
                        "indices valid (e.g. select(i >= 0, i, i + D)) before the gather.")
    return np.where(indices < 0, indices + size, indices)


@kernel("gather")
def gather(ctx, x, indices, axis=0, batch_dims=0, validate_indices=False):
    axis, batch_dims = as_int(axis) % x.ndim, as_int(batch_dims)
    indices = _checked(ctx, np.asarray(indices), x.shape[axis])
    if batch_dims == 0:
        return np.take(x, indices, axis=axis)
    batch = x.shape[:batch_dims]
    flat_x = x.reshape((-1,) + x.shape[batch_dims:])
    flat_i = indices.reshape((-1,) + indices.shape[batch_dims:])
    parts = [np.take(flat_x[b], flat_i[b], axis=axis - batch_dims) for b in range(flat_x.shape[0])]
    return np.stack(parts).reshape(batch + parts[0].shape)


@kernel("gather_along_axis")
def gather_along_axis(ctx, x, indices, axis=0, validate_indices=False):
    axis = as_int(axis) % x.ndim
    return np.take_along_axis(x, _checked(ctx, np.asarray(indices), x.shape[axis]), axis=axis)


@kernel("gather_nd")
def gather_nd(ctx, x, indices, batch_dims=0, validate_indices=False):
    batch_dims = as_int(batch_dims)
    indices = np.asarray(indices)
    depth = indices.shape[-1]
    columns = [_checked(ctx, indices[..., k], x.shape[batch_dims + k]) for k in range(depth)]
    batch_shape = x.shape[:batch_dims]
    batch_index = [np.arange(n).reshape((-1,) + (1,) * (indices.ndim - 2 - i))
                   for i, n in enumerate(batch_shape)]  # line batch dims of x and indices up
    return x[tuple(batch_index + columns)]


_SCATTER_MODES = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
                  "max": np.maximum, "min": np.minimum}


def _scatter_into(ctx, data: np.ndarray, index: tuple, updates: np.ndarray, mode: str) -> np.ndarray:
    out = np.array(data, copy=True)
    if mode == "update":
        out[index] = updates  # with repeated indices the last update wins (undefined on device)
    elif mode in _SCATTER_MODES:
        _SCATTER_MODES[mode].at(out, index, updates)
    else:
        raise ctx.error(f"unknown mode {mode!r}; MIL scatters know update, {', '.join(_SCATTER_MODES)}.")
    return out


@kernel("scatter")
def scatter(ctx, data, indices, updates, axis=0, mode="add", validate_indices=False):
    axis = as_int(axis) % data.ndim
    indices = _checked(ctx, np.asarray(indices), data.shape[axis])
    index = (slice(None),) * axis + (indices,)
    return _scatter_into(ctx, data, index, updates, mode)


@kernel("scatter_along_axis")
def scatter_along_axis(ctx, data, indices, updates, axis=0, mode="add", validate_indices=False):
    axis = as_int(axis) % data.ndim
    indices = _checked(ctx, np.asarray(indices), data.shape[axis])
    grid = list(np.indices(indices.shape, sparse=True))
    grid[axis] = indices
    return _scatter_into(ctx, data, tuple(grid), updates, mode)


@kernel("scatter_nd")
def scatter_nd(ctx, data, indices, updates, mode="add", validate_indices=False):
    indices = np.asarray(indices)
    index = tuple(_checked(ctx, indices[..., k], data.shape[k]) for k in range(indices.shape[-1]))
    return _scatter_into(ctx, data, index, updates, mode)
