"""The graph dynamo hands to the anefx backend, taken apart: where each input comes from, which outputs
the anefx program computes and which torch computes, and the module the program is compiled from."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from anefx.graph import module_path

_STATE_SOURCE = ("._parameters[", "._buffers[")  # dynamo's source of a module attribute


@dataclass(frozen=True)
class Slot:
    """Where one graph input comes from: module state, a user tensor, or a Python number (an int dynamo
    made symbolic, a float, a bool)."""

    kind: str  # "state" | "tensor" | "value"
    index: int  # position among the state tensors / the graph's inputs


def graph_slots(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[list[Slot], list[torch.Tensor]]:
    """Classify the graph's inputs: module state (parameters, buffers) vs user tensors vs numbers."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    slots: list[Slot] = []
    state: list[torch.Tensor] = []
    for i, (node, example) in enumerate(zip(placeholders, example_inputs, strict=True)):
        if isinstance(example, torch.Tensor) and _is_state(node, example):
            slots.append(Slot("state", len(state)))
            state.append(example)
        elif isinstance(example, torch.Tensor):
            slots.append(Slot("tensor", i))
        else:
            slots.append(Slot("value", i))
    return slots, state


def _is_state(node: fx.Node, example: torch.Tensor) -> bool:
    if isinstance(example, torch.nn.Parameter):
        return True
    source = getattr(node.meta.get("grapharg"), "source", None)
    return source is not None and any(s in source.name for s in _STATE_SOURCE)


def signature_key(args: Sequence[Any]) -> tuple:
    """What one compiled program is specialised on: shapes and dtypes of tensors, values of numbers."""
    return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else (type(a).__name__, a)
                 for a in args)


def written_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[int] | None:
    """Positions of the graph inputs the graph writes to in place (found by running it on fake copies of
    the inputs and reading their version counters; nothing real runs). None when that run fails."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fakes = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in example_inputs]
    before = [f._version if isinstance(f, torch.Tensor) else 0 for f in fakes]
    try:
        with mode, torch.no_grad():
            gm.forward(*fakes)
    except Exception:  # noqa: BLE001 - unknown: the capture checks again
        return None
    return [i for i, (f, v) in enumerate(zip(fakes, before, strict=True))
            if isinstance(f, torch.Tensor) and f._version != v]


def describe_input(node: fx.Node) -> str:
    """The user's name of a graph input: L['x'] → x, L['self']._modules['lin']._buffers['n'] → self.lin.n
    (read while dynamo's graph still carries its sources: dynamo drops them once the backend returns)."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = source.name if source is not None else node.name
    for noise in ("._modules", "._parameters", "._buffers"):
        name = name.replace(noise, "")
    return name.replace("L['self']", "self").replace("L[", "[").replace("['", ".").replace("']", "") \
        .replace("[", "").replace("]", "").strip(".")


@dataclass
class OutputPlan:
    """Where each output of the dynamo graph comes from.

    The anefx program computes the tensors that need computation on the user's tensors, each once (an
    output dynamo lists twice is one program output). torch computes the rest on every call, as eager
    would: a user input returned as it is or as a view of it (it must stay an alias: writing to it
    writes to the input), ints and sizes (symbolic in a dynamic graph), and tensors that depend on no
    user tensor (module state, constants)."""

    spec: pytree.TreeSpec
    sources: list[tuple[str, int]]  # per output leaf: ("program" | "torch" | "literal", index)
    program_nodes: list[fx.Node]
    torch_nodes: list[fx.Node]
    literals: list[Any]

    @classmethod
    def of(cls, gm: fx.GraphModule, slots: Sequence[Slot]) -> OutputPlan:
        leaves, spec = pytree.tree_flatten(gm.graph.output_node().args[0])
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        from_user = _downstream([p for p, s in zip(placeholders, slots, strict=True) if s.kind == "tensor"])
        input_storages = {_storage(p) for p in placeholders} - {None}
        plan = cls(spec, [], [], [], [])
        for leaf in leaves:
            if not isinstance(leaf, fx.Node):
                plan.sources.append(("literal", len(plan.literals)))
                plan.literals.append(leaf)
            elif leaf in plan.program_nodes:
                plan.sources.append(("program", plan.program_nodes.index(leaf)))
            elif (not isinstance(_value(leaf), torch.Tensor) or leaf not in from_user
                  or leaf.op == "placeholder" or _storage(leaf) in input_storages):
                plan.sources.append(("torch", len(plan.torch_nodes)))
                plan.torch_nodes.append(leaf)
            else:
                plan.sources.append(("program", len(plan.program_nodes)))
                plan.program_nodes.append(leaf)
        return plan

    def assemble(self, program: Sequence[Any], computed: Sequence[Any]) -> Any:
        by_kind = {"program": program, "torch": computed, "literal": self.literals}
        return pytree.tree_unflatten([by_kind[kind][i] for kind, i in self.sources], self.spec)


def _value(node: fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def _storage(node: fx.Node) -> StorageWeakRef | None:
    value = _value(node)
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return StorageWeakRef(value.untyped_storage())
    except (NotImplementedError, RuntimeError):  # a tensor subclass without storage
        return None


def _downstream(nodes: Sequence[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.users)
    return seen


def graph_with_outputs(gm: fx.GraphModule, outputs: Sequence[fx.Node], *, inference: bool) -> fx.GraphModule:
    """A copy of dynamo's graph returning `outputs` (a tuple), dead code removed. `inference` also drops
    the grad-mode switches: dynamo records a `@torch.no_grad()` region as set_grad_enabled(False) …
    set_grad_enabled(True), and the closing call would turn autograd back on in the middle of anefx's
    no-grad export (and break it). anefx compiles for inference only."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if inference and node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    graph.eliminate_dead_code()
    return fx.GraphModule(gm, graph)


def used_tensor_slots(gm: fx.GraphModule, slots: Sequence[Slot]) -> list[int]:
    """Positions of the user-tensor inputs `gm` reads (the program's inputs; CoreML has no unused ones)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, (p, s) in enumerate(zip(placeholders, slots, strict=True)) if s.kind == "tensor" and p.users]


class GraphPiece(torch.nn.Module):
    """The dynamo graph as a module whose only inputs are the user tensors it reads (numbers baked in,
    module state registered again: shared, not copied). A 0-d tensor input (dynamo passes a Python float
    it did not specialise as one) comes in as `program_input` makes it: CoreML takes no rank-0 inputs."""

    def __init__(self, gm: fx.GraphModule, slots: Sequence[Slot], state: Sequence[torch.Tensor],
                 values: Mapping[int, Any], tensor_positions: Sequence[int], scalar_positions: Sequence[int] = ()):
        super().__init__()
        self.gm = gm
        self.slots = list(slots)
        self.values = dict(values)
        self.tensor_positions = set(tensor_positions)
        self.scalar_positions = set(scalar_positions)
        for i, t in enumerate(state):
            if isinstance(t, torch.nn.Parameter):
                self.register_parameter(f"state_{i}", t)
            else:
                self.register_buffer(f"state_{i}", t)

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        args = [getattr(self, f"state_{s.index}") if s.kind == "state"
                else self.values[i] if s.kind == "value"
                else self._tensor(next(it), i) if i in self.tensor_positions else None
                for i, s in enumerate(self.slots)]
        return self.gm(*args)

    def _tensor(self, t: torch.Tensor, i: int) -> torch.Tensor:
        return t.reshape(()) if i in self.scalar_positions else t


def program_input(t: torch.Tensor) -> torch.Tensor:
    """What the program takes for a graph input: a 0-d tensor as shape (1,), a float64 one as float32 (a
    Python float in eager: its ops compute in the other operand's dtype); other tensors as they are."""
    if t.dim() != 0:
        return t
    return t.reshape(1).to(torch.float32) if t.dtype == torch.float64 else t.reshape(1)


def describe_graph(gm: fx.GraphModule) -> str:
    """Which modules a graph covers ('model.embed_tokens … lm_head'), or where it starts in the source."""
    paths = [p for p in (module_path(n) for n in gm.graph.nodes if n.op.startswith("call_")) if p]
    if paths:
        return paths[0] if paths[0] == paths[-1] else f"{paths[0]} … {paths[-1]}"
    for node in gm.graph.nodes:
        frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
        if frames:
            return f"{os.path.basename(frames[-1][0])}:{frames[-1][1]}"
    return "the top level"


def describe_inputs(args: Sequence[Any]) -> str:
    """'(1, 1) int64; 4 × (1, 2, 32, 16) float32' (identical signatures counted, at most 4 kinds)."""
    kinds = Counter(f"{tuple(a.shape)} {str(a.dtype).replace('torch.', '')}" if isinstance(a, torch.Tensor)
                    else f"{type(a).__name__} {a}" for a in args)
    parts = [k if n == 1 else f"{n} × {k}" for k, n in kinds.items()]
    return "; ".join(parts[:4]) + (f"; {len(parts) - 4} more" if len(parts) > 4 else "") or "none"
