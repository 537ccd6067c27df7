"""Every model family of the zoo (anefx.zoo.FAMILIES), compiled with default settings: the rewritten graph
equals the model, the saved fp32 package (run in anefx's MIL interpreter) equals the model within 1e-3
relative, the fp16 package's PSNR is reported, and the saved program is in the ANE's form.

What the rules do not do yet for a family is listed in GAPS: the test then expects that assertion to fail
and ends as xfail naming what is missing (strict: once it holds, the test fails until the gap is removed).
benchmarks/zoo_families.py prints the same families as the table in docs/rules.md "Model families".
"""

from __future__ import annotations

import inspect

import pytest
import torch

from anefx.package_check import MIN_PSNR
from anefx.zoo import FAMILIES
from tests.helpers import ane_summary, assert_outputs_close, program, tensors

FAST = ["t5_encoder", "mixtral", "mlp", "multihead_attention"]  # the default run; the others are slow
NO_ATTENTION = {"resnet", "convnext", "mobilenet_v2", "mlp"}

GAPS: dict[str, dict[str, str]] = {}  # family → {assertion: what is missing}; none today (Bloom's alibi was the last)


def families(fast: list[str]) -> list:
    return [pytest.param(name, marks=() if name in fast else pytest.mark.slow) for name in FAMILIES]


def reference(model: torch.nn.Module, args: tuple, kwargs: dict):
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        return model(*args, **kwargs, **extra)


def has_projections(model: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, torch.nn.Linear | Conv1D) for m in model.modules())


class Expectations:
    """Assert what holds; for a known gap assert that it still does not hold, and xfail at the end."""

    def __init__(self, name: str) -> None:
        self.gaps, self.missing, self.now_holding = GAPS.get(name, {}), [], []

    def check(self, what: str, holds: bool, detail: str = "") -> None:
        if what not in self.gaps:
            assert holds, f"{what}: {detail}"
        elif holds:
            self.now_holding.append(what)
        else:
            self.missing.append(self.gaps[what])

    def finish(self) -> None:
        assert not self.now_holding, f"{', '.join(self.now_holding)} now hold: remove them from GAPS"
        if self.missing:
            pytest.xfail("; ".join(self.missing))


def within_relative(actual, expected, rtol: float = 1e-3) -> None:
    for a, e in zip(tensors(actual), tensors(expected), strict=True):
        scale = float(e.abs().max())
        torch.testing.assert_close(a.to(e.dtype), e, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("name", families(FAST))
def test_fp32_package_equals_the_model_in_the_ane_form(name, compile_zoo, tmp_path):
    model, args, kwargs, c = compile_zoo(name, precision="fp32")
    expected = reference(model, args, kwargs)
    with torch.no_grad():
        assert_outputs_close(c.rewritten.module()(*args, **kwargs), expected)
    within_relative(c(*args, **kwargs), expected)
    s = ane_summary(program(c, tmp_path))
    expect = Expectations(name)
    if has_projections(model):
        expect.check("linear", s["types"]["linear"] == 0, f"{s['types']['linear']} linear ops")
    expect.check("rank", s["max_rank"] <= 4, f"max rank {s['max_rank']}")
    if name not in NO_ATTENTION:
        per_head = {p.name: p.status for p in c.passes}.get("split_head_attention") == "applied"
        expect.check("per_head", per_head and s["types"]["scaled_dot_product_attention"] == 0, str(c.passes))
    expect.finish()


@pytest.mark.parametrize("name", families(["t5_encoder", "mixtral"]))
def test_fp16_package_psnr(name, compile_zoo, record_property):
    _, _, _, c = compile_zoo(name)  # default settings: fp16, package_check="warn"
    psnr = min(c.package_check.psnr_db.values())
    record_property("fp16_psnr_db", round(psnr, 1))
    print(f"{name}: fp16 PSNR {psnr:.1f} dB")
    expect = Expectations(name)
    expect.check("psnr", psnr >= MIN_PSNR["fp16"] and not c.package_check.not_finite, f"{psnr:.1f} dB")
    expect.finish()


def test_default_moe_names_the_setting_and_the_zoo_uses_it():
    from anefx import zoo

    model, _, _ = zoo.build("mixtral")
    assert model.config._experts_implementation == "batched_mm"  # the setting the refusal names
    assert len(FAMILIES) >= 20
