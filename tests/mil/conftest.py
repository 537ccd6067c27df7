"""The run_mil fixture: build a one-op MIL program, save it, run it with the interpreter."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.mil.programs import save_program


@pytest.fixture
def run_mil(tmp_path):
    """run_mil(fn, op, **inputs) -> the single output (or the dict of outputs), asserting `op` was emitted."""
    from anefx.mil import load_mlpackage
    from anefx.mlpackage import histogram

    counter = iter(range(1000))

    def run(fn: Callable, op: str | None, *, opset: str = "iOS18", precision: str = "fp32", **inputs):
        path = save_program(fn, inputs, tmp_path / f"p{next(counter)}.mlpackage", opset)
        if op is not None:
            assert op in histogram(path), f"{op} was not emitted: {histogram(path)}"
        outputs = load_mlpackage(path, precision)(**inputs)
        return next(iter(outputs.values())) if len(outputs) == 1 else outputs

    return run
