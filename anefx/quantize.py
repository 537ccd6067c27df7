"""Weight quantization of a lowered ML program: `quantize="int8" | "lut8" | "lut6" | "lut4"`, or per part.

    anefx.compile(model, example, quantize="lut4")
    anefx.compile(model, example, quantize={"embeddings": "int8", "head": "lut6", "default": "lut4"})
    anefx.compile(model, example, quantize=QuantizeConfig("lut4", group_size=32))

Modes: `int8` is per-channel symmetric linear quantization (`constexpr_blockwise_shift_scale` from iOS18 on,
`constexpr_affine_dequantize` before); `lutN` is k-means palettization with one 2^N-entry lookup table per
group of `group_size` output channels (`constexpr_lut_to_dense`, iOS18); `fp16` keeps a part as it is.
Both go through `coremltools.optimize.coreml` on the lowered program, one config per weight by name.

What is a weight: a float const of at least `min_weight_elements` elements that a conv, conv_transpose,
linear or matmul multiplies, or that a gather reads rows from. Norm scales, biases and anything smaller
stay fp16. Parts are found in the program itself:

- `embeddings`: the weights gathers read rows from (token, position, type embeddings; one per piece when
  a wide table was split);
- `head`: the weights of the projections an output is computed from through data movement and
  elementwise ops with constants alone (reshape, transpose, concat of pieces, cast, bias add, tanh, ...):
  the LM head, a classifier, BERT's pooler — not a layer whose output still goes through a residual add;
- `default`: every other weight.
A weight both parts name (tied embeddings kept as one const) takes the head's mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anefx.errors import OptionError

MODES = ("fp16", "int8", "lut8", "lut6", "lut4")
LADDER = ("fp16", "int8", "lut6", "lut4")
PARTS = ("embeddings", "head", "default")
LUT_TARGETS = ("iOS18", "macOS15")
WEIGHT_OPS = {"conv": ("weight",), "conv_transpose": ("weight",), "linear": ("weight",), "matmul": ("x", "y"),
              "gather": ("x",)}
PASS_THROUGH = frozenset({"reshape", "transpose", "squeeze", "expand_dims", "concat", "cast", "identity",
                          "slice_by_index", "slice_by_size", "split", "add", "sub", "mul", "real_div", "tanh",
                          "sigmoid", "softmax", "clip", "relu", "gelu", "silu"})


@dataclass
class QuantizeConfig:
    """`mode` is the default part's mode; `embeddings` / `head` override it for those parts (None: the
    default's mode). `group_size`: output channels sharing one lookup table (lut modes; when it does not divide a
    weight's channel count, the largest divisor below it is used). `min_weight_elements`: smaller consts stay fp16."""

    mode: str = "lut4"
    embeddings: str | None = None
    head: str | None = None
    group_size: int = 16
    min_weight_elements: int = 2048

    def mode_of(self, part: str) -> str:
        chosen = self.embeddings if part == "embeddings" else self.head if part == "head" else None
        return chosen or self.mode

    def modes(self) -> set[str]:
        return {self.mode_of(p) for p in PARTS}

    def describe(self) -> str:
        if self.embeddings is None and self.head is None:
            return self.mode
        return ", ".join(f"{p}={self.mode_of(p)}" for p in PARTS)


def quantize_config(value: str | Mapping[str, Any] | QuantizeConfig | None,
                    deployment_target: str = "iOS18") -> QuantizeConfig | None:
    """The checked config of a `quantize=` argument (None: no quantization)."""
    if value is None:
        return None
    if isinstance(value, str):
        config = QuantizeConfig(_mode(value, "quantize"))
    elif isinstance(value, QuantizeConfig):
        config = value
    elif isinstance(value, Mapping):
        config = _from_mapping(value)
    else:
        raise OptionError(f"quantize={value!r}: pass one of {', '.join(MODES)}, a dict such as "
                          "{'embeddings': 'int8', 'head': 'lut6', 'default': 'lut4'}, or anefx.QuantizeConfig.")
    _check(config, deployment_target)
    return None if config.modes() == {"fp16"} else config


def _from_mapping(value: Mapping[str, Any]) -> QuantizeConfig:
    allowed = (*PARTS, "mode", "group_size", "min_weight_elements")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise OptionError(f"quantize has unknown key(s) {', '.join(map(repr, unknown))}; the keys are the parts "
                          f"{', '.join(PARTS)} (a mode each) and mode, group_size, min_weight_elements.")
    if "mode" in value and "default" in value:
        raise OptionError("quantize names both 'mode' and 'default' (the same thing); keep one of them.")
    mode = value.get("default", value.get("mode", "fp16" if set(value) & {"embeddings", "head"} else "lut4"))
    return QuantizeConfig(mode=mode, embeddings=value.get("embeddings"), head=value.get("head"),
                          group_size=value.get("group_size", 16),
                          min_weight_elements=value.get("min_weight_elements", 2048))


def _check(config: QuantizeConfig, deployment_target: str) -> None:
    _mode(config.mode, "quantize mode")
    for part in ("embeddings", "head"):
        if getattr(config, part) is not None:
            _mode(getattr(config, part), f"quantize[{part!r}]")
    for name in ("group_size", "min_weight_elements"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"quantize {name}={value!r}: pass a positive integer (e.g. group_size=16 or 32).")
    luts = sorted(m for m in config.modes() if m.startswith("lut"))
    if luts and deployment_target not in LUT_TARGETS:
        raise OptionError(f"quantize={luts[0]!r} (per-grouped-channel palettization) needs deployment_target "
                          f"iOS18 or macOS15, not {deployment_target!r}; pass deployment_target='iOS18', or "
                          "quantize='int8', which runs from iOS16 on.")


def _mode(value: Any, what: str) -> str:
    if value not in MODES:
        raise OptionError(f"{what}={value!r} is not one of {', '.join(MODES)}.")
    return value


# -- finding the weights and their parts ----------------------------------------------------------------

@dataclass
class Weight:
    name: str  # the const op's name in the program
    part: str
    elements: int


def program_weights(prog: Any, min_elements: int) -> list[Weight]:
    """The weights of a pymil program (its main function) with the part each belongs to."""
    block = prog.functions["main"]
    ops = list(block.operations)
    found: dict[str, Weight] = {}
    for op in ops:
        for arg in WEIGHT_OPS.get(op.op_type, ()):
            var = op.inputs.get(arg)
            source = var.op if var is not None else None
            if source is None or source.op_type != "const" or not _is_float_array(source, min_elements):
                continue
            part = "embeddings" if op.op_type == "gather" else "default"
            known = found.get(source.name)
            if known is None or known.part == "default":
                found[source.name] = Weight(source.name, part, int(source.outputs[0].val.size))
    for name in head_weights(block):
        if name in found:
            found[name].part = "head"
    return list(found.values())


def _is_float_array(op: Any, min_elements: int) -> bool:
    value = op.outputs[0].val
    return isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size >= min_elements


def head_weights(block: Any) -> set[str]:
    """The weight consts of the projections an output is computed from through pass-through ops only."""
    names: set[str] = set()
    stack = [v.op for v in block.outputs if v.op is not None]
    seen: set[int] = set()
    while stack:
        op = stack.pop()
        if id(op) in seen:
            continue
        seen.add(id(op))
        if op.op_type in WEIGHT_OPS and op.op_type != "gather":
            names.update(v.op.name for a in WEIGHT_OPS[op.op_type] if (v := op.inputs.get(a)) is not None
                         and v.op is not None and v.op.op_type == "const")
            continue
        if op.op_type not in PASS_THROUGH:
            continue
        computed = [v.op for v in _input_vars(op) if v.op is not None and v.op.op_type != "const"]
        if op.op_type != "concat" and len(computed) > 1:
            continue  # a residual add or a product of two computed tensors: not a head any more
        stack.extend(computed)
    return names


def _input_vars(op: Any) -> list[Any]:
    out = []
    for value in op.inputs.values():
        out.extend(value if isinstance(value, list | tuple) else [value])
    return out


@dataclass
class QuantizePlan:
    """Which part and mode each weight got: const name → (part, mode); mode "fp16" leaves it as it is."""
    weights: dict[str, tuple[str, str]] = field(default_factory=dict)

    def count(self, mode: str) -> int:
        return sum(1 for _, m in self.weights.values() if m == mode)

    def parts(self, part: str) -> dict[str, str]:
        return {n: m for n, (p, m) in self.weights.items() if p == part}


def plan_weights(prog: Any, config: QuantizeConfig) -> QuantizePlan:
    plan = QuantizePlan()
    for w in program_weights(prog, config.min_weight_elements):
        plan.weights[w.name] = (w.part, config.mode_of(w.part))
    return plan


__all__ = ["LADDER", "MODES", "PARTS", "QuantizeConfig", "QuantizePlan", "plan_weights", "program_weights",
           "quantize_config"]
