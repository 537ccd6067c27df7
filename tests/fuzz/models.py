"""Hypothesis strategy for random models built from the constructs the rules touch.

`fuzz_cases()` draws a `FuzzCase`: a `FuzzModel` (plain torch modules, random weights, eval mode) and
the shapes of its inputs — a running tensor of rank 2 (N, C), 3 (B, S, C) or 4 (B, H, S, D) with batch
1–3, sequence 1–16 and channels 8–32, plus any extra inputs its blocks read (attention masks,
cross-attention memories). Blocks: Linear chains with and without bias and activations, residual
adds, LayerNorm, every RMSNorm form the rules know (and some they must refuse), HF-style attention
(SDPA and eager, GQA via repeat_kv or enable_gqa, rotary, causal / additive / boolean / padding masks,
constant or input, per head or shared), reshapes, transposes, head round trips, cat/split/slice,
broadcast scale-and-shift, softmax and reductions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from torch import nn

from tests.fuzz.blocks import (
    Activation,
    Attention,
    AttentionForm,
    FuzzModel,
    LayerNorm,
    Projection,
    RMSForm,
    RMSNorm,
    Stack,
)
from tests.fuzz.tensor_blocks import (
    CatWith,
    HeadRoundTrip,
    Reduce,
    Reshape,
    ScaleShift,
    Slice,
    Softmax,
    SplitApply,
    Transpose,
)

ACTS = ("relu", "gelu", "silu", "tanh")
MAX_CHANNELS = 64


@dataclass(frozen=True)
class ExtraInput:
    """A model input besides the running tensor. kind: float | bool_mask | add_mask (fill: -inf,
    min = finfo.min, or bias = random values). A mask keeps key 0 in every row, except that with
    `drop_row` the last query of the first batch entry sees no key at all."""

    shape: tuple[int, ...]
    kind: str = "float"
    fill: str = "-inf"
    drop_row: bool = False

    def make(self, gen: torch.Generator) -> torch.Tensor:
        if self.kind == "float":
            return torch.randn(self.shape, generator=gen)
        keep = torch.rand(self.shape, generator=gen) > 0.3
        keep[..., 0] = True
        if self.drop_row:
            keep[(0,) * (keep.dim() - 2) + (-1,)] = False
        if self.kind == "bool_mask":
            return keep
        if self.fill == "bias":
            return torch.randn(self.shape, generator=gen)
        value = float("-inf") if self.fill == "-inf" else torch.finfo(torch.float32).min
        return torch.zeros(self.shape).masked_fill(~keep, value)


@dataclass
class FuzzCase:
    model: FuzzModel
    shape: tuple[int, ...]
    extras: list[ExtraInput]
    seed: int

    def inputs(self, n: int = 0) -> tuple[torch.Tensor, ...]:
        """Input set n (0 is the compile example; others are fresh inputs of the same shapes)."""
        gen = torch.Generator().manual_seed(self.seed * 1000 + n)
        return (torch.randn(self.shape, generator=gen), *(e.make(gen) for e in self.extras))

    def __repr__(self) -> str:
        extras = ", ".join(f"{e.kind}{e.shape}" for e in self.extras)
        return f"FuzzCase(input{self.shape}{', ' + extras if extras else ''}, seed={self.seed})\n{self.model}"


@dataclass
class Builder:
    """What the block strategies share while one model is drawn."""

    draw: st.DrawFn
    extras: list[ExtraInput] = field(default_factory=list)

    def extra(self, spec: ExtraInput) -> int:
        self.extras.append(spec)
        return len(self.extras) - 1


def _channels(draw, low: int = 8, high: int = 32) -> int:
    return draw(st.integers(low, high))


def linear_chain(b: Builder, shape):
    n = b.draw(st.integers(1, 3))
    layers, c = [], shape[-1]
    for _ in range(n):
        out, kind = _channels(b.draw), b.draw(st.sampled_from(("linear", "linear", "matmul", "conv1d")))
        bias = b.draw(st.booleans())
        layers.append(nn.Linear(c, out, bias=bias) if kind == "linear" else Projection(c, out, bias, kind))
        act = b.draw(st.sampled_from((None, *ACTS)))
        if act:
            layers.append(Activation(act))
        c = out
    return nn.Sequential(*layers), (*shape[:-1], c)


def rms_norm(b: Builder, shape):
    kind = b.draw(st.sampled_from(("manual", "manual", "F.rms_norm", "nn.RMSNorm")))
    eps = b.draw(st.sampled_from((1e-6, 1e-5, None)))
    if kind != "manual":
        form = RMSForm(kind=kind, eps=eps, gamma=b.draw(st.sampled_from(("right", "none"))))
        return RMSNorm(shape, form), shape
    axes = b.draw(st.sampled_from(((-1,), (-1,), (-1,), (1,), (-2, -1))))
    gamma = b.draw(st.sampled_from(("right", "left", "one_plus", "none", "full", "input")))
    form = RMSForm(square=b.draw(st.sampled_from(("pow", "mul"))), inverse=b.draw(st.sampled_from(("rsqrt",
                   "sqrt_div"))), eps=eps, gamma=gamma, upcast=b.draw(st.booleans()), axes=axes)
    return RMSNorm(shape, form), shape


def layer_norm(b: Builder, shape):
    affine = b.draw(st.booleans())
    module = LayerNorm(shape, affine, b.draw(st.booleans()), two_axes=b.draw(st.sampled_from((False,) * 4 + (True,))))
    return module, shape


def activation(b: Builder, shape):
    return Activation(b.draw(st.sampled_from(ACTS))), shape


def _mask_shape(b: Builder, batch: int, heads: int, s: int, sk: int, per_head: bool) -> tuple[int, ...]:
    options = [(1, 1, s, sk), (batch, 1, s, sk), (s, sk), (1, 1, 1, sk), (batch, 1, 1, sk)]
    if per_head:
        options = [(1, heads, s, sk), (batch, heads, s, sk)]
    return b.draw(st.sampled_from(options))


def attention(b: Builder, shape):
    batch, s, c = shape
    kv_heads = b.draw(st.sampled_from((1, 2)))
    heads = kv_heads * b.draw(st.sampled_from((1, 2)))
    impl = b.draw(st.sampled_from(("sdpa", "eager")))
    mask = b.draw(st.sampled_from(("none", "causal", "const_add", "const_bool", "computed", "input_add",
                                   "input_bool", "padding")))
    form = AttentionForm(
        heads=heads, kv_heads=kv_heads, head_dim=b.draw(st.sampled_from((2, 4, 8))), impl=impl,
        gqa=b.draw(st.sampled_from(("repeat_kv", "enable_gqa"))),
        scale=b.draw(st.sampled_from(("default", "explicit") if impl == "sdpa" else ("default", "mul", "div"))),
        mask=mask, per_head_mask=b.draw(st.booleans()) and mask in ("const_add", "const_bool", "input_add"),
        rotary=b.draw(st.sampled_from(("none", "buffer", "computed"))), bias=b.draw(st.booleans()),
        out_proj=b.draw(st.booleans()), memory=b.draw(st.sampled_from((False,) * 3 + (True,))),
        qk_norm=b.draw(st.sampled_from((False, False, True))),
        merge=b.draw(st.sampled_from(("reshape", "contiguous_view"))))
    q_bias = b.draw(st.sampled_from(((), (), (heads, 1, form.head_dim), (heads, s, form.head_dim), (form.head_dim,),
                                     (1, heads, s, 1), (s, form.head_dim))))
    form = AttentionForm(**{**form.__dict__, "q_bias": q_bias})
    extra, kv_shape, const = (), shape, None
    if form.memory:
        kv_shape = (batch, b.draw(st.integers(1, 16)), _channels(b.draw))
        extra = (b.extra(ExtraInput(kv_shape)),)
    sk = kv_shape[1]
    if mask in ("const_add", "const_bool", "input_add", "input_bool", "padding"):
        m_shape = (batch, 1, 1, sk) if mask == "padding" else _mask_shape(b, batch, heads, s, sk, form.per_head_mask)
        kind = "bool_mask" if mask in ("const_bool", "input_bool", "padding") else "add_mask"
        spec = ExtraInput(m_shape, kind, b.draw(st.sampled_from(("-inf", "min", "bias"))),
                          drop_row=b.draw(st.sampled_from((False, False, True))))
        if mask.startswith("const"):
            const = spec.make(torch.Generator().manual_seed(b.draw(st.integers(0, 99))))
        else:
            extra = (*extra, b.extra(spec))
    module = Attention(shape, form, kv_shape, extra, const)
    out_c = c if form.out_proj else heads * form.head_dim
    return module, (batch, s, out_c)


def residual(b: Builder, shape, depth: int):
    body, inner = [], shape
    for _ in range(b.draw(st.integers(1, 3))):
        block, inner = draw_block(b, inner, depth + 1, keep_leading=True)
        body.append(block)
    if inner[-1] != shape[-1]:
        body.append(nn.Linear(inner[-1], shape[-1], bias=b.draw(st.booleans())))
    return Stack(body), shape


def transformer_layer(b: Builder, shape):
    """A pre-norm decoder layer: x + attention(norm(x)), then x + mlp(norm(x))."""
    norm = rms_norm if b.draw(st.booleans()) else layer_norm
    first = [norm(b, shape)[0], attention(b, shape)[0]]
    hidden, act = _channels(b.draw, 8, 64), b.draw(st.sampled_from(ACTS))
    mlp = [norm(b, shape)[0], nn.Linear(shape[-1], hidden), Activation(act), nn.Linear(hidden, shape[-1])]
    if first[1].form.out_proj is False:
        first.append(nn.Linear(first[1].form.heads * first[1].form.head_dim, shape[-1]))
    return Stack([Stack(first), Stack(mlp)], residual=False), shape


def split_apply(b: Builder, shape):
    dim = len(shape) - 1 if b.draw(st.booleans()) else b.draw(st.integers(0, len(shape) - 1))
    size = shape[dim]
    if size < 2:
        return activation(b, shape)
    chunk = b.draw(st.booleans())
    if chunk:
        n = b.draw(st.integers(2, min(4, size)))
        per = -(-size // n)
        sizes = [min(per, size - i * per) for i in range(n) if size - i * per > 0]
    else:
        cut = b.draw(st.integers(1, size - 1))
        sizes = [cut, size - cut]
    acts = [b.draw(st.sampled_from((None, *ACTS))) for _ in sizes]
    return SplitApply(sizes, acts, dim if b.draw(st.booleans()) else dim - len(shape), chunk), shape


def cat_with(b: Builder, shape, keep_leading: bool):
    dim = -1 if keep_leading or b.draw(st.booleans()) else b.draw(st.integers(0, len(shape) - 2))
    if dim == -1 and shape[-1] * 2 > MAX_CHANNELS:
        return activation(b, shape)
    if b.draw(st.booleans()):
        out = _channels(b.draw, 1, 16) if dim == -1 else shape[-1]
        body = nn.Linear(shape[-1], out, bias=b.draw(st.booleans()))
    else:
        out, body = shape[-1], Activation(b.draw(st.sampled_from(ACTS)))
    new = list(shape)
    new[dim] = shape[dim] + (out if dim == -1 else shape[dim])
    return CatWith(body, dim), tuple(new)


def slice_(b: Builder, shape, keep_leading: bool):
    dim = -1 if keep_leading else b.draw(st.integers(0, len(shape) - 1))
    size = shape[dim]
    start = b.draw(st.integers(0, size - 1))
    stop = b.draw(st.integers(start + 1, size))
    new = list(shape)
    new[dim] = stop - start
    return Slice(dim, start, stop), tuple(new)


def scale_shift(b: Builder, shape):
    trailing = b.draw(st.integers(1, min(2, len(shape) - 1)))
    return ScaleShift(shape[-trailing:], b.draw(st.booleans())), shape


def softmax(b: Builder, shape, keep_leading: bool):
    dim = -1 if keep_leading else b.draw(st.integers(0, len(shape) - 1))
    return Softmax(dim), shape


def reduce(b: Builder, shape):
    return Reduce(b.draw(st.sampled_from(("centre", "gate", "amax")))), shape


def head_round_trip(b: Builder, shape):
    heads = b.draw(st.sampled_from([h for h in (1, 2, 4, 8) if shape[-1] % h == 0]))
    return HeadRoundTrip(heads, b.draw(st.sampled_from(ACTS))), shape


def transpose(b: Builder, shape):
    rank = len(shape)
    d0, d1 = b.draw(st.sampled_from([(i, j) for i in range(rank) for j in range(i + 1, rank)]))
    new = list(shape)
    new[d0], new[d1] = shape[d1], shape[d0]
    return Transpose(d0, d1), tuple(new)


def change_rank(b: Builder, shape):
    """Rank 2 ↔ 3 ↔ 4 the way models do it: (N, C) ↔ (B, S, C) ↔ (B, H, S, D)."""
    if len(shape) == 2:
        n, c = shape
        batch = b.draw(st.sampled_from([d for d in (1, 2, 3) if n % d == 0]))
        new = (batch, n // batch, c)
        return Reshape(new, view=False), new
    if len(shape) == 4:
        bb, h, s, d = shape
        return nn.Sequential(Transpose(1, 2), Reshape((bb, s, h * d), view=False)), (bb, s, h * d)
    bb, s, c = shape
    if b.draw(st.booleans()):
        return Reshape((bb * s, c), view=False), (bb * s, c)
    h = b.draw(st.sampled_from([h for h in (1, 2, 4) if c % h == 0]))
    return nn.Sequential(Reshape((bb, s, h, c // h), view=False), Transpose(1, 2)), (bb, h, s, c // h)


# repeated kinds are drawn more often: the rules' own constructs first
KEEP_LEADING = ("attention", "attention", "attention", "layer", "linear", "linear", "rms_norm", "rms_norm",
                "layer_norm", "residual", "residual", "activation", "split_apply", "cat_with", "slice",
                "scale_shift", "softmax", "reduce", "head_round_trip")
ANY_SHAPE = ("transpose", "change_rank")
RANK3_ONLY = ("attention", "layer", "head_round_trip")


def draw_block(b: Builder, shape, depth: int = 0, keep_leading: bool = False):
    """One block for a running tensor of `shape`: (module, output shape)."""
    kinds = [k for k in KEEP_LEADING + (() if keep_leading else ANY_SHAPE)
             if (k not in RANK3_ONLY or len(shape) == 3) and (k not in ("residual", "layer") or depth < 2)]
    kind = b.draw(st.sampled_from(kinds))
    if kind == "residual":
        return residual(b, shape, depth)
    if kind == "layer":
        return transformer_layer(b, shape)
    if kind in ("cat_with", "slice", "softmax"):
        return {"cat_with": cat_with, "slice": slice_, "softmax": softmax}[kind](b, shape, keep_leading)
    builders = {"linear": linear_chain, "rms_norm": rms_norm, "layer_norm": layer_norm, "activation": activation,
                "split_apply": split_apply, "scale_shift": scale_shift, "reduce": reduce, "attention": attention,
                "head_round_trip": head_round_trip, "transpose": transpose, "change_rank": change_rank}
    return builders[kind](b, shape)


@st.composite
def fuzz_cases(draw, max_blocks: int = 5) -> FuzzCase:
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    rank = draw(st.sampled_from((3, 2, 4, 3, 3)))
    batch, seq, channels = draw(st.integers(1, 3)), draw(st.integers(1, 16)), _channels(draw)
    shape = {2: (batch * seq, channels), 3: (batch, seq, channels),
             4: (batch, draw(st.integers(1, 4)), seq, channels)}[rank]
    b = Builder(draw)
    blocks, current = [], shape
    for _ in range(draw(st.integers(1, max_blocks))):
        block, current = draw_block(b, current)
        blocks.append(block)
    taps = tuple(draw(st.sets(st.integers(0, len(blocks) - 2), max_size=1))) if len(blocks) > 1 else ()
    return FuzzCase(FuzzModel(blocks, taps).eval(), shape, b.extras, seed)
