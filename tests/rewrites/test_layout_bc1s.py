"""layout_bc1s and the layout-chain simplifier: the body runs in (B, C, 1, S), conversions at the edges."""

from __future__ import annotations

import torch

from anefx.graph import is_constant
from anefx.layout import COUNTED, counted_layout_ops, simplify_layout_chains
from rewrites import RULES
from tests.helpers import ops, rewrite

C, S = 32, 10
BODY_RULES = [r for r in RULES if r.name in ("linear_to_conv1x1", "layernorm_channels", "layout_bc1s")]


class Residual(torch.nn.Module):
    """Two pre-norm MLP blocks with residuals, a position table, a channel slice and a concat."""

    def __init__(self):
        super().__init__()
        self.pos = torch.nn.Parameter(torch.randn(S, C))
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(C), "up": torch.nn.Linear(C, 2 * C),
                                 "down": torch.nn.Linear(2 * C, C)}) for _ in range(2))
        self.head = torch.nn.Linear(C, 8)

    def forward(self, x):  # (B, S, C)
        h = x + self.pos
        for b in self.blocks:
            up = b["up"](b["norm"](h))
            gate, value = up[..., :C], up[..., C:]
            h = h + b["down"](torch.cat([torch.nn.functional.gelu(gate) * value, value], -1))
        return self.head(h)


def test_body_runs_in_bc1s_with_one_conversion_in_and_one_out():
    model = Residual().eval()
    x = torch.randn(1, S, C)
    before, after, records = rewrite(model, (x,), BODY_RULES)
    assert all(r.status == "applied" for r in records), records
    assert counted_layout_ops(before.graph) == 0  # the plain graph has none…
    # …the projection rule alone adds 4 per conv; the layout rule leaves the entry and the exit
    runtime = [n for n in after.graph.nodes if n.target in COUNTED and not is_constant(n, after)]
    assert len(runtime) == 2 and runtime[0].args[0].name == "x"  # the entry…
    assert list(runtime[1].users)[0].op == "output"  # …and the exit
    assert ops(after)["convolution"] == 5 and ops(after)["anefx.layer_norm"] == 2
    slices = [n for n in after.graph.nodes if n.target is torch.ops.aten.slice.Tensor]
    assert {n.args[1] for n in slices} == {1}  # channel slices on axis 1 of (B, C, 1, S)
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_refuses_reductions_that_drop_the_axis():
    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(C, C)

        def forward(self, x):
            h = torch.relu(self.proj(x))
            return h.mean(1)  # (B, C): drops the sequence axis

    model = Pool().eval()
    x = torch.randn(1, S, C)
    _, after, records = rewrite(model, (x,), BODY_RULES)
    layout = records[-1]
    assert layout.status == "applied"
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_simplifier_removes_chains_that_cancel_and_shortens_the_rest():
    class Chains(torch.nn.Module):
        def forward(self, x):  # x: (1, 8, 1, 6)
            a = x.squeeze(2).permute(0, 2, 1).permute(0, 2, 1).unsqueeze(2)  # identity
            b = x.view(1, 2, 4, 6).permute(0, 1, 3, 2).transpose(1, 2)  # one permute + reshape at most
            return a * 2, b + 1

    x = torch.randn(1, 8, 1, 6)
    ep = torch.export.export(Chains(), (x,)).run_decompositions({})
    expected = Chains()(x)
    before = counted_layout_ops(ep.graph)
    shortened = simplify_layout_chains(ep.graph_module.graph, "test")
    ep.graph_module.recompile()
    assert shortened == 2 and counted_layout_ops(ep.graph) < before
    mul = next(n for n in ep.graph.nodes if n.target is torch.ops.aten.mul.Tensor)
    assert mul.args[0].op == "placeholder"  # the identity chain is gone entirely
    for got, want in zip(ep.module()(x), expected, strict=True):
        torch.testing.assert_close(got, want)
