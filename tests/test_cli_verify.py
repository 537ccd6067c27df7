"""`anefx verify`: a saved package against the model it came from, from the command line."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

import anefx
from anefx import zoo
from anefx.cli import app
from anefx.verify import verify_package


def test_verify_command_reports_errors_per_output(tmp_path):
    model, args, kwargs = zoo.build("bert")
    path = anefx.compile(model, args, kwargs).save(tmp_path / "bert.mlpackage")
    result = CliRunner().invoke(app, ["verify", str(path), "--module", "zoo:bert"])
    assert result.exit_code == 0, result.output
    assert "last_hidden_state" in result.output and "pooler_output" in result.output
    assert "PSNR" in result.output and "PASS" in result.output and "fingerprint matches" in result.output
    report = verify_package(path, model, args, kwargs, precision="fp16")
    assert all(r.psnr_db >= 60 for r in report.values())


def test_verify_with_the_wrong_model_is_one_red_line(tmp_path):
    model, args, kwargs = zoo.build("bert")
    path = anefx.compile(model, args, kwargs).save(tmp_path / "bert.mlpackage")
    result = CliRunner().invoke(app, ["verify", str(path), "--module", "zoo:gpt2"])
    assert result.exit_code == 2
    assert "the model returns 1 tensors but the package has 2 outputs" in result.output


def test_verify_from_a_file_target_with_examples(tmp_path):
    source = tmp_path / "net.py"
    source.write_text("import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
                      "        super().__init__()\n        self.proj = torch.nn.Linear(16, 8)\n\n"
                      "    def forward(self, x):\n        return torch.relu(self.proj(x))\n\n"
                      "def make():\n    torch.manual_seed(0)\n    return Net().eval()\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("net", source)
    net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(net)
    path = anefx.compile(net.make(), (torch.randn(1, 4, 16),), precision="fp32").save(tmp_path / "n.mlpackage")
    result = CliRunner().invoke(app, ["verify", str(path), "-m", f"{source}:make", "--example", "x:1x4x16",
                                      "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert "output" in result.output
