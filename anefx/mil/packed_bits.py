"""Sub-byte integer tensors (uint1/2/3/4/6, int4): how MIL stores them and how they are read back.

They are packed low bits first: element i occupies bits [i·n, (i+1)·n) of the byte stream, each byte filled
from its least significant bit up (coremltools `optimize._utils.pack_elements_into_bits`, MILBlob's
sub-byte storage); the last byte is zero-padded.
"""

from __future__ import annotations

import numpy as np

SUB_BYTE = {"UINT1": (1, False), "UINT2": (2, False), "UINT3": (3, False), "UINT4": (4, False),
            "UINT6": (6, False), "INT4": (4, True)}  # proto type → (bits, signed)


def unpack_bits(packed: np.ndarray, nbits: int, count: int, signed: bool = False) -> np.ndarray:
    """The first `count` `nbits`-bit integers of a byte stream packed low bits first (uint8, or int8 when signed)."""
    packed = np.asarray(packed).reshape(-1).view(np.uint8)
    if packed.size * 8 < count * nbits:
        raise ValueError(f"{packed.size} bytes hold fewer than {count} {nbits}-bit values")
    if 8 % nbits == 0:  # whole values per byte: shift and mask, no bit array
        shifts = np.arange(0, 8, nbits, dtype=np.uint8)
        values = ((packed[:, None] >> shifts) & ((1 << nbits) - 1)).reshape(-1)[:count].astype(np.uint16)
    else:
        bits = np.unpackbits(packed, bitorder="little")[:count * nbits].reshape(count, nbits)
        values = (bits.astype(np.uint16) << np.arange(nbits, dtype=np.uint16)).sum(axis=1)
    if signed:
        values = np.where(values >= 1 << (nbits - 1), values.astype(np.int16) - (1 << nbits), values)
        return values.astype(np.int8)
    return values.astype(np.uint8)


def packed_bytes(count: int, nbits: int) -> int:
    return -(-count * nbits // 8)
