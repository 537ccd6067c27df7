"""The kernel registry and the context a kernel runs in.

A kernel is a function `kernel(ctx, **arguments)` registered under one or more MIL op types. Its
keyword arguments are the op's arguments (numpy arrays, Python str, or tuples for variadic ones); the
op's optional arguments that a program leaves out take the kernel's Python defaults, which follow the
MIL op reference (coremltools `mil/ops/defs/iOS15..iOS18`). Float arrays reach a kernel as float32;
the interpreter rounds and casts what the kernel returns to the op's declared output type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anefx.mil.errors import MilRuntimeError
from anefx.mil.reader import Operation

Kernel = Callable[..., Any]
KERNELS: dict[str, Kernel] = {}
VARIADIC_ARGUMENTS = frozenset({"values"})  # arguments bound to a tuple of values (concat, einsum)


def kernel(*op_types: str) -> Callable[[Kernel], Kernel]:
    def register(fn: Kernel) -> Kernel:
        for op_type in op_types:
            KERNELS[op_type] = fn
        return fn

    return register


@dataclass(frozen=True)
class StateRef:
    """The value bound to a state input: a handle kernels use to read and write `ctx.states`."""
    name: str


@dataclass
class OpContext:
    op: Operation
    precision: str  # "fp32" or "fp16"
    opset_version: int  # 15..18 (iOS)
    states: dict[str, np.ndarray] = field(default_factory=dict)

    def round(self, x: np.ndarray) -> np.ndarray:
        """An intermediate result of a fused op as the fp16 program holds it (identity in fp32)."""
        if self.precision == "fp16" and x.dtype.kind == "f":
            return x.astype(np.float16).astype(np.float32)
        return x

    def error(self, message: str) -> MilRuntimeError:
        return MilRuntimeError(f"{self.op.type} {self.op.name!r}: {message}")


def as_int(value: Any) -> int:
    return int(np.asarray(value).reshape(-1)[0])


def as_ints(value: Any) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1)]


def as_bools(value: Any, n: int) -> list[bool]:
    return [False] * n if value is None else [bool(v) for v in np.asarray(value).reshape(-1)]


def as_float(value: Any) -> float:
    return float(np.asarray(value).reshape(-1)[0])
