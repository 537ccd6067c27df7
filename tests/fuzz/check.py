"""The fuzzing property: a model compiles and both its programs equal it, or compile raises AnefxError.

`check_case` compiles a `FuzzCase` in fp32 and compares, on the compile example and on a fresh input
set of the same shapes (a rewrite that is right only on its example is still wrong):

- the rewritten graph (`c.rewritten.module()`) with the model, `torch.testing.assert_close`;
- the saved package run by the MIL interpreter (`c(...)`, fp32) with the model, elementwise:
  |a − b| ≤ ATOL · max(1, max|b|) + RTOL · |b|.

It also checks that compiling left the model's state untouched and that a refusal's message is short.
Anything else — another exception, a mismatch — propagates as a failure.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree

import anefx
from anefx.errors import AnefxError
from tests.fuzz.models import FuzzCase

RTOL = 1e-4
ATOL = 1e-5
FRESH_INPUTS = 1  # input sets besides the example


@dataclass
class Outcome:
    """compiled (with each stage's status) or refused (with the error)."""

    status: str
    stages: dict[str, str] = field(default_factory=dict)
    error: str = ""

    @property
    def rolled_back(self) -> list[str]:
        return [name for name, status in self.stages.items() if status == "rolled-back"]


def check_case(case: FuzzCase) -> Outcome:
    state = model_state(case.model)
    example = case.inputs(0)
    gc.freeze()  # coremltools' conversion ends with gc.collect(): let it scan only what compiling made
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = anefx.compile(case.model, example, precision="fp32")
    except AnefxError as exc:
        assert_state_unchanged(case.model, state)
        message = str(exc)
        assert 0 < len(message.splitlines()) <= 15, f"{type(exc).__name__} message is not readable:\n{message}"
        return Outcome("refused", error=f"{type(exc).__name__}: {message}")
    finally:
        gc.unfreeze()
    assert_state_unchanged(case.model, state)
    program = compiled.rewritten.module()
    for n in range(1 + FRESH_INPUTS):
        inputs = case.inputs(n)
        with torch.no_grad():
            expected = tensors(case.model(*inputs))
            rewritten = tensors(program(*inputs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lowered = tensors(compiled(*inputs))
        assert len(rewritten) == len(expected) == len(lowered), "the programs return another number of outputs"
        for i, (r, l, e) in enumerate(zip(rewritten, lowered, expected, strict=True)):
            scale = max(1.0, float(e[torch.isfinite(e)].abs().max())) if torch.isfinite(e).any() else 1.0
            torch.testing.assert_close(r, e, rtol=RTOL, atol=ATOL * scale, equal_nan=True,
                                       msg=lambda m, i=i, n=n: f"rewritten graph, output {i}, input set {n}: {m}")
            assert_elementwise_close(l, e, f"MIL interpreter, output {i}, input set {n}")
    return Outcome("compiled", {p.name: p.status for p in compiled.passes})


def tensors(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def assert_elementwise_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    finite = torch.isfinite(e)
    same_special = torch.equal(a[~finite].nan_to_num(0.0, 1.0, -1.0), e[~finite].nan_to_num(0.0, 1.0, -1.0))
    assert same_special, f"{what}: NaN/inf positions or signs differ"
    assert torch.isfinite(a[finite]).all(), f"{what}: non-finite values where the model's are finite"
    scale = max(1.0, float(e[finite].abs().max())) if finite.any() else 1.0
    error = (a - e)[finite].abs()
    bound = ATOL * scale + RTOL * e[finite].abs()
    worst = float((error - bound).max()) if error.numel() else -1.0
    assert worst <= 0, f"{what}: max abs error {float(error.max()):.3g} beyond {ATOL}·{scale:.3g} + {RTOL}·|b|"


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and every buffer (persistent or not), copied."""
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k: v.detach().clone() for k, v in state.items()}


def assert_state_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model_state(model)
    assert set(after) == set(before), "compiling changed the model's state keys"
    for key, value in before.items():
        assert torch.equal(after[key], value), f"compiling changed the model's {key}"
