"""After lowering: run the saved package on the example in anefx's MIL interpreter and compare it with
the model, at the program's own precision (fp16 emulated as on the device).

A model whose activations overflow fp16 (|x| > 65504) compiles fine and returns inf/NaN on device;
this finds that at compile time and names the first op whose output stopped being finite while its
inputs were finite, with the module it came from. The user chooses what happens: `package_check="warn"`
(the default) warns, `"raise"` raises `PrecisionError`, `"skip"` does not run the check.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.export import ExportedProgram

from anefx.errors import AnefxError

CHECKS = ("warn", "raise", "skip")
MIN_PSNR = {"fp16": 35.0, "fp32": 80.0}  # dB: fp16 programs measure 60–85 dB on the test zoo, fp32 > 120


class PrecisionError(AnefxError):
    """The lowered program's outputs on the example are not finite, or too far from the model's."""


class PrecisionWarning(UserWarning):
    """The lowered program's outputs on the example are not finite, or too far from the model's."""


@dataclass
class PackageCheck:
    """What the package computed on the example, against the model, at `precision`."""

    precision: str
    psnr_db: dict[str, float] = field(default_factory=dict)
    not_finite: list[str] = field(default_factory=list)  # outputs with inf/NaN where the model has none
    first_overflow: str = ""  # "op `pow` (module model.layers.0.mlp, node pow_0)" when one was found
    min_psnr: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.not_finite and all(v >= self.min_psnr for v in self.psnr_db.values())

    def message(self) -> str:
        low = {k: v for k, v in self.psnr_db.items() if v < self.min_psnr and k not in self.not_finite}
        problems = []
        if self.not_finite:
            problems.append(f"output(s) {', '.join(self.not_finite)} hold inf/NaN where the model's are finite")
        if low:
            problems.append("PSNR " + ", ".join(f"{k} {v:.1f} dB" for k, v in low.items())
                            + f" is below {self.min_psnr:g} dB")
        where = f" The first op whose {self.precision} output overflows: {self.first_overflow}." \
            if self.first_overflow else ""
        advice = ("Compile with precision='fp32' (the Neural Engine runs fp16 only, so that program runs on "
                  "the GPU/CPU), or keep that module's activations within ±65504 (e.g. a norm or a scale before "
                  "it)." if self.precision == "fp16" else
                  "This is a lowering bug: please report the model to anefx.")
        return (f"the lowered {self.precision} program does not compute what the model does on the example: "
                f"{'; '.join(problems)}.{where} {advice} (package_check='skip' silences this check; 'raise' "
                "makes it an error.)")


def check_package(runner: Any, feed: dict[str, np.ndarray], reference: list[torch.Tensor],
                  ep: ExportedProgram, min_psnr: float | None = None) -> PackageCheck:
    """Run `runner` (an anefx.mil MilRunner) on `feed` and compare its outputs with `reference`."""
    from anefx.mil import compare

    overflow: list[str] = []

    def observe(op, env) -> None:
        if overflow or op.type == "const":
            return
        outputs = [env.get(name) for name, _ in op.outputs]
        if not any(_not_finite(v) for v in outputs):
            return
        inputs = [env.get(b) for bound in op.inputs.values() for b in bound if isinstance(b, str)]
        if not any(_not_finite(v) for v in inputs):
            overflow.append(_describe(op, ep))

    with np.errstate(all="ignore"):  # overflow is what is being looked for
        actual = runner.run(feed, observe)
    result = PackageCheck(runner.precision, first_overflow=overflow[0] if overflow else "",
                          min_psnr=MIN_PSNR[runner.precision] if min_psnr is None else min_psnr)
    for name, ref in zip(runner.output_names, reference, strict=True):
        got = np.asarray(actual[name])
        want = ref.detach().float().numpy() if ref.is_floating_point() else ref.detach().numpy()
        if got.dtype.kind != "f" or want.dtype.kind != "f":
            result.psnr_db[name] = float("inf") if np.array_equal(got, want) else 0.0
            continue
        if not np.isfinite(got).all() and np.isfinite(want).all():
            result.not_finite.append(name)
        result.psnr_db[name] = float(compare(got, ref).psnr_db)
    return result


def report(result: PackageCheck, mode: str) -> None:
    if result.ok or mode == "skip":
        return
    if mode == "raise":
        raise PrecisionError(result.message())
    warnings.warn(result.message(), PrecisionWarning, stacklevel=3)


def _not_finite(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all()


def _describe(op, ep: ExportedProgram) -> str:
    """The op type, and the module of the torch node it was lowered from (MIL op names start with the
    node's name)."""
    from anefx.graph import module_path

    nodes = {n.name: n for n in ep.graph_module.graph.nodes if n.op == "call_function"}
    names = [name for name, _ in op.outputs] + [op.name]
    node = None
    for candidate in names:
        prefixes = [n for n in nodes if candidate == n or candidate.startswith(n + "_")]
        if prefixes:
            node = nodes[max(prefixes, key=len)]
            break
    if node is None:
        return f"`{op.type}` (MIL op {op.name})"
    return f"`{op.type}` (MIL op {op.name}, from {module_path(node) or 'the top-level module'}, node {node.name})"
