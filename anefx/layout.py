"""Layouts and layout-op chains, shared by the layout and attention rules.

A *layout* says how a logical tensor is stored physically. `BC1S`: a logical (B, S, C) tensor is
stored as (B, C, 1, S) — the ANE's data format. `HEAD`: one head of a logical (B, H, S, D) tensor is
stored as (B, D, 1, S). A rule rewrites an op on logical tensors into the same op on physical ones by
remapping its axes; operands that are not yet physical are converted, and conversions that meet their
inverse are removed by `simplify_layout_chains`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.fx as fx

from anefx.graph import emit, shape

aten = torch.ops.aten

LAYOUT_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
    aten.t.default, aten.alias.default, aten.clone.default,
}
COUNTED = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
           aten.transpose.int, aten.t.default}  # what lowers to MIL transpose / reshape


@dataclass(frozen=True)
class Layout:
    """Logical rank, and where each logical dim lives in the physical rank-4 tensor."""

    name: str
    logical_rank: int
    dims: tuple[int, ...]  # physical dim of each logical dim

    def dim(self, d: int) -> int:
        return self.dims[d % self.logical_rank]


BC1S = Layout("BC1S", 3, (0, 3, 1))  # (B, S, C) → (B, C, 1, S)
HEAD = Layout("HEAD", 4, (0, 2, 3, 1))  # (B, 1, S, D) → (B, D, 1, S)


def to_physical(graph: fx.Graph, node: fx.Node, layout: Layout, *, origin: fx.Node, rule: str) -> fx.Node:
    """The physical (rank-4) form of a logical tensor that broadcasts against the layout's rank."""

    def op(target, *args):
        return emit(graph, target, args, origin=origin, rule=rule)

    logical = shape(node)
    if len(logical) < layout.logical_rank:  # right-align broadcast operands
        node = op(aten.view.default, node, [1] * (layout.logical_rank - len(logical)) + list(logical))
    if layout is BC1S:
        return op(aten.unsqueeze.default, op(aten.permute.default, node, [0, 2, 1]), 2)  # (B, C, 1, S)
    return op(aten.permute.default, node, [0, 3, 1, 2])  # (B, 1, S, D) → (B, D, 1, S)


def from_bc1s(graph: fx.Graph, node: fx.Node, *, origin: fx.Node, rule: str) -> fx.Node:
    squeezed = emit(graph, aten.squeeze.dims, (node, [2]), origin=origin, rule=rule)  # (B, C, S)
    return emit(graph, aten.permute.default, (squeezed, [0, 2, 1]), origin=origin, rule=rule)  # (B, S, C)


def is_layout_op(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in LAYOUT_OPS


def simplify_layout_chains(graph: fx.Graph, rule: str) -> int:
    """Replace each chain of layout ops by the shortest equivalent (nothing, one view, one permute,
    or permute + view). Returns how many chains were shortened."""
    shortened = 0
    graph.eliminate_dead_code()  # chains the rule disconnected must not be rebuilt
    for node in list(graph.nodes):
        if not is_layout_op(node) or node._erased or not _chain_end(node):
            continue
        chain, source = _chain(node)
        if len(chain) < 2 and not (len(chain) == 1 and shape(node) == shape(source)):
            continue
        plan = _shortest(chain, source)
        if plan is None or _cost([t for t, _ in plan]) >= _cost([n.target for n in chain]):
            continue
        with graph.inserting_before(node):
            new = source
            for target, arg in plan:
                new = emit(graph, target, (new, arg), origin=node, rule=rule)
        node.replace_all_uses_with(new)
        shortened += 1
    graph.eliminate_dead_code()
    _merge_duplicates(graph)
    return shortened


def _merge_duplicates(graph: fx.Graph) -> None:
    """Identical layout ops of the same input (each rule converts what it needs) become one."""
    seen: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if not is_layout_op(node):
            continue
        key = (node.target, _frozen(node.args), _frozen(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node


def _frozen(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _cost(targets: list) -> float:
    """Transposes and reshapes copy memory; squeezes and unsqueezes of unit axes do not."""
    return sum(1.0 if t in COUNTED else 0.1 for t in targets)


def _unit_axes_plan(src: tuple[int, ...], out: tuple[int, ...]) -> list[tuple] | None:
    """squeeze/unsqueeze steps when `out` is `src` with unit axes removed or added."""
    if [d for d in src if d != 1] != [d for d in out if d != 1]:
        return None
    plan: list[tuple] = []
    units = [i for i, d in enumerate(src) if d == 1]
    if units:
        plan.append((aten.squeeze.dims, units))
    for i, d in enumerate(out):
        if d == 1:
            plan.append((aten.unsqueeze.default, i))
    return plan


def _chain_end(node: fx.Node) -> bool:
    return not node.users or any(not is_layout_op(u) for u in node.users)


def _chain(node: fx.Node) -> tuple[list[fx.Node], fx.Node]:
    chain = [node]
    source = node.args[0]
    while is_layout_op(source):
        chain.append(source)
        source = source.args[0]
    return chain[::-1], source


def _shortest(chain: list[fx.Node], source: fx.Node) -> list[tuple] | None:
    """The plan [(target, arg)] equivalent to the chain, found by running it on an index tensor."""
    src_shape = shape(source)
    numel = 1
    for d in src_shape:
        numel *= d
    index = torch.arange(numel).view(src_shape)
    result = index
    for node in chain:  # views act as reshapes here: the values are what matters, not the strides
        target = aten.reshape.default if node.target in (aten.view.default, aten._unsafe_view.default) \
            else node.target
        result = target(result, *node.args[1:], **node.kwargs)
    out_shape = tuple(result.shape)
    flat = result.reshape(-1)
    if torch.equal(flat, index.reshape(-1)):
        if out_shape == src_shape:
            return []
        view = aten.view.default if source.meta["val"].is_contiguous() else aten.reshape.default
        return _unit_axes_plan(src_shape, out_shape) or [(view, list(out_shape))]
    head = flat[:64]
    matching = [perm for perm in itertools.permutations(range(len(src_shape)))
                if torch.equal(_leading(index, perm, len(head)), head)  # cheap: no copy of the tensor
                and torch.equal(index.permute(perm).reshape(-1), flat)]
    for perm in sorted(matching, key=lambda p: tuple(index.permute(p).shape) != out_shape):
        plan = [(aten.permute.default, list(perm))]  # one permute if some order gives the shape
        if tuple(index.permute(perm).shape) != out_shape:
            plan.append((aten.reshape.default, list(out_shape)))
        return plan
    return None


def _leading(index: torch.Tensor, perm: tuple[int, ...], count: int) -> torch.Tensor:
    """The first `count` elements of index.permute(perm) in row-major order, without materialising it."""
    shape = [index.shape[p] for p in perm]
    strides = [index.stride(p) for p in perm]
    positions = torch.arange(count)
    offsets = torch.zeros(count, dtype=torch.long)
    for size, stride in zip(reversed(shape), reversed(strides), strict=True):
        offsets += (positions % size) * stride
        positions = positions // size
    return index.reshape(-1)[offsets]


def counted_layout_ops(graph: fx.Graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target in COUNTED)


@dataclass(frozen=True)
class LayoutCost:
    """What the saved MIL program will hold, predicted from the graph: transposes + reshapes, max rank, and how
    many of those layout ops convert a program input or make an output (anefx.layout_passes.boundary_ops)."""

    layout_ops: int
    max_rank: int
    boundary: int = 0

    @property
    def inner_ops(self) -> int:
        return self.layout_ops - self.boundary

    def worse_than(self, plain: LayoutCost) -> bool:
        """More layout ops between the program's own ops, or a rank above both the plain program's and the ANE's 4.
        The conversion of the program's inputs and outputs to and from the ANE's (B, C, 1, S) is the price of
        that layout (Apple's hand-written DistilBERT converts its output too), not a loss."""
        return self.inner_ops > plain.inner_ops or self.max_rank > max(plain.max_rank, 4)

    def why_worse(self, plain: LayoutCost) -> str:
        """What makes this cost worse than plain's, in words."""
        if self.inner_ops > plain.inner_ops:
            return f"{self.inner_ops - plain.inner_ops} more between its ops"
        return f"rank {self.max_rank} above {max(plain.max_rank, 4)}"

    def __str__(self) -> str:
        at = f" ({self.boundary} converting inputs/outputs)" if self.boundary else ""
        return f"{self.layout_ops} transposes/reshapes{at}, rank {self.max_rank}"


def predicted_layout_cost(ep) -> LayoutCost:
    """The layout cost coremltools' lowering of `ep` will have: its graph read as the MIL program the torch
    frontend builds and coremltools' layout passes replayed on it (anefx.layout_passes)."""
    from anefx.graph import is_constant
    from anefx.layout_passes import boundary_ops, predicted_ops

    ops = predicted_ops(ep)
    counted = sum(1 for op in ops if op.kind in ("transpose", "reshape"))
    memo: dict = {}
    max_rank = max((_rank(n.meta.get("val")) for n in ep.graph_module.graph.nodes
                    if n.op == "call_function" and not is_constant(n, ep, memo)), default=0)
    return LayoutCost(counted, max_rank, len(boundary_ops(ops)))


SAVED_LAYOUT = {"transpose", "reshape", "expand_dims", "squeeze", "cast"}


def saved_layout_cost(prog) -> LayoutCost:
    """The same figures read from a saved program (anefx.mil.read_program): transposes + reshapes, max rank, and
    those that convert a function input or make an output (through other layout ops and casts only)."""
    from anefx.mil.summary import ane_summary

    producer = {name: op for op in prog.operations for name, _ in op.outputs}
    readers: dict[str, list] = {}
    for op in prog.operations:
        for name in (n for bound in op.inputs.values() for n in bound if isinstance(n, str)):
            readers.setdefault(name, []).append(op)
    inputs = {name for name, _ in prog.inputs}

    def from_input(name) -> bool:
        op = producer.get(name)
        return name in inputs or (op is not None and op.type in SAVED_LAYOUT and from_input(op.inputs["x"][0]))

    def to_output(name) -> bool:
        return name in prog.outputs or any(r.type in SAVED_LAYOUT and to_output(r.outputs[0][0])
                                           for r in readers.get(name, []))

    boundary = sum(1 for op in prog.operations if op.type in ("transpose", "reshape")
                   and (from_input(op.inputs["x"][0]) or to_output(op.outputs[0][0])))
    summary = ane_summary(prog)
    return LayoutCost(summary["layout_ops"], summary["max_rank"], boundary)


def _rank(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.dim()
    if isinstance(value, list | tuple):
        return max((_rank(v) for v in value), default=0)
    return 0
