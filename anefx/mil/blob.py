"""The MIL blob storage file (`weights/weight.bin`), read with numpy alone.

Layout (coremltools `mlmodel/src/MILBlob/Blob/StorageFormat.hpp`, format version 2): a 64-byte
storage header (uint32 count, uint32 version, reserved), then per blob a 64-byte `blob_metadata`
(uint32 sentinel 0xDEADBEEF, uint32 data type, uint64 size in bytes, uint64 offset of the data in the
file, reserved) followed by the data, every entry 64-byte aligned. A program's const refers to the
offset of a blob's metadata; the element type and shape come from the const's declared type.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anefx.mil.errors import MilProgramError

SENTINEL = 0xDEADBEEF
_METADATA = np.dtype([("sentinel", "<u4"), ("dtype", "<u4"), ("size", "<u8"), ("offset", "<u8")])


class BlobFile:
    """One weight file, memory-mapped; `read(offset, dtype, shape)` returns one blob as a copy-on-write
    view of the mapped file (the functions of a package, and every run, share its pages; nothing is copied)."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise MilProgramError(f"weight file {path} is missing; the .mlpackage is incomplete, "
                                  "save it again.")
        if path.stat().st_size == 0:
            raise MilProgramError(f"weight file {path} is empty; the .mlpackage is incomplete, save it again.")
        self.path = path
        self.data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: never writes the file

    def entry(self, offset: int) -> tuple[int, int]:
        """(start, size in bytes) of the data of the blob whose metadata is at `offset`, checked to lie
        inside the file."""
        end = offset + _METADATA.itemsize
        if end > self.data.size:
            raise MilProgramError(f"weight file {self.path} has {self.data.size} bytes but the program reads a "
                                  f"blob at offset {offset}: the file is truncated, save the .mlpackage again.")
        meta = self.data[offset:end].view(_METADATA)[0]
        if int(meta["sentinel"]) != SENTINEL:
            raise MilProgramError(f"{self.path}: no blob at offset {offset} (bad sentinel); the weight file "
                                  "does not belong to this program, save the .mlpackage again.")
        size, start = int(meta["size"]), int(meta["offset"])
        if start + size > self.data.size:
            raise MilProgramError(f"weight file {self.path} has {self.data.size} bytes but the blob at offset "
                                  f"{offset} ends at byte {start + size}: the file is truncated, save the "
                                  ".mlpackage again.")
        return start, size

    def read(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        start, size = self.entry(offset)
        count = int(np.prod(shape, dtype=np.int64))
        if size != count * dtype.itemsize:
            raise MilProgramError(f"{self.path}: blob at offset {offset} holds {size} bytes, expected "
                                  f"{count * dtype.itemsize} for {dtype} {shape}.")
        return self.data[start:start + size].view(dtype).reshape(shape)  # mapped pages, copied only if written
