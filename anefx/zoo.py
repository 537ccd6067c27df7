"""Small public model configurations with random weights: the demo's model and the test zoo.

Nothing is downloaded: every model is built from a transformers config. `build(name)` returns
(model in eval mode, example args, example kwargs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

VOCAB = 1024
SEQ = 32
_DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _tokens(seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(0))


def _decoder(cls_name: str, config_name: str, **extra) -> Callable[[], tuple]:
    def build():
        import transformers as tf

        config = getattr(tf, config_name)(**{**_DECODER, **extra})
        return getattr(tf, cls_name)(config), (_tokens(),), {}

    return build


def _gpt2():
    import transformers as tf

    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                           bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(config), (_tokens(),), {}


def _bert():
    import transformers as tf

    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=128)
    return tf.BertModel(config), (_tokens(),), {}


def _distilbert():
    import transformers as tf

    config = tf.DistilBertConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                 max_position_embeddings=128)
    return tf.DistilBertModel(config), (_tokens(),), {}


def _vit():
    import transformers as tf

    config = tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          image_size=32, patch_size=8, num_channels=3)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return tf.ViTModel(config, add_pooling_layer=False), (pixels,), {}


def _whisper_encoder():
    import transformers as tf

    config = tf.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                              decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128,
                              num_mel_bins=16, max_source_positions=32, vocab_size=VOCAB,
                              max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              decoder_start_token_id=1)
    features = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    return tf.WhisperModel(config).get_encoder(), (features,), {}


MODELS: dict[str, Callable[[], tuple]] = {
    "llama": _decoder("LlamaForCausalLM", "LlamaConfig"),
    "qwen2": _decoder("Qwen2ForCausalLM", "Qwen2Config"),
    "mistral": _decoder("MistralForCausalLM", "MistralConfig"),
    "gemma": _decoder("GemmaForCausalLM", "GemmaConfig", head_dim=16),
    "phi3": _decoder("Phi3ForCausalLM", "Phi3Config", pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": _gpt2,
    "bert": _bert,
    "distilbert": _distilbert,
    "vit": _vit,
    "whisper_encoder": _whisper_encoder,
}


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, tuple, dict[str, Any]]:
    """(model in eval mode with seeded random weights, example args, example kwargs)."""
    if name not in MODELS:
        from anefx.errors import OptionError

        raise OptionError(f"unknown zoo model {name!r}; known: {', '.join(MODELS)}.")
    torch.manual_seed(seed)
    model, args, kwargs = MODELS[name]()
    return model.eval(), args, kwargs
