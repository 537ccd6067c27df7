"""The Core AI target: the rewritten program converted to a .aimodel with coreai-torch on Linux, read back from
the saved asset (anefx.lower.coreai_report) and checked for the ANE form; compile/save/run, the CLI, errors."""

from __future__ import annotations

import inspect
import json
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

import anefx
from anefx.cli import app
from anefx.errors import AnefxError, OptionError
from anefx.files import FileWriteError
from anefx.zoo import FAMILIES, MODELS

pytest.importorskip("coreai_torch", reason="the Core AI converter is not installed: pip install 'anefx[coreai]'")

from anefx.lower.coreai_report import AimodelReadError, aimodel_report  # noqa: E402
from anefx.lower.target import CannotRunError, LoweringOptions, TargetUnavailableError, lowering_target  # noqa: E402

FAST = ["llama", "distilbert", "vit"]  # the default run; every other zoo model and family runs slow
NO_ATTENTION = {"resnet", "convnext", "mobilenet_v2", "mlp"}


def projections(model: torch.nn.Module) -> int:
    from transformers.pytorch_utils import Conv1D

    return sum(isinstance(m, torch.nn.Linear | Conv1D) for m in model.modules())


def to_aimodel(ep, c, tmp_path, name="model"):
    """`ep` (a program of the compiled model `c`) lowered by the Core AI target, saved, and read back."""
    artifact = lowering_target("coreai").lower(ep, input_names=c.input_names, output_names=c.output_names,
                                               options=LoweringOptions())
    return aimodel_report(artifact.save(tmp_path / name))


def softmaxes(ep, rank: int | None = None) -> int:
    """The program's softmaxes (of outputs of this rank)."""
    return sum(n.op == "call_function" and "softmax" in str(n.target)
               and (rank is None or n.meta["val"].dim() == rank) for n in ep.graph.nodes)


def assert_ane_form(name, model, c, report):
    """Projections as convolutions (no linear, no matmul reading a weight), attention as the rewritten graph's
    softmaxes, one per head over axis 1 of (B, S_k, 1, S_q), no SDPA, no tensor of rank 5 (decode included:
    torch's own einsum decomposition went through rank 5 there, see anefx.lower.coreai.per_head_einsum)."""
    assert "linear" not in report.ops and report.weight_matmuls == 0, report.ops
    assert report.conv >= max(projections(model), 1), report.ops
    assert report.max_rank <= 4
    assert "scaled_dot_product_attention" not in report.ops
    if name not in NO_ATTENTION:  # attention: rank-4 softmaxes; a MoE router's softmax is rank 2
        assert report.ops["softmax"] == softmaxes(c.rewritten), report.ops
        per_head = {shape: n for shape, n in report.softmax_shapes.items() if len(shape[0]) == 4}
        assert sum(per_head.values()) == softmaxes(c.rewritten, rank=4) >= 4, report.softmax_shapes
        assert all(s[2] == 1 and axis == 1 for s, axis in per_head), report.softmax_shapes


def families(fast: list[str]) -> list:
    return [pytest.param(name, marks=() if name in fast else pytest.mark.slow) for name in FAMILIES]


@pytest.mark.parametrize("name", families(FAST))
def test_zoo_model_converts_to_an_aimodel_in_the_ane_form(name, compile_zoo, tmp_path):
    options = {} if name in MODELS else {"precision": "fp32"}  # the compile the zoo tests make (cached)
    model, _, _, c = compile_zoo(name, **options)
    report = to_aimodel(c.rewritten, c, tmp_path)
    assert sorted(p.name for p in report.path.iterdir()) == ["main.hash", "main.mlirb", "metadata.json"]
    assert_ane_form(name, model, c, report)


def test_captured_program_keeps_matmuls_on_weights(compile_zoo, tmp_path):
    """The report sees what the rules remove: the captured Llama lowers with its projections as matmuls on
    weights, no convolution, fused attention kept whole and a rank-5 tensor."""
    model, _, _, c = compile_zoo("llama")
    captured = to_aimodel(c.exported, c, tmp_path, "captured")
    rewritten = to_aimodel(c.rewritten, c, tmp_path, "rewritten")
    assert captured.weight_matmuls == projections(model) and captured.conv == 0, captured.ops
    assert rewritten.weight_matmuls == 0 and rewritten.conv >= projections(model)
    assert captured.max_rank == 5 and rewritten.max_rank == 4  # GQA's repeat_kv expands through rank 5
    assert captured.ops["softmax"] + captured.ops["scaled_dot_product_attention"] < rewritten.ops["softmax"]
    assert rewritten.ops["layer_norm"] == 5  # 2 × 2 RMSNorms and the final one, each a layer_norm composite


MODEL_FILE = textwrap.dedent("""
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(32)
            self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


    def make():
        torch.manual_seed(0)
        return Net().eval(), (torch.randn(1, 16, 32),)
""")


@pytest.fixture(scope="module")
def small():
    namespace: dict = {}
    exec(MODEL_FILE, namespace)  # the same module the CLI test loads from a file
    model, args = namespace["make"]()
    return model, args, anefx.compile(model, args, target="coreai")


def test_compile_target_coreai_saves_reports_and_says_where_it_runs(small, tmp_path):
    model, args, c = small
    assert c.mlmodel is None and c.options["target"] == "coreai"
    path = c.save(tmp_path / "net")
    assert path.name == "net.aimodel" and (path / "main.mlirb").is_file()
    report = aimodel_report(path)
    assert report.conv == 2 and report.weight_matmuls == 0 and report.ops["layer_norm"] == 1, report.ops
    assert report.inputs == {"x": ([1, 16, 32], "f32")} and report.max_rank <= 4
    with torch.no_grad():  # the rewritten program still runs in torch and equals the model
        torch.testing.assert_close(c.rewritten.module()(*args), model(*args), rtol=1e-5, atol=1e-5)
    if sys.platform == "darwin":
        pytest.skip("Core AI may run here; the refusal is for other OSes")
    with pytest.raises(CannotRunError, match="macOS / iOS 27") as err:
        c(*args)
    assert "target='coreml'" in str(err.value) and "c.save" in str(err.value)
    assert c.save(tmp_path / "net.aimodel") == path  # an earlier .aimodel is replaced


def test_save_refuses_to_replace_what_is_not_an_aimodel(small, tmp_path):
    _, _, c = small
    keep = tmp_path / "data.aimodel"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(FileWriteError, match="not a Core AI model"):
        c.save(keep)
    assert (keep / "notes.txt").read_text() == "mine"


def test_target_errors_name_the_fix(small, monkeypatch):
    model, args, _ = small
    with pytest.raises(OptionError, match="coreml, coreai"):
        anefx.compile(model, args, target="tflite")
    with pytest.raises(OptionError, match="target='coreml' only"):
        anefx.compile(model, args, target="coreai", buckets=[args])
    monkeypatch.setitem(sys.modules, "coreai_torch", None)  # as on a machine without the extra
    with pytest.raises(TargetUnavailableError, match=r"pip install 'anefx\[coreai\]'"):
        anefx.compile(model, args, target="coreai")
    assert issubclass(TargetUnavailableError, AnefxError)


def test_compile_signature_keeps_coreml_the_default():
    assert inspect.signature(anefx.compile).parameters["target"].default == "coreml"


runner = CliRunner()


def test_cli_compile_target_coreai_and_report(tmp_path):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    out = tmp_path / "net"
    result = runner.invoke(app, ["compile", f"{tmp_path / 'net.py'}:make", "--target", "coreai", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "net.aimodel" in result.output and (tmp_path / "net.aimodel" / "main.mlirb").is_file()
    result = runner.invoke(app, ["report", str(tmp_path / "net.aimodel")], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "Core AI model" in result.output and "layer_norm" in result.output and "conv2d" in result.output


def test_report_refuses_an_empty_or_damaged_aimodel(small, tmp_path):
    """coreai-core ends the process on such a file: the report checks the folder and main.hash first."""
    empty = tmp_path / "x.aimodel"
    empty.mkdir()
    result = runner.invoke(app, ["report", str(empty)])
    assert result.exit_code != 0 and "not a complete Core AI model" in result.output, result.output
    _, _, c = small
    damaged = c.save(tmp_path / "damaged")
    program = damaged / "main.mlirb"
    program.write_bytes(program.read_bytes()[:1000])
    with pytest.raises(AimodelReadError, match="damaged.*Save it again"):
        aimodel_report(damaged)


def test_doctor_reports_coreai():
    from anefx.doctor import checks

    found = {c.name: c for c in checks()}["coreai-torch"]
    assert found.value == "0.4.3" and "target='coreai'" in found.note


def test_report_json_is_one_object_with_ops(small, tmp_path):
    _, _, c = small
    path = c.save(tmp_path / "net")
    result = runner.invoke(app, ["report", str(path), "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["kind"] == "aimodel" and figures["ops"]["conv2d"] == 2 and figures["ops"]["layer_norm"] == 1
    assert figures["largest_dim"]["size"] == 64 and figures["max_rank"] <= 4 and figures["linear"] == 0


def test_both_formats_report_the_same_structure(compile_zoo, tmp_path):
    """One rewritten graph, two formats: the same projections, per-head softmaxes and attention matmuls
    (Core ML's per-head einsums, Core AI's batched matmuls), read back from each saved model."""
    from anefx.lower.target import saved_figures

    _, _, _, c = compile_zoo("llama")
    coreml = saved_figures(c.save(tmp_path / "llama.mlpackage"))
    coreai = saved_figures(lowering_target("coreai").lower(
        c.rewritten, input_names=c.input_names, output_names=c.output_names, options=LoweringOptions()
    ).save(tmp_path / "llama"))
    assert (coreml["format"], coreai["format"]) == ("mlpackage", "aimodel")
    for key in ("conv", "linear", "matmul", "softmax", "max_rank"):
        assert coreml[key] == coreai[key], (key, coreml[key], coreai[key])
    assert (coreml["conv"], coreml["softmax"], coreml["matmul"]) == (15, 8, 16)
    assert coreml["ops"]["layer_norm"] == coreai["ops"]["layer_norm"] == 5


@pytest.mark.slow
def test_compile_llm_target_coreai_has_prefill_decode_and_the_cache_as_states(tmp_path):
    """A tiny Llama's prefill and decode in one .aimodel: the KV cache as 4 states, each written once per call by
    a slice_update, and both programs in the ANE form."""
    model, _, _ = anefx.zoo.build("llama")
    lm = anefx.compile_llm(model, context_length=32, prefill_length=8, target="coreai", verify=False,
                           package_check="skip")
    path = lm.save(tmp_path / "tiny-llama")
    assert path.suffix == ".aimodel" and lm.state_names == ["k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1"]
    for fn, seq in (("prefill", 8), ("decode", 1)):
        report = aimodel_report(path, fn)
        assert report.functions == ["prefill", "decode"] and report.function == fn
        assert set(report.inputs) == {*lm.state_names, "input_ids", "position"}
        assert report.inputs["input_ids"] == ([1, seq], "si32") and report.outputs["logits"][0] == [1, seq, 1024]
        assert report.ops["slice_update"] == 4 and "scatter_along_axis" not in report.ops, report.ops
        assert report.conv >= 15 and report.weight_matmuls == 0 and report.max_rank <= 4, report.ops
        assert report.ops["softmax"] == 8 and all(axis == 1 for _, axis in report.softmax_shapes)
    with pytest.raises(OptionError, match="argmax_in_model= work with target='coreml' only"):
        anefx.compile_llm(model, context_length=32, prefill_length=8, target="coreai", argmax_in_model=True)
