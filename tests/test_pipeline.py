"""The engine: verification with rollback, compute-unit gating, provenance, options, the callable."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import anefx
from anefx.graph import emit, module_path
from anefx.rule import Pattern, Rule
from rewrites import RULES
from tests.helpers import ops


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.norm = torch.nn.RMSNorm(32, eps=1e-6)
        self.down = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.down(self.norm(torch.relu(self.up(x))))


def _relu(x):
    return torch.relu(x)


def _wrong_replacement(match, ctx):  # relu → sigmoid: plausible-looking, numerically wrong
    return emit(ctx.graph, torch.ops.aten.sigmoid.default, (match.inputs[0],), origin=match.output, rule=ctx.rule)


BUGGY = Rule(name="relu_to_sigmoid", summary="a deliberately wrong rule",
             patterns=lambda: [Pattern("relu", _relu, lambda: (torch.randn(2, 4),))],
             check=lambda m, c: None, replace=_wrong_replacement, ane=False)


def _raising_replacement(match, ctx):
    raise IndexError("boom")


CRASHING = Rule(name="crashing_rule", summary="raises", check=lambda m, c: None, replace=_raising_replacement,
                patterns=lambda: [Pattern("relu", _relu, lambda: (torch.randn(2, 4),))])


@pytest.fixture(scope="module")
def block():
    return Block().eval(), (torch.randn(1, 8, 16),)


def test_wrong_rule_is_rolled_back_and_reported(block):
    model, args = block
    c = anefx.compile(model, args, rules=[BUGGY, *RULES])
    record = next(p for p in c.passes if p.name == "relu_to_sigmoid")
    assert record.status == "rolled-back" and record.matches == 1
    assert "rule not applied" in record.detail and record.max_error > 1e-2
    assert ops(c.rewritten)["relu"] == 1 and ops(c.rewritten)["sigmoid"] == 0
    torch.testing.assert_close(c.rewritten.module()(*args), model(*args), rtol=1e-4, atol=1e-5)
    assert [(p.name, p.status) for p in c.passes if p.name != "relu_to_sigmoid"] == [
        ("legalize", "applied"), ("split_wide_conv", "no-match"), ("split_wide_embedding", "no-match"),
        ("fft_to_dft", "no-match"), ("unfold_to_conv", "no-match"), ("rmsnorm_to_layernorm", "applied"), ("linear_to_conv1x1", "applied"), ("kv_cache_write", "no-match"),
        ("split_head_attention", "no-match"), ("sdpa_masked_rows", "no-match"), ("layernorm_channels", "applied"),
        ("layout_bc1s", "applied")]


def test_without_verification_the_wrong_rule_would_ship(block):
    model, args = block
    c = anefx.compile(model, args, rules=[BUGGY], verify=False)
    assert ops(c.rewritten)["sigmoid"] == 1  # why verify=True is the default


def test_a_crashing_rule_names_itself_and_what_ran_before(block):
    model, args = block
    with pytest.raises(anefx.RuleError, match=r"rule crashing_rule failed \(IndexError: boom\); stages "
                                              r"before it: captured, legalize"):
        anefx.compile(model, args, rules=[CRASHING])


def test_ane_rules_run_only_for_neural_engine_compute_units(block):
    model, args = block
    for units in ("CPU_AND_NE", "ALL"):
        assert anefx.compile(model, args, compute_units=units).options["rules"] == [r.name for r in RULES]
    for units in ("CPU_ONLY", "CPU_AND_GPU"):
        c = anefx.compile(model, args, compute_units=units)
        # not ANE rules: FFTs and unfold (coremltools lowers neither), a cache write lowered in place
        # (slice_update, not scatter) and a fix of SDPA's lowering
        assert c.options["rules"] == ["fft_to_dft", "unfold_to_conv", "kv_cache_write", "sdpa_masked_rows"]
        assert ops(c.rewritten)["linear"] == 2 and ops(c.rewritten)["convolution"] == 0
    explicit = anefx.compile(model, args, compute_units="CPU_ONLY", rules=["linear_to_conv1x1"])
    assert ops(explicit.rewritten)["convolution"] == 2


def test_unknown_rule_and_bad_options(block):
    model, args = block
    with pytest.raises(anefx.UnknownRuleError, match="unknown rule 'nope'; known rules: split_wide_conv"):
        anefx.compile(model, args, rules=["nope"])
    with pytest.raises(anefx.OptionError, match="compute_units='NPU' is not one of CPU_AND_NE"):
        anefx.compile(model, args, compute_units="NPU")
    with pytest.raises(anefx.OptionError, match="precision='int8'"):
        anefx.compile(model, args, precision="int8")


def test_passes_record_matches_deltas_and_time(block):
    model, args = block
    c = anefx.compile(model, args)
    by_name = {p.name: p for p in c.passes}
    assert list(by_name) == ["legalize", "split_wide_conv", "split_wide_embedding", "fft_to_dft", "unfold_to_conv",
                             "rmsnorm_to_layernorm",
                             "linear_to_conv1x1", "kv_cache_write", "split_head_attention", "sdpa_masked_rows",
                             "layernorm_channels", "layout_bc1s"]
    assert by_name["rmsnorm_to_layernorm"].matches == 1
    assert by_name["rmsnorm_to_layernorm"].op_delta["rms_norm"] == -1
    assert by_name["linear_to_conv1x1"].op_delta == {"convolution": 2, "linear": -2, "permute": 4,
                                                     "squeeze": 2, "unsqueeze": 2, "view": 2}
    assert all(p.ms >= 0 for p in c.passes)
    assert [name for name, _ in c.snapshots] == ["captured", *by_name]


def test_every_snapshot_is_a_valid_program_and_the_capture_is_untouched(block):
    model, args = block
    c = anefx.compile(model, args)
    for _, ep in c.snapshots:
        ep.validate()
        torch.testing.assert_close(ep.module()(*args), model(*args), rtol=1e-4, atol=1e-5)
    assert ops(c.exported)["linear"] == 2 and ops(c.exported)["rms_norm"] == 1


def test_new_nodes_carry_provenance(block):
    model, args = block
    c = anefx.compile(model, args, rules=RULES)  # as chosen: a block this small is plain-shaped
    convs = [n for n in c.rewritten.graph.nodes if n.target is torch.ops.aten.convolution.default]
    assert sorted(module_path(n) for n in convs) == ["down", "up"]
    for node in convs:
        assert node.meta["anefx_rule"] == "linear_to_conv1x1"
        assert node.meta["from_node"][0].pass_name == "linear_to_conv1x1"
        assert "stack_trace" in node.meta
    norm = next(n for n in c.rewritten.graph.nodes if n.target is torch.ops.anefx.layer_norm.default)
    assert module_path(norm) == "norm" and norm.meta["anefx_rule"] == "layernorm_channels"


def test_calling_the_compiled_model(block, tmp_path):
    model, args = block
    c = anefx.compile(model, args)
    if sys.platform != "darwin":
        import anefx.compiled as compiled

        compiled._NOTICE_SHOWN = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = c(*args)
            c(*args)
        notices = [w for w in caught if issubclass(w.category, anefx.AnefxNotice)]
        assert len(notices) == 1 and "MIL interpreter" in str(notices[0].message)
        torch.testing.assert_close(first, model(*args), rtol=2e-2, atol=2e-2)  # the fp16 program
    path = c.save(tmp_path / "block")
    assert path.name == "block.mlpackage" and (path / "Manifest.json").exists()


def test_verify_reports_errors_of_the_lowered_program(block):
    model, args = block
    c = anefx.compile(model, args, precision="fp32")
    report = c.verify()
    assert list(report) == c.output_names == ["output"]
    assert report["output"].max_rel <= 1e-4 and report["output"].psnr_db > 80
    fp16 = anefx.compile(model, args).verify()["output"]
    assert 1e-5 < fp16.max_rel < 1e-2 and fp16.psnr_db > 60  # emulated fp16: small but real error
    other = torch.randn(1, 8, 16) * 3
    assert c.verify(other)["output"].max_rel <= 1e-4  # on new inputs too


def test_a_projection_feeding_a_projection_is_rewritten_as_two_convolutions():
    """Regression: the second match read the first match's erased output ("used before it has been defined")."""
    from rewrites import linear_to_conv1x1

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)).eval()
    x = torch.randn(1, 8, 16)
    c = anefx.compile(model, (x,), rules=[linear_to_conv1x1.RULE], precision="fp32")
    record = next(p for p in c.passes if p.name == "linear_to_conv1x1")
    assert (record.status, record.matches) == ("applied", 3)
    assert ops(c.rewritten)["convolution"] == 3 and ops(c.rewritten)["linear"] == 0
    torch.testing.assert_close(c.rewritten.module()(x), model(x))
