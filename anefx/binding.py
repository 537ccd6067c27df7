"""Inputs by name: how a call's arguments become the program's inputs.

A compiled program has named tensor inputs and, baked in, the non-tensor arguments it was compiled
with (`use_cache=False`, flags). Every call — the example at compile time and each later call — is
bound to the model's `forward` signature first, so `c(a=a, b=b)`, `c(b=b, a=a)` and `c(a, b)` feed the
same inputs. A constant passed with another value than the compiled one, a missing or extra tensor, a
shape the program was not compiled for, or a value the input type cannot hold is an error, never a
silently different computation.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from anefx.errors import InvalidExampleError

CONSTANT_TYPES = (bool, int, float, str, type(None))
_INT32 = torch.iinfo(torch.int32)
_FP32_MAX = torch.finfo(torch.float32).max


class NarrowingNotice(UserWarning):
    """An input is narrowed to the type CoreML takes (float64 → float32)."""


def forward_signature(model: torch.nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def positional_names(signature: inspect.Signature | None, args: tuple) -> tuple[str, ...]:
    """The parameters the example fills by position (a compiled program is called the same way)."""
    if signature is None:
        return ()
    names: list[str] = []
    for p in signature.parameters.values():
        if len(names) >= len(args) and p.kind is not p.VAR_POSITIONAL:
            break
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL):
            names.append(p.name)
        if p.kind is p.VAR_POSITIONAL:
            break
    return tuple(names)


def canonical(signature: inspect.Signature | None, args: tuple, kwargs: dict,
              positional: tuple[str, ...] | None = None) -> tuple[tuple, dict]:
    """(positional, named) for a call: the parameters in `positional` (by default, those this call
    fills by position) by position, every other argument by name in signature order. A None passed
    for a parameter whose default is None counts as not passed."""
    if signature is None:
        return tuple(args), dict(kwargs)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidExampleError(f"the model's forward{signature} does not take these arguments ({exc}); "
                                  "pass the arguments forward accepts.") from None
    positional = positional_names(signature, args) if positional is None else positional
    by_position: list[Any] = []
    named: dict[str, Any] = {}
    for p in signature.parameters.values():
        if p.name not in bound.arguments:
            continue
        value = bound.arguments[p.name]
        if p.name in positional:
            by_position.extend(value) if p.kind is p.VAR_POSITIONAL else by_position.append(value)
        elif p.kind is p.VAR_POSITIONAL:
            raise InvalidExampleError(f"the call passes {len(value)} extra positional argument(s) the program "
                                      "was not compiled with; pass the arguments of the example.")
        elif p.kind is p.VAR_KEYWORD:
            named.update(sorted(value.items()))
        elif not (value is None and p.default is None):
            named[p.name] = value
    return tuple(by_position), named


def split_constants(named: dict) -> tuple[dict, dict]:
    """(tensor arguments, constant arguments) of the named part of a canonical call."""
    constants = {k: v for k, v in named.items() if isinstance(v, CONSTANT_TYPES)}
    return {k: v for k, v in named.items() if k not in constants}, constants


@dataclass
class InputBinding:
    """What a call must look like to feed the compiled program (see the module docstring)."""

    signature: inspect.Signature | None
    input_names: list[str]
    spec: Any  # pytree structure of (positional, named tensors)
    paths: list[str]  # readable path of each tensor input ("input_ids", "pixel_values[0]")
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    constants: dict[str, Any] = field(default_factory=dict)
    implied: frozenset[str] = frozenset()  # constants anefx chose (use_cache=False): a call may omit them
    positional: tuple[str, ...] = ()  # parameters the example filled by position

    @classmethod
    def of(cls, signature: inspect.Signature | None, args: tuple, kwargs: dict, input_names: list[str],
           positional: tuple[str, ...]) -> InputBinding:
        """From the canonical example (args, kwargs) the program was captured with."""
        tensors, constants = split_constants(kwargs)
        leaves, spec = pytree.tree_flatten_with_path((args, tensors))
        paths = list(input_names) if len(input_names) == len(leaves) else [_path(p) for p, _ in leaves]
        return cls(signature, list(input_names), spec, paths,
                   [tuple(t.shape) for _, t in leaves], [t.dtype for _, t in leaves], dict(constants),
                   positional=positional)

    def tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The call's tensors in input order, checked against what the program was compiled for."""
        positional, named = canonical(self.signature, args, kwargs, self.positional)
        tensors, constants = split_constants(named)
        self._check_constants(constants)
        leaves, spec = pytree.tree_flatten_with_path((positional, tensors))
        if spec != self.spec:
            given = ", ".join(_path(p) for p, _ in leaves) or "none"
            raise InvalidExampleError(
                f"the call passes tensors ({given}) where the program takes {self._expected()}; pass "
                "exactly the tensor arguments the model was compiled with (by position or by name).")
        return [self._checked(i, t) for i, (_, t) in enumerate(leaves)]

    def _check_constants(self, given: dict) -> None:
        params = self.signature.parameters if self.signature is not None else {}
        for name, compiled in self.constants.items():
            default = params[name].default if name in params else inspect.Parameter.empty
            if name not in given and name not in self.implied and not _same(default, compiled):
                raise InvalidExampleError(
                    f"the program was compiled with {name}={compiled!r}, which is baked into it, and this call "
                    f"leaves it out (so the model would use {_default(default)}); pass {name}={compiled!r} "
                    f"explicitly, or compile again without it.")
        for name, value in given.items():
            if name in self.constants:
                compiled = self.constants[name]
            elif name in params and params[name].default is not inspect.Parameter.empty:
                compiled = params[name].default
            else:
                raise InvalidExampleError(
                    f"`{name}={value!r}` was not passed when the model was compiled, so the program does not "
                    f"use it; compile again with it in example_kwargs (e.g. {{{name!r}: {value!r}}}).")
            if not _same(value, compiled):
                raise InvalidExampleError(
                    f"`{name}={value!r}` differs from the value the program was compiled with "
                    f"({name}={compiled!r}), which is baked into it; call with {name}={compiled!r} (or leave "
                    f"it out), or compile again with {name}={value!r}.")

    def _checked(self, i: int, t: Any) -> torch.Tensor:
        name, shape, dtype = self.paths[i], self.shapes[i], self.dtypes[i]
        if not isinstance(t, torch.Tensor):
            raise InvalidExampleError(f"input `{name}` is a {type(t).__name__}; pass a tensor of shape "
                                      f"{shape} and dtype {_dtype(dtype)}.")
        if tuple(t.shape) != shape:
            raise InvalidExampleError(
                f"input `{name}` has shape {tuple(t.shape)}, but the program was compiled for {shape} (CoreML "
                "programs have static shapes); pass that shape, or compile again with an example of this one.")
        if t.is_floating_point() != dtype.is_floating_point or (t.dtype == torch.bool) != (dtype == torch.bool):
            raise InvalidExampleError(f"input `{name}` is {_dtype(t.dtype)}, but the program takes "
                                      f"{_dtype(dtype)}; pass a {_dtype(dtype)} tensor.")
        check_representable(name, t)
        return t

    def _expected(self) -> str:
        return ", ".join(f"{p} {s} {_dtype(d)}" for p, s, d in zip(self.paths, self.shapes, self.dtypes,
                                                                   strict=True)) or "no tensors"


def int32_outlier(t: torch.Tensor) -> int | None:
    """A value of an int64 tensor outside int32 (what CoreML programs take), or None when all fit."""
    if t.dtype != torch.int64 or not t.numel():
        return None
    lo, hi = int(t.min()), int(t.max())
    if hi > _INT32.max:
        return hi
    return lo if lo < _INT32.min else None


def check_representable(name: str, t: torch.Tensor) -> None:
    """CoreML takes int32 for integer inputs and float32 at most for float inputs: a value outside those
    types is an error (it would silently change), a float64 input is narrowed with a notice."""
    if (bad := int32_outlier(t)) is not None:
        raise InvalidExampleError(
            f"input `{name}` holds {bad}, outside the int32 range CoreML programs take (±2147483647); "
            "integer inputs are passed as int32, so this value would change. Pass values within int32 "
            "(or a float tensor for large numbers).")
    if t.dtype == torch.float64:
        finite = t[torch.isfinite(t)]
        if finite.numel() and float(finite.abs().max()) > _FP32_MAX:
            raise InvalidExampleError(f"input `{name}` holds {float(finite.abs().max()):.3g}, beyond float32's "
                                      "range; CoreML takes float32 at most. Scale the input into float32's range.")
        warnings.warn(f"input `{name}` is float64; CoreML takes float32 (and computes in the program's "
                      "precision), so it is narrowed to float32. Pass float32 to silence this notice.",
                      NarrowingNotice, stacklevel=4)


def _path(path: tuple) -> str:
    """'args[0]' for a positional tensor, 'input_ids' or 'pixel_values[1]' for a named one."""
    part, rest = path[0].idx, path[1:]
    if part == 0:
        return f"args{pytree.keystr(rest)}"
    head = rest[0]
    return f"{getattr(head, 'key', head)}{pytree.keystr(rest[1:])}"


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _default(default: Any) -> str:
    return "no value" if default is inspect.Parameter.empty else f"its default, {default!r}"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
