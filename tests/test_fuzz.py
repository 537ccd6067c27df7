"""Property-based tests of the rule engine and the rules (hypothesis).

- Random models built from the constructs the rules touch (tests/fuzz/models.py) compile, and both the
  rewritten graph (torch) and the saved package (MIL interpreter, fp32) equal the model on the example
  and on fresh inputs — or compile raises an AnefxError with a short message. Nothing else.
- `anefx.graph.topological_order` restores any shuffled DAG, stably.
- `anefx.rule.apply_rule` applies chained and adjacent matches (each reading the previous one's output).

The default run draws 50 models (derandomized: the same ones on every run); `-m slow` draws 150 more (sized so the whole CI run stays within its time budget).
`python -m tests.fuzz.run --examples N --seed S` runs the fuzzer at length and logs every failure.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anefx.graph import topological_order
from anefx.rule import Pattern, Rule, apply_rule
from tests.fuzz.check import check_case
from tests.fuzz.models import fuzz_cases

aten = torch.ops.aten
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(FUZZ, max_examples=50)
@given(fuzz_cases())
def test_fuzzed_models_compile_equal_or_refuse(case):
    check_case(case)


@pytest.mark.slow
@settings(FUZZ, max_examples=150)
@given(fuzz_cases(max_blocks=6))
def test_fuzzed_models_compile_equal_or_refuse_at_length(case):
    check_case(case)


# -- topological_order -------------------------------------------------------------------------------

UNARY = (torch.neg, torch.tanh, torch.sigmoid)
BINARY = (torch.add, torch.mul, torch.sub)


@st.composite
def dags(draw):
    """(graph with its nodes in a valid order, a permutation of its op nodes)."""
    graph = fx.Graph()
    values = [graph.placeholder(f"x{i}") for i in range(draw(st.integers(1, 3)))]
    for _ in range(draw(st.integers(1, 25))):
        if draw(st.booleans()):
            fn = draw(st.sampled_from(UNARY))
            values.append(graph.call_function(fn, (draw(st.sampled_from(values)),)))
        else:
            fn = draw(st.sampled_from(BINARY))
            values.append(graph.call_function(fn, (draw(st.sampled_from(values)), draw(st.sampled_from(values)))))
    graph.output(tuple(values[-draw(st.integers(1, min(3, len(values)))):]))
    ops = [n for n in graph.nodes if n.op == "call_function"]
    return graph, draw(st.permutations(range(len(ops))))


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(dags())
def test_topological_order_restores_shuffled_graphs_stably(dag):
    graph, permutation = dag
    inputs = [torch.randn(4) for n in graph.nodes if n.op == "placeholder"]
    expected = fx.GraphModule(torch.nn.Module(), graph)(*inputs)
    ops = [n for n in graph.nodes if n.op == "call_function"]
    for i in permutation:  # reorder the op nodes as the permutation says (a rule may leave any order)
        graph.output_node().prepend(ops[i])
    shuffled = list(graph.nodes)
    position = {n: i for i, n in enumerate(shuffled)}
    valid_before = all(position[a] < position[n] for n in shuffled for a in n.all_input_nodes)

    moved = topological_order(graph)

    order = list(graph.nodes)
    assert moved is not valid_before
    assert set(order) == set(shuffled) and order[-1].op == "output"
    assert all(order.index(a) < i for i, n in enumerate(order) for a in n.all_input_nodes)
    for i, node in enumerate(order):  # stable: each place takes the earliest node that is ready there
        ready = [n for n in order[i:] if all(a in order[:i] for a in n.all_input_nodes)]
        assert node is min(ready, key=position.get)
    for a in order:  # hence a node already after all it depends on stays ahead of every node after it
        if all(position[x] < position[a] for x in _ancestors(a)):
            assert all(order.index(a) < order.index(b) for b in order if position[b] > position[a])
    graph.lint()
    got = fx.GraphModule(torch.nn.Module(), graph)(*inputs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


# -- the engine on chained and adjacent matches ------------------------------------------------------

def _relu_as_abs(match, ctx):
    """relu(x) = (x + |x|) / 2; relu(−x) = (|x| − x) / 2 — both exact in floating point."""
    from anefx.graph import emit

    x, out = match.inputs[0], match.output

    def op(target, *args):
        return emit(ctx.graph, target, args, origin=out, rule=ctx.rule)

    negated = match.pattern.name == "relu(neg(x))"
    both = op(aten.sub.Tensor if negated else aten.add.Tensor, op(aten.abs.default, x), x)
    return op(aten.mul.Tensor, both, 0.5)


RELU_PATTERNS = (Pattern("relu(neg(x))", lambda x: torch.relu(-x), lambda: (torch.randn(4),)),
                 Pattern("relu(x)", torch.relu, lambda: (torch.randn(4),)))
RELU_AS_ABS = Rule(name="relu_as_abs", summary="test rule: relu → (x + |x|) / 2, reading what the match reads",
                   patterns=lambda: RELU_PATTERNS, replace=_relu_as_abs)



def _relu_transposed(match, ctx):
    """relu(x) = clamp_min(x, 0) stored transposed: the same values, not contiguous (a copy of the
    transpose, transposed back)."""
    from anefx.graph import emit

    def op(target, *args, **kwargs):
        return emit(ctx.graph, target, args, kwargs, origin=match.output, rule=ctx.rule)

    transposed = op(aten.permute.default, op(aten.clamp_min.default, match.inputs[0], 0.0), [1, 0])
    stored = op(aten.clone.default, transposed, memory_format=torch.contiguous_format)
    return op(aten.permute.default, stored, [1, 0])


RELU_TRANSPOSED = Rule(name="relu_transposed", summary="test rule: relu → a transposed clamp (other strides)",
                       patterns=lambda: RELU_PATTERNS[1:], replace=_relu_transposed)
CHAIN_OPS = ("relu", "neg", "relu_twice", "residual", "square_of_relus", "scale", "flatten")


class Chain(torch.nn.Module):
    def __init__(self, steps: list[str]):
        super().__init__()
        self.steps = steps

    def forward(self, x):
        for step in self.steps:
            if step == "relu":
                x = torch.relu(x)
            elif step == "neg":
                x = -x
            elif step == "relu_twice":  # adjacent: a match whose input is the previous match
                x = torch.relu(torch.relu(x))
            elif step == "residual":  # a match and its input both used later
                x = x + torch.relu(x)
            elif step == "square_of_relus":  # two matches reading the same input
                x = torch.relu(x) * torch.relu(-x) + torch.relu(x)
            elif step == "flatten":  # exported as views, which need a contiguous input
                x = x.reshape(-1).reshape(x.shape[0], -1)
            else:
                x = x * 1.5 - 0.25
        return x


@pytest.mark.parametrize("rule", [RELU_AS_ABS, RELU_TRANSPOSED], ids=lambda r: r.name)
@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from(CHAIN_OPS), min_size=1, max_size=12))
def test_apply_rule_chained_and_adjacent_matches(rule, steps):
    """Every relu is rewritten, each replacement reading the current value of its input, the graph in
    order, and a view after a replacement laid out otherwise (relu_transposed) still runs."""
    model = Chain(steps)
    x = torch.randn(3, 8)
    ep = torch.export.export(model, (x,)).run_decompositions({})
    relus = sum(1 for n in ep.graph_module.graph.nodes if n.target is aten.relu.default)

    result = apply_rule(rule, ep)

    graph_ops = [n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    assert result.matches == relus  # every relu, alone or as relu(neg(x)), is one match
    marker = aten.abs.default if rule is RELU_AS_ABS else aten.clamp_min.default
    assert aten.relu.default not in graph_ops and graph_ops.count(marker) == relus
    for fresh in (x, torch.randn(3, 8)):
        torch.testing.assert_close(ep.module()(fresh), model(fresh), rtol=0, atol=0)
