"""anefx.compile: capture → legalize → rules (verified) → lowering."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from anefx.capture import capture
from anefx.compiled import CompiledModel
from anefx.errors import OptionError, UnknownRuleError
from anefx.lower import NEURAL_ENGINE_UNITS, check_options, lower
from anefx.mlpackage import program_weights_sha256
from anefx.package_check import CHECKS, report
from anefx.pipeline import Tolerance, layout_note, rank_note, run_pipeline
from anefx.progress import Progress, reporter
from anefx.quantize_apply import check_quantize, quantize_lowered, quantized_check
from anefx.rule import Rule

log = logging.getLogger("anefx")


def compile(model: torch.nn.Module, example_args: Any, example_kwargs: dict | None = None, *,
            compute_units: str = "CPU_AND_NE", deployment_target: str = "iOS18", precision: str = "fp16",
            rules: Sequence[Rule | str] | None = None, verify: bool = True,
            attention: str = "split_heads", package_check: str = "warn",
            quantize: Any = None,
            progress: Progress = None, buckets: Sequence[Any] | None = None,
            partition: bool = False, cpu_ops: Sequence[str] | None = None, target: str = "coreml") -> CompiledModel:
    """Compile `model` for the example inputs into a CoreML ML program (target="coreai": a Core AI model).
    See docs/api.md."""
    check_quantize(quantize, deployment_target, target)  # anefx.quantize: before any work
    if target != "coreml":  # another Apple format, same capture and rules (anefx.lower.target)
        from anefx.lower.target import compile_to_target

        options = {k: v for k, v in locals().items() if k not in ("model", "example_args", "example_kwargs")}
        return compile_to_target(model, example_args, example_kwargs, **options)
    if buckets is not None:  # one function per bucket in one package (anefx.bucketed)
        options = {k: v for k, v in locals().items() if k not in ("model", "example_args", "example_kwargs",
                                                                  "buckets")}
        from anefx.bucketed import compile_buckets

        return compile_buckets(model, example_args, example_kwargs, buckets, **options)
    check_options(compute_units, deployment_target, precision, attention)
    if package_check not in CHECKS:
        raise OptionError(f"package_check={package_check!r} is not one of {', '.join(CHECKS)}.")
    if partition is not False or cpu_ops is not None:  # packages for what converts, torch for the rest
        options = {k: v for k, v in locals().items() if k not in ("model", "example_args", "example_kwargs",
                                                                  "partition", "cpu_ops")}
        from anefx.partition_run import compile_with_partition

        return compile_with_partition(model, example_args, example_kwargs, partition, cpu_ops, options)
    chosen = resolve_rules(rules, compute_units, attention)
    with reporter(progress, "anefx.compile") as say:
        say("capture")
        cap = capture(model, example_args, example_kwargs)
        rewritten, records, snapshots = run_pipeline(
            cap.exported, chosen, (cap.args, cap.kwargs), verify=verify, tolerance=Tolerance(), progress=say,
            never_worse=rules is None)
        if rules is not None and (note := layout_note(snapshots)):
            cap.notes.append(note)
        if note := rank_note(snapshots):
            cap.notes.append(note)
        say("lower")
        mlmodel = lower(rewritten, input_names=cap.input_names, output_names=cap.output_names,
                        compute_units=compute_units, deployment_target=deployment_target, precision=precision)
        mlmodel = quantize_lowered(mlmodel, quantize, deployment_target, say)
        compiled = _compiled(cap, rewritten, mlmodel, records, snapshots, chosen,
                             compute_units=compute_units, deployment_target=deployment_target, precision=precision,
                             verify=verify, attention=attention, package_check=package_check,
                             quantize=quantize)
        compiled.weights_sha256 = program_weights_sha256(cap.exported)  # what was lowered, even if the
        if package_check != "skip":                                      # model changes before save
            say(f"check the package ({precision}, MIL interpreter)")
            compiled.package_check = quantized_check(compiled.check_package(), quantize)
    if compiled.package_check is not None:
        report(compiled.package_check, package_check)
    return compiled


def _compiled(cap, rewritten, mlmodel, records, snapshots, chosen, **options) -> CompiledModel:
    return CompiledModel(
        exported=cap.exported, rewritten=rewritten, mlmodel=mlmodel, passes=records, snapshots=snapshots,
        input_names=cap.input_names, output_names=cap.output_names,
        options={**options, "rules": [r.name for r in chosen]},
        notes=cap.notes, _out_spec=pytree.tree_structure(cap.reference),
        _output_dtypes=[t.dtype for t in pytree.tree_leaves(cap.reference)],
        _example=(cap.args, cap.kwargs), _binding=cap.binding)


def resolve_rules(rules: Sequence[Rule | str] | None, compute_units: str,
                  attention: str = "split_heads") -> list[Rule]:
    """An explicit list wins; otherwise the default rules, ANE rules only for ANE compute units,
    and the split-head attention rule unless `attention="sdpa"` keeps the fused attention."""
    from rewrites import RULES

    if rules is None:
        on_ane = compute_units in NEURAL_ENGINE_UNITS
        return [r for r in RULES if (on_ane or not r.ane)
                and not (attention == "sdpa" and r.name == "split_head_attention")]
    by_name = {r.name: r for r in RULES}
    chosen = []
    for r in rules:
        if isinstance(r, Rule):
            chosen.append(r)
        elif r in by_name:
            chosen.append(by_name[r])
        else:
            raise UnknownRuleError(f"unknown rule {r!r}; known rules: {', '.join(by_name)}.")
    return chosen


def default_rules(compute_units: str = "CPU_AND_NE", attention: str = "split_heads") -> list[Rule]:
    return resolve_rules(None, compute_units, attention)
