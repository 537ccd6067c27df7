"""layernorm_channels: a LayerNorm over the last axis of a (B, S, C) tensor normalises channels in
(B, C, 1, S) instead, lowering to one `layer_norm(axes=[1])` with γ and β fused.

Before::

    y = aten.layer_norm(x, [C], γ, β, eps)                    # x (B, S, C)

After::

    x4 = aten.unsqueeze(aten.permute(x, [0, 2, 1]), 2)        # (B, C, 1, S)
    y4 = anefx.layer_norm(x4, 1, γ, β, eps)                   # (B, C, 1, S) → MIL layer_norm(axes=[1])
    y  = aten.permute(aten.squeeze(y4, [2]), [0, 2, 1])       # (B, S, C)

The conversions around the norm cancel against their neighbours (the 1×1 convolutions' own, and the
layout rule's), so in the final program the norm reads and writes (B, C, 1, S) directly. It also
applies to the LayerNorm over [x, −x] that `rmsnorm_to_layernorm` produces.

Why: on the ANE, LayerNorm over the channel axis of (B, C, 1, S) is native; over the last axis of
(B, S, C) it normalises the padded axis. coremltools fuses a hand-written channel norm only in one
exact form, so anefx emits its own op with a converter to `layer_norm(axes=[1])`.

A channels-last LayerNorm (ConvNeXt: over C of (B, H, W, C), after a permute of a (B, C, H, W) tensor)
becomes the same channel norm over axis 1 of (B, C, H, W); the permutes around it cancel.

Refuses: a norm over more than one axis; inputs that are not rank 3 or 4.
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx

import anefx.ops  # noqa: F401 - defines torch.ops.anefx.layer_norm
from anefx.graph import emit, shape
from anefx.layout import BC1S, from_bc1s, simplify_layout_chains, to_physical
from anefx.rule import Context, Match, Pattern, Rule

aten = torch.ops.aten


def _layer_norm(x, w, b):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _layer_norm_no_affine(x):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), None, None, 1e-5)


@functools.cache
def patterns() -> list[Pattern]:
    return [Pattern("layer_norm", _layer_norm, lambda: (torch.randn(2, 5, 8), torch.randn(8), torch.randn(8))),
            Pattern("layer_norm, no γ/β", _layer_norm_no_affine, lambda: (torch.randn(2, 5, 8),))]


def check(match: Match, ctx: Context) -> str | None:
    node = match.find(aten.layer_norm.default)
    if len(node.args[1]) != 1:
        return f"layer_norm over {len(node.args[1])} axes; only one axis maps to channels"
    if len(shape(match.inputs[0])) not in (3, 4):
        return (f"input of rank {len(shape(match.inputs[0]))}: only (B, S, C) and channels-last (B, H, W, C) "
                "inputs are moved to channels")
    return None


def replace(match: Match, ctx: Context) -> fx.Node:
    node = match.find(aten.layer_norm.default)
    x, _, weight, bias, eps = (list(node.args) + [None, None, 1e-5])[:5]
    channels_last = len(shape(x)) == 4
    if channels_last:  # (B, H, W, C) → (B, C, H, W): cancels against the permute that made it
        physical = emit(ctx.graph, aten.permute.default, (x, [0, 3, 1, 2]), origin=node, rule=ctx.rule)
    else:
        physical = to_physical(ctx.graph, x, BC1S, origin=node, rule=ctx.rule)  # (B, C, 1, S)
    normed = emit(ctx.graph, torch.ops.anefx.layer_norm.default, (physical, 1, weight, bias, float(eps)),
                  origin=node, rule=ctx.rule)
    if channels_last:
        return emit(ctx.graph, aten.permute.default, (normed, [0, 2, 3, 1]), origin=node, rule=ctx.rule)
    return from_bc1s(ctx.graph, normed, origin=node, rule=ctx.rule)  # (B, S, C)


RULE = Rule(
    name="layernorm_channels",
    summary="LayerNorm over the last axis of (B, S, C) → layer_norm(axes=[1]) on (B, C, 1, S)",
    patterns=patterns,
    check=check,
    replace=replace,
    after=lambda ctx: simplify_layout_chains(ctx.graph, ctx.rule),
)
