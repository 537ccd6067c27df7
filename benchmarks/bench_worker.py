"""One measurement, in its own process: build a model, compile it one way, save it, read it back.

Timed: everything from the built model to the saved .mlpackage (export, graph fixes / rules,
ct.convert, save). Memory: the process's peak RSS (ru_maxrss) when the package is on disk, which
includes the model's own weights; the RSS right after the model is built is recorded beside it.
The fp32 reference output and the fp16 interpreter run come after both figures are taken.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import resource
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_models
import torch
from program_stats import fp16_psnr, program_stats
from torch.utils import _pytree as pytree

PATHS = ("plain", "anefx")


def current_rss() -> int:
    """Resident bytes now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in [*model.parameters(), *model.buffers()]}
    return sum(tensors.values())


class Stages:
    """Wall-clock seconds per named stage, from progress messages."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._name, self._start = "", time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        if self._name:
            self.times[self._name] = self.times.get(self._name, 0.0) + now - self._start
        self._name, self._start = name, now

    def stop(self) -> None:
        self("")


def compile_plain(model, args: tuple, kwargs: dict, path: Path, say: Callable[[str], None]) -> list[str]:
    """torch.export + run_decompositions({}) + the graph fixes coremltools needs, ct.convert, save."""
    import coremltools as ct

    from anefx.capture import check_inputs, default_kwargs, export
    from anefx.legalize import legalize

    say("export")
    args, kwargs = check_inputs(model, args, kwargs)
    ep = export(model, args, default_kwargs(model, kwargs, []))
    say("legalize")
    legalize(ep)
    say("ct.convert")
    specs = ep.graph_signature.input_specs
    placeholders = {n.name: n for n in ep.graph_module.graph.nodes if n.op == "placeholder"}
    inputs = [_tensor_type(ct, s.arg.name, placeholders[s.arg.name].meta["val"])
              for s in specs if s.kind.name == "USER_INPUT"]
    with contextlib.redirect_stderr(io.StringIO()):  # tqdm bars, as anefx.lower silences them
        mlmodel = ct.convert(ep, convert_to="mlprogram", inputs=inputs,
                             minimum_deployment_target=ct.target.iOS18,
                             compute_units=ct.ComputeUnit.CPU_AND_NE,
                             compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    say("save")
    mlmodel.save(str(path))
    return [t.name for t in inputs]


def _tensor_type(ct, name: str, val: torch.Tensor):
    import numpy as np

    dtype = {torch.int64: np.int32, torch.int32: np.int32, torch.bool: bool}.get(val.dtype, np.float32)
    return ct.TensorType(name=name, shape=tuple(int(d) for d in val.shape), dtype=dtype)


def compile_anefx(model, args: tuple, kwargs: dict, path: Path, say: Callable[[str], None]) -> list[str]:
    import anefx

    compiled = anefx.compile(model, args, kwargs, progress=say)
    say("save")
    compiled.save(path)
    return compiled.input_names


def reference(model, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    from anefx.capture import default_kwargs

    with torch.no_grad():
        out = model(*args, **default_kwargs(model, kwargs, []))
    return [t.float() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def measure(model_name: str, path_name: str, quick: bool, workdir: Path) -> dict[str, Any]:
    spec = bench_models.find(model_name, quick)
    rss_start = current_rss()
    model, args, kwargs = bench_models.build(spec)
    gc.collect()
    row: dict[str, Any] = {"model": model_name, "label": spec.label, "path": path_name,
                           "weight_bytes": weight_bytes(model), "rss_start": rss_start,
                           "rss_built": current_rss(), "peak_built": peak_rss()}
    package = workdir / f"{model_name}.{path_name}.mlpackage"
    stages = Stages()
    start = time.perf_counter()
    compile_fn = compile_plain if path_name == "plain" else compile_anefx
    compile_fn(model, args, kwargs, package, stages)
    stages.stop()
    row["seconds"] = time.perf_counter() - start
    row["peak_rss"] = peak_rss()
    row["stages"] = stages.times
    gc.collect()
    row.update(program_stats(package))
    inputs = [a.numpy() for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    try:
        row.update(fp16_psnr(package, inputs, [t.numpy() for t in reference(model, args, kwargs)]))
    except Exception as exc:  # noqa: BLE001 - a program the interpreter cannot run: say why, keep the row
        row["psnr_db"], row["psnr_error"] = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return row


def run_worker(model_name: str, path_name: str, quick: bool, workdir: Path, out: Path) -> None:
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    import coremltools  # noqa: F401 - imports are not part of a compile's time
    import transformers  # noqa: F401

    import anefx  # noqa: F401
    import anefx.ops  # noqa: F401
    import rewrites  # noqa: F401

    row = measure(model_name, path_name, quick, workdir)
    out.write_text(json.dumps(row, indent=1, default=float))
