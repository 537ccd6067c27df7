"""Read the ML program of a saved .mlpackage into plain records: typed inputs, ops, constants.

The program comes from `Data/com.apple.CoreML/model.mlmodel` (the MIL protobuf), the weights from the
package's own `weights/*.bin` blob files (see `anefx.mil.blob`). `const` ops are resolved here into
numpy arrays, so the interpreter only walks the computing ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anefx.mil.blob import BlobFile
from anefx.mil.errors import MilProgramError
from anefx.mil.packed_bits import SUB_BYTE, unpack_bits

# MIL proto DataType name → numpy dtype (sub-byte and fp8 types have no numpy equivalent)
DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "STRING": np.str_, "FLOAT16": np.float16, "FLOAT32": np.float32,
    "FLOAT64": np.float64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
}


@dataclass(frozen=True)
class TensorType:
    dtype: np.dtype
    shape: tuple[int, ...] | None  # -1 marks a dimension known only at run time; None an unknown rank

    @property
    def is_float(self) -> bool:
        return self.dtype.kind == "f"


@dataclass(frozen=True)
class Literal:
    """A value written inline in an op's argument (not bound by name)."""
    value: Any


@dataclass
class Operation:
    type: str
    name: str
    inputs: dict[str, list[str | Literal]]  # argument → bound names (or inline values), in order
    outputs: list[tuple[str, TensorType | None]]
    has_blocks: bool = False


@dataclass
class Program:
    opset: str  # e.g. "CoreML8" (iOS18)
    inputs: list[tuple[str, TensorType]]
    states: list[tuple[str, TensorType]]
    outputs: list[str]
    operations: list[Operation]
    constants: dict[str, Any] = field(default_factory=dict)

    @property
    def opset_version(self) -> int:
        """The MIL opset as an iOS version number: CoreML5 → 15, ..., CoreML8 → 18."""
        digits = "".join(c for c in self.opset if c.isdigit())
        return int(digits) + 10 if digits else 18


def read_program(path: str | Path, function: str = "main") -> Program:
    """The `function` of the ML program saved at `path` (an .mlpackage directory)."""
    from anefx.mlpackage import load_spec

    path = Path(path)
    spec = load_spec(path)
    if spec.WhichOneof("Type") != "mlProgram":
        raise MilProgramError(f"{path} holds a {spec.WhichOneof('Type')}, not an ML program; convert with "
                              "convert_to='mlprogram'.")
    functions = spec.mlProgram.functions
    if function == "main" and function not in functions and spec.description.defaultFunctionName in functions:
        function = spec.description.defaultFunctionName  # a multifunction package: its default, as CoreML loads
    if function not in functions:
        raise MilProgramError(f"{path} has no function {function!r}; it has {', '.join(functions)}.")
    func = functions[function]
    block = func.block_specializations[func.opset]
    loader = _ValueLoader(path / "Data" / "com.apple.CoreML")
    inputs, states = [], []
    for named in func.inputs:
        kind = named.type.WhichOneof("type")
        if kind == "stateType":
            states.append((named.name, tensor_type(named.type.stateType.wrappedType)))
        else:
            inputs.append((named.name, tensor_type(named.type)))
    program = Program(func.opset, inputs, states, list(block.outputs), [])
    for op in block.operations:
        _add_operation(program, op, loader)
    return program


def _add_operation(program: Program, op: Any, loader: _ValueLoader) -> None:
    outputs = [(o.name, tensor_type(o.type)) for o in op.outputs]
    name = outputs[0][0] if outputs else _attribute_name(op, loader)
    if op.type == "const":
        program.constants[name] = loader.load(op.attributes["val"], name)
        return
    inputs = {arg: [_binding(b, loader, name) for b in value.arguments] for arg, value in op.inputs.items()}
    program.operations.append(Operation(op.type, name, inputs, outputs, has_blocks=len(op.blocks) > 0))


def _attribute_name(op: Any, loader: _ValueLoader) -> str:
    if "name" in op.attributes:
        return str(loader.load(op.attributes["name"], op.type))
    return f"<{op.type} without outputs>"


def _binding(binding: Any, loader: _ValueLoader, op_name: str) -> str | Literal:
    if binding.WhichOneof("binding") == "name":
        return binding.name
    return Literal(loader.load(binding.value, op_name))


def tensor_type(value_type: Any) -> TensorType | None:
    """The dtype and shape of a tensor ValueType (None for lists, tuples and dictionaries)."""
    if value_type.WhichOneof("type") != "tensorType":
        return None
    tt = value_type.tensorType
    dtype_name = _dtype_name(tt.dataType)
    dtype = np.dtype(DTYPES.get(dtype_name, np.void))
    if tt.rank < 0:
        return TensorType(dtype, None)
    dims = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else -1 for d in tt.dimensions)
    return TensorType(dtype, dims)


def _dtype_name(code: int) -> str:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(code)


class _ValueLoader:
    """Turns proto Values (immediate or blob-file) into numpy arrays, str, or Python scalars."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.blobs: dict[str, BlobFile] = {}

    def load(self, value: Any, owner: str) -> Any:
        kind = value.type.WhichOneof("type")
        if kind == "dictionaryType":
            return None  # only program attributes (build info) use dictionaries
        if kind != "tensorType":
            raise MilProgramError(f"const {owner!r} has a {kind} value, which the interpreter cannot read.")
        tt = value.type.tensorType
        dtype_name = _dtype_name(tt.dataType)
        if dtype_name in SUB_BYTE:  # packed indices / quantized data of compressed weights
            return self._sub_byte(value, dtype_name, tuple(int(d.constant.size) for d in tt.dimensions))
        if dtype_name not in DTYPES:
            raise MilProgramError(f"const {owner!r} has type {dtype_name}, which the interpreter does not "
                                  "read (compressed weights); run it on an uncompressed program.")
        shape = tuple(int(d.constant.size) for d in tt.dimensions)
        dtype = np.dtype(DTYPES[dtype_name])
        if value.WhichOneof("value") == "blobFileValue":
            return self._blob(value.blobFileValue).read(value.blobFileValue.offset, dtype, shape)
        return _immediate(value.immediateValue.tensor, dtype, shape)

    def _sub_byte(self, value: Any, dtype_name: str, shape: tuple[int, ...]) -> np.ndarray:
        if value.WhichOneof("value") == "blobFileValue":
            blob = self._blob(value.blobFileValue)
            start, size = blob.entry(value.blobFileValue.offset)
            raw = np.asarray(blob.data[start:start + size])
        else:
            raw = np.frombuffer(value.immediateValue.tensor.bytes.values, np.uint8)
        nbits, signed = SUB_BYTE[dtype_name]
        return unpack_bits(raw, nbits, int(np.prod(shape, dtype=np.int64)), signed).reshape(shape)

    def _blob(self, file_value: Any) -> BlobFile:
        name = file_value.fileName
        if name not in self.blobs:
            relative = name.removeprefix("@model_path/")
            self.blobs[name] = BlobFile(self.model_dir / relative)
        return self.blobs[name]


def _immediate(tensor: Any, dtype: np.dtype, shape: tuple[int, ...]) -> Any:
    kind = tensor.WhichOneof("value")
    if kind == "strings":
        values = list(tensor.strings.values)
        return values[0] if shape == () else values
    if kind == "bytes":
        return np.frombuffer(tensor.bytes.values, dtype=dtype).reshape(shape).copy()
    values = getattr(tensor, kind).values if kind else []
    return np.array(list(values), dtype=dtype).reshape(shape)
