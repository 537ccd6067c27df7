"""fft_to_dft: `torch.fft.rfft` / `torch.fft.fft` of a real, static-size signal become two DFT projections.

coremltools converts neither FFT, and no complex tensor can reach the Neural Engine. The DFT of a signal
of n samples is a matrix product: Re X[k] = Σ x[t]·cos(2πtk/n), Im X[k] = −Σ x[t]·sin(2πtk/n).

Before (a windowed spectrogram)::

    w = aten.mul(frames, window)                  # frames (B, F, L), window a constant (L,)
    s = aten.fft_rfft(w, n, -1, norm)             # complex (B, F, K), K = n // 2 + 1
    p = aten.pow(aten.abs(s), 2)

After::

    re = aten.linear(frames, Wcos)                # Wcos (K, L) = scale · window · cos, a constant
    im = aten.linear(frames, Wsin)                # Wsin (K, L) = −scale · window · sin
    p  = re * re + im * im

`linear_to_conv1x1` then runs both as 1×1 convolutions. When the frames are `x.unfold(-1, size, step)` read
only by the FFT (through the window), the framing and the DFT are one strided convolution per part on the
signal itself, as coremltools lowers `torch.stft` (window, cos and sin in the kernels, no unfold left)::

    re = aten.convolution(x4, Kcos, None, [1, step])   # x4 (B, 1, 1, L), Kcos (K, 1, 1, size) → (B, K, 1, F)
    im = aten.convolution(x4, Ksin, None, [1, step])

`n` pads (zero rows beyond the signal) or
truncates (the weights ignore samples past n); `norm` ("backward", "ortho", "forward") scales the weights.
A constant window multiplied into the signal just before the FFT is folded into the weights.

The complex result's readers become real arithmetic: `.abs()` → sqrt(re² + im²), `.abs() ** 2` →
re² + im², `torch.view_as_real` → stack([re, im], -1), `.real` / `.imag` → re / im, `.angle()` →
atan2(im, re) (π on the negative real axis, through anefx's atan2 converter).

Refuses (the FFT stays, and lowering names it): a complex input; a result read by any other op (the
reason names it and the readers anefx rewrites); a complex program output.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from anefx.graph import add_constant, constant_value, emit, module_path, shape
from anefx.rule import Context, Refusal, Rule
from rewrites.unfold_to_conv import framed_conv

aten = torch.ops.aten
FFTS = {aten.fft_rfft.default: "rfft", aten.fft_fft.default: "fft"}
NORMS = {None: lambda n: 1.0, "backward": lambda n: 1.0, "ortho": lambda n: 1 / math.sqrt(n),
         "forward": lambda n: 1 / n}
READERS = ".abs(), .abs() ** 2, torch.view_as_real, .real / .imag or .angle()"


def fft_args(node: fx.Node) -> tuple[fx.Node, int | None, int, str | None]:
    """(signal, n, dim, norm) of an aten.fft_rfft / fft_fft call, defaults filled in."""
    names = ("self", "n", "dim", "norm")
    given = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    return given["self"], given.get("n"), given.get("dim", -1), given.get("norm")


def refusal(node: fx.Node) -> str | None:
    signal, n, _, norm = fft_args(node)
    name = FFTS[node.target]
    if signal.meta["val"].is_complex() or not signal.meta["val"].is_floating_point():
        return (f"{name} of a {signal.meta['val'].dtype} signal: only the FFT of a real floating-point signal "
                "is rewritten")
    if norm not in NORMS:
        return f"{name} with norm={norm!r}: anefx rewrites norm None, 'backward', 'ortho' and 'forward'"
    if n is not None and n < 1:
        return f"{name} with n={n}"
    for user in node.users:
        reason = _reader_refusal(user, name)
        if reason is not None:
            return reason
    return None


def _reader_refusal(user: fx.Node, name: str) -> str | None:
    if user.op == "output":
        return (f"the {name}'s complex result is a program output: return torch.view_as_real(...) or its "
                ".abs() so the program stays real")
    if user.target in (aten.abs.default, aten.angle.default, aten.view_as_real.default):
        return None
    return (f"the {name}'s complex result is read by {user.target}, which anefx does not rewrite to real "
            f"arithmetic: read it through {READERS} instead")


def dft_weights(length: int, n: int, onesided: bool, scale: float,
                window: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) weights (K, length) of the n-point DFT of a signal of `length` samples, −sin for Im."""
    bins = n // 2 + 1 if onesided else n
    t = torch.arange(min(length, n), dtype=torch.int64)
    k = torch.arange(bins, dtype=torch.int64)
    phase = (torch.outer(k, t) % n).double() * (2 * math.pi / n)  # exact integer reduction, then one rounding
    cos, sin = torch.zeros(bins, length, dtype=torch.float64), torch.zeros(bins, length, dtype=torch.float64)
    cos[:, :t.numel()], sin[:, :t.numel()] = torch.cos(phase) * scale, -torch.sin(phase) * scale
    sin[(torch.outer(k, t) % n * 2 % n == 0).nonzero(as_tuple=True)] = 0.0  # phase 0 or π: exactly 0
    if window is not None:
        cos, sin = cos * window.double(), sin * window.double()
    return cos.to(dtype).contiguous(), sin.to(dtype).contiguous()


def _folded_window(signal: fx.Node, ctx: Context) -> tuple[fx.Node, torch.Tensor | None]:
    """(signal without the window, window) when the signal is frames × a constant window over its last axis
    read only here; else (signal, None)."""
    if signal.target != aten.mul.Tensor or len(signal.users) != 1:
        return signal, None
    for frames, window in (signal.args, signal.args[::-1]):
        value = constant_value(window, ctx.ep) if isinstance(window, fx.Node) else None
        if (value is not None and isinstance(frames, fx.Node) and shape(frames) == shape(signal)
                and value.numel() == shape(signal)[-1] and value.shape[-1] == value.numel()):
            return frames, value.reshape(-1)
    return signal, None


def rewrite(node: fx.Node, ctx: Context) -> None:
    signal, n, dim, norm = fft_args(node)
    rank, rule = len(shape(signal)), ctx.rule

    def op(target, *args):
        return emit(ctx.graph, target, args, origin=node, rule=rule)

    dim = dim % rank
    window = None
    if dim == rank - 1:
        signal, window = _folded_window(signal, ctx)
    length = shape(signal)[dim]
    n = n or length
    cos, sin = dft_weights(length, n, node.target == aten.fft_rfft.default, NORMS[norm](n), window,
                           signal.meta["val"].dtype)
    with ctx.graph.inserting_before(node):
        framing = _framing(signal) if dim == rank - 1 else None
        if framing is not None:  # frames of a signal: one strided convolution per part, on the signal itself
            x, step = framing
            parts = framed_conv(x, [add_constant(ctx.ep, f"dft_{part}", w.reshape(len(w), 1, 1, length))
                                    for part, w in (("cos", cos), ("sin", sin))], step, op)
        else:
            parts = _projections(signal, dim, rank, cos, sin, ctx, op)
        re, im = parts
        power = op(aten.add.Tensor, op(aten.mul.Tensor, re, re), op(aten.mul.Tensor, im, im))
    for user in list(node.users):
        _replace_reader(user, re, im, power, op)
    ctx.graph.erase_node(node)


def _projections(signal: fx.Node, dim: int, rank: int, cos: torch.Tensor, sin: torch.Tensor, ctx: Context,
                 op) -> list[fx.Node]:
    """(re, im): the signal's `dim` projected on the cos and sin weights, in the FFT result's layout."""
    order = [d for d in range(rank) if d != dim] + [dim]
    last = signal if dim == rank - 1 else op(aten.permute.default, signal, order)
    parts = [op(aten.linear.default, last, add_constant(ctx.ep, f"dft_{part}", w))
             for part, w in (("cos", cos), ("sin", sin))]
    if dim != rank - 1:
        back = [order.index(d) for d in range(rank)]
        parts = [op(aten.permute.default, p, back) for p in parts]
    return parts


def _framing(frames: fx.Node) -> tuple[fx.Node, int] | None:
    """(signal, step) when `frames` is x.unfold over x's last axis read only here (a floating-point x)."""
    if frames.target != aten.unfold.default or len(frames.users) != 1:
        return None
    x, dim, _, step = frames.args
    rank = x.meta["val"].dim()
    return (x, step) if rank and dim % rank == rank - 1 and x.meta["val"].is_floating_point() else None


def _replace_reader(user: fx.Node, re: fx.Node, im: fx.Node, power: fx.Node, op) -> None:
    with user.graph.inserting_before(user):
        if user.target == aten.abs.default:
            for squared in [u for u in user.users if _is_square(u)]:
                squared.replace_all_uses_with(power)
                user.graph.erase_node(squared)
            new = op(aten.sqrt.default, power) if user.users else None
        elif user.target == aten.angle.default:
            new = _angle(re, im, op)
        else:  # view_as_real: (..., 2); selecting a part reads re or im directly
            last = len(shape(user)) - 1
            for part in [u for u in user.users if u.target == aten.select.int and u.args[1] % (last + 1) == last]:
                part.replace_all_uses_with(re if part.args[2] in (0, -2) else im)
                user.graph.erase_node(part)
            new = op(aten.stack.default, [re, im], -1) if user.users else None
    if new is not None:
        user.replace_all_uses_with(new)
    user.graph.erase_node(user)


def _angle(re: fx.Node, im: fx.Node, op) -> fx.Node:
    """atan2(im, re): π on the negative real axis too, as torch.angle gives (anefx's atan2 converter, anefx.ops)."""
    return op(aten.atan2.default, im, re)


def _is_square(node: fx.Node) -> bool:
    return (node.target == aten.pow.Tensor_Scalar and node.args[1] == 2) or \
        (node.target == aten.mul.Tensor and node.args[0] is node.args[1])


def run(ctx: Context) -> tuple[int, list[Refusal]]:
    rewritten, refusals = 0, []
    for node in [n for n in ctx.graph.nodes if n.op == "call_function" and n.target in FFTS]:
        reason = refusal(node)
        if reason is not None:
            refusals.append(Refusal(module_path(node) or node.name, node.name, reason))
            continue
        rewrite(node, ctx)
        rewritten += 1
    return rewritten, refusals


RULE = Rule(
    name="fft_to_dft",
    summary="rfft / fft of a real static-size signal become two DFT projections (cos, sin), a constant window "
            "folded in; abs, power, view_as_real, real/imag and angle become real arithmetic",
    run=run,
    ane=False,  # coremltools lowers no FFT: every compute unit needs it
)
