"""ANE readiness of a saved .mlpackage: op histogram, tensor ranks, the largest dimension against the
ANE's 16384 limit, bytes lost to last-axis 64-byte padding, ops the ANE is known not to run, and each
program checked against the per-program limits anefx knows (`constraints`). `report_json` gives all of it
as one JSON-ready dict (a package, or every chunk of a compiled LLM folder).

Read from the package on disk (what a device loads). The table of ops the ANE cannot run is documented
with its sources in docs/cli.md: the ANE compiler is private, so it is public knowledge, not a promise.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anefx.mlpackage import PackageError, load_spec

ANE_MAX_DIM = 16384  # every tensor dimension ≤ 16384 on the ANE (Apple, Deploying Transformers on the ANE)
ANE_MAX_RANK = 4  # no rank-5 tensors on the ANE
ANE_ROW_BYTES = 64  # the ANE pads the last axis of a tensor to 64 bytes
MAX_PROGRAM_OPS = 10_000  # devices fail to compile programs past ~18k MIL ops; anefx chunks LLMs at 10k
MAX_WEIGHT_BYTES = 1_000_000_000  # iOS refuses model files past ~1 GB
STATE_ALIGN = 32  # CoreML states whose last dimension is not a multiple of 32 fail on the Neural Engine
LAYOUT_OPS = ("transpose", "reshape")  # what anefx counts as layout ops in a saved program (anefx.mil.summary)
ELEMENT_BYTES = {"FLOAT16": 2, "BFLOAT16": 2, "FLOAT32": 4, "FLOAT64": 8, "INT8": 1, "UINT8": 1,
                 "INT16": 2, "UINT16": 2, "INT32": 4, "UINT32": 4, "INT64": 8, "UINT64": 8, "BOOL": 1}

# MIL op → why the ANE does not run it (sources and rationale in docs/cli.md, "ANE op table")
ANE_UNSUPPORTED = {
    "lstm": "recurrent layer: runs on CPU/GPU",
    "gru": "recurrent layer: runs on CPU/GPU",
    "rnn": "recurrent layer: runs on CPU/GPU",
    "gather": "gather is not an ANE layer (embedding lookups run on the CPU)",
    "gather_nd": "gather is not an ANE layer",
    "gather_along_axis": "gather is not an ANE layer",
    "scatter": "data-dependent writes: not an ANE layer",
    "scatter_nd": "data-dependent writes: not an ANE layer",
    "scatter_along_axis": "data-dependent writes: not an ANE layer",
    "while_loop": "control flow: the ANE runs a static dataflow graph",
    "cond": "control flow: the ANE runs a static dataflow graph",
    "random_normal": "random numbers are generated on the CPU",
    "random_uniform": "random numbers are generated on the CPU",
    "random_bernoulli": "random numbers are generated on the CPU",
    "random_categorical": "random numbers are generated on the CPU",
}


@dataclass(frozen=True)
class Tensor:
    """One value of the program: a function input or a non-const op's output."""

    name: str
    op: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def element_bytes(self) -> int:
        return ELEMENT_BYTES.get(self.dtype, 4)

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * self.element_bytes if self.shape else self.element_bytes

    @property
    def padded_bytes(self) -> int:
        """Bytes it occupies with its last axis padded to 64 bytes: ceil(e·n/64)·64 per row."""
        if not self.shape:
            return ANE_ROW_BYTES
        row = math.ceil(self.shape[-1] * self.element_bytes / ANE_ROW_BYTES) * ANE_ROW_BYTES
        return math.prod(self.shape[:-1]) * row

    @property
    def wasted_bytes(self) -> int:
        return self.padded_bytes - self.bytes


@dataclass
class WeightFile:
    """One weight file of the package and the blobs the program reads from it."""

    blob: Any  # anefx.mil.blob.BlobFile
    blobs: int = 0

    @property
    def path(self) -> Path:
        return self.blob.path

    @property
    def size(self) -> int:
        return int(self.blob.data.size)

    def check(self, offset: int, expected: int | None) -> None:
        from anefx.mil.errors import MilProgramError

        _, size = self.blob.entry(offset)
        if expected is not None and size != expected:
            raise MilProgramError(f"weight file {self.path}: the blob at offset {offset} holds {size} bytes, "
                                  f"the program expects {expected}; the file does not belong to this program, "
                                  "save the .mlpackage again.")
        self.blobs += 1


@dataclass
class PackageReport:
    path: Path
    histogram: Counter  # non-const op type → count
    tensors: list[Tensor]
    unsupported: dict[str, tuple[int, str]] = field(default_factory=dict)  # op → (count, reason)
    weight_files: list[WeightFile] = field(default_factory=list)  # each checked: present, every blob in it
    function: str = "main"  # the function reported
    functions: list[str] = field(default_factory=list)  # every function of the program
    states: list[Tensor] = field(default_factory=list)  # the function's state inputs (op "state")

    @property
    def weight_bytes(self) -> int:
        return sum(w.size for w in self.weight_files)

    @property
    def ranks(self) -> Counter:
        return Counter(len(t.shape) for t in self.tensors)

    @property
    def largest(self) -> Tensor | None:
        shaped = [t for t in self.tensors if t.shape]
        return max(shaped, key=lambda t: max(t.shape)) if shaped else None

    @property
    def over_limit(self) -> list[Tensor]:
        return [t for t in self.tensors if any(d > ANE_MAX_DIM for d in t.shape)]

    @property
    def dynamic(self) -> list[Tensor]:
        return [t for t in self.tensors if any(d < 0 for d in t.shape)]

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.tensors if not any(d < 0 for d in t.shape))

    @property
    def wasted_bytes(self) -> int:
        return sum(t.wasted_bytes for t in self.tensors if not any(d < 0 for d in t.shape))

    def worst_padding(self, n: int = 5) -> list[Tensor]:
        return sorted(self.tensors, key=lambda t: -t.wasted_bytes)[:n]


def package_report(path: str | Path, function: str | None = None) -> PackageReport:
    """The report of one function of the package: `function`, else the package's default function."""
    from anefx.lower import _quiet_coremltools

    _quiet_coremltools()  # coremltools' import-time messages are explained by `anefx doctor`
    path = Path(path)
    spec = load_spec(path)
    if spec.WhichOneof("Type") != "mlProgram":
        raise PackageError(f"{path} holds a {spec.WhichOneof('Type')}, not an ML program; "
                           "anefx report reads ML programs (.mlpackage).")
    functions = list(spec.mlProgram.functions)
    function = function or spec.description.defaultFunctionName or ("main" if "main" in functions else functions[0])
    if function not in functions:
        raise PackageError(f"{path} has no function {function!r}; its functions: {', '.join(functions)}.")
    func = spec.mlProgram.functions[function]
    tensors = [Tensor(i.name, "input", *_type(i.type)) for i in func.inputs]
    states = [Tensor(i.name, "state", *_type(i.type.stateType.wrappedType)) for i in func.inputs
              if i.type.WhichOneof("type") == "stateType"]
    histogram: Counter = Counter()
    for op in _operations(func.block_specializations[func.opset]):
        if op.type == "const":
            continue
        histogram[op.type] += 1
        tensors += [Tensor(o.name, op.type, *_type(o.type)) for o in op.outputs]
    unsupported = {op: (histogram[op], why) for op, why in ANE_UNSUPPORTED.items() if histogram[op]}
    weights = check_weight_files(path, func.block_specializations[func.opset])
    return PackageReport(path, histogram, [t for t in tensors if t.dtype], unsupported, weights, function,
                         functions, states)


def check_weight_files(path: Path, block: Any) -> list[WeightFile]:
    """Every weight file the program reads, checked: present, and holding each blob the program's
    BlobFile values point at, of the size their type needs (read with anefx.mil.blob, as the interpreter
    does). A missing, short or foreign file is a PackageError naming it."""
    from anefx.mil.blob import BlobFile
    from anefx.mil.errors import MilProgramError

    files: dict[str, WeightFile] = {}
    try:
        for name, offset, expected in _blob_references(block):
            if name not in files:
                files[name] = WeightFile(BlobFile(path / "Data" / "com.apple.CoreML" / name.removeprefix(
                    "@model_path/")))
            files[name].check(offset, expected)
    except MilProgramError as exc:
        raise PackageError(str(exc)) from exc
    return list(files.values())


def _blob_references(block: Any):
    """(file name, offset, expected bytes or None) of every BlobFile value in the block's ops."""
    for op in _operations(block):
        values = [op.attributes["val"]] if "val" in op.attributes else []
        values += [b.value for arg in op.inputs.values() for b in arg.arguments if b.WhichOneof("binding") == "value"]
        for value in values:
            if value.WhichOneof("value") == "blobFileValue":
                yield value.blobFileValue.fileName, value.blobFileValue.offset, _value_bytes(value.type)


def _value_bytes(value_type: Any) -> int | None:
    shape, dtype = _type(value_type)
    return math.prod(shape) * ELEMENT_BYTES[dtype] if dtype in ELEMENT_BYTES else None


def _operations(block: Any):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _operations(inner)


def _type(value_type: Any) -> tuple[tuple[int, ...], str]:
    if value_type.WhichOneof("type") != "tensorType":
        return (), ""
    from coremltools.proto import MIL_pb2

    tensor = value_type.tensorType
    dims = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else -1
                 for d in tensor.dimensions)
    return dims, MIL_pb2.DataType.Name(tensor.dataType)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def report_tables(report: PackageReport) -> list[Any]:
    """Rich renderables: op histogram, ranks, limits and padding, ops the ANE cannot run, weights, constraints."""
    from rich.table import Table

    ops = Table(title=f"{report.path.name}: MIL ops (non-const)")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    ops.add_column("ANE", justify="left")
    for op, n in sorted(report.histogram.items(), key=lambda kv: (-kv[1], kv[0])):
        why = ANE_UNSUPPORTED.get(op)
        ops.add_row(op, str(n), f"[red]no[/]: {why}" if why else "[green]yes[/]")
    ops.add_row("total", str(sum(report.histogram.values())), "", style="bold")

    shapes = Table(title="tensors (function inputs and op outputs)")
    shapes.add_column("check")
    shapes.add_column("value")
    shapes.add_row("ranks", ", ".join(f"rank {r}: {n}" for r, n in sorted(report.ranks.items())))
    high = sum(n for r, n in report.ranks.items() if r > ANE_MAX_RANK)
    advice = " (the ANE works on rank ≤ 4: (B, C, 1, S))" if high else ""
    shapes.add_row(f"rank > {ANE_MAX_RANK}", f"{high}{advice}")
    largest = report.largest
    if largest is not None:
        ok = "[green]within[/]" if max(largest.shape) <= ANE_MAX_DIM else "[red]over[/]"
        shapes.add_row("largest dimension", f"{max(largest.shape)} ({largest.op} {largest.name} "
                       f"{largest.shape}) — {ok} the ANE's {ANE_MAX_DIM} limit")
    shapes.add_row(f"over {ANE_MAX_DIM}", str(len(report.over_limit)))
    shapes.add_row("dynamic shapes", str(len(report.dynamic)))
    share = report.wasted_bytes / max(report.total_bytes + report.wasted_bytes, 1)
    shapes.add_row("last-axis padding (64 B)", f"{human_bytes(report.wasted_bytes)} wasted of "
                   f"{human_bytes(report.total_bytes + report.wasted_bytes)} ({share:.0%})")
    for t in report.worst_padding(3):
        if t.wasted_bytes:
            shapes.add_row("  worst", f"{t.op} {t.name} {t.shape} {t.dtype.lower()}: "
                           f"{human_bytes(t.wasted_bytes)} wasted")
    files = ", ".join(f"{w.path.name} ({human_bytes(w.size)}, {w.blobs} blobs)" for w in report.weight_files)
    weights = f"weights: {files} — every blob the program reads is present" if files else "weights: none"
    return [ops, shapes, weights, constraints_table(constraints(report))]


@dataclass(frozen=True)
class Constraint:
    """A per-program limit the package breaks: the op (or program part), the check, and what to change."""

    op: str
    check: str
    detail: str


def constraints(report: PackageReport, *, max_ops: int = MAX_PROGRAM_OPS,
                max_weight_bytes: int = MAX_WEIGHT_BYTES) -> list[Constraint]:
    """Every per-program limit anefx knows that the reported function breaks (empty: none)."""
    found = []
    ops = sum(report.histogram.values())
    if ops > max_ops:
        found.append(Constraint("program", f"op count ≤ {max_ops}", f"{ops} MIL ops: devices fail to compile "
                                "programs this large; split the model (compile_llm chunks it: max_chunk_ops)"))
    if report.weight_bytes > max_weight_bytes:
        found.append(Constraint("weights", f"weights ≤ {max_weight_bytes / 1e9:g} GB",
                                f"{report.weight_bytes / 1e9:.3g} GB of weights: iOS refuses model files this "
                                "large; quantize or split the model (compile_llm: max_chunk_bytes)"))
    for state in report.states:
        if state.shape and state.shape[-1] % STATE_ALIGN:
            found.append(Constraint(f"state {state.name}", f"state last dimension a multiple of {STATE_ALIGN}",
                                    f"shape {list(state.shape)}: the Neural Engine fails on this state; pad its "
                                    f"last dimension to {-(-state.shape[-1] // STATE_ALIGN) * STATE_ALIGN}"))
    for tensor in report.over_limit:
        found.append(Constraint(f"{tensor.op} {tensor.name}", f"every dimension ≤ {ANE_MAX_DIM}",
                                f"shape {list(tensor.shape)}: the Neural Engine holds at most {ANE_MAX_DIM} per "
                                "dimension; split that axis (anefx splits wide projections and embeddings)"))
    return found


def constraints_table(found: list[Constraint]) -> Any:
    """A rich table of the constraints, or a one-line all-clear."""
    from rich.table import Table

    if not found:
        return (f"[green]constraints: none broken[/] (ops ≤ {MAX_PROGRAM_OPS}, weights ≤ "
                f"{MAX_WEIGHT_BYTES / 1e9:g} GB, states' last dimension a multiple of {STATE_ALIGN}, every "
                f"dimension ≤ {ANE_MAX_DIM})")
    table = Table(title=f"constraints broken: {len(found)}")
    for column in ("op", "check", "detail"):
        table.add_column(column)
    for c in found:
        table.add_row(c.op, f"[red]{c.check}[/]", c.detail)
    return table


def report_json(path: str | Path) -> dict[str, Any]:
    """Everything `anefx report` shows, as one JSON-ready dict: a .mlpackage (every function, the default one's
    figures at the top level), a compiled LLM folder (per chunk) or a partitioned model's folder (per package).
    Other formats extend this function."""
    from anefx.folder_report_json import folder_report_json

    path = Path(path)
    if path.is_dir() and (folder := folder_report_json(path)) is not None:
        return folder
    if path.suffix == ".aimodel":  # a Core AI model: its program read back from the asset (anefx.lower.coreai_report)
        from anefx.lower.coreai_report import aimodel_json

        return aimodel_json(path)
    default, programs = _programs(path)
    several = len(programs) > 1
    return {"kind": "mlpackage", "path": str(path), "function": default, "functions": list(programs),
            **programs[default], "constraints": _tagged(programs, lambda name: f"{name}: " if several else ""),
            "programs": programs if several else {}}


def _programs(path: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """(default function, {function: its figures}) of a package."""
    report = package_report(path)
    reports = [report] + [package_report(path, f) for f in report.functions if f != report.function]
    return report.function, {r.function: program_json(r) for r in reports}


def _tagged(programs: dict[str, dict[str, Any]], prefix: Callable[[str], str]) -> list[dict[str, str]]:
    """Every program's constraints, each op prefixed with where it is."""
    return [c | {"op": prefix(name) + c["op"]} for name, figures in programs.items() for c in figures["constraints"]]


def program_json(report: PackageReport) -> dict[str, Any]:
    """The figures of one function: ops, ranks, largest dimension, layout ops, padding, weights, states,
    ops the ANE does not run, constraints."""
    largest = report.largest
    return {
        "ops": dict(sorted(report.histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        "op_count": sum(report.histogram.values()),
        "ranks": {str(r): n for r, n in sorted(report.ranks.items())},
        "largest_dim": {"size": max(largest.shape), "op": largest.op, "name": largest.name,
                        "shape": list(largest.shape)} if largest else None,
        "over_limit": len(report.over_limit), "dynamic": len(report.dynamic),
        "layout_ops": {op: report.histogram[op] for op in LAYOUT_OPS},
        "padding": {"wasted_bytes": report.wasted_bytes, "total_bytes": report.total_bytes + report.wasted_bytes},
        "weights": {"bytes": report.weight_bytes,
                    "files": [{"file": w.path.name, "bytes": w.size, "blobs": w.blobs} for w in report.weight_files]},
        "states": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype.lower()} for s in report.states],
        "unsupported": {op: {"count": n, "reason": why} for op, (n, why) in report.unsupported.items()},
        "constraints": [asdict(c) for c in constraints(report)],
    }
