"""linear_to_conv1x1: projections → 1×1 conv on a (B, C, 1, S) view; activations @ activations refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.pytorch_utils import Conv1D

import anefx
from rewrites.linear_to_conv1x1 import RULE
from tests.helpers import ops, rewrite, saved_ops

PROJECTION_OPS = ("linear", "addmm", "mm", "matmul", "bmm")


class Linear(torch.nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.a = torch.nn.Linear(16, 24, bias=bias)
        self.b = torch.nn.Linear(24, 8, bias=bias)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class GPT2Conv1D(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(24, 16)  # weight (16, 24): (in, out)

    def forward(self, x):
        return self.c_fc(x)


class MatmulParam(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 24))

    def forward(self, x):
        return x @ self.w


CASES = {
    "nn.Linear 3-D": (Linear, (2, 5, 16), 2),
    "nn.Linear 3-D no bias": (lambda: Linear(bias=False), (2, 5, 16), 2),
    "nn.Linear 2-D": (Linear, (5, 16), 2),
    "GPT-2 Conv1D 3-D": (GPT2Conv1D, (2, 5, 16), 1),
    "GPT-2 Conv1D 2-D": (GPT2Conv1D, (5, 16), 1),
    "x @ W 3-D": (MatmulParam, (2, 5, 16), 1),
    "x @ W 2-D": (MatmulParam, (5, 16), 1),
    "torch.mm(x, W)": (lambda: MmParam(), (5, 16), 1),
}


@pytest.mark.parametrize("case", CASES)
def test_projections_become_convolutions(case):
    factory, shape, projections = CASES[case]
    model = factory().eval()
    x = torch.randn(*shape)
    _, after, records = rewrite(model, (x,), [RULE])
    assert records[-1].status == "applied" and records[-1].matches == projections, records[-1]
    counts = ops(after)
    assert counts["convolution"] == projections
    assert all(counts[op] == 0 for op in PROJECTION_OPS), counts
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_weights_are_viewed_not_copied():
    model = Linear().eval()
    _, after, _ = rewrite(model, (torch.randn(2, 5, 16),), [RULE])
    assert set(after.state_dict) == set(dict(model.named_parameters()))
    for name, param in model.named_parameters():
        assert after.state_dict[name].data_ptr() == param.data_ptr()
    assert not after.constants  # no new lifted tensors
    convs = [n for n in after.graph.nodes if n.target is torch.ops.aten.convolution.default]
    assert all(n.args[1].target is torch.ops.aten.view.default for n in convs)


class AttentionScores(torch.nn.Module):
    def forward(self, q, k):
        return q @ k.transpose(-1, -2)


class TwoActivations2D(torch.nn.Module):
    def forward(self, a, b):
        return a @ b


class MmParam(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 24))

    def forward(self, x):
        return torch.mm(x, self.w)


def test_refuses_activation_times_activation():
    a, b = torch.randn(5, 16), torch.randn(16, 7)
    _, after, records = rewrite(TwoActivations2D(), (a, b), [RULE])
    assert records[-1].matches == 0
    assert [r.reason for r in records[-1].refusals] == [
        "weight is an activation, not a constant: this is a matmul between tensors, not a projection"]
    assert ops(after)["matmul"] == 1


def test_leaves_batched_attention_matmuls_alone():
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 4, 8, 16)
    _, after, records = rewrite(AttentionScores(), (q, k), [RULE])
    assert records[-1].matches == 0 and ops(after)["convolution"] == 0


class Linear4D(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.proj(x)


def test_channels_last_rank_4_becomes_conv_on_channels_first():
    x = torch.randn(1, 2, 5, 16)  # (B, H, W, C)
    model = Linear4D().eval()
    _, after, records = rewrite(model, (x,), [RULE])
    assert records[-1].matches == 1 and ops(after)["convolution"] == 1 and ops(after)["linear"] == 0
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_refuses_rank_5_inputs_with_reason():
    x = torch.randn(1, 2, 3, 5, 16)
    model = Linear4D().eval()
    _, after, records = rewrite(model, (x,), [RULE])
    assert records[-1].matches == 0
    assert records[-1].refusals[0].reason == \
        "input has rank 5: only 2-D, 3-D and channels-last 4-D inputs are rewritten"
    assert records[-1].refusals[0].where == "proj"
    torch.testing.assert_close(after.module()(x), model(x))


def test_rank_2_projection_adds_no_transpose_or_reshape(tmp_path):
    model = Linear().eval()
    c = anefx.compile(model, (torch.randn(4, 16),), progress=False, package_check="skip")
    types = [r.type for r in saved_ops(c, tmp_path)]
    assert types.count("conv") == 2 and types.count("linear") == 0
    assert types.count("transpose") == 0 and types.count("reshape") == 0, types


def test_lowered_program_has_convs_and_no_linear(tmp_path):
    model = Linear().eval()
    c = anefx.compile(model, (torch.randn(1, 8, 16),), rules=[RULE])
    types = [r.type for r in saved_ops(c, tmp_path)]
    assert types.count("conv") == 2 and types.count("linear") == 0 and types.count("matmul") == 0


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(1, 9), fan_in=st.integers(1, 40), fan_out=st.integers(1, 40),
       bias=st.booleans(), rank3=st.booleans())
def test_property_random_shapes(batch, seq, fan_in, fan_out, bias, rank3):
    model = torch.nn.Linear(fan_in, fan_out, bias=bias).eval()
    x = torch.randn(batch, seq, fan_in) if rank3 else torch.randn(seq, fan_in)
    _, after, records = rewrite(model, (x,), [RULE])
    assert records[-1].matches == 1 and ops(after)["convolution"] == 1 and ops(after)["linear"] == 0
    y = after.module()(x)
    assert y.shape == model(x).shape
    torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-5)
