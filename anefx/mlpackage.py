"""Read the program inside a saved .mlpackage: its operations, their output shapes, the op histogram.

This reads the package from disk (what a device would load), not the in-memory conversion.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
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


# -- what anefx records in the package it saves (`user_defined_metadata`) ---------------------------------
VERSION_KEY = "anefx.version"
WEIGHTS_KEY = "anefx.weights_sha256"
INPUTS_KEY = "anefx.inputs"
OUTPUTS_KEY = "anefx.outputs"
PRECISION_KEY = "anefx.precision"


def weights_sha256(named_tensors: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of each tensor, in name order: the weights' fingerprint."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def module_weights_sha256(model: Any) -> str:
    """The fingerprint of an nn.Module's parameters and buffers (tied ones under each of their names)."""
    return weights_sha256([*model.named_parameters(remove_duplicate=False),
                           *model.named_buffers(remove_duplicate=False)])


def program_weights_sha256(exported: Any) -> str:
    """The same fingerprint from an ExportedProgram: the parameters and buffers it lifted from the model
    (torch.export keeps all of them, under the model's names), not constants it made itself."""
    signature = exported.graph_signature
    names = {*signature.inputs_to_parameters.values(), *signature.inputs_to_buffers.values()}
    tensors = {**exported.constants, **exported.state_dict}
    return weights_sha256([(name, tensors[name]) for name in names])


def anefx_metadata(exported: Any, input_names: list[str], output_names: list[str],
                   precision: str, weights: str | None = None) -> dict[str, str]:
    """What `CompiledModel.save` records in the package, next to coremltools' own entries. `weights`:
    the fingerprint taken when the program was compiled (computed from `exported` when not given)."""
    from anefx import __version__

    return {VERSION_KEY: __version__, WEIGHTS_KEY: weights or program_weights_sha256(exported),
            INPUTS_KEY: ",".join(input_names), OUTPUTS_KEY: ",".join(output_names), PRECISION_KEY: precision}


def spec_file(package: Path) -> Path:
    """The program file (model.mlmodel) of a package, as its Manifest.json names it."""
    try:
        manifest = json.loads((package / "Manifest.json").read_text())
        item = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
        return package / "Data" / item["path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PackageError(f"{package}/Manifest.json is missing or unreadable ({exc}); save the package "
                           "again.") from exc


def stamp_metadata(package: Path, metadata: dict[str, str]) -> None:
    """Add `metadata` to the user-defined metadata of the package written at `package`."""
    from coremltools.proto import Model_pb2

    path = spec_file(package)
    spec = Model_pb2.Model()
    spec.ParseFromString(path.read_bytes())
    spec.description.metadata.userDefined.update(metadata)
    path.write_bytes(spec.SerializeToString())


def package_metadata(path: str | Path) -> dict[str, str]:
    """The user-defined metadata of a saved package (anefx's entries start with 'anefx.')."""
    return dict(load_spec(path).description.metadata.userDefined)
