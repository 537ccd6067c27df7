"""Small FX helpers shared by the engine and the rules.

Every node a rule creates goes through `emit`, which gives it a FakeTensor `meta["val"]` (coremltools
and torch.export need it) and provenance: the anchor node's `nn_module_stack` / `stack_trace` and a
`from_node` entry naming the rule.
"""

from __future__ import annotations

import copy
import heapq
import warnings
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
from torch.utils import _pytree as pytree

aten = torch.ops.aten

PROVENANCE_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn")
_CONSTANT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def fake_mode_of(gm: fx.GraphModule):
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode
    raise RuntimeError("graph has no FakeTensor metadata")


def val(node: Any) -> Any:
    """The FakeTensor (or literal) a graph argument stands for."""
    return node.meta["val"] if isinstance(node, fx.Node) else node


def shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(d) for d in node.meta["val"].shape)


def emit(graph: fx.Graph, target, args: tuple, kwargs: dict | None = None, *, origin: fx.Node,
         rule: str) -> fx.Node:
    """Insert `target(*args, **kwargs)` at the graph's insertion point, with meta and provenance."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = pytree.tree_map_only(fx.Node, val, (args, kwargs))
    mode = fake_mode_of(graph.owning_module)
    with mode:
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    copy_provenance(node, origin, rule)
    return node


def copy_provenance(node: fx.Node, origin: fx.Node, rule: str) -> None:
    for key in PROVENANCE_KEYS:
        if key in origin.meta:
            node.meta[key] = origin.meta[key]
    node.meta["from_node"] = [fx_traceback.NodeSource(origin, pass_name=rule,
                                                      action=fx_traceback.NodeSourceAction.REPLACE)]
    node.meta["anefx_rule"] = rule


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost user module a node came from ('' at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # nn_module_stack paths look like "L['self'].model.layers[0].self_attn" or "model.layers.0"
    path = path.replace("L['self'].", "").replace("L['self']", "")
    return path.replace("[", ".").replace("]", "").replace("'", "").strip(".")


def constant_inputs(ep: ExportedProgram) -> dict[str, InputSpec]:
    """Placeholders that stand for parameters, buffers or lifted constants (never mutated)."""
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    return {s.arg.name: s for s in ep.graph_signature.input_specs
            if s.kind in _CONSTANT_KINDS and s.target not in mutated}


def is_constant(node: Any, ep: ExportedProgram, _memo: dict | None = None) -> bool:
    """True when `node` depends on no user input: parameters, buffers, constants and ops on them."""
    if not isinstance(node, fx.Node):
        return True
    memo = {} if _memo is None else _memo
    if node in memo:
        return memo[node]
    if node.op == "placeholder":
        result = node.name in constant_inputs(ep)
    elif node.op == "get_attr":
        result = True
    elif node.op == "call_function":
        result = all(is_constant(a, ep, memo) for a in node.all_input_nodes)
    else:
        result = False
    memo[node] = result
    return result


def constant_value(node: fx.Node, ep: ExportedProgram) -> torch.Tensor | None:
    """The tensor a parameter / buffer / constant placeholder holds (None for other nodes)."""
    spec = constant_inputs(ep).get(node.name) if node.op == "placeholder" else None
    if spec is None:
        return None
    if spec.kind == InputKind.CONSTANT_TENSOR:
        return ep.constants[spec.target]
    return ep.state_dict.get(spec.target, ep.constants.get(spec.target))


def add_constant(ep: ExportedProgram, name: str, tensor: torch.Tensor) -> fx.Node:
    """Lift a new constant tensor into the program (placeholder + graph signature + constants)."""
    graph = ep.graph_module.graph
    specs = ep.graph_signature.input_specs
    taken = {n.name for n in graph.nodes} | set(ep.constants)
    base, i = name, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    first_user = next((i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT), len(specs))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[first_user] if first_user < len(placeholders) else None
    if anchor is not None:
        with graph.inserting_before(anchor):
            node = graph.placeholder(name)
    else:
        with graph.inserting_after(placeholders[-1] if placeholders else None):
            node = graph.placeholder(name)
    node.meta["val"] = fake_mode_of(ep.graph_module).from_tensor(tensor, static_shapes=True)
    specs.insert(first_user, InputSpec(kind=InputKind.CONSTANT_TENSOR, arg=TensorArgument(name=name),
                                       target=name, persistent=None))
    ep.constants[name] = tensor
    return node


def sync_output_specs(ep: ExportedProgram) -> None:
    """Output specs name output nodes; keep them in step after a rule replaced an output."""
    outputs = ep.graph_module.graph.output_node().args[0]
    for spec, node in zip(ep.graph_signature.output_specs, outputs, strict=True):
        if isinstance(node, fx.Node) and isinstance(spec.arg, TensorArgument):
            spec.arg = TensorArgument(name=node.name)


def finish(ep: ExportedProgram, touched: Iterable[fx.Node] = ()) -> None:
    """Remove dead code, re-sync the signature, recompile and validate the program. `touched`: nodes
    whose inputs a rewrite replaced; their metadata (and what depends on it) is re-derived."""
    gm = ep.graph_module
    topological_order(gm.graph)
    gm.graph.eliminate_dead_code()
    refresh_meta(gm.graph, touched)
    drop_unused_constants(ep)
    gm.graph.lint()
    gm.recompile()
    sync_output_specs(ep)
    ep.validate()


def topological_order(graph: fx.Graph) -> bool:
    """Put every node after the nodes it reads, keeping the present order wherever it is already valid
    (a stable Kahn sort; node objects and names are kept). Returns whether anything moved.

    Rules insert each replacement before the node it replaces; when matches are chained or adjacent a
    replacement can end up ahead of a value it reads, and the engine, not each rule, restores order."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    if all(position[a] < position[n] for n in nodes for a in n.all_input_nodes):
        return False
    pending = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(position[n], n) for n in nodes if pending[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, node = heapq.heappop(ready)
        order.append(node)
        for user in node.users:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, (position[user], user))
    if len(order) != len(nodes):
        raise RuntimeError("the graph has a cycle: a rewrite made a value depend on itself")
    output = graph.output_node()
    for node in order:
        if node is not output:
            output.prepend(node)
    return True


VIEWS = (aten.view.default, aten._unsafe_view.default)


def refresh_meta(graph: fx.Graph, touched: Iterable[fx.Node]) -> int:
    """Re-derive the FakeTensor of each touched node, and of its users while anything changes; a view
    its input can no longer serve becomes a reshape (the same values). Returns how many views turned.

    A rule replaces a value by an equal one that may be laid out differently — a permuted conv output,
    a slice of a wider norm — where the model had a contiguous tensor, and a `view` exported for that
    contiguous tensor (torch.export writes `reshape` as `view` when it can) cannot view the new one."""
    nodes = [n for n in touched if not getattr(n, "_erased", False) and n.graph is graph]
    if not nodes:
        return 0
    position = {n: i for i, n in enumerate(graph.nodes)}
    mode = fake_mode_of(graph.owning_module)
    pending = [(position[n], n) for n in set(nodes)]
    heapq.heapify(pending)
    done: set[fx.Node] = set()
    turned = 0
    while pending:
        _, node = heapq.heappop(pending)
        if node in done or node.op != "call_function":
            continue
        done.add(node)
        value, reshaped = _fake_run(node, mode)
        turned += reshaped
        if _same_layout(value, node.meta.get("val")):
            continue
        node.meta["val"] = value
        for user in node.users:
            heapq.heappush(pending, (position[user], user))
    return turned


def _fake_run(node: fx.Node, mode) -> tuple[Any, bool]:
    args, kwargs = pytree.tree_map_only(fx.Node, val, (node.args, node.kwargs))
    with mode:
        try:
            return node.target(*args, **kwargs), False
        except (RuntimeError, ValueError):  # fake tensors raise ValueError where kernels raise RuntimeError
            if node.target not in VIEWS:
                return node.meta.get("val"), False  # an op that cannot run on fake tensors: as recorded
            node.target = aten.reshape.default
            return node.target(*args, **kwargs), True


def _same_layout(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_layout(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
    return type(a) is type(b)


def drop_unused_constants(ep: ExportedProgram) -> None:
    """Lifted constants a rule made unused leave the program (parameters stay: they are user state)."""
    graph = ep.graph_module.graph
    specs = ep.graph_signature.input_specs
    for node in [n for n in graph.nodes if n.op == "placeholder" and not n.users]:
        spec = next((s for s in specs if s.arg.name == node.name), None)
        if spec is not None and spec.kind == InputKind.CONSTANT_TENSOR:
            specs.remove(spec)
            ep.constants.pop(spec.target, None)
            graph.erase_node(node)


def snapshot(ep: ExportedProgram) -> ExportedProgram:
    """A copy whose graph can be rewritten without touching `ep`. Weights are shared, not copied."""
    with warnings.catch_warnings():  # torch's own TreeSpec pickling warns on copy
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(ep.graph_module)
        signature = copy.deepcopy(ep.graph_signature)
    for old, copied in zip(ep.graph_module.graph.nodes, gm.graph.nodes, strict=True):
        if copied.name != old.name:  # the copy renames nodes that shadow builtins ("input")
            copied.name = old.name
    gm.recompile()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        new = ep._update(gm, signature, state_dict=dict(ep.state_dict), constants=dict(ep.constants))
    return new


def op_histogram(gm: fx.GraphModule) -> Counter:
    return Counter(op_name(n) for n in gm.graph.nodes if n.op == "call_function")


def op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        return f"{ns}.{target._schema.name.split('::')[-1]}" if ns != "aten" else target._schema.name.split("::")[-1]
    return name
