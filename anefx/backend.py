"""`torch.compile(model, backend="anefx")`: each graph dynamo hands over goes through anefx.compile.

Found by torch through the `torch_dynamo_backends` entry point (pyproject.toml), so the user does not
import anefx. Dynamo passes the model's parameters and buffers as graph inputs; they are made constants
of a small wrapper module again (shared, not copied), so the program anefx captures takes only the user's
tensors, as the CoreML model will. Shapes are static on the ANE: one program is compiled per input
signature (shapes, dtypes, and the values of numbers dynamo passes, e.g. symbolic sizes) and cached.

The program computes the graph's tensor outputs; what must stay exactly as eager has it (inputs returned
as they are or as views, ints and sizes, tensors of module state only) is computed by torch on every call
(`backend_graph.OutputPlan`). A graph with an op coremltools cannot lower is partitioned (anefx.partition_run:
that op in torch, the rest as packages, one `AnefxNotice` naming the ops). A graph anefx cannot compile
otherwise runs in torch, with one `AnefxNotice` saying why (`options={"fallback": False}` makes that an
error). Option errors are raised when the compiled model is first called, as the `AnefxError` itself (dynamo
would wrap an error of the backend call in its own).

On macOS each call runs the CoreML model; elsewhere the verified rewritten graph runs in torch, with one
notice saying so.
"""

from __future__ import annotations

import inspect
import itertools
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from anefx.backend_graph import (
    GraphPiece,
    OutputPlan,
    Slot,
    describe_graph,
    describe_input,
    describe_inputs,
    graph_slots,
    graph_with_outputs,
    program_input,
    signature_key,
    used_tensor_slots,
    written_inputs,
)
from anefx.errors import AnefxError, BackendError, CaptureError, OptionError, short_reason, shorten, write_debug_graph

_NOTICE_SHOWN = False
_GRAPH_NUMBERS = itertools.count(1)
_FALLBACKS_NOTED: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class BackendOptions:
    """What `torch.compile(..., options={...})` may set. `fallback`: a graph anefx cannot compile runs in
    torch with a notice (True) or raises its error (False)."""

    compute_units: str = "CPU_AND_NE"
    deployment_target: str = "iOS18"
    precision: str = "fp16"
    attention: str | None = None
    verify: bool = True
    rules: tuple[Any, ...] | None = None
    fallback: bool = True

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None, mode: str | None = None) -> BackendOptions:
        if mode not in (None, "default"):
            raise OptionError(f"torch.compile(mode={mode!r}) means nothing to anefx; drop `mode` and pass "
                              "anefx settings through options={...}.")
        known = [f.name for f in fields(cls)]
        if options is not None and not isinstance(options, Mapping):
            raise OptionError(f"torch.compile(..., options=...) takes a dict, e.g. {{'precision': 'fp32'}}, got "
                              f"{type(options).__name__}; its keys: {', '.join(known)}.")
        options = dict(options or {})
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise OptionError(f"unknown anefx option(s) {', '.join(map(repr, unknown))}; "
                              f"torch.compile(..., options={{...}}) accepts: {', '.join(known)}.")
        for flag in ("verify", "fallback"):
            if not isinstance(options.get(flag, True), bool):
                raise OptionError(f"options[{flag!r}] must be True or False, got {options[flag]!r}.")
        if options.get("rules") is not None:
            options["rules"] = _rule_list(options["rules"])
        from anefx.lower import check_options

        parsed = cls(**options)
        attention = (parsed.attention,) if parsed.attention is not None and accepts_attention() else ()
        check_options(parsed.compute_units, parsed.deployment_target, parsed.precision, *attention)
        if parsed.rules is not None:
            from anefx.api import resolve_rules

            resolve_rules(parsed.rules, parsed.compute_units)  # an unknown name fails now, not per graph
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


def _rule_list(rules: Any) -> tuple[Any, ...]:
    from anefx.rule import Rule

    if isinstance(rules, str) or not isinstance(rules, Sequence) \
            or not all(isinstance(r, str | Rule) for r in rules):
        raise OptionError(f"options['rules'] must be a list of rule names, e.g. ['linear_to_conv1x1'], "
                          f"got {rules!r}.")
    return tuple(rules)


def accepts_attention() -> bool:
    from anefx.api import compile as anefx_compile

    return "attention" in inspect.signature(anefx_compile).parameters


def anefx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Mapping | None = None,
                  mode: str | None = None) -> Callable[..., Any]:
    """The torch.compile backend. Options: see `BackendOptions`; modes are not supported."""
    try:
        parsed = BackendOptions.parse(options, mode)
    except AnefxError as exc:
        return _raise_when_called(exc)
    slots, state = graph_slots(gm, example_inputs)
    plan = OutputPlan.of(gm, slots)
    if not plan.program_nodes:
        return gm.forward  # nothing computed from the user's tensors (a piece between breaks, views, sizes)
    names = [describe_input(n) for n in gm.graph.nodes if n.op == "placeholder"]
    return AnefxCompiledGraph(gm, slots, state, plan, parsed, names, number=next(_GRAPH_NUMBERS))


def _raise_when_called(exc: AnefxError) -> Callable[..., Any]:
    def fail(*args: Any) -> Any:
        raise exc.with_traceback(None)

    return fail


@dataclass
class ProgramCall:
    """One compiled signature: the anefx program on the tensors it reads, torch for the rest."""

    run: Callable[..., Any]
    positions: list[int]  # graph inputs the program takes
    torch_part: fx.GraphModule | None
    plan: OutputPlan
    shapes: list[torch.Size]  # of the program's outputs (CoreML returns a 0-d output as (1,))

    def __call__(self, args: Sequence[Any]) -> Any:
        program = pytree.tree_leaves(self.run(*[program_input(args[i]) for i in self.positions]))
        program = [t if t.shape == s else t.reshape(s) for t, s in zip(program, self.shapes, strict=True)]
        computed = self.torch_part(*args) if self.torch_part is not None else ()
        return self.plan.assemble(program, computed)


@dataclass
class AnefxCompiledGraph:
    """The callable handed back to dynamo: one anefx program per input signature."""

    gm: fx.GraphModule  # dynamo's graph as handed over: what runs when anefx cannot compile it
    slots: list[Slot]
    state: list[torch.Tensor]
    plan: OutputPlan
    options: BackendOptions
    input_names: list[str]  # the user's name of each graph input (x, self.lin.weight)
    number: int = 0  # the how-manieth graph this process handed to anefx (named in messages)
    written: list[int] | None = None  # inputs the graph writes to in place (checked at the first call: a
    # fake run inside dynamo's compile would add guards to the graph)
    cache: dict[tuple, Callable[[Sequence[Any]], Any]] = field(default_factory=dict)  # signature → runner
    compiled: dict[tuple, Any] = field(default_factory=dict)  # signature → CompiledModel
    failures: dict[tuple, str] = field(default_factory=dict)  # signature → why it runs in torch

    def __call__(self, *args: Any) -> Any:
        key = signature_key([a for a, s in zip(args, self.slots, strict=True) if s.kind != "state"])
        if key not in self.cache:
            self.cache[key] = self._prepare(key, args)
        return self.cache[key](args)

    def _prepare(self, key: tuple, args: Sequence[Any]) -> Callable[[Sequence[Any]], Any]:
        try:
            return self._compile(key, args)
        except Exception as exc:  # noqa: BLE001 - raised as an AnefxError, or the graph runs in torch
            reason = _reason(exc)
            message = self._failure_message(exc, reason, args)
            if not self.options.fallback:
                raise _same_kind(exc, message + "\nTo run such a graph in torch instead, pass "
                                 "options={'fallback': True}.") from exc
        self.failures[key] = message
        noted = (describe_graph(self.gm), reason)  # once per place and reason, whatever the shapes
        if noted not in _FALLBACKS_NOTED:
            _FALLBACKS_NOTED.add(noted)
            _notice(message.replace("could not compile", "runs in torch, not CoreML: anefx could not compile", 1)
                    + "\nPass options={'fallback': False} to make this an error.")
        return lambda a: self.gm(*a)

    def _compile(self, key: tuple, args: Sequence[Any]) -> ProgramCall:
        if self.written is None:
            self.written = written_inputs(self.gm, args) or []
        if self.written:
            names = ", ".join(self.input_names[i] for i in self.written)
            raise CaptureError(
                f"the graph writes to {names} in place, which a CoreML program cannot do. Make the update out "
                "of place (`x = x * 2`, not `x.mul_(2)`), move it out of the compiled code, or call model.eval() "
                "if it is a training-time buffer update.")
        from anefx.partition_run import compile_graph_piece, program_output_shapes

        program = graph_with_outputs(self.gm, self.plan.program_nodes, inference=True)
        positions = used_tensor_slots(program, self.slots)
        values = {i: a for i, (a, s) in enumerate(zip(args, self.slots, strict=True)) if s.kind == "value"}
        scalars = [i for i in positions if args[i].dim() == 0]
        piece = GraphPiece(program, self.slots, self.state, values, positions, scalars)
        # clones: compiling never touches the caller's tensors
        examples = tuple(program_input(args[i].detach()).clone() for i in positions)
        with warnings.catch_warnings():  # torch's own TreeSpec deprecation, raised inside export
            warnings.simplefilter("ignore", FutureWarning)
            compiled = compile_graph_piece(piece, examples, self.options.compile_kwargs(),  # partitioned when
                                           describe_graph(self.gm))  # an op does not convert
        if len(compiled.output_names) != len(self.plan.program_nodes):
            raise BackendError(f"the program has {len(compiled.output_names)} outputs for "
                               f"{len(self.plan.program_nodes)} graph outputs.")
        self.compiled[key] = compiled
        torch_part = graph_with_outputs(self.gm, self.plan.torch_nodes, inference=False) \
            if self.plan.torch_nodes else None
        return ProgramCall(_runner(compiled), positions, torch_part, self.plan, program_output_shapes(compiled))

    def _failure_message(self, exc: BaseException, reason: str, args: Sequence[Any]) -> str:
        runtime = [a for a, s in zip(args, self.slots, strict=True) if s.kind != "state"]
        where = f"graph {self.number} ({describe_graph(self.gm)}; inputs {describe_inputs(runtime)})"
        path = write_debug_graph(f"graph-{self.number}", self.gm, exc, f"anefx could not compile {where}")
        saved = f"\nThe dynamo graph and the traceback: {path}" if path else ""
        return f'torch.compile(backend="anefx") could not compile {where}:\n{reason}{saved}'


def _reason(exc: BaseException) -> str:
    if isinstance(exc, AnefxError):
        return shorten(str(exc), max_lines=9, width=800)
    return f"anefx failed ({short_reason(exc)}): a bug in anefx; please report it with the file below."


def _same_kind(exc: BaseException, message: str) -> AnefxError:
    """An error of the class anefx raised (a LoweringError stays one), with the backend's message."""
    if isinstance(exc, AnefxError):
        try:
            return type(exc)(message)
        except TypeError:  # a class whose constructor takes more than a message
            pass
    return BackendError(message)


def _runner(compiled: Any) -> Callable[..., Any]:
    if sys.platform == "darwin" or not hasattr(compiled, "rewritten"):  # a PartitionedModel runs its own steps
        return compiled
    _notice_once()
    module = compiled.rewritten.module()

    def run(*inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            return module(*inputs)

    return run


def _notice(message: str) -> None:
    from anefx.compiled import AnefxNotice

    # no source line to point at: the caller is dynamo's generated code
    warnings.warn_explicit(message, AnefxNotice, filename="anefx backend", lineno=0, module="anefx.backend")


def _notice_once() -> None:
    global _NOTICE_SHOWN
    if not _NOTICE_SHOWN:
        _NOTICE_SHOWN = True
        _notice("CoreML cannot run on this OS, so torch.compile(backend='anefx') runs the verified rewritten "
                "graph in torch (the program that was lowered to CoreML).")
