"""End-to-end on small HF configs (random weights, nothing downloaded): every rule applied, numerics
equal, and the saved program in the ANE's form."""

from __future__ import annotations

import pytest
import torch

from anefx.zoo import MODELS
from tests.helpers import ane_summary, assert_outputs_close, gamma_multiplies_after_norms, program

DECODERS = ["llama", "qwen2", "mistral", "gemma", "phi3"]
LAYERS, HEADS, SEQ = 2, 4, 32
SEQUENCE = {"vit": 17}  # 16 patches + CLS


def projections(model: torch.nn.Module) -> int:
    from transformers.pytorch_utils import Conv1D

    return sum(isinstance(m, torch.nn.Linear | Conv1D) for m in model.modules())


def norms(model: torch.nn.Module) -> int:
    return sum(type(m).__name__.endswith("RMSNorm") or isinstance(m, torch.nn.LayerNorm)
               for m in model.modules())


def reference(name, model, args, kwargs):
    extra = {"use_cache": False} if name in DECODERS + ["gpt2"] else {}
    with torch.no_grad():
        return model(*args, **kwargs, **extra)


@pytest.mark.parametrize("name", list(MODELS))
def test_rewritten_program_equals_model(name, compile_zoo):
    model, args, kwargs, c = compile_zoo(name)
    # rmsnorm_to_layernorm applies to the decoders only; sdpa_masked_rows only to an SDPA left fused; the zoo's
    # vocabularies are narrow (no split), its programs stateless (no cache write) and without FFT or unfold
    unmatched = ("rmsnorm_to_layernorm", "sdpa_masked_rows", "split_wide_conv", "split_wide_embedding",
                 "kv_cache_write", "fft_to_dft", "unfold_to_conv")
    assert [p.status for p in c.passes if p.name not in unmatched] == ["applied"] * 5, c.passes
    with torch.no_grad():
        actual = c.rewritten.module()(*args, **kwargs)
    assert_outputs_close(actual, reference(name, model, args, kwargs))


@pytest.mark.parametrize("name", list(MODELS))
def test_saved_program_is_in_the_ane_form(name, compile_zoo, tmp_path):
    model, _, _, c = compile_zoo(name)
    prog = program(c, tmp_path)
    s = ane_summary(prog)
    seq = SEQUENCE.get(name, SEQ)
    assert s["types"]["linear"] == 0 and s["types"]["matmul"] == 0
    assert s["types"]["conv"] >= projections(model)
    assert s["types"]["scaled_dot_product_attention"] == 0
    assert s["softmax_shapes"] == {(1, seq, 1, seq): LAYERS * HEADS}  # one per head, (B, S_k, 1, S_q)
    assert s["softmax_axes"] == {1: LAYERS * HEADS}
    assert s["norm_axes"] == {(1,): norms(model)}  # every norm over channels
    assert s["max_rank"] <= 4
    entry_exit = 2
    assert s["layout_ops"] <= entry_exit + LAYERS, s["types"]


@pytest.mark.parametrize("name", DECODERS)
def test_rms_norms_fuse_gamma(name, compile_zoo, tmp_path):
    from anefx.mlpackage import program_ops

    _, _, _, c = compile_zoo(name)
    records = program_ops(c.save(tmp_path / "m.mlpackage"))
    assert gamma_multiplies_after_norms(records) == []
    for r in records:
        if r.type == "layer_norm":
            assert r.outputs[0][1] == (1, 2 * 64, 1, SEQ)  # normalised over [x, -x] on channels


def test_decoder_needs_no_extra_inputs(compile_zoo):
    _, args, _, c = compile_zoo("llama")
    spec = c.mlmodel.get_spec()
    assert [i.name for i in spec.description.input] == ["input_ids"]
    assert [o.name for o in spec.description.output] == ["logits"]
    assert any("use_cache=False" in note for note in c.notes)
    assert spec.description.input[0].type.multiArrayType.dataType == 131104  # INT32: no int64 in CoreML
    assert args[0].dtype == torch.int64


def test_bert_outputs_are_named_by_their_fields(compile_zoo):
    _, _, _, c = compile_zoo("bert")
    assert c.output_names == ["last_hidden_state", "pooler_output"]
    assert [o.name for o in c.mlmodel.get_spec().description.output] == c.output_names


def test_gqa_does_not_materialise_repeated_keys(compile_zoo, tmp_path):
    _, _, _, c = compile_zoo("llama")
    s = ane_summary(program(c, tmp_path))
    assert s["types"]["tile"] == 0 and s["types"]["expand_dims"] <= 2  # no repeat_kv copies
    assert s["types"]["einsum"] == 2 * LAYERS * HEADS
