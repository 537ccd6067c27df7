"""The `anefx` command: a thin shell over the library. An AnefxError is one red line and exit code 2."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from anefx.errors import AnefxError

app = typer.Typer(help="Compile PyTorch models into Apple Neural Engine friendly CoreML programs.",
                  no_args_is_help=True, add_completion=False)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """anefx: compile PyTorch models for the Apple Neural Engine."""


def friendly_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AnefxError as exc:
            err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


@app.command()
@friendly_errors
def demo(output: Annotated[Path, typer.Option("-o", "--output", help="where to write the package")] =
         Path("anefx-demo.mlpackage")) -> None:
    """Compile a built-in small Llama-style model and show what each rule changed."""
    from anefx.demo import run_demo

    run_demo(output, console)


def main() -> None:  # pragma: no cover - console script entry
    app()
