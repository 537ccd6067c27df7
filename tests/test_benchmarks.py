"""benchmarks/compile_bench.py runs end to end on tiny models (smoke coverage, not a timing test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compile_bench.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--models", "distilbert,llama",
           "--output", str(tmp / "bench.md"), "--json", str(tmp / "rows.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((tmp / "rows.json").read_text()), (tmp / "bench.md").read_text()


def _row(rows, model, path):
    return next(r for r in rows if r["model"] == model and r["path"] == path)


def test_both_paths_measured_for_each_model(quick_run):
    rows, _ = quick_run
    assert {(r["model"], r["path"]) for r in rows} == {
        (m, p) for m in ("distilbert", "llama") for p in ("plain", "anefx")}
    assert not [r for r in rows if "error" in r]


@pytest.mark.parametrize("model", ["distilbert", "llama"])
def test_programs_differ_the_way_anefx_promises(quick_run, model):
    rows, _ = quick_run
    plain, ane = _row(rows, model, "plain"), _row(rows, model, "anefx")
    assert plain["linear"] > 0 and plain["conv"] == 0
    assert ane["linear"] == 0 and ane["conv"] >= 1 and ane["rank5"] == 0
    assert ane["layout_ops"] < plain["layout_ops"]


def test_numbers_are_sane(quick_run):
    rows, _ = quick_run
    for r in rows:
        assert 0 < r["seconds"] < 120
        assert r["peak_rss"] >= r["rss_built"] > r["weight_bytes"] > 0
        assert r["non_const_ops"] < r["ops"] and r["largest_dim"] >= 32
        assert r["psnr_db"] > 40, r  # fp16 interpreter against the fp32 torch model


def test_markdown_has_the_side_by_side_tables(quick_run):
    _, text = quick_run
    assert "<!-- compile_bench: begin (generated) -->" in text and "Machine:" in text
    assert "| DistilBERT tiny (S=32) | plain |" in text and "| DistilBERT tiny (S=32) | anefx |" in text
    assert "time ×" in text and "memory ×" in text and "--quick --models distilbert,llama" in text


def test_only_record_rewrites_the_recorded_results():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import compile_bench
    finally:
        sys.path.remove(str(SCRIPT.parent))
    recorded = SCRIPT.parent.parent / "docs" / "benchmarks.md"
    assert compile_bench.destination(compile_bench.parse(["--quick"])) != recorded
    assert compile_bench.destination(compile_bench.parse([])) != recorded
    assert compile_bench.destination(compile_bench.parse(["--size", "1b"])).parent.name == "results"
    assert compile_bench.destination(compile_bench.parse(["--record"])) == recorded
    assert "--record" not in compile_bench.command_line(["--size", "1b", "--record"])
