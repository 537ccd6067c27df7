"""The models compile_bench.py measures: tiny zoo configs (--quick), base-size configs, and a ~1.1B decoder.

Every model is built from a transformers config with seeded random weights; nothing is downloaded.
A builder returns (model in eval mode, example args, example kwargs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelSpec:
    name: str
    label: str  # what the table shows, e.g. "DistilBERT-base (S=128)"
    build: Callable[[], tuple[torch.nn.Module, tuple, dict]]


def _ids(vocab: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))


def _zoo(name: str) -> Callable[[], tuple]:
    def build():
        from anefx import zoo

        return zoo.build(name)

    return build


def _distilbert_base():
    import transformers as tf

    config = tf.DistilBertConfig()  # dim 768, 6 layers, 12 heads
    return tf.DistilBertModel(config), (_ids(config.vocab_size, 128),), {}


def _bert_base():
    import transformers as tf

    config = tf.BertConfig()  # hidden 768, 12 layers, 12 heads
    return tf.BertModel(config), (_ids(config.vocab_size, 128),), {}


def _gpt2_small():
    import transformers as tf

    config = tf.GPT2Config()  # n_embd 768, 12 layers, 12 heads
    return tf.GPT2LMHeadModel(config), (_ids(config.vocab_size, 128),), {}


def _vit_base():
    import transformers as tf

    config = tf.ViTConfig()  # hidden 768, 12 layers, 224×224, patch 16
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return tf.ViTModel(config, add_pooling_layer=False), (pixels,), {}


LLAMA_SMALL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
# TinyLlama-1.1B's shape: 1.10e9 parameters, 4.4 GB in fp32
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                rms_norm_eps=1e-5, tie_word_embeddings=False)


def _llama(config: dict, seq: int) -> Callable[[], tuple]:
    def build():
        import transformers as tf

        model = tf.LlamaForCausalLM(tf.LlamaConfig(**config))
        return model, (_ids(config["vocab_size"], seq),), {}

    return build


QUICK = [
    ModelSpec("distilbert", "DistilBERT tiny (S=32)", _zoo("distilbert")),
    ModelSpec("bert", "BERT tiny (S=32)", _zoo("bert")),
    ModelSpec("llama", "Llama tiny (S=32)", _zoo("llama")),
    ModelSpec("vit", "ViT tiny (32×32)", _zoo("vit")),
    ModelSpec("gpt2", "GPT-2 tiny (S=32)", _zoo("gpt2")),
]
FULL = [
    ModelSpec("distilbert", "DistilBERT-base (S=128)", _distilbert_base),
    ModelSpec("bert", "BERT-base (S=128)", _bert_base),
    ModelSpec("llama", "Llama 55M (S=64)", _llama(LLAMA_SMALL, 64)),
    ModelSpec("vit", "ViT-base (224×224)", _vit_base),
    ModelSpec("gpt2", "GPT-2 small (S=128)", _gpt2_small),
]
LLAMA_1B_SPEC = ModelSpec("llama-1b", "Llama 1.1B (S=64)", _llama(LLAMA_1B, 64))


def model_set(quick: bool, size: str | None) -> list[ModelSpec]:
    """--quick: the tiny zoo configs; default: the base configs; --size 1b: the base configs + 1.1B."""
    if quick:
        return list(QUICK)
    return [*FULL, LLAMA_1B_SPEC] if size == "1b" else list(FULL)


def find(name: str, quick: bool) -> ModelSpec:
    for spec in [*(QUICK if quick else FULL), LLAMA_1B_SPEC]:
        if spec.name == name:
            return spec
    raise KeyError(name)


def build(spec: ModelSpec, seed: int = 0) -> tuple[torch.nn.Module, tuple, dict]:
    torch.manual_seed(seed)
    model, args, kwargs = spec.build()
    return model.eval(), args, kwargs
