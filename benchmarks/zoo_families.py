"""Every model family of the zoo compiled with default settings, against the plain coremltools path.

    uv run python benchmarks/zoo_families.py                 # prints the table of docs/rules.md "Model families"
    uv run python benchmarks/zoo_families.py bert t5_encoder # only these families
    uv run python benchmarks/zoo_families.py --write-docs    # all families, the table in docs/rules.md replaced

Plain = anefx.compile(..., rules=[]) (capture + the graph fixes coremltools needs, nothing else). Rules: the
rules that applied (the rest found nothing to rewrite). Layout ops: MIL transposes + reshapes of the saved
programs; "in/out" counts those that only convert a program input or output to and from (B, C, 1, S). fp16 PSNR:
the saved fp16 package run in anefx's MIL interpreter against the model (c.package_check), worst output. fp32
error: the saved fp32 package run in the interpreter, max |package − model| / max |model|, worst output.
"""

from __future__ import annotations

import inspect
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

warnings.filterwarnings("ignore")

DOCS = Path(__file__).resolve().parent.parent / "docs" / "rules.md"
BEGIN = "<!-- zoo_families table: benchmarks/zoo_families.py --write-docs -->"
END = "<!-- end of zoo_families table -->"
SHORT = {"rmsnorm_to_layernorm": "rms", "linear_to_conv1x1": "conv", "split_head_attention": "heads",
         "sdpa_masked_rows": "masked", "layernorm_channels": "norm", "layout_bc1s": "bc1s"}
HEADER = ["| family | rules applied | layout ops (plain → anefx) | max rank (plain → anefx) | 0 linear | "
          "fp16 PSNR (dB) | fp32 rel. error |", "|---|---|---|---|---|---|---|"]


@dataclass
class Figures:
    layout_ops: int
    boundary: int
    max_rank: int
    linear: int


def figures(compiled, folder: Path) -> Figures:
    from anefx.layout import saved_layout_cost
    from anefx.mil import read_program
    from anefx.mil.summary import ane_summary

    prog = read_program(compiled.save(folder / "m.mlpackage"))
    cost = saved_layout_cost(prog)
    return Figures(cost.layout_ops, cost.boundary, cost.max_rank, ane_summary(prog)["types"]["linear"])


def fp32_error(model, args: tuple, kwargs: dict) -> float:
    """Worst output's max |package − model| / max |model|, the fp32 package run in the MIL interpreter."""
    import torch

    import anefx
    from tests.helpers import tensors

    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        expected = tensors(model(*args, **kwargs, **extra))
    compiled = anefx.compile(model, args, kwargs, precision="fp32", package_check="skip", progress=False)
    actual = tensors(compiled(*args, **kwargs))
    return max(float((a.to(e.dtype) - e).abs().max() / e.abs().max()) for a, e in zip(actual, expected, strict=True))


def row(name: str) -> str:
    import anefx
    from anefx import zoo

    model, args, kwargs = zoo.build(name)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            plain = figures(anefx.compile(model, args, kwargs, rules=[], package_check="skip", progress=False),
                            Path(tmp) / "plain")
            compiled = anefx.compile(model, args, kwargs, progress=False)
            ane = figures(compiled, Path(tmp) / "anefx")
        error = fp32_error(model, args, kwargs)
    except anefx.AnefxError as exc:
        return f"| {name} | fails: {type(exc).__name__} | | | | | |"
    applied = ", ".join(SHORT.get(p.name, p.name) for p in compiled.passes[1:] if p.status == "applied")
    psnr = min(compiled.package_check.psnr_db.values())

    def ops(f: Figures) -> str:
        return f"{f.layout_ops} ({f.boundary} in/out)" if f.boundary else str(f.layout_ops)

    return (f"| {name} | {applied or '—'} | {ops(plain)} → {ops(ane)} | {plain.max_rank} → {ane.max_rank} | "
            f"{'yes' if ane.linear == 0 else f'no ({ane.linear})'} | {psnr:.1f} | {error:.1e} |")


def write_docs(table: str) -> None:
    text = DOCS.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOCS} has no {BEGIN} … {END} block to replace")
    DOCS.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text))


def main(argv: list[str]) -> None:
    from anefx import zoo

    names = [a for a in argv if not a.startswith("--")] or list(zoo.FAMILIES)
    rows = list(HEADER)
    for name in names:
        rows.append(row(name))
        print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))
    if "--write-docs" in argv:
        write_docs("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
