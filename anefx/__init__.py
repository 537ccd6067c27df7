"""anefx: compile PyTorch models into Apple Neural Engine friendly CoreML programs.

`import anefx` is cheap: torch, coremltools and the rule library load on first use of what needs them
(so `anefx --help` answers at once).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from anefx.errors import (
    AnefxError,
    CaptureError,
    InvalidExampleError,
    InvalidModelError,
    LoweringError,
    OptionError,
    RuleError,
    UnknownRuleError,
)

if TYPE_CHECKING:  # what the names below resolve to, for type checkers and editors
    from anefx.api import compile, default_rules
    from anefx.buckets import BucketError, BucketShapeError
    from anefx.compiled import AnefxNotice, CompiledModel
    from anefx.diff import GraphDiff, diff
    from anefx.mil import load_mlpackage
    from anefx.package_check import PackageCheck, PrecisionError, PrecisionWarning
    from anefx.partition_manifest import PartitionError
    from anefx.partitioned import PartitionedModel, load_partitioned
    from anefx.pipeline import PassRecord
    from anefx.quantize import QuantizeConfig
    from anefx.quantize_report import QuantizeReport, quantize_report
    from anefx.rule import Match, Pattern, Rule

_LAZY = {
    "compile": "anefx.api", "default_rules": "anefx.api",
    "AnefxNotice": "anefx.compiled", "CompiledModel": "anefx.compiled",
    "GraphDiff": "anefx.diff", "diff": "anefx.diff",
    "load_mlpackage": "anefx.mil",
    "compile_llm": "anefx.llm.compile", "CompiledLLM": "anefx.llm.compile",
    "load_llm": "anefx.llm.runtime", "LLM": "anefx.llm.runtime", "ContextFullError": "anefx.llm.runtime",
    "StatefulModelError": "anefx.llm.capture",
    "PackageCheck": "anefx.package_check", "PrecisionError": "anefx.package_check",
    "PrecisionWarning": "anefx.package_check",
    "PassRecord": "anefx.pipeline",
    "BucketError": "anefx.buckets", "BucketShapeError": "anefx.buckets",
    "QuantizeConfig": "anefx.quantize", "quantize_report": "anefx.quantize_report",
    "QuantizeReport": "anefx.quantize_report",
    "load_partitioned": "anefx.partitioned", "PartitionedModel": "anefx.partitioned",
    "PartitionError": "anefx.partition_manifest",
    "Match": "anefx.rule", "Pattern": "anefx.rule", "Rule": "anefx.rule",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'anefx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """`anefx.diff` is the function, although a submodule has that name too: importing the submodule
    would otherwise replace the function on the package (its names are taken from `from anefx.diff
    import …`, which does not need the attribute)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "LLM", "AnefxError", "AnefxNotice",
    "BucketError", "BucketShapeError", "CaptureError", "CompiledLLM", "CompiledModel", "ContextFullError",
    "GraphDiff", "InvalidExampleError",
    "InvalidModelError", "LoweringError", "Match", "OptionError", "PackageCheck", "PassRecord", "Pattern",
    "PrecisionError", "PrecisionWarning", "Rule", "RuleError", "UnknownRuleError", "compile", "default_rules",
    "StatefulModelError", "compile_llm", "diff", "load_llm", "load_mlpackage",
    "PartitionError", "PartitionedModel", "load_partitioned",
    "QuantizeConfig", "QuantizeReport", "quantize_report",
]
__version__ = "0.1.0"
