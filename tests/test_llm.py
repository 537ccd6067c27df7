"""compile_llm / load_llm / generate: stateful chunks with prefill and decode, run from the saved packages.

Equality is checked against HF's own `model.generate` (greedy) and HF's logits, in the MIL interpreter:
fp32 programs (weights and states in fp32) must give the same tokens; fp16 programs are held to top-1
agreement, teacher-forced, as on the device.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

import anefx
from anefx.cli import app
from anefx.errors import OptionError
from anefx.llm.manifest import LLMManifest, ManifestError
from anefx.llm.runtime import ContextFullError
from anefx.mil.reader import read_program

VOCAB = 1024
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB)
FAMILIES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=16)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**COMMON, head_dim=16)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**COMMON, pad_token_id=0)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                     bos_token_id=0, eos_token_id=0)),
}
CONTEXT, PREFILL = 64, 8
CHUNK_OPS = 200  # MIL ops per chunk: one layer of the tiny Llama (predicted ~140-150 each)


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


def hf_generate(model, ids: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama compiled in fp32 and saved: (model, folder, CompiledLLM)."""
    model = build("llama")
    lm = anefx.compile_llm(model, context_length=CONTEXT, prefill_length=PREFILL, precision="fp32", progress=False)
    folder = lm.save(tmp_path_factory.mktemp("llm") / "tiny-llama")
    return model, folder, lm


def test_generate_from_disk_equals_hf(tiny):
    model, folder, _ = tiny
    ids = torch.randint(0, VOCAB, (1, 11))  # a full prefill block, then a padded one
    expected = hf_generate(model, ids, 20)
    lm = anefx.load_llm(folder, precision="fp32")
    assert lm.backend == "interpreter"
    assert lm.generate(ids, 20, stop_at_eos=False) == expected
    assert lm.generate(ids[0].tolist(), 20, stop_at_eos=False) == expected  # a list works too, state reset


def test_logits_of_prefill_and_decode_match_hf(tiny):
    model, folder, _ = tiny
    ids = torch.randint(0, VOCAB, (1, 19))
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    lm = anefx.load_llm(folder, precision="fp32")
    lm.reset()
    got = lm.logits(ids[0].tolist(), 0)  # 2 prefill blocks of 8, then 3 decode steps
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-3 * scale


def test_package_structure(tiny):
    _, folder, lm = tiny
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "anefx-llm" and manifest["context_length"] == CONTEXT
    (chunk,) = lm.manifest.chunks
    assert set(chunk.functions) == {"prefill", "decode"}
    assert [s.name for s in chunk.states] == ["k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1"]
    assert all(s.dtype == "float16" for s in chunk.states)  # CoreML states are fp16
    for fn, seq in (("prefill", PREFILL), ("decode", 1)):
        program = read_program(folder / chunk.file, fn)
        types = {op.type for op in program.operations}
        assert "read_state" in types and types & {"write_state", "coreml_update_state"}
        assert "slice_update" in types and "scatter" not in types  # the cache written in place at `position`
        assert "linear" not in types
        ranks = [len(t.shape) for op in program.operations for _, t in op.outputs if t is not None and t.shape]
        assert max(ranks) <= 4
        assert dict(program.inputs)["input_ids"].shape == (1, seq)
    assert chunk.largest_dim <= 16384


def test_two_functions_share_one_copy_of_the_weights(tiny, tmp_path):
    """The weights of the two-function package take no more room than those of one function (the
    programs' text is per function; on real models it is a sliver: see docs/benchmarks.md)."""
    from anefx.llm.compile import _lower_one

    _, folder, lm = tiny
    single = _lower_one(lm.rewritten["decode"], _options(lm), tmp_path / "decode.mlpackage")
    blob = "Data/com.apple.CoreML/weights/weight.bin"
    ratio = (folder / lm.manifest.chunks[0].file / blob).stat().st_size / (single / blob).stat().st_size
    assert ratio <= 1.05, ratio
    chunk = lm.manifest.chunks[0]  # the manifest records the decode function saved alone, for the same ratio
    assert 0 < chunk.decode_only_bytes < chunk.bytes
    assert LLMManifest.read(folder).chunks[0].decode_only_bytes == chunk.decode_only_bytes


def _options(lm):
    from anefx.llm.compile import LLMOptions

    m = lm.manifest
    return LLMOptions(m.context_length, m.prefill_length, precision=m.precision)


def test_context_full_and_bad_prompts(tiny):
    _, folder, _ = tiny
    lm = anefx.load_llm(folder, precision="fp32")
    with pytest.raises(ContextFullError, match="context is full.*compile with a larger context_length"):
        lm.generate(list(range(60)), 10)
    assert len(lm.generate(list(range(60)), 5, stop_at_eos=False)) == 5  # 60 + 4 fed positions fit in 64
    with pytest.raises(anefx.InvalidExampleError, match="outside the vocabulary"):
        lm.generate([1, VOCAB], 2)
    with pytest.raises(anefx.InvalidExampleError, match="non-empty 1-D"):
        lm.generate([], 2)
    with pytest.raises(OptionError, match="max_new_tokens"):
        lm.generate([1, 2], -1)


def test_options_and_folders_refused(tiny, tmp_path):
    model, _, lm = tiny
    with pytest.raises(OptionError, match="prefill_length=80 is longer than context_length=64"):
        anefx.compile_llm(model, context_length=64, prefill_length=80)
    with pytest.raises(OptionError, match="iOS18"):
        anefx.compile_llm(model, context_length=64, prefill_length=8, deployment_target="iOS17")
    with pytest.raises(ManifestError, match="not an LLM compiled by anefx"):
        anefx.load_llm(tmp_path)
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("user data")
    with pytest.raises(anefx.AnefxError, match="does not replace it"):
        lm.save(keep)
    assert (keep / "notes.txt").read_text() == "user data"


def test_not_a_causal_lm_is_refused():
    with pytest.raises(anefx.StatefulModelError, match="no Hugging Face config"):
        anefx.compile_llm(torch.nn.Linear(4, 4), context_length=64, prefill_length=8)


def test_model_is_not_modified():
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    anefx.compile_llm(model, context_length=32, prefill_length=4, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_cli_generate_and_report(tiny):
    model, folder, _ = tiny
    runner = CliRunner()
    ids = [5, 17, 300]
    result = runner.invoke(app, ["generate", str(folder), "--prompt-ids", ",".join(map(str, ids)), "-n", "6",
                                 "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    printed = [line for line in result.stdout.splitlines() if "," in line][0]
    assert [int(t) for t in printed.split(",")] == hf_generate(model, torch.tensor([ids]), 6)
    report = runner.invoke(app, ["report", str(folder)])
    assert report.exit_code == 0 and "chunk_0" in report.stdout and "prefill" in report.stdout
    bad = runner.invoke(app, ["generate", str(folder), "--prompt-ids", "1,x"])
    assert bad.exit_code == 2 and "comma-separated integers" in bad.output


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_generate_like_hf(family, tmp_path):
    """fp32: the 32 greedy tokens equal HF's; logits of prefill and decode within 1e-3. fp16: top-1
    agreement with HF, teacher-forced over four such sequences (132 positions), at least 99%."""
    model = build(family)
    prompts = [torch.randint(1, VOCAB, (1, 13), generator=torch.Generator().manual_seed(s)) for s in range(1, 5)]
    sequences = [p[0].tolist() + hf_generate(model, p, 32) for p in prompts]
    lm32 = anefx.compile_llm(model, context_length=CONTEXT, prefill_length=PREFILL, precision="fp32", progress=False)
    lm = anefx.load_llm(lm32.save(tmp_path / family), precision="fp32")
    assert lm.generate(prompts[0], 32, stop_at_eos=False) == sequences[0][13:]
    with torch.no_grad():
        references = [model(torch.tensor([seq])).logits[0].numpy() for seq in sequences]
    lm.reset()
    got = lm.logits(sequences[0], 0)  # 5 prefill blocks of 8, then decode steps
    assert np.abs(got - references[0]).max() <= 1e-3 * np.abs(references[0]).max()
    lm16 = anefx.compile_llm(model, context_length=CONTEXT, prefill_length=PREFILL, precision="fp16", progress=False)
    runtime, agree, total = lm16.runtime("fp16"), 0, 0
    for seq, reference in zip(sequences, references, strict=True):
        runtime.reset()
        top1 = runtime.logits(seq, 0).argmax(-1)[12:]  # from the last prompt token on
        agree += int((top1 == reference.argmax(-1)[12:]).sum())
        total += len(top1)
    assert agree / total >= 0.99, (agree, total)


def _program_dims(path: Path, function: str) -> int:
    program = read_program(path, function)
    consts = [v.shape for v in program.constants.values() if isinstance(v, np.ndarray) and v.ndim]
    from anefx.llm.compile import largest_dimension

    return max([largest_dimension(program), *(max(s) for s in consts)])


@pytest.mark.slow
def test_wide_vocabulary_is_split_and_argmax_in_model_gives_the_same_tokens(tmp_path):
    torch.manual_seed(0)
    config = tf.LlamaConfig(**{**COMMON, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                               "num_key_value_heads": 1, "vocab_size": 40000})
    model = tf.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 40000, (1, 9))
    expected = hf_generate(model, ids, 6)
    lm = anefx.compile_llm(model, context_length=32, prefill_length=8, precision="fp32", progress=False)
    pieces = lm.manifest.logits_pieces
    assert sum(pieces) == 40000 and len(pieces) == 3 and max(pieces) <= 16384
    folder = lm.save(tmp_path / "wide")
    for fn in ("prefill", "decode"):
        assert _program_dims(folder / "chunk_0.mlpackage", fn) <= 16384  # no tensor, state or weight wider
    assert anefx.load_llm(folder, precision="fp32").generate(ids, 6, stop_at_eos=False) == expected
    argmax = anefx.compile_llm(model, context_length=32, prefill_length=8, precision="fp32", argmax_in_model=True,
                               progress=False)
    (chunk,) = argmax.manifest.chunks
    assert [t.name for t in chunk.functions["decode"].outputs] == ["token", "token_logit"]
    assert argmax.generate(ids, 6, precision="fp32", stop_at_eos=False) == expected


def test_small_max_chunk_ops_gives_chunks_that_generate_the_same(tmp_path):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**COMMON, "num_hidden_layers": 4})).eval()
    ids = torch.randint(0, VOCAB, (1, 10))
    expected = hf_generate(model, ids, 8)
    with pytest.raises(anefx.AnefxError, match="max_chunk_ops"):
        anefx.compile_llm(model, context_length=32, prefill_length=8, max_chunk_ops=5, progress=False)
    lm = anefx.compile_llm(model, context_length=32, prefill_length=8, precision="fp32", max_chunk_ops=CHUNK_OPS,
                           progress=False)
    chunks = lm.manifest.chunks
    assert len(chunks) >= 3 and [c.layers for c in chunks][0][0] == 0 and chunks[-1].layers[1] == 4
    assert all(c.functions["prefill"].ops <= CHUNK_OPS * 1.0 for c in chunks)
    states = [s.name for c in chunks for s in c.states]
    assert sorted(states) == sorted(f"{k}_cache_{i}" for i in range(4) for k in "kv")  # each state in one chunk
    folder = lm.save(tmp_path / "chunked")
    assert anefx.load_llm(folder, precision="fp32").generate(ids, 8, stop_at_eos=False) == expected
    norms = [sum(op.type == "layer_norm" for op in read_program(folder / c.file, "decode").operations)
             for c in chunks]
    assert norms[-1] == 2 * (chunks[-1].layers[1] - chunks[-1].layers[0]) + 1  # the final norm once, at the end
    assert all(n == 2 * (c.layers[1] - c.layers[0]) for n, c in zip(norms[:-1], chunks[:-1], strict=True))
