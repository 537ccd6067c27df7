"""Helpers for the interpreter's tests: one-op MIL programs saved as .mlpackage, random inputs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

logging.getLogger("coremltools").setLevel(logging.ERROR)

_SPEC_DTYPES = {"float32": "fp32", "float16": "fp16", "int32": "int32", "bool": "bool"}


def save_program(fn: Callable, inputs: dict[str, np.ndarray], path: Path, opset: str = "iOS18",
                 states: dict[str, np.ndarray] | None = None) -> Path:
    """`fn`'s parameters name the inputs (then the states); no optimisation pass runs, so each op stays."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    specs = [mb.TensorSpec(shape=v.shape, dtype=getattr(types, _SPEC_DTYPES[str(v.dtype)]))
             for v in inputs.values()]
    specs += [mb.StateTensorSpec(shape=v.shape, dtype=getattr(types, _SPEC_DTYPES[str(v.dtype)]))
              for v in (states or {}).values()]
    target = getattr(ct.target, opset)
    prog = mb.program(input_specs=specs, opset_version=target)(fn)
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True,
                       pass_pipeline=ct.PassPipeline.EMPTY)
    model.save(str(path))
    return path


def rand(*shape: int, seed: int = 0, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)
