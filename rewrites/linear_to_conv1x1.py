"""linear_to_conv1x1: every projection becomes a 1×1 convolution on a (B, C, 1, S) view.

Before (3-D input, nn.Linear)::

    y = aten.linear(x, W, b)                    # x (B, S, I), W (O, I) → y (B, S, O)

After::

    xt = aten.permute(x, [0, 2, 1])             # (B, I, S)
    x4 = aten.unsqueeze(xt, 2)                  # (B, I, 1, S)
    w4 = aten.view(W, [O, I, 1, 1])             # a view of the same weight, no copy
    y4 = aten.convolution(x4, w4, b, ...)       # (B, O, 1, S)
    y  = aten.permute(aten.squeeze(y4, [2]), [0, 2, 1])   # (B, S, O)

2-D inputs (N, I) become (N, I, 1, 1) (unit axes only, no transpose or reshape: plain coremltools keeps a
rank-2 linear without layout ops, and so does this); after a flatten of a (B, C, 1, 1) CNN feature map the
views cancel. Channels-last inputs (B, H, W, I) (ConvNeXt, after a permute of (B, C, H, W)) run as a
convolution on (B, I, H, W); the permutes cancel. GPT-2's `Conv1D`
(`view → addmm(b, x, W) → view` with W of shape (I, O)) and `x @ W` with a constant W become the same
convolution, the weight viewed through a permute.

Why: the ANE runs 1×1 convolutions on (B, C, 1, S) natively; `linear` / `matmul` are executed as
something slower, and (B, S, C) puts the small channel axis last where the ANE pads it to 64 bytes.
The permutes it introduces are removed by the layout rule; on their own they are cheap.

Refuses: a weight that is not a constant (activation @ activation is attention, not a projection);
inputs that are not 2-D, 3-D or 4-D; addmm with non-default alpha/beta.
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx

from anefx.graph import emit, is_constant, shape
from anefx.rule import Context, Match, Pattern, Rule

aten = torch.ops.aten
F = torch.nn.functional


def _linear(x, w, b):
    return F.linear(x, w, b)


def _linear_nobias(x, w):
    return F.linear(x, w)


def _conv1d_gpt2(x, w, b):  # transformers.pytorch_utils.Conv1D
    size_out = x.size()[:-1] + (w.shape[1],)
    return torch.addmm(b, x.view(-1, x.size(-1)), w).view(size_out)


def _addmm(x, w, b):
    return torch.addmm(b, x, w)


def _matmul(x, w):
    return x @ w


def _mm(x, w):
    return torch.mm(x, w)


@functools.cache
def patterns() -> list[Pattern]:
    x3, x2, w, wt, b = (torch.randn(2, 5, 8), torch.randn(5, 8), torch.randn(6, 8), torch.randn(8, 6),
                        torch.randn(6))
    return [
        Pattern("linear", _linear, lambda: (x3, w, b)),
        Pattern("linear, no bias", _linear_nobias, lambda: (x3, w)),
        Pattern("Conv1D (view, addmm, view)", _conv1d_gpt2, lambda: (x3, wt, b)),
        Pattern("addmm", _addmm, lambda: (x2, wt, b)),
        Pattern("matmul", _matmul, lambda: (x3, wt)),
        Pattern("mm", _mm, lambda: (x2, wt)),
    ]


def _weight_layout(match: Match) -> str:
    """'OI' for linear weights (O, I), 'IO' for addmm / mm / matmul weights (I, O)."""
    return "OI" if match.pattern.name.startswith("linear") else "IO"


def check(match: Match, ctx: Context) -> str | None:
    x, w = match.inputs[0], match.inputs[1]
    bias = match.inputs[2] if len(match.inputs) > 2 else None
    if not isinstance(w, fx.Node) or not is_constant(w, ctx.ep):
        return "weight is an activation, not a constant: this is a matmul between tensors, not a projection"
    if bias is not None and not is_constant(bias, ctx.ep):
        return "bias is not a constant"
    if len(shape(w)) != 2:
        return f"weight has rank {len(shape(w))}, expected 2"
    if len(shape(x)) not in (2, 3, 4):
        return f"input has rank {len(shape(x))}: only 2-D, 3-D and channels-last 4-D inputs are rewritten"
    if len(shape(x)) == 4 and match.pattern.name.startswith("Conv1D"):
        return "Conv1D on a rank-4 input: only nn.Linear / x @ W on (B, H, W, C) are rewritten"
    addmm = match.find(aten.addmm.default)
    if addmm is not None and (addmm.kwargs.get("beta", 1) != 1 or addmm.kwargs.get("alpha", 1) != 1):
        return "addmm with alpha/beta other than 1"
    if bias is not None and len(shape(bias)) != 1:
        return f"bias of shape {shape(bias)} is not a vector"
    if not match.output.meta["val"].dtype.is_floating_point:
        return "integer projection"
    return None


def replace(match: Match, ctx: Context) -> fx.Node:
    g, out, rule = ctx.graph, match.output, ctx.rule
    x, w = match.inputs[0], match.inputs[1]
    bias = match.inputs[2] if len(match.inputs) > 2 else None

    def op(target, *args):
        return emit(g, target, args, origin=out, rule=rule)

    if _weight_layout(match) == "IO":
        w = op(aten.permute.default, w, [1, 0])  # (O, I), a view
    O, I = shape(w)
    w4 = op(aten.view.default, w, [O, I, 1, 1]) if w.meta["val"].is_contiguous() else \
        op(aten.unsqueeze.default, op(aten.unsqueeze.default, w, 2), 3)  # (O, I, 1, 1)
    y4 = op(aten.convolution.default, _to_nchw(x, op), w4, bias, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    y = _from_nchw(y4, len(shape(x)), op)
    if tuple(shape(y)) != shape(out):
        y = op(aten.view.default, y, list(shape(out)))  # the pattern's own closing view (Conv1D, matmul)
    return y


def _to_nchw(x: fx.Node, op) -> fx.Node:
    """The conv input: (B, S, I) → (B, I, 1, S); (N, I) → (N, I, 1, 1) (unit axes only: no copy, no reshape);
    channels-last (B, H, W, I) → (B, I, H, W), which cancels against the permute that made it."""
    rank = len(shape(x))
    if rank == 3:
        return op(aten.unsqueeze.default, op(aten.permute.default, x, [0, 2, 1]), 2)
    if rank == 2:
        return op(aten.unsqueeze.default, op(aten.unsqueeze.default, x, 2), 3)
    return op(aten.permute.default, x, [0, 3, 1, 2])


def _from_nchw(y4: fx.Node, rank: int, op) -> fx.Node:
    if rank == 3:
        return op(aten.permute.default, op(aten.squeeze.dims, y4, [2]), [0, 2, 1])  # (B, S, O)
    if rank == 2:
        return op(aten.squeeze.dims, y4, [2, 3])  # (N, O)
    return op(aten.permute.default, y4, [0, 2, 3, 1])  # (B, H, W, O)


RULE = Rule(
    name="linear_to_conv1x1",
    summary="projections (linear, addmm, mm, x @ W) become 1×1 conv2d on a (B, C, 1, S) view",
    patterns=patterns,
    check=check,
    replace=replace,
)
