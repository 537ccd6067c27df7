"""Run a compiled LLM folder: `anefx.load_llm(folder).generate(prompt_ids, max_new_tokens)`.

On macOS the chunks run in CoreML, each with one `MLState` its `prefill` and `decode` functions share.
Elsewhere anefx's MIL interpreter runs the same saved programs (`precision="fp32"`: the programs' math,
states kept in fp32; `"fp16"`: every tensor and the states rounded to fp16, as on the device).

A prompt goes in through `prefill` in blocks of prefill_length tokens (a shorter last block is padded
and its padding positions are overwritten later, never read: the model's causal mask hides every cache
position after the current one); a block that would run past the end of the cache, and every generated
token, goes through `decode`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from anefx.errors import AnefxError, InvalidExampleError, OptionError
from anefx.llm.manifest import FUNCTIONS, LLMManifest

BACKENDS = ("auto", "coreml", "interpreter")


class ContextFullError(AnefxError):
    """A generation needs more positions than the compiled context holds."""


class LLM:
    """A compiled LLM folder, loaded for generation."""

    def __init__(self, folder: str | Path, manifest: LLMManifest | None = None, *, precision: str | None = None,
                 backend: str = "auto"):
        self.folder = Path(folder)
        self.manifest = manifest or LLMManifest.read(self.folder)
        if backend not in BACKENDS:
            raise OptionError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}.")
        self.key = (precision, backend)
        use_coreml = backend == "coreml" or (backend == "auto" and _coreml_runs())
        if backend == "coreml" and not _coreml_runs():
            raise OptionError("backend='coreml' needs macOS with coremltools' native runtime; use "
                              "backend='interpreter' (anefx's MIL interpreter) here.")
        self.precision = precision or self.manifest.precision
        if use_coreml:
            self.chunks = [_CoreMLChunk(self.folder / c.file) for c in self.manifest.chunks]
        else:
            from anefx.mil import check_precision

            check_precision(self.precision)
            self.chunks = [_InterpretedChunk(self.folder / c.file, self.precision) for c in self.manifest.chunks]
        self.backend = "coreml" if use_coreml else "interpreter"

    # -- generation ------------------------------------------------------------------------------------
    def generate(self, prompt_ids: Any, max_new_tokens: int = 32, *, stop_at_eos: bool = True) -> list[int]:
        """Greedy decoding: the new token ids (stopping after an end-of-sequence id when stop_at_eos)."""
        ids = self._tokens(prompt_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise OptionError(f"max_new_tokens={max_new_tokens!r}: pass a non-negative integer.")
        self._check_room(len(ids), max_new_tokens)
        if max_new_tokens == 0:
            return []
        self.reset()
        token = self.next_tokens(ids, 0)[-1]
        new, position = [token], len(ids)
        while len(new) < max_new_tokens and not (stop_at_eos and token in self.manifest.eos_token_ids):
            token = self.next_tokens([token], position)[-1]
            new.append(token)
            position += 1
        return new

    def reset(self) -> None:
        """An empty cache (every state back to zeros)."""
        for chunk in self.chunks:
            chunk.reset()

    def next_tokens(self, ids: list[int], start: int) -> list[int]:
        """Feed `ids` at cache positions start.. and return the greedy next token after each of them."""
        if self.manifest.output == "argmax":
            return [int(t) for t in self._feed(ids, start, "token")]
        return [int(row.argmax()) for row in self._feed(ids, start, "logits")]

    def logits(self, ids: list[int], start: int) -> np.ndarray:
        """Feed `ids` at cache positions start.. and return their logits, (len(ids), vocab) float32."""
        if self.manifest.output == "argmax":
            raise OptionError("this LLM was compiled with argmax_in_model=True: it returns token ids, not "
                              "logits. Compile without it to read logits.")
        return np.stack(self._feed(ids, start, "logits"))

    # -- calls -----------------------------------------------------------------------------------------
    def _feed(self, ids: list[int], start: int, what: str) -> list[np.ndarray]:
        self._check_room(start + len(ids), 0)
        rows: list[np.ndarray] = []
        block = self.manifest.prefill_length
        i = 0
        while len(ids) - i > 1 and start + i + block <= self.manifest.cache_length:
            real = min(block, len(ids) - i)
            chunk_ids = ids[i:i + real] + [0] * (block - real)  # padding: written after the prompt, never read
            rows += self._rows(self._call("prefill", chunk_ids, start + i), what)[:real]
            i += real
        for j in range(i, len(ids)):
            rows += self._rows(self._call("decode", [ids[j]], start + j), what)
        return rows

    def _call(self, function: str, ids: list[int], position: int) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = {"input_ids": np.array([ids], dtype=np.int32),
                                         "position": np.array([position], dtype=np.int32)}
        for chunk, spec in zip(self.chunks, self.manifest.chunks, strict=True):
            wanted = [t.name for t in spec.functions[function].inputs]
            values.update(chunk.run(function, {name: values[name] for name in wanted}))
        return values

    def _rows(self, values: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
        if what == "token":
            tokens = np.asarray(values["token"]).reshape(-1)
            return list(tokens)
        pieces = ["logits"] if "logits" in values else [f"logits_{i}" for i in range(len(self.manifest.logits_pieces))]
        logits = np.concatenate([np.asarray(values[p], dtype=np.float32) for p in pieces], axis=-1)
        return list(logits.reshape(-1, logits.shape[-1]))

    # -- checks ----------------------------------------------------------------------------------------
    def _tokens(self, prompt_ids: Any) -> list[int]:
        array = np.asarray(prompt_ids.detach().cpu() if hasattr(prompt_ids, "detach") else prompt_ids)
        if array.ndim == 2 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 1 or array.size == 0 or array.dtype.kind not in "iu":
            raise InvalidExampleError(f"prompt_ids must be a non-empty 1-D list of token ids (or a (1, n) tensor), "
                                      f"got shape {array.shape} {array.dtype}.")
        vocab = self.manifest.vocab_size
        bad = array[(array < 0) | (array >= vocab)]
        if bad.size:
            raise InvalidExampleError(f"prompt_ids holds {int(bad[0])}, outside the vocabulary (0..{vocab - 1}).")
        return [int(t) for t in array]

    def _check_room(self, tokens: int, new: int) -> None:
        needed = tokens + max(new - 1, 0)  # the last new token is returned, never fed back
        if needed > self.manifest.context_length:
            raise ContextFullError(
                f"the context is full: {tokens} tokens in the cache + {new} new tokens need {needed} positions and "
                f"this LLM holds {self.manifest.context_length} (context_length). Shorten the prompt, ask for "
                "fewer new tokens, or compile with a larger context_length.")


class _InterpretedChunk:
    def __init__(self, path: Path, precision: str):
        from anefx.mil.interpreter import MilRunner
        from anefx.mil.reader import read_program

        self.states: dict[str, np.ndarray] = {}
        self.runners = {fn: MilRunner(read_program(path, fn), precision, states=self.states) for fn in FUNCTIONS}

    def run(self, function: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.runners[function](**feed)

    def reset(self) -> None:
        self.runners["decode"].reset_states()


class _CoreMLChunk:
    def __init__(self, path: Path):
        import coremltools as ct

        self.models = {fn: ct.models.MLModel(str(path), function_name=fn) for fn in FUNCTIONS}
        self.state = self.models["decode"].make_state()

    def run(self, function: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.models[function].predict(feed, state=self.state)

    def reset(self) -> None:
        self.state = self.models["decode"].make_state()


def _coreml_runs() -> bool:
    from anefx.lower import _can_run_coreml

    return _can_run_coreml()


def load_llm(folder: str | Path, *, precision: str | None = None, backend: str = "auto") -> LLM:
    """A compiled LLM folder (written by CompiledLLM.save or `anefx compile-llm`), ready to generate."""
    return LLM(folder, precision=precision, backend=backend)
