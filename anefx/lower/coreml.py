"""The Core ML target: ExportedProgram → CoreML ML program (.mlpackage), and reading back what was produced."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import ExportedProgram

from anefx.errors import LoweringError, OptionError

COMPUTE_UNITS = ("CPU_AND_NE", "ALL", "CPU_ONLY", "CPU_AND_GPU")
NEURAL_ENGINE_UNITS = ("CPU_AND_NE", "ALL")
PRECISIONS = ("fp16", "fp32")
TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")
ATTENTION = ("split_heads", "sdpa")


def check_options(compute_units: str, deployment_target: str, precision: str,
                  attention: str = "split_heads") -> None:
    for value, allowed, what in ((compute_units, COMPUTE_UNITS, "compute_units"),
                                 (deployment_target, TARGETS, "deployment_target"),
                                 (precision, PRECISIONS, "precision"), (attention, ATTENTION, "attention")):
        if value not in allowed:
            raise OptionError(f"{what}={value!r} is not one of {', '.join(allowed)}.")


def _quiet_coremltools():
    # coremltools logs its untested-torch warning and missing native proxies at import (see
    # `anefx doctor`), and draws tqdm bars on stderr during conversion; anefx reports its own progress
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools as ct

    return ct


def lower(ep: ExportedProgram, *, input_names: list[str], output_names: list[str],
          compute_units: str = "CPU_AND_NE", deployment_target: str = "iOS18",
          precision: str = "fp16", load: bool | None = None) -> Any:
    """Convert with coremltools. int64 inputs become int32 (CoreML has no int64 input)."""
    ct = _quiet_coremltools()
    from anefx import ops  # noqa: F401 - registers the converters of anefx's custom ops

    ep = distinct_outputs(ep)
    inputs = [_input_type(ct, name, node) for name, node in _user_placeholders(ep, input_names)]
    outputs = [ct.TensorType(name=name) for name in output_names]
    load = _can_run_coreml() if load is None else load
    token = _OUTPUT_NAMES.set(list(output_names))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return ct.convert(
                ep, convert_to="mlprogram", inputs=inputs, outputs=outputs,
                minimum_deployment_target=getattr(ct.target, deployment_target),
                compute_units=getattr(ct.ComputeUnit, compute_units),
                compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                pass_pipeline=_pass_pipeline(ct, precision), skip_model_load=not load)
    except Exception as exc:  # noqa: BLE001 - re-raised with the op and what to do
        raise LoweringError(lowering_message(exc, ep)) from exc
    finally:
        _OUTPUT_NAMES.reset(token)


def distinct_outputs(ep: ExportedProgram) -> ExportedProgram:
    """A program whose outputs are no inputs: an input returned as an output gets a copy
    (`anefx::output_copy`, a MIL identity), since coremltools would rename the input itself. Repeated
    outputs are kept apart by the `anefx::distinct_outputs` pass: one package output per name."""
    outputs = list(ep.graph_module.graph.output_node().args[0])
    if not any(isinstance(n, torch.fx.Node) and n.op == "placeholder" for n in outputs):
        return ep
    from anefx.graph import finish, snapshot

    ep = snapshot(ep)
    graph = ep.graph_module.graph
    output = graph.output_node()
    outputs = list(output.args[0])
    for i, node in enumerate(outputs):
        if isinstance(node, torch.fx.Node) and node.op == "placeholder":
            with graph.inserting_before(output):
                outputs[i] = graph.call_function(torch.ops.anefx.output_copy.default, (node,))
            outputs[i].meta["val"] = node.meta.get("val")
    output.args = (tuple(outputs),)
    finish(ep)
    return ep


_OUTPUT_NAMES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("anefx_output_names",
                                                                                 default=None)
OUTPUTS_PASS = "anefx::distinct_outputs"


@functools.cache
def _register_outputs_pass() -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.pass_registry import register_pass

    @register_pass(namespace="anefx")
    class distinct_outputs(AbstractGraphPass):  # noqa: N801 - coremltools names passes in snake case
        """Give each output of `main` its own variable, named as the user's output (coremltools' cleanup
        passes fold a copied output back into the value it copies, and one variable has one name)."""

        def apply(self, prog):
            names = _OUTPUT_NAMES.get()
            func = prog.functions.get("main")
            if names is None or func is None or len(names) != len(func.outputs):
                return
            outputs, seen = list(func.outputs), set()
            for i, var in enumerate(outputs):
                if id(var) in seen:
                    with func, mb.scope(*_scopes_of(var)):
                        outputs[i] = mb.identity(x=var, name=names[i])
                seen.add(id(var))
            if len(seen) != len(outputs) or outputs != list(func.outputs):
                for var, name in zip(outputs, names, strict=True):
                    var.name = name
                func.set_outputs(outputs)


_CHUNK = 1 << 20  # elements per block when scanning a weight
FP16_PASS = "anefx::lean_fp16_cast"


def _scopes_of(var) -> list:
    """The scope of the op that made `var` (coremltools checks that every op of an exported program
    has one)."""
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

    scopes = var.op.scopes if var.op is not None else {}
    return [ScopeInfo(source=source, data=list(scopes.get(source) or [var.name]))
            for source in (ScopeSource.EXIR_STACK_TRACE, ScopeSource.EXIR_DEBUG_HANDLE)]


def _pass_pipeline(ct, precision: str):
    """coremltools' default pipeline, its fp16 pass swapped for anefx's lean one (same casts).

    coremltools' `add_fp16_cast` indexes every fp32 constant with `np.where` to look for fp16
    overflow (int64 index arrays: 24 bytes per weight element, ~1.5 GB for a 32000×2048 embedding —
    the peak of a plain 1.1B conversion) and copies each constant with `flatten()` only to count its
    elements. The registered subclass computes the same answers in bounded memory."""
    pipeline = ct.PassPipeline.DEFAULT
    _register_outputs_pass()
    pipeline.append_pass(OUTPUTS_PASS)
    if precision == "fp16":
        _register_lean_fp16_pass()
        names = list(pipeline.passes)
        index = names.index("common::add_fp16_cast")
        pipeline.remove_passes(["common::add_fp16_cast"])
        pipeline.insert_pass(index, FP16_PASS)
    return pipeline


@functools.cache
def _register_lean_fp16_pass() -> None:
    from coremltools.converters.mil.mil.passes.defs.quantization import add_fp16_cast
    from coremltools.converters.mil.mil.passes.pass_registry import register_pass

    @register_pass(namespace="anefx")
    class lean_fp16_cast(add_fp16_cast):  # noqa: N801 - coremltools names passes in snake case
        @staticmethod
        def fp16_overflow(op) -> bool:
            return _fp16_overflow(op)

        def _check_underflow_to_zero(self, new_var, var):
            if var.val is not None and np.size(var.val) >= 400:  # coremltools skips these too
                return None
            return super()._check_underflow_to_zero(new_var, var)


def _fp16_overflow(op) -> bool:
    """Whether an fp32 constant input of `op` holds a finite value fp16 cannot represent: some
    65504 < |v| < 1e38 (|v| ≥ 1e38 stands for infinity and may overflow), as coremltools decides."""
    for inputs in op.inputs.values():
        for var in inputs if isinstance(inputs, list | tuple) else [inputs]:
            if (var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32")
                    and _exceeds_fp16(var.op.val.val)):
                return True
    return False


def _exceeds_fp16(value: Any) -> bool:
    flat = np.ravel(value, order="K")  # a view for any contiguous layout, transposed ones included
    for start in range(0, flat.size, _CHUNK):
        block = np.abs(flat[start:start + _CHUNK])
        if np.any((block > 65504) & (block < 1e38)):
            return True
    return False


def _user_placeholders(ep: ExportedProgram, names: list[str]):
    by_name = {n.name: n for n in ep.graph_module.graph.nodes if n.op == "placeholder"}
    return [(name, by_name[name]) for name in names]


def _input_type(ct, name: str, node) -> Any:
    val = node.meta["val"]
    dtype = {torch.int64: np.int32, torch.int32: np.int32, torch.bool: bool,
             torch.float16: np.float16}.get(val.dtype, np.float32)
    return ct.TensorType(name=name, shape=tuple(int(d) for d in val.shape), dtype=dtype)


def lowering_message(exc: BaseException, ep: ExportedProgram) -> str:
    from anefx.errors import short_reason
    from anefx.partition import unconvertible_message

    if listed := unconvertible_message(ep):  # every node coremltools has no converter for, not only the first
        return listed
    first = short_reason(exc)
    unsupported = [n for n in ep.graph_module.graph.nodes
                   if n.op == "call_function" and _op_key(n) in first]
    where = ""
    if unsupported:
        from anefx.graph import module_path

        node = unsupported[0]
        where = f" node {node.name} (from {module_path(node) or 'the top-level module'})"
    return (f"coremltools could not lower{where or ' the program'}: {first}. Rewrite that operation in the "
            "model, or report it to anefx with the model's config so a rule can handle it.")


def _op_key(node) -> str:
    return str(node.target).split(".")[-2] if "." in str(node.target) else str(node.target)


def _can_run_coreml() -> bool:
    import sys

    return sys.platform == "darwin"


def mil_operations(mlmodel: Any) -> list[Any]:
    """Every MIL operation of the main function (nested blocks included)."""
    func = mlmodel._mil_program.functions["main"]
    ops: list[Any] = []

    def walk(block):
        for op in block.operations:
            ops.append(op)
            for inner in getattr(op, "blocks", []):
                walk(inner)

    walk(func)
    return ops


def mil_histogram(mlmodel: Any, include_const: bool = False) -> Counter:
    return Counter(op.op_type for op in mil_operations(mlmodel) if include_const or op.op_type != "const")


# -- the Core ML target in the lowering interface (anefx.lower.target) ----------------------------------------


@dataclass
class CoreMLArtifact:
    """A converted CoreML ML program: saves as a .mlpackage; runs in CoreML on macOS, in anefx's MIL
    interpreter elsewhere."""

    mlmodel: Any
    input_names: list[str]
    output_names: list[str]
    precision: str = "fp16"
    suffix: str = ".mlpackage"

    def save(self, path: str | Path) -> Path:
        from anefx.files import atomic_package_write, package_path

        return atomic_package_write(package_path(path), lambda staged: self.mlmodel.save(str(staged)))

    def report(self) -> dict[str, Any]:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="anefx-") as folder:
            return mlpackage_figures(self.save(Path(folder) / "model.mlpackage"))

    def can_run(self) -> bool:
        return True  # CoreML on macOS, the MIL interpreter elsewhere

    def predict(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if _can_run_coreml():
            result = self.mlmodel.predict(feed)
            return {name: np.asarray(result[name]) for name in self.output_names}
        import tempfile

        from anefx.mil import load_mlpackage

        with tempfile.TemporaryDirectory(prefix="anefx-") as folder:
            return load_mlpackage(self.save(Path(folder) / "model.mlpackage"), precision=self.precision)(**feed)


@dataclass
class CoreMLTarget:
    name: str = "coreml"
    suffix: str = ".mlpackage"

    def require(self) -> None:
        """coremltools is a dependency of anefx: always there."""

    def check_output(self, path: str | Path) -> Path:
        from anefx.files import check_package_target, package_path

        return check_package_target(package_path(path))

    def figures(self, path: Path) -> dict[str, Any]:
        return mlpackage_figures(path)

    def lower(self, ep: ExportedProgram, *, input_names: list[str], output_names: list[str], options: Any) -> Any:
        mlmodel = lower(ep, input_names=input_names, output_names=output_names, compute_units=options.compute_units,
                        deployment_target=options.deployment_target, precision=options.precision)
        return CoreMLArtifact(mlmodel, list(input_names), list(output_names), options.precision)


TARGET = CoreMLTarget()


def mlpackage_figures(path: str | Path) -> dict[str, Any]:
    """A saved .mlpackage's `anefx report --json` (anefx.package_report.report_json) with the structural figures
    a .aimodel's report has too (conv, linear, matmul — per-head einsums included —, softmax, max_rank)."""
    from anefx.package_report import package_report, report_json

    figures, report = report_json(path), package_report(path)
    ops = report.histogram
    softmax = Counter(t.shape for t in report.tensors if t.op == "softmax")
    return {**figures, "format": "mlpackage", "conv": ops["conv"], "linear": ops["linear"],
            "matmul": ops["matmul"] + ops["einsum"], "softmax": ops["softmax"],
            "softmax_shapes": [{"shape": list(s), "count": n} for s, n in softmax.items()],
            "max_rank": max(report.ranks, default=0)}
