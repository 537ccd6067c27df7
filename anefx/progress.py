"""Progress of a compile: a spinner naming the running stage and one line per finished stage, on stderr.

`anefx.compile(progress=None)` (the default) shows it when stderr is a terminal and logs the stage names
otherwise; `progress=False` silences it, `progress=True` shows it anyway, and a callable receives each
stage's name instead.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("anefx")
Progress = bool | Callable[[str], None] | None


@contextlib.contextmanager
def reporter(progress: Progress, what: str = "anefx") -> Iterator[Callable[[str], None]]:
    """A callable taking stage names, live for the duration of the block."""
    if callable(progress):
        yield progress
        return
    if progress is False or (progress is None and not _stderr_is_terminal()):
        yield lambda stage: log.info("%s: %s", what, stage)
        return
    from rich.console import Console

    console = Console(stderr=True)
    current = {"stage": None, "at": time.perf_counter()}

    def finish() -> None:
        if current["stage"] is not None:
            console.print(f"[dim]{what}:[/] {current['stage']} [dim]{time.perf_counter() - current['at']:.1f}s[/]",
                          highlight=False)

    with console.status(what) as status:
        def stage(name: str) -> None:
            finish()
            current["stage"], current["at"] = name, time.perf_counter()
            status.update(f"{what}: {name}")

        yield stage
        finish()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
