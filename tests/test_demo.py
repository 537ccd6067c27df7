"""`anefx demo`: the README's main command compiles the built-in model and writes the package."""

from __future__ import annotations

from typer.testing import CliRunner

from anefx.cli import app
from anefx.mlpackage import histogram


def test_demo_prints_the_rule_table_and_histograms_and_writes_the_package(tmp_path):
    out = tmp_path / "anefx-demo.mlpackage"
    result = CliRunner().invoke(app, ["demo", "-o", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    for text in ("anefx rules", "rmsnorm_to_layernorm", "linear_to_conv1x1", "lowered program",
                 "without rules", "with rules", "wrote"):
        assert text in result.output
    ops = histogram(out)
    assert ops["linear"] == 0 and ops["conv"] == 15 and ops["layer_norm"] == 5
