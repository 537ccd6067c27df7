"""CoreML's own compute plan of a saved package (macOS 14.4 and later): the device CoreML prefers for
each op and the share of the estimated cost that runs on the Neural Engine.

Read through coremltools' public API (`coremltools.models.compute_plan.MLComputePlan`): the package is
compiled to an .mlmodelc, the plan loaded for the compute units asked for, and every operation of every
function asked for its device usage and estimated cost. CoreML computes the plan; anefx only sums it.
"""

from __future__ import annotations

import platform
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anefx.errors import AnefxError

MIN_MACOS = (14, 4)  # MLComputePlan's first release
DEVICES = {"MLNeuralEngineComputeDevice": "ANE", "MLGPUComputeDevice": "GPU", "MLCPUComputeDevice": "CPU"}


class ComputePlanError(AnefxError):
    """CoreML's compute plan is not available here (it needs macOS 14.4 or later)."""


@dataclass(frozen=True)
class PlannedOp:
    """One operation as CoreML plans it: its preferred device, the devices that could run it, its cost."""

    function: str
    op: str  # the MIL operator, e.g. "conv"
    output: str  # its first output's name
    device: str  # "ANE", "GPU", "CPU" or "unknown"
    supported: tuple[str, ...] = ()
    cost: float | None = None  # CoreML's estimated share of the model's work, 0..1


@dataclass
class ComputePlan:
    path: Path
    compute_units: str
    ops: list[PlannedOp] = field(default_factory=list)

    @property
    def by_device(self) -> Counter:
        return Counter(op.device for op in self.ops)

    @property
    def ane_cost_share(self) -> float | None:
        """The share of the estimated cost on the Neural Engine (None when CoreML estimated no cost)."""
        costed = [op for op in self.ops if op.cost is not None]
        total = sum(op.cost for op in costed)
        return sum(op.cost for op in costed if op.device == "ANE") / total if total > 0 else None

    def off_ane(self) -> list[PlannedOp]:
        """Ops CoreML does not place on the Neural Engine, the most costly first."""
        return sorted((op for op in self.ops if op.device != "ANE"), key=lambda op: -(op.cost or 0.0))


def can_plan() -> bool:
    if sys.platform != "darwin":
        return False
    version = tuple(int(p) for p in platform.mac_ver()[0].split(".")[:2] if p.isdigit())
    return version >= MIN_MACOS


def needs_macos_message() -> str:
    where = f"macOS {platform.mac_ver()[0]}" if sys.platform == "darwin" else platform.system()
    return (f"--compute-plan asks CoreML for its own plan, which needs macOS {MIN_MACOS[0]}.{MIN_MACOS[1]} or later; "
            f"this is {where}. Run `anefx report --compute-plan PKG` on a Mac; here `anefx report PKG` shows what "
            "anefx checks itself (ops the ANE does not run, dimension limits, constraints).")


def compute_plan(path: str | Path, compute_units: str = "ALL") -> ComputePlan:
    """CoreML's plan for the package at `path` (a ComputePlanError off macOS 14.4+)."""
    if not can_plan():
        raise ComputePlanError(needs_macos_message())
    import coremltools as ct
    from coremltools.models.compute_plan import MLComputePlan
    from coremltools.models.utils import compile_model

    with tempfile.TemporaryDirectory(prefix="anefx-plan-") as tmp:
        compiled = compile_model(str(path), str(Path(tmp) / "model.mlmodelc"))
        plan = MLComputePlan.load_from_path(compiled, compute_units=ct.ComputeUnit[compute_units])
        return ComputePlan(Path(path), compute_units, planned_ops(plan))


def planned_ops(plan: Any) -> list[PlannedOp]:
    """Every non-const operation of every function of an MLComputePlan, with its device and cost."""
    program = plan.model_structure.program
    if program is None:
        raise ComputePlanError("the package is not an ML program; --compute-plan reads ML programs (.mlpackage).")
    found = []
    for name, function in program.functions.items():
        for operation in _operations(function.block):
            if operation.operator_name == "const":
                continue
            usage = plan.get_compute_device_usage_for_mlprogram_operation(operation)
            cost = plan.get_estimated_cost_for_mlprogram_operation(operation)
            found.append(PlannedOp(
                name, operation.operator_name, operation.outputs[0].name if operation.outputs else "",
                device_name(usage.preferred_compute_device) if usage else "unknown",
                tuple(device_name(d) for d in usage.supported_compute_devices) if usage else (),
                cost.weight if cost is not None else None))
    return found


def _operations(block: Any):
    for operation in block.operations:
        yield operation
        for inner in operation.blocks:
            yield from _operations(inner)


def device_name(device: Any) -> str:
    return next((short for cls, short in DEVICES.items() if any(c.__name__ == cls for c in type(device).__mro__)),
                "unknown")


def plan_json(plan: ComputePlan) -> dict[str, Any]:
    return {"compute_units": plan.compute_units, "ops_by_device": dict(plan.by_device),
            "ane_cost_share": plan.ane_cost_share,
            "off_ane": [{"function": op.function, "op": op.op, "output": op.output, "device": op.device,
                         "supported": list(op.supported), "cost": op.cost} for op in plan.off_ane()]}


def plan_tables(plan: ComputePlan, worst: int = 15) -> list[Any]:
    """Rich renderables: ops per preferred device and op type, the ANE's share of the cost, ops off the ANE."""
    from rich.table import Table

    devices = sorted(plan.by_device)
    table = Table(title=f"{plan.path.name}: CoreML compute plan ({plan.compute_units})")
    table.add_column("op")
    for device in devices:
        table.add_column(device, justify="right")
    per_type = Counter((op.op, op.device) for op in plan.ops)
    for name in sorted({op.op for op in plan.ops}):
        table.add_row(name, *(str(per_type[(name, d)] or "") for d in devices))
    table.add_row("total", *(str(plan.by_device[d]) for d in devices), style="bold")
    share = plan.ane_cost_share
    summary = ("estimated cost on the Neural Engine: " + (f"{share:.1%}" if share is not None else "not estimated")
               + f" ({plan.by_device['ANE']} of {len(plan.ops)} ops prefer it)")
    off = Table(title=f"ops off the Neural Engine ({len(plan.off_ane())}, most costly first)")
    for column in ("function", "op", "output", "device", "could run on", "cost"):
        off.add_column(column)
    for op in plan.off_ane()[:worst]:
        off.add_row(op.function, op.op, op.output, op.device, ", ".join(op.supported) or "-",
                    f"{op.cost:.2%}" if op.cost is not None else "-")
    return [table, summary, off] if plan.off_ane() else [table, summary]
