"""The ANE-facing figures of a program read back from a saved package (anefx.mil.read_program):
MIL op histogram, transposes + reshapes, largest rank and dimension, softmax shapes and axes, norm axes."""

from __future__ import annotations

from collections import Counter

import numpy as np

from anefx.mil.reader import Literal


def const_arg(prog, op, name):
    """The constant value bound to argument `name` of a MIL operation (None when absent)."""
    bound = op.inputs.get(name)
    if not bound:
        return None
    value = bound[0].value if isinstance(bound[0], Literal) else prog.constants[bound[0]]
    return np.asarray(value).tolist()


def ane_summary(prog) -> dict:
    """The figures the layout issue asks for, from a program read back from disk."""
    ops = [op for op in prog.operations if op.type != "const"]
    types = Counter(op.type for op in ops)
    shapes = [tuple(t.shape) for op in ops for _, t in op.outputs if t is not None and t.shape is not None]
    softmax = [op for op in ops if op.type == "softmax"]
    norms = [op for op in ops if op.type == "layer_norm"]
    return {
        "types": types,
        "layout_ops": types["transpose"] + types["reshape"],
        "max_rank": max(len(s) for s in shapes),
        "largest_dim": max(max(s) for s in shapes if s),
        "softmax_shapes": Counter(tuple(op.outputs[0][1].shape) for op in softmax),
        "softmax_axes": Counter(const_arg(prog, op, "axis") for op in softmax),
        "norm_axes": Counter(tuple(const_arg(prog, op, "axes")) for op in norms),
    }
