"""Run a MIL program in numpy: `MilRunner(program, precision)(**inputs) -> {output name: array}`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from anefx.mil import ops_elementwise, ops_gather, ops_linear, ops_norm, ops_state, ops_tensor  # noqa: F401
from anefx.mil.errors import MilError, MilInputError, MilRuntimeError, UnsupportedOpError
from anefx.mil.reader import Literal, Operation, Program, TensorType
from anefx.mil.registry import KERNELS, VARIADIC_ARGUMENTS, Kernel, OpContext, StateRef

PRECISIONS = ("fp32", "fp16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        from anefx.errors import OptionError

        raise OptionError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}.")


@dataclass
class _Step:
    op: Operation
    kernel: Kernel
    ctx: OpContext


class MilRunner:
    """A loaded program, callable with its inputs by name (or positionally, in `input_names` order)."""

    def __init__(self, program: Program, precision: str = "fp32", states: dict[str, np.ndarray] | None = None):
        """`states`: a dict shared with other runners (e.g. the functions of one multifunction package,
        which read and write the same state buffers); a fresh one when None."""
        check_precision(precision)
        self.program = program
        self.precision = precision
        self.float_dtype = np.dtype(np.float16 if precision == "fp16" else np.float32)
        self.input_names = [name for name, _ in program.inputs]
        self.output_names = list(program.outputs)
        self.state_names = [name for name, _ in program.states]
        self.states: dict[str, np.ndarray] = {} if states is None else states
        if states is None or any(name not in states for name, _ in program.states):
            self.reset_states()
        self._constants = {name: self._stored_constant(v) for name, v in program.constants.items()}
        self._constants.update({name: StateRef(name) for name in self.state_names})
        self._steps = [self._step(op) for op in program.operations]
        self._fold_constexpr()
        self._output_types = dict(output_types(program))

    def reset_states(self) -> None:
        """Every state buffer of this program back to zeros (other entries of a shared dict stay)."""
        for name, ttype in self.program.states:
            self.states[name] = np.zeros(ttype.shape, self._storage_dtype(ttype))

    def __call__(self, *args: Any, **inputs: Any) -> dict[str, np.ndarray]:
        return self.run(self._feed(args, inputs))

    def run(self, feed: dict[str, np.ndarray],
            observe: Callable[[Operation, dict[str, Any]], None] | None = None) -> dict[str, np.ndarray]:
        """Run on already-checked inputs (`_feed`); `observe(op, env)` is called after each op, with
        `env` holding every value computed so far by name (to find, e.g., the first op that overflows)."""
        env = dict(self._constants)
        env.update(feed)
        for step in self._steps:
            self._run(step, env)
            if observe is not None:
                observe(step.op, env)
        return {name: self._export(name, env[name]) for name in self.output_names}

    def feed(self, *args: Any, **inputs: Any) -> dict[str, Any]:
        """The inputs as the program takes them (checked and cast), for `run`."""
        return self._feed(args, inputs)

    # -- loading ---------------------------------------------------------------------------------------
    def _step(self, op: Operation) -> _Step:
        fn = KERNELS.get(op.type)
        if fn is None:
            unknown = sorted({o.type for o in self.program.operations if o.type not in KERNELS})
            raise UnsupportedOpError(
                f"the MIL interpreter has no kernel for op {op.type!r} (output {op.name!r}); unsupported "
                f"in this program: {', '.join(unknown)}. Change the model so it does not lower to this op, "
                "or add a kernel to anefx/mil/ops_*.py (see anefx.mil.SUPPORTED_OPS).")
        return _Step(op, fn, OpContext(op, self.precision, self.program.opset_version, self.states))

    def _fold_constexpr(self) -> None:
        """Compressed weights (constexpr_* ops read constants alone) are decompressed once, at load."""
        for step in [s for s in self._steps if s.op.type.startswith("constexpr_")]:
            self._run(step, self._constants)
        self._steps = [s for s in self._steps if not s.op.type.startswith("constexpr_")]

    def _storage_dtype(self, ttype: TensorType | None) -> np.dtype | None:
        if ttype is None:
            return None
        return self.float_dtype if ttype.is_float else ttype.dtype

    def _stored_constant(self, value: Any) -> Any:
        """A weight in the program's precision, as stored (a view of the weight file when it already is): it
        is widened to float32 only while an op reads it, so a runner never holds a float32 copy of all
        weights (a 1B model's two functions held two)."""
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            return value.astype(self.float_dtype, copy=False)
        return value

    # -- running ---------------------------------------------------------------------------------------
    def _run(self, step: _Step, env: dict[str, Any]) -> None:
        op = step.op
        try:
            args = {name: self._argument(name, bindings, env) for name, bindings in op.inputs.items()}
            result = step.kernel(step.ctx, **args)
        except MilError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised naming the op
            raise MilRuntimeError(f"{op.type} {op.name!r} failed in the MIL interpreter: "
                                  f"{type(exc).__name__}: {exc}") from exc
        results = result if isinstance(result, tuple | list) else (result,)
        if len(results) != len(op.outputs):
            raise MilRuntimeError(f"{op.type} {op.name!r}: kernel returned {len(results)} values for "
                                  f"{len(op.outputs)} outputs (an interpreter bug).")
        for (name, ttype), value in zip(op.outputs, results, strict=True):
            env[name] = self._store(op, name, ttype, value)

    def _argument(self, name: str, bindings: list[str | Literal], env: dict[str, Any]) -> Any:
        values = [self._to_kernel(b.value if isinstance(b, Literal) else env[b]) for b in bindings]
        if name in VARIADIC_ARGUMENTS:
            return tuple(values)
        return values[0]

    def _to_kernel(self, value: Any) -> Any:
        """Kernels see float arrays as float32, whatever precision they are stored in."""
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.dtype != np.float32:
            return value.astype(np.float32)
        return value

    def _store(self, op: Operation, name: str, ttype: TensorType | None, value: Any) -> Any:
        value = np.asarray(value)
        dtype = self._storage_dtype(ttype)
        if ttype is not None and ttype.shape is not None and not _shape_matches(value.shape, ttype.shape):
            raise MilRuntimeError(f"{op.type} {op.name!r}: output {name!r} has shape {value.shape}, the "
                                  f"program declares {ttype.shape} (a kernel bug, or a shape coremltools "
                                  "inferred wrongly).")
        stored = value if dtype is None else value.astype(dtype, copy=False)
        return self._to_kernel(stored) if self.precision == "fp16" else stored

    # -- inputs and outputs ----------------------------------------------------------------------------
    def _feed(self, args: tuple, inputs: dict[str, Any]) -> dict[str, Any]:
        if args:
            if len(args) > len(self.input_names):
                raise MilInputError(f"got {len(args)} positional inputs; the program takes "
                                    f"{len(self.input_names)}: {self._signature()}.")
            inputs = {**dict(zip(self.input_names, args, strict=False)), **inputs}
        for name in [n for n in inputs if n in self.states]:
            ttype = dict(self.program.states)[name]
            self.states[name] = _as_numpy(inputs.pop(name)).astype(self._storage_dtype(ttype))
        missing = [n for n in self.input_names if n not in inputs]
        unknown = [n for n in inputs if n not in self.input_names]
        if missing or unknown:
            raise MilInputError(f"inputs do not match the program (missing: {', '.join(missing) or '-'}; "
                                f"unknown: {', '.join(unknown) or '-'}); pass {self._signature()}.")
        return {name: self._input(name, ttype, inputs[name]) for name, ttype in self.program.inputs}

    def _input(self, name: str, ttype: TensorType, value: Any) -> np.ndarray:
        array = _as_numpy(value)
        if ttype.shape is not None and not _shape_matches(array.shape, ttype.shape):
            raise MilInputError(f"input {name!r} has shape {array.shape}; the program expects "
                                f"{ttype.shape}. Pass an input of that shape (or recompile for it).")
        if ttype.dtype.kind in "iu" and array.dtype.kind in "iu":
            info = np.iinfo(ttype.dtype)
            if array.size and (array.min() < info.min or array.max() > info.max):
                raise MilInputError(f"input {name!r} holds values outside the range of {ttype.dtype}, "
                                    "the program's input type.")
        stored = array.astype(self._storage_dtype(ttype))
        return self._to_kernel(stored) if self.precision == "fp16" else stored

    def _export(self, name: str, value: Any) -> np.ndarray:
        declared = self._output_types.get(name)
        value = np.asarray(value)
        if declared is not None and declared.is_float:
            return value.astype(declared.dtype if self.precision == "fp16" else np.float32)
        return value

    def _signature(self) -> str:
        return ", ".join(f"{n}: {t.dtype} {t.shape}" for n, t in self.program.inputs)


def output_types(program: Program) -> list[tuple[str, TensorType | None]]:
    produced = {name: ttype for op in program.operations for name, ttype in op.outputs}
    produced.update(dict(program.inputs))
    return [(name, produced.get(name)) for name in program.outputs]


def _shape_matches(actual: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    if len(actual) != len(declared):
        return False
    return all(d < 0 or a == d for a, d in zip(actual, declared, strict=True))


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)
