"""Every snippet in README.md and docs/*.md runs as written.

A doc's ```python blocks run in order in one namespace, in a temporary working directory; a block whose
first line is a file name comment (`# mymodel.py`) is written to that file instead. The `$` commands of its
console transcripts (plain ``` blocks) run there too, as shell commands with `anefx` resolving to this
project's CLI. A command must exit 0, or 2 when its transcript shows an `error:` line, or 1 when it shows a
failing verify verdict; the stable lines of its transcript (verdicts, `wrote …`, `note: …`, errors, the
target's inputs) must be in what it prints. README.md and docs/api.md run in the default suite; the docs
with many compiles (cli, inspection, verification: several minutes) are marked slow.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import ops

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
QUICK_DOCS = {"README.md", "api.md"}  # cheap enough for the default run
OUTSIDE_PATHS = ("../", "/opt/", "/work/", "DESIGN.md", "UV_FIND_LINKS=/")
FILE_COMMENT = re.compile(r"# ([\w.-]+\.\w+)\s*$")
STABLE_PREFIXES = ("wrote ", "error:", "PASS", "FAIL", "weights:", "note:")
INPUTS_LINE = re.compile(r"[^\s│┃].*: \w+ \([\d, ]+\) (float|int|bool|bfloat)\w*(, .*)?$")
COMMAND_TIMEOUT_S = 900


@dataclass
class Snippet:
    """One runnable piece of a doc: python code, a file's content, or a `$` command with its transcript."""

    kind: str  # "python", "file" or "command"
    text: str
    where: str  # "docs/cli.md:90"
    file_name: str | None = None
    transcript: list[str] = field(default_factory=list)


def fenced_blocks(path: Path) -> list[tuple[str, int, list[str]]]:
    """(language, line of the first content line, content lines) of every fenced block."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        opening = re.match(r"```(\S*)\s*$", lines[i])
        if opening is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append((opening.group(1), i + 2, lines[i + 1:end]))
        i = end + 1
    return blocks


def snippets(path: Path) -> list[Snippet]:
    name, found = path.relative_to(ROOT).as_posix(), []
    for language, first_line, lines in fenced_blocks(path):
        if language == "python":
            file_comment = FILE_COMMENT.match(lines[0]) if lines else None
            kind = "file" if file_comment else "python"
            found.append(Snippet(kind, "\n".join(lines) + "\n", f"{name}:{first_line}",
                                 file_comment.group(1) if file_comment else None))
        elif language in ("", "console"):
            found += transcript_commands(lines, name, first_line)
    return found


def transcript_commands(lines: list[str], doc: str, first_line: int) -> list[Snippet]:
    """The `$ ` commands of a console transcript, each with the output lines shown after it."""
    commands: list[Snippet] = []
    for offset, line in enumerate(lines):
        if line.startswith("$ "):
            commands.append(Snippet("command", line[2:], f"{doc}:{first_line + offset}"))
        elif commands:
            commands[-1].transcript.append(line)
    return commands


def expected_exit_code(transcript: list[str]) -> int:
    if any(line.startswith("error:") for line in transcript):
        return 2
    return 1 if any(line.startswith("FAIL") for line in transcript) else 0


def stable_lines(transcript: list[str]) -> list[str]:
    """Transcript lines that do not change between runs: verdicts, errors, `wrote`, notes, the inputs."""
    return [line for line in transcript if line.startswith(STABLE_PREFIXES) or INPUTS_LINE.fullmatch(line)]


def shows(output: str, line: str) -> bool:
    """Whether `line` is in `output`, ignoring where the terminal wrapped it; decimals may differ."""
    squeezed = re.sub(r"\s+", "", output)
    pattern = r"\d+\.\d+".join(re.escape(part) for part in re.split(r"\d+\.\d+", re.sub(r"\s+", "", line)))
    return re.search(pattern, squeezed) is not None


def anefx_on_path(tmp_path: Path) -> dict[str, str]:
    """An environment whose `anefx` is this project's CLI run by this interpreter (100 columns, like the docs)."""
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "anefx"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "import sys; from anefx.cli import app; '
                      f"sys.argv[0] = 'anefx'; app()\" \"$@\"\n")
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANEFX_")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "COLUMNS": "100", "TERM": "dumb"}


def run_command(snippet: Snippet, cwd: Path, env: dict[str, str]) -> None:
    command = re.sub(r"^uv run ", "", snippet.text)
    done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    output = done.stdout + done.stderr
    context = f"{snippet.where}: `$ {snippet.text}`\n{output[-3000:]}"
    assert done.returncode == expected_exit_code(snippet.transcript), f"exit code {done.returncode}: {context}"
    missing = [line for line in stable_lines(snippet.transcript) if not shows(output, line)]
    assert not missing, f"not printed: {missing}\n{context}"


def run_doc(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run every snippet of one doc in order; returns the namespace of its python blocks."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": "__doc_snippets__"}
    env = anefx_on_path(tmp_path)
    try:
        for snippet in snippets(path):
            if snippet.kind == "file":
                (tmp_path / snippet.file_name).write_text(snippet.text)
            elif snippet.kind == "python":
                exec(compile(snippet.text, snippet.where, "exec"), namespace)
            else:
                run_command(snippet, tmp_path, env)
    finally:
        forget_modules_under(tmp_path)
    return namespace


def forget_modules_under(directory: Path) -> None:
    """Drop modules imported from a doc's files (another doc may write a different mymodel.py)."""
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(directory)):
            del sys.modules[name]
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()


def runnable_docs() -> list:
    return [pytest.param(path, id=path.name, marks=() if path.name in QUICK_DOCS else pytest.mark.slow)
            for path in DOCS if snippets(path)]


def test_docs_stand_alone():
    for path in DOCS:
        text = path.read_text()
        mentioned = [p for p in OUTSIDE_PATHS if p in text]
        assert not mentioned, f"{path.name} names paths outside the repository: {mentioned}"


def test_python_blocks_are_python_and_commands_are_found():
    for path in DOCS:
        for snippet in snippets(path):
            if snippet.kind != "command":
                ast.parse(snippet.text, snippet.where)  # a signature or listing fenced as python fails here
            else:
                assert re.match(r"(uv run )?anefx |mkdir |cp |rm ", snippet.text), snippet.where
    found = {p.name: [s.kind for s in snippets(p)] for p in DOCS}
    assert set(found["api.md"]) == {"python"} and "command" in found["cli.md"] and "file" in found["cli.md"]


def test_transcript_parsing():
    lines = ["$ anefx compile m.py:model -o net.mlpackage", "[11:32:49] load 6.7s", "m.py:model: x (1, 8) float32",
             "│ legalize │ applied │", "wrote net.mlpackage (inputs: x; outputs: output)", "$ anefx verify n",
             "FAIL: output: PSNR 23.5 dB is below 40 dB (--min-psnr).", "$ anefx report b", "error: bad"]
    first, verify, report = transcript_commands(lines, "x.md", 1)
    assert first.where == "x.md:1" and stable_lines(first.transcript) == lines[2:3] + lines[4:5]
    assert [expected_exit_code(s.transcript) for s in (first, verify, report)] == [0, 1, 2]
    assert shows("FAIL: output: PSNR 21.0 dB is\n  below 40 dB (--min-psnr).", verify.transcript[0])
    assert not shows("FAIL: output: PSNR 21.0 dB is below 60 dB (--min-psnr).", verify.transcript[0])


def test_a_command_runs_this_projects_cli(tmp_path: Path):
    """`uv run anefx` in a transcript runs this project's CLI, here with the error it shows (one process, ~5 s)."""
    shown = ["error: --example 'x': write NAME:SHAPE[:DTYPE], e.g. input_ids:1x128:int64 or x:1x64x32 "
             "(float32 by default)."]
    command = Snippet("command", "uv run anefx compile zoo:bert -e x", "t.md:1", transcript=shown)
    run_command(command, tmp_path, anefx_on_path(tmp_path))


@pytest.mark.parametrize("path", runnable_docs())
def test_doc_runs_as_written(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    namespace = run_doc(path, tmp_path, monkeypatch)
    CHECKS.get(path.name, lambda ns, tmp: None)(namespace, tmp_path)


def check_readme(ns: dict, tmp_path: Path) -> None:
    assert ns["logits"].shape == (1, 32, 1024) and (tmp_path / "llama.mlpackage" / "Manifest.json").exists()
    assert min(report.psnr_db for report in ns["c"].verify().values()) > 40


def check_api(ns: dict, tmp_path: Path) -> None:
    c = ns["c"]  # the custom rule of "Writing a rule" fused the model's hand-written SiLU
    assert next(p for p in c.passes if p.name == "fuse_silu").matches == 1
    assert ops(c.rewritten)["silu"] == 1 and ops(c.rewritten)["sigmoid"] == 0


def check_inspection(ns: dict, tmp_path: Path) -> None:
    c, d = ns["c"], ns["d"]  # one diff stage per compile stage, with its status; both pages written
    assert [(s.stage, s.status) for s in d.stages] == [(p.name, p.status) for p in c.passes]
    assert "Net: what each stage did" in (tmp_path / "net-diff.html").read_text()
    assert "zoo model &#x27;bert&#x27;" in (tmp_path / "bert-diff.html").read_text()


def check_verification(ns: dict, tmp_path: Path) -> None:
    assert ns["verdict"].passed and ns["verdict"].weights == "same"


def check_cli(ns: dict, tmp_path: Path) -> None:
    assert (tmp_path / "net.mlpackage" / "Manifest.json").exists() and (tmp_path / "bert.mlpackage").exists()
    assert ns["out"].past_key_values is not None


def check_partition(ns: dict, tmp_path: Path) -> None:
    """The manifest and the report shown are the ones the code writes; the saved folder runs as the model."""
    import json

    import torch

    shown = {language: "\n".join(lines) for language, _, lines in fenced_blocks(ROOT / "docs" / "partition.md")
             if language in ("json", "text")}
    assert json.loads(shown["json"]) == json.loads((tmp_path / "histnet-parts" / "partition.json").read_text())
    assert shown["text"] == ns["c"].report()
    torch.testing.assert_close(ns["y_again"], ns["y"])
    reference = ns["model"](ns["x"]).detach()
    assert float((ns["y"] - reference).abs().max() / reference.abs().max()) < 1e-2  # fp16 packages


CHECKS = {"README.md": check_readme, "api.md": check_api, "inspection.md": check_inspection,
          "verification.md": check_verification, "cli.md": check_cli, "partition.md": check_partition}
