"""A MIL interpreter: run a saved .mlpackage in numpy, on any OS.

CoreML runs only on macOS; this runs the ML program anefx wrote, read back from disk, so its outputs can
be compared with the PyTorch model's anywhere.

    runner = anefx.mil.load_mlpackage("model.mlpackage", precision="fp32")
    outputs = runner(input_ids=ids)  # {output name: np.ndarray}, in runner.output_names order

What is read: the program from `Data/com.apple.CoreML/model.mlmodel` and the weights from the package's
own `weights/weight.bin` (parsed with numpy, `anefx.mil.blob`). Each MIL op runs as a numpy kernel
following the MIL op reference (coremltools `mil/ops/defs/iOS15..iOS18`); an op without a kernel is an
`UnsupportedOpError` when the package is loaded, naming the op type and its output. `SUPPORTED_OPS`
lists the kernels.

Precision — what the numbers mean:

- `precision="fp32"` evaluates every float tensor in float32. An fp16 program is run as if it were
  fp32: its fp16 constants are widened to float32 (their values stay the fp16-rounded ones) and its
  casts to fp16 keep float32. This checks the program's *math* against torch at ~1e-5.
- `precision="fp16"` emulates the fp16 program: after every op, every float tensor is rounded to
  float16 (round to nearest even; it is held as its exact float32 value between ops), including
  tensors the program declares fp32 and the inputs, as on the Neural Engine. Inside one op, kernels
  compute in float32: conv, matmul, linear, einsum, reductions, softmax, layer/instance/batch norm and
  fused activations accumulate in float32 and round their result once. The fused
  scaled_dot_product_attention also rounds its scores (after scaling and adding a float mask) and its
  softmax probabilities to fp16, as its unfused matmul/softmax/matmul form would. Real hardware may
  accumulate differently (the ANE's accumulators are not documented), so treat the figures as an
  honest fp16 estimate, not a bit-exact replay.

Outputs come back in the program's declared output dtype (float32 for any float output under "fp32").
Integer inputs (e.g. int64 token ids, numpy or torch) are cast to the program's input type (int32).
States (iOS18 `read_state`/`write_state`/`coreml_update_state`) live in `runner.states`, start at zero,
persist across calls, and can be set by passing a state's name as an input; `runner.reset_states()`.

Index rule: from iOS17 on, MIL gathers read a negative index as out of bound (undefined on device);
the interpreter raises `MilRuntimeError` for any out-of-bound index instead of guessing.
"""

from __future__ import annotations

from pathlib import Path

from anefx.mil import ops_constexpr, ops_conv_transpose, ops_pool, ops_rearrange, ops_resample  # noqa: F401 (kernels)
from anefx.mil.errors import MilError, MilInputError, MilProgramError, MilRuntimeError, UnsupportedOpError
from anefx.mil.interpreter import MilRunner, check_precision
from anefx.mil.metrics import ErrorReport, compare, compare_outputs, psnr
from anefx.mil.reader import Program, read_program
from anefx.mil.registry import KERNELS

SUPPORTED_OPS: tuple[str, ...] = tuple(sorted({"const", *KERNELS}))


def load_mlpackage(path: str | Path, precision: str = "fp32", function: str = "main") -> MilRunner:
    """A callable runner for the ML program saved at `path`: `runner(**inputs) -> {name: array}`."""
    check_precision(precision)  # before reading the package
    return MilRunner(read_program(path, function), precision)


__all__ = [
    "SUPPORTED_OPS", "ErrorReport", "MilError", "MilInputError", "MilProgramError", "MilRunner",
    "MilRuntimeError", "Program", "UnsupportedOpError", "compare", "compare_outputs", "load_mlpackage",
    "psnr", "read_program",
]
