"""anefx: compile PyTorch models into Apple Neural Engine friendly CoreML programs."""

from anefx.api import compile, default_rules
from anefx.compiled import AnefxNotice, CompiledModel
from anefx.diff import GraphDiff, diff
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
from anefx.pipeline import PassRecord
from anefx.rule import Match, Pattern, Rule

__all__ = [
    "AnefxError", "AnefxNotice", "CaptureError", "CompiledModel", "GraphDiff", "InvalidExampleError",
    "InvalidModelError", "LoweringError", "Match", "OptionError", "PassRecord", "Pattern", "Rule",
    "RuleError", "UnknownRuleError", "compile", "default_rules", "diff",
]
__version__ = "0.1.0"
