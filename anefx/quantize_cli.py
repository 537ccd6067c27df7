"""The command line's side of the quantization ladder: `anefx quantize-report MODEL [--plot out.png]`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from anefx.errors import OptionError
from anefx.quantize import LADDER


def quantize_report_command(console: Any, staged: Callable, target: str, examples: list[str] | None,
                            plot: Path | None, modes: str | None, group_size: int, deployment_target: str) -> None:
    """Load TARGET like `anefx compile`, measure the ladder, print the table (and write the plot)."""
    from anefx.quantize_report import quantize_report, rung_configs
    from anefx.target import example_inputs, load_target, parse_example

    chosen = _modes(modes)
    rung_configs(chosen, group_size, deployment_target)  # bad modes, group sizes, targets: before loading
    if plot is not None:
        from anefx.files import check_file_target

        check_file_target(plot)  # refuse before the long measurement, not after
    specs = [parse_example(e) for e in examples or []]
    with staged(console, "quantization ladder") as progress:
        progress("load")
        loaded = load_target(target)
        args, kwargs = example_inputs(loaded, specs)
        report = quantize_report(loaded.model, args, kwargs, modes=chosen, group_size=group_size,
                                 deployment_target=deployment_target, progress=progress)
    console.print(report.table(f"quantization ladder — {loaded.description}"))
    for note in report.notes:
        console.print(f"note: {note}")
    if plot is not None:
        console.print(f"wrote [bold]{report.plot(plot)}[/]")


def _modes(text: str | None) -> list[str]:
    if text is None:
        return list(LADDER)
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes:
        raise OptionError(f"--modes {text!r} names no mode; pass e.g. --modes int8,lut6,lut4.")
    return modes


def quantize_option(text: str | None, group_size: int | None) -> str | dict[str, Any] | None:
    """`--quantize lut4` or `--quantize embeddings=int8,head=lut6,default=lut4` (+ `--group-size N`) as
    anefx.compile's `quantize=` value; anefx.quantize checks the modes and parts."""
    if text is None:
        if group_size is not None:
            raise OptionError("--group-size applies to --quantize; pass e.g. --quantize lut4 --group-size 32.")
        return None
    if "=" not in text:
        return text.strip() if group_size is None else {"default": text.strip(), "group_size": group_size}
    parts: dict[str, Any] = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        part, _, mode = item.partition("=")
        if not part.strip() or not mode.strip():
            raise OptionError(f"--quantize {text!r}: write PART=MODE pairs separated by commas, e.g. "
                              "embeddings=int8,head=lut6,default=lut4.")
        parts[part.strip()] = mode.strip()
    if group_size is not None:
        parts["group_size"] = group_size
    return parts
