"""anefx report's readiness checks: per-program constraints, --json (a package and an LLM folder), and
--compute-plan (CoreML's plan: its message off macOS, its formatting from a plan object)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import anefx
from anefx.cli import app
from anefx.compute_plan import ComputePlan, PlannedOp, can_plan, plan_json, plan_tables, planned_ops
from anefx.llm.manifest import MANIFEST, ChunkSpec, FunctionSpec, LLMManifest, TensorSpec
from anefx.package_report import MAX_PROGRAM_OPS, constraints, package_report, report_json

runner = CliRunner()


def build_package(path: Path, *, width: int, state_length: int) -> Path:
    """A small stateful ML program: y = x * 2 + w for x (1, width), and a state (1, 4, 1, state_length)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    weight = np.random.default_rng(0).standard_normal((1, width)).astype(np.float16)

    @mb.program(input_specs=[mb.StateTensorSpec((1, 4, 1, state_length), dtype=types.fp16),
                             mb.TensorSpec((1, width), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def program(cache, x):
        mb.coreml_update_state(state=cache, value=mb.read_state(input=cache))
        return mb.add(x=mb.mul(x=x, y=np.float16(2.0)), y=weight)

    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT16)
    model.save(str(path))
    return path


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """Breaks two limits: a dimension of 16400 and a state whose last dimension (40) is not a multiple of 32."""
    return build_package(tmp_path_factory.mktemp("readiness") / "wide.mlpackage", width=16400, state_length=40)


@pytest.fixture(scope="module")
def fit(tmp_path_factory) -> Path:
    return build_package(tmp_path_factory.mktemp("readiness") / "fit.mlpackage", width=64, state_length=64)


def test_constraints_fire_on_a_wide_tensor_and_a_misaligned_state(wide, fit):
    found = constraints(package_report(wide))
    by_check = {c.check: c for c in found}
    assert set(by_check) == {"every dimension ≤ 16384", "state last dimension a multiple of 32"}
    assert by_check["state last dimension a multiple of 32"].op == "state cache"
    assert "pad its last dimension to 64" in by_check["state last dimension a multiple of 32"].detail
    wide_ops = [c.op for c in found if c.check == "every dimension ≤ 16384"]
    assert len(wide_ops) == 3 and wide_ops[0] == "input x", wide_ops  # x, x * 2, x * 2 + w
    assert "split that axis" in found[-1].detail
    assert constraints(package_report(fit)) == []


def test_op_count_and_weight_limits_use_the_production_check(fit):
    report = package_report(fit)
    assert sum(report.histogram.values()) == 4 and report.weight_bytes > 64 * 2  # read/write state, mul, add
    assert constraints(report) == constraints(report, max_ops=MAX_PROGRAM_OPS)  # the defaults are the limits
    ops = constraints(report, max_ops=3)
    assert [(c.op, c.check) for c in ops] == [("program", "op count ≤ 3")]
    assert "4 MIL ops" in ops[0].detail and "max_chunk_ops" in ops[0].detail
    weights = constraints(report, max_weight_bytes=100)
    assert [c.op for c in weights] == ["weights"] and "quantize or split" in weights[0].detail


def test_report_json_is_one_object_with_the_figures(wide):
    result = runner.invoke(app, ["report", str(wide), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # one JSON object, nothing else on stdout
    assert data["ops"] == {"add": 1, "mul": 1, "read_state": 1, "write_state": 1}
    assert data["functions"] == ["main"] and data["largest_dim"]["size"] == 16400
    assert data["states"] == [{"name": "cache", "shape": [1, 4, 1, 40], "dtype": "float16"}]
    assert data["layout_ops"] == {"transpose": 0, "reshape": 0} and data["ranks"] == {"2": 3, "4": 1}
    assert all(set(c) == {"op", "check", "detail"} for c in data["constraints"]) and len(data["constraints"]) == 4
    text = runner.invoke(app, ["report", str(wide)])
    assert text.exit_code == 0 and "constraints broken: 4" in " ".join(text.stdout.split())


def test_report_json_of_an_llm_folder_has_one_entry_per_chunk(wide, fit, tmp_path):
    folder = tmp_path / "llm"
    folder.mkdir()
    chunks = []
    for i, package in enumerate((fit, wide)):
        (folder / f"chunk_{i}.mlpackage").symlink_to(package, target_is_directory=True)
        function = FunctionSpec(inputs=[TensorSpec("x", [1, 1], "float16")], outputs=[], ops=4)
        chunks.append(ChunkSpec(file=f"chunk_{i}.mlpackage", layers=[i, i + 1],
                                functions={"prefill": function, "decode": function},
                                states=[TensorSpec("cache", [1, 4, 1, 40], "float16")], bytes=1, largest_dim=1))
    manifest = LLMManifest(model="Tiny", context_length=40, cache_length=64, prefill_length=8, vocab_size=1,
                           output="logits", logits_pieces=[1], eos_token_ids=[], precision="fp16",
                           deployment_target="iOS18", chunks=chunks)
    (folder / MANIFEST).write_text(manifest.to_json())
    data = report_json(folder)
    assert data["kind"] == "llm" and [c["file"] for c in data["chunks"]] == ["chunk_0.mlpackage", "chunk_1.mlpackage"]
    assert data["chunks"][0]["constraints"] == [] and data["chunks"][0]["programs"]["main"]["op_count"] == 4
    assert {c["op"].split(":")[0] for c in data["constraints"]} == {"chunk_1.mlpackage main"}
    printed = runner.invoke(app, ["report", str(folder), "--json"])
    assert printed.exit_code == 0 and json.loads(printed.stdout)["chunks"][1]["states"][0]["shape"] == [1, 4, 1, 40]
    text = runner.invoke(app, ["report", str(folder)])
    assert text.exit_code == 0 and "constraints broken: 4" in " ".join(text.stdout.split())


@pytest.mark.skipif(can_plan(), reason="CoreML's compute plan is available here")
def test_compute_plan_off_macos_is_an_error_that_says_what_it_needs(wide):
    result = runner.invoke(app, ["report", str(wide), "--compute-plan"])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "needs macOS 14.4 or later" in message and "Run `anefx report --compute-plan PKG` on a Mac" in message


def fake_plan():
    """An object with MLComputePlan's public API, built from coremltools' own structure and device classes."""
    from coremltools.models import compute_device as devices
    from coremltools.models import compute_plan as cp

    ane, cpu = object.__new__(devices.MLNeuralEngineComputeDevice), object.__new__(devices.MLCPUComputeDevice)
    value_type = cp.MLModelStructureProgramValueType()

    def operation(name, output):
        outputs = [cp.MLModelStructureProgramNamedValueType(output, value_type)]
        return cp.MLModelStructureProgramOperation(inputs={}, operator_name=name, outputs=outputs, blocks=[],
                                                   __proxy__=None)

    ops = [operation("const", "w"), operation("conv", "y"), operation("gather", "g"), operation("softmax", "s")]
    plans = {"y": (ane, 0.6), "g": (cpu, 0.3), "s": (ane, 0.1)}

    class Plan:
        model_structure = cp.MLModelStructure(neuralnetwork=None, pipeline=None, program=cp.MLModelStructureProgram(
            functions={"main": cp.MLModelStructureProgramFunction(
                inputs=[], block=cp.MLModelStructureProgramBlock(inputs=[], operations=ops, output_names=["s"]))}))

        def get_compute_device_usage_for_mlprogram_operation(self, op):
            device = plans[op.outputs[0].name][0]
            return cp.MLComputePlanDeviceUsage(preferred_compute_device=device, supported_compute_devices=[device])

        def get_estimated_cost_for_mlprogram_operation(self, op):
            return cp.MLComputePlanCost(weight=plans[op.outputs[0].name][1])

    return Plan()


def test_compute_plan_formatting_from_a_plan_object():
    from rich.console import Console

    plan = ComputePlan(Path("m.mlpackage"), "ALL", planned_ops(fake_plan()))
    assert [(op.op, op.device) for op in plan.ops] == [("conv", "ANE"), ("gather", "CPU"), ("softmax", "ANE")]
    assert plan.ane_cost_share == pytest.approx(0.7)
    assert plan.off_ane() == [PlannedOp("main", "gather", "g", "CPU", ("CPU",), 0.3)]
    assert plan_json(plan)["ops_by_device"] == {"ANE": 2, "CPU": 1}
    console = Console(width=120, record=True)
    for table in plan_tables(plan):
        console.print(table)
    text = console.export_text()
    assert "estimated cost on the Neural Engine: 70.0% (2 of 3 ops prefer it)" in text
    assert "gather" in text and "30.00%" in text


class TwoPackages(torch.nn.Module):
    """kthvalue has no coremltools converter: compiled with partition=True it runs on the CPU between packages."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.b(self.a(x) - torch.kthvalue(x, 3, -1, keepdim=True).values)


@pytest.mark.slow
def test_report_json_of_a_partitioned_folder_has_one_entry_per_package(tmp_path):
    folder = anefx.compile(TwoPackages().eval(), (torch.randn(1, 4, 16),), partition=True).save(tmp_path / "split")
    result = runner.invoke(app, ["report", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "partition" and "cpu" in data["steps"] and data["constraints"] == []
    assert len(data["packages"]) == data["steps"].count("package") >= 1
    assert all(p["programs"][p["function"]]["ops"] for p in data["packages"])
