"""split_wide_embedding: an embedding table with more than 16384 rows is gathered from in pieces.

Before (vocabulary 40000)::

    e = aten.embedding(p_embed_tokens_weight, input_ids)            # table (40000, C) → (B, S, C)

After (pieces of 13334, 13333, 13333 rows; every piece is gathered with its own clamped index)::

    t_0 = aten.slice(p_embed_tokens_weight, 0, 0, 13334)            # constants: coremltools folds them
    e_0 = aten.embedding(t_0, aten.where(input_ids < 0, input_ids - 13334, aten.clamp_max(input_ids, 13333)))
    t_1 = aten.slice(p_embed_tokens_weight, 0, 13334, 26667)
    e_1 = aten.embedding(t_1, aten.clamp_max(aten.clamp_min(aten.sub(input_ids, 13334), 0), 13332))
    t_2 = aten.slice(p_embed_tokens_weight, 0, 26667, 40000)
    e_2 = aten.embedding(t_2, aten.clamp_min(aten.sub(input_ids, 26667), 0))
    ids = aten.unsqueeze(input_ids, -1)                             # (B, S, 1)
    e   = aten.where(aten.lt(ids, 13334), e_0, aten.where(aten.lt(ids, 26667), e_1, e_2))

Exact: an id is answered by the piece that holds its row (the first and last row of each piece
included); the other pieces read a clamped row that `where` does not select. An id outside the table
reaches a gather out of its piece's range — one ≥ the vocabulary the last piece unclamped above, a
negative one the first piece shifted below −13334 — which torch refuses (IndexError, as for the whole
table) and anefx's MIL interpreter refuses (an out-of-bound gather, undefined on the device). No id
silently reads another id's row. (An unsplit `aten.embedding` lowers with coremltools' wrap of negative
indices, so there −1 reads the last row; the shift keeps the split program from doing the same.)

Why: the Neural Engine holds no tensor dimension over 16384, and the saved program of an LLM must have
none (issue 11); a table of (vocabulary, hidden) has one. The gathers run on the CPU either way
(gather is not an ANE layer); the split costs a few integer ops on the ids (B, S) per piece and one
select on (B, S, C) per piece boundary, no transpose or reshape (the layout rule gathers each piece
straight into (B, C, 1, S) at batch 1).

Default rules: yes, for the same reasons as `split_wide_conv`: nothing to match without a wide table, and
the never-worse guard's predicted layout cost is unchanged where it matches.

Refuses: a table computed in the program (slicing it would keep its wide tensor).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from anefx.graph import emit, is_constant, shape
from anefx.rule import Context, Refusal, Rule
from rewrites.split_wide_conv import MAX_CHANNELS, piece_bounds, piece_sizes

aten = torch.ops.aten
EMBEDDING = aten.embedding.default


def _wide(node: fx.Node, max_rows: int) -> bool:
    return (node.op == "call_function" and node.target is EMBEDDING and isinstance(node.args[0], fx.Node)
            and shape(node.args[0])[0] > max_rows)


def _split(node: fx.Node, ctx: Context, max_rows: int) -> fx.Node:
    graph, (table, ids) = ctx.graph, node.args[:2]

    def op(target, *args):
        return emit(graph, target, args, origin=node, rule=ctx.rule)

    bounds = piece_bounds(piece_sizes(shape(table)[0], max_rows))
    gathered = []
    for k, (start, end) in enumerate(bounds):
        if k == 0:  # a negative id stays out of range, even where lowering wraps negative indices
            local = op(aten.where.self, op(aten.lt.Scalar, ids, 0), op(aten.sub.Tensor, ids, end),
                       op(aten.clamp_max.default, ids, end - 1))
        elif k < len(bounds) - 1:
            local = op(aten.clamp_max.default, op(aten.clamp_min.default, op(aten.sub.Tensor, ids, start), 0),
                       end - start - 1)
        else:  # the last piece keeps ids ≥ the vocabulary out of its range
            local = op(aten.clamp_min.default, op(aten.sub.Tensor, ids, start), 0)
        gathered.append(op(EMBEDDING, op(aten.slice.Tensor, table, 0, start, end), local, *node.args[2:]))
    column = op(aten.unsqueeze.default, ids, -1)  # (..., 1): broadcasts over the embedding's channels
    selected = gathered[-1]
    for (_, end), rows in zip(bounds[-2::-1], gathered[-2::-1], strict=True):
        selected = op(aten.where.self, op(aten.lt.Scalar, column, end), rows, selected)
    return selected


def make_rule(max_rows: int = MAX_CHANNELS) -> Rule:
    """The rule for another limit (tests use small ones); RULE is the Neural Engine's 16384."""

    def run(ctx: Context) -> tuple[int, list[Refusal]]:
        split, refusals = 0, []
        for node in [n for n in ctx.graph.nodes if _wide(n, max_rows)]:
            if not is_constant(node.args[0], ctx.ep):
                refusals.append(Refusal(node.name, node.name, "the table is computed in the program: slicing it "
                                        "would keep its wide tensor"))
                continue
            with ctx.graph.inserting_before(node):
                node.replace_all_uses_with(_split(node, ctx, max_rows))
            ctx.graph.erase_node(node)
            split += 1
        return split, refusals

    return Rule(name="split_wide_embedding",
                summary=f"an embedding table with more than {max_rows} rows is gathered from in pieces, each id "
                        "answered by the piece that holds its row",
                run=run)


RULE = make_rule()
