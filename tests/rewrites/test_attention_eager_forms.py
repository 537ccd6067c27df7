"""split_head_attention on eager attention written the ways other code bases write it: nanoGPT's masked_fill of a
registered tril buffer, fp16 / bf16 eager attention that casts the float32 softmax back with `.to(dtype)`, and
Bloom-style baddbmm scores on (B·H, S, d) with an alibi bias (β ≠ 1, a bias computed from an input)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import anefx
from rewrites import RULES
from tests.helpers import ane_summary, ops, program, rewrite, tensors

B, S, H, D = 1, 12, 4, 8
C = H * D


class NanoGPTAttention(torch.nn.Module):
    """nanoGPT's CausalSelfAttention (slow path): fused c_attn split on channels, a tril buffer, masked_fill."""

    def __init__(self, fill: float = float("-inf")):
        super().__init__()
        self.c_attn, self.c_proj = torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C)
        self.register_buffer("bias", torch.tril(torch.ones(S, S)).view(1, 1, S, S))
        self.fill = fill

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (y.view(b, t, H, c // H).transpose(1, 2) for y in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, self.fill)
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class LowPrecisionEager(torch.nn.Module):
    """HF's eager_attention_forward in fp16 / bf16: softmax in float32, `.to(q.dtype)`, dropout (eval)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(C, C) for _ in range(4))

    def forward(self, x, mask):
        q, k, v = (p(x).view(B, S, H, D).transpose(1, 2) for p in (self.q, self.k, self.v))
        w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
        w = F.dropout(F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), 0.1, training=self.training)
        return self.o(torch.matmul(w, v).transpose(1, 2).reshape(B, S, C))


class BatchedAlibi(torch.nn.Module):
    """Bloom's form with the alibi computed from a padding-mask input (not a constant) and β = 0.5."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C)
        self.register_buffer("slopes", torch.tensor([0.5 ** (i + 1) for i in range(H)]), persistent=False)

    def forward(self, x, keep):
        q, k, v = (t.transpose(1, 2).reshape(B * H, S, D) for t in self.qkv(x).view(B, S, H, 3, D).unbind(3))
        alibi = (self.slopes[:, None] * (keep.cumsum(-1) - 1))[:, None, :].reshape(B * H, 1, S)
        scores = torch.baddbmm(alibi, q, k.transpose(-1, -2), beta=0.5, alpha=D ** -0.5)
        weights = torch.softmax(scores.view(B, H, S, S), -1, dtype=torch.float32)
        out = torch.bmm(weights.view(B * H, S, S), v).view(B, H, S, D)
        return self.o(out.transpose(1, 2).reshape(B, S, C))


def causal_mask(dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(1, 1, S, S, dtype=dtype).masked_fill(torch.ones(S, S).triu(1).bool(), float("-inf"))


def split_record(passes):
    return next(p for p in passes if p.name == "split_head_attention")


def test_nanogpt_masked_fill_of_a_tril_buffer_is_split_per_head(tmp_path):
    model, x = NanoGPTAttention().eval(), torch.randn(B, S, C)
    c = anefx.compile(model, (x,), progress=False, package_check="skip", precision="fp32")
    assert split_record(c.passes).status == "applied" and split_record(c.passes).matches == 1
    counts = ops(c.rewritten)
    assert counts["masked_fill"] == 0 and counts["_softmax"] == H and counts["matmul"] == 0
    torch.testing.assert_close(c.rewritten.module()(x), model(x), rtol=1e-4, atol=1e-5)
    s = ane_summary(program(c, tmp_path))
    assert s["softmax_axes"] == {1: H} and s["max_rank"] <= 4 and s["types"]["linear"] == 0
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(c(x)), model(x), rtol=1e-3, atol=1e-4)  # MIL interpreter


def test_masked_fill_with_a_finite_value_is_refused_naming_the_fix():
    model, x = NanoGPTAttention(fill=-1e4).eval(), torch.randn(B, S, C)
    _, after, records = rewrite(model, (x,), [r for r in RULES if r.name == "split_head_attention"])
    record = records[-1]
    assert record.matches == 0 and len(record.refusals) == 1
    reason = record.refusals[0].reason
    assert "masked_fill" in reason and "float('-inf')" in reason and "add the mask" in reason
    torch.testing.assert_close(after.module()(x), model(x))


def test_fp16_eager_attention_casting_the_softmax_back_is_split_and_lowers(tmp_path):
    torch.manual_seed(0)
    model, x, mask = LowPrecisionEager().eval().half(), torch.randn(B, S, C).half(), causal_mask(torch.float16)
    c = anefx.compile(model, (x, mask), progress=False)  # fp16, package_check="warn": the MIL interpreter runs it
    assert split_record(c.passes).status == "applied" and split_record(c.passes).matches == 1
    counts = ops(c.rewritten)
    assert counts["_softmax"] == H and counts["matmul"] == 0 and counts["_to_copy"] >= 2 * H  # float32 softmax kept
    with torch.no_grad():
        torch.testing.assert_close(c.rewritten.module()(x, mask), model(x, mask), rtol=4e-3, atol=4e-3)
    assert min(c.package_check.psnr_db.values()) > 40
    assert ane_summary(program(c, tmp_path))["softmax_axes"] == {1: H}


def test_bf16_eager_attention_casting_the_softmax_back_is_split():
    torch.manual_seed(0)
    model, x, mask = LowPrecisionEager().eval().bfloat16(), torch.randn(B, S, C).bfloat16(), causal_mask(torch.bfloat16)
    _, after, records = rewrite(model, (x, mask), [r for r in RULES if r.name == "split_head_attention"])
    assert records[-1].status == "applied" and records[-1].matches == 1
    with torch.no_grad():
        torch.testing.assert_close(after.module()(x, mask), model(x, mask), rtol=2e-2, atol=2e-2)


def test_fp16_sdpa_split_lowers_with_one_dtype():
    """The q scale is a constant of q's dtype: coremltools promotes fp16 · Python float to float32."""
    class Sdpa(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(C, C) for _ in range(4))

        def forward(self, x):
            q, k, v = (p(x).view(B, S, H, D).transpose(1, 2) for p in (self.q, self.k, self.v))
            return self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, C))

    torch.manual_seed(0)
    model, x = Sdpa().eval().half(), torch.randn(B, S, C).half()
    c = anefx.compile(model, (x,), progress=False)
    assert split_record(c.passes).status == "applied"
    assert min(c.package_check.psnr_db.values()) > 40


@pytest.mark.slow
def test_baddbmm_with_an_input_dependent_alibi_and_beta(tmp_path):
    torch.manual_seed(0)
    model = BatchedAlibi().eval()
    x, keep = torch.randn(B, S, C), torch.ones(B, S)
    c = anefx.compile(model, (x, keep), progress=False, package_check="skip", precision="fp32")
    assert split_record(c.passes).status == "applied"
    counts = ops(c.rewritten)
    assert counts["baddbmm"] == 0 and counts["bmm"] == 0 and counts["_softmax"] == H
    keep2 = torch.tensor([[0.0, 0.0] + [1.0] * (S - 2)])  # another padding: the bias follows the input
    for k in (keep, keep2):
        with torch.no_grad():
            torch.testing.assert_close(c.rewritten.module()(x, k), model(x, k), rtol=1e-4, atol=1e-5)
    assert ane_summary(program(c, tmp_path))["max_rank"] <= 4
    assert tensors(c(x, keep2))  # the package runs in the interpreter with the bias computed from the input


def test_batched_values_that_are_not_head_views_are_refused_naming_the_fix():
    class OddValues(BatchedAlibi):
        def forward(self, x, keep):
            q, k, _ = (t.transpose(1, 2).reshape(B * H, S, D) for t in self.qkv(x).view(B, S, H, 3, D).unbind(3))
            v = self.o(x).reshape(B * H, S, D)  # not a view of (B, H, S, d): tokens and channels mixed
            weights = torch.softmax(torch.bmm(q, k.transpose(-1, -2)).view(B, H, S, S), -1)
            return torch.bmm(weights.view(B * H, S, S), v).view(B, S, C)

    model, x, keep = OddValues().eval(), torch.randn(B, S, C), torch.ones(B, S)
    _, after, records = rewrite(model, (x, keep), [r for r in RULES if r.name == "split_head_attention"])
    assert records[-1].matches == 0 and len(records[-1].refusals) == 1
    reason = records[-1].refusals[0].reason
    assert "values are (B·H, S, d) tensors" in reason and "x.view(B, S, H, d).transpose(1, 2)" in reason
    torch.testing.assert_close(after.module()(x, keep), model(x, keep))
