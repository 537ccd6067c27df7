"""Every model family of the zoo compiled with default settings, against the plain coremltools path.

    uv run python benchmarks/zoo_families.py              # prints the table recorded in docs/rules.md
    uv run python benchmarks/zoo_families.py bert t5_encoder   # only these families

Plain = anefx.compile(..., rules=[]) (capture + the graph fixes coremltools needs, nothing else).
Rules: the rules that applied (the rest found nothing to rewrite). fp16 PSNR: the saved fp16 package run
in anefx's MIL interpreter against the model (c.package_check), worst output.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

warnings.filterwarnings("ignore")

SHORT = {"rmsnorm_to_layernorm": "rms", "linear_to_conv1x1": "conv", "split_head_attention": "heads",
         "sdpa_masked_rows": "masked", "layernorm_channels": "norm", "layout_bc1s": "bc1s"}


@dataclass
class Figures:
    layout_ops: int
    max_rank: int
    linear: int


def figures(compiled, folder: Path) -> Figures:
    from anefx.mil import read_program
    from anefx.mil.summary import ane_summary

    s = ane_summary(read_program(compiled.save(folder / "m.mlpackage")))
    return Figures(s["layout_ops"], s["max_rank"], s["types"]["linear"])


def row(name: str) -> str:
    import anefx
    from anefx import zoo

    model, args, kwargs = zoo.build(name)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            plain = figures(anefx.compile(model, args, kwargs, rules=[], package_check="skip"), Path(tmp))
            compiled = anefx.compile(model, args, kwargs)
            ane = figures(compiled, Path(tmp))
    except anefx.AnefxError as exc:
        return f"| {name} | fails: {type(exc).__name__} | | | | |"
    applied = ", ".join(SHORT.get(p.name, p.name) for p in compiled.passes[1:] if p.status == "applied")
    psnr = min(compiled.package_check.psnr_db.values())
    return (f"| {name} | {applied or '—'} | {plain.layout_ops} → {ane.layout_ops} | {plain.max_rank} → "
            f"{ane.max_rank} | {'yes' if ane.linear == 0 else f'no ({ane.linear})'} | {psnr:.1f} |")


def main(names: list[str]) -> None:
    from anefx import zoo

    rows = ["| family | rules applied | layout ops (plain → anefx) | max rank (plain → anefx) | 0 linear | "
            "fp16 PSNR (dB) |", "|---|---|---|---|---|---|"]
    for name in names or list(zoo.FAMILIES):
        rows.append(row(name))
        print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
