"""layernorm_channels: LayerNorm over C of (B, S, C) → layer_norm(axes=[1]) on (B, C, 1, S), γ/β fused."""

from __future__ import annotations

import torch

import anefx
from rewrites.layernorm_channels import RULE
from tests.helpers import ane_summary, const_arg, ops, program, rewrite

C = 48


class Block(torch.nn.Module):
    def __init__(self, affine=True):
        super().__init__()
        self.norm = torch.nn.LayerNorm(C, elementwise_affine=affine)
        if affine:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.norm(x) * 2


def test_layer_norm_moves_to_channels_with_gamma_and_beta_fused(tmp_path):
    model = Block().eval()
    x = torch.randn(1, 10, C)
    _, after, records = rewrite(model, (x,), [RULE])
    assert records[-1].matches == 1
    assert ops(after)["layer_norm"] == 0 and ops(after)["anefx.layer_norm"] == 1
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-5, atol=1e-5)
    c = anefx.compile(model, (x,), rules=[RULE])
    prog = program(c, tmp_path)
    norm = next(op for op in prog.operations if op.type == "layer_norm")
    assert const_arg(prog, norm, "axes") == [1]
    assert norm.outputs[0][1].shape == (1, C, 1, 10)
    assert {"gamma", "beta"} <= set(norm.inputs)
    assert ane_summary(prog)["types"]["add"] == 0  # β is inside the norm


def test_without_affine():
    model = Block(affine=False).eval()
    x = torch.randn(2, 5, C)
    _, after, records = rewrite(model, (x,), [RULE])
    assert records[-1].matches == 1
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-5, atol=1e-5)


class TwoAxes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm([6, C])

    def forward(self, x):
        return self.norm(x)


def test_refuses_a_norm_over_two_axes():
    _, after, records = rewrite(TwoAxes().eval(), (torch.randn(1, 6, C),), [RULE])
    assert records[-1].matches == 0
    assert records[-1].refusals[0].reason == "layer_norm over 2 axes; only one axis maps to channels"


class Image(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(C)

    def forward(self, x):  # (B, H, W, C)
        return self.norm(x)


def test_refuses_rank_4_inputs():
    _, _, records = rewrite(Image().eval(), (torch.randn(1, 3, 4, C),), [RULE])
    assert records[-1].refusals[0].reason == "input of rank 4: only (B, S, C) inputs are moved to channels"
