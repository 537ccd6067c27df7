"""The manifest of a partitioned model (partition.json): its steps in order, and how a CPU step runs from it.

Every value that crosses a seam has a name (the node's name in the captured program). A package step lists the
values it takes and makes (the package's input and output names); a CPU step is one ATen op with its arguments,
where {"value": NAME} stands for a tensor (a value, or a weight stored in cpu_weights.safetensors), {"dtype": …}
for a torch dtype and {"torch": …} for another torch enum (a memory format, a layout, a device).
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from anefx.errors import AnefxError
from anefx.graph import module_path
from anefx.partition import op_name

MANIFEST = "partition.json"
CPU_WEIGHTS = "cpu_weights.safetensors"
FORMAT = "anefx-partition"
VERSION = 1


class PartitionError(AnefxError):
    """A partitioned model cannot be described, saved or loaded (the message says what to change)."""


def tensor_spec(name: str, value: Any) -> dict[str, Any]:
    """{"name", "shape", "dtype"} of a tensor, or of each element of a tuple result ("elements")."""
    if isinstance(value, list | tuple):
        return {"name": name, "elements": [tensor_spec(f"{name}[{i}]", v) for i, v in enumerate(value)]}
    if not isinstance(value, torch.Tensor):
        return {"name": name, "python": type(value).__name__}
    return {"name": name, "shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}


def encode_argument(arg: Any, where: str) -> Any:
    if isinstance(arg, fx.Node):
        return {"value": arg.name}
    if isinstance(arg, list | tuple):
        return [encode_argument(a, where) for a in arg]
    if arg is None or isinstance(arg, bool | int | float | str):
        return arg
    if isinstance(arg, torch.dtype):
        return {"dtype": str(arg).removeprefix("torch.")}
    if isinstance(arg, torch.memory_format | torch.layout):
        return {"torch": str(arg).removeprefix("torch.")}
    if isinstance(arg, torch.device):
        return {"device": str(arg)}
    raise PartitionError(f"{where} takes an argument of type {type(arg).__name__} that the manifest cannot "
                         "describe; keep that op in a package (drop it from cpu_ops) or report it to anefx.")


def decode_argument(arg: Any, values: dict[str, Any]) -> Any:
    if isinstance(arg, list):
        return [decode_argument(a, values) for a in arg]
    if not isinstance(arg, dict):
        return arg
    if "value" in arg:
        return values[arg["value"]]
    if "dtype" in arg:
        return getattr(torch, arg["dtype"])
    if "torch" in arg:
        return getattr(torch, arg["torch"])
    return torch.device(arg["device"])


def cpu_step(node: fx.Node, values: dict[str, Any], reason: str) -> dict[str, Any]:
    """The manifest entry of one node run in torch (values: every value of the program on the example)."""
    where = f"node {node.name} ({op_name(node)})"
    return {"kind": "cpu", "op": op_name(node), "module": module_path(node), "node": node.name,
            "args": encode_argument(list(node.args), where),
            "kwargs": {k: encode_argument(v, where) for k, v in node.kwargs.items()},
            "inputs": [tensor_spec(a.name, values[a.name]) for a in node.all_input_nodes],
            "outputs": [tensor_spec(node.name, values[node.name])], "reason": reason}


def resolve_op(name: str) -> Any:
    """The callable a CPU step's "op" names: 'aten.histc.default' -> torch.ops.aten.histc.default."""
    if name == "getitem":
        return operator.getitem
    target: Any = torch.ops
    try:
        for part in name.split("."):
            target = getattr(target, part)
    except (AttributeError, RuntimeError) as exc:
        raise PartitionError(f"the manifest names op {name!r}, which this torch does not have; load it with the "
                             "torch version it was compiled with.") from exc
    return target


def run_cpu_step(step: dict[str, Any], values: dict[str, Any]) -> None:
    """Run one CPU step on `values` (by name) and store its result under the step's node name."""
    op = resolve_op(step["op"])
    args = decode_argument(step["args"], values)
    kwargs = {k: decode_argument(v, values) for k, v in step["kwargs"].items()}
    with torch.no_grad():
        values[step["node"]] = op(*args, **kwargs)


@dataclass
class SavedPartition:
    """A partition.json read back: its steps, inputs and outputs as written."""

    folder: Path
    data: dict[str, Any]

    @classmethod
    def read(cls, folder: str | Path) -> SavedPartition:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise PartitionError(f"{folder} holds no {MANIFEST}: pass a folder written by "
                                 "the save() of anefx.compile(..., partition=True) or by anefx compile --partition.")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PartitionError(f"{path} cannot be read ({exc}); save the model again.") from exc
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise PartitionError(f"{path} is not a version-{VERSION} {FORMAT} manifest; save the model again with "
                                 "this anefx.")
        return cls(folder, data)

    def cpu_weights(self) -> dict[str, torch.Tensor]:
        if not self.data.get("cpu_weights"):
            return {}
        from safetensors.torch import load_file

        return load_file(str(self.folder / self.data["cpu_weights"]))


def manifest_text(data: dict[str, Any]) -> str:
    """JSON, indented, with each value that fits in a line of 100 characters (a tensor's spec, a list of
    names) on one line."""
    return _json(data, 0) + "\n"


def _json(value: Any, indent: int, column: int | None = None) -> str:
    """`value` at `indent` (nested lines) written from `column` (where its first character goes)."""
    flat = json.dumps(value)
    if not isinstance(value, dict | list) or not value or (indent and (column or indent) + len(flat) <= 100):
        return flat
    inner = " " * (indent + 2)
    if isinstance(value, list):
        items = [inner + _json(v, indent + 2) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    items = [f"{inner}{json.dumps(k)}: {_json(v, indent + 2, indent + 4 + len(json.dumps(k)))}"
             for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
