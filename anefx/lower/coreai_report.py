"""What a saved Core AI model (.aimodel) holds: its program read back from the asset (main.mlirb, MLIR bytecode,
loaded with coreai-core) and the same structural figures `anefx report` gives for a .mlpackage.

Op types are the program's own names without the `coreai.` dialect prefix (`conv2d`, `softmax`, `reshape`,
`decomposable.broadcasting_batch_matmul`…). A call of a composite graph (`coreai.invoke` of a graph declared as
a composite, e.g. the layer norms) counts under the composite's name (`layer_norm`).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anefx.errors import AnefxError

DIALECT = "coreai."
CONV = ("conv2d", "conv3d", "conv_transpose2d", "conv_transpose3d")
MATMUL = ("batch_matmul", "decomposable.broadcasting_batch_matmul")
LAYOUT = ("transpose", "reshape", "expand_dims", "shrink_dims")
WEIGHT_MOVES = (*LAYOUT, "cast", "broadcast_to", "broadcast_in_dims")  # a weight read through these is a weight
_COMPOSITE = re.compile(r'composite_declaration<"([^"]+)"')


class AimodelReadError(AnefxError):
    """A path given as a Core AI model cannot be read as one."""


@dataclass
class AimodelReport:
    path: Path
    inputs: dict[str, tuple[list[int], str]]
    outputs: dict[str, tuple[list[int], str]]
    ops: Counter = field(default_factory=Counter)  # the main graph's ops, composites by name
    softmax_shapes: Counter = field(default_factory=Counter)  # (shape, axis) → count
    weight_matmuls: int = 0  # matmuls reading a weight (a constant, maybe transposed): projections not as conv
    ranks: Counter = field(default_factory=Counter)  # rank → how many op results have it (every graph)
    largest_shape: list[int] = field(default_factory=list)  # the op result with the largest dimension
    function: str = "main"  # the entry point counted
    functions: list[str] = field(default_factory=list)  # every entry point of the model

    @property
    def conv(self) -> int:
        return sum(self.ops[t] for t in CONV)

    @property
    def matmul(self) -> int:
        return sum(self.ops[t] for t in MATMUL)

    @property
    def layout_ops(self) -> int:
        return sum(self.ops[t] for t in LAYOUT)

    @property
    def max_rank(self) -> int:
        return max(self.ranks, default=0)

    @property
    def largest_dim(self) -> int:
        return max(self.largest_shape, default=0)

    def as_json(self) -> dict[str, Any]:
        """The keys of a .mlpackage's `anefx report --json` (kind, ops, op_count, ranks, largest_dim,
        layout_ops by op) and the structural figures both formats share (conv, linear, matmul, softmax…)."""
        return {"kind": "aimodel", "format": "aimodel", "path": str(self.path), "function": self.function,
                "functions": self.functions,
                "ops": dict(sorted(self.ops.items(), key=lambda kv: (-kv[1], kv[0]))),
                "op_count": sum(n for op, n in self.ops.items() if op not in ("constant", "output")),
                "inputs": {k: {"shape": s, "dtype": d} for k, (s, d) in self.inputs.items()},
                "outputs": {k: {"shape": s, "dtype": d} for k, (s, d) in self.outputs.items()},
                "ranks": {str(r): n for r, n in sorted(self.ranks.items())},
                "largest_dim": {"size": self.largest_dim, "shape": self.largest_shape},
                "layout_ops": {op: self.ops[op] for op in LAYOUT},
                "conv": self.conv, "linear": 0, "matmul": self.matmul, "weight_matmuls": self.weight_matmuls,
                "softmax": self.ops["softmax"],
                "softmax_shapes": [{"shape": list(s), "axis": a, "count": n}
                                   for (s, a), n in self.softmax_shapes.items()],
                "max_rank": self.max_rank}


def aimodel_json(path: str | Path) -> dict[str, Any]:
    """`anefx report X.aimodel --json`: one JSON-ready dict (see AimodelReport.as_json)."""
    return aimodel_report(path).as_json()


def is_aimodel(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix == ".aimodel" and path.is_dir()


def aimodel_report(path: str | Path, function: str | None = None) -> AimodelReport:
    """Read the saved asset at `path` and count what its program's entry point `function` does (anefx writes
    `main`; a compiled LLM `prefill` and `decode`). Default: `main`, else the last entry point."""
    path = Path(path)
    module = _load_module(path)  # kept alive while its operations are read
    graphs = _graphs(module)
    functions = entry_points(graphs)
    function = function or ("main" if "main" in functions else functions[-1] if functions else "main")
    if function not in graphs:
        raise AimodelReadError(f"{path} has no function {function!r} (it has {', '.join(entry_points(graphs))}). "
                               "Name one of those.")
    composites = {name: m.group(1) for name, op in graphs.items() if "composite_decl" in op.attributes
                  and (m := _COMPOSITE.search(str(op.attributes["composite_decl"])))}
    main = graphs[function]
    report = AimodelReport(path, *_signature(main), function=function, functions=functions)
    weights = set()  # values that are constants, or constants moved by layout ops and casts
    for op in _body(main):
        name = _op_type(op, composites)
        report.ops[name] += 1
        if name == "constant" or (name in WEIGHT_MOVES and _id(op.operands[0]) in weights):
            weights.update(_ids(op.results))
        elif name in MATMUL and any(_id(v) in weights for v in op.operands):
            report.weight_matmuls += 1
        elif name == "softmax":
            report.softmax_shapes[(tuple(_shape(op.results[0].type)), _softmax_axis(op))] += 1
    for name, graph in graphs.items():  # the entry point and the helpers it may call, not other entry points
        if name == function or name not in functions:
            _measure(report, graph)
    return report


def _load_module(path: Path) -> Any:
    if not is_aimodel(path):
        raise AimodelReadError(f"{path} is not a Core AI model folder (.aimodel). Give the folder "
                               "c.save('model.aimodel') or `anefx compile --target coreai` wrote.")
    from anefx.lower.coreai import require_coreai

    require_coreai()
    from coreai.authoring.asset import AIModelAsset

    _check_intact(path, AIModelAsset.is_valid(path))  # coreai-core ends the process on a damaged program

    try:
        return AIModelAsset.load(path).program._module._mlir_module  # noqa: SLF001 - the IR is what we read
    except Exception as exc:  # noqa: BLE001 - reported with what to do
        raise AimodelReadError(f"{path} could not be read as a Core AI model ({type(exc).__name__}: "
                               f"{str(exc)[:200]}). Save it again with anefx.") from exc


def _check_intact(path: Path, valid: bool) -> None:
    """The asset's program is there and its bytes are the ones its hash file names (sha256)."""
    program, digest = path / "main.mlirb", path / "main.hash"
    if not valid or not program.is_file() or not digest.is_file():
        raise AimodelReadError(f"{path} is not a complete Core AI model (no main.mlirb, main.hash or metadata). "
                               "Save it again with c.save(...) or `anefx compile --target coreai`.")
    if hashlib.sha256(program.read_bytes()).digest() != digest.read_bytes():
        raise AimodelReadError(f"{path}/main.mlirb does not match main.hash: the file is damaged or was changed. "
                               "Save it again with c.save(...) or `anefx compile --target coreai`.")


def entry_points(graphs: dict[str, Any]) -> list[str]:
    """The graphs that are no composite or private helper: the model's functions."""
    return [name for name, op in graphs.items()
            if "priv" not in op.attributes and "composite_decl" not in op.attributes]


def _graphs(module: Any) -> dict[str, Any]:
    return {str(op.attributes["sym_name"]).strip('"'): op for op in module.body.operations
            if op.operation.name == "coreai.graph"}


def _body(graph: Any) -> list[Any]:
    return [op for block in graph.regions[0].blocks for op in block.operations]


def _op_type(op: Any, composites: dict[str, str]) -> str:
    name = op.operation.name.removeprefix(DIALECT)
    if name == "invoke":
        callee = re.search(r"@([\w.$-]+)", str(op.attributes["callee"]))
        return composites.get(callee.group(1), "invoke") if callee else "invoke"
    return name


def _signature(graph: Any) -> tuple[dict, dict]:
    from coreai._compiler.ir import FunctionType

    kind = FunctionType(graph.attributes["function_type"].value)
    args, results = _names(graph, "arg_attrs", len(kind.inputs)), _names(graph, "res_attrs", len(kind.results))
    return ({n: _describe(t) for n, t in zip(args, kind.inputs, strict=True)},
            {n: _describe(t) for n, t in zip(results, kind.results, strict=True)})


def _names(graph: Any, attr: str, count: int) -> list[str]:
    found = re.findall(r'coreai\.name = "([^"]*)"', str(graph.attributes[attr])) if attr in graph.attributes else []
    return found if len(found) == count else [f"{attr[:3]}{i}" for i in range(count)]


def _describe(t: Any) -> tuple[list[int], str]:
    text = str(t)
    return _shape(t), text.rsplit("x", 1)[-1].rstrip(">") if "x" in text else text


def _shape(t: Any) -> list[int]:
    match = re.match(r"tensor<([0-9x]*?)x?([a-z]+[0-9]*)>", str(t))
    if not match or not match.group(1):
        return []
    return [int(d) for d in match.group(1).split("x") if d]


def _softmax_axis(op: Any) -> int:
    """The axis operand's value (a constant), or -1 when it is not a constant."""
    match = re.search(r"coreai\.constant dense<(-?\d+)>", str(op.operands[1].owner))
    return int(match.group(1)) if match else -1


def _measure(report: AimodelReport, graph: Any) -> None:
    """Ranks and the largest dimension of the values ops compute (weights left out, as in a .mlpackage's report)."""
    for op in _body(graph):
        if op.operation.name == DIALECT + "constant":
            continue
        for value in op.results:
            shape = _shape(value.type)
            report.ranks[len(shape)] += 1
            if max(shape, default=0) > report.largest_dim:
                report.largest_shape = shape


def _id(value: Any) -> int:
    return hash(value)


def _ids(values: Any) -> set[int]:
    return {_id(v) for v in values}


def aimodel_tables(report: AimodelReport) -> list[Any]:
    """Rich tables for `anefx report X.aimodel`: the structure, then the op histogram."""
    from rich.table import Table

    io = "; ".join(f"{n} {'x'.join(map(str, s))} {d}" for n, (s, d) in {**report.inputs, **report.outputs}.items())
    softmax = ", ".join(f"{n} × {'x'.join(map(str, s))} over axis {a}" for (s, a), n in report.softmax_shapes.items())
    structure = Table(title=f"{report.path.name} (Core AI model)", show_header=False)
    for name, value in (("inputs / outputs", io), ("conv", report.conv), ("linear", 0),
                        ("matmul (attention)", report.matmul), ("matmul reading a weight", report.weight_matmuls),
                        ("softmax", softmax or "0"), ("layout ops (transpose, reshape, …)", report.layout_ops),
                        ("max rank", report.max_rank), ("largest dim", report.largest_dim)):
        structure.add_row(name, str(value))
    histogram = Table(title=f"ops of {report.function} (composites by name)")
    histogram.add_column("op")
    histogram.add_column("count", justify="right")
    for op, n in report.ops.most_common():
        histogram.add_row(op, str(n))
    return [structure, histogram]
