"""Verification that cannot be fooled: elementwise tolerance, inputs drawn like the example (both signs),
and the lowered package checked in the MIL interpreter."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import anefx
from anefx.capture import capture
from anefx.graph import emit
from anefx.pipeline import Tolerance, compare
from anefx.rule import Pattern, Rule
from anefx.samples import drawn_like
from tests.helpers import ops


def _relu(x):
    return torch.relu(x)


def _add(x, y):
    return x + y


def _relu_to_abs(match, ctx):  # right on positive inputs only
    return emit(ctx.graph, torch.ops.aten.abs.default, (match.inputs[0],), origin=match.output, rule=ctx.rule)


def _add_half(match, ctx):  # off by 0.5 everywhere: small next to one huge element
    total = emit(ctx.graph, torch.ops.aten.add.Tensor, tuple(match.inputs), origin=match.output, rule=ctx.rule)
    return emit(ctx.graph, torch.ops.aten.add.Tensor, (total, 0.5), origin=match.output, rule=ctx.rule)


RELU_TO_ABS = Rule(name="relu_to_abs", summary="wrong for negative inputs", ane=False, replace=_relu_to_abs,
                   patterns=lambda: [Pattern("relu", _relu, lambda: (torch.randn(2, 4),))])
ADD_HALF = Rule(name="add_half", summary="adds 0.5", ane=False, replace=_add_half,
                patterns=lambda: [Pattern("add", _add, lambda: (torch.randn(2, 4), torch.randn(2, 4)))])


class ReluModel(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) * 3


class AddModel(torch.nn.Module):
    def forward(self, x, y):
        return x + y


def _record(c, name):
    return next(p for p in c.passes if p.name == name)


def test_a_rule_right_only_on_positive_inputs_is_rolled_back():
    x = torch.rand(2, 8) + 0.1  # all positive: relu and abs agree on the example
    c = anefx.compile(ReluModel(), (x,), rules=[RELU_TO_ABS], precision="fp32")
    record = _record(c, "relu_to_abs")
    assert record.status == "rolled-back"
    assert "random input" in record.detail and "both signs" in record.detail
    assert ops(c.rewritten)["relu"] == 1 and ops(c.rewritten)["abs"] == 0
    negative = -torch.rand(2, 8)
    torch.testing.assert_close(c.rewritten.module()(negative), ReluModel()(negative))


def test_one_large_element_does_not_hide_an_error_in_the_others():
    x = torch.randn(1, 64)
    x[0, 0] = 1e6  # a tolerance relative to the output's max would allow 0.5 everywhere
    c = anefx.compile(AddModel(), (x, torch.randn(1, 64)), rules=[ADD_HALF], precision="fp32")
    record = _record(c, "add_half")
    assert record.status == "rolled-back" and "the example" in record.detail
    assert ops(c.rewritten)["add"] == 1


def test_without_extra_inputs_the_positive_only_rule_would_ship():
    x = torch.rand(2, 8) + 0.1
    c = anefx.compile(ReluModel(), (x,), rules=[RELU_TO_ABS], precision="fp32", verify=False)
    assert ops(c.rewritten)["abs"] == 1  # why verification draws inputs of both signs


def test_compare_is_elementwise_and_scaled_by_the_typical_magnitude():
    b = torch.ones(100)
    b[0] = 1e6
    assert not compare([b + 0.5], [b], Tolerance())[1]
    assert compare([b + 1e-6], [b], Tolerance())[1]
    assert not compare([torch.tensor([1.0, float("nan")])], [torch.tensor([1.0, 2.0])], Tolerance())[1]
    assert compare([torch.tensor([1.0, float("-inf")])], [torch.tensor([1.0, float("-inf")])], Tolerance())[1]
    assert not compare([torch.tensor([float("inf")])], [torch.tensor([float("-inf")])], Tolerance())[1]
    assert not compare([torch.tensor([1, 2])], [torch.tensor([1, 3])], Tolerance())[1]


@settings(max_examples=40, deadline=None)
@given(shift=st.floats(1e-3, 10.0), big=st.floats(1.0, 1e7), n=st.integers(2, 200))
def test_a_uniform_shift_beyond_atol_is_always_caught(shift, big, n):
    b = torch.randn(n, generator=torch.Generator().manual_seed(n)).abs() + 0.5
    b[0] = big
    # the other elements are ~1: a shift of 1e-3 is 20× their tolerance, whatever the large element
    assert not compare([b + shift], [b], Tolerance())[1]
    assert compare([b * (1 + 1e-6)], [b], Tolerance())[1]


class Embedder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(50, 4)

    def forward(self, input_ids, attention_mask, pixels):
        return self.table(input_ids.view(-1)).sum(0) * attention_mask.sum() + pixels.mean()


def test_inputs_drawn_like_the_example_respect_embeddings_and_masks():
    ids = torch.tensor([[3, 4, 5]])
    mask = torch.tensor([[1, 1, 0]])
    pixels = torch.rand(1, 3, 4, 4)
    cap = capture(Embedder(), (ids, mask, pixels), None)
    drawn = drawn_like(cap.exported, (cap.args, cap.kwargs), count=4)
    assert len(drawn) == 4
    for args, _kwargs in drawn:
        d_ids, d_mask, d_pixels = args
        assert d_ids.shape == ids.shape and d_ids.dtype == ids.dtype
        assert 0 <= int(d_ids.min()) and int(d_ids.max()) < 50  # the embedding's rows, not the example's range
        assert set(d_mask.unique().tolist()) <= {0, 1}  # other integers keep the example's range
        assert d_pixels.shape == pixels.shape and d_pixels.dtype == pixels.dtype
    assert any(bool((args[2] < 0).any()) for args, _ in drawn)  # floats take both signs
    assert max(float(args[2].abs().max()) for args, _ in drawn) > float(pixels.abs().max())
    again = drawn_like(cap.exported, (cap.args, cap.kwargs), count=4)
    assert all(torch.equal(a[0][2], b[0][2]) for a, b in zip(drawn, again, strict=True))  # reproducible


def test_mask_like_float_inputs_keep_their_values():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:] = torch.finfo(torch.float32).min
    cap = capture(AddModel(), (torch.randn(1, 1, 4, 4), mask), None)
    for args, _ in drawn_like(cap.exported, (cap.args, cap.kwargs)):
        assert torch.equal(args[1], mask)


class Overflowing(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = self.proj(x) * 1000
        return torch.softmax(h * h, dim=-1)  # h² is far beyond fp16's 65504


def test_an_fp16_overflow_is_reported_with_the_op_that_overflows():
    import pytest

    from anefx.package_check import PrecisionError, PrecisionWarning

    model, x = Overflowing().eval(), torch.randn(1, 8, 16)
    with pytest.warns(PrecisionWarning, match=r"hold inf/NaN.*first op whose fp16 output overflows: `mul`.*"
                                              r"node mul_1.*precision='fp32'"):
        c = anefx.compile(model, (x,), rules=[])
    assert c.package_check is not None and not c.package_check.ok
    assert c.package_check.not_finite == ["output"]
    with pytest.raises(PrecisionError, match="package_check='skip'"):
        anefx.compile(model, (x,), rules=[], package_check="raise")
    fp32 = anefx.compile(model, (x,), rules=[], precision="fp32", package_check="raise")
    assert fp32.package_check.ok and fp32.package_check.psnr_db["output"] > 80
    assert anefx.compile(model, (x,), rules=[], package_check="skip").package_check is None


def test_a_well_scaled_model_passes_the_package_check_silently():
    import warnings

    from anefx.package_check import PrecisionWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        c = anefx.compile(torch.nn.Linear(16, 4).eval(), (torch.randn(1, 8, 16),), progress=False)
    assert c.package_check.ok and c.package_check.psnr_db["output"] > 50


def _thirds(scale):  # x + y as (3x + 3y) / scale: exact in real arithmetic only for scale 3
    def replace(match, ctx):
        a, b = (emit(ctx.graph, torch.ops.aten.mul.Tensor, (v, 3.0), origin=match.output, rule=ctx.rule)
                for v in match.inputs)
        total = emit(ctx.graph, torch.ops.aten.add.Tensor, (a, b), origin=match.output, rule=ctx.rule)
        return emit(ctx.graph, torch.ops.aten.div.Tensor, (total, scale), origin=match.output, rule=ctx.rule)

    return Rule(name=f"thirds_{scale}", summary="x + y through thirds", ane=False, replace=replace,
                patterns=lambda: [Pattern("add", _add, lambda: (torch.randn(2, 4), torch.randn(2, 4)))])


def test_float32_rounding_of_an_exact_rewrite_is_judged_in_float64():
    """An exact rewrite moves float32 results by rounding (as in deep models, where it adds up to a few
    tolerances); judged again in float64 it agrees, while a rewrite off by 3e-6 relative (a hundredth of the tolerance) does not."""
    from anefx.pipeline import run_pipeline

    x = torch.randn(4, 256) * 1000
    y = -x + torch.randn(4, 256)  # x + y cancels: 3x + 3y rounds at 3000's ulp, many ulps of the result
    tight = Tolerance(extra_inputs=1)
    ep = capture(AddModel(), (x, y), None).exported
    _, records, _ = run_pipeline(ep, [_thirds(3.0)], ((x, y), {}), tolerance=tight, never_worse=False)
    assert records[-1].status == "applied" and "float64" in records[-1].detail
    _, records, _ = run_pipeline(ep, [_thirds(3.00001)], ((x, y), {}), tolerance=tight, never_worse=False)
    assert records[-1].status == "rolled-back"


def test_the_rollback_message_names_the_random_input_without_template_braces():
    x = torch.rand(2, 8) + 0.1
    c = anefx.compile(ReluModel(), (x,), rules=[RELU_TO_ABS], precision="fp32", progress=False)
    detail = _record(c, "relu_to_abs").detail
    assert "wider range)" in detail and "{" not in detail


class _Stateful(torch.nn.Module):
    """Weights, a constant buffer, a tensor constant made in forward and a state the program writes."""

    def __init__(self, widths: list[int], bias: bool):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b, bias=bias) for a, b in zip(widths, widths[1:]))
        self.register_buffer("scale", torch.rand(widths[-1]) + 0.5)
        self.register_buffer("total", torch.randn(widths[-1]))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        y = x * self.scale + torch.tensor([0.25])
        self.total.copy_(self.total * 0.5 + y.sum(0))
        return y * 1000.0, self.total + 1.0


@settings(max_examples=12, deadline=None)
@given(widths=st.lists(st.integers(1, 12), min_size=2, max_size=4), bias=st.booleans(),
       batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_the_float64_run_widens_every_weight_constant_and_state(widths, bias, batch, seed):
    """The float64 re-check reads each weight widened as the program uses it (never a float64 copy of all
    weights at once): its outputs and new state equal the model run in float64, and the model is untouched."""
    import copy

    from anefx.pipeline import _run_float64

    torch.manual_seed(seed)
    model = _Stateful(widths, bias).eval()
    x = torch.randn(batch, widths[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ep = torch.export.export(copy.deepcopy(model), (x,)).run_decompositions({})  # states as mutation outputs
    got = _run_float64(ep, ((x,), {}))
    wide = copy.deepcopy(model).double()
    expected = [*wide(x.double()), wide.total]
    assert [t.dtype for t in got] == [torch.float64] * 3
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
