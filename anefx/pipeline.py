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
    """Relative to the largest magnitude of each output: |a - b|max ≤ atol + rtol · |b|max.

    For outputs in a low-precision dtype rtol is at least 4 ulps of that dtype (an exact rewrite that
    reorders fp16 arithmetic moves results by an ulp or two)."""

    rtol: float = 1e-4
    atol: float = 1e-5

    def rtol_for(self, dtype: torch.dtype) -> float:
        return max(self.rtol, 4 * torch.finfo(dtype).eps)


def run_pipeline(ep: ExportedProgram, rules: Sequence[Rule], example: tuple[tuple, dict], *,
                 verify: bool = True, tolerance: Tolerance | None = None,
                 progress: Callable[[str], None] | None = None
                 ) -> tuple[ExportedProgram, list[PassRecord], list[tuple[str, ExportedProgram]]]:
    """Returns the final program, one record per stage, and (stage name, program) snapshots."""
    tolerance = tolerance or Tolerance()
    say = progress or (lambda msg: log.info(msg))
    snapshots = [("captured", ep)]
    current = snapshot(ep)
    say("legalize")
    record = _legalize(current)
    outputs = _run(current, example)
    snapshots.append(("legalize", current))
    records = [record]
    for rule in rules:
        say(f"rule {rule.name}")
        candidate = snapshot(current)
        record = _apply(rule, candidate, [name for name, _ in snapshots])
        if record.status == "applied" and verify:
            new_outputs = _run(candidate, example)
            record.max_error, ok = compare(new_outputs, outputs, tolerance)
            if not ok:
                record.status = "rolled-back"
                record.detail = (f"outputs differ from the graph before the rule by {record.max_error:.3g} "
                                 f"(relative), beyond rtol={tolerance.rtol}; rule not applied")
                log.warning("anefx: rule %s rolled back: %s", rule.name, record.detail)
            else:
                outputs = new_outputs
        if record.status == "applied":
            current = candidate
        records.append(record)
        snapshots.append((rule.name, current))
    return current, records, snapshots


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


def _run(ep: ExportedProgram, example: tuple[tuple, dict]) -> list[torch.Tensor]:
    """The program's outputs on the example. A low-precision program runs with fp32 weights and
    inputs: rules are exact rewrites of the math, and a rule that removes an fp16 overflow must not
    be compared with the overflowed result."""
    args, kwargs = example
    kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}  # constants are baked in
    module = ep.module()
    if _low_precision(module, (args, kwargs)):
        state = _upcast({**dict(module.named_parameters()), **dict(module.named_buffers())})
        up_args, up_kwargs = _upcast((args, kwargs))
        try:  # functional_call swaps the weights for this call only: the program's stay fp16
            with torch.no_grad():
                out = torch.func.functional_call(module, state, up_args, up_kwargs)
            nodes = {n.name: n for n in ep.graph_module.graph.nodes}
            native = [nodes[name].meta["val"].dtype for name in ep.graph_signature.user_outputs
                      if name in nodes and isinstance(nodes[name].meta.get("val"), torch.Tensor)]
            outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            return [t.to(d) for t, d in zip(outs, native, strict=False)] + outs[len(native):]
        except RuntimeError:  # a graph that pins dtypes (explicit casts into an op) runs as it is
            pass
    with torch.no_grad():
        out = module(*args, **kwargs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


_LOW = (torch.float16, torch.bfloat16)


def _low_precision(module: torch.nn.Module, example: tuple) -> bool:
    tensors = [t for t in pytree.tree_leaves(example) if isinstance(t, torch.Tensor)]
    return any(t.dtype in _LOW for t in [*module.parameters(), *module.buffers(), *tensors])


def _upcast(tree):
    return pytree.tree_map_only(torch.Tensor, lambda t: t.float() if t.dtype in _LOW else t, tree)


def compare(actual: list[torch.Tensor], expected: list[torch.Tensor],
            tolerance: Tolerance) -> tuple[float, bool]:
    """Largest relative error over outputs and whether every output is within tolerance."""
    worst, ok = 0.0, len(actual) == len(expected)
    for a, b in zip(actual, expected, strict=False):
        if a.shape != b.shape:
            return float("inf"), False
        if not a.is_floating_point():
            ok = ok and bool(torch.equal(a, b))
            continue
        rtol = tolerance.rtol_for(b.dtype)
        a, b = a.double(), b.double()
        finite = torch.isfinite(b)
        if not torch.equal(finite, torch.isfinite(a)):
            return float("inf"), False
        scale = b[finite].abs().max().item() if finite.any() else 0.0
        err = (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0
        worst = max(worst, err / max(scale, 1e-30))
        ok = ok and err <= tolerance.atol + rtol * scale
    return worst, ok
