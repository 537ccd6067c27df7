"""The rewrite pipeline: legalize, then each rule in order, each verified and snapshotted.

Every stage works on a snapshot of the program before it (weights shared, graph copied). With
verification on, the stage's program runs on the example inputs and is compared with the program
before it; a stage whose outputs drift beyond tolerance is rolled back and reported, never shipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from anefx.errors import AnefxError, RuleError, failing_node, short_reason, write_debug_graph
from anefx.graph import module_path, op_histogram, snapshot
from anefx.legalize import legalize
from anefx.rule import Refusal, Rule, apply_rule
from anefx.samples import drawn_like, drawn_states
from anefx.states import logical_states, mutated_states, restore_logical, stored_states

log = logging.getLogger("anefx")


@dataclass
class PassRecord:
    """What one stage did. `status`: applied | no-match | rolled-back."""

    name: str
    matches: int = 0
    refusals: list[Refusal] = field(default_factory=list)
    op_delta: dict[str, int] = field(default_factory=dict)
    ms: float = 0.0
    status: str = "applied"
    max_error: float | None = None
    detail: str = ""


@dataclass
class Tolerance:
    """Elementwise: |a - b| ≤ atol · s + rtol · |b| for every element, where s = max(1, median |b|) of
    that output. The scale is the output's typical magnitude, not its largest: one large element does
    not widen the tolerance of all the others.

    For outputs in a low-precision dtype rtol and atol are at least 4 ulps of that dtype (an exact rewrite
    that reorders fp16 arithmetic moves results by an ulp or two)."""

    rtol: float = 1e-4
    atol: float = 1e-5
    extra_inputs: int = 2  # input sets drawn like the example (anefx.samples), besides the example

    def rtol_for(self, dtype: torch.dtype) -> float:
        return max(self.rtol, 4 * torch.finfo(dtype).eps)

    def atol_for(self, dtype: torch.dtype) -> float:
        return max(self.atol, 4 * torch.finfo(dtype).eps)


def run_pipeline(ep: ExportedProgram, rules: Sequence[Rule], example: tuple[tuple, dict], *,
                 verify: bool = True, tolerance: Tolerance | None = None,
                 progress: Callable[[str], None] | None = None, never_worse: bool = True
                 ) -> tuple[ExportedProgram, list[PassRecord], list[tuple[str, ExportedProgram]]]:
    """Returns the final program, one record per stage, and (stage name, program) snapshots. With
    `never_worse`, rules that would leave more layout ops or a higher rank than plain coremltools are
    rolled back (`never_worse_layout`); without it (rules the user chose), they stay."""
    tolerance = tolerance or Tolerance()
    say = progress or (lambda msg: log.info(msg))
    snapshots = [("captured", ep)]
    current = snapshot(ep)
    say("legalize")
    record = _legalize(current)
    inputs = _input_sets(ep, example, tolerance.extra_inputs if verify else 0)
    outputs = [_run(current, x, states) for x, states in inputs]
    if verify:
        _check_legalize(ep, inputs, outputs, tolerance)
    snapshots.append(("legalize", current))
    records = [record]
    for rule in rules:
        say(f"rule {rule.name}")
        candidate = snapshot(current)
        record = _apply(rule, candidate, [name for name, _ in snapshots])
        if record.status == "applied" and verify:
            new_outputs, failure = _verify(candidate, inputs, outputs, tolerance, record, current)
            if failure:
                record.status = "rolled-back"
                record.detail = f"{failure}; rule not applied"
                log.warning("anefx: rule %s rolled back: %s", rule.name, record.detail)
            else:
                outputs = new_outputs
        if record.status == "applied":
            current = candidate
        records.append(record)
        snapshots.append((rule.name, current))
    if not never_worse:
        return current, records, snapshots
    return never_worse_layout(records, snapshots), records, snapshots


def layout_note(snapshots: list[tuple[str, ExportedProgram]]) -> str:
    """'' or a note that the final program is predicted worse than plain (for rules the user chose)."""
    from anefx.layout import predicted_layout_cost

    names = [name for name, _ in snapshots]
    plain = predicted_layout_cost(snapshots[names.index("legalize")][1])
    final = predicted_layout_cost(snapshots[-1][1])
    if not final.worse_than(plain):
        return ""
    return (f"with the rules you chose, the program has {final} where plain coremltools has {plain} (predicted); "
            "the default rules (rules=None) roll back what makes it worse than plain")


def rank_note(snapshots: list[tuple[str, ExportedProgram]]) -> str:
    """'' or why the final program's tensors have a higher rank than plain coremltools' (at most the ANE's 4)."""
    from anefx.layout import predicted_layout_cost

    names = [name for name, _ in snapshots]
    plain = predicted_layout_cost(snapshots[names.index("legalize")][1])
    final = predicted_layout_cost(snapshots[-1][1])
    if final.max_rank <= plain.max_rank:
        return ""
    return (f"tensors reach rank {final.max_rank} where plain coremltools keeps rank {plain.max_rank}: the Neural "
            "Engine runs projections as 1x1 convolutions on (B, C, 1, S) tensors, with no more layout ops than plain; "
            "rules=[] keeps the plain form")


# rules that make the program right (or lowerable at all: coremltools converts no unfold and no FFT), not faster
CORRECTNESS_STAGES = ("sdpa_masked_rows", "fft_to_dft", "unfold_to_conv")


def never_worse_layout(records: list[PassRecord], snapshots: list[tuple[str, ExportedProgram]]) -> ExportedProgram:
    """The last stage's program, unless its predicted layout cost (anefx.layout.predicted_layout_cost) is worse
    than the legalized program's (what plain coremltools lowers): then the program of the last stage that is
    not worse, and the rules after it are marked rolled back with the figures (records and snapshots in place)."""
    from anefx.layout import predicted_layout_cost

    names = [name for name, _ in snapshots]
    start = names.index("legalize")
    plain = predicted_layout_cost(snapshots[start][1])
    final = predicted_layout_cost(snapshots[-1][1])
    if not final.worse_than(plain):
        return snapshots[-1][1]
    keep = next(i for i in range(len(snapshots) - 1, start - 1, -1)
                if not predicted_layout_cost(snapshots[i][1]).worse_than(plain))
    if any(records[i - start].name in CORRECTNESS_STAGES and records[i - start].status == "applied"
           for i in range(keep + 1, len(snapshots))):
        return snapshots[-1][1]  # a stage that fixes a wrong result is never traded for layout
    kept = snapshots[keep][1]
    for i in range(keep + 1, len(snapshots)):
        record = records[i - start]
        if record.status == "applied":
            record.status = "rolled-back"
            record.detail = (f"the rewritten program would have {final} where plain coremltools has {plain} "
                             f"(predicted: {final.why_worse(plain)}); rule not applied: anefx is never worse than "
                             "plain")
            log.info("anefx: rule %s rolled back: %s", record.name, record.detail)  # a decision, not a fault
        snapshots[i] = (snapshots[i][0], kept)
    return kept


def _input_sets(ep: ExportedProgram, example: tuple[tuple, dict], extra: int) -> list[tuple]:
    """(inputs, states) pairs: the example with the program's own states (None), then `extra` sets drawn
    like the example with random states (anefx.samples), so that reads of past cache positions count."""
    return [(example, None), *zip(drawn_like(ep, example, extra), drawn_states(ep, extra), strict=True)]


def _verify(candidate: ExportedProgram, inputs: list, expected: list, tolerance: Tolerance,
            record: PassRecord, previous: ExportedProgram | None = None) -> tuple[list, str]:
    """The candidate's outputs on every input set, and '' or what differs from the stage before it.

    A float32 program whose outputs differ by a few tolerances (deep models accumulate float32 rounding
    that an exact reordering moves) is judged again in float64, where an exact rewrite agrees with the
    program before it to ~1e-12 and a wrong one still differs (`exact_in_float64`)."""
    outputs, record.max_error = [], 0.0
    for i, (x, before) in enumerate(zip(inputs, expected, strict=True)):
        try:
            after = _run(candidate, *x)
        except Exception as exc:  # noqa: BLE001 - a rewritten graph that no longer runs is a failed check
            return outputs, f"the rewritten graph fails to run ({short_reason(exc)})"
        error, ok = compare(after, before, tolerance)
        if not ok and previous is not None and error < FLOAT64_RECHECK and exact_in_float64(candidate, previous, x):
            log.info("anefx: rule %s: off by %.3g× the float32 tolerance, equal in float64", record.name, error)
            record.detail = f"float32 rounding {error:.3g}× the tolerance; equal to the program before it in float64"
            error, ok = 0.0, True
        record.max_error = max(record.max_error, error)
        if not ok:
            which = "the example" if i == 0 else (f"random input {i} drawn like the example (both signs, wider "
                                                  f"range{', random states' if mutated_states(candidate) else ''})")
            return outputs, (f"{_what_differs(candidate, after, before, tolerance)} from the graph before the rule on "
                             f"{which}: worst element off by {error:.3g}× its tolerance (atol {tolerance.atol}·scale "
                             f"+ rtol {tolerance.rtol}·|b|)")
        outputs.append(after)
    return outputs, ""


FLOAT64_RECHECK = 100.0  # a float32 difference up to this many tolerances is judged again in float64
# 100× tighter than the float32 check: what is left in float64 is the one float32 rounding of constants a
# rule folded (e.g. a scale multiplied into weights), not rounding accumulated over a deep program
FLOAT64_TOLERANCE = Tolerance(rtol=1e-6, atol=1e-7)


def exact_in_float64(candidate: ExportedProgram, previous: ExportedProgram, x: tuple) -> bool:
    """Whether the two float32 programs agree in float64 (weights, inputs and states widened): rounding
    noise vanishes there, a wrong rewrite does not. False when a program pins float32 (explicit casts)."""
    if not _float64_fits(previous):
        return False
    try:
        a, b = _run_float64(candidate, *x), _run_float64(previous, *x)
    except Exception:  # noqa: BLE001 - a program that cannot run in float64 keeps the float32 verdict
        return False
    if any(t.is_floating_point() and t.dtype != torch.float64 for t in [*a, *b]):
        return False  # a cast inside the graph kept float32 rounding: no verdict
    return compare(a, b, FLOAT64_TOLERANCE)[1]


def _float64_fits(ep: ExportedProgram) -> bool:
    """Whether the float64 re-run fits in the memory available now. Weights are widened one at a time as
    the program reads them (`_WideningInterpreter`), so the cost is activations and a few widened weights;
    the largest weight, four times over, plus a fifth of the weights must fit. A program that does not fit
    keeps the float32 verdict rather than exhaust memory."""
    floats = [t for t in [*ep.state_dict.values(), *ep.constants.values()]
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    largest = max((t.numel() for t in floats), default=0)
    return 8 * (4 * largest + sum(t.numel() for t in floats) // 5) < _available_bytes()


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 << 30  # elsewhere (macOS): assume 2 GiB to spare


def _run_float64(ep: ExportedProgram, example: tuple[tuple, dict],
                 states: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Run the program with inputs, states and weights in float64. States are widened up front (the program
    writes them); every other float weight is widened when the program reads it and dropped after its last
    use, so a large model never holds a float64 copy of all its weights."""
    from torch.fx import _pytree as fx_pytree

    args, kwargs = example
    kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    module = ep.module()
    fresh = stored_states(ep, logical_states(ep) if states is None else states)
    wide = pytree.tree_map_only(torch.Tensor, lambda t: t.double() if t.is_floating_point() else t,
                                (fresh, args, kwargs))
    fresh, args, kwargs = wide
    flat = fx_pytree.tree_flatten_spec((args, kwargs), module._in_spec)
    with torch.no_grad():
        out = torch.func.functional_call(_Widening(module), {f"program.{k}": v for k, v in fresh.items()}, flat)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)] + restore_logical(ep, fresh)


class _Widening(torch.nn.Module):
    """Runs a graph module node by node, widening each float weight to float64 as it is read."""

    def __init__(self, program: torch.fx.GraphModule):
        super().__init__()
        self.program = program

    def forward(self, *flat: torch.Tensor) -> object:
        return _WideningInterpreter(self.program).run(*flat)


class _WideningInterpreter(torch.fx.Interpreter):
    def get_attr(self, target, args, kwargs):  # noqa: ANN001, ANN201 - torch.fx.Interpreter's signature
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
            return value.double()
        return value


def _what_differs(ep: ExportedProgram, after: list, before: list, tolerance: Tolerance) -> str:
    """'outputs differ', or which state the program writes differently (its user outputs may agree)."""
    states = mutated_states(ep)
    users = len(after) - len(states)
    wrong = [name for i, name in enumerate(states)
             if not compare([after[users + i]], [before[users + i]], tolerance)[1]]
    if not wrong or not compare(after[:users], before[:users], tolerance)[1]:
        return "outputs differ"
    return f"the new value of state {', '.join(wrong)} (what the next call reads) differs"


def _check_legalize(captured: ExportedProgram, inputs: list, legalized: list,
                    tolerance: Tolerance) -> None:
    """legalize folds input-free subgraphs into constants: the program must compute what it captured."""
    for x, after in zip(inputs, legalized, strict=True):
        error, ok = compare(after, _run(captured, *x), tolerance)
        if not ok:
            raise RuleError(f"legalize changed what the program computes (worst element off by {error:.3g} of its "
                            "tolerance); this is an anefx bug: please report the model. Compile with verify=False "
                            "to skip this check at your own risk.")


def _legalize(ep: ExportedProgram) -> PassRecord:
    start = time.perf_counter()
    before = op_histogram(ep.graph_module)
    done = legalize(ep)
    after = op_histogram(ep.graph_module)
    delta = {k: after[k] - before[k] for k in sorted(set(before) | set(after)) if after[k] != before[k]}
    return PassRecord("legalize", matches=sum(done.values()), op_delta=delta,
                      ms=(time.perf_counter() - start) * 1e3,
                      detail=", ".join(f"{k}: {v}" for k, v in done.items()))


def _apply(rule: Rule, ep: ExportedProgram, before: list[str]) -> PassRecord:
    try:
        result = apply_rule(rule, ep)
    except AnefxError:
        raise
    except Exception as exc:  # noqa: BLE001 - a rule bug: name the rule, where, and what ran before it
        node = failing_node(exc)
        where = "" if node is None else f"It failed at {module_path(node) or 'the top level'} (node {node.name}). "
        path = write_debug_graph(f"rule-{rule.name}", ep, exc, f"rule {rule.name} failed. {where}")
        saved = f"The program and the traceback: {path}. " if path else ""
        raise RuleError(f"rule {rule.name} failed ({short_reason(exc)}); stages before it: {', '.join(before)}. "
                        f"{where}{saved}Compile without it: rules=[r for r in anefx.default_rules() "
                        f"if r.name != {rule.name!r}], and report the model to anefx."
                        ) from exc
    status = "applied" if result.matches else "no-match"
    return PassRecord(rule.name, result.matches, result.refusals, result.op_delta, result.ms, status)


def _run(ep: ExportedProgram, example: tuple[tuple, dict],
         states: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The program's outputs on the example, then the new value of each state it writes (anefx.states),
    in the model's layout. The run is functional: the states go in as fresh tensors (`states`, or the
    program's own values), so the program's buffers are never written and runs are independent.

    A low-precision program runs with fp32 weights and inputs: rules are exact rewrites of the math, and
    a rule that removes an fp16 overflow must not be compared with the overflowed result."""
    args, kwargs = example
    kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}  # constants are baked in
    module = ep.module()
    fresh = stored_states(ep, logical_states(ep) if states is None else states)
    if _low_precision(module, (args, kwargs, fresh)):
        upcast = _run_upcast(ep, module, fresh, (args, kwargs))
        if upcast is not None:
            return upcast
    with torch.no_grad():
        out = torch.func.functional_call(module, fresh, args, kwargs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)] + restore_logical(ep, fresh)


def _run_upcast(ep: ExportedProgram, module: torch.nn.Module, fresh: dict[str, torch.Tensor],
                example: tuple) -> list[torch.Tensor] | None:
    """The run in fp32, results cast back to the program's dtypes; None for a graph that pins dtypes."""
    weights = _upcast({**dict(module.named_parameters()), **dict(module.named_buffers()), **fresh})
    up_args, up_kwargs = _upcast(example)
    try:  # functional_call swaps the weights for this call only: the program's stay fp16
        with torch.no_grad():
            out = torch.func.functional_call(module, weights, up_args, up_kwargs)
    except RuntimeError:  # a graph that pins dtypes (explicit casts into an op) runs as it is
        return None
    nodes = {n.name: n for n in ep.graph_module.graph.nodes}
    native = [nodes[name].meta["val"].dtype for name in ep.graph_signature.user_outputs
              if name in nodes and isinstance(nodes[name].meta.get("val"), torch.Tensor)]
    outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    written = {target: weights[target].to(value.dtype) for target, value in fresh.items()}
    return ([t.to(d) for t, d in zip(outs, native, strict=False)] + outs[len(native):]
            + restore_logical(ep, written))


_LOW = (torch.float16, torch.bfloat16)


def _low_precision(module: torch.nn.Module, example: tuple) -> bool:
    tensors = [t for t in pytree.tree_leaves(example) if isinstance(t, torch.Tensor)]
    return any(t.dtype in _LOW for t in [*module.parameters(), *module.buffers(), *tensors])


def _upcast(tree):
    return pytree.tree_map_only(torch.Tensor, lambda t: t.float() if t.dtype in _LOW else t, tree)


def compare(actual: list[torch.Tensor], expected: list[torch.Tensor],
            tolerance: Tolerance) -> tuple[float, bool]:
    """(worst ratio of an element's error to its tolerance, whether every element is within it).
    Non-finite values must sit in the same places with the same values (NaN where NaN)."""
    worst, ok = 0.0, len(actual) == len(expected)
    for a, b in zip(actual, expected, strict=False):
        if a.shape != b.shape:
            return float("inf"), False
        if not (a.is_floating_point() or a.is_complex()):
            ok = ok and bool(torch.equal(a, b))
            continue
        rtol, atol = tolerance.rtol_for(b.dtype), tolerance.atol_for(b.dtype)
        a, b = a.double(), b.double()
        finite = torch.isfinite(b)
        if not torch.equal(finite, torch.isfinite(a)) or not torch.equal(a[~finite].nan_to_num(0.0),
                                                                          b[~finite].nan_to_num(0.0)):
            return float("inf"), False
        if not finite.any():
            continue
        a, b = a[finite], b[finite]
        scale = max(1.0, float(b.abs().median()))
        allowed = atol * scale + rtol * b.abs()
        ratio = float(((a - b).abs() / allowed).max())
        worst = max(worst, ratio)
        ok = ok and ratio <= 1.0
    return worst, ok
