"""Partitioning: what coremltools cannot lower (or cpu_ops names) runs in torch, each convertible region is a package.

Default run: plans (export only), options, the multi-node LoweringError, ops the rules rewrite, and one cheap
end-to-end compile (no rules, no package check). Slow: the same model with the default rules (verified), the
manifest, save/load, cpu_ops compiled, a converter that fails, and torch.compile(backend="anefx").
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import anefx
from anefx.capture import capture
from anefx.compiled import AnefxNotice
from anefx.errors import LoweringError, OptionError
from anefx.partition import SMALL_REGION_OPS, plan_partition
from anefx.partition_manifest import PartitionError, run_cpu_step


class Block(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.lin, self.norm, self.act, self.out = nn.Linear(d, d), nn.LayerNorm(d), nn.GELU(), nn.Linear(d, d)

    def forward(self, x):
        return self.out(self.act(self.norm(self.lin(x))))


class HistNet(nn.Module):
    """Two blocks with a histogram between them (coremltools has no converter for aten.histc)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Block(), Block()

    def forward(self, x):
        h = self.first(x)
        return self.second(h + torch.histc(h, bins=32, min=-3, max=3))


class Hist(nn.Module):
    def forward(self, x):
        return x + torch.histc(x, bins=8, min=-2, max=2).sum()


class ManyUnconvertible(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.a, self.b = nn.Linear(8, 8), Hist(), Hist()

    def forward(self, x):
        x = self.a(self.lin(x))
        return self.b(x) + torch.bucketize(x, torch.tensor([0.0, 1.0])).float()


class SmallBetween(nn.Module):
    """histc, two weightless elementwise ops, histc again: the small region between them joins the CPU side."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = torch.histc(self.lin(x), bins=16, min=-2, max=2)
        h = torch.histc((h * 0.5 + 1.0).reshape(1, 16), bins=16, min=0, max=8)
        return self.out(x + h)


X = torch.randn(1, 8, 32)


def _plan(model: nn.Module, x: torch.Tensor, cpu_ops=()):
    return plan_partition(capture(model.eval(), (x,), None).exported, cpu_ops)


def _kinds(plan) -> list[str]:
    return [s.kind for s in plan.segments]


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def test_plan_puts_histc_between_two_regions():
    plan = _plan(HistNet(), X)
    assert _kinds(plan) == ["package", "cpu", "package"]
    assert [n.name for n in plan.cpu_nodes] == ["histc"]
    assert plan.reasons == {"histc": "coremltools has no converter for aten.histc.default"}
    assert [len(s.nodes) for s in plan.packages] == [4, 5]  # the add after histc opens the second package


def test_cpu_ops_by_op_name_and_by_module_path():
    by_op = _plan(HistNet(), X, ["aten.gelu"])
    assert {n.name for n in by_op.cpu_nodes} >= {"gelu", "gelu_1", "histc"}
    assert by_op.reasons["gelu"] == "named in cpu_ops ('aten.gelu')"
    by_module = _plan(HistNet(), X, ["second"])
    assert _kinds(by_module) == ["package", "cpu"]  # the second block, and the add before it (folded)
    assert {n.name for n in by_module.cpu_nodes} == {"histc", "add", "linear_2", "layer_norm_1", "gelu_1", "linear_3"}
    assert by_module.reasons["linear_2"] == "named in cpu_ops ('second')"
    assert "folded into the CPU side" in by_module.reasons["add"]  # one weightless op alone: not worth a package


def test_small_weightless_region_joins_the_cpu_side():
    plan = _plan(SmallBetween(), torch.randn(1, 16))
    assert _kinds(plan) == ["package", "cpu", "package"]
    folded = [n.name for n in plan.cpu_nodes if "folded" in plan.reasons[n.name]]
    assert folded and len(folded) <= SMALL_REGION_OPS and "mul" in folded
    assert len(plan.folded) == 1 and "not worth a package" in plan.folded[0]


def test_bad_options_name_the_fix():
    model = HistNet()
    with pytest.raises(OptionError, match="partition must be True or False, got 'yes'"):
        anefx.compile(model, (X,), partition="yes")
    with pytest.raises(OptionError, match=r"cpu_ops must be a list .* e\.g\. \['aten\.histc'"):
        anefx.compile(model, (X,), partition=True, cpu_ops="aten.histc")
    with pytest.raises(OptionError, match="pass partition=True as well"):
        anefx.compile(model, (X,), cpu_ops=["aten.histc"])
    with pytest.raises(OptionError) as info:
        _plan(model, X, ["aten.nothing", "encoder.layer.1"])
    message = str(info.value)
    assert "'aten.nothing', 'encoder.layer.1' name no node of the model" in message
    assert "aten.histc" in message and "first.lin" in message  # what the model has
    with pytest.raises(PartitionError, match="no region of the model is left for a package") as info:
        anefx.compile(model, (X,), partition=True, cpu_ops=["first", "second"], rules=[])
    assert "Name fewer ops or modules in cpu_ops" in str(info.value)


def test_lowering_error_names_every_unconvertible_node_and_partition():
    with pytest.raises(LoweringError) as info:
        anefx.compile(ManyUnconvertible(), (torch.randn(4, 8),), rules=[], verify=False, package_check="skip")
    message = str(info.value)
    assert "cannot lower 3 node(s)" in message
    for line in ("aten.histc.default (histc, from a)", "aten.histc.default (histc_1, from b)",
                 "aten.bucketize.Tensor (bucketize, from the top-level module)"):
        assert line in message
    assert "partition=True" in message and len(message.splitlines()) <= 15


def test_cpu_step_runs_from_its_manifest_entry():
    step = {"kind": "cpu", "op": "aten.histc.default", "node": "h", "args": [{"value": "x"}, 8, -2, 2], "kwargs": {}}
    values = {"x": torch.randn(3, 5)}
    run_cpu_step(step, values)
    torch.testing.assert_close(values["h"], torch.histc(values["x"], bins=8, min=-2, max=2))
    with pytest.raises(PartitionError, match="this torch does not have"):
        run_cpu_step({**step, "op": "aten.no_such_op.default"}, values)


def test_partitioned_compile_matches_the_model_cheaply():
    """No rules, no package check: the seams, the steps and the numbers (interpreter, fp32)."""
    model = HistNet().train()
    before = {k: (v.clone(), v._version) for k, v in model.state_dict(keep_vars=True).items()}
    c = anefx.compile(model, (X,), partition=True, precision="fp32", rules=[], package_check="skip")
    assert [s["kind"] for s in c.manifest["steps"]] == ["package", "cpu", "package"] and len(c.packages) == 2
    assert model.training and all(torch.equal(v, before[k][0]) and v._version == before[k][1]  # not modified
                                  for k, v in model.state_dict(keep_vars=True).items())
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnefxNotice)
        assert _relative(c(X), model(X).detach()) <= 1e-4


# -- slow: the default rules, save/load, cpu_ops and the backend, compiled -----------------------------------------


@pytest.fixture(scope="module")
def hist_compiled():
    torch.manual_seed(0)
    model = HistNet().eval()
    return model, anefx.compile(model, (X,), partition=True, precision="fp32")


@pytest.mark.slow
def test_two_packages_and_one_cpu_step_match_the_model(hist_compiled):
    model, c = hist_compiled
    assert len(c.packages) == 2 and [s["op"] for s in c.cpu_steps] == ["aten.histc.default"]
    assert any(p.name == "linear_to_conv1x1" and p.status == "applied" for p in c.packages[0].passes)  # ANE rules
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnefxNotice)
        x = torch.randn(1, 8, 32)
        assert _relative(c(x), model(x).detach()) <= 1e-4
    report = c.report()
    assert "2 package(s) and 1 CPU step(s)" in report
    assert "cpu histc: aten.histc.default from the top-level module: coremltools has no converter" in report


@pytest.mark.slow
def test_manifest_lists_each_step_with_names_shapes_and_dtypes(hist_compiled, tmp_path):
    _, c = hist_compiled
    folder = c.save(tmp_path / "hist")
    saved = json.loads((folder / "partition.json").read_text())
    assert saved["inputs"] == [{"name": "x", "shape": [1, 8, 32], "dtype": "float32"}]
    assert saved["outputs"] == [{"name": "output", "shape": [1, 8, 32], "dtype": "float32", "value": "linear_3"}]
    first, cpu, second = saved["steps"]
    assert first["package"] == "package_0.mlpackage" and (folder / first["package"] / "Manifest.json").is_file()
    assert [o["value"] for o in first["outputs"]] == ["linear_1"] and first["modules"][0] == "first.lin"
    assert cpu == {"kind": "cpu", "op": "aten.histc.default", "module": "", "node": "histc",
                   "args": [{"value": "linear_1"}, 32, -3, 3], "kwargs": {},
                   "inputs": [{"name": "linear_1", "shape": [1, 8, 32], "dtype": "float32"}],
                   "outputs": [{"name": "histc", "shape": [32], "dtype": "float32"}],
                   "reason": "coremltools has no converter for aten.histc.default"}
    assert [i["value"] for i in second["inputs"]] == ["linear_1", "histc"] and saved["cpu_weights"] is None


@pytest.mark.slow
def test_save_and_load_round_trip(hist_compiled, tmp_path):
    model, c = hist_compiled
    folder = c.save(tmp_path / "hist")
    c.save(folder)  # an earlier save is replaced
    loaded = anefx.load_partitioned(folder)
    x = torch.randn(1, 8, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnefxNotice)
        torch.testing.assert_close(loaded(x), c(x))
        assert _relative(loaded(x=x), model(x).detach()) <= 1e-4
    assert loaded.report() == c.report()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    with pytest.raises(anefx.AnefxError, match="not a partitioned anefx model"):
        c.save(tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "user data"
    with pytest.raises(PartitionError, match="holds no partition.json"):
        anefx.load_partitioned(tmp_path / "other")


@pytest.mark.slow
def test_cpu_ops_by_module_keeps_its_weights_on_the_cpu_side(tmp_path):
    model = HistNet().eval()
    c = anefx.compile(model, (X,), partition=True, cpu_ops=["first.out"], precision="fp32", rules=[],
                      package_check="skip")
    linear = next(s for s in c.cpu_steps if s["node"] == "linear_1")
    assert linear["reason"] == "named in cpu_ops ('first.out')" and linear["module"] == "first.out"
    folder = c.save(tmp_path / "p")
    assert (folder / "cpu_weights.safetensors").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnefxNotice)
        assert _relative(anefx.load_partitioned(folder)(X), model(X).detach()) <= 1e-4


@pytest.mark.slow
def test_backend_partitions_the_same_model():
    model = HistNet().eval()
    fast = torch.compile(model, backend="anefx", options={"precision": "fp32"})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fast(X)
    assert _relative(out, model(X).detach()) <= 1e-4
    notices = [str(w.message) for w in seen if w.category is AnefxNotice and "on the CPU" in str(w.message)]
    assert len(notices) == 1 and "aten.histc.default" in notices[0] and "2 CoreML package(s)" in notices[0]


class Frames(nn.Module):
    """unfold has no converter, but the unfold_to_conv rule rewrites it into a convolution; histc stays in torch."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(8, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(x.unfold(-1, 8, 4))
        return self.out(h + torch.histc(h, bins=16, min=-2, max=2))


def test_ops_the_rules_rewrite_stay_in_packages():
    from anefx.partition_run import ops_rules_rewrite

    cap = capture(Frames().eval(), (torch.randn(1, 64),), None)
    rewritten = ops_rules_rewrite(cap, {})
    assert rewritten == frozenset({"aten.unfold.default"})
    plan = plan_partition(cap.exported, (), None, rewritten)
    assert [n.name for n in plan.cpu_nodes] == ["histc"] and _kinds(plan) == ["package", "cpu", "package"]
    assert ops_rules_rewrite(cap, {"rules": []}) == frozenset()  # without the rule, unfold runs on the CPU
    assert "unfold" in [n.name for n in plan_partition(cap.exported).cpu_nodes]


@torch.library.custom_op("anefx_test::scaled", mutates_args=())
def scaled(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@scaled.register_fake
def _(x):
    return torch.empty_like(x)


def _register_failing_converter() -> None:
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    if _TORCH_OPS_REGISTRY.get_func("anefx_test::scaled") is None:
        @register_torch_op(torch_alias=["anefx_test::scaled"])
        def anefx_test_scaled(context, node):  # a converter that exists but fails
            raise ValueError("scaled: this converter does not handle the input")


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.out(torch.ops.anefx_test.scaled(self.lin(x)))


def test_cpu_ops_names_a_custom_op_as_torch_prints_it():
    plan = _plan(Scaled(), torch.randn(1, 8), ["anefx_test.scaled"])
    assert plan.reasons == {"scaled": "named in cpu_ops ('anefx_test.scaled')"} and len(plan.packages) == 2


@pytest.mark.slow
def test_a_region_that_fails_to_lower_moves_the_op_it_names_to_the_cpu():
    _register_failing_converter()
    model, x = Scaled().eval(), torch.randn(1, 8)
    c = anefx.compile(model, (x,), partition=True, precision="fp32", rules=[], package_check="skip")
    (step,) = c.cpu_steps
    assert step["op"] == "anefx_test.scaled.default" and "coremltools failed to lower it" in step["reason"]
    assert len(c.packages) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnefxNotice)
        assert _relative(c(x), model(x).detach()) <= 1e-4


class ComplexSeam(nn.Module):
    """An FFT kept on the CPU by cpu_ops whose complex result a package would read."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Block(), Block(17)

    def forward(self, x):
        spectrum = torch.fft.rfft(self.first(x))
        return self.second(spectrum.abs())


def test_a_complex_value_at_a_seam_is_refused_naming_the_fix():
    with pytest.raises(PartitionError, match=r"complex tensor that would pass into a package.*cpu_ops") as info:
        anefx.compile(ComplexSeam().eval(), (torch.randn(2, 8, 32),), partition=True,
                      cpu_ops=["aten.fft_rfft"], progress=False)
    assert len(str(info.value).splitlines()) <= 15


def test_an_int64_seam_value_outside_int32_is_refused_not_wrapped():
    from anefx.partitioned import to_numpy

    assert to_numpy(torch.tensor([7, -3]), "n").dtype.name == "int32"
    with pytest.raises(PartitionError, match=r"`n` holds 4294967296 .*int32.*cpu_ops"):
        to_numpy(torch.tensor([1, 2**32]), "n")
