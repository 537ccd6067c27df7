"""`anefx.compile_llm`: an HF causal LM → a folder of stateful CoreML chunks with `prefill` and `decode`.

    lm = anefx.compile_llm(model, context_length=256, prefill_length=64)
    lm.save("tiny-llama")
    lm.generate(prompt_ids, max_new_tokens=32)

Steps: the model is captured twice through `CachedDecoder` (anefx.llm.capture) — `prefill` for
prefill_length tokens per call and `decode` for one — with its KV cache as buffers it writes in place.
Both programs go through the same verified rules as `anefx.compile`, are cut into the same consecutive
layer chunks, and each chunk's two programs are lowered and merged into one multifunction package whose
functions share the weights (stored once) and the cache states.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import ExportedProgram

from anefx.errors import OptionError
from anefx.llm.capture import CachedDecoder, StatefulModelError, export_stateful
from anefx.llm.manifest import FUNCTIONS, MANIFEST, ChunkSpec, FunctionSpec, LLMManifest, TensorSpec
from anefx.pipeline import PassRecord, Tolerance, run_pipeline
from anefx.progress import Progress, reporter
from anefx.rule import Rule

log = logging.getLogger("anefx")
STATE_ALIGN = 32  # CoreML states whose last dimension is not a multiple of 32 fail on the Neural Engine
MAX_DIM = 16384  # the largest tensor dimension the Neural Engine holds
DEFAULT_CHUNK_BYTES = 950_000_000  # iOS refuses model files past ~1 GB
DEFAULT_CHUNK_OPS = 10_000  # devices fail to compile programs past ~18k MIL ops


@dataclass
class LLMOptions:
    context_length: int
    prefill_length: int
    argmax_in_model: bool = False
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_chunk_ops: int = DEFAULT_CHUNK_OPS
    precision: str = "fp16"
    deployment_target: str = "iOS18"
    compute_units: str = "CPU_AND_NE"
    quantize: Any = None  # anefx.quantize: None, a mode, a per-part dict or a QuantizeConfig

    @property
    def cache_length(self) -> int:
        return -(-self.context_length // STATE_ALIGN) * STATE_ALIGN


def check_llm_options(options: LLMOptions) -> None:
    from anefx.lower import check_options
    from anefx.quantize_apply import check_quantize

    check_options(options.compute_units, options.deployment_target, options.precision, "split_heads")
    check_quantize(options.quantize, options.deployment_target)
    for name in ("context_length", "prefill_length", "max_chunk_bytes", "max_chunk_ops"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"{name}={value!r}: pass a positive integer.")
    if options.prefill_length > options.context_length:
        raise OptionError(f"prefill_length={options.prefill_length} is longer than context_length="
                          f"{options.context_length}; pass a prefill_length of at most the context length.")
    if options.deployment_target in ("iOS15", "iOS16", "iOS17"):
        raise OptionError(f"deployment_target={options.deployment_target!r}: a KV cache held as CoreML state needs "
                          "iOS18 (macOS 15) or later; pass deployment_target='iOS18'.")


@dataclass
class CompiledLLM:
    """The compiled chunks (in a temporary folder until `save`), their manifest, and what each stage did."""

    folder: Path
    manifest: LLMManifest
    passes: dict[str, list[PassRecord]]  # function → the rules' records
    rewritten: dict[str, ExportedProgram]  # function → the program after the rules (whole model, in torch)
    notes: list[str] = field(default_factory=list)
    package_check: Any = None  # anefx.package_check.PackageCheck: the saved chunks against the model
    _runtime: Any = None

    def save(self, path: str | Path) -> Path:
        """Write the folder (chunks + manifest) atomically: a folder written before by anefx is replaced
        only once the new one is complete; anything else at `path` is refused (FileWriteError)."""
        from anefx.files import atomic_folder_write

        return atomic_folder_write(path, lambda staged: shutil.copytree(self.folder, staged), MANIFEST,
                                   "a compiled LLM folder")

    def runtime(self, precision: str | None = None, backend: str = "auto") -> Any:
        from anefx.llm.runtime import LLM

        if self._runtime is None or (precision, backend) != self._runtime.key:
            self._runtime = LLM(self.folder, self.manifest, precision=precision, backend=backend)
        return self._runtime

    def generate(self, prompt_ids: Any, max_new_tokens: int = 32, *, precision: str | None = None,
                 backend: str = "auto", stop_at_eos: bool = True) -> list[int]:
        """Greedy generation from the compiled packages (CoreML on macOS, the MIL interpreter elsewhere)."""
        return self.runtime(precision, backend).generate(prompt_ids, max_new_tokens, stop_at_eos=stop_at_eos)


def compile_llm(model: torch.nn.Module, context_length: int = 256, prefill_length: int = 64, *,
                argmax_in_model: bool = False, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                max_chunk_ops: int = DEFAULT_CHUNK_OPS, rules: Sequence[Rule | str] | None = None,
                verify: bool = True, precision: str = "fp16", deployment_target: str = "iOS18",
                compute_units: str = "CPU_AND_NE", package_check: str = "warn",
                progress: Progress = None, quantize: Any = None, target: str = "coreml") -> CompiledLLM:
    """Compile an HF causal LM into stateful CoreML chunks (target="coreai": one Core AI model). See docs/llm.md."""
    if target != "coreml":  # anefx.lower.coreai_llm
        from anefx.lower.target import lowering_target

        lowering_target(target)  # known, its converter installed
        from anefx.lower.coreai_llm import compile_llm_coreai

        return compile_llm_coreai(model, context_length, prefill_length, rules=rules, verify=verify,
                                  compute_units=compute_units, progress=progress, argmax_in_model=argmax_in_model,
                                  quantize=quantize, precision=precision, deployment_target=deployment_target)
    from anefx.api import resolve_rules
    from anefx.package_check import CHECKS, report
    from anefx.quantize_apply import quantized_check

    options = LLMOptions(context_length, prefill_length, argmax_in_model, max_chunk_bytes, max_chunk_ops,
                         precision, deployment_target, compute_units, quantize)
    check_llm_options(options)
    if package_check not in CHECKS:
        raise OptionError(f"package_check={package_check!r} is not one of {', '.join(CHECKS)}.")
    chosen = resolve_rules(rules, compute_units)
    with reporter(progress, "anefx.compile_llm") as say:
        say("capture prefill and decode")
        decoder = CachedDecoder(model, options.cache_length)
        lengths = {"prefill": prefill_length, "decode": 1}
        programs = {fn: export_stateful(decoder, s) for fn, s in lengths.items()}
        rewritten, passes = {}, {}
        for fn, ep in programs.items():
            example = _example(decoder, lengths[fn], options.cache_length)
            rewritten[fn], passes[fn], _ = run_pipeline(
                ep, chosen, example, verify=verify, tolerance=Tolerance(), progress=lambda s, fn=fn: say(f"{fn}: {s}"),
                never_worse=rules is None)
        manifest = _manifest(model, options)
        outputs = _head_outputs(rewritten, manifest, options)
        folder = Path(tempfile.mkdtemp(prefix="anefx-llm-"))
        lm = CompiledLLM(folder, manifest, passes, rewritten)
        weakref.finalize(lm, shutil.rmtree, str(folder), ignore_errors=True)
        manifest.chunks = _lower_chunks(rewritten, options, folder, say, outputs)
        (folder / MANIFEST).write_text(lm.manifest.to_json(), encoding="utf-8")
        if package_check != "skip":
            say(f"check the chunks ({precision}, MIL interpreter)")
            lm.package_check = quantized_check(check_llm(lm, model), quantize)
    if lm.package_check is not None:
        report(lm.package_check, package_check)
    return lm


def check_llm(lm: CompiledLLM, model: torch.nn.Module) -> Any:
    """Run the saved chunks at their precision on one prefill block and two decode steps of random tokens
    and compare with the model's own logits (or its greedy tokens, with argmax_in_model)."""
    from anefx.mil import compare
    from anefx.package_check import MIN_PSNR, PackageCheck

    m = lm.manifest
    count = min(m.prefill_length + 2, m.context_length)
    ids = torch.randint(0, m.vocab_size, (1, count), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits[0].float().numpy()
    runtime = lm.runtime(m.precision)
    runtime.reset()
    result = PackageCheck(m.precision, min_psnr=MIN_PSNR[m.precision])
    with np.errstate(all="ignore"):
        if m.output == "argmax":
            tokens = np.array(runtime.next_tokens(ids[0].tolist(), 0))
            agreement = float((tokens == reference.argmax(-1)).mean())
            lm.notes.append(f"package check: the chunks' greedy tokens agree with the model's on {agreement:.0%} "
                            f"of {count} positions ({m.precision})")
            enough = 1.0 if m.precision == "fp32" else 0.9  # fp16 flips near-ties of the top two logits
            result.psnr_db["token"] = float("inf") if agreement >= enough else 0.0
            return result
        got = runtime.logits(ids[0].tolist(), 0)
    if not np.isfinite(got).all() and np.isfinite(reference).all():
        result.not_finite.append("logits")
    result.psnr_db["logits"] = float(compare(got, torch.from_numpy(reference)).psnr_db)
    return result


def _example(decoder: CachedDecoder, seq_len: int, cache_length: int) -> tuple[tuple, dict]:
    vocab = _vocab_size(decoder.model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, seq_len), generator=generator)
    position = torch.tensor([(cache_length - seq_len) // 2])  # past positions are read, later ones masked
    return (ids, position), {}


def _vocab_size(model: torch.nn.Module) -> int:
    text = model.config.get_text_config(decoder=True)
    vocab = getattr(text, "vocab_size", None)
    if not vocab:
        raise StatefulModelError(f"{type(model).__name__}'s config has no vocab_size.")
    return int(vocab)


def _manifest(model: torch.nn.Module, options: LLMOptions) -> LLMManifest:
    from anefx import __version__

    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) if generation is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    eos_ids = [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None]
    vocab = _vocab_size(model)
    return LLMManifest(
        model=type(model).__name__, context_length=options.context_length, cache_length=options.cache_length,
        prefill_length=options.prefill_length, vocab_size=vocab,
        output="argmax" if options.argmax_in_model else "logits", logits_pieces=[vocab],
        eos_token_ids=[e for e in eos_ids if 0 <= e < vocab], precision=options.precision,
        deployment_target=options.deployment_target, anefx_version=__version__)


def _head_outputs(rewritten: dict[str, ExportedProgram], manifest: LLMManifest, options: LLMOptions) -> list[str]:
    """The programs' outputs without a dimension over 16384: `token` and `token_logit` with argmax_in_model,
    else the logits — in pieces `logits_0..` when the vocabulary is wider (the programs change in place)."""
    from anefx.llm.head import argmax_in_model, logits_in_pieces

    if options.argmax_in_model:
        for fn, ep in rewritten.items():
            rewritten[fn] = argmax_in_model(ep)
        return ["token", "token_logit"]
    if manifest.vocab_size <= MAX_DIM:
        return ["logits"]
    for fn, ep in rewritten.items():
        rewritten[fn], manifest.logits_pieces = logits_in_pieces(ep)
    return [f"logits_{i}" for i in range(len(manifest.logits_pieces))]


def _lower_chunks(rewritten: dict[str, ExportedProgram], options: LLMOptions, folder: Path,
                  say: Any, outputs: list[str]) -> list[ChunkSpec]:
    """Cut both programs at the same layer boundaries, lower each chunk's two functions and merge them into
    one package per chunk."""
    from anefx.llm.chunks import plan_chunks, split_program

    say("plan chunks")
    per_float = 2 if options.precision == "fp16" else 4
    plan = plan_chunks([rewritten["prefill"], rewritten["decode"]], options.max_chunk_bytes,
                       options.max_chunk_ops, bytes_per_float=per_float)
    chunks = {fn: split_program(ep, plan, output_names=outputs, bytes_per_float=per_float)
              for fn, ep in rewritten.items()}
    specs = []
    for index, layers in enumerate(plan.ranges):
        name = f"chunk_{index}.mlpackage"
        singles = {}
        for fn in FUNCTIONS:
            say(f"lower chunk {index + 1}/{len(plan.ranges)} {fn}")
            chunk = chunks[fn][index]
            singles[fn] = _lower_one(chunk.program, options, folder / f".{index}-{fn}.mlpackage",
                                     chunk.inputs, chunk.outputs)
        say(f"merge chunk {index + 1}/{len(plan.ranges)} functions")
        _save_multifunction(singles, folder / name)
        spec = _chunk_spec(folder / name, [layers.start, layers.stop])
        spec.decode_only_bytes = folder_bytes(singles["decode"])
        for path in singles.values():
            shutil.rmtree(path, ignore_errors=True)
        specs.append(spec)
    return specs


def _lower_one(ep: ExportedProgram, options: LLMOptions, path: Path, inputs: list[str] | None = None,
               outputs: list[str] | None = None) -> Path:
    from anefx.lower import lower
    from anefx.quantize_apply import quantize_lowered

    inputs = inputs or list(ep.graph_signature.user_inputs)
    outputs = outputs or ["logits"]
    mlmodel = lower(ep, input_names=inputs, output_names=outputs, compute_units=options.compute_units,
                    deployment_target=options.deployment_target, precision=options.precision, load=False)
    mlmodel = quantize_lowered(mlmodel, options.quantize, options.deployment_target)  # before the merge: shared
    mlmodel.save(str(path))
    return path


def _save_multifunction(singles: dict[str, Path], target: Path) -> None:
    from anefx.lower import _quiet_coremltools

    ct = _quiet_coremltools()
    desc = ct.utils.MultiFunctionDescriptor()
    for fn, path in singles.items():
        desc.add_function(str(path), src_function_name="main", target_function_name=fn)
    desc.default_function_name = "decode"
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        ct.utils.save_multifunction(desc, str(target))


def _chunk_spec(path: Path, layers: list[int]) -> ChunkSpec:
    from anefx.mil.interpreter import output_types
    from anefx.mil.reader import read_program

    functions, states, largest = {}, [], 0
    for fn in FUNCTIONS:
        program = read_program(path, fn)
        functions[fn] = FunctionSpec(
            inputs=[_tensor_spec(n, t) for n, t in program.inputs],
            outputs=[_tensor_spec(n, t) for n, t in output_types(program)],
            ops=len(program.operations))
        states = [_tensor_spec(n, t) for n, t in program.states]
        largest = max(largest, largest_dimension(program))
    return ChunkSpec(file=path.name, layers=layers, functions=functions, states=states,
                     bytes=folder_bytes(path), largest_dim=largest)


def _tensor_spec(name: str, ttype: Any) -> TensorSpec:
    if ttype is None:
        return TensorSpec(name, [], "unknown")
    return TensorSpec(name, list(ttype.shape or []), str(np.dtype(ttype.dtype)))


def largest_dimension(program: Any) -> int:
    """The largest dimension of any tensor the program computes, takes or keeps as state."""
    shapes = [t.shape for op in program.operations for _, t in op.outputs if t is not None and t.shape]
    shapes += [t.shape for _, t in [*program.inputs, *program.states] if t.shape]
    return max((max(s) for s in shapes if s), default=0)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
