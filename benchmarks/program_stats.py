"""What a saved ML program looks like: op counts, layout ops, ranks, ANE last-axis padding, fp16 PSNR.

Read from the .mlpackage on disk (anefx.mlpackage.program_ops), as a device would load it.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ANE_ROW_BYTES = 64  # the ANE pads the last axis of a tensor to 64 bytes
FP16_BYTES = 2
COUNTED = ("conv", "linear", "matmul", "einsum", "softmax", "scaled_dot_product_attention")


def padding_waste(shape: tuple[int, ...], element_bytes: int = FP16_BYTES) -> int:
    """Bytes lost to 64-byte padding of the last axis: a last axis of n elements occupies
    ceil(n·b/64)·64 bytes. Rank-0 values and dynamic shapes count nothing."""
    if not shape or any(d < 0 for d in shape):
        return 0
    row = shape[-1] * element_bytes
    padded = math.ceil(row / ANE_ROW_BYTES) * ANE_ROW_BYTES
    return math.prod(shape[:-1]) * (padded - row)


def program_stats(path: str | Path) -> dict[str, Any]:
    """Counts over the program's operations. Shapes, ranks and padding are over the outputs of
    non-const ops (the activations); weights are not laid out as activations on the ANE."""
    from anefx.mlpackage import program_ops

    records = program_ops(path)
    types = Counter(r.type for r in records)
    shapes = [shape for r in records if r.type != "const" for _, shape in r.outputs]
    stats: dict[str, Any] = {
        "ops": len(records),
        "non_const_ops": len(records) - types["const"],
        "layout_ops": types["transpose"] + types["reshape"],
        "rank5": sum(1 for s in shapes if len(s) >= 5),
        "largest_dim": max((d for s in shapes for d in s), default=0),
        "pad_waste_bytes": sum(padding_waste(s) for s in shapes),
    }
    stats.update({name: types[name] for name in COUNTED})
    return stats


def fp16_psnr(path: str | Path, inputs: list[Any], reference: list[Any]) -> dict[str, Any]:
    """PSNR of the program run by anefx's MIL interpreter in emulated fp16 against the torch model's
    fp32 outputs, matched by position. `psnr_db` is the worst output's."""
    from anefx.mil import compare, load_mlpackage

    runner = load_mlpackage(path, precision="fp16")
    names = [name for name, _ in runner.program.inputs]
    outputs = runner(**{name: np.asarray(x) for name, x in zip(names, inputs, strict=True)})
    reports = [compare(outputs[name], ref) for name, ref in zip(runner.output_names, reference, strict=False)]
    return {"psnr_db": min(r.psnr_db for r in reports),
            "psnr_by_output": {name: r.psnr_db for name, r in zip(runner.output_names, reports, strict=False)}}
