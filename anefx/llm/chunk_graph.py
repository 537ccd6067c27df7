"""The graph side of chunking (see anefx.llm.chunks): which node goes in which chunk, and each chunk's program."""

from __future__ import annotations

import copy
import math
import operator
import re
from collections.abc import Callable

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    TensorArgument,
)
from torch.utils import _pytree as pytree

from anefx.errors import AnefxError

# Nodes that lower to no MIL op of their own.
_FREE = {operator.getitem, torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten.sym_size.int,
         torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default}
STATE_OPS = 2  # MIL ops a state adds besides the graph's own nodes: read_state, coreml_update_state
_LIFTED = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ)


class ChunkingError(AnefxError):
    """A program that cannot be cut into chunks within the limits, or a plan that does not fit the program."""


def layer_of(node: fx.Node, container: str | None = None) -> int | None:
    """The decoder layer a node belongs to (from its nn_module_stack), or None outside every layer. `container`
    is the module list's path (found from node's graph when not given: pass it when asking for many nodes)."""
    container = layer_container(node.graph) if container is None else container
    if not container:
        return None
    for path in module_paths(node):
        if path.startswith(container + "."):
            index = path[len(container) + 1:].split(".", 1)[0]
            if index.isdigit():
                return int(index)
    return None


_SLICE = re.compile(r"\.slice\([^)]*\)")  # a sliced ModuleList (`self.layers[:n]`) in a module path


def module_paths(node: fx.Node) -> list[str]:
    """Every module path of a node's nn_module_stack, outermost first, as dotted paths."""
    from anefx.graph import _clean_path

    stack = node.meta.get("nn_module_stack") or {}
    return [_SLICE.sub("", _clean_path(str(path))) for path, _cls in stack.values()]


def layer_container(graph: fx.Graph) -> str:
    """The module list of the repeated blocks: the `<prefix>` of `<prefix>.<i>` paths covering the most nodes
    (ties: the shorter prefix). "" when no module path ends in an index."""
    covered: dict[str, set[fx.Node]] = {}
    for node in graph.nodes:
        for path in module_paths(node):
            parts = path.split(".")
            for i, part in enumerate(parts[1:], start=1):
                if part.isdigit():
                    covered.setdefault(".".join(parts[:i]), set()).add(node)
    if not covered:
        return ""
    return max(covered, key=lambda prefix: (len(covered[prefix]), -len(prefix)))


class ProgramLayers:
    """A program's nodes sorted into layers: `home[node]` for placed nodes, recomputed nodes (no home) copied
    into every chunk that reads them. Placeholders are user inputs, parameters, states (buffers written in
    place) or constants (other buffers, lifted constants)."""

    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        self.graph = ep.graph_module.graph
        signature = ep.graph_signature
        if signature.user_inputs_to_mutate:
            raise ChunkingError("the program writes to one of its inputs; chunking splits programs whose only "
                                "in-place writes are to their own buffers (the KV cache).")
        self.container = layer_container(self.graph)
        self.layer = {n: layer_of(n, self.container) for n in self.graph.nodes if n.op == "call_function"}
        self.layers = max((i for i in self.layer.values() if i is not None), default=-1) + 1
        self.specs = dict(zip(self.placeholders(), signature.input_specs, strict=True))
        mutated = set(signature.buffers_to_mutate.values())
        self.kind = {p: _kind(s, mutated) for p, s in self.specs.items()}
        self.reads_input: dict[fx.Node, bool] = {}
        self.weighty: dict[fx.Node, bool] = {}
        self.home: dict[fx.Node, int] = {}
        self._classify()
        self._by_home = {h: self._with_recomputed([n for n, at in self.home.items() if at == h])
                         for h in range(max(self.layers, 1))}

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def _classify(self) -> None:
        state_home = {p: min((self.layer[u] for u in p.users if self.layer.get(u) is not None), default=0)
                      for p, kind in self.kind.items() if kind == "state"}
        for node in self.graph.nodes:
            if node.op not in ("call_function", "get_attr"):
                continue
            inputs = node.all_input_nodes
            self.reads_input[node] = any(self.kind.get(i) == "input" or self.reads_input.get(i) for i in inputs)
            self.weighty[node] = any(self.kind.get(i) == "param" or self.weighty.get(i) for i in inputs)
            homes = [self.home[i] for i in inputs if i in self.home] + [state_home[i] for i in inputs
                                                                        if i in state_home]
            if homes or (self.weighty[node] and self.reads_input[node]):
                own = self.layer.get(node)
                self.home[node] = max([*homes, *([] if own is None else [own]), 0])

    def _with_recomputed(self, placed: list[fx.Node]) -> set[fx.Node]:
        """`placed` and the recomputed nodes they read (transitively)."""
        nodes, todo = set(placed), list(placed)
        while todo:
            for i in todo.pop().all_input_nodes:
                if i.op != "placeholder" and i not in nodes and i not in self.home:
                    nodes.add(i)
                    todo.append(i)
        return nodes

    def user_outputs(self) -> list[fx.Node]:
        outputs = self.graph.output_node().args[0]
        return [n for n, s in zip(outputs, self.ep.graph_signature.output_specs, strict=True)
                if s.kind == OutputKind.USER_OUTPUT]

    def nodes_of(self, layers: range) -> set[fx.Node]:
        """The call_function/get_attr nodes a chunk of these layers runs (the last one: the outputs too)."""
        homes = layers if self.layers else range(0, 1)
        nodes = set().union(*(self._by_home[h] for h in homes if h in self._by_home))
        if homes.stop >= max(self.layers, 1):
            recomputed = [n for n in self.user_outputs() if n.op != "placeholder" and n not in self.home]
            nodes |= self._with_recomputed(recomputed)
        return nodes

    def lifted_read(self, nodes: set[fx.Node]) -> list[fx.Node]:
        """Parameter, state and constant placeholders the nodes read, in signature order."""
        read = {i for n in nodes for i in n.all_input_nodes if i.op == "placeholder"}
        return [p for p in self.placeholders() if p in read and self.kind[p] != "input"]

    def cost(self, layers: range, bytes_per_float: int, ops_per_node: float) -> tuple[int, int]:
        """(weight bytes as stored, predicted MIL ops) of a chunk of these layers. States are not stored."""
        nodes = self.nodes_of(layers)
        lifted = self.lifted_read(nodes)
        weight = sum(_stored_bytes(self.tensor(p), bytes_per_float) for p in lifted if self.kind[p] != "state")
        counted = [n for n in nodes if n.op == "call_function" and n.target not in _FREE
                   and (self.reads_input.get(n) or n in self.home)]
        states = sum(self.kind[p] == "state" for p in lifted)  # each lowers to a read_state and an update
        return weight, math.ceil(len(counted) * ops_per_node) + STATE_OPS * states

    def tensor(self, placeholder: fx.Node) -> torch.Tensor:
        target = self.specs[placeholder].target
        return self.ep.state_dict[target] if target in self.ep.state_dict else self.ep.constants[target]

    def chunk_index(self, ranges: list[range]) -> Callable[[fx.Node], int]:
        index = {h: i for i, r in enumerate(ranges) for h in (r if self.layers else range(0, 1))}
        return lambda node: index[self.home[node]]

    def check_states(self, chunk_of: Callable[[fx.Node], int]) -> None:
        """Each state must be read and written in one chunk (a CoreML state belongs to one package)."""
        for p, kind in self.kind.items():
            users = [u for u in p.users if u in self.home]
            chunks = sorted({chunk_of(u) for u in users})
            if kind == "state" and len(chunks) > 1:
                layers = sorted({self.home[u] for u in users})
                raise ChunkingError(
                    f"the cache state {self.specs[p].target} is used by layers {', '.join(map(str, layers))}, which "
                    f"the plan puts in chunks {', '.join(map(str, chunks))}; a state belongs to one package. Keep "
                    f"layers {layers[0]}..{layers[-1]} in one chunk (plan_chunks does).")

    def state_spans(self) -> list[range]:
        """For each state, the layers that use it (a chunk boundary must not fall inside one)."""
        spans = []
        for p, kind in self.kind.items():
            homes = [self.home[u] for u in p.users if u in self.home]
            if kind == "state" and homes:
                spans.append(range(min(homes), max(homes) + 1))
        return spans


def _kind(spec: InputSpec, mutated: set[str]) -> str:
    if spec.kind == InputKind.USER_INPUT:
        return "input"
    if spec.kind == InputKind.PARAMETER:
        return "param"
    return "state" if spec.kind == InputKind.BUFFER and spec.target in mutated else "constant"


def _stored_bytes(tensor: torch.Tensor, bytes_per_float: int) -> int:
    if not isinstance(tensor, torch.Tensor):
        return 0
    itemsize = bytes_per_float if tensor.is_floating_point() else min(tensor.element_size(), 4)
    return tensor.numel() * itemsize  # CoreML stores int64 as int32


# -- crossing values --------------------------------------------------------------------------------------------

def crossing_values(view: ProgramLayers, chunk_of: Callable[[fx.Node], int], count: int
                    ) -> dict[fx.Node, tuple[int, int]]:
    """Placed values read by a later chunk: node → (chunk that makes it, last chunk that reads it), graph order."""
    last = {n: count - 1 for n in view.user_outputs() if n in view.home}
    for node in view.home:
        for user in node.users:
            if user in view.home:
                last[node] = max(last.get(node, -1), chunk_of(user))
    return {n: (chunk_of(n), last[n]) for n in view.home if n in last and last[n] > chunk_of(n)}


def crossing_names(view: ProgramLayers, crossing: dict[fx.Node, tuple[int, int]], chunk: int, first_layer: int
                   ) -> dict[fx.Node, str]:
    """Names of the values entering `chunk` (whose first layer is `first_layer`): the residual stream is
    `hidden_states_<first_layer>`, other values are named after the module that made them."""
    stream = _stream(view, crossing, chunk)
    entering = [n for n, (made, last) in crossing.items() if made < chunk <= last]
    entering.sort(key=lambda n: n is not stream)  # the residual stream first, then graph order
    names, taken = {}, set()
    for node in entering:
        base = "hidden_states" if node is stream else _module_name(view, node)
        name, k = f"{base}_{first_layer}", 1
        while name in taken:
            name, k = f"{base}_{first_layer}_{k}", k + 1
        taken.add(name)
        names[node] = name
    return names


def _stream(view: ProgramLayers, crossing: dict[fx.Node, tuple[int, int]], chunk: int) -> fx.Node | None:
    """The residual stream entering `chunk`: the last value the chunk before it makes that crosses, of the shape
    of what enters layer 0 from outside the layers (the embeddings)."""
    entry = {tuple(i.meta["val"].shape) for n, h in view.home.items() if view.layer.get(n) == 0
             for i in n.all_input_nodes if i in view.home and view.layer.get(i) is None}
    made = [n for n, (h, last) in crossing.items() if h == chunk - 1 and last >= chunk]
    fitting = [n for n in made if len(entry) != 1 or tuple(n.meta["val"].shape) in entry]
    return fitting[-1] if fitting else None


def _module_name(view: ProgramLayers, node: fx.Node) -> str:
    paths = module_paths(node)
    path = paths[-1] if paths else ""
    if view.container and path.startswith(view.container + "."):
        path = "layer" + path[len(view.container) + 1:]
    else:
        path = path.rsplit(".", 1)[-1]
    return re.sub(r"\W", "_", path) or "value"


# -- building a chunk -------------------------------------------------------------------------------------------

def build_chunk(view: ProgramLayers, chunk_of: Callable[[fx.Node], int], index: int, ranges: list[range],
                crossing: dict[fx.Node, tuple[int, int]], output_names: list[str]
                ) -> tuple[ExportedProgram, list[str], list[str], list[str], dict[str, str]]:
    """The chunk's ExportedProgram, its user input names, output names, states and {name: original node}."""
    nodes = {n for n in view.nodes_of(ranges[index]) if n not in view.home or chunk_of(n) == index}
    last = index == len(ranges) - 1
    entering = crossing_names(view, crossing, index, ranges[index].start)
    leaving = {} if last else crossing_names(view, crossing, index + 1, ranges[index + 1].start)
    graph, env, in_specs = fx.Graph(), {}, []
    for p in view.lifted_read(nodes):
        env[p] = _placeholder(graph, p.name, p)
        in_specs.append(copy.copy(view.specs[p]))
    for node, name in entering.items():
        env[node] = _placeholder(graph, name, node)
        in_specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(env[node].name), None))
    read = {i for n in nodes for i in n.all_input_nodes} | set(view.user_outputs() if last else [])
    for p in view.placeholders():
        if view.kind[p] == "input" and p in read:
            env[p] = _placeholder(graph, p.name, p)
            in_specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(env[p].name), None))
    for node in view.graph.nodes:
        if node in nodes:
            env[node] = graph.node_copy(node, lambda n: env[n])
    out_nodes, out_specs, states = _outputs(view, env, nodes, leaving, last)
    names = list(leaving.values()) + (output_names if last else [])
    graph.output(tuple(out_nodes))
    program = _program(view, graph, in_specs, out_specs)
    inputs = [s.arg.name for s in in_specs if s.kind == InputKind.USER_INPUT]
    crossing_of = {name: node.name for names in (entering, leaving) for node, name in names.items()}
    return program, inputs, names, states, crossing_of


def _placeholder(graph: fx.Graph, name: str, like: fx.Node) -> fx.Node:
    node = graph.placeholder(name)
    node.meta["val"] = like.meta["val"]
    return node


def _outputs(view: ProgramLayers, env: dict, nodes: set[fx.Node], leaving: dict[fx.Node, str], last: bool):
    outputs = view.graph.output_node().args[0]
    out_nodes, specs, states = [], [], []
    for node, spec in zip(outputs, view.ep.graph_signature.output_specs, strict=True):
        if spec.kind == OutputKind.BUFFER_MUTATION and node in nodes:
            out_nodes.append(env[node])
            specs.append(OutputSpec(spec.kind, TensorArgument(env[node].name), spec.target))
            states.append(spec.target)
    user = [env[n] for n in leaving] + ([env[n] for n in view.user_outputs()] if last else [])
    for node in user:
        out_nodes.append(node)
        specs.append(OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(node.name), None))
    return out_nodes, specs, states


def _program(view: ProgramLayers, graph: fx.Graph, in_specs: list[InputSpec], out_specs: list[OutputSpec]
             ) -> ExportedProgram:
    ep = view.ep
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    state_dict, constants = {}, {}
    for spec in in_specs:
        if spec.kind in _LIFTED:
            held = state_dict if spec.target in ep.state_dict else constants
            value = (ep.state_dict if held is state_dict else ep.constants)[spec.target]
            # each chunk owns its states: running it never writes the program's (or the model's) buffers
            held[spec.target] = value.clone() if spec.target in mutated else value
    user_in = [s.arg for s in in_specs if s.kind == InputKind.USER_INPUT]
    user_out = [s.arg for s in out_specs if s.kind == OutputKind.USER_OUTPUT]
    signature = ModuleCallSignature(
        inputs=user_in, outputs=user_out, in_spec=pytree.tree_flatten((tuple(range(len(user_in))), {}))[1],
        out_spec=pytree.tree_flatten(tuple(range(len(user_out))))[1], forward_arg_names=[a.name for a in user_in])
    gm = fx.GraphModule(ep.graph_module, graph)
    return ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=ExportGraphSignature(in_specs, out_specs), state_dict=state_dict,
        range_constraints=dict(ep.range_constraints), module_call_graph=[ModuleCallEntry("", signature)],
        constants=constants, verifiers=ep.verifiers)
