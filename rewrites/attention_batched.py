"""Attention written on (B·H, S, d) tensors (Bloom): its q, k, v and per-head bias read as (B, H, S, d) ones.

Bloom computes its scores with one batched matmul over batch × heads, adding its alibi bias on the way::

    q3 = view(q, [B·H, S, d]);  kT3 = transpose(view(k, [B·H, S, d]), -1, -2)      # q, k: (B, H, S, d)
    scores = view(baddbmm(alibi, q3, kT3, beta=β, alpha=α), [B, H, S, S])         # alibi: (B·H, 1, S_k)
    o = bmm(view(softmax(scores + mask), [B·H, S, S]), view(v, [B·H, S, d]))

which is q @ kᵀ · α + β · view(alibi, [B, H, 1, S_k]) + mask on the (B, H, S, d) tensors the views come
from: `split_head_attention` splits it per head like any eager attention with an additive per-head bias.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from anefx.graph import shape

aten = torch.ops.aten
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
BATCHED_FIX = ("write q, k and v as (B, H, S, d) tensors (x.view(B, S, H, d).transpose(1, 2) of a projection) and view "
        "them as (B·H, S, d) only for the batched matmul")


def unbatched(node: fx.Node, batch: int, heads: int) -> fx.Node | None:
    """The (B, H, S, d) tensor a (B·H, S, d) node is a view of, or None."""
    if not (isinstance(node, fx.Node) and node.target in VIEWS and len(shape(node)) == 3):
        return None
    source = node.args[0]
    if not isinstance(source, fx.Node) or len(shape(source)) != 4:
        return None
    b, h, s, d = shape(source)
    return source if (b, h) == (batch, heads) and shape(node) == (b * h, s, d) else None


def read_batched_scores(node: fx.Node, found: dict) -> dict | str:
    """q, k, scale, per-head bias of (B, H, S_q, S_k) scores = view(baddbmm(bias, q3, kT3) | bmm(q3, kT3)
    [· scale]) on (B·H, S, d) views of (B, H, S, d) tensors; or what the scores are instead, in words."""
    if node.target not in VIEWS or len(shape(node)) != 4:
        return f"its scores are a {node.target.__name__.split('.')[0]} on (B·H, S, d) tensors; " + BATCHED_FIX
    batch, heads = shape(node)[:2]
    scores = node.args[0]
    while scores.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(scores.args[1], float | int):
        found["scale"] *= scores.args[1] if scores.target is aten.mul.Tensor else 1 / scores.args[1]
        scores = scores.args[0]
    if scores.target is aten.baddbmm.default:
        bias, q3, kt3 = scores.args[:3]
        found["scale"] *= scores.kwargs.get("alpha", 1)
        if (why := _bias_problem(bias, batch, heads)) is not None:
            return why
        found["bias"], found["bias_beta"] = bias, scores.kwargs.get("beta", 1)
    elif scores.target is aten.bmm.default:
        q3, kt3 = scores.args
    else:
        what = scores.target.__name__.split(".")[0]
        return f"its scores come from a {what} op on (B·H, S, S) tensors; " + BATCHED_FIX
    q, k = unbatched(q3, batch, heads), _keys(kt3, batch, heads)
    if q is None or k is None:
        return "its q or k are (B·H, S, d) tensors that are not views of (B, H, S, d) ones; " + BATCHED_FIX
    return found | {"q": q, "k": k}


def _keys(kt3: fx.Node, batch: int, heads: int) -> fx.Node | None:
    """k (B, H, S, d) of kT3 = transpose(view(k, [B·H, S, d]), -1, -2) or view(k.transpose(-1, -2))."""
    if not (isinstance(kt3, fx.Node) and len(shape(kt3)) == 3):
        return None
    if kt3.target is aten.transpose.int and sorted(d % 3 for d in kt3.args[1:3]) == [1, 2]:
        return unbatched(kt3.args[0], batch, heads)
    transposed = unbatched(kt3, batch, heads)
    if transposed is not None and transposed.target is aten.transpose.int \
            and sorted(d % 4 for d in transposed.args[1:3]) == [2, 3]:
        return transposed.args[0]
    return None


def _bias_problem(bias, batch: int, heads: int) -> str | None:
    if not isinstance(bias, fx.Node) or len(shape(bias)) > 3 or (len(shape(bias)) == 3
                                                                  and shape(bias)[0] not in (1, batch * heads)):
        what = shape(bias) if isinstance(bias, fx.Node) else bias
        return (f"its baddbmm adds a bias of shape {what}, not (B·H, S_q or 1, S_k); pass the bias as a "
                "(B, H, S_q, S_k) tensor added to the scores")
    return None


def bias_heads(bias_shape: tuple[int, ...], batch: int, heads: int) -> list[int]:
    """The (B, H, S_q|1, S_k) shape of a baddbmm bias of shape (B·H | 1, S_q|1, S_k), right-aligned."""
    dims = (1,) * (3 - len(bias_shape)) + tuple(bias_shape)
    return [batch if dims[0] > 1 else 1, heads if dims[0] > 1 else 1, dims[1], dims[2]]
