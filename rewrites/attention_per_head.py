"""The per-head attention split_head_attention emits: einsum scores, masks in (B, S_k, 1, S_q), softmax over
axis 1, einsum with the values, heads concatenated on the channel axis (see split_head_attention's After).
"""

from __future__ import annotations

import functools
import math
import operator

import torch
import torch.fx as fx

from anefx.graph import add_constant, constant_value, shape
from rewrites.attention_batched import bias_heads
from rewrites.attention_heads import HeadTensors, strip_repeat

aten = torch.ops.aten


class PerHeadAttention(HeadTensors):
    """Builds one attention per head from q/k/v's per-head tensors."""

    def __init__(self, ctx, origin: fx.Node):
        super().__init__(ctx, origin)
        self.scalars: dict[tuple, fx.Node] = {}  # 0-d constants of the model's dtype (scale, soft-cap, β)

    def build(self, a: dict) -> fx.Node:
        q, (k, _), (v, _) = a["q"], strip_repeat(a["k"]), strip_repeat(a["v"])
        b, heads, sq, d = shape(q)
        kv_heads, v_heads, sk = shape(k)[1], shape(v)[1], shape(k)[2]
        group, v_group = heads // kv_heads, heads // v_heads  # query head h reads K/V head h // group
        scale = a["scale"] if a["scale"] is not None else 1 / math.sqrt(d)
        keys = self._keys_transposed(k, kv_heads, d)  # (B, S_k, 1, d) per kv head
        values = [self.head(v, j) for j in range(v_heads)]
        masks = self._masks(self._additive_mask(a, b, heads), a["is_causal"], heads, sq, sk)
        kept = self._rows_kept(masks) if a["sdpa"] else []
        outputs = []
        for h in range(heads):
            q_h = self.head(q, h)  # (B, d, 1, S_q); SDPA scales q, eager attention its scores (fp16 rounding)
            q_h = self.op(aten.mul.Tensor, q_h, self._scalar(scale, q)) if a["sdpa"] else q_h
            w = self.op(aten.einsum.default, "bchq,bkhc->bkhq", [q_h, keys[h // group]])  # (B, S_k, 1, S_q)
            w = self.op(aten.mul.Tensor, w, self._scalar(scale, w)) if not a["sdpa"] and scale != 1 else w
            mask = masks[h] if len(masks) > 1 else (masks[0] if masks else None)
            w = self._weights(w, mask, a)
            outputs.append(self.op(aten.einsum.default, "bkhq,bchk->bchq", [w, values[h // v_group]]))
            if len(kept) > 1:
                outputs[-1] = self._zero_unless(kept[h], outputs[-1])
        out = self.op(aten.cat.default, outputs, 1)  # (B, H·d, 1, S_q)
        if len(kept) == 1:
            out = self._zero_unless(kept[0], out)
        heads_view = self.op(aten.view.default, out, [b, heads, d, sq])  # (B, H, d, S_q)
        out = self.op(aten.permute.default, heads_view, [0, 1, 3, 2])  # (B, H, S_q, d), cancels downstream
        if len(shape(self.origin)) == 3:  # bmm on (B·H, S, d) (Bloom)
            out = self.op(aten.view.default, out, list(shape(self.origin)))
        return out

    def _scalar(self, value: float, like: fx.Node) -> float | fx.Node:
        """value, or a 0-d constant of like's dtype when that is not float32 (coremltools would promote an
        fp16 tensor times a Python float to float32, and the einsums would then mix dtypes)."""
        dtype = like.meta["val"].dtype
        if dtype == torch.float32:
            return value
        if (value, dtype) not in self.scalars:
            self.scalars[value, dtype] = add_constant(self.ctx.ep, "attention_scalar", torch.tensor(value, dtype=dtype))
        return self.scalars[value, dtype]

    def _weights(self, w: fx.Node, mask: fx.Node | None, a: dict) -> fx.Node:
        """softmax over keys (axis 1) of one head's scores: soft-capped, masked, in the softmax's dtype."""
        if a.get("softcap"):  # Gemma2: tanh(s / cap) · cap
            cap = self._scalar(a["softcap"], w)
            w = self.op(aten.mul.Tensor, self.op(aten.tanh.default, self.op(aten.div.Tensor, w, cap)), cap)
        if mask is not None:
            w = self.op(aten.add.Tensor, w, mask)
        if a.get("softmax_dtype") not in (None, w.meta["val"].dtype):  # softmax(s, dtype=float32) of fp16 scores
            w = self.op(aten._to_copy.default, w, dtype=a["softmax_dtype"])
        w = self.op(aten._softmax.default, w, 1, False)
        return self.op(aten._to_copy.default, w, dtype=a["cast"]) if a.get("cast") else w

    def _additive_mask(self, a: dict, batch: int, heads: int):
        """The mask, masked_fill's dropped positions (−inf) and a baddbmm bias (β · bias) as one additive mask
        of logical shape (B|1, H|1, S_q|1, S_k); a constant when they all are."""
        mask, dropped, bias = a["mask"], a.get("dropped"), a.get("bias")
        if dropped is None and bias is None:
            return mask
        dtype = self.origin.meta["val"].dtype
        terms = [(mask, "keep"), (dropped, "drop"), (bias, "bias")]
        values = [constant_value(t, self.ctx.ep) if t is not None else None for t, _ in terms]
        if all(v is not None for (t, _), v in zip(terms, values, strict=True) if t is not None):
            total = sum(_additive(v, kind, dtype, a, batch, heads) for (t, kind), v in zip(terms, values, strict=True)
                        if t is not None)
            return add_constant(self.ctx.ep, "attention_bias", total)
        parts = [self._additive_node(t, kind, dtype, a, batch, heads) for t, kind in terms if t is not None]
        return functools.reduce(lambda x, y: self.op(aten.add.Tensor, x, y), parts)

    def _additive_node(self, node: fx.Node, kind: str, dtype: torch.dtype, a: dict, batch: int, heads: int):
        if kind == "bias":
            node = self.op(aten.view.default, node, bias_heads(shape(node), batch, heads))
            return node if a["bias_beta"] == 1 else self.op(aten.mul.Tensor, node, self._scalar(a["bias_beta"], node))
        if node.meta["val"].dtype != torch.bool:
            return node
        zero = add_constant(self.ctx.ep, "mask_keep", torch.zeros((), dtype=dtype))
        inf = add_constant(self.ctx.ep, "mask_drop", torch.full((), float("-inf"), dtype=dtype))
        return self.op(aten.where.self, node, *((zero, inf) if kind == "keep" else (inf, zero)))

    def _rows_kept(self, masks: list[fx.Node]) -> list[fx.Node]:
        """SDPA returns 0 for a query whose keys are all masked, where softmax over −inf alone is NaN:
        for masks that can drop a whole row, per mask whether each query keeps a key (B, 1, 1, S_q)."""
        def can_drop_row(mask: fx.Node) -> bool:
            value = constant_value(mask, self.ctx.ep)
            return value is None or bool(torch.isneginf(value).all(dim=1).any())

        if not any(can_drop_row(m) for m in masks):
            return []
        return [self.op(aten.gt.Scalar, self.op(aten.amax.default, m, [1], True), float("-inf")) for m in masks]

    def _zero_unless(self, kept: fx.Node, x: fx.Node) -> fx.Node:
        zero = add_constant(self.ctx.ep, "masked_row", torch.zeros((), dtype=x.meta["val"].dtype))
        return self.op(aten.where.self, kept, x, zero)

    def _keys_transposed(self, k: fx.Node, kv_heads: int, d: int) -> list[fx.Node]:
        parts = [self.head(k, j) for j in range(kv_heads)]
        whole = whole_channels(parts) or self.op(aten.cat.default, parts, 1)  # (B, C_kv, 1, S_k)
        transposed = self.op(aten.transpose.int, whole, 1, 3)  # (B, S_k, 1, C_kv): one per layer
        chunks = self.op(aten.split.Tensor, transposed, d, 3)
        return [self.op(operator.getitem, chunks, j) for j in range(kv_heads)]

    def _masks(self, mask, is_causal: bool, heads: int, sq: int, sk: int) -> list[fx.Node]:
        """Additive masks in (B, S_k, 1, S_q): one shared, or one per head."""
        found: list[fx.Node] = []
        if mask is not None:
            found = self._mask_physical(mask, heads)
        if is_causal:
            allowed = torch.ones(sq, sk, dtype=torch.bool).tril()
            causal = torch.zeros(sq, sk).masked_fill(~allowed, float("-inf")).t().reshape(1, sk, 1, sq)
            dtype = self.origin.meta["val"].dtype
            node = add_constant(self.ctx.ep, "causal_mask", causal.to(dtype))
            found = [self.op(aten.add.Tensor, m, node) for m in found] if found else [node]
        return found

    def _mask_physical(self, mask: fx.Node, heads: int) -> list[fx.Node]:
        dims = shape(mask)
        value = constant_value(mask, self.ctx.ep)
        per_head = len(dims) == 4 and dims[1] == heads and heads > 1
        dtype = self.origin.meta["val"].dtype
        if value is not None:  # a constant (e.g. HF's folded causal mask): precompute its layout
            full = value.reshape((1,) * (4 - value.dim()) + tuple(value.shape))
            if full.dtype == torch.bool:
                full = torch.zeros(full.shape, dtype=dtype).masked_fill(~full, float("-inf"))
            full = full.to(dtype).permute(0, 3, 1, 2).contiguous()  # (B, S_k, H, S_q)
            if per_head:
                return [add_constant(self.ctx.ep, f"attention_mask_h{h}", full[:, :, h:h + 1].clone())
                        for h in range(heads)]
            return [add_constant(self.ctx.ep, "attention_mask", full[:, :, :1].clone())]
        if len(dims) < 4:
            mask = self.op(aten.view.default, mask, [1] * (4 - len(dims)) + list(dims))
        if mask.meta["val"].dtype == torch.bool:  # keep → 0, drop → -inf (where, not masked_fill on
            # zeros_like: coremltools drops zeros_like's dtype)

            zero = add_constant(self.ctx.ep, "mask_keep", torch.zeros((), dtype=dtype))
            drop = add_constant(self.ctx.ep, "mask_drop", torch.full((), float("-inf"), dtype=dtype))
            mask = self.op(aten.where.self, mask, zero, drop)
        moved = self.op(aten.permute.default, mask, [0, 3, 1, 2])  # (B, S_k, H, S_q)
        if per_head:
            return [self.op(aten.slice.Tensor, moved, 2, h, h + 1) for h in range(heads)]
        return [moved]


def _additive(value: torch.Tensor, kind: str, dtype: torch.dtype, a: dict, batch: int, heads: int) -> torch.Tensor:
    """A constant mask term as an additive (…, S_q|1, S_k) tensor of the scores' dtype."""
    if kind == "bias":
        return (value.reshape(bias_heads(tuple(value.shape), batch, heads)) * a["bias_beta"]).to(dtype)
    if value.dtype == torch.bool:
        keep = value if kind == "keep" else ~value
        return torch.zeros(value.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
    return value.to(dtype)


def whole_channels(parts: list[fx.Node]) -> fx.Node | None:
    """The tensor the parts slice when they are its consecutive channel slices covering it all."""
    if not all(p.target is aten.slice.Tensor and p.args[1] == 1 for p in parts):
        return None
    source = parts[0].args[0]
    expected = 0
    for p in parts:
        if p.args[0] is not source or p.args[2] != expected:
            return None
        expected = p.args[3]
    return source if expected == shape(source)[1] else None

