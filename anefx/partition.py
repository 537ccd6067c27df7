"""Partitioning: which nodes of a captured program stay in torch (on the CPU) and which regions become packages.

A node stays in torch when coremltools has no converter for its op (checked up front against coremltools' torch
op registry, where anefx's own converters are registered too), when the user names it in `cpu_ops`, or when it
unpacks the result of such a node. The other nodes are scheduled into as few convertible regions as the graph's
dependencies allow; a region too small to be worth a package (a few ops, no weights) joins the CPU side.

`cpu_ops` entries: an op name as torch prints it, "aten.histc" (every overload), "aten.histc.default" (one
overload), "mylib.my_op" (a custom op), or a module path as `model.named_modules()` spells it,
"encoder.layer.1.attention" (that module and everything inside it). An entry that matches nothing is an
`OptionError` naming what the model has. A tuple's `getitem` runs where the op that made the tuple runs.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch.fx as fx
from torch.export import ExportedProgram

from anefx.errors import OptionError
from anefx.graph import constant_inputs, module_path

SMALL_REGION_OPS = 4  # a region of at most this many ops that reads no weight runs on the CPU side


@dataclass
class Segment:
    """Consecutive nodes of one kind: a "package" (lowered to CoreML) or "cpu" (run in torch)."""

    kind: str
    nodes: list[fx.Node] = field(default_factory=list)


@dataclass
class PartitionPlan:
    segments: list[Segment]
    reasons: dict[str, str]  # node name -> why it runs on the CPU
    folded: list[str] = field(default_factory=list)  # one line per small region moved to the CPU side

    @property
    def packages(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == "package"]

    @property
    def cpu_nodes(self) -> list[fx.Node]:
        return [n for s in self.segments if s.kind == "cpu" for n in s.nodes]


def op_name(node: fx.Node) -> str:
    """'aten.histc.default' for an OpOverload, the function's name otherwise ('getitem')."""
    return str(node.target) if hasattr(node.target, "_schema") else getattr(node.target, "__name__", str(node.target))


def converter_missing(node: fx.Node) -> bool:
    """Whether coremltools has no converter for this node's op (its registry holds anefx's converters too)."""
    from anefx import ops  # noqa: F401 - registers anefx's converters
    from anefx.lower import _quiet_coremltools

    _quiet_coremltools()
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    try:
        kind = node.target.name()
    except AttributeError:
        kind = getattr(node.target, "__name__", str(node.target))
    return _TORCH_OPS_REGISTRY.get_func(kind) is None


def unconvertible_nodes(ep: ExportedProgram) -> list[fx.Node]:
    """The program's nodes coremltools cannot lower (no converter for their op), in graph order."""
    return [n for n in ep.graph_module.graph.nodes if n.op == "call_function" and converter_missing(n)]


def describe_node(node: fx.Node) -> str:
    return f"{op_name(node)} ({node.name}, from {module_path(node) or 'the top-level module'})"


def check_cpu_ops(cpu_ops: Sequence[str] | None) -> list[str]:
    if cpu_ops is None:
        return []
    if isinstance(cpu_ops, str) or not isinstance(cpu_ops, Sequence) or not all(isinstance(e, str) for e in cpu_ops):
        raise OptionError(f"cpu_ops must be a list of op names or module paths, e.g. ['aten.histc', "
                          f"'encoder.layer.1.attention'], got {cpu_ops!r}.")
    return list(cpu_ops)


def named_by(node: fx.Node, entry: str) -> bool:
    """Whether a cpu_ops entry names the node: its op (with or without the overload) or a module it is in."""
    if hasattr(node.target, "_schema") and entry in (op_name(node), op_name(node).rsplit(".", 1)[0]):
        return True
    path = module_path(node)
    return path == entry or path.startswith(entry + ".")


def cpu_reasons(ep: ExportedProgram, cpu_ops: Sequence[str], rules_rewrite: frozenset[str] = frozenset()
                ) -> dict[str, str]:
    """Node name -> why it stays in torch, for every node that must (before small regions are folded). Ops in
    `rules_rewrite` have no converter but anefx's rules rewrite them into ops that have one (e.g. rfft)."""
    nodes = [n for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    unused = [e for e in cpu_ops if not any(named_by(n, e) for n in nodes)]
    if unused:
        raise OptionError(_unused_entries_message(unused, nodes))
    reasons: dict[str, str] = {}
    for node in nodes:
        entry = next((e for e in cpu_ops if named_by(node, e)), None)
        if node.target is operator.getitem:  # runs where its tuple is made (a package returns no tuple)
            if node.args[0].name in reasons:
                reasons[node.name] = f"unpacks the result of {node.args[0].name}, which runs on the CPU"
        elif entry is not None:
            reasons[node.name] = f"named in cpu_ops ({entry!r})"
        elif op_name(node) not in rules_rewrite and converter_missing(node):
            reasons[node.name] = f"coremltools has no converter for {op_name(node)}"
    return reasons


def _unused_entries_message(unused: list[str], nodes: list[fx.Node]) -> str:
    ops = sorted({op_name(n).rsplit(".", 1)[0] for n in nodes if hasattr(n.target, "_schema")})
    paths = sorted({p for p in (module_path(n) for n in nodes) if p})
    return (f"cpu_ops entries {', '.join(map(repr, unused))} name no node of the model. Name an op as torch prints "
            f"it, e.g. 'aten.histc' (ops here: {', '.join(ops[:12])}{' …' if len(ops) > 12 else ''}), or a module by "
            f"its path (modules here: {', '.join(paths[:8])}{' …' if len(paths) > 8 else ''}).")


def plan_partition(ep: ExportedProgram, cpu_ops: Sequence[str] = (), extra_reasons: dict[str, str] | None = None,
                   rules_rewrite: frozenset[str] = frozenset()) -> PartitionPlan:
    """Segments in an order that respects every dependency, CPU nodes as decided, small regions folded."""
    reasons = {**cpu_reasons(ep, cpu_ops, rules_rewrite), **(extra_reasons or {})}
    folded: list[str] = []
    while True:
        segments = schedule(ep, set(reasons))
        small = [s for s in segments if s.kind == "package" and is_small(s, ep)] if reasons else []
        if not small:
            return PartitionPlan(segments, reasons, folded)
        for segment in small:
            names = ", ".join(n.name for n in segment.nodes)
            folded.append(f"{names}: {len(segment.nodes)} op(s) without weights are not worth a package")
            for node in segment.nodes:
                reasons[node.name] = "folded into the CPU side (a small region without weights)"


def schedule(ep: ExportedProgram, on_cpu: set[str]) -> list[Segment]:
    """A topological order of the compute nodes that keeps taking nodes of the current kind while any is
    ready: each maximal run of one kind is a segment, and there are as few seams as this greedy order finds."""
    nodes = [n for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    waiting = {n: sum(1 for a in n.all_input_nodes if a.op == "call_function") for n in nodes}
    ready = [n for n in nodes if waiting[n] == 0]
    segments: list[Segment] = []
    while ready:
        kind = segments[-1].kind if segments else _kind(ready[0], on_cpu)
        same = [n for n in ready if _kind(n, on_cpu) == kind]
        if not same:
            kind = _kind(ready[0], on_cpu)
            same = [n for n in ready if _kind(n, on_cpu) == kind]
        node = same[0]
        ready.remove(node)
        if not segments or segments[-1].kind != kind:
            segments.append(Segment(kind))
        segments[-1].nodes.append(node)
        for user in node.users:
            if user in waiting:
                waiting[user] -= 1
                if waiting[user] == 0:
                    ready.append(user)
    return segments


def _kind(node: fx.Node, on_cpu: set[str]) -> str:
    return "cpu" if node.name in on_cpu else "package"


def is_small(segment: Segment, ep: ExportedProgram) -> bool:
    weights = constant_inputs(ep)
    reads_weights = any(a.name in weights for n in segment.nodes for a in n.all_input_nodes)
    return len(segment.nodes) <= SMALL_REGION_OPS and not reads_weights


def region_inputs(segment: Segment, weights: set[str]) -> list[fx.Node]:
    """Values a segment reads from outside it (user inputs and results of earlier segments), in first-use order."""
    inside, found = set(segment.nodes), []
    for node in segment.nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg.name not in weights and arg not in found:
                found.append(arg)
    return found


def region_outputs(segment: Segment) -> list[fx.Node]:
    """Values of a segment read outside it (by later segments or as the program's outputs)."""
    inside = set(segment.nodes)
    return [n for n in segment.nodes if any(u not in inside for u in n.users)]


def unconvertible_message(ep: ExportedProgram, limit: int = 8) -> str:
    """'' or a message naming every node coremltools has no converter for, with what to change."""
    nodes = unconvertible_nodes(ep)
    if not nodes:
        return ""
    listed = [f"  {describe_node(n)}" for n in nodes[:limit]]
    if len(nodes) > limit:
        listed.append(f"  … and {len(nodes) - limit} more")
    return (f"coremltools cannot lower {len(nodes)} node(s) of the program (no converter for their op):\n"
            + "\n".join(listed) + "\nCompile with partition=True (`anefx compile --partition`) to run these in torch "
            "on the CPU and the rest as packages, or rewrite those operations in the model.")
