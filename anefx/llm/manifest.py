"""The manifest of a compiled LLM folder: what each chunk holds and how to call it (JSON, tokenizer-free).

    tiny-llama/
      manifest.json          this file's content (LLMManifest)
      chunk_0.mlpackage      functions `prefill` (S = prefill_length) and `decode` (S = 1), one set of weights
      chunk_1.mlpackage      ...

A call runs the chunks in order. Every chunk takes `position` (where the first token of the call goes in
the cache) and the outputs of the chunks before it by name (chunk 0 takes `input_ids`); the last chunk
gives the logits (`logits`, or the pieces `logits_0..` concatenated on the last axis) or, with
argmax_in_model, `token` and `token_logit`. Each chunk keeps the KV cache of its own layers as CoreML
states; the two functions of a chunk share them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anefx.errors import AnefxError

MANIFEST = "manifest.json"
FORMAT = "anefx-llm"
VERSION = 1
FUNCTIONS = ("prefill", "decode")


class ManifestError(AnefxError):
    """A folder that is not a compiled LLM, or whose manifest does not match its packages."""


@dataclass
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str


@dataclass
class FunctionSpec:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    ops: int  # MIL operations (consts excluded)


@dataclass
class ChunkSpec:
    file: str
    layers: list[int]  # [first, end): the decoder layers this chunk runs
    functions: dict[str, FunctionSpec]
    states: list[TensorSpec]
    bytes: int  # the package's size on disk
    largest_dim: int  # the largest tensor dimension in the program (the ANE holds <= 16384)
    decode_only_bytes: int = 0  # the decode function saved alone: what one function would take on disk


@dataclass
class LLMManifest:
    model: str  # the model's class name
    context_length: int  # tokens a generation may hold (prompt + new tokens)
    cache_length: int  # positions in each state (context_length rounded up to a multiple of 32)
    prefill_length: int
    vocab_size: int
    output: str  # "logits" | "argmax"
    logits_pieces: list[int]  # vocabulary sizes of logits_0.. (one entry when the logits are one output)
    eos_token_ids: list[int]
    precision: str
    deployment_target: str
    chunks: list[ChunkSpec] = field(default_factory=list)
    format: str = FORMAT
    version: int = VERSION
    anefx_version: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, folder: str | Path) -> LLMManifest:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            what = "does not exist" if not folder.exists() else f"has no {MANIFEST}"
            raise ManifestError(f"{folder} {what}: it is not an LLM compiled by anefx. Pass the folder written "
                                "by CompiledLLM.save or `anefx compile-llm -o DIR`.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{path} could not be read ({exc}); compile the model again.") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestError(f"{path} is not an anefx LLM manifest; compile the model again.")
        if data.get("version") != VERSION:
            raise ManifestError(f"{path} has format version {data.get('version')}; this anefx reads version "
                                f"{VERSION}. Compile the model again with this anefx.")
        try:
            return _manifest(data)
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{path} is incomplete ({exc}); compile the model again.") from exc


def _manifest(data: dict[str, Any]) -> LLMManifest:
    chunks = [ChunkSpec(
        file=c["file"], layers=list(c["layers"]), bytes=int(c["bytes"]), largest_dim=int(c["largest_dim"]),
        decode_only_bytes=int(c.get("decode_only_bytes", 0)),
        states=[TensorSpec(**s) for s in c["states"]],
        functions={name: FunctionSpec(inputs=[TensorSpec(**t) for t in f["inputs"]],
                                      outputs=[TensorSpec(**t) for t in f["outputs"]], ops=int(f["ops"]))
                   for name, f in c["functions"].items()})
        for c in data["chunks"]]
    fields = {k: v for k, v in data.items() if k != "chunks"}
    return LLMManifest(**fields, chunks=chunks)
