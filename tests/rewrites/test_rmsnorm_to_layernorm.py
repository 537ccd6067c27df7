"""rmsnorm_to_layernorm: every RMSNorm form → layer_norm over [x, −x] with γ fused, or a refusal."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import anefx
from rewrites.rmsnorm_to_layernorm import RULE
from tests.helpers import gamma_multiplies_after_norms, ops, rewrite, saved_ops

C = 32
NORM_OPS = ("pow", "rsqrt", "sqrt", "mean", "rms_norm")


class Wrap(torch.nn.Module):
    """norm(x) followed by a projection, so the norm is not the graph's output."""

    def __init__(self, norm: torch.nn.Module, channels: int = C):
        super().__init__()
        self.norm = norm
        self.proj = torch.nn.Linear(channels, channels)

    def forward(self, x):
        return self.proj(self.norm(x))


class Handwritten(torch.nn.Module):
    """coremltools' forms: x / sqrt(mean(x·x) + eps) · γ, with eps and γ optional; or Llama's rsqrt."""

    def __init__(self, eps: float | None = 1e-5, gamma: bool = True, square: str = "mul",
                 inverse: str = "sqrt_div", gamma_side: str = "right", axis: int = -1):
        super().__init__()
        self.eps, self.square, self.inverse, self.side, self.axis = eps, square, inverse, gamma_side, axis
        self.weight = torch.nn.Parameter(torch.rand(C) + 0.5) if gamma else None

    def forward(self, x):
        sq = x * x if self.square == "mul" else x.pow(2)
        ms = sq.mean(self.axis, keepdim=True)
        if self.eps is not None:
            ms = ms + self.eps
        y = x / torch.sqrt(ms) if self.inverse == "sqrt_div" else x * torch.rsqrt(ms)
        if self.weight is None:
            return y
        shape = [1] * x.dim()
        shape[self.axis] = C
        w = self.weight.view(shape)
        return y * w if self.side == "right" else w * y


def hf_norm(kind: str) -> torch.nn.Module:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    norm = {"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm, "t5": T5LayerNorm}[kind](C, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(C) + 0.5)
    return norm


FORMS = {
    "nn.RMSNorm eps=None": lambda: torch.nn.RMSNorm(C),
    "nn.RMSNorm eps=1e-5": lambda: torch.nn.RMSNorm(C, eps=1e-5),
    "nn.RMSNorm no affine": lambda: torch.nn.RMSNorm(C, eps=1e-6, elementwise_affine=False),
    "LlamaRMSNorm": lambda: hf_norm("llama"),
    "GemmaRMSNorm (1 + γ)": lambda: hf_norm("gemma"),
    "T5LayerNorm": lambda: hf_norm("t5"),
    "coremltools: sqrt, div, mul γ": lambda: Handwritten(),
    "coremltools: eps = 0": lambda: Handwritten(eps=None),
    "coremltools: no γ": lambda: Handwritten(gamma=False),
    "coremltools: no γ, no eps": lambda: Handwritten(eps=None, gamma=False),
    "pow, rsqrt, γ on the left": lambda: Handwritten(square="pow", inverse="rsqrt", gamma_side="left"),
}


@pytest.mark.parametrize("form", FORMS)
def test_every_form_becomes_one_layer_norm(form):
    model = Wrap(FORMS[form]()).eval()
    x = torch.randn(2, 7, C)
    before, after, records = rewrite(model, (x,), [RULE])
    record = records[-1]
    assert record.status == "applied" and record.matches == 1, record
    counts = ops(after)
    assert counts["layer_norm"] == 1
    assert all(counts[op] == 0 for op in NORM_OPS), counts
    assert counts["mul"] == 0  # γ is fused into the layer_norm weight
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["LlamaRMSNorm", "T5LayerNorm", "GemmaRMSNorm (1 + γ)", "nn.RMSNorm eps=1e-5"])
def test_fp16_models_with_upcasts(form):
    model = Wrap(FORMS[form]()).half().eval()
    x = torch.randn(2, 7, C).half()
    _, after, records = rewrite(model, (x,), [RULE])
    assert records[-1].matches == 1, records[-1]
    counts = ops(after)
    assert counts["layer_norm"] == 1 and all(counts[op] == 0 for op in NORM_OPS), counts
    torch.testing.assert_close(after.module()(x), model(x), rtol=2e-2, atol=2e-2)


def test_norm_over_channel_axis_uses_custom_op_and_lowers_to_axis_1(tmp_path):
    model = Handwritten(square="pow", inverse="rsqrt", axis=1).eval()  # x: (B, C, 1, S)
    x = torch.randn(1, C, 1, 16)
    _, after, _ = rewrite(model, (x,), [RULE])
    assert ops(after)["anefx.layer_norm"] == 1
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-5, atol=1e-5)
    c = anefx.compile(model, (x,), rules=[RULE])
    records = saved_ops(c, tmp_path)
    norms = [r for r in records if r.type == "layer_norm"]
    assert len(norms) == 1 and norms[0].outputs[0][1] == (1, 2 * C, 1, 16)
    assert gamma_multiplies_after_norms(records) == []


def test_lowered_program_has_one_layer_norm_and_no_gamma_multiply(tmp_path):
    model = Wrap(hf_norm("llama")).eval()
    c = anefx.compile(model, (torch.randn(1, 8, C),))
    records = saved_ops(c, tmp_path)
    types = [r.type for r in records]
    assert types.count("layer_norm") == 1
    assert not {"pow", "rsqrt", "reduce_mean", "sqrt", "real_div"} & set(types)
    assert gamma_multiplies_after_norms(records) == []


class TwoAxes(torch.nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean((-2, -1), keepdim=True) + 1e-6)


class GammaFromInput(torch.nn.Module):
    def forward(self, x, g):
        return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class GammaPerPosition(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(7, C))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_refuses_a_mean_over_two_axes():
    x = torch.randn(2, 7, C)
    _, after, records = rewrite(TwoAxes(), (x,), [RULE])
    assert records[-1].matches == 0
    assert any("not a norm over one axis" in r.reason for r in records[-1].refusals), records[-1].refusals
    assert ops(after)["rsqrt"] == 1


def test_refuses_gamma_that_depends_on_an_input_but_still_normalises():
    x, g = torch.randn(2, 7, C), torch.randn(C)
    _, after, records = rewrite(GammaFromInput(), (x, g), [RULE])
    assert any(r.reason == "γ is not constant (it depends on a model input)" for r in records[-1].refusals)
    # the norm itself (without γ) is still rewritten; the multiply by the input stays
    assert records[-1].matches == 1 and ops(after)["layer_norm"] == 1 and ops(after)["mul"] == 1
    torch.testing.assert_close(after.module()(x, g), GammaFromInput()(x, g), rtol=1e-5, atol=1e-5)


def test_refuses_gamma_that_varies_along_another_axis():
    model = GammaPerPosition()
    x = torch.randn(2, 7, C)
    _, after, records = rewrite(model, (x,), [RULE])
    assert any("does not scale only the normalised axis" in r.reason for r in records[-1].refusals)
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-5, atol=1e-5)


class NaiveHalfRMSNorm(torch.nn.Module):
    """The textbook RMSNorm with no upcast: x² overflows fp16 once |x| ≳ 256."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(C))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_fp16_large_activations_stay_finite():
    x32 = torch.randn(1, 16, C) * 1e3
    reference = NaiveHalfRMSNorm()(x32)  # fp32: fine
    naive = NaiveHalfRMSNorm().half()
    x16 = x32.half()
    assert torch.isinf(x16.pow(2)).any()  # x² overflows fp16: the naive norm collapses to 0 or inf
    naive_rel = ((naive(x16).float() - reference).abs().max() / reference.abs().max()).item()
    assert not naive_rel <= 0.5
    _, after, records = rewrite(naive, (x16,), [RULE])
    assert records[-1].matches == 1
    with torch.no_grad():
        y = after.module()(x16)
    assert torch.isfinite(y).all()
    rel = ((y.float() - reference).abs().max() / reference.abs().max()).item()
    assert rel <= 1e-2, rel


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(1, 9), channels=st.sampled_from([4, 16, 48]),
       eps=st.sampled_from([1e-6, 1e-5, 1e-3]), affine=st.booleans(), hand=st.booleans())
def test_property_random_shapes(batch, seq, channels, eps, affine, hand):
    norm = torch.nn.RMSNorm(channels, eps=eps, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
    model = norm if not hand else Wrap(norm, channels)
    x = torch.randn(batch, seq, channels)
    _, after, records = rewrite(model.eval(), (x,), [RULE])
    assert records[-1].matches == 1
    assert ops(after)["layer_norm"] == 1 and ops(after)["rms_norm"] == 0
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-4, atol=1e-5)
