"""report_json for folders of packages: a compiled LLM (per chunk) and a partitioned model (per package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anefx.package_report import _programs, _tagged


def folder_report_json(folder: Path) -> dict[str, Any] | None:
    """The JSON report of a compiled LLM or partitioned model folder; None for any other directory."""
    from anefx.llm.manifest import MANIFEST as LLM_MANIFEST
    from anefx.partition_manifest import MANIFEST as PARTITION_MANIFEST

    if (folder / LLM_MANIFEST).is_file():
        return _llm_json(folder)
    if (folder / PARTITION_MANIFEST).is_file():
        return _partition_json(folder)
    return None


def _llm_json(folder: Path) -> dict[str, Any]:
    from anefx.llm.manifest import LLMManifest

    manifest = LLMManifest.read(folder)
    chunks = []
    for chunk in manifest.chunks:
        default, programs = _programs(folder / chunk.file)
        chunks.append({"file": chunk.file, "layers": chunk.layers, "bytes": chunk.bytes,
                       "largest_dim": chunk.largest_dim, "function": default, "functions": list(programs),
                       "states": programs[default]["states"], "programs": programs,
                       "constraints": _tagged(programs, lambda name, file=chunk.file: f"{file} {name}: ")})
    return {"kind": "llm", "path": str(folder), "model": manifest.model, "context_length": manifest.context_length,
            "cache_length": manifest.cache_length, "prefill_length": manifest.prefill_length,
            "output": manifest.output, "precision": manifest.precision, "chunks": chunks,
            "constraints": [c for chunk in chunks for c in chunk["constraints"]]}


def _partition_json(folder: Path) -> dict[str, Any]:
    from anefx.partition_manifest import SavedPartition

    saved = SavedPartition.read(folder)
    packages = []
    for step in (s for s in saved.data["steps"] if s["kind"] == "package"):
        default, programs = _programs(folder / step["package"])
        packages.append({"file": step["package"], "function": default, "functions": list(programs),
                         "programs": programs,
                         "constraints": _tagged(programs, lambda name, file=step["package"]: f"{file} {name}: ")})
    return {"kind": "partition", "path": str(folder), "steps": [s["kind"] for s in saved.data["steps"]],
            "packages": packages, "constraints": [c for p in packages for c in p["constraints"]]}
