"""Normalisations, softmax and reductions: statistics accumulate in float32, rounded once at the output."""

from __future__ import annotations

import numpy as np

from anefx.mil.registry import as_float, as_int, as_ints, kernel

F32 = np.float32


def softmax_last(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


@kernel("softmax")
def softmax(ctx, x, axis=-1):
    return softmax_last(x, as_int(axis))


def _axes(axes, ndim: int) -> tuple[int, ...]:
    return tuple(sorted(a % ndim for a in as_ints(axes)))


def _normalise(x: np.ndarray, axes: tuple[int, ...], epsilon: float) -> np.ndarray:
    centred = x - np.mean(x, axis=axes, keepdims=True)
    variance = np.mean(np.square(centred), axis=axes, keepdims=True)
    return centred / np.sqrt(variance + F32(epsilon))


@kernel("layer_norm")
def layer_norm(ctx, x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    axes = tuple(range(x.ndim)) if axes is None else _axes(axes, x.ndim)
    shape = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))
    out = _normalise(x, axes, as_float(epsilon))
    if gamma is not None:
        out = out * gamma.reshape(shape)
    if beta is not None:
        out = out + beta.reshape(shape)
    return out


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


@kernel("instance_norm")
def instance_norm(ctx, x, gamma=None, beta=None, epsilon=1e-5):
    out = _normalise(x, tuple(range(2, x.ndim)), as_float(epsilon))
    if gamma is not None:
        out = out * _per_channel(gamma, x.ndim)
    return out if beta is None else out + _per_channel(beta, x.ndim)


@kernel("batch_norm")
def batch_norm(ctx, x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    out = (x - _per_channel(mean, x.ndim)) / np.sqrt(_per_channel(variance, x.ndim) + F32(as_float(epsilon)))
    if gamma is not None:
        out = out * _per_channel(gamma, x.ndim)
    return out if beta is None else out + _per_channel(beta, x.ndim)


@kernel("l2_norm")
def l2_norm(ctx, x, epsilon=1e-6):
    axes = tuple(range(max(x.ndim - 3, 0), x.ndim))
    return x / np.sqrt(np.sum(np.square(x), axis=axes, keepdims=True) + F32(as_float(epsilon)))


def _log_sum_exp(x, axis, keepdims):
    peak = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - peak), axis=axis, keepdims=True)) + peak
    return out if keepdims else np.squeeze(out, axis=axis)


_REDUCTIONS = {
    "reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(np.square(x), axis=axis, keepdims=keepdims)),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(np.square(x), axis=axis, keepdims=keepdims),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": _log_sum_exp,
}


def _reduction(fn):
    def run(ctx, x, axes=None, keep_dims=False):
        axis = tuple(range(x.ndim)) if axes is None else _axes(axes, x.ndim)
        return fn(x, axis=axis, keepdims=bool(keep_dims))

    return run


for _name, _fn in _REDUCTIONS.items():
    kernel(_name)(_reduction(_fn))


def _arg_reduction(fn):
    def run(ctx, x, axis=-1, keep_dims=False, output_dtype="int32"):  # the declared type is applied after
        out = fn(x, axis=as_int(axis))
        return np.expand_dims(out, as_int(axis)) if bool(keep_dims) else out

    return run


kernel("reduce_argmax")(_arg_reduction(np.argmax))
kernel("reduce_argmin")(_arg_reduction(np.argmin))
