"""The --json and --compute-plan forms of `anefx report` (the command itself is in anefx.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def report_extras(package: Path, *, as_json: bool, plan: bool, compute_units: str, console: Any) -> None:
    """--json: everything the report shows as one JSON object on stdout (with --compute-plan, CoreML's plan
    under "compute_plan"). --compute-plan alone: CoreML's plan as tables, before anefx's own report. Off
    macOS 14.4+, --compute-plan is a ComputePlanError (exit code 2) before anything is printed."""
    from anefx.compute_plan import plan_json, plan_tables
    from anefx.package_report import report_json

    plans = _plans(package, compute_units) if plan else {}
    if as_json:
        data = report_json(package)
        if plan:
            data["compute_plan"] = {name: plan_json(p) for name, p in plans.items()}
        print(json.dumps(data, indent=2))
        return
    for computed in plans.values():
        for table in plan_tables(computed):
            console.print(table)


def _plans(package: Path, compute_units: str) -> dict[str, Any]:
    """CoreML's plan of the package, or of each chunk of a compiled LLM folder, by file name."""
    from anefx.compute_plan import compute_plan
    from anefx.llm.manifest import MANIFEST, LLMManifest

    files = [c.file for c in LLMManifest.read(package).chunks] if (package / MANIFEST).is_file() else [""]
    return {file or package.name: compute_plan(package / file if file else package, compute_units) for file in files}


def llm_constraints(folder: Path) -> Any:
    """The constraints table of every chunk of a compiled LLM folder."""
    from anefx.package_report import Constraint, constraints_table, report_json

    return constraints_table([Constraint(**c) for c in report_json(folder)["constraints"]])
