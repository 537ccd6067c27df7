"""`anefx demo`: compile a small Llama-style model, show what the rules did, write the package."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from anefx import zoo
from anefx.api import compile as anefx_compile
from anefx.files import check_package_target, package_path
from anefx.report import histogram_table, pass_table


def run_demo(output: Path = Path("anefx-demo.mlpackage"), console: Console | None = None) -> Path:
    console = console or Console()
    console.print("[bold]anefx demo[/]: a 2-layer Llama-style decoder (transformers LlamaConfig, hidden 64, "
                  "4 heads / 2 KV heads, vocab 1024, random weights), input_ids of shape (1, 32)")
    check_package_target(package_path(output))  # refuse a path in use before compiling, not after
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
    console.print(_layout_line(plain, compiled))
    with console.status("saving"):
        path = compiled.save(output)
    console.print(f"wrote [bold]{path}[/] (inputs: {', '.join(compiled.input_names)}; "
                  f"outputs: {', '.join(compiled.output_names)})")
    return path


def _layout_line(plain, compiled) -> str:
    """Transposes + reshapes, per-head softmaxes and the largest tensor rank, without → with rules."""
    from anefx.lower import mil_operations

    def figures(c):
        ops = [op for op in mil_operations(c.mlmodel) if op.op_type != "const"]
        layout = sum(op.op_type in ("transpose", "reshape") for op in ops)
        softmax = sum(op.op_type == "softmax" for op in ops)
        rank = max((len(o.shape) for op in ops for o in op.outputs if o.shape is not None), default=0)
        return layout, softmax, rank

    (l0, s0, r0), (l1, s1, r1) = figures(plain), figures(compiled)
    return (f"transposes + reshapes: {l0} → {l1}; softmax ops: {s0} → {s1} (fused attention → one per head, "
            f"over the channel axis); largest tensor rank: {r0} → {r1}")
