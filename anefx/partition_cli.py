"""`anefx compile TARGET --partition [--cpu-ops OPS]`: packages for what converts, torch for the rest."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape


def cpu_op_list(text: str | None) -> list[str] | None:
    """'aten.histc, encoder.layer.1' -> ['aten.histc', 'encoder.layer.1']."""
    if text is None:
        return None
    return [entry.strip() for entry in text.split(",") if entry.strip()]


def compile_partitioned_command(console: Console, target: str, examples: list[str] | None, output: Path | None, *,
                                partition: bool, cpu_ops: str | None, rules: str | None, **options: Any) -> None:
    """Load TARGET, compile it partitioned, write the folder (packages, partition.json) and print the report."""
    from anefx.api import compile as anefx_compile
    from anefx.backend import BackendOptions
    from anefx.cli import _describe, _rule_names, staged
    from anefx.files import check_folder_target
    from anefx.partition_manifest import MANIFEST
    from anefx.target import example_inputs, load_target, parse_example

    specs = [parse_example(e) for e in examples or []]
    parsed = BackendOptions.parse({**options, "rules": _rule_names(rules)})
    if output is not None:
        check_folder_target(output, MANIFEST, "a partitioned anefx model")  # refuse before a long compile
    with staged(console, "compiling") as progress:
        progress("load")
        loaded = load_target(target)
        args, kwargs = example_inputs(loaded, specs)
        names = [*inspect.signature(loaded.model.forward).parameters][:len(args)]
        inputs = [*zip(names, args, strict=False), *kwargs.items()]
        console.print(f"[bold]{loaded.description}[/]: " + ", ".join(_describe(k, v) for k, v in inputs))
        compiled = anefx_compile(loaded.model, args, kwargs, progress=progress, partition=partition,
                                 cpu_ops=cpu_op_list(cpu_ops), **parsed.compile_kwargs())
        progress("save")
        path = compiled.save(output or Path(f"{loaded.name}-partitioned"))
    console.print(escape(compiled.report()), highlight=False)
    console.print(f"wrote [bold]{escape(str(path))}[/] ({len(compiled.packages)} package(s), "
                  f"{len(compiled.cpu_steps)} CPU step(s), {MANIFEST}; inputs: {', '.join(compiled.input_names)}; "
                  f"outputs: {', '.join(compiled.output_names)})")


def partition_folder_report(console: Console, folder: Path) -> None:
    """`anefx report FOLDER` for a partitioned model: its steps and why, then each package's readiness tables."""
    from anefx.package_report import package_report, report_tables
    from anefx.partition_manifest import SavedPartition
    from anefx.partitioned import partition_report

    saved = SavedPartition.read(folder)
    console.print(escape(partition_report(saved.data)), highlight=False)
    for step in (s for s in saved.data["steps"] if s["kind"] == "package"):
        console.print(f"\n[bold]{escape(step['package'])}[/]")
        for table in report_tables(package_report(folder / step["package"])):
            console.print(table)
