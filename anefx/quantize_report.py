"""The quantization ladder: fp16 → int8 → lut6 → lut4, each rung's package bytes and fidelity.

    report = anefx.quantize_report(model, (ids,))
    print(report.rows)            # one LadderRow per rung
    report.plot("ladder.png")     # size vs fidelity

The model is compiled once (fp16); each rung quantizes that lowered program (anefx.quantize) and saves it.
Fidelity is measured by running each saved package in anefx's MIL interpreter with fp16 emulated, against
the fp32 model: PSNR per output for any model. For a causal LM (an `input_ids` input and a `logits` output
over the config's vocabulary) also, on a fixed token stream of the example's length (seeded, teacher-forced):
the share of positions whose top-1 token agrees with the fp16 package's, and the perplexity of the stream.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from anefx.errors import OptionError
from anefx.progress import Progress, reporter
from anefx.quantize import LADDER, MODES, QuantizeConfig, quantize_config

STREAM_SEED = 0


@dataclass
class LadderRow:
    mode: str
    bytes: int
    psnr_db: dict[str, float]  # output → PSNR against the fp32 model (fp16 emulated)
    size_ratio: float = 1.0  # bytes / the fp16 package's bytes
    top1_agreement: float | None = None  # causal LMs: top-1 tokens equal to the fp16 package's, share of positions
    perplexity: float | None = None  # causal LMs: of the fixed token stream, teacher-forced

    @property
    def min_psnr_db(self) -> float:
        return min(self.psnr_db.values(), default=float("nan"))


@dataclass
class QuantizeReport:
    rows: list[LadderRow]
    decoder: bool
    notes: list[str] = field(default_factory=list)

    def row(self, mode: str) -> LadderRow:
        return next(r for r in self.rows if r.mode == mode)

    def table(self, title: str = "quantization ladder") -> Any:
        """A rich Table of the rungs."""
        from rich.table import Table

        table = Table(title=title)
        for name in ("mode", "package", "× fp16", "PSNR dB (min)", *(("top-1 vs fp16", "perplexity")
                                                                  if self.decoder else ())):
            table.add_column(name, justify="left" if name == "mode" else "right")
        for r in self.rows:
            cells = [r.mode, human_bytes(r.bytes), f"{r.size_ratio:.3f}", f"{r.min_psnr_db:.1f}"]
            if self.decoder:
                cells += [f"{r.top1_agreement:.1%}", f"{r.perplexity:.1f}"]
            table.add_row(*cells)
        return table

    def plot(self, path: str | Path) -> Path:
        """A small PNG of package size (x) against fidelity (y: min PSNR, dB), one labelled point per rung."""
        from anefx.quantize_plot import write_ladder_png

        return write_ladder_png(self, Path(path))


def human_bytes(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB" if count >= 2**20 else f"{count / 2**10:,.0f} KiB"


def quantize_report(model: torch.nn.Module, example_args: Any, example_kwargs: dict | None = None, *,
                    modes: Sequence[str] = LADDER, group_size: int = 16, deployment_target: str = "iOS18",
                    compute_units: str = "CPU_AND_NE", progress: Progress = None) -> QuantizeReport:
    """Compile `model` once (fp16) and measure each rung of `modes`. See the module docstring."""
    from anefx.api import compile as anefx_compile

    configs = rung_configs(modes, group_size, deployment_target)
    with reporter(progress, "anefx.quantize_report") as say:
        compiled = anefx_compile(model, example_args, example_kwargs, deployment_target=deployment_target,
                                 compute_units=compute_units, package_check="skip",
                                 progress=lambda s: say(f"compile: {s}"))
        return measure_ladder(model, compiled, configs, say)


def measure_ladder(model: torch.nn.Module, compiled: Any, configs: dict[str, QuantizeConfig | None],
                   say: Any = print) -> QuantizeReport:
    """The rungs of `configs` (mode → config, fp16 first) measured on an fp16 CompiledModel of `model`."""
    call = _measured_call(model, compiled)
    reference = _reference(compiled, call)
    rows, baseline = [], None
    with tempfile.TemporaryDirectory(prefix="anefx-ladder-") as folder:
        for mode, config in configs.items():
            row, logits = _measure(compiled, mode, config, call, reference, Path(folder), say)
            if call.decoder:
                baseline = logits if baseline is None else baseline
                row.top1_agreement = float((logits.argmax(-1) == baseline.argmax(-1)).mean())
                row.perplexity = perplexity(logits, call.tokens)
            rows.append(row)
    for row in rows:
        row.size_ratio = row.bytes / rows[0].bytes
    return QuantizeReport(rows, call.decoder, notes=_notes(call))


def rung_configs(modes: Sequence[str], group_size: int, target: str) -> dict[str, QuantizeConfig | None]:
    if isinstance(modes, str) or not modes:
        raise OptionError(f"modes={modes!r}: pass a list of modes, e.g. {list(LADDER)}.")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise OptionError(f"modes: {', '.join(map(repr, bad))} not one of {', '.join(MODES)}.")
    if modes[0] != "fp16":
        modes = ["fp16", *[m for m in modes if m != "fp16"]]  # sizes and top-1 are relative to fp16
    return {m: quantize_config(QuantizeConfig(m, group_size=group_size), target) for m in modes}


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    decoder: bool = False
    tokens: np.ndarray | None = None  # the token stream (decoders)


def _measured_call(model: torch.nn.Module, compiled: Any) -> _Call:
    """The example, or for a causal LM the example with its input_ids replaced by a seeded token stream."""
    args, kwargs = compiled._example_call()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    ids_position = _input_ids_position(compiled, args, kwargs)
    if not vocab or ids_position is None or "logits" not in compiled.output_names:
        return _Call(args, kwargs)
    ids = args[ids_position] if isinstance(ids_position, int) else kwargs[ids_position]
    stream = torch.randint(0, int(vocab), tuple(ids.shape), generator=torch.Generator().manual_seed(STREAM_SEED))
    stream = stream.to(ids.dtype)
    if isinstance(ids_position, int):
        args = (*args[:ids_position], stream, *args[ids_position + 1:])
    else:
        kwargs = {**kwargs, ids_position: stream}
    return _Call(args, kwargs, decoder=True, tokens=stream.reshape(-1).numpy())


def _input_ids_position(compiled: Any, args: tuple, kwargs: dict) -> int | str | None:
    if "input_ids" in kwargs:
        return "input_ids"
    if compiled.input_names and compiled.input_names[0] == "input_ids" and args:
        return 0
    return None


def _reference(compiled: Any, call: _Call) -> list[torch.Tensor]:
    with torch.no_grad():
        positional, named = compiled._captured_form(call.args, call.kwargs)
        out = compiled.exported.module()(*positional, **named)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _measure(compiled: Any, mode: str, config: QuantizeConfig | None, call: _Call, reference: list[torch.Tensor],
             folder: Path, say: Any) -> tuple[LadderRow, np.ndarray | None]:
    from anefx.llm.compile import folder_bytes
    from anefx.mil import compare
    from anefx.quantize_apply import quantize_mlmodel

    rung = compiled
    if config is not None:
        groups = f", {config.group_size} channels per table" if "lut" in config.describe() else ""
        say(f"{mode}: quantize ({config.describe()}{groups})")
        rung = dataclasses.replace(compiled, mlmodel=quantize_mlmodel(compiled.mlmodel, config)[0], _runners={})
    saved = rung.save(folder / f"{mode}.mlpackage")
    say(f"{mode}: run the package (MIL interpreter, fp16)")
    with np.errstate(all="ignore"):
        outputs = rung.predict(*call.args, precision="fp16", **call.kwargs)
    psnr = {name: float(compare(outputs[name], ref).psnr_db)
            for name, ref in zip(compiled.output_names, reference, strict=True)}
    logits = outputs["logits"].reshape(-1, outputs["logits"].shape[-1]).astype(np.float64) if call.decoder else None
    return LadderRow(mode, folder_bytes(saved), psnr), logits


def perplexity(logits: np.ndarray, tokens: np.ndarray) -> float:
    """exp of the mean negative log-likelihood of tokens[1:] under logits[:-1] (teacher forcing)."""
    shifted = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -log_probs[np.arange(len(tokens) - 1), tokens[1:]]
    return float(math.exp(nll.mean()))


def _notes(call: _Call) -> list[str]:
    notes = ["PSNR: each package in the MIL interpreter (fp16 emulated) against the fp32 model"]
    if call.decoder:
        notes.append(f"top-1 and perplexity: a fixed token stream of {len(call.tokens)} tokens (seed {STREAM_SEED}), "
                     "teacher-forced; top-1 agreement with the fp16 package")
    return notes
