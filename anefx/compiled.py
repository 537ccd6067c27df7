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

from anefx.binding import InputBinding
from anefx.errors import InvalidExampleError
from anefx.pipeline import PassRecord

if TYPE_CHECKING:
    from anefx.diff import GraphDiff
    from anefx.package_check import PackageCheck

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
    _example: tuple[tuple, dict] = ((), {})
    _output_dtypes: list[torch.dtype] = field(default_factory=list)
    _binding: InputBinding | None = None
    _runners: dict[str, Any] = field(default_factory=dict, repr=False)
    package_check: PackageCheck | None = None  # the lowered program run on the example (anefx.package_check)
    weights_sha256: str = ""  # fingerprint of the weights compiled (taken at compile time; recorded by save)
    artifact: Any = None  # another format's model (anefx.lower.target, e.g. target="coreai"); mlmodel is None then

    def save(self, path: str | Path) -> Path:
        """Write the .mlpackage (the suffix is added when missing), atomically: a package already there is
        replaced only once the new one is complete, anything else there is refused (FileWriteError).
        The package records anefx's version, the input/output names and the weights' fingerprint.
        With target="coreai": the .aimodel folder (see anefx.lower.coreai)."""
        if self.artifact is not None:
            return self.artifact.save(path)
        from anefx.files import atomic_package_write, package_path
        from anefx.mlpackage import anefx_metadata, stamp_metadata

        metadata = anefx_metadata(self.exported, self.input_names, self.output_names,
                                  self.options.get("precision", "fp16"), self.weights_sha256 or None)

        def write(staged: Path) -> None:
            self.mlmodel.save(str(staged))
            stamp_metadata(staged, metadata)

        return atomic_package_write(package_path(path), write)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the lowered program: CoreML on macOS; elsewhere anefx's MIL interpreter runs the saved
        package (emulating fp16 for an fp16 program). Returns the model's own output structure."""
        if sys.platform != "darwin" and self.artifact is None:
            _notice_once("CoreML cannot run on this OS: anefx runs the saved ML program in its own MIL "
                         f"interpreter instead ({self.options.get('precision', 'fp16')} emulated in numpy).")
        outs = [torch.from_numpy(np.asarray(a)) for a in self.predict(*args, **kwargs).values()]
        outs = [o.to(d) for o, d in zip(outs, self._output_dtypes, strict=False)] + outs[len(self._output_dtypes):]
        return pytree.tree_unflatten(outs, self._out_spec) if self._out_spec is not None else tuple(outs)

    def predict(self, *args: Any, precision: str | None = None, **kwargs: Any) -> dict[str, np.ndarray]:
        """The lowered program's outputs by name (CoreML on macOS, the MIL interpreter elsewhere)."""
        feed = self._feed(args, kwargs)
        if self.artifact is not None:  # runs where its OS can (CannotRunError elsewhere)
            return self.artifact.predict(feed)
        if sys.platform == "darwin" and precision is None:
            result = self.mlmodel.predict(feed)
            return {name: np.asarray(result[name]) for name in self.output_names}
        runner = self._runner(precision or self.options.get("precision", "fp16"))
        return runner(**feed)

    def verify(self, *args: Any, precision: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Per output: max absolute error, max relative error and PSNR of the lowered program against
        the original model (its captured program), on the example inputs or on the ones given."""
        from anefx.mil import compare

        if not args and not kwargs:
            args, kwargs = self._example_call()
        with torch.no_grad():
            positional, named = self._captured_form(args, kwargs)
            reference = self.exported.module()(*positional, **named)
        expected = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
        actual = self.predict(*args, precision=precision, **kwargs)
        return {name: compare(actual[name], ref) for name, ref in zip(self.output_names, expected, strict=True)}

    def check_package(self, precision: str | None = None) -> PackageCheck:
        """Run the saved program on the example in anefx's MIL interpreter (at the compile's precision,
        fp16 emulated) and compare it with the model: PSNR per output, inf/NaN, the first overflowing op."""
        from anefx.package_check import check_package

        args, kwargs = self._example
        runner = self._runner(precision or self.options.get("precision", "fp16"))
        with torch.no_grad():
            reference = self.exported.module()(*args, **kwargs)
        expected = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
        feed = self._feed(*self._example_call())
        return check_package(runner, runner.feed(**feed), expected, self.rewritten)

    def _example_call(self) -> tuple[tuple, dict]:
        """The example as a user calls the model: its tensors and the constants it was compiled with."""
        args, kwargs = self._example
        constants = self._binding.constants if self._binding is not None else {}
        return args, {**kwargs, **constants}

    def _captured_form(self, args: tuple, kwargs: dict) -> tuple:
        """(args, kwargs) as the captured program takes them: bound by name, constants checked and left out."""
        if self._binding is None:
            return args, {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        self._binding.tensors(args, kwargs)  # checks the call
        from anefx.binding import canonical, split_constants

        positional, named = canonical(self._binding.signature, args, kwargs, self._binding.positional)
        return positional, split_constants(named)[0]

    def _feed(self, args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
        """The call's tensors by input name: bound to the model's forward by name (see anefx.binding)."""
        if self._binding is not None:
            tensors = self._binding.tensors(args, kwargs)
            return {name: to_coreml_numpy(t) for name, t in zip(self.input_names, tensors, strict=True)}
        flat = pytree.tree_leaves((args, {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if len(tensors) != len(self.input_names):
            raise InvalidExampleError(f"expected {len(self.input_names)} tensor inputs "
                                      f"({', '.join(self.input_names)}), got {len(tensors)}.")
        return {name: to_coreml_numpy(t) for name, t in zip(self.input_names, tensors, strict=True)}

    def _runner(self, precision: str) -> Any:
        if precision not in self._runners:
            import tempfile
            import weakref

            from anefx.mil import load_mlpackage

            folder = tempfile.TemporaryDirectory(prefix="anefx-")
            weakref.finalize(self, folder.cleanup)
            path = self.save(Path(folder.name) / "model.mlpackage")
            self._runners[precision] = load_mlpackage(path, precision=precision)
        return self._runners[precision]

    def diff(self, title: str = "anefx graph diff") -> GraphDiff:
        """What each stage (legalize, then each rule) changed, grouped by module. See docs/inspection.md."""
        from anefx.diff import GraphDiff

        return GraphDiff.from_snapshots(self.snapshots, self.passes, title)

    def pass_table(self) -> list[dict[str, Any]]:
        """One row per stage: name, status, matches, refusals, op delta, milliseconds."""
        return [{"rule": p.name, "status": p.status, "matches": p.matches, "refusals": len(p.refusals),
                 "op_delta": p.op_delta, "ms": round(p.ms, 1)} for p in self.passes]


def to_coreml_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as a CoreML program takes it: int64 as int32, float64 and bfloat16 as float32."""
    t = t.detach().cpu()
    if t.dtype == torch.int64:
        return t.to(torch.int32).numpy()
    return t.float().numpy() if t.dtype in (torch.float64, torch.bfloat16) else t.numpy()


def _notice_once(message: str) -> None:
    global _NOTICE_SHOWN
    if not _NOTICE_SHOWN:
        _NOTICE_SHOWN = True
        warnings.warn(message, AnefxNotice, stacklevel=3)
