"""The Core AI target: the rewritten ExportedProgram → a Core AI model (.aimodel), through coreai-torch.

The program is decomposed with coreai-torch's own table (it keeps the ops Core AI lowers whole: SDPA, SiLU…),
then converted. anefx's custom ops lower through the converter's registry (`register_torch_lowering`, one
converter per call, nothing global): `anefx::layer_norm` becomes Core AI's `layer_norm` composite over the
op's own axis (channels, in the ANE's (B, C, 1, S) layout), `anefx::output_copy` the value itself (Core AI names
outputs in the graph's signature, so no copy is needed) and `anefx::slice_write` a `slice_update`. The split-head
einsums decompose into per-head batched matmuls.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import platform
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import ExportedProgram

from anefx.errors import AnefxError, LoweringError, short_reason
from anefx.lower.target import CannotRunError, LoweringOptions, TargetUnavailableError

SUFFIX = ".aimodel"
ASSET_MARKER = "metadata.json"  # every saved .aimodel folder has it
MIN_MACOS = 27


def require_coreai() -> Any:
    """The coreai_torch module, or TargetUnavailableError saying how to install it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its "validated with torch<=…" warning: anefx pins that torch
            import coreai_torch
    except ImportError as exc:
        raise TargetUnavailableError(
            "target='coreai' needs Apple's Core AI converter (coreai-torch), which is not installed "
            f"({short_reason(exc)}). Install it with: pip install 'anefx[coreai]' (Python 3.11+, Linux x86-64 "
            "or macOS), or compile with target='coreml'.") from exc
    return coreai_torch


@dataclass
class CoreAITarget:
    name: str = "coreai"
    suffix: str = SUFFIX

    def require(self) -> None:
        require_coreai()

    def check_output(self, path: str | Path) -> Path:
        from anefx.files import check_folder_target

        return check_folder_target(aimodel_path(path), ASSET_MARKER, "a Core AI model (.aimodel)")

    def figures(self, path: Path) -> dict[str, Any]:
        from anefx.lower.coreai_report import aimodel_report

        return aimodel_report(path).as_json()

    def lower(self, ep: ExportedProgram, *, input_names: list[str], output_names: list[str],
              options: LoweringOptions) -> CoreAIArtifact:
        return CoreAIArtifact(lower_coreai(ep, input_names, output_names), list(input_names), list(output_names))


TARGET = CoreAITarget()


def lower_coreai(ep: ExportedProgram, input_names: list[str], output_names: list[str],
                 state_names: list[str] | None = None) -> Any:
    """The Core AI program (an AIProgram) of `ep`, entry point `main`. `ep` itself is left as it is."""
    return convert_staged([("main", ep, input_names, output_names, state_names or [])])


def convert_staged(entries: list[tuple[str, ExportedProgram, list[str], list[str], list[str]]]) -> Any:
    """One AIProgram with an entry point per (name, program, inputs, outputs, states)."""
    coreai_torch = require_coreai()
    converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    register_anefx_ops(converter)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            for name, ep, inputs, outputs, states in entries:
                converter.add_exported_program(ep.run_decompositions(decompositions(coreai_torch)),
                                               input_names=inputs, output_names=outputs, state_names=states,
                                               entrypoint_name=name)
            return converter.to_coreai()
    except AnefxError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with what to do
        raise LoweringError(
            f"Core AI conversion failed: {short_reason(exc)}\n"
            "coreai-torch could not convert the rewritten program. Compile with target='coreml', or with "
            "rules=[] to see whether a rewrite is the cause; report the op named above if it is an anefx op.") \
            from exc


def decompositions(coreai_torch: Any) -> dict:
    """coreai-torch's table, with the per-head einsums as one batched matmul on rank-4 tensors."""
    table = coreai_torch.get_decomp_table()
    table[torch.ops.aten.einsum.default] = per_head_einsum
    return table


def per_head_einsum(equation: str, operands: list[torch.Tensor]) -> torch.Tensor:
    """An einsum of two rank-4 operands sharing two batch axes (batch and head) and contracting one: a matmul whose
    operands only move the batch axes to the front (a unit head axis moves for free). torch's own decomposition
    goes through rank-5 views at one token (decode). Other einsums decompose as torch does."""
    plan = _matmul_plan(equation, [t.dim() for t in operands])
    if plan is None:
        return torch.ops.aten.einsum.default.decompose(equation, operands)
    (left, left_order), (right, right_order), out_order = plan
    product = torch.matmul(operands[left].permute(left_order), operands[right].permute(right_order))
    return product.permute(out_order)


def _matmul_plan(equation: str, ranks: list[int]) -> tuple | None:
    """((left operand, its permutation), (right operand, its permutation), the output's permutation) or None."""
    inputs, _, out = equation.replace(" ", "").partition("->")
    terms = inputs.split(",")
    if len(terms) != 2 or ranks != [4, 4] or any(len(set(t)) != 4 for t in (*terms, out)) or "." in equation:
        return None
    batch = [c for c in out if c in terms[0] and c in terms[1]]
    contracted = [c for c in terms[0] if c in terms[1] and c not in out]
    free = [c for c in out if c not in batch]
    if len(batch) != 2 or len(contracted) != 1 or len(free) != 2 or {*free} & {*terms[0]} == {*free}:
        return None
    left = 0 if free[0] in terms[0] else 1  # the operand of the output's first free axis: rows of the product
    right = 1 - left
    rows, cols = (batch + [free[0], contracted[0]]), (batch + [contracted[0], free[1]])
    if free[1] not in terms[right]:
        return None
    result = batch + free
    return ((left, [terms[left].index(c) for c in rows]), (right, [terms[right].index(c) for c in cols]),
            [result.index(c) for c in out])


def register_anefx_ops(converter: Any) -> None:
    """Lowerings of anefx's custom ops, in this converter's own registry."""
    from anefx import ops  # noqa: F401 - the ops must be registered with torch

    converter.register_torch_lowering("anefx::layer_norm.default")(_layer_norm)
    converter.register_torch_lowering("anefx::output_copy.default")(_output_copy)
    converter.register_torch_lowering("anefx::slice_write.default")(_slice_write)


def _layer_norm(values_map: dict, node: torch.fx.Node, loc: Any) -> Any:
    """anefx::layer_norm(x, axis, weight, bias, eps) → Core AI's layer_norm composite with axes=[axis]; weight
    and bias broadcast along that axis."""
    from coreai._compiler.dialects import coreai
    from coreai._compiler.ir import Value
    from coreai_torch import generate_composite_decl

    x = values_map[node.args[0].name]
    axis, eps = node.args[1] % x.type.rank, float(node.args[4])
    shape = [1] * x.type.rank
    shape[axis] = x.type.shape[axis]
    dtype = np.float16 if "f16" in str(x.type.element_type) else np.float32

    def affine(arg: Any, fill: float) -> Any:
        if arg is None:
            return coreai.constant(np.full(shape, fill, dtype=dtype))
        return coreai.reshape(values_map[arg.name], coreai.constant(shape, dtype=np.int32))

    decl = generate_composite_decl(x.context, "layer_norm", ["input", "gamma", "beta"], ["output"],
                                   {"eps": eps, "axes": [axis], "version": 1})

    def layer_norm(input, gamma, beta):  # noqa: A002 - the composite's names
        mean = coreai.reduce_mean(input, [axis])
        centered = coreai.broadcasting_sub(input, mean)
        variance = coreai.reduce_mean(coreai.broadcasting_mul(centered, centered), [axis])
        rstd = coreai.rsqrt(coreai.broadcasting_add(variance, coreai.constant(eps, dtype=dtype)))
        return coreai.broadcasting_add(coreai.broadcasting_mul(coreai.broadcasting_mul(centered, rstd), gamma), beta)

    layer_norm.__annotations__ = dict.fromkeys(("input", "gamma", "beta", "return"), Value)  # read by coreai.graph
    composite = coreai.graph(private=True, no_inline=True, composite_decl=decl)(layer_norm)
    return composite(x, affine(node.args[2], 1.0), affine(node.args[3], 0.0))[0]


def _output_copy(values_map: dict, node: torch.fx.Node, loc: Any) -> Any:
    return values_map[node.args[0].name]


def _slice_write(values_map: dict, node: torch.fx.Node, loc: Any) -> Any:
    """anefx::slice_write(x, update, axis, start) → slice_update of the block at `start` along `axis`."""
    from coreai._compiler.dialects import coreai

    x, update = values_map[node.args[0].name], values_map[node.args[1].name]
    axis, start = node.args[2] % x.type.rank, values_map[node.args[3].name]
    start = coreai.reshape(coreai.cast(start, _int32()), coreai.constant([1], dtype=np.int32))
    pieces = [coreai.constant(np.zeros(n, dtype=np.int32)) for n in (axis, x.type.rank - axis - 1)]
    begin = coreai.concat(0, [v for v, n in zip((pieces[0], start, pieces[1]),
                                                 (axis, 1, x.type.rank - axis - 1), strict=True) if n])
    end = coreai.broadcasting_add(begin, coreai.constant(np.array(update.type.shape, dtype=np.int32)))
    strides = coreai.constant(np.ones(x.type.rank, dtype=np.int32))
    return coreai.slice_update(x, begin, end, strides, update)


def _int32() -> Any:
    from coreai._compiler.ir import IntegerType

    return IntegerType.get_signed(32)


@dataclass
class CoreAIArtifact:
    """A converted Core AI program: saves as a .aimodel folder; runs where Core AI does (macOS 27)."""

    program: Any
    input_names: list[str]
    output_names: list[str]
    suffix: str = SUFFIX
    _saved: Path | None = field(default=None, repr=False)

    def save(self, path: str | Path) -> Path:
        """Write the .aimodel folder (the suffix is added when missing), atomically: an earlier .aimodel there
        is replaced once the new one is complete; anything else there is refused (FileWriteError)."""
        from anefx.files import atomic_folder_write

        target = aimodel_path(path)

        written = atomic_folder_write(target, self.program.save_asset, ASSET_MARKER, "a Core AI model (.aimodel)")
        self._saved = written
        return written

    def report(self) -> dict[str, Any]:
        """The structural figures of the saved program (anefx.lower.coreai_report), as one JSON-ready dict."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="anefx-") as folder:
            return TARGET.figures(self.save(Path(folder) / f"model{SUFFIX}"))

    def can_run(self) -> bool:
        return can_run_coreai()

    def predict(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the saved .aimodel with Core AI's runtime (macOS 27 and later); CannotRunError elsewhere."""
        if not self.can_run():
            raise CannotRunError(cannot_run_message())
        if self._saved is None or not self._saved.exists():
            import tempfile

            self.save(Path(tempfile.mkdtemp(prefix="anefx-")) / f"model{SUFFIX}")
        return asyncio.run(_run_asset(self._saved, feed, self.output_names))


async def _run_asset(path: Path, feed: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
    from coreai.runtime import AIModel, NDArray

    model = await AIModel.load(path)
    function = model.load_function("main")
    results = await function({name: NDArray(np.ascontiguousarray(value)) for name, value in feed.items()})
    return {name: np.asarray(results[name].numpy()) for name in output_names}


def can_run_coreai() -> bool:
    """Core AI's runtime loads models on macOS 27 and later (not on Linux, not on older macOS)."""
    if sys.platform != "darwin":
        return False
    major = platform.mac_ver()[0].split(".")[0]
    return major.isdigit() and int(major) >= MIN_MACOS


def cannot_run_message() -> str:
    where = f"macOS {platform.mac_ver()[0]}" if sys.platform == "darwin" else platform.system()
    return (f"a Core AI model (.aimodel) runs on macOS / iOS {MIN_MACOS} and later only; this is {where}. "
            "c.save('model.aimodel') still writes it, and `anefx report model.aimodel` shows its program. To "
            "check numbers here, run the rewritten program in torch (c.rewritten.module()(...)) or compile "
            "with target='coreml' (anefx's MIL interpreter runs a .mlpackage on any OS).")


def aimodel_path(path: str | Path) -> Path:
    """`path` with the .aimodel suffix (added when missing)."""
    path = Path(path)
    return path if path.suffix == SUFFIX else path.with_suffix(SUFFIX)
