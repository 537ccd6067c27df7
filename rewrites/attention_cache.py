"""Attention reading a KV cache held as state, per head, in the Neural Engine's layout.

`split_head_attention` uses `CachedAttention` when k or v is the value of a cache write
(`anefx.slice_write(cache, new, 2, p)`, from kv_cache_write): the S new tokens' K/V are written into the
cache, and the attention reads all T cached positions. The cache is then stored as the attention reads it,
so that neither the write nor the per-head reads move the cache (`anefx.states.StateLayout` records how;
verification compares states in the model's (1, H_kv, T, d) layout)::

    K cache (1, T, 1, C')   C' = H_kv·d rounded up to a multiple of 32 (CoreML states need that on the ANE)
    V cache (1, C, 1, T)    C  = H_kv·d; the last dimension is the cache length (a multiple of 32)

    k_new = slice_write(K, transpose(cat([k_0 … k_{H_kv-1}], 1), 1, 3), 1, p)    # the S new tokens only
    v_new = slice_write(V, v_proj4, 3, p)                                         # (1, C, 1, S), as projected
    key_j = slice(k_new, 3, j·d, (j+1)·d)        # (1, T, 1, d): the einsum's key operand, no transpose
    val_j = slice(v_new, 1, j·d, (j+1)·d)        # (1, d, 1, T): the einsum's value operand, no transpose

k_j are the new keys of head j in (1, d, 1, S) (rotary embeddings replayed per head). The position-dependent
tables the model computes from the position input (rotary cos/sin with one head entry) are broadcast to every
head as (1, d, 1, S) operands.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import anefx.ops  # noqa: F401 - defines torch.ops.anefx.slice_write
from anefx.graph import is_constant, shape
from anefx.layout import HEAD, to_physical
from anefx.states import STATE_LAYOUT, StateLayout, relayout_state
from rewrites.attention_heads import Unfollowable, strip_repeat
from rewrites.attention_per_head import PerHeadAttention, whole_channels

aten = torch.ops.aten
SLICE_WRITE = torch.ops.anefx.slice_write.default
STATE_ALIGN = 32  # a CoreML state's last dimension must be a multiple of 32 on the Neural Engine


def is_cache_read(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (
        SLICE_WRITE, aten.index_copy.default)


def reads_cache(a: dict) -> bool:
    """Whether the attention's k or v is a cache write's value (with repeat_kv around it or not)."""
    return any(is_cache_read(strip_repeat(a[name])[0]) for name in ("k", "v") if isinstance(a[name], fx.Node))


def cache_refusal(write: fx.Node, ctx) -> str | None:
    """Why the cache this write updates cannot be stored per head in the ANE layout, or None."""
    if write.target is aten.index_copy.default:
        return ("k/v read a cache written at positions kv_cache_write could not prove consecutive (see its "
                "refusal); write the cache at torch.arange(S) + position")
    cache, update, axis, _ = write.args
    signature = ctx.ep.graph_signature
    target = signature.inputs_to_buffers.get(cache.name) if isinstance(cache, fx.Node) else None
    if target is None or signature.buffers_to_mutate.get(write.name) != target:
        return "k/v read a slice write that is not the program's write of a cache buffer"
    if STATE_LAYOUT in cache.meta or len(cache.users) != 1:
        return f"the cache {target} is read or written more than once per call"
    if len(shape(cache)) != 4 or shape(cache)[0] != 1 or axis % 4 != 2:
        return f"the cache {target} is not a (1, H_kv, T, d) tensor written along T"
    if shape(update)[:2] != shape(cache)[:2] or shape(update)[3] != shape(cache)[3]:
        return f"the write into {target} covers part of its heads or head dimension"
    if len([u for u in write.users if u.op != "output"]) != 1:
        return f"the cache {target} is read by more than one attention"
    return None


def cache_layout(role: str, heads: int, length: int, d: int) -> tuple[StateLayout, int]:
    """The stored layout of a K ("k") or V ("v") cache of logical shape (1, heads, length, d), and the axis
    that holds positions in it."""
    logical, channels = (1, heads, length, d), heads * d
    if role == "k":
        padded = -(-channels // STATE_ALIGN) * STATE_ALIGN
        return StateLayout(logical, (0, 2, 1, 3), (1, length, 1, channels), (1, length, 1, padded)), 1
    return StateLayout(logical, (0, 1, 3, 2), (1, channels, 1, length), (1, channels, 1, length)), 3


class CachedAttention(PerHeadAttention):
    """PerHeadAttention whose K/V come from cache writes, stored per head in the ANE layout."""

    def __init__(self, ctx, origin: fx.Node):
        super().__init__(ctx, origin)
        self.caches: dict[fx.Node, fx.Node] = {}  # logical cache write → the write of the stored cache
        self.followable: dict[fx.Node, bool] = {}
        self.broadcast: dict[fx.Node, fx.Node] = {}

    def plan(self, a: dict) -> None:
        k, v = strip_repeat(a["k"])[0], strip_repeat(a["v"])[0]
        if k is v and is_cache_read(k):
            raise Unfollowable("keys and values are read from the same cache")
        super().plan(a)

    # -- following q/k/v (the new tokens' K/V are built per head to be written) ------------------------
    def _walk(self, node) -> None:
        if is_cache_read(node):
            if why := cache_refusal(node, self.ctx):
                raise Unfollowable(why)
            return self._walk(node.args[1])
        if self._broadcast_over_heads(node) and not self._followable(node):
            return None  # a table computed from the position (rotary cos/sin): the same for every head
        return super()._walk(node)

    def _followable(self, node: fx.Node) -> bool:
        if node not in self.followable:
            try:
                super()._walk(node)
                self.followable[node] = True
            except Unfollowable:
                self.followable[node] = False
        return self.followable[node]

    def _broadcast_over_heads(self, node) -> bool:
        """A computed tensor with one head entry (or none): each head reads it whole."""
        if not isinstance(node, fx.Node) or is_constant(node, self.ctx.ep) or "val" not in node.meta:
            return False
        dims = shape(node)
        return len(dims) < 3 or (len(dims) == 4 and dims[1] == 1)

    def _operand(self, arg, h: int):
        if not self._broadcast_over_heads(arg) or is_cache_read(arg):
            return super()._operand(arg, h)
        if len(shape(arg)) == 4 and self._followable(arg):
            return self.head(arg, 0)  # one head, followed to where it is computed
        if arg not in self.broadcast:
            self.broadcast[arg] = to_physical(self.ctx.graph, arg, HEAD, origin=self.origin, rule=self.ctx.rule)
        return self.broadcast[arg]

    # -- reading the cache per head --------------------------------------------------------------------
    def _head(self, node: fx.Node, h: int) -> fx.Node:
        if not is_cache_read(node):
            return super()._head(node, h)
        d = shape(node)[3]
        return self.op(aten.slice.Tensor, self._stored(node, "v"), 1, h * d, (h + 1) * d)  # (1, d, 1, T)

    def _keys_transposed(self, k: fx.Node, kv_heads: int, d: int) -> list[fx.Node]:
        if not is_cache_read(k):
            return super()._keys_transposed(k, kv_heads, d)
        stored = self._stored(k, "k")
        return [self.op(aten.slice.Tensor, stored, 3, j * d, (j + 1) * d) for j in range(kv_heads)]  # (1, T, 1, d)

    def _stored(self, write: fx.Node, role: str) -> fx.Node:
        """The cache write on the stored cache, made once: the state takes the layout, the program's
        mutation output the new write."""
        if write in self.caches:
            return self.caches[write]
        cache, update, _, start = write.args
        _, heads, length, d = shape(cache)
        layout, axis = cache_layout(role, heads, length, d)
        relayout_state(self.ctx.ep, self.ctx.ep.graph_signature.inputs_to_buffers[cache.name], layout)
        parts = [self.head(update, j) for j in range(heads)]  # (1, d, 1, S) each
        new = whole_channels(parts) or self.op(aten.cat.default, parts, 1)  # (1, C, 1, S)
        if role == "k":
            new = self.op(aten.transpose.int, new, 1, 3)  # (1, S, 1, C): the S new tokens, not the cache
        self.caches[write] = self.op(SLICE_WRITE, cache, new, axis, start)
        self.ctx.graph.output_node().replace_input_with(write, self.caches[write])
        return self.caches[write]
