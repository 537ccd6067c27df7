"""Regression tests for what the fuzzer (tests/test_fuzz.py, tests/fuzz/) found: each is the minimal
model that failed, with the outcome asserted (op counts and numeric equality, or the refusal)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anefx
from tests.fuzz.check import assert_elementwise_close, tensors
from tests.helpers import ops


def compile_fp32(model: nn.Module, *inputs: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anefx.compile(model.eval(), inputs, precision="fp32", rules=anefx.default_rules())


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


class MaskedSelfAttention(nn.Module):
    """Two heads over (B, S, 16), SDPA with a mask input (boolean or additive)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 2, 8).transpose(1, 2) for p in self.qkv)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, 16)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_sdpa_query_with_every_key_masked_gives_zeros(kind):
    """torch's SDPA returns 0 for a query whose keys are all masked; the per-head softmax over only
    −inf gave NaN there (found with random masks on a cross-attention of 4 keys). The rewrite now
    zeroes such rows: one amax + compare per mask and one where per layer."""
    keep = torch.rand(2, 1, 6, 6) > 0.4
    keep[:, :, :, 0] = True
    keep[0, 0, 2] = False  # query 2 of batch 0 sees no key
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    model, x = MaskedSelfAttention(), torch.randn(2, 6, 16)
    expected = model(x, mask)
    assert torch.equal(expected[0, 2], torch.zeros(16)) and torch.isfinite(expected).all()

    c = compile_fp32(model, x, mask)

    assert applied(c)["split_head_attention"] == "applied"
    graph = ops(c.rewritten)
    assert graph["scaled_dot_product_attention"] == 0 and graph["_softmax"] == 2
    assert graph["amax"] == 1 and graph["gt"] == 1
    assert graph["where"] == (2 if kind == "bool" else 1)  # (the boolean mask's own where: keep → 0, drop → −inf)
    other = torch.rand(2, 1, 6, 6) > 0.7
    other[1, 0, 4] = False
    other_mask = other if kind == "bool" else torch.zeros(other.shape).masked_fill(~other, float("-inf"))
    assert_equal_to_model(c, model, (x, mask), (torch.randn(2, 6, 16), other_mask))


def test_eager_attention_with_every_key_masked_stays_nan_as_in_torch():
    """Eager softmax(q·kᵀ + mask) over only −inf is NaN in torch: the rewrite keeps that (no zeroing)."""

    class Eager(MaskedSelfAttention):
        def forward(self, x, mask):
            b, s, _ = x.shape
            q, k, v = (p(x).view(b, s, 2, 8).transpose(1, 2) for p in self.qkv)
            w = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5 + mask, -1)
            return (w @ v).transpose(1, 2).reshape(b, s, 16)

    mask = torch.zeros(1, 1, 5, 5)
    mask[0, 0, 3] = float("-inf")
    model, x = Eager(), torch.randn(1, 5, 16)
    c = compile_fp32(model, x, mask)
    assert applied(c)["split_head_attention"] == "applied"
    assert ops(c.rewritten)["where"] == 0
    assert_equal_to_model(c, model, (x, mask))
    assert torch.isnan(c.rewritten.module()(x, mask)[0, 3]).all()


def _mask_with_dropped_query(kind: str, batch: int = 2) -> torch.Tensor:
    keep = torch.rand(batch, 1, 6, 6) > 0.4
    keep[:, :, :, 0] = True
    keep[0, 0, 3] = False  # query 3 of batch 0 sees no key
    return keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize(("kind", "options"), [("bool", {"attention": "sdpa"}),
                                               ("additive", {"compute_units": "CPU_ONLY"})])
def test_fused_sdpa_query_with_every_key_masked_gives_zeros(kind, options):
    """A fused SDPA (attention="sdpa", or no Neural Engine) lowered by coremltools returned NaN for a
    query whose keys are all masked, where torch returns 0 (found by the fuzzer once its masks could
    drop whole rows). sdpa_masked_rows guards it: the fused op stays, its dropped rows are zeroed."""
    model, x, mask = MaskedSelfAttention(), torch.randn(2, 6, 16), _mask_with_dropped_query(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = anefx.compile(model.eval(), (x, mask), precision="fp32", **options)
    assert applied(c)["sdpa_masked_rows"] == "applied"
    graph = ops(c.rewritten)
    assert graph["scaled_dot_product_attention"] == 1 and graph["amax"] == 1 and graph["gt"] == 1
    assert graph["where"] == (1 if kind == "bool" else 2) and graph["logical_or"] == (kind == "bool")
    assert_equal_to_model(c, model, (x, mask), (torch.randn(2, 6, 16), _mask_with_dropped_query(kind)))


@pytest.mark.parametrize("dropped", [False, True])
def test_fused_sdpa_with_a_constant_mask_is_guarded_only_when_a_row_is_dropped(dropped):
    class ConstantMask(MaskedSelfAttention):
        def __init__(self, mask):
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, x):
            return super().forward(x, self.mask)

    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    if dropped:
        mask[2] = False
    model, x = ConstantMask(mask), torch.randn(1, 6, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = anefx.compile(model.eval(), (x,), precision="fp32", attention="sdpa")
    assert applied(c)["sdpa_masked_rows"] == ("applied" if dropped else "no-match")
    assert ops(c.rewritten)["where"] == int(dropped)
    assert_equal_to_model(c, model, (x,), (torch.randn(1, 6, 16),))


def test_projection_feeding_projection():
    """The issue: one projection feeding another failed with 'Argument linear of Node permute_default_2
    was used before it has been defined' (a match read the output of a match already rewritten). Also:
    layout_bc1s reported no-match when it only shortened the layout chains between the convolutions,
    so the pipeline dropped its work and a transpose pair stayed between them."""
    model, x = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), torch.randn(1, 8, 16)
    c = compile_fp32(model, x)
    assert applied(c)["linear_to_conv1x1"] == "applied" and applied(c)["layout_bc1s"] == "applied"
    graph = ops(c.rewritten)
    assert graph["convolution"] == 2 and graph["linear"] == 0
    assert graph["permute"] == 2  # into (B, C, 1, S) once and back once: nothing between the convolutions
    assert_equal_to_model(c, model, (x,), (torch.randn(1, 8, 16),))


class BiasedQueries(nn.Module):
    """q + a constant with a head axis, right-aligned to (B, H, S, d), before SDPA."""

    def __init__(self, bias_shape: tuple[int, ...]):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.bias = nn.Parameter(torch.randn(bias_shape))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 2, 8).transpose(1, 2) for p in self.qkv)
        return F.scaled_dot_product_attention(q + self.bias, k, v).transpose(1, 2).reshape(b, s, 16)


@pytest.mark.parametrize("bias_shape", [(2, 1, 8), (2, 6, 8), (2, 6, 1), (1, 2, 6, 8), (6, 8)])
def test_query_plus_a_constant_with_a_head_axis(bias_shape):
    """A constant of rank 3 with a head axis ((H, S, d) against q's (B, H, S, d)) was moved to the head
    layout whole, not per head: 'shape [1, 2, 8, 6] is invalid for input of size 192' (RuleError).
    Each head now adds its own slice of it."""
    model, x = BiasedQueries(bias_shape), torch.randn(1, 6, 16)
    c = compile_fp32(model, x)
    assert applied(c)["split_head_attention"] == "applied"
    graph = ops(c.rewritten)
    assert graph["scaled_dot_product_attention"] == 0 and graph["_softmax"] == 2 and graph["einsum"] == 4
    assert_equal_to_model(c, model, (x,), (torch.randn(1, 6, 16),))
