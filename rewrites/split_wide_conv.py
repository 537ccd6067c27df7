"""split_wide_conv: a convolution (or linear) with more than 16384 output channels runs as balanced pieces.

Before (an LM head, vocabulary 40000; the rule runs first, on the graph as exported)::

    logits = aten.linear(h, p_lm_head_weight)                       # (1, S, 40000)

After (ceil(40000 / 16384) = 3 pieces of 13334, 13333, 13333 channels)::

    w_0 = aten.slice(p_lm_head_weight, 0, 0, 13334)                 # constants: coremltools folds them
    y_0 = aten.linear(h, w_0)                                       # (1, S, 13334)
    …
    logits = aten.cat([y_0, y_1, y_2], 2)                           # (1, S, 40000)

`linear_to_conv1x1` turns each piece into a 1×1 convolution and `layout_bc1s` moves the cat to the channel
axis: the program computes `cat([conv(x4, w_0), conv(x4, w_1), conv(x4, w_2)], 1)` on (B, C, 1, S).
Convolutions of the model (`conv1d`/`conv2d`/`conv3d`, and `aten.convolution`) are split the same way on
their channel axis.

The weight and bias are sliced in the graph (views of the model's tensors; nothing is copied or changed in
place), so the rewrite is exact: each output channel is computed by the same dot product as before.
`anefx.llm.head` turns the cat into separate outputs (or an in-model argmax) so that no tensor of the
saved program is wider than 16384.

Why: the Neural Engine holds no tensor dimension over 16384 (Apple, "Deploying Transformers on the Apple
Neural Engine"); a wider convolution — every LM head: 32000, 128256, 151936 — cannot be placed on it at
all. Split, the pieces can, and the cat is the only wide op left (in a program that must return the
full logits).

Default rules: yes, and first. It matches nothing in a program without a wide projection (no cost), and
where it matches it adds k - 1 projections and one cat, no transpose or reshape: the never-worse guard's
predicted layout cost is unchanged (tests/test_head_split.py checks it on a vocabulary-40000 Llama). Being
first, it stays when the guard rolls back a later rule (the guard keeps the last stage that is not worse):
the head then runs as linear pieces. The cost of running first: a projection over
16384 that attention reads (a fused QKV that wide) is split before `split_head_attention` sees it, which
may then leave that attention fused.

Not covered: a head written as `x @ W` or `addmm` (HF heads are `nn.Linear`) becomes a wide convolution
later, in `linear_to_conv1x1`; an MLP wider than 16384 (70B-class models) is split, but the cat of its
pieces feeds the down projection whole.

Refuses: a weight computed in the program (slicing it would keep its wide tensor), grouped and
transposed convolutions (their output channels do not map to weight rows one to one).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from anefx.graph import emit, is_constant, shape
from anefx.rule import Context, Refusal, Rule

aten = torch.ops.aten
MAX_CHANNELS = 16384  # the largest tensor dimension the Neural Engine holds
CONV = aten.convolution.default  # what linear_to_conv1x1 emits: (x, w, b, stride, padding, dilation, transposed, …)
CONV_ND = {aten.conv1d.default, aten.conv1d.padding, aten.conv2d.default, aten.conv2d.padding,
           aten.conv3d.default, aten.conv3d.padding}  # (x, w, b, stride, padding, dilation, groups), as exported
LINEAR = aten.linear.default


def piece_sizes(channels: int, max_channels: int = MAX_CHANNELS) -> list[int]:
    """ceil(channels / max_channels) sizes that differ by at most one and add up to `channels`."""
    count = -(-channels // max_channels)
    base, extra = divmod(channels, count)
    return [base + 1] * extra + [base] * (count - extra)


def piece_bounds(sizes: list[int]) -> list[tuple[int, int]]:
    """[(start, end)] of consecutive pieces of these sizes."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def _refusal(node: fx.Node, ctx: Context) -> str | None:
    weight = node.args[1]
    if not is_constant(weight, ctx.ep):
        return "the weight is computed in the program: slicing it would keep its wide tensor"
    if node.target is CONV and (node.args[6] or node.args[8] != 1):
        return "a transposed or grouped convolution: its output channels are not one weight row each"
    if node.target in CONV_ND and (node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)) != 1:
        return "a grouped convolution: its output channels are not one weight row each"
    return None


def _wide(node: fx.Node, max_channels: int) -> bool:
    return (node.op == "call_function" and (node.target in (CONV, LINEAR) or node.target in CONV_ND)
            and isinstance(node.args[1], fx.Node) and shape(node.args[1])[0] > max_channels)


def _split(node: fx.Node, ctx: Context, max_channels: int) -> fx.Node:
    """cat([op(x, w[a:b], bias[a:b]) for each piece]) on the channel axis."""
    graph, weight = ctx.graph, node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}

    def op(target, *args, **kwargs):
        return emit(graph, target, args, kwargs, origin=node, rule=ctx.rule)

    pieces = []
    for start, end in piece_bounds(piece_sizes(shape(weight)[0], max_channels)):
        w = op(aten.slice.Tensor, weight, 0, start, end)
        b = None if bias is None else op(aten.slice.Tensor, bias, 0, start, end)
        pieces.append(op(node.target, node.args[0], w, b, *node.args[3:], **kwargs))
    axis = len(shape(node)) - 1 if node.target is LINEAR else 1
    return op(aten.cat.default, pieces, axis)


def make_rule(max_channels: int = MAX_CHANNELS) -> Rule:
    """The rule for another limit (tests use small ones); RULE is the Neural Engine's 16384."""

    def run(ctx: Context) -> tuple[int, list[Refusal]]:
        split, refusals = 0, []
        for node in [n for n in ctx.graph.nodes if _wide(n, max_channels)]:
            reason = _refusal(node, ctx)
            if reason is not None:
                refusals.append(Refusal(_where(node), node.name, reason))
                continue
            with ctx.graph.inserting_before(node):
                node.replace_all_uses_with(_split(node, ctx, max_channels))
            ctx.graph.erase_node(node)
            split += 1
        return split, refusals

    return Rule(name="split_wide_conv",
                summary=f"a conv / linear with more than {max_channels} output channels runs as balanced pieces "
                        "and a cat (the Neural Engine holds no dimension over 16384)",
                run=run)


def _where(node: fx.Node) -> str:
    from anefx.graph import module_path

    return module_path(node) or node.name


RULE = make_rule()
