"""One error family. Every message says what the user should change."""

from __future__ import annotations

import itertools
import os
import re
import tempfile
import traceback
from pathlib import Path
from typing import Any


class AnefxError(Exception):
    """Base class of every user-facing anefx failure."""


class InvalidModelError(AnefxError, TypeError):
    """The object handed to anefx is not something it can compile."""


class InvalidExampleError(AnefxError, ValueError):
    """The example inputs are not tensors, or the model fails on them."""


class CaptureError(AnefxError):
    """torch.export could not capture the model."""


class UnknownRuleError(AnefxError, KeyError):
    """A rule name that is not in the rule library."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class RuleError(AnefxError):
    """A rule broke the graph (a bug in the rule, reported with the rule's name)."""


class LoweringError(AnefxError):
    """coremltools could not lower the rewritten program."""


class OptionError(AnefxError, ValueError):
    """An option of anefx.compile has a value anefx does not know."""


class BackendError(AnefxError):
    """torch.compile(backend="anefx") could not compile a graph dynamo handed over (an anefx bug)."""


# -- short messages and debug files ---------------------------------------------------------------

_GRAPH_START = re.compile(r"graph\(\):\s*$")  # how torch prints an fx.Graph inside a message
_GRAPH_LINE = re.compile(r"^\s+%\S+ : ")
_NOISE = re.compile(r"^(Traceback|\s*File \"|While executing|Original traceback|Set TORCH|For more information|"
                     r"from user code)")


def short_reason(exc: BaseException, limit: int = 300) -> str:
    """'Type: first meaningful line' of an exception: a graph torch printed into the message becomes
    '<graph>' (torch's lint errors embed the whole program), tracebacks are skipped, and the line is cut
    at `limit` characters. An anefx error keeps its whole message (it is written to be read)."""
    if isinstance(exc, AnefxError):
        return str(exc)
    lines = [line.strip() for line in without_graphs(str(exc)).splitlines()]
    meaningful = [line for line in lines if line and not _NOISE.match(line)]
    first = meaningful[0] if meaningful else "(no message)"
    if len(first) > limit:
        first = first[:limit - 1].rstrip() + "…"
    return f"{type(exc).__name__}: {first}"


def without_graphs(text: str) -> str:
    """`text` with each printed fx graph (a 'graph():' header, '%node : …' lines and the closing
    'return …') replaced by '<graph>'; what follows the return value on its line is kept."""
    out: list[str] = []
    in_graph = False
    for line in text.splitlines():
        start = _GRAPH_START.search(line)
        if not in_graph and start:
            out.append(line[:start.start()] + "<graph>")
            in_graph = True
        elif in_graph and _GRAPH_LINE.match(line):
            continue
        elif in_graph and line.lstrip().startswith("return"):
            out[-1] += _after_return(line.lstrip()[len("return"):])
            in_graph = False
        elif in_graph and not line.strip():
            continue
        else:
            in_graph = False
            out.append(line)
    return "\n".join(out)


def _after_return(rest: str) -> str:
    """What follows a graph's return value: skip one balanced (…) group or one token."""
    rest = rest.lstrip()
    depth = 0
    for i, ch in enumerate(rest):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                return rest[i:]
            depth -= 1
            if depth == 0:
                return rest[i + 1:]
        elif depth == 0 and ch in ", ":
            return rest[i:]
    return ""


def shorten(message: str, max_lines: int = 10, width: int = 300) -> str:
    """At most `max_lines` lines of at most `width` characters (a long message ends with '…')."""
    lines = [line if len(line) <= width else line[:width - 1] + "…" for line in without_graphs(message).splitlines()]
    if len(lines) > max_lines:
        lines = [*lines[:max_lines - 1], "…"]
    return "\n".join(lines)


def debug_dir() -> Path:
    """Where debug files go: $ANEFX_DEBUG_DIR, or one temporary directory per process."""
    global _DEBUG_DIR
    chosen = os.environ.get("ANEFX_DEBUG_DIR")
    if chosen:
        return Path(chosen)
    if _DEBUG_DIR is None:
        _DEBUG_DIR = Path(tempfile.mkdtemp(prefix="anefx-debug-"))
    return _DEBUG_DIR


_DEBUG_DIR: Path | None = None


def write_debug_graph(stem: str, graph: Any = None, exc: BaseException | None = None,
                      header: str = "") -> Path | None:
    """Write a graph (an fx.GraphModule, fx.Graph, ExportedProgram or text) and the full traceback of `exc`
    to a new file `<debug_dir>/<stem>-<n>.txt`. Never raises: returns None when nothing could be written."""
    try:
        folder = debug_dir()
        folder.mkdir(parents=True, exist_ok=True)
        parts = [header] if header else []
        if exc is not None:
            parts.append("".join(traceback.format_exception(exc)))
        if graph is not None:
            parts.append(_graph_text(graph))
        safe = re.sub(r"[^\w.-]", "_", stem)[:80] or "anefx"
        for n in itertools.count(1):
            path = folder / f"{safe}-{n}.txt"
            try:
                with path.open("x", encoding="utf-8") as f:  # exclusive: never overwrite a file
                    f.write("\n\n".join(parts))
                return path
            except FileExistsError:
                continue
    except Exception:  # noqa: BLE001 - a debug file must never hide the error it documents
        return None
    return None


def _graph_text(graph: Any) -> str:
    try:
        if hasattr(graph, "graph_module"):  # ExportedProgram
            return str(graph)
        if hasattr(graph, "print_readable"):
            return graph.print_readable(print_output=False)
        return str(graph)
    except Exception as exc:  # noqa: BLE001 - a half-rewritten graph may not print
        return f"(the graph could not be printed: {short_reason(exc)})"


def failing_node(exc: BaseException) -> Any:
    """The fx node anefx was working on when `exc` was raised (from the traceback of anefx's own frames:
    the match a rule was rewriting, else the innermost `node`), or None."""
    import torch.fx as fx

    tb, node, match_output = exc.__traceback__, None, None
    while tb is not None:
        frame = tb.tb_frame
        if _is_anefx_frame(frame.f_code.co_filename):
            output = getattr(frame.f_locals.get("match"), "output", None)
            if isinstance(output, fx.Node):
                match_output = output
            candidate = frame.f_locals.get("node")
            if isinstance(candidate, fx.Node):
                node = candidate
        tb = tb.tb_next
    return match_output if match_output is not None else node


_ANEFX_DIRS = (os.path.dirname(os.path.abspath(__file__)),
               os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rewrites"))


def _is_anefx_frame(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_ANEFX_DIRS)
