"""The saved program computes the model's function: checked with anefx's MIL interpreter (any OS).

These caught a real mistranslation: coremltools lowers `zeros_like(bool, dtype=float)` as a bool
tensor, so a padding mask built with masked_fill added +1 instead of -inf to masked scores — the torch
graph was right, the .mlpackage was not.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import anefx
from anefx import zoo


def padding(length: int, pad: int) -> torch.Tensor:
    mask = torch.ones(1, length, dtype=torch.long)
    mask[0, length - pad:] = 0
    return mask


def test_bert_with_a_padding_mask_input():
    model, (ids,), _ = zoo.build("bert")
    c = anefx.compile(model, (ids,), {"attention_mask": padding(32, 5)}, precision="fp32")
    assert c.input_names == ["input_ids", "attention_mask"]
    for mask in (padding(32, 5), padding(32, 11), padding(32, 0)):
        report = c.verify(ids, attention_mask=mask)
        assert all(r.max_rel <= 1e-4 for r in report.values()), report
    fp16 = anefx.compile(model, (ids,), {"attention_mask": padding(32, 5)}).verify()
    assert all(r.psnr_db >= 60 for r in fp16.values()), fp16


def test_verify_uses_the_example_and_names_outputs():
    model, args, kwargs = zoo.build("gpt2")
    report = anefx.compile(model, args, kwargs, precision="fp32").verify()
    assert list(report) == ["logits"] and report["logits"].max_rel <= 1e-4


class _Atan2(torch.nn.Module):
    def forward(self, y, x):
        return torch.atan2(y, x)


_AXES = [0.0, 1.0, -1.0, 1e-9, -1e-9, 3e-5, -3e-5, 250.0, -250.0]  # zeros, tiny (below coremltools' 1e-8 shift)


@pytest.fixture(scope="module")
def atan2_packages():
    y, x = torch.randn(1, 81), torch.randn(1, 81)
    return {p: anefx.compile(_Atan2(), (y, x), rules=[], precision=p, package_check="skip", progress=False)
            for p in ("fp32", "fp16")}


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_atan2_lowers_right_in_every_quadrant_and_on_the_axes(atan2_packages, data):
    """coremltools' own atan2 gives 0 for atan2(0, x<0) (torch: pi) and moves a tiny negative x into the
    wrong quadrant; anefx's converter matches torch on both axes, at tiny values and in fp16."""
    values = st.one_of(st.sampled_from(_AXES), st.floats(-1e3, 1e3, allow_subnormal=False, width=32))
    pairs = data.draw(st.lists(st.tuples(values, values), min_size=81, max_size=81))
    # + 0.0: no negative zero. torch reads the sign of a zero (atan2(-0., -1) = -pi, atan2(0., -0.) = pi);
    # the lowered program treats both zeros alike, as documented in docs/rules.md
    y = torch.tensor([[a for a, _ in pairs]]) + 0.0
    x = torch.tensor([[b for _, b in pairs]]) + 0.0
    expected = torch.atan2(y, x)
    got = torch.from_numpy(next(iter(atan2_packages["fp32"].predict(y, x).values())))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    y16, x16 = y.half().float() + 0.0, x.half().float() + 0.0  # the fp16 program sees fp16 inputs (tiny: 0)
    half = torch.from_numpy(next(iter(atan2_packages["fp16"].predict(y, x).values()))).float()
    torch.testing.assert_close(half, torch.atan2(y16, x16), rtol=0, atol=4e-3)
