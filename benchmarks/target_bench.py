"""One rewritten graph, two Apple targets: Core ML (.mlpackage) against Core AI (.aimodel), side by side.

    uv run python benchmarks/target_bench.py            # DistilBERT-base (S=128) and the 55M Llama (S=64)
    uv run python benchmarks/target_bench.py --quick    # the tiny zoo configs
    uv run python benchmarks/target_bench.py --record   # also write the tables into docs/targets.md

Each (model, target) pair runs in a fresh process: anefx.compile(model, ..., target=T) with the default rules
(each verified on the example; package_check="skip", so both do the same work up to lowering), then save. It
reports the whole compile's and the lowering's seconds, the process's peak RSS and how much the lowering added to
it, and the saved model's op histogram read back from disk (anefx.lower.target.saved_figures). The tables go to
stdout; `--record` replaces the generated block of docs/targets.md (text outside it is kept).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_models  # noqa: E402
from compile_bench import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "targets.md"
BEGIN, END = "<!-- target_bench: begin (generated) -->", "<!-- target_bench: end -->"
MODELS = ("distilbert", "llama")
TARGETS = ("coreml", "coreai")
GIB = 2**30


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure(model_name: str, target: str, quick: bool) -> dict:
    """In this process: build, compile for `target`, save, read the saved model back."""
    import anefx
    from anefx.lower.target import saved_figures

    spec = bench_models.find(model_name, quick)
    model, args, kwargs = bench_models.build(spec)
    stages: list[tuple[str, float, int]] = []
    started = time.perf_counter()
    compiled = anefx.compile(model, args, kwargs, target=target, package_check="skip",
                             progress=lambda stage: stages.append((stage, time.perf_counter(), peak_rss())))
    finished, peak = time.perf_counter(), peak_rss()
    lowering = next((s for s in stages if s[0].startswith("lower")), (None, finished, peak))
    with tempfile.TemporaryDirectory(prefix="anefx-bench-") as folder:
        figures = saved_figures(compiled.save(Path(folder) / model_name))
    return {"model": spec.label, "target": target, "compile_s": finished - started,
            "lower_s": finished - lowering[1], "peak_rss": peak, "lowering_rss": max(0, peak - lowering[2]),
            "figures": figures}


def run(model_name: str, target: str, quick: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", model_name, target, *(["--quick"] if quick else [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        return {"model": model_name, "target": target, "error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


SUMMARY = ("conv", "linear", "matmul", "softmax", "layout_ops", "max_rank", "largest_dim")


def summary(figures: dict, key: str) -> str:
    """One cell: layout ops summed over their kinds, the largest dimension's size."""
    value = figures[key]
    if key == "layout_ops":
        return str(sum(value.values()))
    return str(value["size"] if key == "largest_dim" else value)


def render(rows: list[dict], command: str) -> str:
    lines = [f"Measured with `{command}` (Linux, 2 cores, shared; each pair in a fresh process).", "",
             "| model | target | compile | of which lowering | peak RSS | RSS added by lowering | "
             + " | ".join(SUMMARY) + " |", "|" + "---|" * (6 + len(SUMMARY))]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['target']} | failed: {r['error'][:80]} |")
            continue
        f = r["figures"]
        lines.append(f"| {r['model']} | {r['target']} | {r['compile_s']:.1f} s | {r['lower_s']:.1f} s | "
                     f"{r['peak_rss'] / GIB:.2f} GiB | {r['lowering_rss'] / GIB:.2f} GiB | "
                     + " | ".join(summary(f, k) for k in SUMMARY) + " |")
    for r in rows:
        if "error" not in r:
            ops = ", ".join(f"{op} {n}" for op, n in r["figures"]["ops"].items() if op not in ("const", "constant"))
            lines += ["", f"**{r['model']}, {r['target']}** ({r['figures']['format']}): {ops}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny zoo configs")
    parser.add_argument("--record", action="store_true", help="write the tables into docs/targets.md")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: distilbert, llama, …")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "TARGET"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        print(json.dumps(measure(*options.worker, options.quick)))
        return
    rows = []
    for model_name in options.models.split(","):
        for target in TARGETS:
            rows.append(run(model_name, target, options.quick))
            r = rows[-1]
            print(f"  {model_name:<12}{target:<8}" + (f"failed: {r['error']}" if "error" in r else
                  f"{r['compile_s']:7.1f} s (lower {r['lower_s']:.1f} s) {r['peak_rss'] / GIB:.2f} GiB"),
                  file=sys.stderr, flush=True)
    command = "uv run python benchmarks/target_bench.py" + (" --quick" if options.quick else "")
    block = render(rows, command)
    print(block)
    if options.record:
        write_block(DOC, block, BEGIN, END)
        print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
