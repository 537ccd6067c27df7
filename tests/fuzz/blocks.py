"""The building blocks of fuzzed models: plain torch modules, written the way models write them.

Each block maps the running tensor to the next one; a block that reads an extra model input (an
attention mask, a cross-attention memory) names their indices in `extra`. Weights are random (the
caller seeds torch), norms' γ/β too, so that no rewrite can pass by multiplying with ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x):
        return ACTIVATIONS[self.name](x)

    def extra_repr(self) -> str:
        return self.name


class Projection(nn.Module):
    """A projection written as nn.Linear, x @ W (W stored (in, out)), or GPT-2's Conv1D (view, addmm, view)."""

    def __init__(self, cin: int, cout: int, bias: bool, kind: str):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.randn(cin, cout) / math.sqrt(cin))
        self.bias = nn.Parameter(torch.randn(cout) * 0.1) if bias or kind == "conv1d" else None

    def forward(self, x):
        if self.kind == "conv1d":
            out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
            return out.view(*x.shape[:-1], self.weight.shape[1])
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.kind}, {tuple(self.weight.shape)}, bias={self.bias is not None}"


class Stack(nn.Module):
    """The body's blocks in order (handing them the model's extra inputs); `residual`: x + body(x)."""

    def __init__(self, body: list[nn.Module], residual: bool = True):
        super().__init__()
        self.body = nn.ModuleList(body)
        self.residual = residual

    def forward(self, x, *extras):
        y = x
        for block in self.body:
            y = run_block(block, y, extras)
        return x + y if self.residual else y

    def extra_repr(self) -> str:
        return "residual" if self.residual else ""


def run_block(block: nn.Module, x, extras: tuple):
    if isinstance(block, Stack):
        return block(x, *extras)
    return block(x, *(extras[i] for i in getattr(block, "extra", ())))


class FuzzModel(nn.Module):
    """The blocks in order; `taps` are blocks whose outputs are returned too (extra graph outputs)."""

    def __init__(self, blocks: list[nn.Module], taps: tuple[int, ...] = ()):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.taps = taps

    def forward(self, x, *extras):
        tapped = []
        for i, block in enumerate(self.blocks):
            x = run_block(block, x, extras)
            if i in self.taps:
                tapped.append(x)
        return (x, *tapped) if tapped else x

    def extra_repr(self) -> str:
        return f"taps={self.taps}" if self.taps else ""


@dataclass(frozen=True)
class RMSForm:
    """One way of writing RMSNorm. kind: manual | F.rms_norm | nn.RMSNorm.

    gamma: left (γ·y) | right (y·γ) | one_plus (Gemma, y·(1+γ)) | none | full (γ over every non-batch
    axis: not a norm weight) | input (y·sigmoid(x): depends on the input). axes: the mean's axes."""

    kind: str = "manual"
    square: str = "pow"  # pow | mul
    inverse: str = "rsqrt"  # rsqrt | sqrt_div
    eps: float | None = 1e-6
    gamma: str = "right"
    upcast: bool = False  # HF: x.to(float32) … .to(x.dtype)
    axes: tuple[int, ...] = (-1,)


class RMSNorm(nn.Module):
    def __init__(self, shape: tuple[int, ...], form: RMSForm):
        super().__init__()
        self.form = form
        self.weight = None
        axis = form.axes[0] % len(shape)
        if form.kind == "nn.RMSNorm":
            self.norm = nn.RMSNorm(shape[-1], eps=form.eps, elementwise_affine=form.gamma != "none")
            if self.norm.weight is not None:
                nn.init.normal_(self.norm.weight, 1.0, 0.5)
        elif form.gamma in ("left", "right", "one_plus"):
            g_shape = [1] * (len(shape) - axis - 1)
            self.weight = nn.Parameter(torch.randn(shape[axis], *g_shape) * 0.5 + 1.0)
        elif form.gamma == "full":
            self.weight = nn.Parameter(torch.randn(*shape[1:]) * 0.5 + 1.0)

    def forward(self, x):
        f = self.form
        if f.kind == "nn.RMSNorm":
            return self.norm(x)
        if f.kind == "F.rms_norm":
            return F.rms_norm(x, [x.shape[-1]], self.weight, f.eps)
        h = x.to(torch.float32) if f.upcast else x
        sq = h.pow(2) if f.square == "pow" else h * h
        ms = sq.mean(f.axes if len(f.axes) > 1 else f.axes[0], keepdim=True)
        if f.eps is not None:
            ms = ms + f.eps
        y = h * torch.rsqrt(ms) if f.inverse == "rsqrt" else h / torch.sqrt(ms)
        if f.upcast:
            y = y.to(x.dtype)
        if f.gamma == "left":
            return self.weight * y
        if f.gamma in ("right", "full"):
            return y * self.weight
        if f.gamma == "one_plus":
            return y * (1.0 + self.weight)
        if f.gamma == "input":
            return y * torch.sigmoid(x)
        return y

    def extra_repr(self) -> str:
        return repr(self.form)


class LayerNorm(nn.Module):
    """nn.LayerNorm over the last axis (affine or not, bias or not), or F.layer_norm over the last two."""

    def __init__(self, shape: tuple[int, ...], affine: bool, bias: bool, two_axes: bool):
        super().__init__()
        self.two_axes = two_axes
        normalized = tuple(shape[-2:]) if two_axes else (shape[-1],)
        self.norm = nn.LayerNorm(normalized, elementwise_affine=affine, bias=bias and affine)
        if affine:
            nn.init.normal_(self.norm.weight, 1.0, 0.5)
            if self.norm.bias is not None:
                nn.init.normal_(self.norm.bias, 0.0, 0.5)

    def forward(self, x):
        return self.norm(x)


@dataclass(frozen=True)
class AttentionForm:
    """An HF-style attention block. gqa: repeat_kv | enable_gqa (SDPA only); impl: sdpa | eager.

    scale: default | explicit (SDPA scale=) | mul | div (eager). mask: none | causal | const_add |
    const_bool | computed (tril built in forward) | input_add | input_bool | padding (a (B, 1, 1, S_k)
    boolean input). rotary: none | buffer | computed. memory: K/V read an extra input (cross-attention)."""

    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 4
    impl: str = "sdpa"
    gqa: str = "repeat_kv"
    scale: str = "default"
    mask: str = "none"
    per_head_mask: bool = False
    rotary: str = "none"
    bias: bool = True
    out_proj: bool = True
    memory: bool = False
    qk_norm: bool = False  # Qwen3/OLMo2: RMSNorm over head_dim of q and k before the transpose
    merge: str = "reshape"  # how heads merge back: reshape | contiguous_view
    q_bias: tuple[int, ...] = ()  # shape of a constant added to q after the head split (right-aligned)


class Attention(nn.Module):
    def __init__(self, shape: tuple[int, int, int], form: AttentionForm, kv_shape: tuple[int, int, int],
                 extra: tuple[int, ...], mask: torch.Tensor | None):
        super().__init__()
        _, s, c = shape
        self.form, self.extra, self.kv_channels = form, extra, kv_shape[2]
        h, hk, d = form.heads, form.kv_heads, form.head_dim
        self.q_proj = nn.Linear(c, h * d, bias=form.bias)
        self.k_proj = nn.Linear(kv_shape[2], hk * d, bias=form.bias)
        self.v_proj = nn.Linear(kv_shape[2], hk * d, bias=form.bias)
        self.o_proj = nn.Linear(h * d, c, bias=form.bias) if form.out_proj else None
        self.q_bias = nn.Parameter(torch.randn(form.q_bias)) if form.q_bias else None
        self.q_norm = nn.RMSNorm(d, eps=1e-6) if form.qk_norm else None
        self.k_norm = nn.RMSNorm(d, eps=1e-6) if form.qk_norm else None
        self.register_buffer("mask", mask, persistent=False)
        angles = torch.arange(max(s, kv_shape[1]))[:, None] * torch.linspace(0.1, 1.0, d // 2)[None]
        self.register_buffer("cos", torch.cat([angles.cos()] * 2, -1), persistent=False)
        self.register_buffer("sin", torch.cat([angles.sin()] * 2, -1), persistent=False)

    def forward(self, x, *inputs):
        f = self.form
        b, s, _ = x.shape
        memory = inputs[0] if f.memory else x
        extra = inputs[-1] if inputs else None
        sk = memory.shape[1]
        q = self.q_proj(x).view(b, s, f.heads, f.head_dim)
        k = self.k_proj(memory).view(b, sk, f.kv_heads, f.head_dim)
        if f.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.q_bias is not None:
            q = q + self.q_bias
        v = self.v_proj(memory).view(b, sk, f.kv_heads, f.head_dim).transpose(1, 2)
        if f.rotary != "none":
            q, k = self._rotate(q, s), self._rotate(k, sk)
        n_rep = f.heads // f.kv_heads
        if n_rep > 1 and (f.gqa == "repeat_kv" or f.impl == "eager"):
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        mask = self._mask(extra, s, sk, x.dtype)
        scale = 1 / math.sqrt(f.head_dim) if f.scale == "default" else 0.3
        if f.impl == "sdpa":
            kwargs = {"scale": scale} if f.scale == "explicit" else {}
            if n_rep > 1 and f.gqa == "enable_gqa":
                kwargs["enable_gqa"] = True
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=f.mask == "causal", **kwargs)
        else:
            scores = q @ k.transpose(-1, -2)
            scores = scores / (1 / scale) if f.scale == "div" else scores * scale
            if mask is not None:
                scores = scores + _additive(mask, scores.dtype)
            out = torch.softmax(scores, dim=-1) @ v
        out = out.transpose(1, 2)
        out = out.contiguous().view(b, s, -1) if f.merge == "contiguous_view" else out.reshape(b, s, -1)
        return self.o_proj(out) if self.o_proj is not None else out

    def _rotate(self, t, n):
        if self.form.rotary == "computed":  # as HF: tables from positions, built in forward
            positions = torch.arange(n, dtype=torch.float32)
            freqs = torch.linspace(0.1, 1.0, self.form.head_dim // 2)
            angles = positions[:, None] * freqs[None]
            cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        else:
            cos, sin = self.cos[:n], self.sin[:n]
        half = self.form.head_dim // 2
        rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
        return t * cos[None, None] + rotated * sin[None, None]

    def _mask(self, extra, s, sk, dtype):
        kind = self.form.mask
        if kind in ("input_add", "input_bool", "padding"):
            return extra
        if kind == "computed":
            return torch.ones(s, sk, dtype=torch.bool).tril()[None, None]
        if kind in ("const_add", "const_bool"):
            return self.mask
        if kind == "causal" and self.form.impl == "eager":
            return torch.ones(s, sk, dtype=torch.bool).tril()[None, None]
        return None

    def extra_repr(self) -> str:
        return repr(self.form)


def repeat_kv(t, n_rep: int):
    """transformers' repeat_kv: (B, Hkv, S, d) → (B, Hkv·n_rep, S, d)."""
    b, hk, s, d = t.shape
    return t[:, :, None, :, :].expand(b, hk, n_rep, s, d).reshape(b, hk * n_rep, s, d)


def _additive(mask, dtype):
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    return mask
