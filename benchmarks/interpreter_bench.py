"""Time the MIL interpreter on the small zoo models, fp32 and fp16 programs.

    uv run python benchmarks/interpreter_bench.py [--repeat 20] [model ...]

For each model: compile with anefx (fp32 and fp16), save the .mlpackage, load it with
`anefx.mil.load_mlpackage` (timed: protobuf + weights), then time one run (median of --repeat after a
warm-up). Compilation is not timed. On a busy machine, OpenBLAS worker threads can stall a run by a
scheduler tick (runs of exactly 8, 16, 24 ms); `OPENBLAS_NUM_THREADS=1` gives steadier figures.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import anefx
from anefx import zoo
from anefx.mil import load_mlpackage


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_model(name: str, directory: Path, repeat: int) -> dict[str, float]:
    model, args, kwargs = zoo.build(name)
    row: dict[str, float] = {}
    for precision in ("fp32", "fp16"):
        compiled = anefx.compile(model, args, kwargs, precision=precision)
        path = compiled.save(directory / f"{name}_{precision}.mlpackage")
        start = time.perf_counter()
        runner = load_mlpackage(path, precision=precision)
        row[f"load_{precision}"] = (time.perf_counter() - start) * 1000
        feed = dict(zip(compiled.input_names, [a for a in args if isinstance(a, torch.Tensor)], strict=True))
        row[f"run_{precision}"] = median_ms(lambda runner=runner, feed=feed: runner(**feed), repeat)
        row["ops"] = len(runner.program.operations)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(zoo.MODELS))
    parser.add_argument("--repeat", type=int, default=20)
    options = parser.parse_args()
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print(f"{'model':<16}{'ops':>5}{'load fp32':>11}{'run fp32':>10}{'load fp16':>11}{'run fp16':>10}  (ms)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in options.models:
            try:
                r = bench_model(name, Path(tmp), options.repeat)
            except anefx.AnefxError as exc:  # a model the engine cannot compile: say so, go on
                print(f"{name:<16} not measured: {str(exc).splitlines()[0][:90]}")
                continue
            print(f"{name:<16}{r['ops']:>5}{r['load_fp32']:>11.1f}{r['run_fp32']:>10.2f}"
                  f"{r['load_fp16']:>11.1f}{r['run_fp16']:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
