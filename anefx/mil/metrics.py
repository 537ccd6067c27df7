"""How far an output is from its reference: max absolute error, max relative error, PSNR.

The relative error is relative to the reference's largest magnitude (not elementwise), and PSNR is
20·log10(max|ref| / RMSE) in dB, the convention of Apple's ml-ane-transformers tests (≥ 60 dB is
their bar for an fp16 ANE model against its fp32 reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ErrorReport:
    max_abs: float
    max_rel: float  # max |actual - ref| / max |ref|
    psnr_db: float  # inf when the arrays are equal

    def __str__(self) -> str:
        return f"max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, PSNR {self.psnr_db:.1f} dB"


def compare(actual: Any, reference: Any) -> ErrorReport:
    """Errors of `actual` against `reference` (numpy arrays or torch tensors of the same shape)."""
    a, ref = _float64(actual), _float64(reference)
    if a.shape != ref.shape:
        from anefx.mil.errors import MilError

        raise MilError(f"cannot compare shape {a.shape} with reference shape {ref.shape}; compare the "
                       "same output of both models.")
    diff = np.abs(a - ref)
    peak = float(np.max(np.abs(ref))) if ref.size else 0.0
    max_abs = float(np.max(diff)) if diff.size else 0.0
    rmse = math.sqrt(float(np.mean(np.square(diff)))) if diff.size else 0.0
    return ErrorReport(max_abs=max_abs, max_rel=max_abs / peak if peak > 0 else max_abs,
                       psnr_db=psnr(peak, rmse))


def psnr(peak: float, rmse: float) -> float:
    if rmse == 0.0 or math.isnan(rmse):
        return math.inf if rmse == 0.0 else math.nan
    if peak == 0.0:
        return -math.inf
    return 20.0 * math.log10(peak / rmse)


def compare_outputs(actual: dict[str, Any], reference: dict[str, Any]) -> dict[str, ErrorReport]:
    """Per output name present in both."""
    return {name: compare(actual[name], reference[name]) for name in actual if name in reference}


def _float64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)
