"""Shape buckets: the examples of `anefx.compile(..., buckets=[...])`, checked before anything is compiled.

A bucket is an example input with other shapes than the example: the same tensors (by position or by
name), the same dtypes and the same constants. Each bucket becomes one function of one .mlpackage (see
anefx.bucketed); this module turns what the user passed into (args, kwargs) pairs, refuses buckets that
differ in anything but shapes, names the functions and reads the buckets a saved package records.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from anefx.errors import InvalidExampleError, OptionError

BUCKETS_KEY = "anefx.buckets"  # package metadata: JSON list of {"function": name, "inputs": {name: shape}}
LISTED = 8  # buckets an error message lists before "…"


class BucketError(OptionError):
    """`buckets=` is empty, or a bucket differs from the example in more than shapes, or repeats one."""


class BucketShapeError(InvalidExampleError):
    """A call's input shapes are none of the buckets the package was compiled for."""


@dataclass
class CallForm:
    """What a call passes, apart from shapes: the tensors' structure, their dtypes, the constants."""

    spec: Any  # pytree structure of (positional tensors, named tensors)
    paths: list[str]  # readable path of each tensor ("input_ids", "args[0]")
    shapes: tuple[tuple[int, ...], ...]
    dtypes: list[torch.dtype]
    constants: dict[str, Any] = field(default_factory=dict)
    positional: tuple[str, ...] = ()  # the parameters passed by position


@dataclass
class BucketRecord:
    """One function of a saved bucket package: its name and its inputs' shapes."""

    function: str
    inputs: dict[str, tuple[int, ...]]

    def describe(self) -> str:
        shapes = ", ".join(f"{name} {shape_text(shape)}" for name, shape in self.inputs.items())
        return f"{self.function} ({shapes})"


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def bucket_examples(model: torch.nn.Module, example_args: Any, example_kwargs: dict | None,
                    buckets: Any) -> list[tuple[tuple, dict]]:
    """(args, kwargs) per function: the example first, then each bucket whose shapes differ from it, in
    the order given. Raises BucketError for an empty or malformed list, a bucket that differs from the
    example in anything but shapes, or two buckets with the same shapes."""
    if not isinstance(buckets, list | tuple):
        raise BucketError(f"buckets must be a list of example inputs, got {type(buckets).__name__}; pass e.g. "
                          "buckets=[(ids_64,), (ids_128,)].")
    if not buckets:
        raise BucketError("buckets=[] lists no bucket; pass the example inputs of each shape to compile, e.g. "
                          "buckets=[(ids_64,), (ids_128,)], or leave buckets out for one program.")
    from anefx.capture import check_inputs

    example = check_inputs(model, example_args, example_kwargs)
    constants = {k: v for k, v in example[1].items() if not isinstance(v, torch.Tensor)}
    reference = call_form(model, *example)
    chosen, seen = [example], {reference.shapes: "the example"}
    for index, bucket in enumerate(buckets):
        args, kwargs = _bucket_call(bucket, index, constants)
        try:
            form = call_form(model, args, kwargs, reference.positional)
        except InvalidExampleError as exc:
            raise BucketError(f"buckets[{index}]: {exc}") from None
        check_same_form(form, reference, f"buckets[{index}]")
        if form.shapes in seen and seen[form.shapes] != "the example":
            raise BucketError(f"buckets[{index}] has the same shapes as {seen[form.shapes]} "
                              f"({_shapes(form)}); each bucket becomes one function: list each shape once.")
        if form.shapes not in seen:
            seen[form.shapes] = f"buckets[{index}]"
            chosen.append((args, kwargs))
    return chosen


def _bucket_call(bucket: Any, index: int, constants: dict) -> tuple[tuple, dict]:
    """A bucket as (args, kwargs): a tensor, a tuple of tensors, a dict of keyword tensors, or (args,
    kwargs). The example's constants (flags like use_cache=False) apply unless the bucket names them."""
    if isinstance(bucket, torch.Tensor):
        return (bucket,), dict(constants)
    if isinstance(bucket, dict):
        return (), {**constants, **bucket}
    if isinstance(bucket, list | tuple):
        if len(bucket) == 2 and isinstance(bucket[1], dict) and isinstance(bucket[0], list | tuple | torch.Tensor):
            args = (bucket[0],) if isinstance(bucket[0], torch.Tensor) else tuple(bucket[0])
            return args, {**constants, **bucket[1]}
        return tuple(bucket), dict(constants)
    raise BucketError(f"buckets[{index}] is a {type(bucket).__name__}; pass each bucket as the example is passed: "
                      "a tensor, a tuple of tensors, a dict of keyword tensors, or (args, kwargs).")


def call_form(model: torch.nn.Module, args: Any, kwargs: dict | None,
              positional: tuple[str, ...] | None = None) -> CallForm:
    """The call bound to the model's forward by name (as anefx.capture binds it), its tensors flattened;
    the parameters in `positional` (default: those the call fills by position) count as positional."""
    from anefx.binding import _path, canonical, forward_signature, positional_names, split_constants
    from anefx.capture import check_inputs

    args, kwargs = check_inputs(model, args, kwargs)
    signature = forward_signature(model)
    names = positional_names(signature, args) if positional is None else positional
    by_position, named = canonical(signature, args, kwargs, names)
    tensors, constants = split_constants(named)
    leaves, spec = pytree.tree_flatten_with_path((by_position, tensors))
    if any(not isinstance(t, torch.Tensor) for _, t in leaves):
        raise InvalidExampleError("every input of a bucket must be a tensor (flags go in as keyword constants).")
    paths = [_path(p) if p[0].idx or p[1].idx >= len(names) else names[p[1].idx] + pytree.keystr(p[2:])
             for p, _ in leaves]
    return CallForm(spec, paths, tuple(tuple(t.shape) for _, t in leaves), [t.dtype for _, t in leaves], constants,
                    names)


def check_same_form(form: CallForm, reference: CallForm, where: str) -> None:
    if form.spec != reference.spec:
        raise BucketError(f"{where} passes tensors ({', '.join(form.paths) or 'none'}) where the example passes "
                          f"({', '.join(reference.paths)}); a bucket takes the same inputs as the example, only "
                          "their shapes differ: pass it as the example is passed (same arguments, same order).")
    for path, dtype, wanted in zip(form.paths, form.dtypes, reference.dtypes, strict=True):
        if dtype != wanted:
            raise BucketError(f"{where}: input `{path}` is {_dtype(dtype)} where the example's is {_dtype(wanted)}; "
                              f"buckets differ only in shapes: pass a {_dtype(wanted)} tensor.")
    for name in sorted({*form.constants, *reference.constants}):
        given, wanted = form.constants.get(name), reference.constants.get(name)
        if type(given) is not type(wanted) or given != wanted:
            raise BucketError(f"{where} passes {name}={given!r} where the example passes {name}={wanted!r}; "
                              "constants are baked into the program, so every bucket uses the example's: pass "
                              f"{name}={wanted!r}, or compile a separate program for the other value.")


def function_names(shapes: list[dict[str, tuple[int, ...]]]) -> list[str]:
    """One function name per bucket from the inputs whose shapes differ between buckets:
    `input_ids_1x64`, or `input_ids_1x64_attention_mask_1x64` when two inputs vary."""
    varying = [name for name in shapes[0] if len({s[name] for s in shapes}) > 1]
    return [re.sub(r"\W", "_", "_".join(f"{name}_{shape_text(s[name])}" for name in varying)) for s in shapes]


def unknown_shape_message(given: list[tuple[str, tuple[int, ...]]], records: list[BucketRecord]) -> str:
    listed = [r.describe() for r in records[:LISTED]] + (["…"] if len(records) > LISTED else [])
    call = ", ".join(f"{name} {shape_text(shape)}" for name, shape in given)
    return (f"the call's input shapes ({call}) are none of this package's buckets: {'; '.join(listed)}. "
            "Pad the input to one of these shapes, or compile again with a bucket of these shapes "
            "(anefx.compile(..., buckets=[...]) / anefx compile --bucket).")


def buckets_metadata(records: list[BucketRecord]) -> str:
    return json.dumps([{"function": r.function, "inputs": {k: list(v) for k, v in r.inputs.items()}}
                       for r in records])


def package_buckets(path: str | Path) -> list[BucketRecord]:
    """The buckets a saved package records (its functions, default first); [] for a one-program package."""
    from anefx.mlpackage import package_metadata

    text = package_metadata(path).get(BUCKETS_KEY)
    if not text:
        return []
    return [BucketRecord(item["function"], {k: tuple(v) for k, v in item["inputs"].items()})
            for item in json.loads(text)]


def _shapes(form: CallForm) -> str:
    return ", ".join(f"{p} {shape_text(s)}" for p, s in zip(form.paths, form.shapes, strict=True))


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
