"""Regression tests for what the fuzzer (tests/test_fuzz.py, tests/fuzz/) found: each is the minimal
model that failed, with the outcome asserted (op counts and numeric equality, or the refusal)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import anefx
from tests.fuzz.check import assert_elementwise_close, tensors
from tests.helpers import ops


def compile_fp32(model: nn.Module, *inputs: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anefx.compile(model.eval(), inputs, precision="fp32")


def assert_equal_to_model(compiled, model: nn.Module, *input_sets: tuple[torch.Tensor, ...]) -> None:
    """On each input set, the rewritten graph (torch) and the saved package (MIL interpreter, fp32)
    equal the model."""
    program = compiled.rewritten.module()
    for inputs in input_sets:
        with torch.no_grad():
            expected = tensors(model(*inputs))
            rewritten = tensors(program(*inputs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lowered = tensors(compiled(*inputs))
        assert len(rewritten) == len(lowered) == len(expected)
        for r, low, e in zip(rewritten, lowered, expected, strict=True):
            torch.testing.assert_close(r, e, rtol=1e-4, atol=1e-5, equal_nan=True)
            assert_elementwise_close(low, e, "MIL interpreter")


def applied(compiled) -> dict[str, str]:
    return {p.name: p.status for p in compiled.passes}


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_norm_then_flatten_reads_the_rewritten_norm(norm):
    """A norm's replacement is laid out differently (a slice of [x, −x], a permuted channel norm) from
    the contiguous tensor the model had; the model's flatten, exported as `view`, failed on it at run
    time ('view size is not compatible with input tensor's size and stride'). The engine re-derives
    the metadata of what reads a replacement and turns such a view into a reshape."""
    model = nn.Sequential(nn.RMSNorm(16) if norm == "rms" else nn.LayerNorm(16), nn.Flatten(0, 1))
    x = torch.randn(2, 8, 16)
    c = compile_fp32(model, x)
    status = applied(c)
    assert status["layernorm_channels"] == "applied"
    if norm == "rms":
        assert status["rmsnorm_to_layernorm"] == "applied"
    graph = ops(c.rewritten)
    assert graph["layer_norm"] == 0 and graph["anefx.layer_norm"] == 1 and graph["view"] == 0
    assert graph["reshape"] >= 1
    assert_equal_to_model(c, model, (x,), (torch.randn(2, 8, 16),))
