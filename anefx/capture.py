"""Capture: check what the user handed us, run it once eagerly, export it, name its inputs/outputs."""

from __future__ import annotations

import inspect
import os
import re
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from anefx.binding import (
    CONSTANT_TYPES,
    InputBinding,
    canonical,
    check_representable,
    forward_signature,
    positional_names,
    split_constants,
)
from anefx.errors import CaptureError, InvalidExampleError, InvalidModelError

_CONSTANT_KWARG_TYPES = CONSTANT_TYPES
_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)),
                 os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rewrites"))


@dataclass
class Captured:
    exported: ExportedProgram  # after run_decompositions({})
    args: tuple
    kwargs: dict
    reference: Any  # the eager model's output on the example (original pytree form)
    input_names: list[str]
    output_names: list[str]
    notes: list[str]
    binding: InputBinding | None = None


def check_inputs(model: Any, example_args: Any, example_kwargs: Any) -> tuple[tuple, dict]:
    if not isinstance(model, torch.nn.Module):
        raise InvalidModelError(
            f"anefx.compile expects a torch.nn.Module, got {type(model).__name__}. "
            "Wrap a function in an nn.Module whose forward calls it.")
    if isinstance(example_args, torch.Tensor):
        example_args = (example_args,)
    if isinstance(example_args, list):
        example_args = tuple(example_args)
    if not isinstance(example_args, tuple):
        raise InvalidExampleError(
            f"example_args must be a tuple of tensors, got {type(example_args).__name__}; "
            "pass e.g. (torch.randn(1, 32, 64),).")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise InvalidExampleError(
            f"example_kwargs must be a dict of keyword arguments, got {type(example_kwargs).__name__}; "
            "pass e.g. {'attention_mask': mask}.")
    example_kwargs = dict(example_kwargs or {})
    for path, leaf in pytree.tree_flatten_with_path(example_args)[0]:
        if not isinstance(leaf, torch.Tensor):
            raise InvalidExampleError(
                f"example_args{pytree.keystr(path)} is a {type(leaf).__name__}, not a tensor; "
                "every positional example must be a tensor (pass flags through example_kwargs).")
    for path, leaf in pytree.tree_flatten_with_path(example_kwargs)[0]:
        if not isinstance(leaf, (torch.Tensor, *_CONSTANT_KWARG_TYPES)):
            raise InvalidExampleError(
                f"example_kwargs{pytree.keystr(path)} is a {type(leaf).__name__}; keyword examples "
                "must be tensors or plain constants (bool, int, float, str, None).")
    return example_args, example_kwargs


def run_eager(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """Run the model once on the example: the reference output, and a clear error when shapes are off."""
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised as an actionable error
        where = user_frame(exc)
        described = [_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()]
        raise InvalidExampleError(
            f"the model fails on the example inputs ({', '.join(described)}): "
            f"{type(exc).__name__}: {_first_line(exc)}{where}. "
            "Pass example inputs with the shapes and dtypes the model expects.") from exc


def export(model: torch.nn.Module, args: tuple, kwargs: dict) -> ExportedProgram:
    try:
        with torch.no_grad():
            ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised as an actionable error
        check_outputs(run_eager(model, args, kwargs))  # a model that fails on the example says so first
        raise CaptureError(capture_message(exc)) from exc
    with warnings.catch_warnings():  # torch's own pytree deprecation noise
        warnings.simplefilter("ignore", FutureWarning)
        ep = ep.run_decompositions({})
    drop_constant_inputs(ep, args, kwargs)
    return ep


def drop_constant_inputs(ep: ExportedProgram, args: tuple, kwargs: dict) -> None:
    """Keyword constants (use_cache=False, …) are specialised into the graph: take them out of the
    program's inputs so it is called with tensors only, as the CoreML model will be."""
    from torch.export.graph_signature import ConstantArgument

    specs = ep.graph_signature.input_specs
    constant = {s.arg.name for s in specs if isinstance(s.arg, ConstantArgument)}
    if not constant:
        return
    graph = ep.graph_module.graph
    for node in [n for n in graph.nodes if n.op == "placeholder" and n.name in constant]:
        graph.erase_node(node)
    specs[:] = [s for s in specs if s.arg.name not in constant]
    tensors = {k: v for k, v in kwargs.items() if not isinstance(v, _CONSTANT_KWARG_TYPES)}
    signature = ep.module_call_graph[0].signature
    signature.in_spec = pytree.tree_structure((args, tensors))
    ep.example_inputs = (args, tensors)
    if signature.forward_arg_names:  # ep.module() builds its forward signature from these
        signature.forward_arg_names = [n for n in signature.forward_arg_names if n not in constant]
    ep.graph_module.recompile()
    ep.validate()


def capture_message(exc: BaseException) -> str:
    text = str(exc)
    key = _key_line(text)
    where = user_frame(exc)
    if "data-dependent" in text or "GuardOnDataDependent" in type(exc).__name__:
        advice = ("the model branches on a tensor's value. Replace the Python `if`/`while` on tensor data "
                  "with torch.where (or torch.cond), or make it depend on shapes only")
    elif "not a known type" in text or "pytree" in text:
        advice = ("the model returns a Python object torch.export cannot flatten. Return tensors (or "
                  "tuples/dicts of them), or pass a keyword that switches the object off (e.g. use_cache=False)")
    else:
        advice = "rewrite that line with tensor operations torch.export supports"
    return f"torch.export could not capture the model: {key}{where}. To fix: {advice}."


def _key_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"data-dependent|not a known type|Unsupported|not supported|Could not", ln):
            return ln
    return lines[0] if lines else "(no message)"


def user_frame(exc: BaseException) -> str:
    """' at file.py:12: `source line`' for the innermost frame in the user's code ('' if none)."""
    frames = []
    seen: BaseException | None = exc
    while seen is not None:  # the user's frame may sit in a chained exception
        frames = traceback.extract_tb(seen.__traceback__) + frames
        seen = seen.__cause__ or seen.__context__
    for fr in reversed(frames):
        path = os.path.abspath(fr.filename)
        if _is_library(path) or not fr.line:
            continue
        return f" at {os.path.basename(path)}:{fr.lineno}: `{fr.line.strip()}`"
    return ""


def _is_library(path: str) -> bool:
    return (path.startswith(_LIBRARY_DIRS) or "site-packages" in path or "dist-packages" in path
            or path.startswith(os.path.dirname(os.__file__)) or path.startswith("<"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    return repr(x)


def default_kwargs(model: torch.nn.Module, kwargs: dict, notes: list[str]) -> dict:
    """Keywords that keep the export stateless without touching the model (e.g. use_cache=False)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs:
        notes.append("called the model with use_cache=False: a stateless program returns no KV cache")
        return {**kwargs, "use_cache": False}
    return kwargs


def output_names(reference: Any) -> list[str]:
    """Readable names for the flattened outputs: 'logits', 'last_hidden_state', 'output_0', …"""
    leaves = pytree.tree_flatten_with_path(reference)[0]
    names: list[str] = []
    for path, _leaf in leaves:
        parts = [_key_name(k) for k in path]
        name = "_".join(p for p in parts if p) or "output"
        if parts and all(p.isdigit() for p in parts):
            name = "output_" + name
        name = re.sub(r"\W", "_", name)
        names.append(_unique(name, names))
    return names


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _unique(name: str, taken: list[str]) -> str:
    base, i = name, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    return name


def capture(model: torch.nn.Module, example_args: Any, example_kwargs: Any) -> Captured:
    """Export the model on the example, bound to forward's parameters by name. The model is left exactly
    as it was: export works on fake copies of its state, a forward that updates its own buffers or its
    inputs in place is refused, and the one eager run (the reference) is undone if it changed a buffer."""
    args, kwargs = check_inputs(model, example_args, example_kwargs)
    notes: list[str] = []
    kwargs = default_kwargs(model, kwargs, notes)
    signature = forward_signature(model)
    by_position = positional_names(signature, args)
    args, kwargs = canonical(signature, args, kwargs, by_position)
    _check_leaves(args, kwargs, by_position)
    was_training = model.training
    model.eval()
    try:
        with preserved_state(model):
            ep = export(model, args, kwargs)
            refuse_mutation(ep)
            reference = run_eager(model, args, kwargs)
    finally:
        model.train(was_training)
    check_outputs(reference)
    placeholders = {n.name: n for n in ep.graph_module.graph.nodes if n.op == "placeholder"}
    input_names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"
                   and isinstance(placeholders[s.arg.name].meta.get("val"), torch.Tensor)]
    binding = InputBinding.of(signature, args, kwargs, input_names, by_position)
    binding.implied = frozenset(k for k in kwargs if k not in (example_kwargs or {}))
    if len(binding.paths) != len(input_names):
        raise CaptureError(f"the example has {len(binding.paths)} tensors but the captured program takes "
                           f"{len(input_names)}; pass each tensor input once (an input passed twice, or a "
                           "tensor the model ignores, is not supported).")
    tensors, _ = split_constants(kwargs)
    return Captured(ep, args, tensors, reference, input_names, output_names(reference), notes, binding)


def check_outputs(reference: Any) -> None:
    for path, leaf in pytree.tree_flatten_with_path(reference)[0]:
        if not isinstance(leaf, torch.Tensor):
            raise CaptureError(
                f"the model's output{pytree.keystr(path)} is a {type(leaf).__name__}, not a tensor. "
                "Return only tensors (or tuples/dicts of them), or pass a keyword that turns it off.")


def _check_leaves(args: tuple, kwargs: dict, names: tuple[str, ...]) -> None:
    """Values the program's input types cannot hold (positional examples are tensors: check_inputs)."""
    for path, leaf in pytree.tree_flatten_with_path(kwargs)[0]:
        if isinstance(leaf, torch.Tensor):
            check_representable(pytree.keystr(path).strip("[]'"), leaf)
    for path, leaf in pytree.tree_flatten_with_path(args)[0]:
        index = path[0].idx
        name = names[index] if index < len(names) else f"args[{index}]"
        check_representable(name + pytree.keystr(path[1:]), leaf)


class preserved_state:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Puts back every buffer of `model` that changed inside the block (compile must not modify the
    user's model). Buffers are copied first (they are small); parameters are only watched: one changed
    in place is an error, since there is no copy to restore it from."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self) -> preserved_state:
        self.buffers = {name: (b, b._version, b.detach().clone()) for name, b in self.model.named_buffers()}
        self.params = {name: (p, p._version) for name, p in self.model.named_parameters()}
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for tensor, version, saved in self.buffers.values():
                if tensor._version != version:
                    tensor.copy_(saved)
        changed = [name for name, (p, version) in self.params.items() if p._version != version]
        if changed and exc[0] is None:
            raise CaptureError(f"the model's forward changed parameter(s) {', '.join(changed)} in place; "
                               "anefx compiles what forward computes and cannot undo that. Move the update "
                               "out of forward.")


def refuse_mutation(ep: ExportedProgram) -> None:
    """A program that writes its buffers or inputs would be stateful: refused (named) before it runs."""
    signature = ep.graph_signature
    buffers = sorted(set(signature.buffers_to_mutate.values()))
    inputs = sorted(set(signature.user_inputs_to_mutate.values()))
    if buffers:
        raise CaptureError(
            f"the model's forward updates buffer(s) {', '.join(buffers)} in place (e.g. a call counter or a "
            "running statistic); a CoreML program compiled from it would not carry that state between calls. "
            "Move the update out of forward (or under `if self.training:`), or switch it off with a keyword.")
    if inputs:
        raise CaptureError(
            f"the model's forward modifies its input(s) {', '.join(inputs)} in place; use an out-of-place "
            "operation (e.g. `x = x + 1` instead of `x += 1`) so the program does not write to its inputs.")


def is_macos() -> bool:
    return sys.platform == "darwin"
