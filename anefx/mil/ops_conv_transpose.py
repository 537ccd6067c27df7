"""conv_transpose (1-3 spatial dims): every input cell scatters its weighted kernel into the output.

The full output of a spatial dim of n inputs is (n-1)·stride + (k-1)·dilation + 1 cells. The MIL reference
(coremltools `mil/ops/defs/iOS15/conv.py`) then removes `pad` (before, after) with pad_type `custom`,
nothing with `valid`, and keeps n·stride cells with `same` (TensorFlow's rule: the conv this transposes
pads its input by the same total, the smaller half before). An `output_shape` fixes the output size: the
full output is cut after `pad` before, or padded with zeros after. Accumulates in float32.
"""

from __future__ import annotations

import itertools

import numpy as np

from anefx.mil.registry import as_int, as_ints, kernel


def _full_output(x, weight, strides, dilations, groups) -> np.ndarray:
    n, c_in = x.shape[:2]
    spatial, kernel_size = x.shape[2:], weight.shape[2:]
    c_out_group = weight.shape[1]
    full = [(d - 1) * s + (k - 1) * dl + 1 for d, k, s, dl in zip(spatial, kernel_size, strides, dilations,
                                                                   strict=True)]
    out = np.zeros((n, groups, c_out_group, *full), np.float32)
    xg = x.reshape(n, groups, c_in // groups, *spatial)
    wg = weight.reshape(groups, c_in // groups, c_out_group, *kernel_size)
    for offsets in itertools.product(*(range(k) for k in kernel_size)):
        contribution = np.einsum("ngc...,gco->ngo...", xg, wg[(slice(None),) * 3 + offsets], optimize=True)
        target = tuple(slice(o * dl, o * dl + (d - 1) * s + 1, s)
                       for o, d, s, dl in zip(offsets, spatial, strides, dilations, strict=True))
        out[(slice(None),) * 3 + target] += contribution
    return out.reshape(n, groups * c_out_group, *full)


def _crop(full: np.ndarray, spatial, strides, pad_type: str, pad, output_shape) -> np.ndarray:
    n_spatial = full.ndim - 2
    pads = as_ints(pad) if pad is not None else [0] * 2 * n_spatial
    targets = as_ints(output_shape)[2:] if output_shape is not None else None
    index, widths = [slice(None), slice(None)], [(0, 0), (0, 0)]
    for i in range(n_spatial):
        size = full.shape[2 + i]
        if pad_type == "same":
            keep = targets[i] if targets else spatial[i] * strides[i]
            before = max(0, size - keep) // 2
        else:
            before = pads[2 * i] if pad_type == "custom" else 0
            after = pads[2 * i + 1] if pad_type == "custom" else 0
            keep = targets[i] if targets else size - before - after
        index.append(slice(before, before + keep))
        widths.append((0, max(0, before + keep - size)))
    return np.pad(full, widths)[tuple(index)]


@kernel("conv_transpose")
def conv_transpose(ctx, x, weight, bias=None, pad=None, output_shape=None, pad_type="valid", strides=None,
                   dilations=None, groups=1):
    n_spatial = x.ndim - 2
    strides = as_ints(strides) if strides is not None else [1] * n_spatial
    dilations = as_ints(dilations) if dilations is not None else [1] * n_spatial
    if pad_type not in ("valid", "same", "custom"):
        raise ctx.error(f"unknown pad_type {pad_type!r}; MIL's conv_transpose knows valid, same, custom.")
    full = _full_output(x, weight, strides, dilations, as_int(groups))
    out = _crop(full, x.shape[2:], strides, pad_type, pad, output_shape)
    if bias is not None:
        out = out + bias.reshape((1, -1) + (1,) * n_spatial)
    return out
