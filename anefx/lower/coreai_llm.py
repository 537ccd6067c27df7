"""compile_llm(..., target="coreai"): the stateful prefill and decode programs as one Core AI model.

The same capture and verified rules as the Core ML path (anefx.llm.compile): the KV cache is written in place by
`anefx::slice_write` (a Core AI `slice_update`), and its buffers become Core AI states (`state_names`, handles in
the program). Both functions go into one .aimodel as two entry points, `prefill` and `decode`, sharing their
weights; there are no chunks (max_chunk_bytes / max_chunk_ops do not apply).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from anefx.errors import OptionError
from anefx.lower.coreai import ASSET_MARKER, SUFFIX, aimodel_path, cannot_run_message, require_coreai
from anefx.lower.target import CannotRunError

FUNCTIONS = ("prefill", "decode")
CORE_ML_ONLY = {"argmax_in_model": False, "quantize": None}  # option → its default


@dataclass
class CoreAILLM:
    """A compiled LLM as one Core AI model: `prefill` and `decode` entry points, the KV cache as states."""

    program: Any
    rewritten: dict[str, ExportedProgram]
    passes: dict[str, Any]
    input_names: list[str]
    output_names: list[str]
    state_names: list[str]
    context_length: int
    prefill_length: int
    notes: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> Path:
        """Write the .aimodel folder (suffix added when missing), atomically; anything else there is refused."""
        from anefx.files import atomic_folder_write

        return atomic_folder_write(aimodel_path(path), self.program.save_asset, ASSET_MARKER,
                                   "a Core AI model (.aimodel)")

    def report(self) -> dict[str, dict[str, Any]]:
        """Per entry point: the structural figures of the saved program (anefx.lower.coreai_report)."""
        from anefx.lower.coreai_report import aimodel_report

        with tempfile.TemporaryDirectory(prefix="anefx-") as folder:
            saved = self.save(Path(folder) / f"llm{SUFFIX}")
            return {fn: aimodel_report(saved, fn).as_json() for fn in FUNCTIONS}

    def generate(self, prompt_ids: Any, max_new_tokens: int = 32, **_: Any) -> Any:
        raise CannotRunError(cannot_run_message() + " anefx does not run a Core AI LLM yet; compile_llm "
                             "with target='coreml' for anefx.load_llm(...).generate.")


def compile_llm_coreai(model: torch.nn.Module, context_length: int, prefill_length: int, *, rules: Any,
                       verify: bool, compute_units: str, progress: Any, **options: Any) -> CoreAILLM:
    """compile_llm(..., target="coreai"): capture prefill/decode, the verified rules, one two-entry .aimodel."""
    from anefx.api import resolve_rules
    from anefx.llm.capture import CachedDecoder, export_stateful
    from anefx.llm.compile import LLMOptions, _example, _head_outputs, _manifest, check_llm_options
    from anefx.pipeline import Tolerance, run_pipeline
    from anefx.progress import reporter

    require_coreai()
    _refuse_core_ml_options(options)
    llm_options = LLMOptions(context_length, prefill_length, False, 1 << 62, 1 << 62, options.get("precision", "fp16"),
                             options.get("deployment_target", "iOS18"), compute_units, None)
    check_llm_options(llm_options)
    chosen = resolve_rules(rules, compute_units)
    with reporter(progress, "anefx.compile_llm") as say:
        say("capture prefill and decode")
        decoder = CachedDecoder(model, llm_options.cache_length)
        lengths = {"prefill": prefill_length, "decode": 1}
        rewritten, passes = {}, {}
        for fn, length in lengths.items():
            rewritten[fn], passes[fn], _ = run_pipeline(
                export_stateful(decoder, length), chosen, _example(decoder, length, llm_options.cache_length),
                verify=verify, tolerance=Tolerance(), progress=lambda s, fn=fn: say(f"{fn}: {s}"),
                never_worse=rules is None)
        outputs = _head_outputs(rewritten, _manifest(model, llm_options), llm_options)
        say("lower (coreai): prefill and decode")
        inputs = list(rewritten["decode"].graph_signature.user_inputs)
        program = lower_entry_points(rewritten, inputs, outputs, list(decoder.state_names))
    return CoreAILLM(program, rewritten, passes, inputs, outputs, list(decoder.state_names), context_length,
                     prefill_length)


def lower_entry_points(programs: dict[str, ExportedProgram], inputs: list[str], outputs: list[str],
                       states: list[str]) -> Any:
    """One AIProgram with an entry point per program, the states by name."""
    from anefx.lower.coreai import convert_staged

    return convert_staged([(fn, ep, inputs, outputs, states) for fn, ep in programs.items()])


def _refuse_core_ml_options(options: dict[str, Any]) -> None:
    given = [name for name, unset in CORE_ML_ONLY.items() if options.get(name, unset) != unset]
    if given:
        raise OptionError(f"compile_llm(target='coreai') makes one Core AI model with prefill and decode; "
                          f"{', '.join(f'{n}=' for n in given)} work with target='coreml' only. Drop "
                          f"{'them' if len(given) > 1 else 'it'}, or compile for Core ML.")
