"""Human-readable summaries of a compile: the per-rule table and op histograms, as rich tables."""

from __future__ import annotations

from collections import Counter

from rich.table import Table

from anefx.compiled import CompiledModel


def pass_table(c: CompiledModel) -> Table:
    table = Table(title="anefx rules")
    for col, justify in (("stage", "left"), ("status", "left"), ("matches", "right"), ("refusals", "right"),
                         ("op delta", "left"), ("ms", "right")):
        table.add_column(col, justify=justify)
    for p in c.passes:
        items = sorted(p.op_delta.items(), key=lambda kv: (-abs(kv[1]), kv[0]))
        delta = " ".join(f"{k}{v:+d}" for k, v in items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")
        refusals = str(len(p.refusals))
        if p.refusals:
            refusals += f" ({p.refusals[0].reason[:40]}…)" if len(p.refusals[0].reason) > 40 else \
                f" ({p.refusals[0].reason})"
        status = p.status if not p.detail or p.status == "applied" else f"{p.status}: {p.detail}"
        table.add_row(p.name, status, str(p.matches), refusals, delta or "-", f"{p.ms:.0f}")
    return table


def histogram_table(before: Counter, after: Counter, title: str) -> Table:
    table = Table(title=title)
    table.add_column("MIL op")
    table.add_column("without rules", justify="right")
    table.add_column("with rules", justify="right")
    for op in sorted(set(before) | set(after), key=lambda k: (-max(before[k], after[k]), k)):
        table.add_row(op, str(before[op]), str(after[op]))
    table.add_row("total", str(sum(before.values())), str(sum(after.values())), style="bold")
    return table
