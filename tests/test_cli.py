"""The anefx command: compile / diff / report / doctor, through typer's CliRunner and a real process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from anefx import zoo
from anefx.backend import accepts_attention
from anefx.cli import app
from anefx.errors import InvalidExampleError
from anefx.package_report import Tensor, package_report
from anefx.target import ExampleSpec, TargetError, default_examples, load_target, make_example, parse_example

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


    model = Net()


    def make():
        return Net(), (torch.randn(1, 16, 32),)
""")

runner = CliRunner()
# the rules these tests read the output of (the default list grows as rules land)
RULES = ["--rules", "rmsnorm_to_layernorm,linear_to_conv1x1"]


def flat(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "mymodel.py"
    path.write_text(MODEL_FILE)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    model, _, _ = zoo.build("bert")
    path = tmp_path_factory.mktemp("hf") / "tiny-bert"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "llama.mlpackage"
    result = runner.invoke(app, ["compile", "zoo:llama", "-o", str(out), *RULES])
    assert result.exit_code == 0, result.output
    return out


def test_compile_file_attr_with_examples(model_file, tmp_path):
    out = tmp_path / "net.mlpackage"
    argv = ["compile", f"{model_file}:model", "--example", "x:1x16x32", "-o", str(out), *RULES]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    for stage in ("capture", "legalize", "rule linear_to_conv1x1", "lower", "save", "anefx rules"):
        assert stage in result.output
    assert "x (1, 16, 32) float32" in flat(result)
    assert out.is_dir() and package_report(out).histogram["conv"] == 2


def test_compile_factory_brings_its_examples(model_file, tmp_path):
    out = tmp_path / "made.mlpackage"
    result = runner.invoke(app, ["compile", f"{model_file}:make", "-o", str(out), "--precision", "fp32",
                                 "--compute-units", "CPU_ONLY", "--attention", "split_heads"])
    assert result.exit_code == 0, result.output
    assert "x (1, 16, 32) float32" in flat(result) and out.is_dir()
    assert "convolution" not in result.output  # CPU_ONLY: the ANE rules do not run
    assert accepts_attention() or "--attention split_heads is kept" in flat(result)


def test_compile_hf_directory_offline(bert_dir, tmp_path):
    out = tmp_path / "bert.mlpackage"
    argv = ["compile", str(bert_dir), "-e", "input_ids:1x16:int64", "-o", str(out), *RULES]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "BertModel from" in flat(result) and "input_ids (1, 16) int64" in flat(result)
    assert out.is_dir()


def test_hf_directory_default_examples(bert_dir):
    target = load_target(str(bert_dir))
    assert target.default_examples == [ExampleSpec("input_ids", (1, 128), torch.int64)]
    ids = make_example(target.default_examples[0], target.vocab_size)
    assert ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < zoo.VOCAB
    vit = zoo.build("vit")[0].config
    assert default_examples(vit) == [ExampleSpec("pixel_values", (1, 3, 32, 32))]


def test_example_parsing():
    assert parse_example("input_ids:1x128:int64") == ExampleSpec("input_ids", (1, 128), torch.int64)
    assert parse_example("x:2x3").dtype == torch.float32
    assert int(make_example(parse_example("t:1000:int32")).max()) < 100
    for bad, why in (("x", "NAME:SHAPE"), ("x:1xa", "positive integers"), ("x:0x3", "positive"),
                     ("x:1x2:float8", "unknown dtype")):
        with pytest.raises(InvalidExampleError, match=why):
            parse_example(bad)


def test_target_errors(model_file, tmp_path):
    with pytest.raises(TargetError, match="no 'nope'; modules and factories in it: .*model.*make"):
        load_target(f"{model_file}:nope")
    with pytest.raises(TargetError, match="has no config.json"):
        load_target(str(tmp_path))
    with pytest.raises(TargetError, match="neither file.py:attr"):
        load_target("no/such/thing")


def test_diff_command_writes_html(model_file, tmp_path):
    page = tmp_path / "d.html"
    result = runner.invoke(app, ["diff", f"{model_file}:model", "-e", "x:1x16x32", "--html", str(page),
                                 *RULES])
    assert result.exit_code == 0, result.output
    assert "linear_to_conv1x1: changes by module" in result.output
    html = page.read_text()
    assert "<code>fc1</code>" in html and "<code>fc2</code>" in html


def test_report(package):
    result = runner.invoke(app, ["report", str(package)])
    assert result.exit_code == 0, result.output
    text = flat(result)
    for word in ("conv", "largest dimension", "16384", "last-axis padding", "gather",
                 "ops the ANE does not run"):
        assert word in text
    report = package_report(package)
    assert report.histogram["conv"] == 15
    assert max(max(t.shape) for t in report.tensors if t.shape) == 1024  # the lm_head's vocabulary


def test_padding_arithmetic():
    assert Tensor("a", "x", (1, 64, 1), "FLOAT16").wasted_bytes == 64 * (64 - 2)  # 32x for a singleton
    assert Tensor("b", "x", (1, 64, 1, 32), "FLOAT16").wasted_bytes == 0  # 32 fp16 = 64 bytes
    assert Tensor("c", "x", (3, 33), "FLOAT16").padded_bytes == 3 * 128


def test_doctor():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    text = flat(result)
    for word in ("torch", "coremltools", "transformers", "anefx", "has not been tested", "chromium"):
        assert word in text


@pytest.mark.parametrize("argv, message", [
    (["compile", "zoo:llama", "-e", "input_ids:1xq"], "positive integers joined by 'x'"),
    (["compile", "nowhere.py:model"], "nowhere.py does not exist"),
    (["report", "missing.mlpackage"], "missing.mlpackage does not exist"),
    (["compile", "zoo:llama", "--rules", "nope"], "unknown rule 'nope'; known rules:"),
    (["compile", "zoo:llama", "--precision", "fp8"], "precision='fp8' is not one of"),
])
def test_errors_are_one_red_line(argv, message):
    result = runner.invoke(app, argv)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:") and message in result.stderr


def test_real_process(model_file, tmp_path):
    script = Path(sys.executable).with_name("anefx")
    bad = subprocess.run([script, "compile", f"{model_file}:model", "-e", "x"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --example 'x'"), bad.stderr
    assert bad.stderr.count("\n") == 1
    out = tmp_path / "p.mlpackage"
    ok = subprocess.run([script, "compile", f"{model_file}:make", "-o", str(out), *RULES],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and out.is_dir()
    assert "FutureWarning" not in ok.stderr and "has not been tested" not in ok.stderr


def test_compile_quantizes_weights_from_the_command_line(model_file, tmp_path):
    out = tmp_path / "q.mlpackage"
    argv = ["compile", f"{model_file}:model", "--example", "x:1x16x32", "-o", str(out), *RULES,
            "--quantize", "lut4", "--group-size", "8"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "quantize weights" in result.output
    histogram = package_report(out).histogram
    assert histogram["conv"] == 2 and histogram["constexpr_lut_to_dense"] >= 1, histogram


@pytest.mark.parametrize(("options", "says"), [
    (["--quantize", "lut5"], "not one of"),
    (["--quantize", "embeddings=", "--group-size", "8"], "PART=MODE"),
    (["--group-size", "8"], "--group-size applies to --quantize"),
])
def test_bad_quantize_options_are_refused_before_loading(tmp_path, options, says):
    result = runner.invoke(app, ["compile", str(tmp_path / "missing.py:model"), *options])
    assert result.exit_code == 2 and says in flat(result), result.output
