"""Failures of the MIL interpreter. Each message names the op (type and output) and what to change."""

from __future__ import annotations

from anefx.errors import AnefxError


class MilError(AnefxError):
    """Base class of the MIL interpreter's failures."""


class UnsupportedOpError(MilError):
    """The program holds an operation the interpreter has no kernel for."""


class MilProgramError(MilError):
    """The package's program or weight file cannot be read."""


class MilInputError(MilError, ValueError):
    """The inputs handed to the runner do not match the program's inputs."""


class MilRuntimeError(MilError):
    """A kernel failed on the values it was given (out-of-bound index, wrong shape, ...)."""
