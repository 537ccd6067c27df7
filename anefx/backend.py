"""`torch.compile(model, backend="anefx")`: each graph dynamo hands over goes through anefx.compile.

Found by torch through the `torch_dynamo_backends` entry point (pyproject.toml), so the user does not
import anefx. Dynamo passes the model's parameters and buffers as graph inputs; they are made constants
of a small wrapper module again (shared, not copied), so the program anefx captures takes only the user's
tensors, as the CoreML model will. Shapes are static on the ANE: one program is compiled per input
signature (shapes, dtypes, and the values of integer inputs dynamo makes symbolic) and cached.

On macOS each call runs the CoreML model; elsewhere the verified rewritten graph runs in torch, with one
notice saying so.
"""

from __future__ import annotations

import inspect
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.fx as fx

from anefx.errors import OptionError

_STATE_SOURCE = re.compile(r"\._(parameters|buffers)\[")  # dynamo's source of a module attribute
_NOTICE_SHOWN = False


@dataclass(frozen=True)
class BackendOptions:
    """What `torch.compile(..., options={...})` may set. `attention` is kept for the attention rule."""

    compute_units: str = "CPU_AND_NE"
    deployment_target: str = "iOS18"
    precision: str = "fp16"
    attention: str | None = None
    verify: bool = True
    rules: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise OptionError(f"unknown anefx option(s) {', '.join(map(repr, unknown))}; "
                              f"torch.compile(..., options={{...}}) accepts: {', '.join(known)}.")
        if options.get("rules") is not None:
            options["rules"] = tuple(options["rules"])
        from anefx.lower import check_options

        parsed = cls(**options)
        attention = (parsed.attention,) if parsed.attention is not None and accepts_attention() else ()
        check_options(parsed.compute_units, parsed.deployment_target, parsed.precision, *attention)
        return parsed

    def compile_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for anefx.compile (`attention` once anefx.compile takes it)."""
        kwargs: dict[str, Any] = {"compute_units": self.compute_units, "precision": self.precision,
                                  "deployment_target": self.deployment_target, "verify": self.verify}
        if self.rules is not None:
            kwargs["rules"] = list(self.rules)
        if self.attention is not None and accepts_attention():
            kwargs["attention"] = self.attention
        return kwargs


def accepts_attention() -> bool:
    from anefx.api import compile as anefx_compile

    return "attention" in inspect.signature(anefx_compile).parameters


@dataclass(frozen=True)
class Slot:
    """Where one graph input comes from: a module state tensor, a user tensor, or an int."""

    kind: str  # "state" | "tensor" | "int"
    index: int  # position among the state tensors / the graph's runtime arguments


class GraphPiece(torch.nn.Module):
    """The dynamo graph as a module whose only inputs are the user's tensors (ints baked in)."""

    def __init__(self, gm: fx.GraphModule, slots: Sequence[Slot], state: Sequence[torch.Tensor],
                 ints: Mapping[int, int]):
        super().__init__()
        self.gm = gm
        self.slots = list(slots)
        self.ints = dict(ints)
        for i, t in enumerate(state):
            if isinstance(t, torch.nn.Parameter):
                self.register_parameter(f"state_{i}", t)
            else:
                self.register_buffer(f"state_{i}", t)

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        args = [getattr(self, f"state_{s.index}") if s.kind == "state"
                else self.ints[s.index] if s.kind == "int" else next(it) for s in self.slots]
        return self.gm(*args)


@dataclass
class AnefxCompiledGraph:
    """The callable handed back to dynamo: one anefx program per input signature."""

    gm: fx.GraphModule
    slots: list[Slot]
    state: list[torch.Tensor]
    options: BackendOptions
    cache: dict[tuple, Callable[..., Any]] = field(default_factory=dict)
    compiled: dict[tuple, Any] = field(default_factory=dict)  # signature → CompiledModel

    def __call__(self, *args: Any) -> Any:
        runtime = [a for a, s in zip(args, self.slots, strict=True) if s.kind != "state"]
        key = signature_key(runtime)
        if key not in self.cache:
            self.cache[key] = self._compile(args)
        tensors = [a for a in runtime if isinstance(a, torch.Tensor)]
        return self.cache[key](*tensors)

    def _compile(self, args: Sequence[Any]) -> Callable[..., Any]:
        from anefx.api import compile as anefx_compile

        ints = {s.index: int(a) for a, s in zip(args, self.slots, strict=True) if s.kind == "int"}
        piece = GraphPiece(self.gm, self.slots, self.state, ints)
        tensors = tuple(a for a, s in zip(args, self.slots, strict=True) if s.kind == "tensor")
        with warnings.catch_warnings():  # torch's own TreeSpec deprecation, raised inside export
            warnings.simplefilter("ignore", FutureWarning)
            compiled = anefx_compile(piece, tensors, **self.options.compile_kwargs())
        self.compiled[signature_key(list(args))] = compiled
        if sys.platform == "darwin":
            return compiled
        _notice_once()
        module = compiled.rewritten.module()

        def run(*inputs: torch.Tensor) -> Any:
            with torch.no_grad():
                return module(*inputs)

        return run


def signature_key(args: Sequence[Any]) -> tuple:
    return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else ("int", int(a)) for a in args)


def graph_slots(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[list[Slot], list[torch.Tensor]]:
    """Classify the graph's inputs: module state (parameters, buffers) vs user tensors vs ints."""
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
            slots.append(Slot("int", i))
    return slots, state


def _is_state(node: fx.Node, example: torch.Tensor) -> bool:
    if isinstance(example, torch.nn.Parameter):
        return True
    source = getattr(node.meta.get("grapharg"), "source", None)
    return source is not None and bool(_STATE_SOURCE.search(source.name))


def anefx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Mapping | None = None,
                  mode: str | None = None) -> Callable[..., Any]:
    """The torch.compile backend. Options: see `BackendOptions`; modes are not supported."""
    if mode not in (None, "default"):
        raise OptionError(f"torch.compile(mode={mode!r}) means nothing to anefx; drop `mode` and pass "
                          "anefx settings through options={...}.")
    parsed = BackendOptions.parse(options)
    if not any(n.op == "call_function" for n in gm.graph.nodes):
        return gm.forward  # a piece with no computation (e.g. between graph breaks)
    slots, state = graph_slots(gm, example_inputs)
    if not any(s.kind == "tensor" for s in slots):
        return gm.forward  # nothing from the user flows in: no program to compile
    return AnefxCompiledGraph(inference_graph(gm), slots, state, parsed)


def inference_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of dynamo's graph without grad-mode switches. Dynamo records a `@torch.no_grad()` region
    as set_grad_enabled(False) … set_grad_enabled(True): the closing call would turn autograd back on
    in the middle of anefx's no-grad export (and break it). anefx compiles for inference only."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            graph.erase_node(node)
    return fx.GraphModule(gm, graph)  # SDPA's enable_gqa is handled by anefx.legalize after capture


def _notice_once() -> None:
    global _NOTICE_SHOWN
    if not _NOTICE_SHOWN:
        _NOTICE_SHOWN = True
        from anefx.compiled import AnefxNotice

        # no source line to point at: the caller is dynamo's generated code
        warnings.warn_explicit("CoreML cannot run on this OS, so torch.compile(backend='anefx') runs the "
                               "verified rewritten graph in torch (the program that was lowered to CoreML).",
                               AnefxNotice, filename="anefx backend", lineno=0, module="anefx.backend")
