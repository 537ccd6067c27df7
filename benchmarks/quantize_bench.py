"""The quantization ladder (fp16 → int8 → lut6 → lut4) on the 55M Llama and BERT-base: package bytes and fidelity.

    uv run python benchmarks/quantize_bench.py            # both models, 128 tokens
    uv run python benchmarks/quantize_bench.py --record   # write the table into docs/benchmarks.md

Each model is measured in its own process by `anefx.quantize_report`: compiled once (fp16), each rung quantized
and saved, run in the MIL interpreter with fp16 emulated and compared with the fp32 model (PSNR of every output;
the Llama also: top-1 agreement with the fp16 package and perplexity of a fixed 128-token stream, teacher-forced).
Weights are random (HF configs, nothing downloaded); the recorded results change only with --record.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = {"llama-55m": "Llama 55M (stateless, 128 tokens)", "bert-base": "BERT-base (S=128)"}
TARGETS = {"int8": 0.55, "lut4": 0.32}  # package bytes ÷ the fp16 package's
RECORDED = ROOT / "docs" / "benchmarks.md"
SCRATCH = ROOT / "benchmarks" / "results" / "quantize_bench.md"
BEGIN, END = "<!-- quantize_bench: begin (generated) -->", "<!-- quantize_bench: end -->"


def build(name: str, tokens: int):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if name == "llama-55m":
        from llm_bench import MODELS as LLMS

        config = tf.LlamaConfig(**LLMS["llama-55m"][1])
        model = tf.LlamaForCausalLM(config)
    else:
        config = tf.BertConfig()  # hidden 768, 12 layers, 12 heads
        model = tf.BertModel(config)
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    return model.eval(), (ids,)


def measure(name: str, tokens: int, group_size: int) -> dict:
    import anefx

    model, args = build(name, tokens)
    started = time.perf_counter()
    report = anefx.quantize_report(model, args, group_size=group_size,
                                   progress=lambda s: print(f"  {name}: {s}", file=sys.stderr, flush=True))
    rows = [{"mode": r.mode, "bytes": r.bytes, "ratio": r.size_ratio, "psnr": r.psnr_db, "top1": r.top1_agreement,
             "perplexity": r.perplexity} for r in report.rows]
    return {"name": name, "label": MODELS[name], "rows": rows, "seconds": time.perf_counter() - started}


def render(results: list[dict], command: str, group_size: int) -> str:
    lines = [f"Measured with `{command}` on {platform.machine()} Linux: each package run in the MIL interpreter "
             f"(fp16 emulated) against the fp32 model; lut modes: k-means, one table per {group_size} output "
             "channels; weights random. PSNR is the lowest over the outputs (BERT: last_hidden_state, pooler_output); "
             "top-1 is agreement with the fp16 package; perplexity of a fixed 128-token stream (random weights: "
             "about the vocabulary size, so compare rungs, not the value).", "",
             "| model | mode | package | × fp16 | PSNR (min) | top-1 vs fp16 | perplexity |",
             "|---|---|---|---|---|---|---|"]
    for result in results:
        for r in result["rows"]:
            psnr = min(r["psnr"].values())
            top1 = f"{r['top1']:.1%}" if r["top1"] is not None else "—"
            ppl = f"{r['perplexity']:,.0f}" if r["perplexity"] is not None else "—"
            lines.append(f"| {result['label']} | {r['mode']} | {r['bytes'] / 2**20:,.1f} MiB | {r['ratio']:.3f}× | "
                         f"{psnr:.1f} dB | {top1} | {ppl} |")
    lines += ["", "Targets: " + "; ".join(_verdicts(results))]
    return "\n".join(lines) + "\n"


def _verdicts(results: list[dict]) -> list[str]:
    out = []
    for result in results:
        ratios = {r["mode"]: r["ratio"] for r in result["rows"]}
        for mode, limit in TARGETS.items():
            if mode in ratios:
                mark = "met" if ratios[mode] <= limit else "missed"
                out.append(f"{result['label']} {mode} {ratios[mode]:.3f}× (≤ {limit}×: {mark})")
        if result["name"] == "bert-base":
            psnr = min(next(r for r in result["rows"] if r["mode"] == "int8")["psnr"].values())
            out.append(f"BERT-base int8 PSNR {psnr:.1f} dB (≥ 40 dB: {'met' if psnr >= 40 else 'missed'})")
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    parser.add_argument("--record", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        print(json.dumps(measure(options.worker, options.tokens, options.group_size)))
        return
    results = []
    for name in [n for n in options.models.split(",") if n in MODELS]:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--worker", name, "--tokens", str(options.tokens),
                              "--group-size", str(options.group_size)], stdout=subprocess.PIPE, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{name} failed (exit {out.returncode})")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if options.json:
        options.json.write_text(json.dumps(results, indent=1))
    command = "uv run python benchmarks/quantize_bench.py " + shlex.join(a for a in argv if a != "--record")
    block = render(results, command.strip(), options.group_size)
    print(block)
    target = RECORDED if options.record else SCRATCH
    from compile_bench import write_block

    write_block(target, block, BEGIN, END)
    print(f"table written to {target}" + ("" if options.record else " (docs change only with --record)"))


if __name__ == "__main__":
    main()
