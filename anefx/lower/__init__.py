"""Lowering: the rewritten ExportedProgram → an Apple model format.

`anefx.lower.coreml` is the Core ML target (.mlpackage, the default). The names below are the ones the rest
of anefx uses; they stay importable from `anefx.lower`.
"""

from anefx.lower.coreml import (
    ATTENTION,
    COMPUTE_UNITS,
    NEURAL_ENGINE_UNITS,
    PRECISIONS,
    TARGETS,
    _can_run_coreml,
    _quiet_coremltools,
    check_options,
    distinct_outputs,
    lower,
    lowering_message,
    mil_histogram,
    mil_operations,
)

__all__ = [
    "ATTENTION", "COMPUTE_UNITS", "NEURAL_ENGINE_UNITS", "PRECISIONS", "TARGETS", "_can_run_coreml",
    "_quiet_coremltools", "check_options", "distinct_outputs", "lower", "lowering_message", "mil_histogram",
    "mil_operations",
]
