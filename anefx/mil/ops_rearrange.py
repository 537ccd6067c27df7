"""Kernels that move values between channels, space and batch: pixel_shuffle, pixel_unshuffle,
depth_to_space, space_to_depth, space_to_batch, batch_to_space, sliding_windows.

pixel_shuffle orders an output pixel's source channels as PyTorch does (channel-major, "CRD");
depth_to_space and space_to_depth as TensorFlow does (block-major, "DCR"), which is what the MIL reference's
own examples show: with C output channels, input channel (by·f + bx)·C + c lands at block offset (by, bx).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from anefx.mil.registry import as_int, as_ints, kernel


@kernel("pixel_shuffle")
def pixel_shuffle(ctx, x, upscale_factor):
    f = as_int(upscale_factor)
    n, c, h, w = x.shape
    blocks = x.reshape(n, c // (f * f), f, f, h, w)
    return blocks.transpose(0, 1, 4, 2, 5, 3).reshape(n, c // (f * f), h * f, w * f)


@kernel("pixel_unshuffle")
def pixel_unshuffle(ctx, x, downscale_factor):
    f = as_int(downscale_factor)
    n, c, h, w = x.shape
    blocks = x.reshape(n, c, h // f, f, w // f, f)
    return blocks.transpose(0, 1, 3, 5, 2, 4).reshape(n, c * f * f, h // f, w // f)


@kernel("depth_to_space")
def depth_to_space(ctx, x, block_size):
    f = as_int(block_size)
    n, c, h, w = x.shape
    blocks = x.reshape(n, f, f, c // (f * f), h, w)
    return blocks.transpose(0, 3, 4, 1, 5, 2).reshape(n, c // (f * f), h * f, w * f)


@kernel("space_to_depth")
def space_to_depth(ctx, x, block_size):
    f = as_int(block_size)
    n, c, h, w = x.shape
    blocks = x.reshape(n, c, h // f, f, w // f, f)
    return blocks.transpose(0, 3, 5, 1, 2, 4).reshape(n, c * f * f, h // f, w // f)


@kernel("space_to_batch")
def space_to_batch(ctx, x, block_shape, paddings):
    bh, bw = as_ints(block_shape)
    top, bottom, left, right = as_ints(paddings)
    padded = np.pad(x, [(0, 0), (0, 0), (top, bottom), (left, right)])
    n, c, h, w = padded.shape
    blocks = padded.reshape(n, c, h // bh, bh, w // bw, bw)
    return blocks.transpose(3, 5, 0, 1, 2, 4).reshape(bh * bw * n, c, h // bh, w // bw)


@kernel("batch_to_space")
def batch_to_space(ctx, x, block_shape, crops):
    bh, bw = as_ints(block_shape)
    top, bottom, left, right = as_ints(crops)
    b, c, h, w = x.shape
    n = b // (bh * bw)
    full = x.reshape(bh, bw, n, c, h, w).transpose(2, 3, 4, 0, 5, 1).reshape(n, c, h * bh, w * bw)
    return full[:, :, top:h * bh - bottom, left:w * bw - right]


@kernel("sliding_windows")
def sliding_windows(ctx, x, axis, size, stride=1):
    axis = as_int(axis) % x.ndim
    windows = sliding_window_view(x, as_int(size), axis=axis)  # window cells last
    index = [slice(None)] * windows.ndim
    index[axis] = slice(None, None, as_int(stride))
    return np.moveaxis(windows[tuple(index)], -1, axis + 1)
