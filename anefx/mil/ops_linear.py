"""Kernels that multiply-accumulate: conv, matmul, linear, einsum, scaled_dot_product_attention.

All accumulate in float32; the interpreter rounds the result to the emulated precision. In fp16 the
fused attention also rounds its intermediates (scores, probabilities) to fp16, as its unfused MIL
decomposition (matmul, softmax, matmul) would hold them.
"""

from __future__ import annotations

import math
import string

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from anefx.mil.ops_norm import softmax_last
from anefx.mil.registry import as_int, as_ints, kernel

F32 = np.float32


def conv_pads(pad_type: str, pad, spatial: tuple[int, ...], kernel_size: tuple[int, ...],
              strides: list[int], dilations: list[int]) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim; `same` puts an odd extra row after, `same_lower` before."""
    n = len(spatial)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        values = as_ints(pad) if pad is not None else [0] * 2 * n
        return [(values[2 * i], values[2 * i + 1]) for i in range(n)]
    if pad_type not in ("same", "same_lower"):
        raise ValueError(f"unknown pad_type {pad_type!r}; MIL knows valid, same, same_lower, custom")
    pads = []
    for size, k, s, d in zip(spatial, kernel_size, strides, dilations, strict=True):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        pads.append((small, large) if pad_type == "same" else (large, small))
    return pads


@kernel("conv")
def conv(ctx, x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    n_spatial = x.ndim - 2
    strides = as_ints(strides) if strides is not None else [1] * n_spatial
    dilations = as_ints(dilations) if dilations is not None else [1] * n_spatial
    groups = as_int(groups)
    kernel_size = weight.shape[2:]
    pads = conv_pads(pad_type, pad, x.shape[2:], kernel_size, strides, dilations)
    if all(k == 1 for k in kernel_size) and set(strides) == {1} and groups == 1 and not any(map(any, pads)):
        out = np.matmul(weight.reshape(weight.shape[0], -1), x.reshape(x.shape[0], x.shape[1], -1))
        out = out.reshape((x.shape[0], weight.shape[0]) + x.shape[2:])  # 1x1 conv: one matmul
    else:
        out = _conv_general(x, weight, strides, dilations, groups, pads)
    if bias is not None:
        out = out + bias.reshape((1, -1) + (1,) * n_spatial)
    return out


def _conv_general(x, weight, strides, dilations, groups, pads):
    n_spatial = x.ndim - 2
    spatial_axes = tuple(range(2, x.ndim))
    x = np.pad(x, [(0, 0), (0, 0)] + list(pads))
    window = tuple((k - 1) * d + 1 for k, d in zip(weight.shape[2:], dilations, strict=True))
    patches = sliding_window_view(x, window, axis=spatial_axes)  # (N, C, *P, *W)
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dilations)
    patches = patches[index]  # (N, C, *P_out, *K)
    n, c = patches.shape[:2]
    out_spatial = patches.shape[2:2 + n_spatial]
    patches = patches.reshape((n, groups, c // groups) + patches.shape[2:])
    w = weight.reshape((groups, weight.shape[0] // groups) + weight.shape[1:])
    p_letters, k_letters = string.ascii_lowercase[:n_spatial], string.ascii_lowercase[10:10 + n_spatial]
    equation = f"NGC{p_letters}{k_letters},GOC{k_letters}->NGO{p_letters}"
    out = np.einsum(equation, patches, w, optimize=True)
    return out.reshape((n, weight.shape[0]) + out_spatial)


@kernel("matmul")
def matmul(ctx, x, y, transpose_x=False, transpose_y=False):
    if bool(transpose_x) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if bool(transpose_y) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@kernel("linear")
def linear(ctx, x, weight, bias=None):
    out = np.matmul(x, weight.T)
    return out if bias is None else out + bias


@kernel("einsum")
def einsum(ctx, values, equation):
    inputs, output = equation.replace(" ", "").split("->")
    operands = list(values)
    sizes: dict[str, int] = {}
    for labels, operand in zip(inputs.split(","), operands, strict=True):
        for label, size in zip(labels, operand.shape, strict=True):
            sizes[label] = max(sizes.get(label, 1), size)
    operands = [np.broadcast_to(op, tuple(sizes[c] for c in labels))  # size-1 batch dims broadcast
                for labels, op in zip(inputs.split(","), operands, strict=True)]
    return np.einsum(f"{inputs}->{output}", *operands, optimize=True)


@kernel("scaled_dot_product_attention")
def scaled_dot_product_attention(ctx, query, key, value, attn_mask=None):
    scale = F32(1.0 / math.sqrt(query.shape[-1]))
    scores = ctx.round(np.matmul(query, np.swapaxes(key, -1, -2)) * scale)  # (B, *, L, S)
    if attn_mask is not None and attn_mask.dtype == np.bool_:
        scores = np.where(attn_mask, scores, F32(-np.inf))
    elif attn_mask is not None:
        scores = ctx.round(scores + attn_mask)
    weights = ctx.round(softmax_last(scores))
    return np.matmul(weights, value)  # (B, *, L, EV)
