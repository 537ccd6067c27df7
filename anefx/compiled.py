"""The result of anefx.compile: the programs at each stage, the CoreML model, and a callable."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from anefx.errors import InvalidExampleError
from anefx.pipeline import PassRecord

if TYPE_CHECKING:
    from anefx.diff import GraphDiff

_NOTICE_SHOWN = False


class AnefxNotice(UserWarning):
    """An informational notice (e.g. running the rewritten graph in torch instead of CoreML)."""


@dataclass
class CompiledModel:
    exported: ExportedProgram
    rewritten: ExportedProgram
    mlmodel: Any
    passes: list[PassRecord]
    snapshots: list[tuple[str, ExportedProgram]]
    input_names: list[str]
    output_names: list[str]
    options: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    _out_spec: Any = None

    def save(self, path: str | Path) -> Path:
        """Write the .mlpackage (the suffix is added when missing)."""
        path = Path(path)
        if path.suffix != ".mlpackage":
            path = path.with_suffix(".mlpackage")
        self.mlmodel.save(str(path))
        return path

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if sys.platform == "darwin":
            return self._predict_coreml(args, kwargs)
        _notice_once("CoreML cannot run on this OS: anefx runs the verified rewritten graph in torch "
                     "instead (the same program that was lowered, before coremltools).")
        with torch.no_grad():
            return self.rewritten.module()(*args, **kwargs)

    def _predict_coreml(self, args: tuple, kwargs: dict) -> Any:
        flat = pytree.tree_leaves((args, {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if len(tensors) != len(self.input_names):
            raise InvalidExampleError(f"expected {len(self.input_names)} tensor inputs "
                                      f"({', '.join(self.input_names)}), got {len(tensors)}.")
        feed = {name: _to_numpy(t) for name, t in zip(self.input_names, tensors, strict=True)}
        result = self.mlmodel.predict(feed)
        outs = [torch.from_numpy(np.asarray(result[name])) for name in self.output_names]
        return pytree.tree_unflatten(outs, self._out_spec) if self._out_spec is not None else tuple(outs)

    def diff(self, title: str = "anefx graph diff") -> GraphDiff:
        """What each stage (legalize, then each rule) changed, grouped by module. See docs/inspection.md."""
        from anefx.diff import GraphDiff

        return GraphDiff.from_snapshots(self.snapshots, self.passes, title)

    def pass_table(self) -> list[dict[str, Any]]:
        """One row per stage: name, status, matches, refusals, op delta, milliseconds."""
        return [{"rule": p.name, "status": p.status, "matches": p.matches, "refusals": len(p.refusals),
                 "op_delta": p.op_delta, "ms": round(p.ms, 1)} for p in self.passes]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.int64:
        return t.to(torch.int32).numpy()
    return t.detach().cpu().numpy()


def _notice_once(message: str) -> None:
    global _NOTICE_SHOWN
    if not _NOTICE_SHOWN:
        _NOTICE_SHOWN = True
        warnings.warn(message, AnefxNotice, stacklevel=3)
