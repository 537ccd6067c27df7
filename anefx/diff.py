"""What each stage of the pipeline changed in the graph, grouped by the module the nodes came from.

Nodes before and after a stage are matched by provenance: a node whose name, op and `anefx_rule` tag
survive the stage is the same node (changed when its inputs were rewired or its shape differs); the rest
were removed or added. New nodes are tied to the nodes they replace through `meta["from_node"]`. The
changed nodes form a graph (edges of the program before and after, plus provenance links) whose
connected components are the changed regions; a region belongs to the module most of its nodes came
from (`nn_module_stack`).

    c = anefx.compile(model, example)
    d = c.diff()                # every stage: legalize, then each rule
    d.show()                    # rich tables in the terminal
    d.to_html("diff.html")      # one standalone page: per module, before and after side by side
    anefx.diff(ep_a, ep_b)      # any two ExportedPrograms
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
import torch.fx as fx
from torch.export import ExportedProgram

from anefx.graph import module_path, op_histogram, op_name

if TYPE_CHECKING:
    from rich.console import Console

    from anefx.pipeline import PassRecord

TOP_LEVEL = "(top level)"
INPUT_OPS = ("input", "param", "buffer", "const", "object", "token")  # placeholders, by kind
_KIND_LABELS = {"PARAMETER": "param", "BUFFER": "buffer", "CONSTANT_TENSOR": "const",
                "USER_INPUT": "input", "CUSTOM_OBJ": "object", "TOKEN": "token"}


@dataclass(frozen=True)
class NodeInfo:
    """One graph node as the diff shows it."""

    name: str
    op: str  # ATen op name, or input / param / buffer / const / output
    shape: str  # "(1, 32, 64) f32", "" when the node has no tensor value
    module: str  # dotted module path, TOP_LEVEL when none
    inputs: tuple[str, ...]  # names of the nodes it reads, in argument order
    literals: str  # the non-node arguments, to tell a rewired node from an untouched one
    rule: str | None = None  # the stage that created it (meta["anefx_rule"])
    origins: tuple[str, ...] = ()  # names of the nodes it replaced (meta["from_node"])


@dataclass
class Side:
    """A region as it looks in one program: its nodes (plus the inputs it reads, as context)."""

    nodes: list[NodeInfo]
    status: dict[str, str]  # node name → removed | added | changed | context

    @property
    def edges(self) -> list[tuple[str, str]]:
        shown = {n.name for n in self.nodes}
        return [(i, n.name) for n in self.nodes for i in n.inputs if i in shown]


@dataclass
class Region:
    """A connected set of changed nodes."""

    module: str
    removed: list[NodeInfo]
    added: list[NodeInfo]
    changed: list[tuple[NodeInfo, NodeInfo]]  # (before, after)
    before: Side
    after: Side

    @property
    def signature(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The ops removed and added: regions with the same signature are the same rewrite."""
        return tuple(sorted(n.op for n in self.removed)), tuple(sorted(n.op for n in self.added))

    @property
    def anchor(self) -> str:
        """A name to tell regions apart: the first node removed or changed (or added)."""
        first = (self.removed or [b for b, _ in self.changed] or self.added)[0]
        return first.name


@dataclass
class StageDiff:
    """What one stage did to the program."""

    stage: str
    removed: list[NodeInfo]
    added: list[NodeInfo]
    changed: list[tuple[NodeInfo, NodeInfo]]
    regions: list[Region]
    op_delta: dict[str, int]
    nodes_before: int
    nodes_after: int
    status: str = ""
    matches: int | None = None

    @property
    def empty(self) -> bool:
        return not (self.removed or self.added or self.changed)

    def by_module(self) -> dict[str, list[Region]]:
        grouped: dict[str, list[Region]] = {}
        for region in self.regions:
            grouped.setdefault(region.module, []).append(region)
        return grouped


@dataclass
class GraphDiff:
    """Per-stage diffs, in pipeline order. `show()` prints them; `to_html(path)` writes a page."""

    stages: list[StageDiff]
    title: str = "anefx graph diff"
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_snapshots(cls, snapshots: Sequence[tuple[str, ExportedProgram]],
                       passes: Sequence[PassRecord] = (), title: str = "anefx graph diff") -> GraphDiff:
        records = {p.name: p for p in passes}
        stages = []
        for (_, before), (name, after) in zip(snapshots, snapshots[1:], strict=False):
            record = records.get(name)
            stages.append(diff_stage(before, after, name, status=record.status if record else "",
                                     matches=record.matches if record else None))
        return cls(stages, title)

    def stage(self, name: str) -> StageDiff:
        for s in self.stages:
            if s.stage == name:
                return s
        from anefx.errors import OptionError

        known = ", ".join(s.stage for s in self.stages)
        raise OptionError(f"no stage {name!r} in this diff; stages: {known}.")

    def show(self, console: Console | None = None) -> None:
        """A summary table of the stages, then per changed stage a table of modules."""
        from rich.console import Console

        console = console or Console()
        console.print(summary_table(self))
        for stage in self.stages:
            if not stage.empty:
                console.print(module_table(stage))

    def to_html(self, path: str | Path) -> Path:
        from anefx.diff_html import write_html

        return write_html(self, path)


def diff(before: ExportedProgram, after: ExportedProgram, stage: str = "after",
         title: str = "anefx graph diff") -> GraphDiff:
    """The diff between any two ExportedPrograms, as a GraphDiff with one stage named `stage`."""
    return GraphDiff([diff_stage(before, after, stage)], title)


def diff_stage(before: ExportedProgram, after: ExportedProgram, stage: str, *, status: str = "",
               matches: int | None = None) -> StageDiff:
    old, new = node_infos(before), node_infos(after)
    kept = {name for name in old.keys() & new.keys() if _same_node(old[name], new[name])}
    changed = [(old[n], new[n]) for n in old if n in kept and _rewired(old[n], new[n])]
    removed = [info for name, info in old.items() if name not in kept]
    added = [info for name, info in new.items() if name not in kept]
    hist_before, hist_after = op_histogram(before.graph_module), op_histogram(after.graph_module)
    delta = {k: hist_after[k] - hist_before[k] for k in sorted(hist_before.keys() | hist_after.keys())
             if hist_after[k] != hist_before[k]}
    regions = find_regions(old, new, removed, added, changed)
    return StageDiff(stage, removed, added, changed, regions, delta, len(old), len(new), status, matches)


def node_infos(ep: ExportedProgram) -> dict[str, NodeInfo]:
    """Every node of the program, in graph order."""
    kinds = {s.arg.name: _KIND_LABELS.get(s.kind.name, s.kind.name.lower())
             for s in ep.graph_signature.input_specs if hasattr(s.arg, "name")}
    return {n.name: _info(n, kinds) for n in ep.graph_module.graph.nodes}


def _info(node: fx.Node, kinds: dict[str, str]) -> NodeInfo:
    if node.op == "placeholder":
        op = kinds.get(node.name, "input")
    elif node.op == "output":
        op = "output"
    elif node.op == "call_function":
        op = op_name(node)
    else:
        op = f"{node.op} {node.target}"
    literals = fx.node.map_arg((node.args, node.kwargs), lambda _: "•")
    rule = node.meta.get("anefx_rule")
    origins = tuple(src.name for src in node.meta.get("from_node") or ()
                    if rule is not None and getattr(src, "pass_name", None) == rule)
    return NodeInfo(node.name, op, describe_value(node.meta.get("val")), module_path(node) or TOP_LEVEL,
                    tuple(n.name for n in node.all_input_nodes), repr(literals),
                    rule, origins)


def describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "").replace("float", "f").replace("int", "i")
        return f"({', '.join(str(d) for d in value.shape)}) {dtype}"
    if isinstance(value, (tuple, list)):
        return " | ".join(describe_value(v) for v in value if isinstance(v, torch.Tensor))
    return ""


def _same_node(a: NodeInfo, b: NodeInfo) -> bool:
    return a.op == b.op and a.rule == b.rule


def _rewired(a: NodeInfo, b: NodeInfo) -> bool:
    return a.inputs != b.inputs or a.literals != b.literals or a.shape != b.shape


def find_regions(old: dict[str, NodeInfo], new: dict[str, NodeInfo], removed: list[NodeInfo],
                 added: list[NodeInfo], changed: list[tuple[NodeInfo, NodeInfo]]) -> list[Region]:
    """Connected components of the removed and added nodes, linked by the edges of the program before
    (removed nodes) and after (added nodes) and by provenance (an added node and the node it replaced).
    A rewired node joins the region(s) it touches, so it never glues two rewrites into one."""
    g = nx.Graph()
    g.add_nodes_from(("-", n.name) for n in removed if n.op not in INPUT_OPS)
    g.add_nodes_from(("+", n.name) for n in added if n.op not in INPUT_OPS)
    for sign, own in (("-", removed), ("+", added)):
        g.add_edges_from(((sign, n.name), (sign, i)) for n in own for i in n.inputs if (sign, i) in g)
    for n in added:
        g.add_edges_from((("+", n.name), ("-", o)) for o in n.origins if ("-", o) in g)
    components = [set(c) for c in nx.connected_components(g)]
    where = {key: i for i, c in enumerate(components) for key in c}
    _attach_constants(components, where, removed, added, old, new)
    where = {key: i for i, c in enumerate(components) for key in c}
    touched: dict[int, list[tuple[NodeInfo, NodeInfo]]] = {}
    for b, a in changed:
        near = {where[k] for k in _neighbours(b, a, old, new) if k in where}
        if not near:
            components.append(set())
            near = {len(components) - 1}
        for i in near:
            touched.setdefault(i, []).append((b, a))
    regions = [_region(c, touched.get(i, []), old, new) for i, c in enumerate(components)]
    order = {name: i for i, name in enumerate([*old, *new])}
    return sorted(regions, key=lambda r: order.get(r.anchor, 0))


def _attach_constants(components: list[set], where: dict, removed: list[NodeInfo], added: list[NodeInfo],
                      old: dict[str, NodeInfo], new: dict[str, NodeInfo]) -> None:
    """A removed / added placeholder (e.g. one attention mask shared by every layer) joins the region
    of the node it was folded from, else each region that reads it, else its own region."""
    for sign, own, infos in (("-", removed, old), ("+", added, new)):
        for n in (n for n in own if n.op in INPUT_OPS):
            near = {where[("-", o)] for o in n.origins if ("-", o) in where}
            near = near or {where[(sign, u.name)] for u in infos.values()
                            if n.name in u.inputs and (sign, u.name) in where}
            if not near:
                components.append(set())
                near = {len(components) - 1}
            for i in near:
                components[i].add((sign, n.name))


def _neighbours(b: NodeInfo, a: NodeInfo, old: dict[str, NodeInfo], new: dict[str, NodeInfo]):
    yield from (("-", i) for i in b.inputs)
    yield from (("+", i) for i in a.inputs)
    yield from (("-", n.name) for n in old.values() if b.name in n.inputs)
    yield from (("+", n.name) for n in new.values() if a.name in n.inputs)


def _region(component: set[tuple[str, str]], changed: list[tuple[NodeInfo, NodeInfo]],
            old: dict[str, NodeInfo], new: dict[str, NodeInfo]) -> Region:
    removed = [old[n] for n in old if ("-", n) in component]
    added = [new[n] for n in new if ("+", n) in component]
    before = _side(old, removed, [b for b, _ in changed], "removed")
    after = _side(new, added, [a for _, a in changed], "added")
    return Region(_module_of(removed, changed, added), removed, added, changed, before, after)


def _side(infos: dict[str, NodeInfo], own: list[NodeInfo], changed: list[NodeInfo], label: str) -> Side:
    status = {n.name: label for n in own} | {n.name: "changed" for n in changed}
    for n in own:  # the inputs the removed / added nodes read, as context
        for i in n.inputs:
            status.setdefault(i, "context")
    return Side([infos[n] for n in infos if n in status], status)


def _module_of(removed: list[NodeInfo], changed: list[tuple[NodeInfo, NodeInfo]],
               added: list[NodeInfo]) -> str:
    """The module of the nodes the stage replaced: new nodes carry the module of the node they replace
    (their anchor); a region that only removes votes with its removed and rewired nodes."""
    votes = Counter(n.module for n in added if n.rule is not None)
    if not votes:
        votes = Counter(n.module for n in [*removed, *(b for b, _ in changed if b.op != "output")])
    if not votes:
        votes = Counter(n.module for n in added) or Counter(b.module for b, _ in changed)
    named = [m for m, _ in votes.most_common() if m != TOP_LEVEL]
    return named[0] if named else TOP_LEVEL

def op_counts(ops: Sequence[str]) -> str:
    """'linear' / 'permute×2 convolution' — a compact op list."""
    counts = Counter(ops)
    return " ".join(op if k == 1 else f"{op}×{k}" for op, k in counts.most_common()) or "-"


def delta_text(delta: dict[str, int], limit: int = 6) -> str:
    items = sorted(delta.items(), key=lambda kv: (-abs(kv[1]), kv[0]))
    text = " ".join(f"{k}{v:+d}" for k, v in items[:limit])
    return (text + (f" (+{len(items) - limit} more)" if len(items) > limit else "")) or "-"


def summary_table(d: GraphDiff):
    from rich.table import Table

    table = Table(title=d.title, caption="−/+/~: nodes removed / added / rewired (same node, new inputs)")
    table.add_column("stage", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("nodes", justify="right", no_wrap=True)
    table.add_column("−/+/~", justify="right", no_wrap=True)  # removed / added / rewired nodes
    table.add_column("regions", justify="right", no_wrap=True)
    table.add_column("op delta", ratio=1)
    for s in d.stages:
        table.add_row(s.stage, s.status or ("changed" if not s.empty else "unchanged"),
                      f"{s.nodes_before}→{s.nodes_after}",
                      f"{len(s.removed)}/{len(s.added)}/{len(s.changed)}",
                      str(len(s.regions)), delta_text(s.op_delta))
    return table


def module_table(stage: StageDiff):
    """One row per (module, kind of rewrite): how often, where, which ops went and came."""
    from rich.table import Table

    table = Table(title=f"{stage.stage}: changes by module")
    for col in ("module", "×", "where", "removed ops", "added ops"):
        table.add_column(col, justify="right" if col == "×" else "left", overflow="fold")
    for module, regions in stage.by_module().items():
        for group in group_regions(regions):
            first = group[0]
            where = ", ".join(r.anchor for r in group[:3]) + (" …" if len(group) > 3 else "")
            table.add_row(module, str(len(group)), where, op_counts([n.op for n in first.removed]),
                          op_counts([n.op for n in first.added]))
    return table


def group_regions(regions: Sequence[Region]) -> list[list[Region]]:
    """Regions of one module grouped by signature (the same rewrite applied several times)."""
    groups: dict[tuple, list[Region]] = {}
    for r in regions:
        groups.setdefault(r.signature, []).append(r)
    return list(groups.values())
