"""Compressed weights: the constexpr ops (iOS16–18) and the sub-byte integer types their indices use.

Sub-byte tensors (uint1/2/3/4/6, int4) are stored packed, low bits first: element i occupies bits
[i·n, (i+1)·n) of the byte stream, each byte filled from its least significant bit up (coremltools
`optimize._utils.pack_elements_into_bits`, MILBlob's sub-byte storage); the last byte is zero-padded.

Kernels follow the MIL op reference (coremltools `mil/ops/defs/iOS16/constexpr_ops.py`,
`iOS18/compression.py`): a constexpr op's value depends on constants alone, so the interpreter computes it
once when the program is loaded.
"""

from __future__ import annotations

import numpy as np

from anefx.mil.packed_bits import unpack_bits
from anefx.mil.registry import as_int, kernel

# -- iOS18 ------------------------------------------------------------------------------------------------

@kernel("constexpr_lut_to_dense")
def lut_to_dense(ctx, indices, lut, vector_axis=None, shape=None):
    if shape is not None:  # iOS16 form: a flat table, packed indices, the output shape
        return _lut_to_dense_ios16(lut, indices, shape)
    indices, lut = np.asarray(indices), np.asarray(lut)
    palette, vector_size = lut.shape[-2], lut.shape[-1]
    axis = None if vector_axis is None else as_int(vector_axis) % indices.ndim
    if vector_size > 1:  # vectors fill consecutive elements along vector_axis: work with it last
        indices, lut = np.swapaxes(indices, -1, axis), np.swapaxes(lut, -3, axis)
    blocks = _block_index(lut.shape[:-2], indices.shape)
    picked = lut.reshape(-1, palette, vector_size)[blocks, indices.astype(np.int64)]
    if vector_size == 1:
        return picked[..., 0]
    out = picked.reshape(*indices.shape[:-1], indices.shape[-1] * vector_size)
    return np.swapaxes(out, -1, axis)


def _block_index(blocks: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """For each element of a tensor of `shape` cut into `blocks` equal blocks per axis: its block's flat index."""
    index = np.zeros((1,) * len(shape), np.int64)
    for axis, (count, size) in enumerate(zip(blocks, shape, strict=True)):
        coordinate = np.arange(size) // (size // count)
        index = index * count + coordinate.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return np.broadcast_to(index, shape)


def _repeat_blocks(table: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A per-block tensor repeated along each axis to `shape` (each block's value over its elements)."""
    for axis, size in enumerate(shape):
        if table.shape[axis] != size:
            table = np.repeat(table, size // table.shape[axis], axis=axis)
    return table


@kernel("constexpr_blockwise_shift_scale")
def blockwise_shift_scale(ctx, data, scale, offset=None):
    data = np.asarray(data).astype(np.float32)
    scale = _repeat_blocks(np.asarray(scale, np.float32), data.shape)
    if offset is not None:
        data = data - _repeat_blocks(np.asarray(offset, np.float32), data.shape)
    return _declared(ctx, scale * data)


def _declared(ctx, value: np.ndarray) -> np.ndarray:
    """The value in the op's declared output type (an fp16 weight is fp16 in any precision), held as float32.
    fp16 × fp16 is exact in float32, so one rounding gives what coremltools computes in fp16."""
    ttype = ctx.op.outputs[0][1]
    if ttype is not None and ttype.dtype == np.float16:
        return value.astype(np.float16).astype(np.float32)
    return value


# -- iOS16 ------------------------------------------------------------------------------------------------

def _lut_to_dense_ios16(lut, indices, shape):
    shape = tuple(int(s) for s in np.asarray(shape).reshape(-1))
    lut = np.asarray(lut).reshape(-1)
    nbits = int(np.log2(lut.size))
    count = int(np.prod(shape, dtype=np.int64))
    return lut[unpack_bits(np.asarray(indices, np.uint8), nbits, count).astype(np.int64)].reshape(shape)


@kernel("constexpr_affine_dequantize")
def affine_dequantize(ctx, quantized_data, zero_point, scale, axis):
    data = np.asarray(quantized_data).astype(np.float32)
    axis = as_int(axis) % data.ndim
    view = [1] * data.ndim
    view[axis] = -1
    zero = np.asarray(zero_point, np.float32)
    scale = np.asarray(scale, np.float32)
    zero = zero.reshape(view) if zero.size > 1 else zero.reshape(())
    scale = scale.reshape(view) if scale.size > 1 else scale.reshape(())
    return _declared(ctx, (data - zero) * scale)


@kernel("constexpr_cast")
def constexpr_cast(ctx, source_val, output_dtype="fp32"):
    return np.asarray(source_val, np.float32)
