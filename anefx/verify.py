"""Verify a saved .mlpackage against the PyTorch model it came from, on any OS.

The package is run by anefx's MIL interpreter (anefx.mil), the model in torch, on the same inputs;
per output: max absolute error, max relative error (to the reference's largest magnitude), PSNR and
the count of non-finite values. `package_verdict` turns them into a verdict: it fails when an output
has a nan or inf, when its PSNR is below the bar (40 dB when fp16 is involved, 80 dB for an fp32 program
run in fp32), when an element misses the elementwise tolerance |actual − ref| ≤ atol + rtol·|ref| (only
when rtol or atol is given), or when the weights fingerprint the package records differs from the
model's: "the package was built from other weights than this model".
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from anefx.capture import default_kwargs
from anefx.errors import InvalidExampleError

MIN_PSNR_FP16 = 40.0  # dB: an fp16 program (or fp16 emulation) against the fp32 model
MIN_PSNR_FP32 = 80.0  # dB: an fp32 program run in fp32 (anefx's zoo reaches ~130 dB)
WEIGHTS_DIFFER = "the package was built from other weights than this model"


@dataclass(frozen=True)
class Criteria:
    """When a package passes. min_psnr None: the default for the precisions involved. The elementwise
    check |actual − ref| ≤ atol + rtol·|ref| runs when rtol or atol is given (the other one is then 0)."""

    min_psnr: float | None = None
    rtol: float | None = None
    atol: float | None = None

    @property
    def elementwise(self) -> bool:
        return self.rtol is not None or self.atol is not None


@dataclass
class OutputCheck:
    name: str
    error: Any  # anefx.mil.ErrorReport: max_abs, max_rel, psnr_db
    size: int
    non_finite: int  # nan or inf values in the package's output
    outside: int | None = None  # elements outside atol + rtol·|ref|; None when not checked
    worst: tuple[float, float] | None = None  # (package value, model value) of the element furthest outside


@dataclass
class Verdict:
    outputs: list[OutputCheck]
    min_psnr: float
    weights: str  # "same", "other" or "unrecorded" (the package records no fingerprint)
    reasons: list[str]  # why it fails; empty when it passes

    @property
    def passed(self) -> bool:
        return not self.reasons


def verify_package(path: str | Path, model: torch.nn.Module, args: tuple, kwargs: dict,
                   precision: str = "fp16") -> dict[str, Any]:
    """{output name: ErrorReport} of the package at `path` against `model(*args, **kwargs)`."""
    from anefx.mil import compare, load_mlpackage

    runner = load_mlpackage(path, precision=precision)
    actual, expected = _run(runner, model, args, kwargs)
    return {name: compare(actual[name], ref) for name, ref in expected.items()}


def package_verdict(path: str | Path, model: torch.nn.Module, args: tuple, kwargs: dict,
                    precision: str = "fp16", criteria: Criteria = Criteria()) -> Verdict:
    """Run the package and the model on the same inputs and judge: see the module docstring."""
    from anefx.mil import load_mlpackage

    runner = load_mlpackage(path, precision=precision)
    actual, expected = _run(runner, model, args, kwargs)
    min_psnr = criteria.min_psnr if criteria.min_psnr is not None else default_min_psnr(runner)
    outputs = [check_output(name, actual[name], ref, criteria) for name, ref in expected.items()]
    weights = weights_match(path, model)
    reasons = [f"{WEIGHTS_DIFFER} (the weights fingerprint it records differs): pass the model it was "
               "compiled from, or compile this model again"] if weights == "other" else []
    reasons += [r for out in outputs for r in output_failures(out, min_psnr, criteria)]
    return Verdict(outputs, min_psnr, weights, reasons)


def check_output(name: str, actual: Any, reference: torch.Tensor, criteria: Criteria) -> OutputCheck:
    from anefx.mil import compare

    a = np.asarray(actual, dtype=np.float64)
    ref = reference.detach().cpu().double().numpy()
    out = OutputCheck(name, compare(a, ref), int(a.size), int(a.size - np.count_nonzero(np.isfinite(a))))
    if criteria.elementwise:
        diff, bound = np.abs(a - ref), (criteria.atol or 0.0) + (criteria.rtol or 0.0) * np.abs(ref)
        bad = ~(diff <= bound)  # a nan is outside
        out.outside = int(np.count_nonzero(bad))
        if out.outside:
            index = int(np.argmax(np.where(bad, np.nan_to_num(diff - bound, nan=np.inf), -np.inf)))
            out.worst = (float(a.flat[index]), float(ref.flat[index]))
    return out


def output_failures(out: OutputCheck, min_psnr: float, criteria: Criteria) -> list[str]:
    if out.non_finite:
        return [f"{out.name}: {out.non_finite} of {out.size} values are not finite (nan or inf)"]
    reasons = []
    if not out.error.psnr_db >= min_psnr:
        reasons.append(f"{out.name}: PSNR {out.error.psnr_db:.1f} dB is below {min_psnr:g} dB (--min-psnr)")
    if out.outside:
        got, want = out.worst
        reasons.append(f"{out.name}: {out.outside} of {out.size} values are outside atol + rtol·|ref| "
                       f"(atol={criteria.atol or 0:g}, rtol={criteria.rtol or 0:g}), e.g. {got:.6g} where "
                       f"the model gives {want:.6g}")
    return reasons


def default_min_psnr(runner: Any) -> float:
    """40 dB when the program holds fp16 values or is run with fp16 emulation, else 80 dB."""
    if runner.precision == "fp16":
        return MIN_PSNR_FP16
    program = runner.program
    fp16 = any(getattr(v, "dtype", None) == np.float16 for v in program.constants.values()) or any(
        t is not None and t.dtype == np.float16 for op in program.operations for _, t in op.outputs)
    return MIN_PSNR_FP16 if fp16 else MIN_PSNR_FP32


def weights_match(path: str | Path, model: torch.nn.Module) -> str:
    """'same' or 'other' against the fingerprint the package records; 'unrecorded' when it has none."""
    from anefx.mlpackage import WEIGHTS_KEY, module_weights_sha256, package_metadata

    recorded = package_metadata(path).get(WEIGHTS_KEY)
    if recorded is None:
        return "unrecorded"
    return "same" if recorded == module_weights_sha256(model) else "other"


def _run(runner: Any, model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """(package outputs, model outputs by the package's output names) on the same inputs."""
    feed = _feed(model, args, kwargs, runner.input_names)
    call_kwargs = default_kwargs(model, kwargs, [])  # as anefx.compile captured it (use_cache=False)
    was_training = model.training
    try:
        with torch.no_grad():
            outputs = model.eval()(*args, **call_kwargs)
    finally:
        model.train(was_training)  # the user's model is left as it was
    expected = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    if len(expected) != len(runner.output_names):
        raise InvalidExampleError(f"the model returns {len(expected)} tensors but the package has "
                                  f"{len(runner.output_names)} outputs ({', '.join(runner.output_names)}): "
                                  "pass the model and inputs the package was compiled from.")
    return runner(**feed), dict(zip(runner.output_names, expected, strict=True))


def _feed(model: torch.nn.Module, args: tuple, kwargs: dict, names: list[str]) -> dict[str, Any]:
    params = [*inspect.signature(model.forward).parameters]
    given = {**dict(zip(params, args, strict=False)), **kwargs}
    missing = [n for n in names if n not in given]
    if missing:
        raise InvalidExampleError(f"the package needs inputs {', '.join(names)}; no example for "
                                  f"{', '.join(missing)}. Pass --example NAME:SHAPE[:DTYPE] for each.")
    return {n: given[n] for n in names}
