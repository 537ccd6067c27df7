"""rmsnorm_to_layernorm: every RMSNorm becomes layer_norm over concat([x, −x]), then the first half.

Before (HF LlamaRMSNorm, fp32 model; the casts appear only in fp16 models)::

    sq  = aten.pow(x, 2)                         # (B, S, C)
    ms  = aten.mean(sq, [-1], keepdim=True)      # (B, S, 1)
    r   = aten.rsqrt(aten.add(ms, eps))
    y   = aten.mul(γ, aten.mul(x, r))            # (B, S, C)

After::

    xx  = aten.cat([x, aten.neg(x)], -1)         # (B, S, 2C), mean exactly 0
    ln  = aten.layer_norm(xx, [2C], cat([γ, γ]), None, eps)
    y   = aten.slice(ln, -1, 0, C)               # (B, S, C)

Matched forms: `aten.rms_norm` (torch.nn.RMSNorm, with or without eps and weight); HF Llama-style
(upcast, pow, mean, add eps, rsqrt, mul, cast back, mul γ), T5-style (the statistics upcast, the
product taken with the original x) and Gemma's (1 + γ); coremltools' forms x / sqrt(mean(x·x) + eps)
with or without eps and γ; squares written as pow or x·x; γ on either side. The norm may run over
any single axis; over the last axis it lowers to `layer_norm(axes=[-1])`, over another to
`anefx::layer_norm` → `layer_norm(axes=[axis])`.

Why: the ANE has no RMSNorm op, and x² overflows fp16 (max 65504) once |x| ≳ 256. LayerNorm over
[x, −x] has mean 0, so it equals RMSNorm(x) on the first half, and the ANE's layer_norm is computed
without that overflow. γ becomes the layer_norm's own gamma: no separate multiply remains.

Refuses: a mean over more than one axis, or without keepdim; γ that is not a constant (it depends on
an input) or that varies along other axes than the normalised one.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.fx as fx

import anefx.ops  # noqa: F401 - defines torch.ops.anefx.layer_norm
from anefx.graph import emit, is_constant, shape
from anefx.rule import Context, Match, Pattern, Rule

aten = torch.ops.aten
C = 8


def _rms(square: str, inverse: str, eps: bool, gamma: str, cast: str):
    """The RMSNorm variant with these choices, as a function of (x[, γ])."""

    def fn(x, *weight):
        h = x.to(torch.float32) if cast != "none" else x
        sq = h.pow(2) if square == "pow" else h * h
        ms = sq.mean(-1, keepdim=True)
        if eps:
            ms = ms + 1e-6
        source = x if cast == "t5" else h
        y = source * torch.rsqrt(ms) if inverse == "rsqrt" else source / torch.sqrt(ms)
        if cast != "none":
            y = y.to(x.dtype)
        if gamma == "left":
            y = weight[0] * y
        elif gamma == "right":
            y = y * weight[0]
        return y

    return fn


def _aten_rms(eps: bool, weight: bool):
    def fn(x, *w):
        return torch.rms_norm(x, [x.shape[-1]], w[0] if weight else None, 1e-6 if eps else None)

    return fn


@functools.cache
def patterns() -> list[Pattern]:
    found = []
    # longest forms first: a γ multiply belongs to the norm before it
    for gamma, cast, square, inverse, eps in itertools.product(
            ("left", "right", "none"), ("hf", "t5", "none"), ("pow", "mul"), ("rsqrt", "sqrt_div"),
            (True, False)):
        if cast != "none" and (square, inverse, eps) != ("pow", "rsqrt", True):
            continue  # upcasting forms are HF's and T5's, which are always written this way
        dtype = torch.float16 if cast != "none" else torch.float32

        def example(dtype=dtype, gamma=gamma):
            x = torch.randn(2, 4, C, dtype=dtype)
            return (x, torch.randn(C, dtype=dtype)) if gamma != "none" else (x,)

        name = f"{square}, {inverse}, {'eps' if eps else 'no eps'}, γ {gamma}, cast {cast}"
        found.append(Pattern(name, _rms(square, inverse, eps, gamma, cast), example,
                             meta={"gamma": gamma != "none", "eps": eps}))
    for weight, eps in itertools.product((True, False), (True, False)):
        def example(weight=weight):
            x = torch.randn(2, 4, C)
            return (x, torch.randn(C)) if weight else (x,)

        found.append(Pattern(f"aten.rms_norm, {'γ' if weight else 'no γ'}, {'eps' if eps else 'no eps'}",
                             _aten_rms(eps, weight), example,
                             meta={"gamma": weight, "eps": eps, "aten": True}))
    return found


def _axis_and_eps(match: Match) -> tuple[int | None, float | None, str | None]:
    """(normalised axis, eps, refusal reason) read from the matched graph."""
    x = match.inputs[0]
    rank = len(shape(x))
    if match.pattern.meta.get("aten"):
        node = match.find(aten.rms_norm.default)
        if len(node.args[1]) != 1:
            return None, None, f"aten.rms_norm over {len(node.args[1])} axes; only one axis is rewritten"
        eps = node.args[3] if len(node.args) > 3 and node.args[3] is not None else None
        if eps is None:
            eps = torch.finfo(x.meta["val"].dtype).eps
        return rank - 1, float(eps), None
    mean = match.find(aten.mean.dim)
    dims = mean.args[1] if len(mean.args) > 1 else None
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if not dims or len(dims) != 1:
        return None, None, f"mean over axes {dims}: not a norm over one axis"
    if not keepdim:
        return None, None, "mean without keepdim: not a norm"
    eps = 0.0
    if match.pattern.meta["eps"]:
        add = match.find(aten.add.Tensor)
        eps = add.args[1]
        if not isinstance(eps, float | int):
            return None, None, "the value added to the mean square is a tensor, not an eps constant"
    return dims[0] % rank, float(eps), None


def check(match: Match, ctx: Context) -> str | None:
    axis, _eps, reason = _axis_and_eps(match)
    if reason:
        return reason
    x = match.inputs[0]
    if shape(match.output) != shape(x):
        return f"output shape {shape(match.output)} differs from input shape {shape(x)}"
    if match.pattern.meta["gamma"]:
        gamma = match.inputs[1]
        if not isinstance(gamma, fx.Node) or not is_constant(gamma, ctx.ep):
            return "γ is not constant (it depends on a model input)"
        g_shape, channels = shape(gamma), shape(x)[axis]
        if _numel(g_shape) != channels or not _along(g_shape, len(shape(x)), axis):
            return f"γ of shape {g_shape} does not scale only the normalised axis (size {channels})"
    return None


def _numel(s: tuple[int, ...]) -> int:
    n = 1
    for d in s:
        n *= d
    return n


def _along(g_shape: tuple[int, ...], rank: int, axis: int) -> bool:
    """γ broadcasts against x only along `axis` (all its other dims are 1)."""
    padded = (1,) * (rank - len(g_shape)) + g_shape
    return len(padded) == rank and all(d == 1 for i, d in enumerate(padded) if i != axis)


def _stats_dtype(match: Match) -> torch.dtype:
    node = match.find(aten.mean.dim) or match.find(aten.rms_norm.default)
    return node.meta["val"].dtype


def replace(match: Match, ctx: Context) -> fx.Node:
    g, out, rule = ctx.graph, match.output, ctx.rule
    axis, eps, _ = _axis_and_eps(match)
    x = match.inputs[0]
    dtype = _stats_dtype(match)

    def op(target, *args, **kwargs):
        return emit(g, target, args, kwargs, origin=out, rule=rule)

    if x.meta["val"].dtype != dtype:
        x = op(aten._to_copy.default, x, dtype=dtype)
    channels = shape(x)[axis]
    both = op(aten.cat.default, [x, op(aten.neg.default, x)], axis)  # (…, 2C, …), mean 0
    weight = None
    if match.pattern.meta["gamma"]:
        gamma = match.inputs[1]
        if shape(gamma) != (channels,):
            gamma = op(aten.view.default, gamma, [channels])  # (C,)
        if gamma.meta["val"].dtype != dtype:
            gamma = op(aten._to_copy.default, gamma, dtype=dtype)
        weight = op(aten.cat.default, [gamma, gamma])  # (2C,): γ fused into the norm
    if axis == len(shape(x)) - 1:
        normed = op(aten.layer_norm.default, both, [2 * channels], weight, None, eps, False)  # as F.layer_norm
    else:
        normed = op(torch.ops.anefx.layer_norm.default, both, axis, weight, None, eps)
    y = op(aten.slice.Tensor, normed, axis, 0, channels)  # first half: RMSNorm(x)·γ
    if y.meta["val"].dtype != out.meta["val"].dtype:
        y = op(aten._to_copy.default, y, dtype=out.meta["val"].dtype)
    return y


RULE = Rule(
    name="rmsnorm_to_layernorm",
    summary="RMSNorm (every common form) becomes layer_norm over [x, −x] with γ fused",
    patterns=patterns,
    check=check,
    replace=replace,
)
