"""`anefx.compile(model, example, buckets=[...])`: one function per bucket in one .mlpackage, weights shared.

Each bucket (anefx.buckets) is compiled as `anefx.compile` compiles one example: captured at its shapes,
rewritten by the rules (each verified at those shapes), lowered. The lowered programs are merged with
coremltools' MultiFunctionDescriptor and save_multifunction, which stores a weight used by several functions
once. The result is a `BucketedModel` per bucket (a CompiledModel whose package is the merged one); the
example's is returned and holds the others: a call runs the function whose input shapes equal the call's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
import sys
import tempfile
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils import _pytree as pytree

from anefx.buckets import (
    BUCKETS_KEY,
    BucketError,
    BucketRecord,
    BucketShapeError,
    bucket_examples,
    buckets_metadata,
    function_names,
    unknown_shape_message,
)
from anefx.compiled import CompiledModel
from anefx.errors import OptionError

PACKAGE = "model.mlpackage"


@dataclass
class BucketSet:
    """The merged package (in a temporary folder until saved) and the compiled model of each function."""

    folder: Path
    models: list[BucketedModel] = field(default_factory=list)  # the default function's first
    _coreml: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def package(self) -> Path:
        return self.folder / PACKAGE

    @property
    def records(self) -> list[BucketRecord]:
        return [BucketRecord(m.function, dict(zip(m.input_names, m._binding.shapes, strict=True)))
                for m in self.models]

    def model_for(self, args: tuple, kwargs: dict) -> BucketedModel:
        """The bucket whose input shapes equal the call's; BucketShapeError listing the buckets otherwise."""
        from anefx.binding import canonical, split_constants

        default = self.models[0]
        binding = default._binding
        positional, named = canonical(binding.signature, args, kwargs, binding.positional)
        leaves, spec = pytree.tree_flatten((positional, split_constants(named)[0]))
        if spec != binding.spec:
            return default  # its binding names what the call gets wrong
        shapes = [tuple(t.shape) if hasattr(t, "shape") else None for t in leaves]
        for model in self.models:
            if shapes == list(model._binding.shapes):
                return model
        given = list(zip(binding.paths, [s or () for s in shapes], strict=True))
        raise BucketShapeError(unknown_shape_message(given, self.records))

    def save(self, path: str) -> None:
        """Write the merged package at `path` with the buckets in its metadata (CompiledModel.save calls this
        inside its atomic write, then adds anefx's other metadata)."""
        from anefx.mlpackage import stamp_metadata

        shutil.copytree(self.package, path)
        stamp_metadata(Path(path), {BUCKETS_KEY: buckets_metadata(self.records)})

    def coreml_model(self, function: str) -> Any:
        """The CoreML model of one function (macOS only)."""
        if function not in self._coreml:
            import coremltools as ct

            units = self.models[0].options.get("compute_units", "CPU_AND_NE")
            self._coreml[function] = ct.models.MLModel(str(self.package), function_name=function,
                                                       compute_units=getattr(ct.ComputeUnit, units))
        return self._coreml[function]


@dataclass
class BucketedModel(CompiledModel):
    """One bucket's CompiledModel; calls, `predict`, `verify` and `save` go through the merged package."""

    function: str = ""
    bucket_set: BucketSet | None = field(default=None, repr=False)

    @property
    def buckets(self) -> dict[str, BucketedModel]:
        """Function name → that bucket's compiled model (the default function first)."""
        return {m.function: m for m in self.bucket_set.models}

    def save(self, path: str | Path) -> Path:
        """Write the one .mlpackage holding every bucket's function, atomically (see CompiledModel.save)."""
        writer = dataclasses.replace(self, mlmodel=self.bucket_set)
        return CompiledModel.save(writer, path)

    def predict(self, *args: Any, precision: str | None = None, **kwargs: Any) -> dict[str, np.ndarray]:
        owner = self.bucket_set.model_for(args, kwargs)
        if owner is not self:
            return owner.predict(*args, precision=precision, **kwargs)
        if sys.platform == "darwin" and precision is None:
            result = self.bucket_set.coreml_model(self.function).predict(self._feed(args, kwargs))
            return {name: np.asarray(result[name]) for name in self.output_names}
        return super().predict(*args, precision=precision, **kwargs)

    def verify(self, *args: Any, precision: str | None = None, **kwargs: Any) -> dict[str, Any]:
        owner = self.bucket_set.model_for(args, kwargs) if args or kwargs else self
        if owner is not self:
            return owner.verify(*args, precision=precision, **kwargs)
        return super().verify(*args, precision=precision, **kwargs)

    def _runner(self, precision: str) -> Any:
        if precision not in self._runners:
            from anefx.mil import load_mlpackage

            self._runners[precision] = load_mlpackage(self.bucket_set.package, precision=precision,
                                                      function=self.function)
        return self._runners[precision]


def compile_buckets(model: Any, example_args: Any, example_kwargs: dict | None, buckets: Any,
                    **options: Any) -> BucketedModel:
    """anefx.compile with `buckets=`: see the module docstring and docs/api.md (Shape buckets)."""
    from anefx.api import compile as compile_one
    from anefx.package_check import CHECKS
    from anefx.progress import reporter

    if options.pop("partition", False) is not False or options.pop("cpu_ops", None) is not None:
        raise BucketError("buckets= and partition=/cpu_ops= do not combine: a partitioned compile writes several "
                          "packages per shape. Compile one partitioned program per shape, or drop partition=.")
    examples = bucket_examples(model, example_args, example_kwargs, buckets)
    check = options.pop("package_check", "warn")
    if check not in CHECKS:
        raise OptionError(f"package_check={check!r} is not one of {', '.join(CHECKS)}.")
    with reporter(options.pop("progress", None), "anefx.compile") as say:
        compiled = []
        for index, (args, kwargs) in enumerate(examples):
            def stage(name: str, index: int = index) -> None:
                say(f"bucket {index + 1}/{len(examples)}: {name}")

            compiled.append(compile_one(model, args, kwargs, package_check="skip", progress=stage, **options))
        say("merge the buckets into one package")
        bucket_set = _merge(compiled)
        if check != "skip":
            say("check every bucket's function (MIL interpreter)")
    if check != "skip":
        for bucketed in bucket_set.models:
            bucketed.package_check = _checked(bucketed, options.get("quantize"))
            _report(bucketed, check)
    default = bucket_set.models[0]
    names = ", ".join(r.describe() for r in bucket_set.records)
    default.notes.append(f"{len(examples)} buckets, one function each (default first): {names}")
    return default


def _merge(compiled: list[CompiledModel]) -> BucketSet:
    shapes = [dict(zip(c.input_names, c._binding.shapes, strict=True)) for c in compiled]
    names = function_names(shapes)
    folder = Path(tempfile.mkdtemp(prefix="anefx-buckets-"))
    bucket_set = BucketSet(folder)
    weakref.finalize(bucket_set, shutil.rmtree, str(folder), ignore_errors=True)
    singles = {}
    for name, c in zip(names, compiled, strict=True):
        singles[name] = folder / f".{name}.mlpackage"
        c.mlmodel.save(str(singles[name]))
    save_multifunction(singles, names[0], bucket_set.package)
    for path in singles.values():
        shutil.rmtree(path, ignore_errors=True)
    for name, c in zip(names, compiled, strict=True):
        fields = {f.name: getattr(c, f.name) for f in dataclasses.fields(CompiledModel)}
        bucket_set.models.append(BucketedModel(**fields, function=name, bucket_set=bucket_set))
    return bucket_set


def save_multifunction(singles: dict[str, Path], default: str, target: Path) -> None:
    """One package holding each single-function package's `main` under its name; equal weights stored once."""
    from anefx.lower import _quiet_coremltools

    ct = _quiet_coremltools()
    descriptor = ct.utils.MultiFunctionDescriptor()
    for function, path in singles.items():
        descriptor.add_function(str(path), src_function_name="main", target_function_name=function)
    descriptor.default_function_name = default
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        ct.utils.save_multifunction(descriptor, str(target))


def _checked(bucketed: BucketedModel, quantize: Any) -> Any:
    """The bucket's function run on its example (a quantized program is held to its own PSNR floor)."""
    result = bucketed.check_package()
    if quantize is None:
        return result
    from anefx.quantize_apply import quantized_check

    return quantized_check(result, quantize)


def _report(bucketed: BucketedModel, mode: str) -> None:
    from anefx.package_check import PrecisionError, PrecisionWarning

    result = bucketed.package_check
    if result.ok:
        return
    message = f"bucket {bucketed.function}: {result.message()}"
    if mode == "raise":
        raise PrecisionError(message)
    warnings.warn(message, PrecisionWarning, stacklevel=4)
