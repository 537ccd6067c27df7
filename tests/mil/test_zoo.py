"""End to end: every zoo model compiled by anefx, saved, read back and run by the MIL interpreter.

fp32 programs must compute the torch model's function (max error ≤ 1e-4 of the output's magnitude);
fp16 programs are run with fp16 emulation and scored by PSNR against the fp32 torch output.
`pytest tests/mil/test_zoo.py -s` prints the per-model table.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_leaves

from anefx import zoo
from anefx.mil import compare, load_mlpackage

PSNR_BAR_DB = 60.0  # ml-ane-transformers' bar for an fp16 model against its fp32 reference
PSNR_CHECKED = ("bert", "distilbert", "vit")


@dataclass
class ZooFigures:
    max_rel_fp32: float
    psnr_fp16: float  # worst output


_FIGURES: dict[str, ZooFigures] = {}


def torch_outputs(model, args, kwargs) -> list[np.ndarray]:
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs = {**kwargs, "use_cache": False}  # the compiled program returns no cache
    with torch.no_grad():
        out = model(*args, **kwargs)
    return [t.numpy() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def interpreted(name: str, precision: str, directory) -> tuple[dict, list[str], list[np.ndarray]]:
    """(outputs of the saved program run at `precision`, its output names, the torch outputs)."""
    import anefx

    model, args, kwargs = zoo.build(name)
    compiled = anefx.compile(model, args, kwargs, precision=precision)
    path = compiled.save(directory / f"{name}_{precision}.mlpackage")
    runner = load_mlpackage(path, precision=precision)
    assert runner.output_names == compiled.output_names
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    outputs = runner(**dict(zip(compiled.input_names, tensors, strict=True)))
    return outputs, compiled.output_names, torch_outputs(model, args, kwargs)


def figures(name: str, tmp_path_factory) -> ZooFigures:
    if name not in _FIGURES:
        directory = tmp_path_factory.mktemp(name)
        out32, names, ref = interpreted(name, "fp32", directory)
        out16, names16, _ = interpreted(name, "fp16", directory)
        assert len(names) == len(ref) == len(names16)
        _FIGURES[name] = ZooFigures(
            max_rel_fp32=max(compare(out32[n], r).max_rel for n, r in zip(names, ref, strict=True)),
            psnr_fp16=min(compare(out16[n], r).psnr_db for n, r in zip(names16, ref, strict=True)))
    return _FIGURES[name]


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_fp32_program_computes_the_torch_model(name, tmp_path_factory):
    assert figures(name, tmp_path_factory).max_rel_fp32 <= 1e-4


@pytest.mark.parametrize("name", PSNR_CHECKED)
def test_fp16_program_psnr(name, tmp_path_factory):
    assert figures(name, tmp_path_factory).psnr_fp16 >= PSNR_BAR_DB


def test_print_zoo_table(tmp_path_factory):
    rows = [(name, figures(name, tmp_path_factory)) for name in zoo.MODELS]
    print("\nmodel            max rel err (fp32)   PSNR fp16 vs torch fp32")
    for name, f in rows:
        print(f"{name:<16} {f.max_rel_fp32:>18.2e}   {f.psnr_fp16:>10.1f} dB")
    assert all(np.isfinite(f.psnr_fp16) for _, f in rows)


@pytest.mark.skipif(sys.platform != "darwin", reason="CoreML predicts only on macOS")
def test_interpreter_matches_coreml_predict(tmp_path):
    import anefx

    model, args, kwargs = zoo.build("bert")
    compiled = anefx.compile(model, args, kwargs)  # fp16, as shipped
    runner = load_mlpackage(compiled.save(tmp_path / "bert.mlpackage"), precision="fp16")
    feed = {n: t.to(torch.int32).numpy() for n, t in zip(compiled.input_names, args, strict=True)}
    expected = compiled.mlmodel.predict(feed)
    actual = runner(**feed)
    for name in compiled.output_names:
        assert compare(actual[name], expected[name]).psnr_db >= PSNR_BAR_DB
