"""sdpa_masked_rows: a fused SDPA whose mask can drop every key of a query returns 0 there, as torch's.

torch's `scaled_dot_product_attention` gives 0 for a query whose keys are all masked; the CoreML op
coremltools lowers it to runs softmax over only −inf there, which is NaN. Every SDPA that stays fused
(`attention="sdpa"`, compute units without the Neural Engine, or an attention `split_head_attention`
refused) and whose mask can drop a whole row — a mask input, or a constant with such a row — is
guarded.

Before::

    o = aten.scaled_dot_product_attention(q, k, v, mask)                 # mask (…, S_q, S_k)

After (boolean mask; an additive one is tested with amax(mask) > −inf and zeroed with where)::

    kept = aten.gt(aten.amax(mask.float(), [-1], True), 0)              # (…, S_q, 1): a key is kept
    safe = aten.logical_or(mask, aten.logical_not(kept))                 # dropped rows see every key
    o    = aten.where(kept, aten.scaled_dot_product_attention(q, k, v, safe), 0)

Why: without the guard the lowered program returns NaN where the model returns 0 (a padded query
under a causal and padding mask, for instance) — a silent wrong result the MIL interpreter shows.

Refuses: nothing; an SDPA without a mask, or with a constant mask that keeps a key in every row, is
left as it is.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from anefx.graph import add_constant, constant_value, emit
from anefx.rule import Context, Refusal, Rule

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def _mask_of(node: fx.Node) -> tuple[fx.Node | None, int | None]:
    """The SDPA's mask and where it sits: a positional index, or None when it is the attn_mask keyword."""
    if len(node.args) > 3:
        return node.args[3], 3
    return node.kwargs.get("attn_mask"), None


def can_drop_row(mask: fx.Node, ctx: Context) -> bool:
    """A mask input can; a constant can when some row masks every key."""
    value = constant_value(mask, ctx.ep)
    if value is None:
        return True
    dropped = ~value if value.dtype == torch.bool else torch.isneginf(value)
    return bool(dropped.all(dim=-1).any())


def run(ctx: Context) -> tuple[int, list[Refusal]]:
    guarded = 0
    for node in list(ctx.graph.nodes):
        if node.op != "call_function" or node.target is not SDPA:
            continue
        mask, position = _mask_of(node)
        if not isinstance(mask, fx.Node) or not can_drop_row(mask, ctx):
            continue
        _guard(node, mask, position, ctx)
        guarded += 1
    return guarded, []


def _guard(node: fx.Node, mask: fx.Node, position: int | None, ctx: Context) -> None:
    graph = ctx.graph

    def op(target, *args, **kwargs):
        return emit(graph, target, args, kwargs, origin=node, rule=ctx.rule)

    dtype = node.meta["val"].dtype
    with graph.inserting_before(node):
        if mask.meta["val"].dtype == torch.bool:
            as_float = op(aten._to_copy.default, mask, dtype=dtype)
            kept = op(aten.gt.Scalar, op(aten.amax.default, as_float, [-1], True), 0.0)  # (…, S_q, 1)
            safe = op(aten.logical_or.default, mask, op(aten.logical_not.default, kept))
        else:
            kept = op(aten.gt.Scalar, op(aten.amax.default, mask, [-1], True), float("-inf"))
            zero = add_constant(ctx.ep, "masked_row_bias", torch.zeros((), dtype=mask.meta["val"].dtype))
            safe = op(aten.where.self, kept, mask, zero)
    if position is None:
        node.kwargs = {**node.kwargs, "attn_mask": safe}
    else:
        node.args = (*node.args[:position], safe, *node.args[position + 1:])
    users = list(node.users)
    zero = add_constant(ctx.ep, "masked_row", torch.zeros((), dtype=dtype))
    with graph.inserting_after(node):
        out = op(aten.where.self, kept, node, zero)  # (B, H, S_q, d)
    for user in users:
        user.replace_input_with(node, out)


RULE = Rule(
    name="sdpa_masked_rows",
    summary="a fused SDPA whose mask can drop every key of a query returns 0 there, as torch's does",
    run=run,
    ane=False,
)
