"""Read the program inside a saved .mlpackage: its operations, their output shapes, the op histogram.

This reads the package from disk (what a device would load), not the in-memory conversion.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anefx.errors import AnefxError


class PackageError(AnefxError):
    """The path is not a readable ML program package."""


@dataclass
class OpRecord:
    type: str
    outputs: list[tuple[str, tuple[int, ...]]]  # (name, shape) per output; -1 for a dynamic dim
    inputs: dict[str, list[str]] = field(default_factory=dict)  # argument → bound value names
    attributes: dict[str, Any] = field(default_factory=dict)


def load_spec(path: str | Path) -> Any:
    """The model protobuf of an .mlpackage (or .mlmodel) on disk."""
    path = Path(path)
    if not path.exists():
        raise PackageError(f"{path} does not exist; pass the path of a saved .mlpackage.")
    from anefx.lower import _quiet_coremltools

    _quiet_coremltools()
    from coremltools.models.utils import load_spec as ct_load_spec

    try:
        return ct_load_spec(str(path))
    except Exception as exc:  # noqa: BLE001
        raise PackageError(f"{path} is not a readable CoreML package ({exc}).") from exc


def program_ops(path: str | Path, function: str = "main") -> list[OpRecord]:
    """Every operation of the program's `function` (nested blocks included), in program order."""
    spec = load_spec(path)
    if spec.WhichOneof("Type") != "mlProgram":
        raise PackageError(f"{path} holds a {spec.WhichOneof('Type')}, not an ML program.")
    func = spec.mlProgram.functions[function]
    block = func.block_specializations[func.opset]
    records: list[OpRecord] = []
    _walk(block, records)
    return records


def _walk(block: Any, records: list[OpRecord]) -> None:
    for op in block.operations:
        outputs = [(o.name, _shape(o.type)) for o in op.outputs]
        inputs = {k: [b.name for b in arg.arguments if b.WhichOneof("binding") == "name"]
                  for k, arg in op.inputs.items()}
        records.append(OpRecord(op.type, outputs, inputs, dict(op.attributes)))
        for inner in op.blocks:
            _walk(inner, records)


def _shape(value_type: Any) -> tuple[int, ...]:
    if value_type.WhichOneof("type") != "tensorType":
        return ()
    dims = value_type.tensorType.dimensions
    return tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else -1 for d in dims)


def histogram(path: str | Path, include_const: bool = False) -> Counter:
    return Counter(r.type for r in program_ops(path) if include_const or r.type != "const")
