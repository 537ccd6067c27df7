"""GraphDiff → one standalone HTML page: inline CSS and SVG only, nothing fetched.

Per stage: a summary row, a table of modules, and per module the before and after subgraphs of each
kind of rewrite side by side. A subgraph is drawn as a column of boxes in program order (op name and
shape; removed red, added green, rewired amber, the inputs it reads grey) with edges as arcs.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from anefx.diff import GraphDiff, NodeInfo, Region, Side, StageDiff, delta_text, group_regions, op_counts

ROW = 30  # px per node row
BOX_W = 380
BOX_H = 22
PAD = 8
MAX_LABEL = 34
COLORS = {  # status → (fill, stroke)
    "removed": ("#fde4e1", "#c62828"),
    "added": ("#e3f4e1", "#2e7d32"),
    "changed": ("#fff3d4", "#c77700"),
    "context": ("#f4f4f4", "#9e9e9e"),
}

LABELS = {"changed": "rewired", "context": "input read"}

CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px 32px;
       color: #1d1d1f; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 8px;
  border-bottom: 2px solid #ddd; padding-bottom: 4px; } h3 { font-size: 15px; margin: 18px 0 6px; }
code, .mono { font-family: "SF Mono", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
table { border-collapse: collapse; margin: 8px 0 12px; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.legend span { display: inline-block; padding: 1px 8px; margin-right: 8px; border: 1px solid;
               border-radius: 4px; }
.pair { display: grid; grid-template-columns: max-content max-content; gap: 24px; align-items: start;
        margin: 6px 0 18px; }
figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: 4px; color: #444; }
details > summary { cursor: pointer; font-weight: 600; font-size: 15px; margin: 14px 0 4px; }
.muted { color: #777; } .rule { color: #555; margin: 0 0 8px; }
"""


def render_html(d: GraphDiff) -> str:
    body = [f"<h1>{escape(d.title)}</h1>", _legend(), _summary(d)]
    body += [f'<p class="muted">{escape(note)}</p>' for note in d.notes]
    body += [_stage(s) for s in d.stages if not s.empty]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(d.title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_html(d: GraphDiff, path: str | Path) -> Path:
    """Write the page to `path` through a temporary sibling and one rename (anefx.files): a failure or a
    signal while writing leaves any previous file at `path` as it was."""
    from anefx.files import atomic_write_text

    return atomic_write_text(path, render_html(d))


def _legend() -> str:
    spans = "".join(f'<span style="background:{fill};border-color:{stroke}">'
                    f"{LABELS.get(status, status)}</span>" for status, (fill, stroke) in COLORS.items())
    return (f'<p class="legend">{spans}<span class="muted" style="border:none">rewired = the same node '
            "reading new inputs</span></p>")


def _summary(d: GraphDiff) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("stage", "status", "nodes", "removed", "added", "rewired",
                                             "regions", "modules", "op delta"))
    rows = []
    for s in d.stages:
        status = s.status or ("changed" if not s.empty else "unchanged")
        name = f'<a href="#stage-{escape(s.stage)}">{escape(s.stage)}</a>' if not s.empty else escape(s.stage)
        cells = [name, escape(status), f"{s.nodes_before}→{s.nodes_after}", str(len(s.removed)),
                 str(len(s.added)), str(len(s.changed)), str(len(s.regions)), str(len(s.by_module())),
                 f'<span class="mono">{escape(delta_text(s.op_delta, 8))}</span>']
        rows.append("<tr>" + "".join(f'<td class="{"num" if 2 <= i <= 7 else ""}">{c}</td>'
                                     for i, c in enumerate(cells)) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _stage(s: StageDiff) -> str:
    modules = s.by_module()
    rows = []
    for module, regions in modules.items():
        for group in group_regions(regions):
            rows.append(f"<tr><td><code>{escape(module)}</code></td><td class=\"num\">{len(group)}</td>"
                        f"<td class=\"mono\">{escape(op_counts([n.op for n in group[0].removed]))}</td>"
                        f"<td class=\"mono\">{escape(op_counts([n.op for n in group[0].added]))}</td></tr>")
    table = ("<table><tr><th>module</th><th>×</th><th>removed ops</th><th>added ops</th></tr>"
             + "".join(rows) + "</table>")
    drawn: dict[tuple, str] = {}  # a rewrite drawn once per stage; later modules show it folded
    details = [_module(module, regions, drawn) for module, regions in modules.items()]
    matches = f" — {s.matches} match(es)" if s.matches is not None else ""
    return (f'<section id="stage-{escape(s.stage)}"><h2>{escape(s.stage)}</h2>'
            f'<p class="rule">{escape(s.status or "changed")}{matches}; op delta: '
            f'<span class="mono">{escape(delta_text(s.op_delta, 12))}</span></p>'
            + table + "".join(details) + "</section>")


def _module(module: str, regions: list[Region], drawn: dict[tuple, str]) -> str:
    groups = group_regions(regions)
    seen = [drawn[g[0].signature] for g in groups if g[0].signature in drawn]
    folded = len(seen) == len(groups)
    note = f" — the same rewrite as in {seen[0]}" if folded else ""
    parts = [f"<details{'' if folded else ' open'}><summary><code>{escape(module)}</code> "
             f'<span class="muted">({len(regions)} region{"s" if len(regions) != 1 else ""}{escape(note)})'
             "</span></summary>"]
    for group in groups:
        first = group[0]
        drawn.setdefault(first.signature, module)
        where = ", ".join(r.anchor for r in group)
        times = f"×{len(group)} — " if len(group) > 1 else ""
        parts.append(f'<p class="muted mono">{escape(times + where)}</p><div class="pair">'
                     f"<figure><figcaption>before</figcaption>{side_svg(first.before)}</figure>"
                     f"<figure><figcaption>after</figcaption>{side_svg(first.after)}</figure></div>")
    parts.append("</details>")
    return "".join(parts)


def side_svg(side: Side) -> str:
    """The nodes in program order, one box per row, edges as arcs on the right."""
    if not side.nodes:
        return '<p class="muted">(nothing)</p>'
    row = {n.name: i for i, n in enumerate(side.nodes)}
    edges = [(row[a], row[b]) for a, b in side.edges if row[b] > row[a]]
    reach = max((b - a for a, b in edges), default=0)
    width = PAD + BOX_W + 14 + 9 * min(reach, 24) + PAD
    height = PAD * 2 + ROW * len(side.nodes)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img">',
             '<defs><marker id="arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" fill="#777"/></marker></defs>']
    parts += [_arc(a, b) for a, b in edges]
    parts += [_box(i, n, side.status[n.name]) for i, n in enumerate(side.nodes)]
    parts.append("</svg>")
    return "".join(parts)


def _y(i: int) -> float:
    return PAD + ROW * i + BOX_H / 2


def _arc(a: int, b: int) -> str:
    x = PAD + BOX_W
    bulge = 14 + 9 * min(b - a, 24)
    return (f'<path d="M{x},{_y(a)} C{x + bulge},{_y(a)} {x + bulge},{_y(b)} {x + 1},{_y(b)}" '
            'fill="none" stroke="#888" stroke-width="1.2" marker-end="url(#arrow)"/>')


def _box(i: int, node: NodeInfo, status: str) -> str:
    fill, stroke = COLORS[status]
    y = PAD + ROW * i
    dash = ' stroke-dasharray="4 3"' if status == "context" else ""
    op = _clip(node.op, 22)
    shape = _clip(node.shape, MAX_LABEL - len(op))
    tip = f"{node.name} = {node.op} {node.shape}\nmodule: {node.module}"
    return (f'<g><title>{escape(tip)}</title><rect x="{PAD}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="4" '
            f'fill="{fill}" stroke="{stroke}"{dash}/>'
            f'<text x="{PAD + 8}" y="{y + 15.5}" font-family="Menlo, Consolas, DejaVu Sans Mono, monospace" '
            f'font-size="12" fill="#1d1d1f"><tspan font-weight="bold">{escape(op)}</tspan>'
            f'<tspan fill="#555"> {escape(shape)}</tspan></text>'
            f'<text x="{PAD + BOX_W - 6}" y="{y + 15.5}" text-anchor="end" font-family="Helvetica, Arial, '
            f'sans-serif" font-size="10" fill="#888">{escape(_clip(node.name, 16))}</text></g>')


def _clip(text: str, limit: int) -> str:
    limit = max(limit, 4)
    return text if len(text) <= limit else text[: limit - 1] + "…"
