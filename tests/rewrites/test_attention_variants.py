"""split_head_attention on the attention variants real models use: per-head qk-norm (Qwen3), a fused QKV
projection split by view + split/getitem (GPT-NeoX), nn.MultiheadAttention — each as a small torch module
and as the HF model from a tiny config (random weights)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import anefx
from tests.helpers import ane_summary, ops, program, tensors

B, S, H, D = 1, 12, 4, 8
C = H * D


class QKNormAttention(torch.nn.Module):
    """Qwen3's attention: RMSNorm of each head of q and k (over d, on (B, S, H, d)) before the transpose."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(C, C) for _ in range(4))
        self.q_norm, self.k_norm = torch.nn.RMSNorm(D, eps=1e-6), torch.nn.RMSNorm(D, eps=1e-6)
        with torch.no_grad():
            self.q_norm.weight.uniform_(0.5, 1.5)
            self.k_norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        q = self.q_norm(self.q(x).view(B, S, H, D)).transpose(1, 2)
        k = self.k_norm(self.k(x).view(B, S, H, D)).transpose(1, 2)
        v = self.v(x).view(B, S, H, D).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(B, S, C))


class FusedQKVAttention(torch.nn.Module):
    """GPT-NeoX's attention: one projection to (B, S, H, 3·d), split per head into q, k, v."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C)

    def forward(self, x):
        q, k, v = self.qkv(x).view(B, S, H, 3 * D).transpose(1, 2).split(D, -1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(B, S, C))


class MultiheadAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(C, H, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


def assert_split_per_head(model, args, tmp_path, heads, rtol=1e-4, atol=1e-5):
    """The rule applies, the rewritten graph equals the model, the program has one softmax per head over
    axis 1, no rank-5 tensor, and no more layout ops than plain coremltools."""
    c = anefx.compile(model, args, progress=False, package_check="skip")
    record = next(p for p in c.passes if p.name == "split_head_attention")
    assert record.status == "applied" and record.refusals == [], record
    assert ops(c.rewritten)["scaled_dot_product_attention"] == 0
    with torch.no_grad():
        expected, actual = tensors(model(*args)), tensors(c.rewritten.module()(*args))
    torch.testing.assert_close(actual[0], expected[0], rtol=rtol, atol=atol)
    s = ane_summary(program(c, tmp_path / "anefx"))
    assert s["softmax_axes"] == {1: heads} and s["types"]["scaled_dot_product_attention"] == 0
    assert s["max_rank"] <= 4
    (tmp_path / "plain").mkdir()
    plain = ane_summary(program(anefx.compile(model, args, rules=[], progress=False, package_check="skip"),
                                tmp_path / "plain"))
    assert s["layout_ops"] <= plain["layout_ops"], (s["layout_ops"], plain["layout_ops"])
    return c, s


def test_qk_norm_is_replayed_per_head_on_the_channel_axis(tmp_path):
    torch.manual_seed(0)
    c, s = assert_split_per_head(QKNormAttention().eval(), (torch.randn(B, S, C),), tmp_path, H)
    assert s["types"]["layer_norm"] == 2 * H  # each head's q and k normalised over its d channels


def test_fused_qkv_projection_is_sliced_per_head(tmp_path):
    torch.manual_seed(0)
    c, s = assert_split_per_head(FusedQKVAttention().eval(), (torch.randn(B, S, C),), tmp_path, H)
    assert s["types"]["conv"] == 2  # the fused projection stays one convolution


def test_nn_multihead_attention_batch_first(tmp_path):
    torch.manual_seed(0)
    assert_split_per_head(MultiheadAttention().eval(), (torch.randn(B, S, C),), tmp_path, H)


def test_a_norm_over_heads_before_the_split_is_refused_with_the_reason():
    class NormOverHeads(QKNormAttention):
        def forward(self, x):
            q = F.layer_norm(self.q(x).view(B, S, H, D), (H, D)).transpose(1, 2)  # mixes the heads
            k, v = self.k(x).view(B, S, H, D).transpose(1, 2), self.v(x).view(B, S, H, D).transpose(1, 2)
            return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, C))

    model, x = NormOverHeads().eval(), torch.randn(B, S, C)
    c = anefx.compile(model, (x,), progress=False, package_check="skip")
    record = next(p for p in c.passes if p.name == "split_head_attention")
    assert record.matches == 0
    reason = record.refusals[0].reason
    assert "before the head split" in reason and "per-head ops on the head's last axis" in reason
    assert "a norm over more than the head's last axis" in reason and "aten." not in reason
    torch.testing.assert_close(c.rewritten.module()(x), model(x), rtol=1e-4, atol=1e-5)


def hf_decoder(config_name: str, model_name: str, **config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = getattr(transformers, config_name)(vocab_size=100, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=4,
                                              max_position_embeddings=64, **config)
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    return getattr(transformers, model_name)(cfg).eval(), (ids,)


def test_hf_qwen3_qk_norm_and_grouped_kv(tmp_path):
    model, args = hf_decoder("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=8)
    c, s = assert_split_per_head(model, args, tmp_path, 4)
    assert s["types"]["tile"] == 0 and s["types"]["expand_dims"] <= 2  # K/V shared, never repeated


@pytest.mark.slow
def test_hf_gpt_neox_fused_qkv(tmp_path):
    model, args = hf_decoder("GPTNeoXConfig", "GPTNeoXForCausalLM")
    assert_split_per_head(model, args, tmp_path, 4)


class SoftcappedAttention(torch.nn.Module):
    """Gemma2's eager attention: tanh(s / cap) · cap on the scores, a sliding-window causal mask."""

    def __init__(self, window=4, cap=3.0):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(C, C) for _ in range(4))
        i = torch.arange(S)
        keep = (i[None] <= i[:, None]) & (i[:, None] - i[None] < window)
        self.register_buffer("mask", torch.zeros(S, S).masked_fill(~keep, float("-inf"))[None, None],
                             persistent=False)
        self.cap = cap

    def forward(self, x):
        q, k, v = (p(x).view(B, S, H, D).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = torch.tanh(torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 / self.cap) * self.cap + self.mask
        weights = F.dropout(torch.softmax(scores, -1, dtype=torch.float32), 0.1, training=self.training)
        return self.o(torch.matmul(weights, v).transpose(1, 2).reshape(B, S, C))


def test_soft_capped_scores_and_sliding_window(tmp_path):
    torch.manual_seed(0)
    model = SoftcappedAttention().eval()
    x = 4 * torch.randn(B, S, C)  # large scores: the cap matters
    c, s = assert_split_per_head(model, (x,), tmp_path, H)
    assert s["types"]["tanh"] == H
    assert ops(c.rewritten)["tanh"] == H  # the cap on each head's scores, not dropped


@pytest.mark.slow
def test_hf_gemma2_softcap_sliding_window(tmp_path):
    model, args = hf_decoder("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=8,
                             sliding_window=4)
    assert_split_per_head(model, args, tmp_path, 4)


class BiasedEagerAttention(torch.nn.Module):
    """T5 / relative-position style: q @ kᵀ + a learned per-head bias, float32 softmax, dropout (eval)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(C, C) for _ in range(4))
        self.relative = torch.nn.Embedding(2 * S, H)

    def forward(self, x):
        q, k, v = (p(x).view(B, S, H, D).transpose(1, 2) for p in (self.q, self.k, self.v))
        i = torch.arange(S, device=x.device)
        bias = self.relative(i[None] - i[:, None] + S).permute(2, 0, 1)[None]  # (1, H, S, S)
        scores = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5 + bias
        weights = F.dropout(torch.softmax(scores, -1, dtype=torch.float32), 0.1, training=self.training)
        return self.o(torch.matmul(weights, v).transpose(1, 2).reshape(B, S, C))


def test_additive_per_head_bias_with_float32_softmax_and_dropout(tmp_path):
    torch.manual_seed(0)
    c, s = assert_split_per_head(BiasedEagerAttention().eval(), (torch.randn(B, S, C),), tmp_path, H)
    assert s["types"]["einsum"] == 2 * H


class AlibiAttention(torch.nn.Module):
    """Bloom's attention: baddbmm(alibi, q, kᵀ) on (B·H, S, d) views of (B, H, S, d) tensors."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C)
        self.register_buffer("alibi", torch.randn(B * H, 1, S), persistent=False)

    def forward(self, x):
        q, k, v = (t.transpose(1, 2).reshape(B * H, S, D) for t in self.qkv(x).view(B, S, H, 3, D).unbind(3))
        scores = torch.baddbmm(self.alibi, q, k.transpose(-1, -2), beta=1.0, alpha=D ** -0.5)
        weights = torch.softmax(scores.view(B, H, S, S), -1, dtype=torch.float32)
        out = torch.bmm(weights.view(B * H, S, S), v).view(B, H, S, D)
        return self.o(out.transpose(1, 2).reshape(B, S, C))


def test_alibi_baddbmm_on_batched_heads_is_split_per_head(tmp_path):
    torch.manual_seed(0)
    c, s = assert_split_per_head(AlibiAttention().eval(), (torch.randn(B, S, C),), tmp_path, H)
    assert ops(c.rewritten)["baddbmm"] == 0 and ops(c.rewritten)["bmm"] == 0
    assert s["types"]["einsum"] == 2 * H


def test_hf_t5_encoder_relative_position_bias_is_split():
    from rewrites import RULES
    from tests.helpers import rewrite

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    model, ids = transformers.T5EncoderModel(cfg).eval(), torch.randint(0, 100, (1, 12))
    _, after, records = rewrite(model, (ids,), [r for r in RULES if r.name == "split_head_attention"])
    assert records[-1].status == "applied" and records[-1].matches == 1
    assert ops(after)["_softmax"] == 4 and ops(after)["scaled_dot_product_attention"] == 0
    torch.testing.assert_close(after.module()(ids)[0], model(ids)[0], rtol=1e-4, atol=1e-5)
