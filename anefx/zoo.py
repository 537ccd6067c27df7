"""Small public model configurations with random weights: the demo's model and the test zoo.

Nothing is downloaded: every model is built from a transformers config (or plain torch modules).
`build(name)` returns (model in eval mode, example args, example kwargs). `MODELS` is the test zoo
whose saved programs are fully in the ANE's form; `FAMILIES` adds more model families (encoders,
MoE and attention variants of decoders, CNNs, plain torch modules), see docs/rules.md "Model families".
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


def _encoder(cls_name: str, config_name: str, **extra) -> Callable[[], tuple]:
    def build():
        import transformers as tf

        config = getattr(tf, config_name)(**{**_ENCODER, **extra})
        return getattr(tf, cls_name)(config), (_tokens(),), {}

    return build


_ENCODER = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=128)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2, experts_implementation="batched_mm")


def _t5_encoder():
    import transformers as tf

    config = tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, relative_attention_max_distance=32)
    return tf.T5EncoderModel(config), (_tokens(),), {}


def _images(channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))


def _resnet():
    import transformers as tf

    config = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    return tf.ResNetModel(config), (_images(),), {}


def _convnext():
    import transformers as tf

    config = tf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=32)
    return tf.ConvNextModel(config), (_images(),), {}


def _mobilenet_v2():
    import transformers as tf

    # the default initializer_range (0.02) shrinks activations to ~1e-26 by the last layer (0 in fp16)
    config = tf.MobileNetV2Config(image_size=32, depth_multiplier=0.25, min_depth=8, initializer_range=0.3)
    return tf.MobileNetV2Model(config), (_images(),), {}


class MLP(torch.nn.Module):
    """A plain MLP on rank-2 input (batch, features)."""

    def __init__(self, features: int = 64, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.GELU(),
                                        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                        torch.nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SelfAttention(torch.nn.Module):
    """torch.nn.MultiheadAttention as self-attention on (batch, sequence, features)."""

    def __init__(self, features: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(features, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def _mlp():
    return MLP(), (torch.randn(1, 64, generator=torch.Generator().manual_seed(0)),), {}


def _multihead_attention():
    return SelfAttention(), (torch.randn(1, SEQ, 64, generator=torch.Generator().manual_seed(0)),), {}


def _gpt_neox():
    import transformers as tf

    config = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=128)
    return tf.GPTNeoXForCausalLM(config), (_tokens(),), {}


def _bloom():
    import transformers as tf

    config = tf.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)
    return tf.BloomForCausalLM(config), (_tokens(),), {}


FAMILIES: dict[str, Callable[[], tuple]] = {
    **MODELS,
    "roberta": _encoder("RobertaModel", "RobertaConfig", pad_token_id=1),
    "albert": _encoder("AlbertModel", "AlbertConfig", embedding_size=32),
    "electra": _encoder("ElectraModel", "ElectraConfig", embedding_size=32),
    "t5_encoder": _t5_encoder,
    "qwen3": _decoder("Qwen3ForCausalLM", "Qwen3Config", head_dim=16),
    "gemma2": _decoder("Gemma2ForCausalLM", "Gemma2Config", head_dim=16, sliding_window=16),
    "gpt_neox": _gpt_neox,
    "bloom": _bloom,
    "mixtral": _decoder("MixtralForCausalLM", "MixtralConfig", **_MOE),
    "qwen3_moe": _decoder("Qwen3MoeForCausalLM", "Qwen3MoeConfig", head_dim=16, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=64, experts_implementation="batched_mm"),
    "resnet": _resnet,
    "convnext": _convnext,
    "mobilenet_v2": _mobilenet_v2,
    "mlp": _mlp,
    "multihead_attention": _multihead_attention,
}


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, tuple, dict[str, Any]]:
    """(model in eval mode with seeded random weights, example args, example kwargs)."""
    if name not in FAMILIES:
        from anefx.errors import OptionError

        raise OptionError(f"unknown zoo model {name!r}; known: {', '.join(FAMILIES)}.")
    torch.manual_seed(seed)
    model, args, kwargs = FAMILIES[name]()
    return model.eval(), args, kwargs
