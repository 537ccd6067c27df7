"""Verify a saved .mlpackage against the PyTorch model it came from, on any OS.

The package is run by anefx's MIL interpreter (anefx.mil), the model in torch, on the same inputs;
per output: max absolute error, max relative error (to the reference's largest magnitude) and PSNR.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from anefx.capture import default_kwargs
from anefx.errors import InvalidExampleError


def verify_package(path: str | Path, model: torch.nn.Module, args: tuple, kwargs: dict,
                   precision: str = "fp16") -> dict[str, Any]:
    """{output name: ErrorReport} of the package at `path` against `model(*args, **kwargs)`."""
    from anefx.mil import compare, load_mlpackage

    runner = load_mlpackage(path, precision=precision)
    feed = _feed(model, args, kwargs, runner.input_names)
    call_kwargs = default_kwargs(model, kwargs, [])  # as anefx.compile captured it (use_cache=False)
    with torch.no_grad():
        expected = [t for t in pytree.tree_leaves(model.eval()(*args, **call_kwargs)) if isinstance(t, torch.Tensor)]
    actual = runner(**feed)
    if len(expected) != len(runner.output_names):
        raise InvalidExampleError(f"the model returns {len(expected)} tensors but the package has "
                                  f"{len(runner.output_names)} outputs ({', '.join(runner.output_names)}): "
                                  "pass the model and inputs the package was compiled from.")
    return {name: compare(actual[name], ref) for name, ref in zip(runner.output_names, expected, strict=True)}


def _feed(model: torch.nn.Module, args: tuple, kwargs: dict, names: list[str]) -> dict[str, Any]:
    params = [*inspect.signature(model.forward).parameters]
    given = {**dict(zip(params, args, strict=False)), **kwargs}
    missing = [n for n in names if n not in given]
    if missing:
        raise InvalidExampleError(f"the package needs inputs {', '.join(names)}; no example for "
                                  f"{', '.join(missing)}. Pass --example NAME:SHAPE[:DTYPE] for each.")
    return {n: given[n] for n in names}
