"""split_head_attention: SDPA and eager attention → per-head einsums on (B, d, 1, S); masks, GQA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import anefx
from rewrites import RULES
from tests.helpers import ane_summary, ops, program, rewrite

B, S, H, D = 1, 12, 4, 8
C = H * D
ATTENTION_RULES = [r for r in RULES if r.name in ("linear_to_conv1x1", "split_head_attention")]


class Attention(torch.nn.Module):
    """A generic attention block: projections, head split, optional rotary, SDPA or eager."""

    def __init__(self, kv_heads=H, mode="sdpa", mask=None, causal=False, scale=None, rotary=False,
                 gqa="repeat"):
        super().__init__()
        self.kv, self.mode, self.causal, self.scale, self.rotary, self.gqa = kv_heads, mode, causal, scale, rotary, gqa
        self.q = torch.nn.Linear(C, C)
        self.k = torch.nn.Linear(C, kv_heads * D)
        self.v = torch.nn.Linear(C, kv_heads * D)
        self.o = torch.nn.Linear(C, C)
        self.register_buffer("mask", mask, persistent=False)
        angles = torch.arange(S)[:, None] * torch.linspace(0.1, 1.0, D // 2)[None]
        self.register_buffer("cos", torch.cat([angles.cos()] * 2, -1)[None, None], persistent=False)
        self.register_buffer("sin", torch.cat([angles.sin()] * 2, -1)[None, None], persistent=False)

    def heads(self, x, n):
        return x.view(B, S, n, D).transpose(1, 2)  # (B, n, S, d)

    def rope(self, x):
        half = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
        return x * self.cos + half * self.sin

    def forward(self, x, mask=None):
        q, k, v = self.heads(self.q(x), H), self.heads(self.k(x), self.kv), self.heads(self.v(x), self.kv)
        if self.rotary:
            q, k = self.rope(q), self.rope(k)
        mask = self.mask if mask is None else mask
        if self.kv != H and self.gqa == "repeat":  # transformers' repeat_kv
            rep = H // self.kv
            k = k[:, :, None].expand(B, self.kv, rep, S, D).reshape(B, H, S, D)
            v = v[:, :, None].expand(B, self.kv, rep, S, D).reshape(B, H, S, D)
        if self.mode == "sdpa":
            kwargs = {"scale": self.scale} if self.scale else {}
            if self.kv != H and self.gqa == "sdpa":
                kwargs["enable_gqa"] = True
            out = F.scaled_dot_product_attention(q, k, v, mask, is_causal=self.causal, **kwargs)
        else:
            scores = q @ k.transpose(-1, -2) / D ** 0.5
            if mask is not None:
                scores = scores + mask
            out = scores.softmax(-1) @ v
        return self.o(out.transpose(1, 2).reshape(B, S, C))


def causal_bool():
    return torch.ones(S, S, dtype=torch.bool).tril()[None, None]


def additive(m):
    return torch.zeros(m.shape).masked_fill(~m, float("-inf"))


CASES = {
    "sdpa, no mask": dict(),
    "sdpa, is_causal": dict(causal=True),
    "sdpa, explicit scale": dict(scale=0.3),
    "sdpa, constant boolean causal mask": dict(mask=causal_bool()),
    "sdpa, constant additive mask": dict(mask=additive(causal_bool())),
    "sdpa, per-head additive mask": dict(mask=torch.randn(1, H, S, S)),
    "sdpa, rotary embeddings": dict(rotary=True, causal=True),
    "GQA via repeat_kv": dict(kv_heads=2, rotary=True, causal=True),
    "GQA via enable_gqa": dict(kv_heads=2, gqa="sdpa"),
    "eager, additive mask": dict(mode="eager", mask=additive(causal_bool())),
    "eager, no mask": dict(mode="eager"),
}


@pytest.mark.parametrize("case", CASES)
def test_attention_becomes_one_small_attention_per_head(case):
    model = Attention(**CASES[case]).eval()
    x = torch.randn(B, S, C)
    _, after, records = rewrite(model, (x,), ATTENTION_RULES)
    record = records[-1]
    assert record.status == "applied" and record.matches == 1, record
    counts = ops(after)
    assert counts["scaled_dot_product_attention"] == 0 and counts["matmul"] == 0
    assert counts["_softmax"] == H and counts["einsum"] == 2 * H
    assert counts["expand"] == 0  # GQA indexes the shared head, no repeated copies
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-4, atol=1e-5)
    softmax = [n for n in after.graph.nodes if n.target is torch.ops.aten._softmax.default]
    assert {tuple(n.meta["val"].shape) for n in softmax} == {(B, S, 1, S)}
    assert {n.args[1] for n in softmax} == {1}


def test_padding_mask_given_as_an_input():
    model = Attention().eval()
    x = torch.randn(B, S, C)
    keep = torch.ones(B, 1, 1, S, dtype=torch.bool)
    keep[..., -3:] = False  # the last 3 tokens are padding
    _, after, records = rewrite(model, (x, keep), ATTENTION_RULES)
    assert records[-1].matches == 1
    torch.testing.assert_close(after.module()(x, keep), model(x, keep), rtol=1e-4, atol=1e-5)
    keep2 = torch.ones_like(keep)
    keep2[..., :2] = False  # a different padding pattern at run time
    torch.testing.assert_close(after.module()(x, keep2), model(x, keep2), rtol=1e-4, atol=1e-5)


class RolledHeads(Attention):
    def forward(self, x):
        q = torch.roll(self.heads(self.q(x), H), 1, dims=1)  # mixes heads: nothing to split per head
        k, v = self.heads(self.k(x), H), self.heads(self.v(x), H)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, C))


def test_refuses_what_it_cannot_follow_per_head_and_still_compiles():
    model = RolledHeads().eval()
    x = torch.randn(B, S, C)
    c = anefx.compile(model, (x,))
    record = next(p for p in c.passes if p.name == "split_head_attention")
    assert record.matches == 0
    reason = record.refusals[0].reason
    assert reason.startswith("q/k/v come from a roll op") and "aten." not in reason
    assert "x.view(B, S, H, d).transpose(1, 2) of a projection" in reason  # what would make it split
    assert ops(c.rewritten)["scaled_dot_product_attention"] == 1
    torch.testing.assert_close(c.rewritten.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_refuses_dropout():
    class Dropping(Attention):
        def forward(self, x):
            q, k, v = self.heads(self.q(x), H), self.heads(self.k(x), H), self.heads(self.v(x), H)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    _, after, records = rewrite(Dropping().eval(), (torch.randn(B, S, C),), ATTENTION_RULES, verify=False)
    assert records[-1].refusals[0].reason.startswith("attention dropout p=0.5")


def test_attention_option_keeps_fused_sdpa(tmp_path):
    model = Attention(causal=True).eval()
    x = torch.randn(B, S, C)
    c = anefx.compile(model, (x,), attention="sdpa")
    assert "split_head_attention" not in c.options["rules"]
    s = ane_summary(program(c, tmp_path))
    assert s["types"]["softmax"] + s["types"]["scaled_dot_product_attention"] == 1
    with pytest.raises(anefx.OptionError, match="attention='flash' is not one of split_heads, sdpa"):
        anefx.compile(model, (x,), attention="flash")


def test_lowered_program_per_head(tmp_path):
    model = Attention(rotary=True, causal=True, kv_heads=2).eval()
    c = anefx.compile(model, (torch.randn(B, S, C),))
    s = ane_summary(program(c, tmp_path))
    assert s["types"]["einsum"] == 2 * H and s["softmax_shapes"] == {(B, S, 1, S): H}
    assert s["softmax_axes"] == {1: H} and s["max_rank"] <= 4
    assert s["layout_ops"] <= 3  # entry, exit, and k's transpose
