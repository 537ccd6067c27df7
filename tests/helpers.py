"""Assertions shared by the tests: op counts in graphs and in saved programs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from anefx.graph import op_histogram
from anefx.mil.summary import ane_summary, const_arg  # noqa: F401 - re-exported for the tests
from anefx.mlpackage import OpRecord, program_ops


def ops(ep) -> Counter:
    return op_histogram(ep.graph_module)


def tensors(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def assert_outputs_close(actual, expected, rtol=1e-4, atol=1e-5) -> None:
    a, e = tensors(actual), tensors(expected)
    assert len(a) == len(e)
    for x, y in zip(a, e, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def saved_ops(compiled, tmp_path: Path) -> list[OpRecord]:
    return program_ops(compiled.save(tmp_path / "model.mlpackage"))


def consumers(records: list[OpRecord], name: str) -> list[OpRecord]:
    return [r for r in records if any(name in bound for bound in r.inputs.values())]


def gamma_multiplies_after_norms(records: list[OpRecord]) -> list[str]:
    """Names of layer_norm outputs that are multiplied by something (directly or after a slice)."""
    const_names = {o[0] for r in records if r.type == "const" for o in r.outputs}
    found = []
    for norm in (r for r in records if r.type == "layer_norm"):
        frontier = [norm.outputs[0][0]]
        while frontier:
            name = frontier.pop()
            for user in consumers(records, name):
                if user.type in ("slice_by_index", "slice_by_size", "cast", "split"):
                    frontier.extend(o[0] for o in user.outputs)
                elif user.type == "mul" and any(b in const_names for v in user.inputs.values() for b in v):
                    found.append(norm.outputs[0][0])
    return found


def rewrite(model: torch.nn.Module, args: tuple, rules: list, kwargs: dict | None = None, verify=True):
    """Capture and run the pipeline with `rules` only (no lowering): (before, after, records)."""
    from anefx.capture import capture
    from anefx.pipeline import run_pipeline

    cap = capture(model, args, kwargs)
    after, records, snapshots = run_pipeline(cap.exported, rules, (cap.args, cap.kwargs), verify=verify,
                                             never_worse=False)  # the rules under test, as chosen
    return dict(snapshots)["legalize"], after, records


def program(compiled, tmp_path: Path):
    """The saved package read back (anefx.mil.read_program): operations, constants, shapes."""
    from anefx.mil import read_program

    return read_program(compiled.save(tmp_path / "model.mlpackage"))
