"""Bad inputs and faults around files: saving packages and pages, `anefx verify`, `anefx report`, loading
targets, and how the CLI reports every failure (one `error:` line, exit code 2; verify's FAIL is exit 1)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import anefx
from anefx import zoo
from anefx.cli import app, friendly_errors
from anefx.files import FileWriteError, _replace, _SignalGuard, atomic_package_write, atomic_write_text
from anefx.mil.blob import BlobFile
from anefx.mlpackage import (
    INPUTS_KEY,
    OUTPUTS_KEY,
    PRECISION_KEY,
    VERSION_KEY,
    WEIGHTS_KEY,
    module_weights_sha256,
    package_metadata,
)
from anefx.package_report import PackageError, package_report
from anefx.target import TargetError, load_target
from anefx.verify import Criteria, check_output

NET = textwrap.dedent("""
    import sys

    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))


    def make(seed=0):
        torch.manual_seed(seed)
        return Net().eval(), (torch.randn(1, 4, 16),)


    def other():
        return make(seed=1)


    def broken():
        raise ValueError("no weights configured")


    def leaves():
        sys.exit(3)
""")
WEIGHT_FILE = Path("Data/com.apple.CoreML/weights/weight.bin")
runner = CliRunner()


def tree_digest(root: Path) -> str:
    """One hash over every file's relative path and bytes: equal digests mean an untouched package."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def one_error_line(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """(net.py, its model, a package compiled from it, the CompiledModel)."""
    folder = tmp_path_factory.mktemp("net")
    source = folder / "net.py"
    source.write_text(NET)
    scope: dict = {}
    exec(compile(NET, str(source), "exec"), scope)
    model, args = scope["make"]()
    compiled = anefx.compile(model, args)
    return source, model, compiled.save(folder / "net.mlpackage"), compiled


@pytest.fixture
def package(net, tmp_path) -> Path:
    """A fresh copy of the package, free to damage."""
    return Path(shutil.copytree(net[2], tmp_path / "copy.mlpackage"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    model, _, _ = zoo.build("bert")
    path = tmp_path_factory.mktemp("hf") / "tiny-bert"
    model.save_pretrained(path)
    return path


def hf_variant(bert_dir: Path, tmp_path: Path, change) -> str:
    path = Path(shutil.copytree(bert_dir, tmp_path / "variant"))
    change(path)
    return str(path)


def edit_config(**values):
    def change(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **values}))
    return change


# -- saving ---------------------------------------------------------------------------------------------

def test_save_records_the_weights_fingerprint_and_replaces_a_package(net, tmp_path):
    _, model, first, compiled = net
    target = tmp_path / "m.mlpackage"
    compiled.save(target)
    (target / "stale.txt").write_text("from the previous package")
    assert compiled.save(tmp_path / "m") == target  # the suffix is added; the old package is replaced
    assert not (target / "stale.txt").exists() and tree_digest(target) == tree_digest(first)
    meta = package_metadata(target)
    assert meta[WEIGHTS_KEY] == module_weights_sha256(model) and meta[VERSION_KEY] == anefx.__version__
    assert (meta[INPUTS_KEY], meta[OUTPUTS_KEY], meta[PRECISION_KEY]) == ("x", "output", "fp16")
    assert [p.name for p in tmp_path.iterdir()] == ["m.mlpackage"]  # no temporary sibling left


def test_save_refuses_a_directory_that_is_not_a_package(net, tmp_path):
    mine = tmp_path / "out.mlpackage"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileWriteError, match="exists and is a directory, not an .mlpackage.*Choose another"):
        net[3].save(mine)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(tmp_path.iterdir())) == 1


def test_save_refuses_a_file_at_the_path(net, tmp_path):
    mine = tmp_path / "out.mlpackage"
    mine.write_text("a file")
    with pytest.raises(FileWriteError, match="exists and is a file.*Choose another output path"):
        net[3].save(tmp_path / "out")
    assert mine.read_text() == "a file"


def test_disk_full_while_writing_keeps_the_old_package(package):
    before = tree_digest(package)

    def write_half_then_fail(staged: Path) -> None:
        shutil.copytree(package, staged)
        (staged / WEIGHT_FILE).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staged / WEIGHT_FILE))

    with pytest.raises(FileWriteError, match="No space left on device. To fix: free some disk space"):
        atomic_package_write(package, write_half_then_fail)
    assert tree_digest(package) == before and [p.name for p in package.parent.iterdir()] == [package.name]


def test_a_crash_while_writing_keeps_the_old_package(package):
    before = tree_digest(package)

    def crash(staged: Path) -> None:
        shutil.copytree(package, staged)
        raise RuntimeError("converter bug")

    with pytest.raises(RuntimeError, match="converter bug"):
        atomic_package_write(package, crash)
    assert tree_digest(package) == before and len(list(package.parent.iterdir())) == 1


def test_unwritable_directory_is_a_file_write_error(package):
    with pytest.raises(FileWriteError, match="(?i)cannot write /sys/anefx-test.mlpackage: .*choose a directory "
                                             "you can write to"):
        atomic_package_write("/sys/anefx-test.mlpackage", lambda staged: shutil.copytree(package, staged))
    (package.parent / "x.txt").write_text("a file")
    with pytest.raises(FileWriteError, match=f"{package.parent / 'x.txt'} is a file, not a directory"):
        atomic_write_text(package.parent / "x.txt" / "page.html", "<html>")
    assert (package.parent / "x.txt").read_text() == "a file"


@pytest.fixture(autouse=True)
def _default_sigint():
    """Signal tests expect Python's own SIGINT handler (KeyboardInterrupt); an earlier test in the same
    process (e.g. one that compiled through torch.compile) may have installed another."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_while_writing_restores_the_old_package_then_interrupts(package):
    before = tree_digest(package)

    def interrupted(staged: Path) -> None:
        shutil.copytree(package, staged)
        (staged / WEIGHT_FILE).write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the signal arrives here
        raise AssertionError("the write was not interrupted")

    started, handler = time.monotonic(), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        atomic_package_write(package, interrupted)
    assert time.monotonic() - started < 4
    assert tree_digest(package) == before and len(list(package.parent.iterdir())) == 1
    assert signal.getsignal(signal.SIGINT) is handler  # the previous handler is back


def test_a_signal_during_the_rename_waits_for_it():
    finished = []
    with pytest.raises(KeyboardInterrupt), _SignalGuard() as guard, guard.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        finished.append(True)
    assert finished == [True]


SLOW_SAVE = textwrap.dedent("""
    import shutil, sys, time
    from pathlib import Path

    import torch
    from anefx.compiled import CompiledModel

    class SlowMLModel:  # stands in for coremltools' model: writes the package, then takes its time
        def save(self, path):
            shutil.copytree(sys.argv[1], path)
            Path(sys.argv[3]).touch()
            time.sleep(120)

    ep = torch.export.export(torch.nn.Linear(4, 4), (torch.randn(1, 4),))
    CompiledModel(ep, ep, SlowMLModel(), [], [], ["x"], ["output"], {"precision": "fp16"}).save(sys.argv[2])
""")


def test_sigterm_during_save_keeps_the_old_package_and_no_temporary(package, tmp_path):
    source = Path(shutil.copytree(package, tmp_path / "source" / "new.mlpackage"))
    (source / WEIGHT_FILE).write_bytes(b"new weights")
    target = Path(shutil.copytree(package, tmp_path / "out" / "model.mlpackage"))
    before, marker = tree_digest(target), tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(source), str(target), str(marker)],
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), child.stderr.read() if child.poll() is not None else "timed out"
        assert len(list(target.parent.iterdir())) == 2  # the package and the temporary sibling being written
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == -signal.SIGTERM
    finally:
        child.kill()
    assert tree_digest(target) == before and [p.name for p in target.parent.iterdir()] == ["model.mlpackage"]


def test_concurrent_saves_to_one_path_last_writer_wins(package, tmp_path):
    sources = []
    for i in range(2):
        source = Path(shutil.copytree(package, tmp_path / f"s{i}" / "p.mlpackage"))
        (source / "writer.txt").write_text(str(i))
        sources.append(source)
    target, errors = tmp_path / "out" / "p.mlpackage", []

    def save(i: int) -> None:
        try:
            for _ in range(5):
                atomic_package_write(target, lambda staged: shutil.copytree(sources[i % 2], staged))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert tree_digest(target) in {tree_digest(s) for s in sources}
    assert [p.name for p in target.parent.iterdir()] == ["p.mlpackage"]


def test_replacing_by_two_renames_where_no_atomic_swap_exists(package, tmp_path):
    staged = Path(shutil.copytree(package, tmp_path / "tmp" / "new.mlpackage"))
    (staged / "writer.txt").write_text("new")
    expected = tree_digest(staged)
    _replace(staged, package, tmp_path / "tmp", exchange=False)
    assert tree_digest(package) == expected and not staged.exists()
    assert (tmp_path / "tmp" / "previous-0" / "Manifest.json").is_file()  # the old one, removed with the temp


def test_html_page_is_written_atomically(tmp_path):
    page = tmp_path / "diff.html"
    page.write_text("old page")
    assert atomic_write_text(page, "<html>new</html>").read_text() == "<html>new</html>"
    assert [p.name for p in tmp_path.iterdir()] == ["diff.html"]
    with pytest.raises(FileWriteError, match="is a directory; pass the path of a file"):
        atomic_write_text(tmp_path, "<html>")


# -- verify ---------------------------------------------------------------------------------------------

def test_verify_passes_against_the_model_it_was_built_from(net):
    source, _, path, _ = net
    result = runner.invoke(app, ["verify", str(path), "-m", f"{source}:make"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "fingerprint matches" in result.output


def test_verify_against_other_weights_fails_and_says_so(net):
    source, _, path, _ = net
    result = runner.invoke(app, ["verify", str(path), "-m", f"{source}:other"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "FAIL" in text and "the package was built from other weights than this model" in text
    assert "PSNR" in text and "below 40 dB" in text  # the numbers are still printed


def test_verify_with_corrupted_weights_fails_on_non_finite_outputs(net, package):
    blob, meta = BlobFile(package / WEIGHT_FILE), package_metadata(package)
    spans = [blob.entry(offset) for offset in range(64, blob.data.size, 64)
             if int(blob.data[offset:offset + 4].view("<u4")[0]) == 0xDEADBEEF]
    del blob
    data = bytearray((package / WEIGHT_FILE).read_bytes())
    for start, size in spans:
        data[start:start + size] = b"\xff" * size  # 0xFFFF is a NaN in fp16
    (package / WEIGHT_FILE).write_bytes(bytes(data))
    assert package_metadata(package) == meta  # the fingerprint cannot see it: the outputs must
    result = runner.invoke(app, ["verify", str(package), "-m", f"{net[0]}:make"])
    assert result.exit_code == 1, result.output
    assert "values are not finite (nan or inf)" in " ".join(result.output.split())


def test_verify_thresholds_from_the_command_line(net):
    source, _, path, _ = net
    strict = runner.invoke(app, ["verify", str(path), "-m", f"{source}:make", "--min-psnr", "200"])
    assert strict.exit_code == 1 and "is below 200 dB (--min-psnr)" in " ".join(strict.output.split())
    tight = runner.invoke(app, ["verify", str(path), "-m", f"{source}:make", "--atol", "1e-9", "--rtol", "0"])
    text = " ".join(tight.output.split())
    assert tight.exit_code == 1 and "values are outside atol + rtol·|ref| (atol=1e-09, rtol=0)" in text
    loose = runner.invoke(app, ["verify", str(path), "-m", f"{source}:make", "--atol", "0.05", "--rtol", "0.05"])
    assert loose.exit_code == 0 and "within atol=0.05" in " ".join(loose.output.split()), loose.output


def test_elementwise_tolerance_is_not_normalised_by_the_largest_value():
    reference = torch.tensor([1000.0, 0.001], dtype=torch.float64)
    out = check_output("y", np.array([1000.5, 0.002]), reference, Criteria(rtol=1e-3))
    assert out.error.max_rel < 1e-3  # relative to max |ref| it would pass
    assert out.outside == 1 and out.worst == (0.002, 0.001)  # elementwise, the small value is 100% off
    assert check_output("y", np.array([np.nan, 0.001]), reference, Criteria(atol=1.0)).outside == 1


def test_verify_a_package_without_fingerprint_is_judged_on_its_numbers(net, tmp_path):
    source, _, _, compiled = net
    plain = tmp_path / "plain.mlpackage"
    compiled.mlmodel.save(str(plain))  # coremltools directly: no anefx metadata
    result = runner.invoke(app, ["verify", str(plain), "-m", f"{source}:make"])
    assert result.exit_code == 0, result.output
    assert "not checked — the package records no weights fingerprint" in " ".join(result.output.split())


# -- report ---------------------------------------------------------------------------------------------

def test_report_names_a_missing_weight_file(package):
    (package / WEIGHT_FILE).unlink()
    one_error_line(runner.invoke(app, ["report", str(package)]), "weight.bin is missing", "save it again")


def test_report_names_a_short_weight_file(package):
    weights = package / WEIGHT_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    one_error_line(runner.invoke(app, ["report", str(package)]), "weight.bin has", "truncated",
                   "save the .mlpackage again")
    weights.write_bytes(b"")
    with pytest.raises(PackageError, match="weight.bin is empty"):
        package_report(package)


def test_report_lists_the_checked_weight_files(net):
    result = runner.invoke(app, ["report", str(net[2])])
    assert result.exit_code == 0, result.output
    assert "weight.bin" in result.output and "every blob the program reads is present" in result.output


# -- loading targets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (lambda p: (p / "config.json").write_text("{not json"), r"config.json is not valid JSON \(.*line 1.*fix it"),
    (edit_config(architectures=["NoSuchModel"]), "architecture 'NoSuchModel' is not a model class.*fix "
                                                 "`architectures`"),
    (edit_config(intermediate_size=96), r"the weights do not fit config.json: .*dense.* is \(128,\) in the "
                                        r"checkpoint but \(96,\) in the model.*fix config.json"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]),
     "truncated or corrupt: write the model again with save_pretrained"),
    (edit_config(num_hidden_layers=3), r"16 weights of BertModel are not in the checkpoint and would be random "
                                       r"\(encoder.layer.2.*Write the complete model"),
])
def test_bad_hf_directories_are_target_errors(bert_dir, tmp_path, change, message):
    with pytest.raises(TargetError, match=message) as caught:
        load_target(hf_variant(bert_dir, tmp_path, change))
    assert "\n" not in str(caught.value)


def test_hf_weights_for_one_of_two_layers_are_refused(bert_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    def drop_layer(path: Path) -> None:
        weights = load_file(path / "model.safetensors")
        save_file({k: v for k, v in weights.items() if ".layer.1." not in k}, path / "model.safetensors",
                  metadata={"format": "pt"})

    target = hf_variant(bert_dir, tmp_path, drop_layer)
    result = runner.invoke(app, ["compile", target, "-o", str(tmp_path / "x.mlpackage")])
    one_error_line(result, "encoder.layer.1.", "would be random", "Write the complete model")
    assert not (tmp_path / "x.mlpackage").exists()


@pytest.mark.parametrize("source, attr, message", [
    ("x = 1 / 0\n", "model", r"importing .*bad.py failed: ZeroDivisionError: division by zero at bad.py:1: "
                             r"`x = 1 / 0`. Fix that error in bad.py"),
    ("import sys\nsys.exit(2)\n", "model", r"importing .*bad.py failed: it called sys.exit\(2\)"),
    (NET, "nope", "has no 'nope'; modules and factories in it: .*make"),
    (NET, "broken", r"calling .*:broken\(\) failed: ValueError: no weights configured at bad.py:\d+.*Fix the "
                    "factory"),
    (NET, "leaves", r"calling .*:leaves\(\) failed: it called sys.exit\(3\). Fix the factory"),
])
def test_bad_file_targets_are_target_errors(tmp_path, source, attr, message):
    (tmp_path / "bad.py").write_text(source)
    with pytest.raises(TargetError, match=message):
        load_target(f"{tmp_path / 'bad.py'}:{attr}")


# -- the command line -----------------------------------------------------------------------------------

def test_cli_refuses_output_paths_before_compiling(net, tmp_path):
    source = net[0]
    (tmp_path / "f.mlpackage").write_text("mine")
    (tmp_path / "d.mlpackage").mkdir()
    started = time.monotonic()
    one_error_line(runner.invoke(app, ["compile", f"{source}:make", "-o", str(tmp_path / "f")]),
                   "exists and is a file, not an .mlpackage", "Choose another output path")
    one_error_line(runner.invoke(app, ["compile", f"{source}:make", "-o", str(tmp_path / "f.mlpackage" / "x")]),
                   "is a file, not a directory")
    one_error_line(runner.invoke(app, ["diff", f"{source}:make", "--html", str(tmp_path / "d.mlpackage")]),
                   "is a directory; pass the path of a file")
    one_error_line(runner.invoke(app, ["demo", "-o", str(tmp_path / "d.mlpackage")]),
                   "exists and is a directory, not an .mlpackage")
    assert time.monotonic() - started < 10  # refused up front, nothing was compiled
    assert (tmp_path / "f.mlpackage").read_text() == "mine"


def test_cli_reports_unexpected_and_file_system_errors_in_one_line(monkeypatch):
    probe = typer.Typer()

    @probe.command()
    @friendly_errors
    def run(kind: str) -> None:
        if kind == "disk":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "big.mlpackage")
        raise KeyError("surprise")

    one_error_line(runner.invoke(probe, ["disk"]), "big.mlpackage: No space left on device",
                   "free some disk space")
    one_error_line(runner.invoke(probe, ["bug"]), "error: unexpected KeyError: 'surprise'",
                   "please report it", "ANEFX_DEBUG=1")
    monkeypatch.setenv("ANEFX_DEBUG", "1")  # read at call time: developers get the exception itself
    assert isinstance(runner.invoke(probe, ["bug"]).exception, KeyError)


def test_verify_usage_errors_are_exit_2(net, tmp_path):
    one_error_line(runner.invoke(app, ["verify", str(tmp_path / "none.mlpackage"), "-m", "zoo:bert"]),
                   "does not exist; pass the path of a saved .mlpackage")
    one_error_line(runner.invoke(app, ["verify", str(net[2]), "-m", f"{net[0]}:make", "--precision", "fp8"]),
                   "precision='fp8' is not one of")
