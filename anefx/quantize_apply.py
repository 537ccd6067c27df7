"""Apply a QuantizeConfig to a lowered CoreML model through `coremltools.optimize.coreml`.

Each weight gets its own config by const name (`OptimizationConfig(op_name_configs=...)`), so only the weights
anefx chose are touched: int8 weights through `linear_quantize_weights`, lut weights through
`palettize_weights` with anefx's k-means (below). The k-means is a deterministic weighted 1-D Lloyd's
algorithm over the distinct values of a group (quantile start): the same weights always give the same table,
which lets a multifunction package store the prefill and decode copies of a weight once.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from typing import Any

import numpy as np

from anefx.errors import OptionError
from anefx.quantize import QuantizeConfig, QuantizePlan, plan_weights, quantize_config

KMEANS_ITERATIONS = 40


def quantize_mlmodel(mlmodel: Any, config: QuantizeConfig) -> tuple[Any, QuantizePlan]:
    """A new CoreML model with the weights of `mlmodel` quantized as `config` says (mlmodel is left as it is)."""
    from anefx.lower import _quiet_coremltools

    _quiet_coremltools()
    from coremltools.optimize.coreml import OptimizationConfig, linear_quantize_weights, palettize_weights

    program = _program(mlmodel)
    plan = plan_weights(program, config)
    shapes = {op.name: tuple(op.outputs[0].shape) for op in program.functions["main"].operations
              if op.op_type == "const"}
    int8 = {n: _int8_config() for n, (_, m) in plan.weights.items() if m == "int8"}
    luts = {n: _lut_config(m, config.group_size, shapes[n]) for n, (_, m) in plan.weights.items()
            if m.startswith("lut")}
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if int8:
            mlmodel = linear_quantize_weights(mlmodel, OptimizationConfig(op_name_configs=int8))
        if luts:
            mlmodel = palettize_weights(mlmodel, OptimizationConfig(op_name_configs=luts))
    return mlmodel, plan


def _program(mlmodel: Any) -> Any:
    """The model's program as coremltools' compression passes read it (so const names match)."""
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = mlmodel.get_spec()
    return load(model_spec=spec, specification_version=spec.specificationVersion,
                file_weights_dir=mlmodel.weights_dir)


def _int8_config() -> Any:
    from coremltools.optimize.coreml import OpLinearQuantizerConfig

    return OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                   weight_threshold=1)


def _lut_config(mode: str, group_size: int, shape: tuple[int, ...]) -> Any:
    from coremltools.optimize.coreml import OpPalettizerConfig

    nbits = int(mode.removeprefix("lut"))
    size = channel_group(shape[0] if shape else 1, group_size)
    return OpPalettizerConfig(mode="custom", lut_function=functools.partial(kmeans_lut, nbits=nbits),
                              granularity="per_grouped_channel" if size else "per_tensor",
                              group_size=size, weight_threshold=1)


def channel_group(channels: int, group_size: int) -> int:
    """Output channels per lookup table: the largest divisor of `channels` up to `group_size` (30522 rows with
    group_size 16: 6); 0 (one table for the weight) when that is under a quarter of group_size or covers all."""
    size = next(d for d in range(min(group_size, channels), 0, -1) if channels % d == 0)
    return 0 if size * 4 < group_size or size >= channels else size


def kmeans_lut(values: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """(lookup table of 2**nbits entries in values' dtype, uint8 index of every value, flattened): k-means
    clusters of the values, weighted by how often each distinct value occurs."""
    flat = np.asarray(values).reshape(-1)
    distinct, inverse, counts = np.unique(flat.astype(np.float32), return_inverse=True, return_counts=True)
    k = 1 << nbits
    if distinct.size <= k:
        table = np.concatenate([distinct, np.full(k - distinct.size, distinct[-1], np.float32)])
        return table.astype(flat.dtype), inverse.reshape(-1).astype(np.uint8)
    centers = _quantile_start(distinct, counts, k)
    weighted = distinct.astype(np.float64) * counts
    for _ in range(KMEANS_ITERATIONS):
        cluster = _nearest(centers, distinct)
        total = np.bincount(cluster, weights=counts, minlength=k)
        sums = np.bincount(cluster, weights=weighted, minlength=k)
        moved = np.where(total > 0, sums / np.maximum(total, 1), centers)
        if np.array_equal(moved, centers):
            break
        centers = moved
    table = centers.astype(flat.dtype)
    cluster = _nearest(table.astype(np.float64), distinct)
    return table, cluster[inverse.reshape(-1)].astype(np.uint8)


def _quantile_start(distinct: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    cumulative = np.cumsum(counts)
    targets = (np.arange(k) + 0.5) / k * cumulative[-1]
    return distinct[np.minimum(np.searchsorted(cumulative, targets), distinct.size - 1)].astype(np.float64)


def _nearest(centers: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of the nearest center for each value (centers sorted ascending; ties to the lower one)."""
    order = np.argsort(centers, kind="stable")
    ordered = centers[order]
    bounds = (ordered[1:] + ordered[:-1]) / 2
    return order[np.searchsorted(bounds, values, side="left")]


# min PSNR (dB) of a quantized program's package check against the fp32 model: quantization costs fidelity by
# design (the ladder measures how much); below these something else is wrong (e.g. fp16 overflow)
QUANTIZED_MIN_PSNR = {"int8": 30.0, "lut8": 30.0, "lut6": 20.0, "lut4": 15.0}


def check_quantize(quantize: Any, deployment_target: str, target: str = "coreml") -> None:
    """anefx.compile's `quantize=` checked before any work (OptionError naming the allowed values)."""
    if quantize is not None and target != "coreml":
        raise OptionError(f"quantize= works with target='coreml' only (target={target!r} was given); drop "
                          "quantize, or compile for Core ML.")
    quantize_config(quantize, deployment_target)


def quantize_lowered(mlmodel: Any, quantize: Any, deployment_target: str, say: Any = None) -> Any:
    """The lowered model with its weights quantized as `quantize` says (the model itself when None)."""
    config = quantize_config(quantize, deployment_target)
    if config is None:
        return mlmodel
    if say is not None:
        say(f"quantize weights ({config.describe()})")
    return quantize_mlmodel(mlmodel, config)[0]


def quantized_check(check: Any, quantize: Any) -> Any:
    """A package check of a quantized program keeps its inf/NaN test; its PSNR floor is the quantized one."""
    config = quantize_config(quantize, "iOS18") if quantize is not None else None
    if config is not None and check is not None:
        check.min_psnr = min(QUANTIZED_MIN_PSNR.get(m, check.min_psnr) for m in config.modes())
    return check
