"""The command line's side of shape buckets: `anefx compile … --bucket NAME:SHAPE[,NAME:SHAPE…]` and the
functions table of `anefx report` for a package with several functions."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from anefx.buckets import BucketError, package_buckets, shape_text


def bucket_calls(target: Any, args: tuple, kwargs: dict, texts: list[str]) -> list[tuple[tuple, dict]]:
    """One (args, kwargs) per `--bucket`: the example with the named inputs replaced by random tensors of
    the bucket's shapes (the dtype is the example input's unless the bucket names one)."""
    names = [*inspect.signature(target.model.forward).parameters][:len(args)]
    example = {**dict(zip(names, args, strict=False)), **kwargs}
    calls = []
    for index, text in enumerate(texts):
        replaced = {}
        for part in [p.strip() for p in text.split(",") if p.strip()]:
            name, tensor = _bucket_tensor(part, example, target.vocab_size, seed=100 + index)
            replaced[name] = tensor
        if not replaced:
            raise BucketError(f"--bucket {text!r} names no input; write NAME:SHAPE[,NAME:SHAPE…], e.g. "
                              "--bucket input_ids:1x128.")
        new_args = tuple(replaced.get(n, a) for n, a in zip(names, args, strict=False))
        calls.append((new_args, {k: replaced.get(k, v) for k, v in kwargs.items()}))
    return calls


def _bucket_tensor(text: str, example: dict, vocab_size: int | None, seed: int) -> tuple[str, Any]:
    import torch

    from anefx.target import ExampleSpec, make_example, parse_example

    spec = parse_example(text)
    current = example.get(spec.name)
    if not isinstance(current, torch.Tensor):
        inputs = ", ".join(n for n, v in example.items() if isinstance(v, torch.Tensor))
        raise BucketError(f"--bucket {text!r}: the example has no tensor input {spec.name!r}; its inputs: "
                          f"{inputs}. Name one of them (pass --example for inputs the target does not give).")
    if text.count(":") < 2:  # no dtype written: the example's
        spec = ExampleSpec(spec.name, spec.shape, current.dtype)
    return spec.name, make_example(spec, vocab_size, seed=seed)


def show_functions(package: Path, console: Any) -> str:
    """Print one row per function of a multifunction package (its buckets, when anefx recorded them) and
    return the function to report in detail: the default one ("main" for a one-function package)."""
    from rich.table import Table

    from anefx.mlpackage import load_spec
    from anefx.package_report import ANE_MAX_DIM, package_report

    spec = load_spec(package)
    if spec.WhichOneof("Type") != "mlProgram" or len(spec.mlProgram.functions) < 2:
        return "main"
    default = spec.description.defaultFunctionName or next(iter(spec.mlProgram.functions))
    recorded = {r.function: r for r in package_buckets(package)}
    table = Table(title=f"{package.name}: {len(spec.mlProgram.functions)} functions (default: {default})")
    for column in ("function", "inputs", "ops", "largest dim", "non-ANE ops"):
        table.add_column(column, justify="left" if column in ("function", "inputs") else "right",
                         no_wrap=column == "function")
    for function in [*recorded, *(f for f in spec.mlProgram.functions if f not in recorded)]:
        report = package_report(package, function)
        inputs = [t for t in report.tensors if t.op == "input"]
        largest = report.largest
        size = max(largest.shape) if largest is not None else 0
        table.add_row(function, ", ".join(f"{t.name} {shape_text(t.shape)}" for t in inputs),
                      str(sum(report.histogram.values())),
                      f"{size}" + ("" if size <= ANE_MAX_DIM else " (over the ANE's limit)"),
                      str(sum(n for n, _ in report.unsupported.values())))
    console.print(table)
    console.print(f"below: the default function, {default} (every function shares the package's weights)")
    return default
