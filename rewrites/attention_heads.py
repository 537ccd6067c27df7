"""Per-head tensors of logical (B, H, S, d) q/k/v: head h as a (B, d, 1, S) slice of the projection.

`HeadTensors.plan` follows q/k/v back to the projections (raising Unfollowable with what stops it, no graph
change); `HeadTensors.head` builds head h, replaying the ops between the head split and the attention
(rotary embeddings, per-head norms, scales) on the channel axis. Where each head lives in a projection
is found by `attention_sources` (index splits, per-head rows).
"""

from __future__ import annotations

import torch
import torch.fx as fx

import anefx.ops  # noqa: F401 - defines torch.ops.anefx.layer_norm (per-head qk-norm)
from anefx.graph import emit, is_constant, shape
from anefx.layout import BC1S, HEAD, to_physical
from anefx.rule import Context
from rewrites.attention_sources import index_split, is_row_chain, row_chain_ok

aten = torch.ops.aten
IDENTITY = {aten.clone.default, aten.alias.default, aten.contiguous.default}
ELEMENTWISE = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.neg.default,
               aten._to_copy.default}


class Unfollowable(Exception):
    """q/k/v come from an op the per-head replay does not know."""



class HeadTensors:
    """Per-head physical tensors of logical (B, H, S, d) nodes, built on demand and memoised."""

    def __init__(self, ctx: Context, origin: fx.Node):
        self.ctx, self.origin = ctx, origin
        self.memo: dict[tuple[fx.Node, int], fx.Node] = {}
        self.physical: dict[fx.Node, fx.Node] = {}
        self.splits: dict[tuple, object] = {}
        self.sources: dict[tuple, fx.Node] = {}

    def op(self, target, *args, **kwargs) -> fx.Node:
        return emit(self.ctx.graph, target, args, kwargs, origin=self.origin, rule=self.ctx.rule)

    # -- following q/k/v back to the projections -------------------------------------------------
    def plan(self, a: dict) -> None:
        """Raise Unfollowable when some head cannot be built (no graph change)."""
        for name in ("q", "k", "v"):
            self._walk(strip_repeat(a[name])[0])

    def _walk(self, node: fx.Node) -> None:
        if head_split(node) is not None or self._split(node) is not None or self._is_rows(node):
            return
        if isinstance(node, fx.Node) and node.target is aten.transpose.int and len(shape(node)) == 4:
            why = row_chain_ok(node.args[0], lambda n: is_constant(n, self.ctx.ep))
            raise Unfollowable(f"q/k/v are computed per token before the head split by '{node.args[0].name}' "
                               f"({why}); only per-head ops on the head's last axis (norms, scales) are replayed")
        if isinstance(node, fx.Node) and node.op == "call_function":
            if node.target in IDENTITY:
                return self._walk(node.args[0])
            if node.target in ELEMENTWISE or node.target in (aten.slice.Tensor, aten.cat.default):
                inputs = node.args[0] if node.target is aten.cat.default else node.args
                for arg in inputs:
                    if isinstance(arg, fx.Node) and not is_constant(arg, self.ctx.ep):
                        self._walk(arg)
                if node.target in (aten.slice.Tensor, aten.cat.default):
                    dim = (node.args[1] if len(node.args) > 1 else 0) % 4
                    if dim == 1:
                        raise Unfollowable("q/k/v are sliced or concatenated across heads")
                return None
        what = getattr(node.target, "__name__", str(node.target)).split(".")[0] if isinstance(node, fx.Node) \
            else type(node).__name__
        raise Unfollowable(f"q/k/v come from a {what} op ('{getattr(node, 'name', node)}'), which cannot be replayed "
                           f"per head; attention splits when q/k/v are x.view(B, S, H, d).transpose(1, 2) of a "
                           f"projection, with only elementwise ops, rotary embeddings or per-head norms in between")

    def head(self, node: fx.Node, h: int) -> fx.Node:
        key = (node, h)
        if key not in self.memo:
            self.memo[key] = self._head(node, h)
        return self.memo[key]

    def _head(self, node: fx.Node, h: int) -> fx.Node:
        split = head_split(node)
        if split is not None:  # transpose(view(x, [B, S, H, d]), 1, 2): channels h·d … (h+1)·d of x
            x, d = split
            if x not in self.physical:
                self.physical[x] = to_physical(self.ctx.graph, x, BC1S, origin=self.origin, rule=self.ctx.rule)
            return self.op(aten.slice.Tensor, self.physical[x], 1, h * d, (h + 1) * d)  # (B, d, 1, S)
        if (split := self._split(node)) is not None:
            return self.op(aten.slice.Tensor, self._source(split), 1, split.offsets[h], split.offsets[h] + split.d)
        if self._is_rows(node):
            return self._row(node.args[0], h)
        if node.target in IDENTITY:
            return self.head(node.args[0], h)
        if node.target is aten.cat.default:
            parts = [self._operand(p, h) for p in node.args[0]]  # a constant part (a K/V prefix): its head h
            return self.op(aten.cat.default, parts, HEAD.dim(node.args[1] if len(node.args) > 1 else 0))
        if node.target is aten.slice.Tensor:
            dim = HEAD.dim(node.args[1] if len(node.args) > 1 else 0)
            return self.op(aten.slice.Tensor, self.head(node.args[0], h), dim, *node.args[2:])
        args = [self._operand(a, h) for a in node.args]
        return self.op(node.target, *args, **node.kwargs)

    def _split(self, node, rows: bool = False):
        key = (node, rows)
        if key not in self.splits:
            self.splits[key] = index_split(node, rows)
        return self.splits[key]

    def _is_rows(self, node) -> bool:
        return is_row_chain(node, lambda n: is_constant(n, self.ctx.ep))

    def _source(self, split) -> fx.Node:
        """The (B, C, 1, S) tensor a split slices: its source permuted (and unsqueezed), built once."""
        key = (split.source, split.perm)
        if key not in self.sources:
            node = split.source
            if split.perm != tuple(range(len(split.perm))):
                node = self.op(aten.permute.default, node, list(split.perm))
            self.sources[key] = self.op(aten.unsqueeze.default, node, 2) if len(split.perm) == 3 else node
        return self.sources[key]

    def _row(self, node: fx.Node, h: int) -> fx.Node:
        """Head h of a (B, S, H, d) per-head op (qk-norm) on its (B, d, 1, S) slice: the last axis is 1."""
        key = (node, -1 - h)
        if key in self.memo:
            return self.memo[key]
        if (split := self._split(node, rows=True)) is not None:
            out = self.op(aten.slice.Tensor, self._source(split), 1, split.offsets[h], split.offsets[h] + split.d)
        elif node.target is aten.layer_norm.default:
            x, _, weight, bias, eps = (*node.args, *(None, None, 1e-5)[len(node.args) - 2:])[:5]
            out = self.op(torch.ops.anefx.layer_norm.default, self._row(x, h), 1, weight, bias, float(eps))
        elif node.target is aten.cat.default:
            out = self.op(aten.cat.default, [self._row_operand(p, h) for p in node.args[0]], 1)
        elif node.target is aten.slice.Tensor:
            out = self.op(aten.slice.Tensor, self._row(node.args[0], h), 1, *node.args[2:])
        elif node.target is aten.mean.dim:
            out = self.op(aten.mean.dim, self._row(node.args[0], h), [1], True)
        else:
            out = self.op(node.target, *[self._row_operand(a, h) for a in node.args], **node.kwargs)
        self.memo[key] = out
        return out

    def _row_operand(self, arg, h: int):
        if not isinstance(arg, fx.Node):
            return arg
        if not is_constant(arg, self.ctx.ep):
            return self._row(arg, h)
        return self.op(aten.view.default, arg, [1, shape(arg)[-1] if shape(arg) else 1, 1, 1])  # (…, d) → (1, d, 1, 1)

    def _operand(self, arg, h: int):
        if not isinstance(arg, fx.Node):
            return arg
        if not is_constant(arg, self.ctx.ep):
            return self.head(arg, h)
        dims = shape(arg)  # a broadcast constant (cos/sin tables, biases): its head-h entry, physical
        if len(dims) >= 3 and dims[-3] > 1:  # it has a head axis: (…, H, S, d), right-aligned
            arg = self.op(aten.slice.Tensor, arg, len(dims) - 3, h, h + 1)
        return to_physical(self.ctx.graph, arg, HEAD, origin=self.origin, rule=self.ctx.rule)


def head_split(node) -> tuple[fx.Node, int] | None:
    """(x, d) when node = transpose(view(x, [B, S, H, d]), 1, 2) with x of shape (B, S, H·d)."""
    if not (isinstance(node, fx.Node) and node.target is aten.transpose.int):
        return None
    if sorted(d % 4 for d in node.args[1:3]) != [1, 2]:
        return None
    view = node.args[0]
    if not (isinstance(view, fx.Node) and view.target in (aten.view.default, aten._unsafe_view.default,
                                                           aten.reshape.default)):
        return None
    x = view.args[0]
    if not isinstance(x, fx.Node) or len(shape(x)) != 3 or len(shape(view)) != 4:
        return None
    b, s, c = shape(x)
    if shape(view)[:2] != (b, s) or shape(view)[2] * shape(view)[3] != c:
        return None
    return x, shape(view)[3]


def strip_repeat(node: fx.Node) -> tuple[fx.Node, int]:
    """(k, n_rep) when node is repeat_kv(k): view(clone(expand(unsqueeze(k, 2), [B, Hkv, n, S, d])))."""
    if not (isinstance(node, fx.Node) and node.target in (aten.view.default, aten._unsafe_view.default,
                                                           aten.reshape.default)):
        return node, 1
    inner = node.args[0]
    while isinstance(inner, fx.Node) and inner.target in IDENTITY:
        inner = inner.args[0]
    if not (isinstance(inner, fx.Node) and inner.target is aten.expand.default):
        return node, 1
    unsq = inner.args[0]
    if not (isinstance(unsq, fx.Node) and unsq.target is aten.unsqueeze.default and unsq.args[1] % 5 == 2):
        return node, 1
    base = unsq.args[0]
    b, hkv, s, d = shape(base)
    n_rep = shape(inner)[2]
    if shape(node) != (b, hkv * n_rep, s, d):
        return node, 1
    return base, n_rep

