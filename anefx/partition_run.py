"""anefx.compile(..., partition=True): each convertible region its own verified package, the rest in torch.

The captured program is split by `anefx.partition.plan_partition`; each package region becomes a small module
(the region's nodes, its weights shared with the model, never copied) that goes through anefx.compile like any
model: capture, rules verified on the region, lowering. A region coremltools still fails to lower is retried
with the nodes it named on the CPU side. The steps run in order on named values (`anefx.partition_manifest`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from anefx.capture import Captured, capture
from anefx.errors import LoweringError, OptionError
from anefx.graph import module_path
from anefx.partition import (
    PartitionPlan,
    Segment,
    check_cpu_ops,
    describe_node,
    op_name,
    plan_partition,
    region_inputs,
    region_outputs,
)
from anefx.partition_manifest import FORMAT, VERSION, PartitionError, cpu_step, tensor_spec
from anefx.partitioned import PartitionedModel

log = logging.getLogger("anefx")
_WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def check_partition_options(partition: Any, cpu_ops: Any) -> list[str]:
    if not isinstance(partition, bool):
        raise OptionError(f"partition must be True or False, got {partition!r}.")
    entries = check_cpu_ops(cpu_ops)
    if cpu_ops is not None and not partition:
        raise OptionError("cpu_ops= keeps nodes in torch, which only a partitioned compile can do: pass "
                          "partition=True as well (--partition with --cpu-ops on the command line).")
    return entries


def compile_partitioned(model: torch.nn.Module, example_args: Any, example_kwargs: dict | None,
                        cpu_ops: list[str], options: dict[str, Any], captured: Captured | None = None
                        ) -> PartitionedModel:
    """Capture, plan, compile each package region with anefx.compile(**options), describe the steps. A region
    coremltools still cannot lower is planned again with the ops its LoweringError names on the CPU side."""
    cap = captured or capture(model, example_args, example_kwargs)
    rewritten_by_rules = ops_rules_rewrite(cap, options)
    specs = {n.name: n.meta.get("val") for n in cap.exported.graph_module.graph.nodes}
    extra: dict[str, str] = {}
    for _attempt in range(len(specs) + 1):
        plan = plan_partition(cap.exported, cpu_ops, extra, rewritten_by_rules)
        if not plan.packages:
            raise PartitionError(_nothing_to_package(plan))
        weights = set(weight_names(cap.exported))
        for segment in plan.packages:  # before any compile: a complex example cannot even be drawn
            check_seam_dtypes(region_inputs(segment, weights), region_outputs(segment))
        values = record_values(cap, {n.name for s in plan.packages for n in region_inputs(s, weights)})
        try:
            packages = [compile_region(cap.exported, s, values, _with_progress(options, f"package {i}"))
                        for i, s in enumerate(plan.packages)]
        except LoweringError as exc:
            named = _nodes_named_by(exc, plan)
            if not named:
                raise
            reason = f"coremltools failed to lower it ({str(exc).splitlines()[0][:160]})"
            extra.update(dict.fromkeys((n.name for n in named), reason))
            continue
        return _partitioned(cap, plan, packages, specs, options)
    raise AssertionError("unreachable: every retry moves at least one node to the CPU side")


def _with_progress(options: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The options, a progress callable naming the package each stage belongs to."""
    say = options.get("progress")
    if not callable(say):
        return options
    return {**options, "progress": lambda stage: say(f"{prefix}: {stage}")}


def _nothing_to_package(plan: PartitionPlan) -> str:
    ops = sorted({op_name(n) for n in plan.cpu_nodes if not plan.reasons[n.name].startswith("folded")})
    return (f"no region of the model is left for a package: every op runs on the CPU (kept there: "
            f"{', '.join(ops[:6])}{' …' if len(ops) > 6 else ''}; what remains is too small to be worth a package). "
            "Name fewer ops or modules in cpu_ops, or run the model in torch.")


def ops_rules_rewrite(cap: Captured, options: dict[str, Any]) -> frozenset[str]:
    """Ops without a converter that the compile's rules rewrite away on the whole program (e.g. rfft into a DFT
    as a linear): those stay in the packages. Found by running the rules unverified (each region verifies its own);
    nothing runs when every op has a converter."""
    from anefx.api import resolve_rules
    from anefx.partition import unconvertible_nodes
    from anefx.pipeline import run_pipeline

    missing = {op_name(n) for n in unconvertible_nodes(cap.exported)}
    if not missing:
        return frozenset()
    rules = resolve_rules(options.get("rules"), options.get("compute_units", "CPU_AND_NE"),
                          options.get("attention", "split_heads"))
    try:
        rewritten, _, _ = run_pipeline(cap.exported, rules, (cap.args, cap.kwargs), verify=False, never_worse=False,
                                       progress=lambda _stage: None)
    except Exception as exc:  # noqa: BLE001 - a rule that fails here fails in its region too, with its message
        log.info("anefx: rules on the whole program failed (%s); every op without a converter runs on the CPU", exc)
        return frozenset()
    return frozenset(missing - {op_name(n) for n in unconvertible_nodes(rewritten)})


def record_values(cap: Captured, keep: set[str]) -> dict[str, Any]:
    """The values of the nodes named in `keep` (inputs of package regions) on the example, by node name."""
    ep = cap.exported
    users = iter(t for t in pytree.tree_leaves((cap.args, cap.kwargs)) if isinstance(t, torch.Tensor))
    flat = [_weight(ep, s) if s.kind in _WEIGHT_KINDS else next(users) for s in ep.graph_signature.input_specs]
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            result = super().run_node(node)
            if node.name in keep:
                values[node.name] = result
            return result

    with torch.no_grad():
        Recorder(ep.graph_module).run(*flat)
    return values


def _weight(ep: ExportedProgram, spec: Any) -> torch.Tensor:
    return ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]


def weight_names(ep: ExportedProgram) -> dict[str, Any]:
    """Placeholder name -> input spec of the program's parameters, buffers and constants."""
    return {s.arg.name: s for s in ep.graph_signature.input_specs if s.kind in _WEIGHT_KINDS}


def region_module(ep: ExportedProgram, segment: Segment) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]:
    """The segment as a module: its outside values as inputs, a dict of the values it makes as its output, its
    weights registered as the model's own tensors (shared)."""
    weights = weight_names(ep)
    inputs, outputs = region_inputs(segment, set(weights)), region_outputs(segment)
    root, graph, env = torch.nn.Module(), fx.Graph(), {}
    for node in inputs:  # a 0-d value comes in as shape (1,): CoreML takes no rank-0 inputs
        env[node] = graph.placeholder(node.name)
        if _is_scalar(node):
            env[node] = graph.call_function(torch.ops.aten.reshape.default, (env[node], []))
    for node in segment.nodes:
        for arg in node.all_input_nodes:
            if arg.name in weights and arg not in env:
                _register(root, arg.name, _weight(ep, weights[arg.name]), weights[arg.name].kind)
                env[arg] = graph.get_attr(arg.name)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output({node.name: env[node] for node in outputs})
    return fx.GraphModule(root, graph), inputs, outputs


def _register(root: torch.nn.Module, name: str, tensor: torch.Tensor, kind: InputKind) -> None:
    if kind == InputKind.PARAMETER and isinstance(tensor, torch.nn.Parameter):
        root.register_parameter(name, tensor)
    else:
        root.register_buffer(name, tensor)


def compile_region(ep: ExportedProgram, segment: Segment, values: dict[str, Any], options: dict[str, Any]) -> Any:
    from anefx.api import compile as anefx_compile

    module, inputs, _outputs = region_module(ep, segment)
    examples = tuple(values[n.name].reshape(1) if _is_scalar(n) else values[n.name] for n in inputs)
    return anefx_compile(module, examples, **options)


def check_seam_dtypes(inputs: list[fx.Node], outputs: list[fx.Node]) -> None:
    """A complex value cannot cross between the CPU and a package: CoreML programs have no complex type."""
    for node, side in [*((n, "into") for n in inputs), *((n, "out of") for n in outputs)]:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.is_complex():
            raise PartitionError(
                f"`{node.name}` ({describe_node(node)}) is a complex tensor that would pass {side} a package; "
                "CoreML programs have no complex type. Keep the op that makes it and the ops that read it on the "
                "same side: name them in cpu_ops=[...] (e.g. the reader of an FFT), or read the complex result "
                "with .abs(), .real/.imag or torch.view_as_real right after the op.")


def _nodes_named_by(exc: LoweringError, plan: PartitionPlan) -> list[fx.Node]:
    """The package nodes whose op the region's LoweringError names: as anefx lists ops without a converter
    ('aten.histc.default (histc, …)'), or as coremltools quotes an op's short name ('histc')."""
    text = str(exc)
    forms = ("{op} (", "node {node} (", "'{short}'", "kind {short}\n", "kind {short},", "op {short} ")
    return [n for s in plan.packages for n in s.nodes if hasattr(n.target, "_opname") and any(
        form.format(op=op_name(n), node=n.name, short=n.target._opname) in text for form in forms)]


def _is_scalar(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 0


def _partitioned(cap: Captured, plan: PartitionPlan, packages: list, values: dict[str, Any],
                 options: dict[str, Any]) -> PartitionedModel:
    ep, weights = cap.exported, weight_names(cap.exported)
    steps, numbered = [], iter(enumerate(packages))
    for segment in plan.segments:
        if segment.kind == "package":
            number, compiled = next(numbered)
            steps.append(package_step(ep, segment, compiled, values, number))
        else:
            steps += [cpu_step(n, values, plan.reasons.get(n.name, "")) for n in segment.nodes]
    outputs = list(ep.graph_module.graph.output_node().args[0])
    cpu_reads = {a.name for n in plan.cpu_nodes for a in n.all_input_nodes} | {n.name for n in outputs}
    cpu_weights = {name: _weight(ep, spec) for name, spec in weights.items() if name in cpu_reads}
    manifest = {
        "format": FORMAT, "version": VERSION, "precision": options.get("precision", "fp16"),
        "inputs": [tensor_spec(name, values[name]) for name in cap.input_names],
        "outputs": [{**tensor_spec(name, values[n.name]), "value": n.name}
                    for name, n in zip(cap.output_names, outputs, strict=True)],
        "steps": steps, "cpu_weights": "cpu_weights.safetensors" if cpu_weights else None,
        "folded": plan.folded, "output_structure": _structure(cap.reference),
    }
    return PartitionedModel(manifest, packages, cpu_weights, cap.exported, binding=cap.binding,
                            out_spec=pytree.tree_structure(cap.reference), example=(cap.args, cap.kwargs))


def package_step(ep: ExportedProgram, segment: Segment, compiled: Any, values: dict[str, Any],
                 number: int) -> dict[str, Any]:
    inputs, outputs = region_inputs(segment, set(weight_names(ep))), region_outputs(segment)
    paths = [p for p in (module_path(n) for n in segment.nodes) if p]
    return {
        "kind": "package", "package": f"package_{number}.mlpackage",
        "inputs": [{**tensor_spec(name, values[n.name]), "value": n.name, **({"shape": [1]} if _is_scalar(n) else {})}
                   for name, n in zip(compiled.input_names, inputs, strict=True)],
        "outputs": [{**tensor_spec(name, values[n.name]), "value": n.name}
                    for name, n in zip(compiled.output_names, outputs, strict=True)],
        "ops": len(segment.nodes), "modules": sorted(set(paths), key=paths.index),
        "first_op": op_name(segment.nodes[0]), "last_op": op_name(segment.nodes[-1]),
    }


def _structure(reference: Any) -> str | None:
    """The model's output structure as torch's pytree serializes it (None for a type it cannot)."""
    try:
        return pytree.treespec_dumps(pytree.tree_structure(reference))
    except Exception:  # noqa: BLE001 - e.g. a ModelOutput class: the loaded model returns a dict instead
        return None


def compile_with_partition(model: torch.nn.Module, example_args: Any, example_kwargs: dict | None, partition: Any,
                           cpu_ops: Any, options: dict[str, Any]) -> PartitionedModel:
    """anefx.compile(..., partition=True): options checked, then `compile_partitioned`."""
    entries = check_partition_options(partition, cpu_ops)
    return compile_partitioned(model, example_args, example_kwargs, entries, options)


def compile_graph_piece(piece: torch.nn.Module, examples: tuple, options: dict[str, Any], where: str) -> Any:
    """For the torch.compile backend: a CompiledModel, or when the program has nodes coremltools cannot lower, a
    PartitionedModel (those nodes run in torch), with one notice naming them."""
    import warnings

    from anefx.api import compile as anefx_compile
    from anefx.compiled import AnefxNotice
    from anefx.partition import unconvertible_nodes

    try:
        return anefx_compile(piece, examples, **options)
    except LoweringError as exc:
        cap = capture(piece, examples, None)
        if not unconvertible_nodes(cap.exported):
            raise
        log.info("anefx: %s; partitioning", str(exc).splitlines()[0])
    compiled = compile_partitioned(piece, examples, None, [], options, captured=cap)
    ops = ", ".join(sorted({s["op"] for s in compiled.cpu_steps if "coremltools" in s["reason"]}))
    if (where, ops) not in _PARTITIONS_NOTED:  # once per place and ops, whatever the shapes
        _PARTITIONS_NOTED.add((where, ops))
        warnings.warn_explicit(
            f'torch.compile(backend="anefx"): the graph of {where} runs {ops} in torch on the CPU (coremltools '
            f"cannot lower them) and the rest as {len(compiled.packages)} CoreML package(s).", AnefxNotice,
            filename="anefx backend", lineno=0, module="anefx.backend")
    return compiled


_PARTITIONS_NOTED: set[tuple[str, str]] = set()


def program_output_shapes(compiled: Any) -> list[torch.Size]:
    """The shapes of a compiled program's outputs (CoreML returns a 0-d output as (1,))."""
    if isinstance(compiled, PartitionedModel):
        return [torch.Size(o["shape"]) for o in compiled.manifest["outputs"]]
    nodes = {n.name: n for n in compiled.rewritten.graph_module.graph.nodes}
    return [nodes[name].meta["val"].shape for name in compiled.rewritten.graph_signature.user_outputs]
