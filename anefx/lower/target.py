"""One interface for the Apple model formats anefx lowers to.

A lowering target takes the rewritten ExportedProgram, its input and output names and the options, and returns
an Artifact: the converted model, which saves itself, reports its program's structure and, where the OS can run
the format, runs. Two targets: `coreml` (anefx.lower.coreml, `.mlpackage`, the default) and `coreai`
(anefx.lower.coreai, `.aimodel`). Everything format-specific stays in the target's module.

(Not to be confused with anefx.target, which loads the model a CLI command compiles.)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch.export import ExportedProgram

from anefx.errors import AnefxError, OptionError

FORMATS = {"coreml": "anefx.lower.coreml", "coreai": "anefx.lower.coreai"}  # target name → its module
DEFAULT_FORMAT = "coreml"


class CannotRunError(AnefxError):
    """The compiled model's format cannot run on this OS (it can still be saved)."""


class TargetUnavailableError(AnefxError):
    """The converter a target needs is not installed."""


@dataclass(frozen=True)
class LoweringOptions:
    compute_units: str = "CPU_AND_NE"
    deployment_target: str = "iOS18"
    precision: str = "fp16"


class Artifact(Protocol):
    """A converted model. `report()` gives at least {"format": ..., "ops": {op type: count}} (see
    anefx.lower.coreai_report for the structural figures)."""

    suffix: str

    def save(self, path: str | Path) -> Path: ...

    def report(self) -> dict[str, Any]: ...

    def can_run(self) -> bool: ...

    def predict(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class LoweringTarget(Protocol):
    name: str
    suffix: str

    def require(self) -> None:
        """Raise TargetUnavailableError (with the install command) when the converter is missing."""

    def check_output(self, path: str | Path) -> Path:
        """The path save() writes for `path` (suffix added), or FileWriteError when something else is there."""

    def figures(self, path: Path) -> dict[str, Any]:
        """A saved model's op histogram and structural figures: {"format", "ops": {op type: count}, "conv",
        "linear", "matmul", "softmax", "softmax_shapes", "layout_ops", "max_rank", "largest_dim", …}."""

    def lower(self, ep: ExportedProgram, *, input_names: list[str], output_names: list[str],
              options: LoweringOptions) -> Artifact: ...


def lowering_target(name: str) -> LoweringTarget:
    """The target called `name` ("coreml" or "coreai"), its converter checked to be installed."""
    if name not in FORMATS:
        raise OptionError(f"target={name!r} is not one of {', '.join(FORMATS)} (coreml writes a .mlpackage, "
                          "coreai a .aimodel).")
    chosen = importlib.import_module(FORMATS[name]).TARGET
    chosen.require()
    return chosen


def compile_to_target(model: Any, example_args: Any, example_kwargs: dict | None, *, target: str,
                      **options: Any) -> Any:
    """anefx.compile(..., target=NAME) for a target other than Core ML: capture, the same verified rules,
    then the target's lowering. The CompiledModel holds the target's artifact (save, report, run)."""
    from anefx.api import _compiled, resolve_rules
    from anefx.capture import capture
    from anefx.lower.coreml import check_options
    from anefx.mlpackage import program_weights_sha256
    from anefx.pipeline import Tolerance, layout_note, rank_note, run_pipeline
    from anefx.progress import reporter

    chosen_target = lowering_target(target)
    _refuse_options(target, options)
    lowering = LoweringOptions(options["compute_units"], options["deployment_target"], options["precision"])
    check_options(lowering.compute_units, lowering.deployment_target, lowering.precision, options["attention"])
    chosen = resolve_rules(options["rules"], lowering.compute_units, options["attention"])
    with reporter(options["progress"], "anefx.compile") as say:
        say("capture")
        cap = capture(model, example_args, example_kwargs)
        rewritten, records, snapshots = run_pipeline(
            cap.exported, chosen, (cap.args, cap.kwargs), verify=options["verify"], tolerance=Tolerance(),
            progress=say, never_worse=options["rules"] is None)
        cap.notes.extend(n for n in (options["rules"] is not None and layout_note(snapshots), rank_note(snapshots))
                         if n)
        say(f"lower ({target})")
        artifact = chosen_target.lower(rewritten, input_names=cap.input_names, output_names=cap.output_names,
                                       options=lowering)
    compiled = _compiled(cap, rewritten, None, records, snapshots, chosen, target=target,
                         compute_units=lowering.compute_units, deployment_target=lowering.deployment_target,
                         precision=lowering.precision, verify=options["verify"], attention=options["attention"],
                         package_check="skip")
    compiled.artifact = artifact
    compiled.weights_sha256 = program_weights_sha256(cap.exported)
    return compiled


def _refuse_options(target: str, options: dict[str, Any]) -> None:
    given = [name for name, unset in (("buckets", None), ("partition", False), ("cpu_ops", None))
             if options.get(name, unset) is not unset]
    if given:
        raise OptionError(f"target={target!r} compiles one program for the example's shapes; "
                          f"{', '.join(f'{n}=' for n in given)} work with target='coreml' only. Drop "
                          f"{'them' if len(given) > 1 else 'it'}, or compile for Core ML.")


def split_target(value: str) -> tuple[str, str]:
    """The CLI's --target: a format name (coreml, coreai) or a Core ML deployment target (iOS18, …) →
    (format, deployment target)."""
    return (value, "iOS18") if value in FORMATS else (DEFAULT_FORMAT, value)


def default_output(fmt: str, name: str) -> Path:
    return Path(f"{name}{importlib.import_module(FORMATS[fmt]).TARGET.suffix}")


def check_output(fmt: str, output: str | Path) -> Path:
    """The path the format writes for `output`, or FileWriteError when something else is in its place."""
    return importlib.import_module(FORMATS[fmt]).TARGET.check_output(output)


def saved_figures(path: str | Path) -> dict[str, Any]:
    """The figures of a saved model of either format (chosen by its suffix), as one JSON-ready dict."""
    path = Path(path)
    for module in FORMATS.values():
        chosen = importlib.import_module(module).TARGET
        if path.suffix == chosen.suffix:
            return chosen.figures(path)
    raise OptionError(f"{path} is neither a .mlpackage nor a .aimodel; give a model anefx saved.")
