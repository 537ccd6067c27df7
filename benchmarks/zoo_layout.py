"""The layout figures of every zoo model, plain coremltools path vs anefx, as a markdown table.

    uv run python benchmarks/zoo_layout.py            # prints the table recorded in docs/rules.md

Plain = anefx.compile(..., rules=[]) (capture + the graph fixes coremltools needs, nothing else).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def figures(compiled, folder: Path) -> dict:
    from anefx.mil import read_program
    from anefx.mil.summary import ane_summary

    s = ane_summary(read_program(compiled.save(folder / "m.mlpackage")))
    return {"layout": s["layout_ops"], "softmax": sum(s["softmax_shapes"].values()),
            "softmax_shape": ", ".join(str(k) for k in s["softmax_shapes"]) or "fused SDPA",
            "rank": s["max_rank"], "largest": s["largest_dim"], "linear": s["types"]["linear"],
            "conv": s["types"]["conv"]}


def main() -> None:
    import anefx
    from anefx import zoo

    rows = ["| model | layout ops (plain → anefx) | softmax (plain → anefx) | anefx softmax shape | "
            "max rank (plain → anefx) | largest dim | linear → conv |",
            "|---|---|---|---|---|---|---|"]
    for name in zoo.MODELS:
        model, args, kwargs = zoo.build(name)
        with tempfile.TemporaryDirectory() as tmp:
            plain = figures(anefx.compile(model, args, kwargs, rules=[]), Path(tmp))
            ane = figures(anefx.compile(model, args, kwargs), Path(tmp))
        rows.append(f"| {name} | {plain['layout']} → {ane['layout']} | {plain['softmax']} → {ane['softmax']} | "
                    f"{ane['softmax_shape']} | {plain['rank']} → {ane['rank']} | {ane['largest']} | "
                    f"{plain['linear']} → {ane['conv']} |")
        print(rows[-1], file=sys.stderr)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
