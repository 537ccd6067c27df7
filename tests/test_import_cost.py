"""`import anefx` and the CLI's `--help` load no heavy library (torch, coremltools, transformers): the CLI
answers at once. (Timing belongs in benchmarks; this asserts the cause of slowness is absent.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "coremltools", "transformers", "numpy", "networkx")


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('MODULES', ' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("MODULES "))  # after any --help text
    return set(line.split()[1:])


HELP = "import anefx.cli as c\ntry:\n    c.app({argv})\nexcept SystemExit:\n    pass"


@pytest.mark.parametrize("code", ["import anefx", "import anefx.cli", "from anefx import AnefxError, OptionError",
                                  *(HELP.format(argv=[*cmd, "--help"]) for cmd in
                                    ([], ["compile"], ["verify"], ["report"], ["diff"], ["demo"], ["doctor"]))])
def test_no_heavy_library_is_imported(code):
    loaded = _loaded_after(code)
    assert not [m for m in HEAVY if m in loaded]


def test_the_lazy_names_resolve():
    loaded = _loaded_after("import anefx\nanefx.compile\nanefx.load_mlpackage\nanefx.diff\nanefx.Rule")
    assert "torch" in loaded
    done = subprocess.run([sys.executable, "-c", "import anefx, anefx.diff\nassert callable(anefx.diff)\n"
                           "from anefx import *\nprint(CompiledModel.__name__)"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "CompiledModel", done.stderr[-2000:]
