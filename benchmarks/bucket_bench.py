"""Shape buckets on DistilBERT-base: package bytes of one bucket against three, and what each bucket costs.

    uv run python benchmarks/bucket_bench.py            # sequence lengths 64, 128, 256
    uv run python benchmarks/bucket_bench.py --record   # write the table into docs/benchmarks.md

The model is built from the HF DistilBERT-base config with random weights (nothing downloaded) and compiled
once with `buckets=` (fp16, default rules, each bucket verified). The one-bucket package is the example's
function saved alone — the program a plain `anefx.compile` of the example writes. Sizes are read from disk;
compile seconds per bucket come from the progress stages. The recorded results change only with --record.
"""

from __future__ import annotations

import argparse
import platform
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

RECORDED = ROOT / "docs" / "benchmarks.md"
SCRATCH = ROOT / "benchmarks" / "results" / "bucket_bench.md"
BEGIN, END = "<!-- bucket_bench: begin (generated) -->", "<!-- bucket_bench: end -->"
WEIGHTS = Path("Data/com.apple.CoreML/weights/weight.bin")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(lengths: list[int]) -> dict:
    import torch
    import transformers as tf

    import anefx
    from anefx.mlpackage import program_ops

    torch.manual_seed(0)
    model = tf.DistilBertModel(tf.DistilBertConfig()).eval()
    examples = [(torch.randint(0, model.config.vocab_size, (1, s)),) for s in lengths]
    starts: dict[str, float] = {}

    def stage(name: str) -> None:
        starts.setdefault(name.split(":")[0], time.perf_counter())

    began = time.perf_counter()
    c = anefx.compile(model, examples[0], buckets=examples[1:], progress=stage)
    total = time.perf_counter() - began
    marks = [starts[f"bucket {i + 1}/{len(lengths)}"] for i in range(len(lengths))] + [time.perf_counter()]
    with tempfile.TemporaryDirectory() as folder:
        one, three = Path(folder) / "one.mlpackage", c.save(Path(folder) / "buckets")
        c.mlmodel.save(str(one))
        rows = [{"function": name, "ops": sum(1 for r in program_ops(three, name) if r.type != "const"),
                 "seconds": marks[i + 1] - marks[i], "psnr": min(m.package_check.psnr_db.values())}
                for i, (name, m) in enumerate(c.buckets.items())]
        sizes = {"one": (folder_bytes(one), (one / WEIGHTS).stat().st_size),
                 "all": (folder_bytes(three), (three / WEIGHTS).stat().st_size)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"rows": rows, "sizes": sizes, "total": total, "peak_mib": peak}


def table(result: dict, lengths: list[int], command: str) -> str:
    (one_pkg, one_w), (all_pkg, all_w) = result["sizes"]["one"], result["sizes"]["all"]
    lines = [f"`{command}` — DistilBERT-base (66M parameters, random weights), fp16, buckets "
             f"{', '.join(f'1x{s}' for s in lengths)}; {platform.system()} {platform.machine()}, "
             f"peak RSS {result['peak_mib']:,.0f} MiB, {result['total']:.0f} s in all.", "",
             "| package | functions | package bytes | weights (weight.bin) | × one bucket |", "|---|---|---|---|---|",
             f"| the example's function alone | 1 | {one_pkg:,} | {one_w:,} | 1.000 |",
             f"| with buckets | {len(lengths)} | {all_pkg:,} | {all_w:,} | {all_w / one_w:.3f} |", "",
             "| function | non-const ops | compile s (capture, verified rules, lowering) | package check PSNR (fp16) |",
             "|---|---|---|---|"]
    lines += [f"| {r['function']} | {r['ops']} | {r['seconds']:.0f} | {r['psnr']:.1f} dB |" for r in result["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="64,128,256", help="comma-separated sequence lengths, the first is "
                        "the example")
    parser.add_argument("--record", action="store_true", help="write the table into docs/benchmarks.md")
    options = parser.parse_args(argv)
    lengths = [int(s) for s in options.lengths.split(",")]
    command = "uv run python benchmarks/bucket_bench.py " + shlex.join(a for a in argv if a != "--record")
    block = table(measure(lengths), lengths, command.strip())
    from compile_bench import write_block

    target = RECORDED if options.record else SCRATCH
    write_block(target, block, BEGIN, END)
    print(block)
    print(f"table written to {target}" + ("" if options.record else " (docs change only with --record)"))


if __name__ == "__main__":
    main()
