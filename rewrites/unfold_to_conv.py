"""unfold_to_conv: `x.unfold(dim, size, step)` (framing a signal) becomes a strided convolution.

coremltools does not convert `aten.unfold`. Frame f of the signal is x[f·step : f·step + size]: a
convolution with `size` output channels whose kernel c is one at tap c (an identity kernel), with stride
`step`, computes every frame at once — exactly (each output is one input times 1), gather-free.

Before::

    frames = aten.unfold(x, -1, size, step)       # x (B, L) → (B, F, size), F = (L − size) // step + 1

After::

    x4 = aten.reshape(x, [B, 1, 1, L])
    y  = aten.convolution(x4, I, None, [1, step])  # I (size, 1, 1, size) identity → (B, size, 1, F)
    frames = aten.permute(aten.squeeze(y, [2]), [0, 2, 1])     # (B, F, size), unfold's layout

The unfolded axis may be any axis of a tensor of any rank: the other axes are folded into the batch and
restored around the convolution. When frames do not overlap (step == size) the frames are a reshape of
the signal (a slice and a view), no convolution.

Refuses: integer or complex tensors (the ANE convolves floating point only).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from anefx.graph import add_constant, emit, module_path, shape
from anefx.rule import Context, Refusal, Rule

aten = torch.ops.aten


def refusal(node: fx.Node) -> str | None:
    dtype = node.args[0].meta["val"].dtype
    if node.args[0].meta["val"].dim() == 0:
        return "unfold of a 0-d tensor: nothing to frame"
    if not dtype.is_floating_point:
        return f"unfold of a {dtype} tensor: only floating-point signals are framed with a convolution"
    return None


def rewrite(node: fx.Node, ctx: Context) -> fx.Node:
    x, dim, size, step = node.args
    dims = shape(x)
    rank = len(dims)
    dim %= rank

    def op(target, *args):
        return emit(ctx.graph, target, args, origin=node, rule=ctx.rule)

    others = [d for d in range(rank) if d != dim]
    batch = [dims[d] for d in others]
    frames = (dims[dim] - size) // step + 1
    signal = x if dim == rank - 1 else op(aten.permute.default, x, [*others, dim])
    if step == size:  # frames do not overlap: they are the signal's first frames·size samples, reshaped
        kept = op(aten.slice.Tensor, signal, -1, 0, frames * size) if frames * size != dims[dim] else signal
        framed = op(aten.reshape.default, kept, [*batch, frames, size])
    else:
        identity = torch.eye(size, dtype=x.meta["val"].dtype).reshape(size, 1, 1, size)
        framed = framed_conv(signal, [add_constant(ctx.ep, "unfold_identity", identity)], step, op)[0]
    if dim == rank - 1:
        return framed
    order = list(range(rank - 1))  # framed: (*others, frames, size) → frames back at `dim`
    order.insert(dim, rank - 1)
    return op(aten.permute.default, framed, [*order, rank])


def framed_conv(signal: fx.Node, kernels: list[fx.Node], step: int, op) -> list[fx.Node]:
    """signal (*batch, L) → one (*batch, frames, C) per kernel: each frame (`size` samples, every `step`) times
    each of the C filters of a constant kernel (C, 1, 1, size), as one convolution of stride `step`."""
    *batch, length = shape(signal)
    flat = op(aten.reshape.default, signal, [math.prod(batch), 1, 1, length])
    framed = []
    for kernel in kernels:
        channels, _, _, size = shape(kernel)
        conv = op(aten.convolution.default, flat, kernel, None, [1, step], [0, 0], [1, 1], False, [0, 0], 1)
        frames = op(aten.permute.default, op(aten.squeeze.dims, conv, [2]), [0, 2, 1])  # (N, frames, C)
        framed.append(frames if len(batch) == 1 else
                      op(aten.reshape.default, frames, [*batch, (length - size) // step + 1, channels]))
    return framed


def run(ctx: Context) -> tuple[int, list[Refusal]]:
    rewritten, refusals = 0, []
    for node in [n for n in ctx.graph.nodes if n.op == "call_function" and n.target == aten.unfold.default]:
        reason = refusal(node)
        if reason is not None:
            refusals.append(Refusal(module_path(node) or node.name, node.name, reason))
            continue
        with ctx.graph.inserting_before(node):
            new = rewrite(node, ctx)
        node.replace_all_uses_with(new)
        ctx.graph.erase_node(node)
        rewritten += 1
    return rewritten, refusals


RULE = Rule(
    name="unfold_to_conv",
    summary="x.unfold(dim, size, step) becomes a strided convolution with an identity kernel (a reshape when "
            "frames do not overlap), in unfold's layout",
    run=run,
    ane=False,  # coremltools lowers no unfold: every compute unit needs it
)
