"""Helpers for kernel tests through a real conversion: a tiny torch module → coremltools → the interpreter."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from anefx.mil import compare, load_mlpackage
from anefx.mlpackage import histogram

logging.getLogger("coremltools").setLevel(logging.ERROR)


class Branches(torch.nn.Module):
    """Several calls on the same input, one output each: one conversion checks many variants."""

    def __init__(self, calls):
        super().__init__()
        self.calls = list(calls)

    def forward(self, x):
        return tuple(call(x) for call in self.calls)


def convert_module(module: torch.nn.Module, x: torch.Tensor, path: Path, precision: str = "fp32") -> Path:
    """`module` exported, converted by coremltools (its default passes) for iOS18 and saved at `path`."""
    import coremltools as ct

    exported = torch.export.export(module.eval(), (x,)).run_decompositions({})
    model = ct.convert(exported, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                       skip_model_load=True)
    model.save(str(path))
    return path


def run_module(module: torch.nn.Module, x: torch.Tensor, path: Path, op: str,
               precision: str = "fp32") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(interpreter outputs, torch outputs) of `module` on `x`, asserting the program holds `op`."""
    convert_module(module, x, path, precision)
    assert op in histogram(path), f"{op} was not emitted: {histogram(path)}"
    runner = load_mlpackage(path, precision)
    actual = runner(x=x.numpy())
    with torch.no_grad():
        expected = module(x)
    expected = list(expected) if isinstance(expected, tuple | list) else [expected]
    return [actual[name] for name in runner.output_names], [e.numpy() for e in expected]


def assert_close_to_torch(actual: list[np.ndarray], expected: list[np.ndarray], labels: list[str],
                          rtol: float = 1e-5) -> None:
    """Each output within `rtol` of its torch reference, relative to the reference's largest magnitude."""
    assert len(actual) == len(expected) == len(labels)
    for a, e, label in zip(actual, expected, labels, strict=True):
        assert a.shape == e.shape, f"{label}: shape {a.shape}, torch {e.shape}"
        report = compare(a, e)
        assert report.max_rel <= rtol, f"{label}: {report}"


def assert_psnr(actual: list[np.ndarray], expected: list[np.ndarray], labels: list[str], floor_db: float) -> None:
    for a, e, label in zip(actual, expected, labels, strict=True):
        report = compare(a, e)
        assert report.psnr_db >= floor_db, f"{label}: {report}"
