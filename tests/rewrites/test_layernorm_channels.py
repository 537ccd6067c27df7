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


def test_channels_last_norm_becomes_a_channel_norm_on_channels_first():
    x = torch.randn(2, 3, 4, C)  # (B, H, W, C)
    model = Image().eval()
    _, after, records = rewrite(model, (x,), [RULE])
    assert records[-1].matches == 1 and ops(after)["layer_norm"] == 0
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-5, atol=1e-5)


class ConvNextBlock(torch.nn.Module):
    """dwconv → permute to (B, H, W, C) → LayerNorm → Linear → GELU → Linear → γ → permute back → residual."""

    def __init__(self):
        super().__init__()
        self.dw = torch.nn.Conv2d(C, C, 7, padding=3, groups=C)
        self.norm, self.up, self.down = torch.nn.LayerNorm(C), torch.nn.Linear(C, 4 * C), torch.nn.Linear(4 * C, C)
        self.gamma = torch.nn.Parameter(torch.rand(C))

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.gamma * self.down(torch.nn.functional.gelu(self.up(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


def test_convnext_block_runs_channels_first_without_layout_ops(tmp_path):
    model, x = ConvNextBlock().eval(), torch.randn(1, C, 8, 8)
    c = anefx.compile(model, (x,), progress=False, package_check="skip")
    summary = ane_summary(program(c, tmp_path))
    assert summary["layout_ops"] == 0 and summary["max_rank"] == 4, summary["types"]
    assert summary["types"]["linear"] == 0 and summary["types"]["conv"] == 3
    assert summary["norm_axes"] == {(1,): 1}
    torch.testing.assert_close(c.rewritten.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_refuses_rank_5_inputs():
    _, _, records = rewrite(Image().eval(), (torch.randn(1, 2, 3, 4, C),), [RULE])
    assert records[-1].refusals[0].reason == \
        "input of rank 5: only (B, S, C) and channels-last (B, H, W, C) inputs are moved to channels"
