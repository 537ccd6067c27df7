"""anefx against plain coremltools, side by side: compile time, peak memory, and the program produced.

    uv run python benchmarks/compile_bench.py --quick            # tiny configs, < 2 min
    uv run python benchmarks/compile_bench.py                    # base-size configs
    uv run python benchmarks/compile_bench.py --size 1b --record # + a ~1.1B Llama, recorded in the docs

Each (model, path) pair runs in a fresh process, one after another:
- plain: torch.export, run_decompositions({}), the graph fixes coremltools needs (anefx.legalize), then
  ct.convert (fp16, iOS18) and save — what a user of coremltools alone would write;
- anefx: anefx.compile with the default rules (each verified on the example), then save.
The table goes to stdout and to a scratch file (benchmarks/results/compile_bench.md, not tracked by git).
The recorded results in docs/benchmarks.md change only when asked: `--record` writes the table into the
generated block of that file (text outside the block is kept); `--output FILE` writes it into FILE instead.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_models  # noqa: E402
from bench_report import render  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("plain", "anefx")


def run_pair(spec: bench_models.ModelSpec, quick: bool, workdir: Path) -> list[dict]:
    rows = []
    for path in PATHS:
        out = workdir / f"{spec.name}.{path}.json"
        error = (_forked if quick else _spawned)(spec.name, path, quick, workdir, out)
        if out.exists():
            rows.append(json.loads(out.read_text()))
        else:
            rows.append({"model": spec.name, "label": spec.label, "path": path, "error": error[:200]})
        print(_progress(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _spawned(model: str, path: str, quick: bool, workdir: Path, out: Path) -> str:
    """A new interpreter: `python compile_bench.py --worker MODEL PATH ...`."""
    cmd = [sys.executable, __file__, "--worker", model, path, "--workdir", str(workdir),
           "--worker-out", str(out), *(["--quick"] if quick else [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {done.returncode}"


PRELOAD = ["torch", "transformers", "coremltools", "anefx", "anefx.ops", "rewrites", "bench_worker"]
_FORKSERVER = None


def _forked(model: str, path: str, quick: bool, workdir: Path, out: Path) -> str:
    """A process forked from a server that has only imported the libraries (--quick: saves ~6 s of
    imports per measurement; nothing has run in the server, so each child starts as cold as a new one)."""
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(PRELOAD)
    errors = out.with_suffix(".err")
    child = _FORKSERVER.Process(target=_child, args=(model, path, quick, workdir, out, errors))
    child.start()
    child.join()
    return errors.read_text() if errors.exists() else f"exit code {child.exitcode}"


def _child(model: str, path: str, quick: bool, workdir: Path, out: Path, errors: Path) -> None:
    from bench_worker import run_worker

    try:
        run_worker(model, path, quick, workdir, out)
    except BaseException as exc:  # noqa: BLE001 - reported in the table's row
        errors.write_text(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        raise


def _progress(row: dict) -> str:
    if "error" in row:
        return f"  {row['label']:<26}{row['path']:<6} failed: {row['error']}"
    return (f"  {row['label']:<26}{row['path']:<6}{row['seconds']:8.1f} s{row['peak_rss'] / 2**30:8.2f} GiB"
            f"  PSNR {row.get('psnr_db')}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny zoo configs (CI-sized)")
    parser.add_argument("--size", choices=["1b"], help="also run the ~1.1B Llama-style decoder")
    parser.add_argument("--models", help="comma-separated subset, e.g. distilbert,llama")
    parser.add_argument("--output", type=Path, default=None,
                        help="markdown file whose generated block receives the table (default: a scratch file)")
    parser.add_argument("--record", action="store_true",
                        help=f"write the table into the recorded results, {RECORDED.relative_to(ROOT)}")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def selected(options: argparse.Namespace) -> list[bench_models.ModelSpec]:
    specs = bench_models.model_set(options.quick, options.size)
    if not options.models:
        return specs
    wanted = options.models.split(",")
    known = {s.name for s in specs}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        sys.exit(f"unknown model(s) {', '.join(unknown)}; this set has {', '.join(sorted(known))}")
    return [s for s in specs if s.name in wanted]


def command_line(argv: list[str]) -> str:
    return "uv run python benchmarks/compile_bench.py " + shlex.join(a for a in argv if a != "--record")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    options = parse(argv)
    if options.worker:
        from bench_worker import run_worker

        run_worker(*options.worker, options.quick, options.workdir, options.worker_out)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="anefx-bench-") as tmp:
        for spec in selected(options):
            rows += run_pair(spec, options.quick, Path(tmp))
    if options.json:
        options.json.write_text(json.dumps(rows, indent=1))
    block = render(rows, command_line(argv), quick=options.quick)
    print(block)
    target = destination(options)
    write_block(target, block)
    print(f"table written to {target}" + ("" if target == RECORDED else
                                          " (the recorded results change only with --record)"))


def destination(options: argparse.Namespace) -> Path:
    """Where the table goes: --output, the recorded results with --record, else a scratch file."""
    return options.output or (RECORDED if options.record else SCRATCH)


RECORDED = ROOT / "docs" / "benchmarks.md"
SCRATCH = ROOT / "benchmarks" / "results" / "compile_bench.md"
BEGIN, END = "<!-- compile_bench: begin (generated) -->", "<!-- compile_bench: end -->"


def write_block(path: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the generated block of `path` between the `begin`/`end` markers (or write a file holding only it)."""
    text = path.read_text() if path.exists() else ""
    generated = f"{begin}\n{block.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + generated + rest.split(end, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + generated + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
