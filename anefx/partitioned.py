"""A partitioned model: its packages and CPU steps run in order, saved as a folder, loaded again, reported.

`PartitionedModel` is what anefx.compile(..., partition=True) returns; `load_partitioned(folder)` reads what its
save() wrote. Both run the same steps from the manifest: packages through CoreML on macOS (anefx's MIL
interpreter elsewhere), CPU steps in torch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from anefx.binding import int32_outlier
from anefx.compiled import to_coreml_numpy
from anefx.errors import InvalidExampleError
from anefx.partition_manifest import (
    CPU_WEIGHTS,
    MANIFEST,
    PartitionError,
    SavedPartition,
    manifest_text,
    run_cpu_step,
)

PackageRunner = Callable[[list[torch.Tensor]], dict[str, np.ndarray]]


@dataclass
class PartitionSteps:
    """The manifest's steps with a runner per package: runs them on named values."""

    manifest: dict[str, Any]
    runners: list[PackageRunner]
    weights: dict[str, torch.Tensor]

    def run(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The model's outputs (flat, in manifest order) for its inputs (in manifest order)."""
        values: dict[str, Any] = {**self.weights}
        for spec, tensor in zip(self.manifest["inputs"], tensors, strict=True):
            values[spec["name"]] = tensor
        runners = iter(self.runners)
        for step in self.manifest["steps"]:
            if step["kind"] == "cpu":
                run_cpu_step(step, values)
                continue
            result = next(runners)([values[i["value"]].reshape(i["shape"]) for i in step["inputs"]])
            for out in step["outputs"]:
                values[out["value"]] = _as_tensor(result[out["name"]], out)
        return [values[out["value"]] for out in self.manifest["outputs"]]


def _as_tensor(array: np.ndarray, spec: dict[str, Any]) -> torch.Tensor:
    """A package output as the value it stands for (CoreML has no int64 and returns a 0-d output as (1,))."""
    tensor = torch.from_numpy(np.asarray(array).copy())
    return tensor.to(getattr(torch, spec["dtype"])).reshape(spec["shape"])


def to_numpy(t: torch.Tensor, name: str = "") -> np.ndarray:
    if (bad := int32_outlier(t)) is not None:
        raise PartitionError(
            f"`{name}` holds {bad} on its way into a package, outside the int32 range CoreML programs take "
            "(±2147483647): it would change. Keep the op that reads it on the CPU too (cpu_ops=[...]), or keep "
            "the value within int32.")
    return to_coreml_numpy(t)


@dataclass
class PartitionedModel:
    """Packages (CompiledModel each) and CPU steps, described by `manifest` (the content of partition.json)."""

    manifest: dict[str, Any]
    packages: list[Any]  # anefx.CompiledModel per package step, in order
    cpu_weights: dict[str, torch.Tensor]  # weights the CPU steps read (shared with the model)
    exported: Any  # the captured program, the reference
    binding: Any = None
    out_spec: Any = None
    example: tuple[tuple, dict] = ((), {})
    _steps: PartitionSteps | None = field(default=None, repr=False)

    @property
    def input_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["outputs"]]

    @property
    def cpu_steps(self) -> list[dict[str, Any]]:
        return [s for s in self.manifest["steps"] if s["kind"] == "cpu"]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run every step: the model's own output structure, computed by the packages and torch."""
        _notice_off_macos(self.manifest["precision"])
        outs = self.steps().run(self._tensors(args, kwargs))
        return pytree.tree_unflatten(outs, self.out_spec) if self.out_spec is not None else tuple(outs)

    def steps(self) -> PartitionSteps:
        if self._steps is None:
            runners = [_compiled_runner(p) for p in self.packages]
            self._steps = PartitionSteps(self.manifest, runners, self.cpu_weights)
        return self._steps

    def _tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        if self.binding is not None:
            return list(self.binding.tensors(args, kwargs))
        return _by_name(self.input_names, args, kwargs)

    def save(self, folder: str | Path) -> Path:
        """Write the folder atomically: package_N.mlpackage per package, cpu_weights.safetensors (when a CPU
        step reads a weight) and partition.json. A folder there is replaced only if it holds a partition.json."""
        from anefx.files import atomic_folder_write

        def write(staged: Path) -> None:
            staged.mkdir(parents=True)
            packages = [s for s in self.manifest["steps"] if s["kind"] == "package"]
            for step, compiled in zip(packages, self.packages, strict=True):
                compiled.save(staged / step["package"])
            if self.cpu_weights:
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous().clone() for k, v in self.cpu_weights.items()},
                          str(staged / CPU_WEIGHTS))
            (staged / MANIFEST).write_text(manifest_text(self.manifest))

        return atomic_folder_write(folder, write, MANIFEST, "a partitioned anefx model")

    def report(self) -> str:
        return partition_report(self.manifest)


def _compiled_runner(compiled: Any) -> PackageRunner:
    return lambda tensors: compiled.predict(*tensors)


def _by_name(names: list[str], args: tuple, kwargs: dict) -> list[torch.Tensor]:
    if len(args) + len(kwargs) != len(names) or any(k not in names[len(args):] for k in kwargs):
        raise InvalidExampleError(f"the model takes {len(names)} tensors ({', '.join(names)}), by position or by "
                                  f"name; got {len(args)} positional and {sorted(kwargs)} by name.")
    return [*args, *(kwargs[n] for n in names[len(args):])]


@dataclass
class LoadedPartition:
    """A saved partitioned model, ready to run: `model(x)` or `model(name=tensor)`."""

    saved: SavedPartition
    precision: str

    def __post_init__(self) -> None:
        packages = [s for s in self.saved.data["steps"] if s["kind"] == "package"]
        runners = [_package_runner(self.saved.folder / s["package"], s, self.precision) for s in packages]
        self._steps = PartitionSteps(self.saved.data, runners, self.saved.cpu_weights())

    @property
    def manifest(self) -> dict[str, Any]:
        return self.saved.data

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output structure when it was a tuple/list/dict of tensors, else a dict by output name."""
        _notice_off_macos(self.precision)
        names = [s["name"] for s in self.manifest["inputs"]]
        outs = self._steps.run(_by_name(names, args, kwargs))
        structure = self.manifest.get("output_structure")
        if structure is None:
            return {s["name"]: t for s, t in zip(self.manifest["outputs"], outs, strict=True)}
        return pytree.tree_unflatten(outs, pytree.treespec_loads(structure))

    def report(self) -> str:
        return partition_report(self.manifest)


def load_partitioned(folder: str | Path, *, precision: str | None = None) -> LoadedPartition:
    """A folder written by a partitioned compile's save(), ready to run (precision: the interpreter's, off
    macOS; the compile's by default)."""
    saved = SavedPartition.read(folder)
    return LoadedPartition(saved, precision or saved.data.get("precision", "fp16"))


def _package_runner(path: Path, step: dict[str, Any], precision: str) -> PackageRunner:
    names = [i["name"] for i in step["inputs"]]
    if sys.platform == "darwin":
        from anefx.lower import _quiet_coremltools

        mlmodel = _quiet_coremltools().models.MLModel(str(path))
        return lambda tensors: mlmodel.predict({n: to_numpy(t, n) for n, t in zip(names, tensors, strict=True)})
    from anefx.mil import load_mlpackage

    runner = load_mlpackage(path, precision=precision)
    return lambda tensors: runner(**{n: to_numpy(t, n) for n, t in zip(names, tensors, strict=True)})


_NOTICE_SHOWN = False


def _notice_off_macos(precision: str) -> None:
    """Once per process, at the caller's line: off macOS the packages run in anefx's MIL interpreter."""
    global _NOTICE_SHOWN
    if sys.platform != "darwin" and not _NOTICE_SHOWN:
        import warnings

        from anefx.compiled import AnefxNotice

        _NOTICE_SHOWN = True
        warnings.warn("CoreML cannot run on this OS: anefx runs the saved ML programs in its own MIL interpreter "
                      f"instead ({precision} emulated in numpy); the CPU steps run in torch.", AnefxNotice,
                      stacklevel=3)


def partition_report(manifest: dict[str, Any]) -> str:
    """Why each seam is where it is: one line per package, per CPU step, and per region folded into the CPU."""
    steps = manifest["steps"]
    packages = sum(s["kind"] == "package" for s in steps)
    cpu = [s for s in steps if s["kind"] == "cpu"]
    lines = [f"{packages} package(s) and {len(cpu)} CPU step(s), in order:"]
    for step in steps:
        if step["kind"] == "package":
            where = _span(step["modules"])
            lines.append(f"  {step['package']}: {step['ops']} op(s){where}; inputs "
                         f"{', '.join(i['value'] for i in step['inputs'])}; outputs "
                         f"{', '.join(o['value'] for o in step['outputs'])}")
        else:
            lines.append(f"  cpu {step['node']}: {step['op']} from {step['module'] or 'the top-level module'}: "
                         f"{step['reason']}")
    lines += [f"folded into the CPU side: {line}" for line in manifest.get("folded", [])]
    return "\n".join(lines)


def _span(modules: list[str]) -> str:
    if not modules:
        return ""
    return f" from {modules[0]}" if len(modules) == 1 else f" from {modules[0]} … {modules[-1]}"
