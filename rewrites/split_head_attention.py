"""split_head_attention: attention becomes one small attention per head on (B, d, 1, S) slices.

Before (HF SDPA attention; q/k/v come from projections, the mask was folded to a constant)::

    q = aten.transpose(aten.view(q_proj, [B, S, H, d]), 1, 2)           # (B, H, S, d)  (k, v alike)
    o = aten.scaled_dot_product_attention(q, k, v, mask)                 # (B, H, S, d)

After::

    q4 = (B, C, 1, S) form of q_proj;  q_h = aten.slice(q4, 1, h·d, (h+1)·d) · scale   # (B, d, 1, S)
    kT = aten.transpose(k4, 1, 3)                                        # (B, S, 1, C_kv): once per layer
    k_j = split(kT, d, 3)[j]                                             # (B, S_k, 1, d)
    w_h = aten.softmax(einsum('bchq,bkhc->bkhq', q_h, k_j) + mask', 1)   # (B, S_k, 1, S_q)
    o_h = einsum('bkhq,bchk->bchq', w_h, v_j)                            # (B, d, 1, S_q)
    o4  = aten.cat([o_0, …, o_{H-1}], 1)                                 # (B, C, 1, S_q)

Ops between the head split and the attention (rotary embeddings: multiplies by cos/sin tables,
rotate-half slices and concats) are replayed per head on the channel axis. Grouped-query attention
(`repeat_kv`'s unsqueeze → expand → reshape, or SDPA's enable_gqa) indexes the shared K/V head
h // n_rep instead of materialising copies. Boolean, additive, causal and padding masks are moved to
(B, S_k, 1, S_q); where a mask can drop every key of a query, that query's output is 0, as SDPA's.
Eager attention (q @ kᵀ · scale + mask → softmax → @ v) is matched too (a fully masked row stays NaN,
as in torch).

Variants (q/k/v sources found by index in rewrites/attention_sources.py, proven element by element):

    Before (Qwen3 qk-norm, per-head RMSNorm → LayerNorm over [x, −x] by rmsnorm_to_layernorm)::
        q = transpose(slice(layer_norm(cat([view(q_proj, [B, S, H, d]), neg(…)], 3), [2d], γ2), 3, 0, d), 1, 2)
    After::
        q_h = slice(anefx.layer_norm(cat([q4[h·d:(h+1)·d], neg(…)], 1), 1, γ2), 1, 0, d)    # (B, d, 1, S)
    Before (GPT-NeoX fused QKV; Bloom / nn.MultiheadAttention select or view alike)::
        q, k, v = split(transpose(view(qkv_proj, [B, S, H, 3d]), 1, 2), d, -1)
    After::
        q_h = slice(qkv4, 1, 3d·h, 3d·h + d);  k_h = slice(qkv4, 1, 3d·h + d, …);  v_h likewise
    Before (eager with float32 softmax and dropout in eval; T5 relative-position bias; Gemma2 soft-cap)::
        w = clone(softmax(tanh(q @ kᵀ · scale / cap) · cap + bias, -1, float32));  o = w @ v
    After (eager attention is scaled where the model scales it: on the scores, as fp16 rounds it)::
        w_h = softmax(tanh(einsum(q_h, k_h) · scale / cap) · cap + bias_h', 1)    # bias_h' (B, S_k, 1, S_q)
    Before (nanoGPT: a registered tril buffer, masked_fill with -inf)::
        w = softmax(masked_fill(q @ kᵀ · scale, tril == 0, -inf), -1);  o = w @ v
    After::
        w_h = softmax(einsum(q_h, k_h) · scale + drop', 1)      # drop' a 0 / -inf constant (1, S_k, 1, S_q)
    Before (fp16 / bf16 eager, HF's eager_attention_forward)::
        w = clone(softmax(s, -1, float32).to(float16));  o = w @ v
    After::
        w_h = _to_copy(softmax(_to_copy(s_h, float32), 1), float16)
    Before (a KV cache held as state; kv_cache_write made its update a slice write; rewrites/attention_cache.py)::
        k = repeat_kv(slice_write(k_cache, k_new, 2, p));  o = sdpa(q, k, v, mask)    # k_cache (1, H_kv, T, d)
    After::
        k_all = slice_write(k_cache', transpose(cat(k_new_h), 1, 3), 1, p)    # k_cache' stored (1, T, 1, C_kv)
        w_h = softmax(einsum(q_h, slice(k_all, 3, j·d, (j+1)·d)) + mask', 1)    # j = h // n_rep, over all T
    Before (Bloom: alibi added by a baddbmm on (B·H, S, d) views; rewrites/attention_batched.py)::
        s = view(baddbmm(alibi, view(q, [B·H, S, d]), transpose(view(k, [B·H, S, d]), -1, -2), β, α), [B, H, S, S])
        o = bmm(view(softmax(s + mask, -1, float32), [B·H, S, S]), view(v, [B·H, S, d]))
    After::
        w_h = softmax(einsum(q_h, k_h) · α + (β · alibi + mask)_h', 1);  o = view(o4 as (B, H, S, d), [B·H, S, d])

Why: the ANE runs small 4-D einsums/matmuls with softmax over the channel axis well; a rank-4
(B, H, S, S) attention with softmax over the last axis, and the reshapes/transposes around it, are
slow there (Apple, "Deploying Transformers on the Apple Neural Engine", 2022).

Refuses: dropout in attention, a mask that does not broadcast to (…, S_q, S_k), q/k/v produced by ops it
cannot follow per head (reported with the op), ops before the head split that mix heads; any other
softmax(scores) @ v it finds is refused with what its scores are (masked_fill with a finite value, scores
from another op, (B·H, S, d) tensors that are not views of (B, H, S, d) ones) and how to write them so they
split — never left fused in silence.

Modules: attention_patterns (the forms matched, q/k/v/mask/scale read from a match), attention_heads
(q/k/v followed back to the projections, head h built as a (B, d, 1, S) slice), attention_per_head (the
per-head einsum attention and its masks), attention_sources (where each head lives in a projection, the
scores read), attention_batched (scores on (B·H, S, d) views: Bloom), attention_cache (k/v read from a KV
cache held as state: the cache stored per head in the Neural Engine's layout, written in place; see there).
"""

from __future__ import annotations

import torch.fx as fx

from anefx.graph import shape
from anefx.layout import simplify_layout_chains
from anefx.rule import Context, Match, Rule
from rewrites.attention_cache import CachedAttention, reads_cache
from rewrites.attention_heads import HeadTensors, Unfollowable
from rewrites.attention_patterns import attention_args, patterns
from rewrites.attention_per_head import PerHeadAttention


def check(match: Match, ctx: Context) -> str | None:
    a = attention_args(match)
    if "unsplit" in a:
        return f"attention left fused: {a['unsplit']}"
    for name in ("q", "k", "v"):
        if not isinstance(a[name], fx.Node) or len(shape(a[name])) != 4:
            return f"{name} is not a rank-4 (B, H, S, d) tensor"
    if a["dropout"]:
        return f"attention dropout p={a['dropout']} (compile the model in eval mode)"
    if not isinstance(a["scale"], float | int | None):
        return "the attention scale is a tensor"
    (_, h, sq, _), (_, hk, sk, _) = shape(a["q"]), shape(a["k"])
    if h % hk:
        return f"{h} query heads do not group over {hk} key/value heads"
    for mask in (a["mask"], a.get("dropped")):
        if mask is not None and (not isinstance(mask, fx.Node) or len(shape(mask)) > 4 or len(shape(mask)) < 2
                                 or shape(mask)[-2] not in (1, sq) or shape(mask)[-1] not in (1, sk)):
            return f"mask of shape {shape(mask) if isinstance(mask, fx.Node) else mask} does not broadcast to " \
                   f"(…, {sq}, {sk})"
        if mask is not None and len(shape(mask)) == 4 and shape(mask)[1] not in (1, h):
            return f"mask with {shape(mask)[1]} head entries for {h} heads"
    try:
        (CachedAttention if reads_cache(a) else HeadTensors)(ctx, match.output).plan(a)
    except Unfollowable as exc:
        return str(exc)
    return None


def replace(match: Match, ctx: Context) -> fx.Node:
    a = attention_args(match)
    return (CachedAttention if reads_cache(a) else PerHeadAttention)(ctx, match.output).build(a)


RULE = Rule(
    name="split_head_attention",
    summary="attention → one small einsum attention per head on (B, d, 1, S), softmax over axis 1",
    patterns=patterns,
    check=check,
    replace=replace,
    after=lambda ctx: simplify_layout_chains(ctx.graph, ctx.rule),
)
