"""Where each head of q/k/v lives in the projection's output: the head split by index, and per-head norms.

`split_head_attention` builds head h of q as channels off_h … off_h + d of the projection's (B, C, 1, S)
output. This module finds those channels for head splits written in any order of layout ops — a fused
QKV projection split by view + split/getitem or select (GPT-NeoX, Bloom), nn.MultiheadAttention's
(S, B, 3·E) → (B·H, S, d) → (B, H, S, d) — by running the layout ops on a tensor of element indices, so
a split is used only where every element of every head is proven to come from those channels.

It also follows per-head ops written before the head transpose on (B, S, H, d) (Qwen3's qk-norm:
RMSNorm of each head, which `rmsnorm_to_layernorm` turns into a LayerNorm over [x, −x]): they normalise
the last axis, which is the channel axis 1 of the per-head (B, d, 1, S) slice.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from anefx.graph import shape
from rewrites.attention_batched import read_batched_scores

aten = torch.ops.aten
INDEX_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
             aten.transpose.int, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default, aten.clone.default,
             aten.alias.default, aten.contiguous.default, aten.select.int, aten.split.Tensor,
             aten.split_with_sizes.default, aten.unbind.int, aten.slice.Tensor, operator.getitem}
ROW_OPS = {aten.neg.default, aten.cat.default, aten.slice.Tensor, aten.layer_norm.default, aten.mul.Tensor,
           aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar, aten.rsqrt.default,
           aten.mean.dim, aten._to_copy.default, aten.clone.default}


@dataclass(frozen=True)
class IndexSplit:
    """Head h of a (B, H, S, d) node is slice(permute(source, perm)[, unsqueezed at 2], 1, offsets[h], +d)."""

    source: fx.Node
    perm: tuple[int, ...]
    offsets: tuple[int, ...]
    d: int


def index_split(node: fx.Node, rows: bool = False) -> IndexSplit | None:
    """The split of a logical (B, H, S, d) node (or (B, S, H, d) when rows) into channel slices, or None."""
    if not isinstance(node, fx.Node) or len(shape(node)) != 4:
        return None
    chain, source = _index_chain(node)
    if not chain or not isinstance(source, fx.Node) or len(shape(source)) not in (3, 4):
        return None
    indices = _replay(chain, source)
    if indices is None:
        return None
    heads = indices.transpose(1, 2) if rows else indices  # (B, H, S, d)
    b, h, s, d = heads.shape
    per_head = heads.permute(0, 3, 1, 2).unsqueeze(3)  # (B, d, H, 1, S)
    for perm in itertools.permutations(range(len(shape(source)))):  # the identity first
        offsets = _offsets(_physical(_source_indices(source).permute(perm)), per_head, b, s, d)
        if offsets is not None:
            return IndexSplit(source, perm, offsets, d)
    return None


def _index_chain(node: fx.Node) -> tuple[list[fx.Node], object]:
    chain, current = [], node
    while isinstance(current, fx.Node) and current.op == "call_function" and current.target in INDEX_OPS:
        if any(isinstance(a, fx.Node) for a in [*current.args[1:], *current.kwargs.values()]):
            break  # symbolic sizes: not replayable
        chain.append(current)
        current = current.args[0]
    return chain[::-1], current


def _source_indices(source: fx.Node) -> torch.Tensor:
    dims = shape(source)
    return torch.arange(int(torch.tensor(dims).prod())).view(dims)


def _replay(chain: list[fx.Node], source: fx.Node) -> torch.Tensor | None:
    value = _source_indices(source)
    try:
        for node in chain:
            if node.target is operator.getitem:
                value = value[node.args[1]]
            else:
                value = node.target(value, *node.args[1:], **node.kwargs)
    except (RuntimeError, IndexError, TypeError):
        return None
    return value if isinstance(value, torch.Tensor) and value.dim() == 4 else None


def _physical(indices: torch.Tensor) -> torch.Tensor:
    return indices.unsqueeze(2) if indices.dim() == 3 else indices


def _offsets(physical: torch.Tensor, per_head: torch.Tensor, b: int, s: int, d: int) -> tuple[int, ...] | None:
    """Per head, the channel offset in physical (B, C, 1, S) where its (B, d, 1, S) indices sit, or None."""
    if physical.dim() != 4 or physical.shape[0] != b or physical.shape[2] != 1 or physical.shape[3] != s:
        return None
    found = []
    for h in range(per_head.shape[2]):
        head = per_head[:, :, h]
        hits = (physical[0, :, 0, 0] == head[0, 0, 0, 0]).nonzero().flatten().tolist()
        off = next((o for o in hits if o + d <= physical.shape[1] and torch.equal(physical[:, o:o + d], head)), None)
        if off is None:
            return None
        found.append(off)
    return tuple(found)


def row_chain_ok(node: fx.Node, is_constant) -> str | None:
    """None when node (B, S, H, d') is per-head ops on the last axis over an index split; else what is not."""
    if index_split(node, rows=True) is not None:
        return None
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in ROW_OPS):
        return "not a per-head op"
    if node.target in (aten.cat.default, aten.slice.Tensor, aten.mean.dim):
        dims = node.args[1] if len(node.args) > 1 else 0
        if any(dim % 4 != 3 for dim in (dims if isinstance(dims, list | tuple) else [dims])):
            return "it mixes heads or tokens (an op over an axis other than the head's last)"
        if node.target is aten.mean.dim and not (len(node.args) > 2 and node.args[2]):
            return "a mean over the head's last axis without keepdim"
    if node.target is aten.layer_norm.default and len(node.args[1]) != 1:
        return "a norm over more than the head's last axis"
    inputs = node.args[0] if node.target is aten.cat.default else node.args[:1] if node.target in (
        aten.layer_norm.default, aten.mean.dim, aten.slice.Tensor) else node.args
    for arg in inputs:
        if isinstance(arg, fx.Node) and is_constant(arg):
            if any(n != 1 for n in shape(arg)[:-1]):
                return "a constant that differs per head or token"
        elif isinstance(arg, fx.Node) and (why := row_chain_ok(arg, is_constant)):
            return why
    return None


def is_row_chain(node: fx.Node, is_constant) -> bool:
    """transpose(Y, 1, 2) with Y (B, S, H, d) per-head ops over a head split (not a plain index split)."""
    return (isinstance(node, fx.Node) and node.target is aten.transpose.int
            and sorted(d % 4 for d in node.args[1:3]) == [1, 2] and len(shape(node)) == 4
            and node.args[0].target in ROW_OPS and row_chain_ok(node.args[0], is_constant) is None)


_SPLIT = ("only q @ k.transpose(-1, -2) on (B, H, S, d) tensors, a scale, a soft-cap tanh(s / cap) · cap, an "
          "added mask or bias and masked_fill(mask, float('-inf')) are split per head")


def weights_times_values(matmul: bool, clone: bool, dtype: bool, cast: torch.dtype | None = None):
    """Pattern: softmax(scores, -1) [float32] [.to(cast)] [dropout in eval: clone] @ v, scores written any way."""
    def fn(scores, v):
        weights = torch.softmax(scores, -1, dtype=torch.float32) if dtype else torch.softmax(scores, -1)
        weights = weights.to(cast) if cast is not None else weights  # fp16 / bf16 eager: back to v's dtype
        weights = weights.clone() if clone else weights
        if matmul:
            return torch.matmul(weights, v)
        return torch.bmm(weights.view(8, 4, 4), v)  # (B·H, S, d) batched attention (Bloom)

    return fn


def read_scores(scores: fx.Node) -> dict | str:
    """q, k, scale, softcap, mask of scores = [tanh(]q @ kᵀ · scale[ / cap) · cap] [+ mask] on (B, H, S, d),
    or what the scores are instead, in words."""
    found: dict = {"mask": None, "softcap": None, "scale": 1.0}
    node = _peel_masks(scores, found)
    if isinstance(node, str):
        return node
    if (node.target is aten.mul.Tensor and _target(node.args[0]) is aten.tanh.default
            and _target(node.args[0].args[0]) is aten.div.Tensor and node.args[0].args[0].args[1] == node.args[1]):
        found["softcap"], node = node.args[1], node.args[0].args[0].args[0]
    while node.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(node.args[1], float | int):
        found["scale"] *= node.args[1] if node.target is aten.mul.Tensor else 1 / node.args[1]
        node = node.args[0]
    if node.target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.baddbmm.default):
        return read_batched_scores(node, found)  # (B·H, S, S) scores viewed as (B, H, S, S): Bloom's alibi
    if node.target is not aten.matmul.default or len(shape(node)) != 4:
        what = "are on (B·H, S, d) tensors" if len(shape(node)) == 3 else \
            f"come from a {node.target.__name__.split('.')[0]} op"
        return f"its scores {what}; " + _SPLIT
    q, kt = node.args
    if _target(kt) is not aten.transpose.int or sorted(d % 4 for d in kt.args[1:3]) != [2, 3]:
        return "its keys are not transposed as k.transpose(-1, -2) right before q @ kᵀ"
    if not isinstance(found["softcap"], float | int | None):
        return "its soft-cap is a tensor"
    return found | {"q": q, "k": kt.args[0]}


def _peel_masks(scores: fx.Node, found: dict) -> fx.Node | str:
    """scores without their added mask (found["mask"]) and masked_fill(…, mask, -inf) (found["dropped"])."""
    node = scores
    for _ in range(2):  # either order
        if node.target is aten.masked_fill.Scalar and found.get("dropped") is None:  # nanoGPT's tril buffer
            if node.args[2] != float("-inf"):
                return (f"its scores are masked_fill'ed with {node.args[2]}, not float('-inf'); fill them with "
                        "float('-inf') or add the mask (0 where kept, -inf where dropped) to the scores")
            node, found["dropped"] = node.args[0], node.args[1]
        elif (node.target is aten.add.Tensor and isinstance(node.args[1], fx.Node) and found["mask"] is None
              and node.kwargs.get("alpha", 1) == 1):
            node, found["mask"] = node.args
    return node


def _target(node):
    return node.target if isinstance(node, fx.Node) else None
