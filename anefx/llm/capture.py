"""Capture an HF causal LM as a stateful program: a fixed-size KV cache held as buffers, written in place.

The user's model is never modified. `CachedDecoder` is a module of ours that owns an HF `StaticCache`
whose tensors are *our* buffers, and calls the model with it:

    logits = CachedDecoder(model, cache_length)(input_ids, position)

`input_ids` is (1, S); `position` (shape (1,)) is where `input_ids[0, 0]` goes in the cache. The model
itself computes everything else from its own graph: the positions of the S tokens (position + 0..S-1),
the rotary angles for them, the causal mask over the whole cache (keys after a query are masked, so
entries past the current position are never read), and the cache writes (`index_copy` into the
`k_cache_<i>`/`v_cache_<i>` buffers at those positions). `torch.export` turns the buffer writes into
buffer mutations; coremltools turns those into CoreML states.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.export import ExportedProgram

from anefx.errors import AnefxError


class StatefulModelError(AnefxError):
    """The model cannot be made stateful (no KV cache anefx can hold), or its options do not fit."""


@dataclass
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int
    length: int  # positions held (the state's sequence dimension)


def cache_shape(model: torch.nn.Module, cache_length: int) -> CacheShape:
    """The KV cache's dimensions from the model's config (what StaticCache allocates)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise StatefulModelError(
            f"{type(model).__name__} has no Hugging Face config; compile_llm takes a transformers causal LM "
            "(e.g. LlamaForCausalLM). For other models use anefx.compile (a stateless program).")
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    if not heads or not hidden:
        raise StatefulModelError(
            f"{type(model).__name__}'s config has no num_attention_heads/hidden_size; anefx could not find the "
            "attention shape to size a KV cache for.")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    layers = getattr(text, "num_hidden_layers", None)
    if not layers:
        raise StatefulModelError(f"{type(model).__name__}'s config has no num_hidden_layers.")
    return CacheShape(layers, kv_heads, head_dim, cache_length)


class CachedDecoder(torch.nn.Module):
    """Runs an HF causal LM over a KV cache of `cache_length` positions held as this module's buffers."""

    def __init__(self, model: torch.nn.Module, cache_length: int):
        super().__init__()
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        self.model = model  # called, never changed
        self.shape = cache_shape(model, cache_length)
        dtype = next(model.parameters()).dtype
        try:
            self.cache = StaticCache(config=model.config, max_cache_len=cache_length)
        except Exception as exc:  # noqa: BLE001 - re-raised naming what is missing
            raise StatefulModelError(
                f"transformers cannot build a static KV cache for {type(model).__name__} ({exc}); anefx makes a "
                "model stateful through transformers' StaticCache.") from exc
        # A cache of the whole context holds every position a sliding window could need; the model's own
        # mask still applies the window.
        for i, layer in enumerate(self.cache.layers):
            if type(layer) is not StaticLayer:
                self.cache.layers[i] = StaticLayer(cache_length)
        if len(self.cache.layers) != self.shape.layers:
            raise StatefulModelError(
                f"transformers' static cache for {type(model).__name__} has {len(self.cache.layers)} layers, the "
                f"config {self.shape.layers}; anefx cannot tell which cache belongs to which layer.")
        self.cache.early_initialization(1, self.shape.kv_heads, self.shape.head_dim, dtype, torch.device("cpu"))
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros_like(layer.keys), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros_like(layer.values), persistent=False)

    @property
    def state_names(self) -> list[str]:
        return [f"{kind}_cache_{i}" for i in range(self.shape.layers) for kind in ("k", "v")]

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.cache.layers):  # the cache reads and writes our buffers
            layer.keys = getattr(self, f"k_cache_{i}")
            layer.values = getattr(self, f"v_cache_{i}")
            layer.cumulative_length = position.reshape(()).to(torch.long).clone()
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True)
        return out.logits if hasattr(out, "logits") else out[0]


def export_stateful(decoder: CachedDecoder, seq_len: int, position: int = 0) -> ExportedProgram:
    """The decoder exported for `seq_len` tokens per call (after run_decompositions({})); its buffer
    mutations are the cache writes."""
    ids = torch.zeros(1, seq_len, dtype=torch.long)
    pos = torch.tensor([position], dtype=torch.long)
    try:
        with torch.no_grad():
            ep = torch.export.export(decoder, (ids, pos), strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised naming what failed
        raise StatefulModelError(
            f"torch.export could not capture {type(decoder.model).__name__} with a static KV cache "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ep = ep.run_decompositions({})
    written = set(ep.graph_signature.buffers_to_mutate.values())
    missing = [n for n in decoder.state_names if n not in written]
    if missing:
        raise StatefulModelError(
            f"{type(decoder.model).__name__} did not write its KV cache through transformers' cache API (no write "
            f"to {', '.join(missing[:4])}); anefx could not find the cache writes to turn into CoreML states.")
    return ep
