"""Layout kernels: reshape, transpose, concat, split, slicing, padding, tiling, fill, range, cumsum."""

from __future__ import annotations

import numpy as np

from anefx.mil.registry import as_bools, as_int, as_ints, kernel


@kernel("reshape")
def reshape(ctx, x, shape):
    target = as_ints(shape)
    offset = len(target) - x.ndim  # a 0 copies the input dim it lines up with, counting from the right
    resolved = [(x.shape[i - offset] if 0 <= i - offset < x.ndim else 1) if d == 0 else d
                for i, d in enumerate(target)]
    return x.reshape(resolved)


@kernel("transpose")
def transpose(ctx, x, perm):
    return np.transpose(x, as_ints(perm))


@kernel("expand_dims")
def expand_dims(ctx, x, axes):
    return np.expand_dims(x, tuple(as_ints(axes)))


@kernel("squeeze")
def squeeze(ctx, x, axes=None):
    if axes is None:
        return np.squeeze(x)
    axes = tuple(a % x.ndim for a in as_ints(axes) if x.shape[a] == 1)  # PyTorch: skip non-single dims
    return np.squeeze(x, axes)


@kernel("reverse")
def reverse(ctx, x, axes=None):
    return np.flip(x, None if axes is None else tuple(as_ints(axes)))


@kernel("flatten2d")
def flatten2d(ctx, x, axis=1):
    axis = as_int(axis) % x.ndim if x.ndim else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@kernel("concat")
def concat(ctx, values, axis, interleave=False):
    axis = as_int(axis)
    if not bool(interleave):
        return np.concatenate(values, axis=axis)
    axis %= values[0].ndim
    stacked = np.stack(values, axis=axis + 1)  # interleave: out[i::n] = values[i]
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return stacked.reshape(shape)


@kernel("stack")
def stack(ctx, values, axis):
    return np.stack(values, axis=as_int(axis))


@kernel("split")
def split(ctx, x, axis, num_splits=None, split_sizes=None):
    axis = as_int(axis)
    if split_sizes is not None:
        bounds = np.cumsum(as_ints(split_sizes))[:-1]
        return tuple(np.split(x, bounds, axis=axis))
    return tuple(np.split(x, as_int(num_splits), axis=axis))


def _slice_index(rank, begin, end, stride, begin_mask, end_mask, squeeze_mask) -> tuple:
    begin, end = as_ints(begin), as_ints(end)
    stride = as_ints(stride) if stride is not None else [1] * rank
    begin_mask, end_mask = as_bools(begin_mask, rank), as_bools(end_mask, rank)
    squeeze_mask = as_bools(squeeze_mask, rank)
    index = []
    for i in range(rank):
        if squeeze_mask[i]:
            index.append(begin[i])  # pure index at begin[i]
            continue
        index.append(slice(None if begin_mask[i] else begin[i], None if end_mask[i] else end[i], stride[i]))
    return tuple(index)


@kernel("slice_by_index")
def slice_by_index(ctx, x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    return np.asarray(x[_slice_index(x.ndim, begin, end, stride, begin_mask, end_mask, squeeze_mask)])


@kernel("slice_update")
def slice_update(ctx, x, update, begin, end, stride=None, begin_mask=None, end_mask=None,
                 squeeze_mask=None):
    out = x.copy()
    out[_slice_index(x.ndim, begin, end, stride, begin_mask, end_mask, squeeze_mask)] = update
    return out


@kernel("slice_by_size")
def slice_by_size(ctx, x, begin, size):
    index = []
    for dim, b, s in zip(x.shape, as_ints(begin), as_ints(size), strict=True):
        b = b + dim if b < 0 else b
        index.append(slice(b, None) if s == -1 else slice(b, b + s))
    return x[tuple(index)]


@kernel("tile")
def tile(ctx, x, reps):
    return np.tile(x, as_ints(reps))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


@kernel("pad")
def pad(ctx, x, pad, mode="constant", constant_val=0.0):
    values = as_ints(pad)
    n = len(values) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(values[2 * i], values[2 * i + 1]) for i in range(n)]
    if mode not in _PAD_MODES:
        raise ctx.error(f"unknown pad mode {mode!r}; MIL knows {', '.join(_PAD_MODES)}.")
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=np.asarray(constant_val).item())
    return np.pad(x, widths, mode=_PAD_MODES[mode])


@kernel("fill")
def fill(ctx, shape, value=0.0):
    return np.full(as_ints(shape), np.asarray(value))


@kernel("fill_like")
def fill_like(ctx, ref_tensor, value=0.0):
    return np.full(ref_tensor.shape, np.asarray(value))


@kernel("shape")
def shape(ctx, x):
    return np.array(x.shape, dtype=np.int32)


@kernel("range_1d")
def range_1d(ctx, start, end, step):
    return np.arange(np.asarray(start).item(), np.asarray(end).item(), np.asarray(step).item())


@kernel("cumsum")
def cumsum(ctx, x, axis=0, exclusive=False, reverse=False):
    axis = as_int(axis)
    data = np.flip(x, axis) if bool(reverse) else x
    out = np.cumsum(data, axis=axis, dtype=data.dtype)
    if bool(exclusive):
        out = out - data
    return np.flip(out, axis) if bool(reverse) else out


@kernel("band_part")
def band_part(ctx, x, lower=-1, upper=-1):
    lower, upper = as_int(lower), as_int(upper)
    m = np.arange(x.shape[-2])[:, None]
    n = np.arange(x.shape[-1])[None, :]
    keep = ((lower < 0) | (m - n <= lower)) & ((upper < 0) | (n - m <= upper))
    return np.where(keep, x, np.zeros((), x.dtype))


@kernel("one_hot")
def one_hot(ctx, indices, one_hot_vector_size, axis=-1, on_value=1, off_value=0):
    size = as_int(one_hot_vector_size)
    hot = np.expand_dims(indices, -1) == np.arange(size)  # (*indices, size)
    out = np.where(hot, np.asarray(on_value), np.asarray(off_value))
    return np.moveaxis(out, -1, as_int(axis) % out.ndim)


def _order(x: np.ndarray, axis: int, ascending: bool) -> np.ndarray:
    return np.argsort(x if ascending else -x, axis=axis, kind="stable")  # ties: lower index first


@kernel("argsort")
def argsort(ctx, x, axis=-1, ascending=False):
    return _order(x, as_int(axis), bool(ascending))


@kernel("topk")
def topk(ctx, x, k=1, axis=-1, ascending=False, sort=True, return_indices=True, output_indices_dtype="int32"):
    axis, k = as_int(axis), as_int(k)
    order = _order(x, axis, bool(ascending))
    indices = order if k == -1 else np.take(order, np.arange(k), axis=axis)
    values = np.take_along_axis(x, indices, axis=axis)
    return (values, indices) if bool(return_indices) else values
