"""Fuzz blocks that move data around: reshapes, transposes, cat/split, slices, elementwise ops,
reductions. Each takes the running tensor and returns the next one; shapes are static."""

from __future__ import annotations

import torch
from torch import nn

from tests.fuzz.blocks import ACTIVATIONS


class Transpose(nn.Module):
    def __init__(self, dim0: int, dim1: int):
        super().__init__()
        self.dims = (dim0, dim1)

    def forward(self, x):
        return x.transpose(*self.dims)

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class Reshape(nn.Module):
    """x.reshape(shape) (or .view); the target shape is fixed when the model is built."""

    def __init__(self, shape: tuple[int, ...], view: bool):
        super().__init__()
        self.shape, self.view = shape, view

    def forward(self, x):
        return x.view(self.shape) if self.view else x.reshape(self.shape)

    def extra_repr(self) -> str:
        return f"{'view' if self.view else 'reshape'} {self.shape}"


class HeadRoundTrip(nn.Module):
    """(B, S, C) → view (B, S, H, C/H) → transpose(1, 2) → activation → back to (B, S, C)."""

    def __init__(self, heads: int, act: str):
        super().__init__()
        self.heads, self.act = heads, act

    def forward(self, x):
        b, s, c = x.shape
        t = x.view(b, s, self.heads, c // self.heads).transpose(1, 2)
        t = ACTIVATIONS[self.act](t)
        return t.transpose(1, 2).reshape(b, s, c)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, act={self.act}"


class SplitApply(nn.Module):
    """split along `dim`, an activation (or identity) per piece, cat back along the same dim."""

    def __init__(self, sizes: list[int], acts: list[str | None], dim: int, chunk: bool):
        super().__init__()
        self.sizes, self.acts, self.dim, self.chunk = sizes, acts, dim, chunk

    def forward(self, x):
        pieces = x.chunk(len(self.sizes), self.dim) if self.chunk else torch.split(x, self.sizes, self.dim)
        out = [ACTIVATIONS[a](p) if a else p for p, a in zip(pieces, self.acts, strict=True)]
        return torch.cat(out, self.dim)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, acts={self.acts}, dim={self.dim}, chunk={self.chunk}"


class CatWith(nn.Module):
    """cat([x, body(x)], dim): body is a Linear over the last axis or an activation."""

    def __init__(self, body: nn.Module, dim: int):
        super().__init__()
        self.body, self.dim = body, dim

    def forward(self, x):
        return torch.cat([x, self.body(x)], self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Slice(nn.Module):
    def __init__(self, dim: int, start: int, stop: int):
        super().__init__()
        self.dim, self.start, self.stop = dim, start, stop

    def forward(self, x):
        return x.narrow(self.dim, self.start, self.stop - self.start)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, [{self.start}:{self.stop}]"


class ScaleShift(nn.Module):
    """x * w + b with w, b broadcast from the trailing axes (parameters or a constant table)."""

    def __init__(self, shape: tuple[int, ...], parameter: bool):
        super().__init__()
        w, b = torch.randn(shape) * 0.5 + 1.0, torch.randn(shape) * 0.5
        if parameter:
            self.w, self.b = nn.Parameter(w), nn.Parameter(b)
        else:
            self.register_buffer("w", w)
            self.register_buffer("b", b)

    def forward(self, x):
        return x * self.w + self.b


class Softmax(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return torch.softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Reduce(nn.Module):
    """centre (x − mean(x, -1, keepdim)), gate (x · sigmoid(sum(x, -1, keepdim))), or a sum without
    keepdim followed by unsqueeze (the rank changes in between)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "centre":
            return x - x.mean(-1, keepdim=True)
        if self.kind == "gate":
            return x * torch.sigmoid(x.sum(-1, keepdim=True))
        return x * x.amax(-1).unsqueeze(-1)

    def extra_repr(self) -> str:
        return self.kind
