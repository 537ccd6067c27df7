"""`anefx demo`: compile a small Llama-style model, show what the rules did, write the package."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from anefx import zoo
from anefx.api import compile as anefx_compile
from anefx.report import histogram_table, pass_table


def run_demo(output: Path = Path("anefx-demo.mlpackage"), console: Console | None = None) -> Path:
    console = console or Console()
    console.print("[bold]anefx demo[/]: a 2-layer Llama-style decoder (transformers LlamaConfig, hidden 64, "
                  "4 heads / 2 KV heads, vocab 1024, random weights), input_ids of shape (1, 32)")
    model, args, kwargs = zoo.build("llama")
    with console.status("compiling") as status:
        def progress(stage: str) -> None:
            status.update(f"compiling: {stage}")
            console.log(stage)

        plain = anefx_compile(model, args, kwargs, rules=[], progress=progress)
        compiled = anefx_compile(model, args, kwargs, progress=progress)
    for note in compiled.notes:
        console.print(f"note: {note}")
    console.print(pass_table(compiled))
    from anefx.lower import mil_histogram

    console.print(histogram_table(mil_histogram(plain.mlmodel), mil_histogram(compiled.mlmodel),
                                  "lowered program (non-const MIL ops)"))
    with console.status("saving"):
        path = compiled.save(output)
    console.print(f"wrote [bold]{path}[/] (inputs: {', '.join(compiled.input_names)}; "
                  f"outputs: {', '.join(compiled.output_names)})")
    return path
