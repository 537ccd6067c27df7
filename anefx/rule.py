"""Rules as data: traced patterns, a check that can refuse a match with a reason, and a replacement.

A rule's patterns are ordinary Python functions traced the same way models are traced
(torch.export + run_decompositions({})), so they sit at the model graph's IR level. Matching is
literal-agnostic for floats (eps, scales) and int lists (dims): checks read the actual values.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from anefx.graph import finish, module_path, op_histogram

aten = torch.ops.aten
NOISE_OPS = (aten._assert_tensor_metadata.default,)


@dataclass(frozen=True)
class Pattern:
    """A function whose traced ATen graph is searched for. `example` builds its trace inputs."""

    name: str
    fn: Callable[..., torch.Tensor]
    example: Callable[[], tuple]
    meta: dict = field(default_factory=dict, compare=False, hash=False)  # what the rule needs to know

    @functools.cached_property
    def graph(self) -> fx.Graph:
        return trace_pattern(self.fn, self.example())


class _AllModule(torch.nn.Module):
    """Every pattern of a rule in one module, so one export + decomposition traces them all."""

    def __init__(self, patterns: Sequence[Pattern], arities: list[int]):
        super().__init__()
        self.fns, self.arities = [p.fn for p in patterns], arities

    def forward(self, *args):
        outputs, start = [], 0
        for fn, arity in zip(self.fns, self.arities, strict=True):
            outputs.append(fn(*args[start:start + arity]))
            start += arity
        return tuple(outputs)


def trace_all(patterns: Sequence[Pattern]) -> None:
    """Trace the patterns not traced yet, together (a decomposition costs ~0.3 s per export)."""
    todo = [p for p in patterns if "graph" not in p.__dict__]
    if len(todo) < 2:
        return
    # fresh copies: export merges a tensor object passed twice into one input
    examples = [tuple(t.clone() for t in p.example()) for p in todo]
    flat = [t for ex in examples for t in ex]
    with torch.no_grad(), warnings.catch_warnings():  # torch's own pytree deprecation noise
        warnings.simplefilter("ignore", FutureWarning)
        ep = torch.export.export(_AllModule(todo, [len(ex) for ex in examples]), tuple(flat),
                                 strict=False).run_decompositions({})
    graph = ep.graph_module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    outputs = graph.output_node().args[0]
    start = 0
    for pattern, example, out in zip(todo, examples, outputs, strict=True):
        mine = placeholders[start:start + len(example)]
        start += len(example)
        pattern.__dict__["graph"] = _slice(graph, mine, out)


def _slice(graph: fx.Graph, inputs: list[fx.Node], output: fx.Node) -> fx.Graph:
    """A new graph holding `output` and the nodes it depends on, with `inputs` as placeholders."""
    needed, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    new = fx.Graph()
    env = {}
    for i, node in enumerate(inputs):
        env[node] = new.placeholder(f"args_{i}")
        env[node].meta = dict(node.meta)
    for node in graph.nodes:
        if node in needed and node.op == "call_function" and node.target not in NOISE_OPS:
            env[node] = new.node_copy(node, lambda n: env[n])
    new.output(env[output])
    return _literal_agnostic(new)


class _FnModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def trace_pattern(fn: Callable, example: tuple) -> fx.Graph:
    with torch.no_grad():
        ep = torch.export.export(_FnModule(fn), example, strict=False).run_decompositions({})
    graph = ep.graph_module.graph  # the function has no state: placeholders are its arguments
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in NOISE_OPS:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    return _literal_agnostic(graph)


def _literal_agnostic(graph: fx.Graph) -> fx.Graph:
    for node in graph.nodes:  # int lists (dims, view shapes) match any int list; checks read them
        node.args = tuple(AnyInts(a) if _int_list(a) and a else a for a in node.args)
    return graph


class AnyInts:
    """A pattern literal standing for any list of ints (not a sequence, so the matcher won't recurse)."""

    def __init__(self, traced: list[int] | tuple[int, ...]):
        self.traced = list(traced)

    def __repr__(self) -> str:
        return f"AnyInts({self.traced})"


class LiteralAgnosticMatcher(SubgraphMatcher):
    """SubgraphMatcher that lets floats match any float and int lists any int list.

    (`ignore_literals=True` in torch 2.13 also lets a pattern *node* match a target literal, which
    breaks later; this keeps node-vs-literal strict.)
    """

    def __init__(self, pattern: fx.Graph):
        super().__init__(pattern, match_output=False, match_placeholder=False,
                         remove_overlapping_matches=True, ignore_literals=False)

    def _match_literals(self, pn: Any, gn: Any, match: InternalMatch) -> bool:
        if isinstance(pn, float) and isinstance(gn, float | int) and not isinstance(gn, bool):
            return True
        if isinstance(pn, AnyInts):
            return _int_list(gn)
        return super()._match_literals(pn, gn, match)


def _int_list(x: Any) -> bool:
    return isinstance(x, list | tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


@dataclass
class Match:
    """One place a pattern matched. `inputs` follow the pattern function's parameters."""

    pattern: Pattern
    inputs: list[Any]
    output: fx.Node
    nodes: list[fx.Node]
    _by_pattern: dict[fx.Node, fx.Node]

    def find(self, target, nth: int = 0) -> fx.Node | None:
        """The matched graph node standing for the pattern's `nth` node with this target."""
        hits = [g for p, g in self._by_pattern.items() if p.op == "call_function" and p.target == target]
        return hits[nth] if len(hits) > nth else None

    @property
    def where(self) -> str:
        return module_path(self.output) or self.output.name


@dataclass
class Context:
    """What a check or a replacement may look at besides the match."""

    ep: ExportedProgram
    rule: str

    @property
    def graph(self) -> fx.Graph:
        return self.ep.graph_module.graph


@dataclass
class Refusal:
    where: str
    node: str
    reason: str


@dataclass(frozen=True)
class Rule:
    """pattern(s) + check + replacement. `check` returns a refusal reason or None.

    A rule that decides for the whole graph at once (a layout assignment) gives `run` instead: it
    rewrites `ctx.graph` and returns (number of rewrites, refusals). `after` runs once after the
    matches (e.g. to remove layout ops the rewrite made redundant)."""

    name: str
    summary: str
    patterns: Callable[[], Sequence[Pattern]] = tuple
    check: Callable[[Match, Context], str | None] = lambda match, ctx: None
    replace: Callable[[Match, Context], fx.Node] | None = None
    ane: bool = True  # runs only when the compute units include the Neural Engine
    run: Callable[[Context], tuple[int, list[Refusal]]] | None = None
    after: Callable[[Context], None] | None = None


@dataclass
class RuleResult:
    matches: int = 0
    refusals: list[Refusal] = field(default_factory=list)
    ms: float = 0.0
    op_delta: dict[str, int] = field(default_factory=dict)


def apply_rule(rule: Rule, ep: ExportedProgram) -> RuleResult:
    """Rewrite every accepted match of `rule` in `ep` (in place) and validate the program."""
    start = time.perf_counter()
    before = op_histogram(ep.graph_module)
    ctx = Context(ep=ep, rule=rule.name)
    result = RuleResult()
    trace_all(rule.patterns())
    touched: list[fx.Node] = []  # nodes whose inputs were replaced: their metadata is re-derived
    with ep.graph_module._set_replace_hook(lambda old, new, user: touched.append(user)):
        _rewrite(rule, ctx, result, set())
    finish(ep, touched)
    after = op_histogram(ep.graph_module)
    result.op_delta = {k: after[k] - before[k] for k in sorted(set(before) | set(after))
                       if after[k] != before[k]}
    result.ms = (time.perf_counter() - start) * 1e3
    return result


def _rewrite(rule: Rule, ctx: Context, result: RuleResult, seen_refusals: set[tuple[str, str]]) -> None:
    if rule.run is not None:
        result.matches, result.refusals = rule.run(ctx)
    replaced: dict[fx.Node, fx.Node] = {}  # the output of each match already rewritten → its replacement
    for pattern in rule.patterns():
        for match in find_matches(pattern, ctx.graph):
            if any(n.graph is not ctx.graph or _erased(n) for n in match.nodes):
                continue
            # a match found before an earlier one was rewritten may read that match's old output
            match.inputs = [_current(i, replaced) for i in match.inputs]
            reason = rule.check(match, ctx)
            if reason is not None:
                if (match.output.name, reason) not in seen_refusals:
                    seen_refusals.add((match.output.name, reason))
                    result.refusals.append(Refusal(match.where, match.output.name, reason))
                continue
            with ctx.graph.inserting_before(match.output):
                new = rule.replace(match, ctx)
            match.output.replace_all_uses_with(new)
            replaced[match.output] = new
            _erase_matched(match)
            result.matches += 1
    if rule.after is not None and result.matches:
        rule.after(ctx)


def find_matches(pattern: Pattern, graph: fx.Graph) -> list[Match]:
    internal = LiteralAgnosticMatcher(pattern.graph).match(graph)
    pattern_inputs = [n for n in pattern.graph.nodes if n.op == "placeholder"]
    matches = []
    for m in internal:
        if len(m.returning_nodes) != 1:
            continue
        by_pattern = {p: g for p, g in m.nodes_map.items() if p.op == "call_function"}
        matches.append(Match(pattern=pattern, inputs=[m.nodes_map.get(p) for p in pattern_inputs],
                             output=m.returning_nodes[0], nodes=list(by_pattern.values()),
                             _by_pattern=by_pattern))
    return matches


def _current(node: Any, replaced: dict[fx.Node, fx.Node]) -> Any:
    while isinstance(node, fx.Node) and node in replaced:
        node = replaced[node]
    return node


def _erased(node: fx.Node) -> bool:
    return getattr(node, "_erased", False)


def _erase_matched(match: Match) -> None:
    # erase from the output backwards: a matched node is dead once its users are gone
    pending = [n for n in match.nodes if not _erased(n)]
    progress = True
    while pending and progress:
        progress = False
        for node in list(pending):
            if not node.users:
                node.graph.erase_node(node)
                pending.remove(node)
                progress = True
