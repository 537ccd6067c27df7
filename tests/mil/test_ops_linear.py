"""conv, matmul, linear, einsum and scaled_dot_product_attention against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb

from tests.mil.programs import rand


def _torch_conv(x, w, stride, dilation, groups, pads):
    """pads: (before, after) per spatial dim, applied explicitly so asymmetric padding is exact."""
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants the last dim first
    xt = F.pad(torch.from_numpy(x), flat)
    fn = F.conv1d if x.ndim == 3 else F.conv2d
    return fn(xt, torch.from_numpy(w), stride=stride, dilation=dilation, groups=groups).numpy()


CONV_CASES = [
    # (x shape, weight shape, strides, dilations, groups, pad_type, custom pad, expected (before, after))
    ((1, 4, 9, 9), (6, 4, 3, 3), [1, 1], [1, 1], 1, "valid", None, [(0, 0), (0, 0)]),
    ((1, 4, 9, 9), (6, 4, 3, 3), [1, 1], [1, 1], 1, "same", None, [(1, 1), (1, 1)]),
    ((1, 4, 8, 8), (6, 4, 2, 4), [1, 1], [1, 1], 1, "same", None, [(0, 1), (1, 2)]),  # even: extra after
    ((1, 4, 8, 8), (6, 4, 2, 4), [1, 1], [1, 1], 1, "same_lower", None, [(1, 0), (2, 1)]),
    ((1, 4, 8, 9), (6, 4, 3, 3), [2, 2], [1, 1], 1, "same", None, [(0, 1), (1, 1)]),  # stride 2: ceil(d/2)
    ((1, 4, 9, 9), (4, 2, 3, 3), [2, 1], [1, 1], 2, "custom", [1, 2, 0, 1], [(1, 2), (0, 1)]),
    ((1, 4, 9, 9), (8, 1, 3, 3), [1, 1], [2, 2], 4, "valid", None, [(0, 0), (0, 0)]),  # depthwise, dilated
    ((2, 6, 1, 16), (12, 6, 1, 1), [1, 1], [1, 1], 1, "valid", None, [(0, 0), (0, 0)]),  # 1x1 on (B,C,1,S)
    ((2, 6, 1, 16), (12, 2, 1, 1), [1, 1], [1, 1], 3, "valid", None, [(0, 0), (0, 0)]),  # grouped 1x1
    ((1, 4, 20), (6, 4, 3), [2], [1], 1, "custom", [1, 1], [(1, 1)]),  # 1-D (whisper's stem)
    ((1, 4, 20), (8, 2, 5), [1], [2], 2, "same", None, [(4, 4)]),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[5]}-k{c[1][2:]}-s{c[2]}-d{c[3]}-g{c[4]}")
def test_conv(run_mil, case):
    x_shape, w_shape, strides, dilations, groups, pad_type, pad, pads = case
    x, w, b = rand(*x_shape), rand(*w_shape, seed=1), rand(w_shape[0], seed=2)
    kwargs = {"pad": np.array(pad, np.int32)} if pad is not None else {}

    def fn(x):
        return mb.conv(x=x, weight=w, bias=b, strides=strides, dilations=dilations, groups=groups,
                       pad_type=pad_type, **kwargs)

    out = run_mil(fn, "conv", x=x)
    expected = _torch_conv(x, w, strides, dilations, groups, pads) + b.reshape((1, -1) + (1,) * (x.ndim - 2))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("x_shape", "y_shape", "tx", "ty"), [
    ((3, 4), (4, 5), False, False),
    ((2, 3, 4), (2, 5, 4), False, True),
    ((2, 4, 3), (4, 5), True, False),  # broadcast a 2-D y over the batch
    ((1, 2, 4, 3), (3, 1, 4, 5), True, False),  # both batch dims broadcast
    ((4, 3), (2, 3, 5), False, False),  # a 2-D x broadcasts too
])
def test_matmul(run_mil, x_shape, y_shape, tx, ty):
    x, y = rand(*x_shape), rand(*y_shape, seed=1)
    out = run_mil(lambda x, y: mb.matmul(x=x, y=y, transpose_x=tx, transpose_y=ty), "matmul", x=x, y=y)
    xt = np.swapaxes(x, -1, -2) if tx else x
    yt = np.swapaxes(y, -1, -2) if ty else y
    np.testing.assert_allclose(out, np.matmul(xt, yt), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_linear(run_mil, bias):
    x, w, b = rand(2, 3, 8), rand(5, 8, seed=1), rand(5, seed=2)
    kwargs = {"bias": b} if bias else {}
    out = run_mil(lambda x: mb.linear(x=x, weight=w, **kwargs), "linear", x=x)
    np.testing.assert_allclose(out, x @ w.T + (b if bias else 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("torch_equation", "mil_equation", "a_shape", "b_shape"), [
    # coremltools' torch frontend emits these with the operands swapped, in MIL's canonical form
    ("bchq,bkhc->bkhq", "bkhc,bchq->bkhq", (1, 16, 1, 12), (1, 12, 1, 16)),  # scores per head, (B,C,1,S)
    ("bkhq,bchk->bchq", "bchk,bkhq->bchq", (1, 12, 1, 12), (1, 16, 1, 12)),  # context per head
    ("nwhu,nchw->nchu", "nchw,nwhu->nchu", (1, 5, 4, 6), (2, 3, 4, 5)),  # a size-1 batch dim broadcasts
])
def test_einsum(run_mil, torch_equation, mil_equation, a_shape, b_shape):
    a, b = rand(*a_shape), rand(*b_shape, seed=1)
    out = run_mil(lambda a, b: mb.einsum(values=(b, a), equation=mil_equation), "einsum", a=a, b=b)
    expected = torch.einsum(torch_equation, torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _sdpa_inputs():
    return rand(1, 2, 5, 8), rand(1, 2, 7, 8, seed=1), rand(1, 2, 7, 4, seed=2)


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_scaled_dot_product_attention(run_mil, mask):
    q, k, v = _sdpa_inputs()
    causal = np.tril(np.ones((5, 7), bool), k=2)
    masks = {"none": None, "bool": causal, "additive": np.where(causal, 0.0, -1e4).astype(np.float32)
             + rand(5, 7, seed=3)}
    m = masks[mask]
    if m is None:
        def fn(q, k, v):
            return mb.scaled_dot_product_attention(query=q, key=k, value=v)
    else:
        def fn(q, k, v):
            return mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m)
    out = run_mil(fn, "scaled_dot_product_attention", q=q, k=k, v=v)
    t = [torch.from_numpy(a) for a in (q, k, v)]
    expected = F.scaled_dot_product_attention(*t, attn_mask=None if m is None else torch.from_numpy(m))
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-5)
