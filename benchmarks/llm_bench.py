"""compile_llm figures: chunks, ops and bytes per chunk, the two-function package against one function,
compile time, peak memory, and the MIL interpreter's time per decode step.

    uv run python benchmarks/llm_bench.py                      # the 55M Llama, context 512, prefill 64
    uv run python benchmarks/llm_bench.py --size 1b            # + TinyLlama-1.1B's shape
    uv run python benchmarks/llm_bench.py --size 1b --record   # write the table into docs/benchmarks.md

Each model is measured in its own process (peak RSS is per process). Weights are random (the shapes are
what matters); the recorded results in docs/benchmarks.md change only with --record.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = {
    "llama-55m": ("Llama 55M", dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                    num_attention_heads=8, num_key_value_heads=2)),
    "llama-1b": ("TinyLlama-1.1B shape", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                               num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)),
}
RECORDED = ROOT / "docs" / "benchmarks.md"
SCRATCH = ROOT / "benchmarks" / "results" / "llm_bench.md"
BEGIN, END = "<!-- llm_bench: begin (generated) -->", "<!-- llm_bench: end -->"


def measure(name: str, context: int, prefill: int, workdir: Path) -> dict:
    """In this process: build, compile_llm, save; then one decode step timed in the interpreter."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import anefx

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODELS[name][1])).eval()
    started = time.perf_counter()
    lm = anefx.compile_llm(model, context_length=context, prefill_length=prefill, progress=_stage_log(started))
    folder = lm.save(workdir / name)
    compile_s = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    chunks = [{"file": c.file, "layers": c.layers, "bytes": c.bytes, "prefill_ops": c.functions["prefill"].ops,
               "decode_ops": c.functions["decode"].ops, "largest_dim": c.largest_dim} for c in lm.manifest.chunks]
    single = sum(c.decode_only_bytes for c in lm.manifest.chunks)  # each chunk's decode function alone
    runtime = anefx.load_llm(folder, precision="fp16")
    ids = list(np.random.default_rng(0).integers(0, 32000, prefill))
    runtime.reset()
    start = time.perf_counter()
    runtime.next_tokens(ids, 0)
    prefill_s = time.perf_counter() - start
    steps = []
    for i in range(3):
        start = time.perf_counter()
        runtime.next_tokens([ids[i]], prefill + i)
        steps.append(time.perf_counter() - start)
    total = sum(c["bytes"] for c in chunks)
    return {"name": name, "label": MODELS[name][0], "context": context, "prefill": prefill, "chunks": chunks,
            "total_bytes": total, "ratio": total / single if single else None, "compile_s": compile_s,
            "peak_rss": peak, "prefill_call_s": prefill_s, "decode_step_s": min(steps)}


def _stage_log(started: float):
    """Each compile stage on stderr with the time and the peak RSS so far: a failed run's output ends with the
    stage it died in (the parent prints the worker's stderr tail)."""
    def say(stage: str) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{time.perf_counter() - started:8.1f} s  peak {peak:5.1f} GiB  {stage}", file=sys.stderr, flush=True)

    return say


def render(rows: list[dict], command: str) -> str:
    lines = [f"Measured with `{command}` on {platform.machine()} Linux (MIL interpreter, fp16 emulation; weights "
             "random, shapes real).", "",
             "| model | context / prefill | chunks | ops per chunk (prefill / decode) | bytes per chunk | "
             "2 functions ÷ 1 | compile | peak RSS | interpreter: prefill call, decode step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ops = ", ".join(f"{c['prefill_ops']:,} / {c['decode_ops']:,}" for c in r["chunks"])
        sizes = ", ".join(f"{c['bytes'] / 2**20:,.0f} MiB" for c in r["chunks"])
        ratio = f"{r['ratio']:.3f}×" if r["ratio"] else "—"
        lines.append(f"| {r['label']} | {r['context']} / {r['prefill']} | {len(r['chunks'])} | {ops} | {sizes} | "
                     f"{ratio} | {r['compile_s']:.0f} s | {r['peak_rss'] / 2**30:.1f} GiB | "
                     f"{r['prefill_call_s']:.2f} s, {r['decode_step_s']:.2f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["1b"], help="also the TinyLlama-1.1B shape")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--models", help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    parser.add_argument("--record", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        print(json.dumps(measure(options.worker, options.context, options.prefill, options.workdir)))
        return
    rows = []
    names = ["llama-55m", "llama-1b"] if options.size == "1b" else ["llama-55m"]
    if options.models:
        names = [n for n in options.models.split(",") if n in MODELS]
    with tempfile.TemporaryDirectory(prefix="anefx-llm-bench-") as tmp:
        for name in names:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--workdir", tmp, "--context",
                                  str(options.context), "--prefill", str(options.prefill)],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if options.json:
        options.json.write_text(json.dumps(rows, indent=1))
    command = "uv run python benchmarks/llm_bench.py " + shlex.join(a for a in argv if a != "--record")
    block = render(rows, command.strip())
    print(block)
    target = RECORDED if options.record else SCRATCH
    from compile_bench import write_block

    write_block(target, block, BEGIN, END)
    print(f"table written to {target}" + ("" if options.record else " (docs change only with --record)"))


if __name__ == "__main__":
    main()
