"""One error family. Every message says what the user should change."""

from __future__ import annotations


class AnefxError(Exception):
    """Base class of every user-facing anefx failure."""


class InvalidModelError(AnefxError, TypeError):
    """The object handed to anefx is not something it can compile."""


class InvalidExampleError(AnefxError, ValueError):
    """The example inputs are not tensors, or the model fails on them."""


class CaptureError(AnefxError):
    """torch.export could not capture the model."""


class UnknownRuleError(AnefxError, KeyError):
    """A rule name that is not in the rule library."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class RuleError(AnefxError):
    """A rule broke the graph (a bug in the rule, reported with the rule's name)."""


class LoweringError(AnefxError):
    """coremltools could not lower the rewritten program."""


class OptionError(AnefxError, ValueError):
    """An option of anefx.compile has a value anefx does not know."""
