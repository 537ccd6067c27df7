"""split_head_attention: attention becomes one small attention per head on (B, d, 1, S) slices.

Before (HF SDPA attention; q/k/v come from projections, the mask was folded to a constant)::

    q = aten.transpose(aten.view(q_proj, [B, S, H, d]), 1, 2)           # (B, H, S, d)  (k, v alike)
    o = aten.scaled_dot_product_attention(q, k, v, mask)                 # (B, H, S, d)

After::

    q4 = (B, C, 1, S) form of q_proj;  q_h = aten.slice(q4, 1, h·d, (h+1)·d) · scale   # (B, d, 1, S)
    kT = aten.transpose(k4, 1, 3)                                        # (B, S, 1, C_kv): once per layer
    k_j = split(kT, d, 3)[j]                                             # (B, S_k, 1, d)
    w_h = aten.softmax(einsum('bchq,bkhc->bkhq', q_h, k_j) + mask', 1)   # (B, S_k, 1, S_q)
    o_h = einsum('bkhq,bchk->bchq', w_h, v_j)                            # (B, d, 1, S_q)
    o4  = aten.cat([o_0, …, o_{H-1}], 1)                                 # (B, C, 1, S_q)

Ops between the head split and the attention (rotary embeddings: multiplies by cos/sin tables,
rotate-half slices and concats) are replayed per head on the channel axis. Grouped-query attention
(`repeat_kv`'s unsqueeze → expand → reshape, or SDPA's enable_gqa) indexes the shared K/V head
h // n_rep instead of materialising copies. Boolean, additive, causal and padding masks are moved to
(B, S_k, 1, S_q); where a mask can drop every key of a query, that query's output is 0, as SDPA's.
Eager attention (q @ kᵀ · scale + mask → softmax → @ v) is matched too (a fully masked row stays NaN,
as in torch).

Variants (q/k/v sources found by index in rewrites/attention_sources.py, proven element by element):

    Before (Qwen3 qk-norm, per-head RMSNorm → LayerNorm over [x, −x] by rmsnorm_to_layernorm)::
        q = transpose(slice(layer_norm(cat([view(q_proj, [B, S, H, d]), neg(…)], 3), [2d], γ2), 3, 0, d), 1, 2)
    After::
        q_h = slice(anefx.layer_norm(cat([q4[h·d:(h+1)·d], neg(…)], 1), 1, γ2), 1, 0, d)    # (B, d, 1, S)
    Before (GPT-NeoX fused QKV; Bloom / nn.MultiheadAttention select or view alike)::
        q, k, v = split(transpose(view(qkv_proj, [B, S, H, 3d]), 1, 2), d, -1)
    After::
        q_h = slice(qkv4, 1, 3d·h, 3d·h + d);  k_h = slice(qkv4, 1, 3d·h + d, …);  v_h likewise
    Before (eager with float32 softmax and dropout in eval; T5 relative-position bias; Gemma2 soft-cap)::
        w = clone(softmax(tanh(q @ kᵀ · scale / cap) · cap + bias, -1, float32));  o = w @ v
    After::
        w_h = softmax(tanh(einsum(q_h · scale, k_h) / cap) · cap + bias_h', 1)    # bias_h' (B, S_k, 1, S_q)

Why: the ANE runs small 4-D einsums/matmuls with softmax over the channel axis well; a rank-4
(B, H, S, S) attention with softmax over the last axis, and the reshapes/transposes around it, are
slow there (Apple, "Deploying Transformers on the Apple Neural Engine", 2022).

Refuses: dropout in attention, a mask that does not broadcast to (…, S_q, S_k), q/k/v produced by ops it
cannot follow per head (reported with the op), ops before the head split that mix heads; any other
softmax(scores) @ v it finds is refused with what its scores are (Bloom's alibi baddbmm on (B·H, S, d)) and
how to write them so they split — never left fused in silence.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator

import torch
import torch.fx as fx

import anefx.ops  # noqa: F401 - defines torch.ops.anefx.layer_norm (per-head qk-norm)
from anefx.graph import add_constant, constant_value, emit, is_constant, shape
from anefx.layout import BC1S, HEAD, simplify_layout_chains, to_physical
from anefx.rule import Context, Match, Pattern, Rule
from rewrites.attention_sources import index_split, is_row_chain, read_scores, row_chain_ok, weights_times_values

aten = torch.ops.aten
F = torch.nn.functional
IDENTITY = {aten.clone.default, aten.alias.default, aten.contiguous.default}
ELEMENTWISE = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.neg.default,
               aten._to_copy.default}


class Unfollowable(Exception):
    """q/k/v come from an op the per-head replay does not know."""


def _sdpa(mask: bool, scale: bool, causal: bool, gqa: bool):
    def fn(q, k, v, *m):
        kwargs = {"scale": 0.5} if scale else {}
        if causal:
            kwargs["is_causal"] = True
        if gqa:
            kwargs["enable_gqa"] = True
        return F.scaled_dot_product_attention(q, k, v, m[0] if mask else None, **kwargs)

    return fn


def _eager(scale_op: str, mask: bool):
    def fn(q, k, v, *m):
        scores = q @ k.transpose(-1, -2)
        scores = scores * 0.125 if scale_op == "mul" else scores / 8.0 if scale_op == "div" else scores
        if mask:
            scores = scores + m[0]
        return torch.softmax(scores, -1) @ v

    return fn


def _softcapped(clone: bool, dtype: bool):
    """Gemma2's eager attention: scores soft-capped (tanh(s / cap) · cap) before the mask and softmax."""
    def fn(q, k, v, mask):
        scores = torch.tanh(torch.matmul(q, k.transpose(2, 3)) * 0.25 / 50.0) * 50.0 + mask
        weights = torch.softmax(scores, -1, dtype=torch.float32) if dtype else torch.softmax(scores, -1)
        return torch.matmul(weights.clone() if clone else weights, v)

    return fn


@functools.cache
def patterns() -> list[Pattern]:
    def qkv():  # distinct tensors: export would merge one tensor passed three times
        return tuple(torch.randn(1, 2, 4, 8) for _ in range(3))

    mask = torch.zeros(1, 1, 4, 4)
    found = []
    for with_mask, scale, causal, gqa in itertools.product((True, False), repeat=4):
        if with_mask and causal:
            continue  # SDPA takes one or the other
        name = ", ".join(w for w, on in (("mask", with_mask), ("scale", scale), ("causal", causal),
                                         ("enable_gqa", gqa)) if on) or "plain"
        found.append(Pattern(f"sdpa ({name})", _sdpa(with_mask, scale, causal, gqa),
                             (lambda m=with_mask: (*qkv(), mask) if m else qkv()), meta={"kind": "sdpa"}))
    for scale_op in ("mul", "div", "none"):
        for with_mask in (True, False):
            found.append(Pattern(f"eager, scale {scale_op}, {'mask' if with_mask else 'no mask'}",
                                 _eager(scale_op, with_mask), (lambda m=with_mask: (*qkv(), mask) if m else qkv()),
                                 meta={"kind": "eager", "scale": scale_op, "mask": with_mask}))
    for clone, dtype in itertools.product((True, False), repeat=2):
        found.append(Pattern(f"eager, soft-capped scores{', float32 softmax' if dtype else ''}"
                             f"{', dropout in eval' if clone else ''}", _softcapped(clone, dtype),
                             lambda: (*qkv(), mask), meta={"kind": "eager", "scale": "mul", "mask": True,
                                                           "softcap": True}))
    for matmul, clone, dtype in itertools.product((True, False), repeat=3):  # last: any other eager attention
        found.append(Pattern(f"softmax(scores) @ v ({'matmul' if matmul else 'bmm'}{', clone' * clone}"
                             f"{', float32' * dtype})", weights_times_values(matmul, clone, dtype),
                             lambda m=matmul: (torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 8)) if m else
                             (torch.randn(8, 4, 4), torch.randn(8, 4, 8)), meta={"kind": "scores"}))
    return found


def _attention_args(match: Match) -> dict:
    """q, k, v, mask, is_causal, scale, dropout, gqa read from the matched graph."""
    if match.pattern.meta["kind"] == "sdpa":
        node = match.find(aten.scaled_dot_product_attention.default)
        names = ["q", "k", "v", "mask", "dropout", "is_causal"]
        args = dict(zip(names, node.args, strict=False))
        return {"q": args["q"], "k": args["k"], "v": args["v"], "mask": args.get("mask", node.kwargs.get("attn_mask")),
                "dropout": args.get("dropout", node.kwargs.get("dropout_p", 0.0)),
                "is_causal": args.get("is_causal", node.kwargs.get("is_causal", False)),
                "scale": node.kwargs.get("scale"), "gqa": node.kwargs.get("enable_gqa", False), "sdpa": True}
    if match.pattern.meta["kind"] == "scores":
        scores = read_scores(match.inputs[0])
        if isinstance(scores, str):
            return {"unsplit": scores}
        return scores | {"v": match.inputs[1], "dropout": 0.0, "is_causal": False, "gqa": False, "sdpa": False}
    q, k, v = match.inputs[:3]
    scale = 1.0
    if match.pattern.meta["scale"] != "none":
        op = match.find(aten.mul.Tensor if match.pattern.meta["scale"] == "mul" else aten.div.Tensor)
        factor = op.args[1]
        scale = float(factor) if match.pattern.meta["scale"] == "mul" else 1.0 / float(factor)
    mask = match.inputs[3] if match.pattern.meta["mask"] else None
    softcap = None
    if match.pattern.meta.get("softcap"):  # tanh(mul(scores, scale) / cap) · cap
        capped = match.find(aten.div.Tensor)
        softcap, scale = float(capped.args[1]), float(capped.args[0].args[1])
    return {"q": q, "k": k, "v": v, "mask": mask, "dropout": 0.0, "is_causal": False, "scale": scale,
            "gqa": False, "sdpa": False, "softcap": softcap}


def check(match: Match, ctx: Context) -> str | None:
    a = _attention_args(match)
    if "unsplit" in a:
        return f"attention left fused: {a['unsplit']}"
    for name in ("q", "k", "v"):
        if not isinstance(a[name], fx.Node) or len(shape(a[name])) != 4:
            return f"{name} is not a rank-4 (B, H, S, d) tensor"
    if a["dropout"]:
        return f"attention dropout p={a['dropout']} (compile the model in eval mode)"
    if not isinstance(a["scale"], float | int | None):
        return "the attention scale is a tensor"
    (_, h, sq, _), (_, hk, sk, _) = shape(a["q"]), shape(a["k"])
    if h % hk:
        return f"{h} query heads do not group over {hk} key/value heads"
    mask = a["mask"]
    if mask is not None and (not isinstance(mask, fx.Node) or len(shape(mask)) > 4 or len(shape(mask)) < 2
                             or shape(mask)[-2] not in (1, sq) or shape(mask)[-1] not in (1, sk)):
        return f"mask of shape {shape(mask) if isinstance(mask, fx.Node) else mask} does not broadcast to " \
               f"(…, {sq}, {sk})"
    if mask is not None and len(shape(mask)) == 4 and shape(mask)[1] not in (1, h):
        return f"mask with {shape(mask)[1]} head entries for {h} heads"
    try:
        _Heads(ctx, match.output).plan(a)
    except Unfollowable as exc:
        return str(exc)
    return None


def replace(match: Match, ctx: Context) -> fx.Node:
    return _Heads(ctx, match.output).build(_attention_args(match))


class _Heads:
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
            self._walk(_strip_repeat(a[name])[0])

    def _walk(self, node: fx.Node) -> None:
        if _head_split(node) is not None or self._split(node) is not None or self._is_rows(node):
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
        split = _head_split(node)
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

    # -- the per-head attention ------------------------------------------------------------------
    def build(self, a: dict) -> fx.Node:
        q, (k, _), (v, _) = a["q"], _strip_repeat(a["k"]), _strip_repeat(a["v"])
        b, heads, sq, d = shape(q)
        kv_heads, v_heads, sk = shape(k)[1], shape(v)[1], shape(k)[2]
        group, v_group = heads // kv_heads, heads // v_heads  # query head h reads K/V head h // group
        scale = a["scale"] if a["scale"] is not None else 1 / math.sqrt(d)
        keys = self._keys_transposed(k, kv_heads, d)  # (B, S_k, 1, d) per kv head
        values = [self.head(v, j) for j in range(v_heads)]
        masks = self._masks(a["mask"], a["is_causal"], heads, sq, sk)
        kept = self._rows_kept(masks) if a["sdpa"] else []
        outputs = []
        for h in range(heads):
            q_h = self.op(aten.mul.Tensor, self.head(q, h), scale)  # (B, d, 1, S_q)
            w = self.op(aten.einsum.default, "bchq,bkhc->bkhq", [q_h, keys[h // group]])  # (B, S_k, 1, S_q)
            if a.get("softcap"):  # Gemma2: tanh(s / cap) · cap
                w = self.op(aten.mul.Tensor, self.op(aten.tanh.default, self.op(aten.div.Tensor, w, a["softcap"])),
                            a["softcap"])
            mask = masks[h] if len(masks) > 1 else (masks[0] if masks else None)
            if mask is not None:
                w = self.op(aten.add.Tensor, w, mask)
            w = self.op(aten._softmax.default, w, 1, False)
            outputs.append(self.op(aten.einsum.default, "bkhq,bchk->bchq", [w, values[h // v_group]]))
            if len(kept) > 1:
                outputs[-1] = self._zero_unless(kept[h], outputs[-1])
        out = self.op(aten.cat.default, outputs, 1)  # (B, H·d, 1, S_q)
        if len(kept) == 1:
            out = self._zero_unless(kept[0], out)
        heads_view = self.op(aten.view.default, out, [b, heads, d, sq])  # (B, H, d, S_q)
        return self.op(aten.permute.default, heads_view, [0, 1, 3, 2])  # (B, H, S_q, d), cancels downstream

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
        whole = _whole(parts) or self.op(aten.cat.default, parts, 1)  # (B, C_kv, 1, S_k)
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


def _head_split(node) -> tuple[fx.Node, int] | None:
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


def _strip_repeat(node: fx.Node) -> tuple[fx.Node, int]:
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


def _whole(parts: list[fx.Node]) -> fx.Node | None:
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


RULE = Rule(
    name="split_head_attention",
    summary="attention → one small einsum attention per head on (B, d, 1, S), softmax over axis 1",
    patterns=patterns,
    check=check,
    replace=replace,
    after=lambda ctx: simplify_layout_chains(ctx.graph, ctx.rule),
)
