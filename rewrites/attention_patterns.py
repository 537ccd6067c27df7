"""The attention forms split_head_attention matches, and q, k, v, mask, scale read from a match.

SDPA (every combination of mask / scale / is_causal / enable_gqa), eager q @ kᵀ · scale + mask → softmax
→ @ v, Gemma2's soft-capped eager attention, and — last — any softmax(scores) @ v whose scores
`attention_sources.read_scores` reads (or says in words why it cannot).
"""

from __future__ import annotations

import functools
import itertools

import torch

from anefx.graph import shape
from anefx.rule import Match, Pattern
from rewrites.attention_batched import BATCHED_FIX, unbatched
from rewrites.attention_sources import read_scores, weights_times_values

aten = torch.ops.aten
F = torch.nn.functional


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
    return found + _weights_times_values()  # last: any other eager attention


def _weights_times_values() -> list[Pattern]:
    """softmax(scores) @ v with the scores written any way (read by read_scores): matmul on (B, H, S, S) or bmm
    on (B·H, S, S), dropout in eval (clone) or not, a float32 softmax cast back to fp16 / bf16 or not."""
    def example(matmul: bool, dtype: torch.dtype):
        if matmul:
            return torch.randn(1, 2, 4, 4, dtype=dtype), torch.randn(1, 2, 4, 8, dtype=dtype)
        return torch.randn(8, 4, 4, dtype=dtype), torch.randn(8, 4, 8, dtype=dtype)

    found = []
    for matmul, clone, dtype, cast in itertools.product((True, False), (True, False), (True, False),
                                                        (None, torch.float16, torch.bfloat16)):
        if cast is not None and not dtype:
            continue  # softmax in the scores' own dtype needs no cast back
        name = (f"softmax(scores) @ v ({'matmul' if matmul else 'bmm'}{', clone' * clone}{', float32' * dtype}"
                f"{f', to {cast}' if cast else ''})")
        found.append(Pattern(name, weights_times_values(matmul, clone, dtype, cast),
                             lambda m=matmul, c=cast: example(m, c or torch.float32),
                             meta={"kind": "scores", "float32": dtype, "cast": cast}))
    return found


def attention_args(match: Match) -> dict:
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
        v = match.inputs[1]
        if len(shape(v)) == 3:  # bmm on (B·H, S_k, d): the (B, H, S_k, d) tensor it views
            v = unbatched(v, *shape(scores["q"])[:2])
            if v is None:
                return {"unsplit": "its values are (B·H, S, d) tensors that are not views of (B, H, S, d) ones; "
                                   + BATCHED_FIX}
        return scores | {"v": v, "dropout": 0.0, "is_causal": False, "gqa": False, "sdpa": False,
                         "softmax_dtype": torch.float32 if match.pattern.meta["float32"] else None,
                         "cast": match.pattern.meta["cast"]}
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

