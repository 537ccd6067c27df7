"""The markdown compile_bench.py prints and writes: machine, command, side-by-side tables, targets."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from pathlib import Path

GIB, MIB = 2**30, 2**20
TIME_TARGET = 1.25  # anefx compile wall time ≤ 1.25 × the plain path
MEMORY_TARGET = 1.3  # peak RSS of the ~1.1B model ≤ 1.3 × its fp32 weight bytes
LAYOUT_TARGET = 7  # DistilBERT-base: transposes + reshapes ≤ 7


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in _lines("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor() or "unknown CPU")
    mem = next((int(ln.split()[1]) * 1024 for ln in _lines("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    os_name = next((ln.split("=", 1)[1].strip('"') for ln in _lines("/etc/os-release")
                    if ln.startswith("PRETTY_NAME=")), platform.system())
    versions = ", ".join(f"{p} {_version(p)}" for p in ("torch", "coremltools", "transformers", "numpy"))
    return (f"{cpu}, {os.cpu_count()} cores, {mem / GIB:.1f} GiB RAM; {os_name} "
            f"(kernel {platform.release()}); Python {platform.python_version()}; {versions}")


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _pairs(rows: list[dict]) -> list[tuple[str, dict, dict]]:
    by_model: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["path"]] = row
    return [(paths["plain"]["label"], paths["plain"], paths["anefx"]) for paths in by_model.values()
            if "plain" in paths and "anefx" in paths]


def _ratio(a: dict, p: dict, key: str) -> str:
    if key not in a or key not in p or not p[key]:
        return "—"
    return f"{a[key] / p[key]:.2f}×"


def cost_table(rows: list[dict]) -> list[str]:
    out = ["| model | fp32 weights | RSS after build | plain time | anefx time | **time ×** | "
           "plain peak RSS | anefx peak RSS | **memory ×** | peak / weights (plain, anefx) |",
           "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for label, p, a in _pairs(rows):
        ok = "error" not in p and "error" not in a
        base = p if "error" not in p else a
        weights = _mib(base["weight_bytes"]) if "weight_bytes" in base else "—"
        built = f"{base['rss_built'] / GIB:.2f} GiB" if "rss_built" in base else "—"
        out.append(f"| {label} | {weights} | {built} | {_seconds(p)} | {_seconds(a)} | "
                   f"{_ratio(a, p, 'seconds') if ok else '—'} | {_gib(p)} | {_gib(a)} | "
                   f"{_ratio(a, p, 'peak_rss') if ok else '—'} | {_per_weight(p)}, {_per_weight(a)} |")
    return out


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB" if n >= 10 * MIB else f"{n / MIB:.2f} MiB"


def _seconds(row: dict) -> str:
    return "failed" if "error" in row else f"{row['seconds']:.1f} s"


def _gib(row: dict) -> str:
    return "failed" if "error" in row else f"{row['peak_rss'] / GIB:.2f} GiB"


def _per_weight(row: dict) -> str:
    if "error" in row or row.get("weight_bytes", 0) < 64 * MIB:  # runtime-dominated: not informative
        return "—"
    return f"{row['peak_rss'] / row['weight_bytes']:.2f}×"


PROGRAM_COLUMNS = [("ops", "ops"), ("non-const", "non_const_ops"), ("transpose+reshape", "layout_ops"),
                   ("conv", "conv"), ("linear", "linear"), ("matmul", "matmul"), ("einsum", "einsum"),
                   ("softmax", "softmax"), ("sdpa", "scaled_dot_product_attention"), ("rank ≥ 5", "rank5"),
                   ("largest dim", "largest_dim")]


def program_table(rows: list[dict]) -> list[str]:
    heads = " | ".join(h for h, _ in PROGRAM_COLUMNS)
    out = [f"| model | path | {heads} | 64-B padding waste | fp16 PSNR |",
           "|---|---|" + "--:|" * (len(PROGRAM_COLUMNS) + 2)]
    for label, p, a in _pairs(rows):
        for row in (p, a):
            if "error" in row:
                out.append(f"| {label} | {row['path']} | failed: {row['error']} |")
                continue
            cells = " | ".join(f"{row[key]:,}" for _, key in PROGRAM_COLUMNS)
            out.append(f"| {label} | {row['path']} | {cells} | {row['pad_waste_bytes'] / MIB:.2f} MiB | "
                       f"{_psnr(row)} |")
    return out


def _psnr(row: dict) -> str:
    if row.get("psnr_db") is None:
        return f"n/a ({row.get('psnr_error', 'not run')})"
    return f"{row['psnr_db']:.1f} dB"


def stage_table(rows: list[dict]) -> list[str]:
    out = ["| model | path | stages (seconds) |", "|---|---|---|"]
    for label, p, a in _pairs(rows):
        for row in (p, a):
            if "error" not in row:
                stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stages"].items())
                out.append(f"| {label} | {row['path']} | {stages} |")
    return out


def targets(rows: list[dict], quick: bool) -> list[str]:
    pairs = [(label, p, a) for label, p, a in _pairs(rows) if "error" not in p and "error" not in a]
    out = []
    times = [(label, a["seconds"] / p["seconds"]) for label, p, a in pairs]
    if times:
        worst = max(times, key=lambda t: t[1])
        met = all(r <= TIME_TARGET for _, r in times)
        out.append(f"- compile wall time ≤ {TIME_TARGET}× plain: **{'met' if met else 'missed'}** "
                   f"(worst {worst[1]:.2f}× on {worst[0]}; "
                   + ", ".join(f"{label} {r:.2f}×" for label, r in times) + ")")
    big = [(label, a) for label, p, a in pairs if p["model"] == "llama-1b"]
    for label, a in big:
        r = a["peak_rss"] / a["weight_bytes"]
        out.append(f"- peak RSS of {label} ≤ {MEMORY_TARGET}× its fp32 weights: "
                   f"**{'met' if r <= MEMORY_TARGET else 'missed'}** ({r:.2f}×, "
                   f"{a['peak_rss'] / GIB:.2f} GiB for {a['weight_bytes'] / GIB:.2f} GiB of weights)")
    if not big:
        out.append(f"- peak RSS ≤ {MEMORY_TARGET}× fp32 weights for the ~1.1B model: not measured in this run "
                   "(`--size 1b`)")
    distil = [a for _, p, a in pairs if p["model"] == "distilbert"]
    if distil and not quick:
        n = distil[0]["layout_ops"]
        out.append(f"- DistilBERT-base transposes + reshapes ≤ {LAYOUT_TARGET}: "
                   f"**{'met' if n <= LAYOUT_TARGET else 'missed'}** ({n})")
    return out


def render(rows: list[dict], command: str, quick: bool) -> str:
    today = datetime.date.today().isoformat()
    lines = [f"Measured {today} with `{command}`", "", f"Machine: {machine()}", "",
             "### Cost: wall time and peak memory (each in a fresh process)", "", *cost_table(rows), "",
             "### The program produced (read back from the saved .mlpackage)", "", *program_table(rows), "",
             "### Where the time goes", "", *stage_table(rows), "",
             "### Targets", "", *targets(rows, quick)]
    return "\n".join(lines) + "\n"
