"""Shape buckets: anefx.compile(..., buckets=[...]) → one function per bucket in one package, weights shared."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import anefx
from anefx.buckets import BUCKETS_KEY, BucketError, BucketShapeError, function_names, package_buckets
from anefx.cli import app
from anefx.mil import compare, load_mlpackage
from anefx.mlpackage import load_spec, package_metadata

VOCAB, HIDDEN = 1024, 32  # the vocabulary is most of the weights, as in a real encoder
SEQS = (8, 16, 32)
BERT_FILE = textwrap.dedent(f"""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(vocab_size={VOCAB}, hidden_size={HIDDEN}, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64,
                                       max_position_embeddings=64)).eval()
""")


def tiny_bert() -> torch.nn.Module:
    namespace: dict = {}
    exec(BERT_FILE, namespace)  # the same model the CLI test loads from a file
    return namespace["model"]


def ids(seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(seed))


class Flagged(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x, y=None, scale: bool = False):
        out = self.fc(x) if y is None else self.fc(x) + y
        return out * 2 if scale else out


# -- refused before anything is compiled (default run: milliseconds) ------------------------------------------

def _refused(buckets, example=None, kwargs=None) -> str:
    with pytest.raises(BucketError) as info:
        anefx.compile(Flagged(), example or (torch.randn(1, 4, 8),), kwargs, buckets=buckets, progress=False)
    message = str(info.value)
    assert len(message.splitlines()) <= 15 and "graph()" not in message
    return message


def test_empty_or_malformed_buckets_are_refused_naming_the_fix():
    assert "buckets=[(ids_64,), (ids_128,)]" in _refused([])
    assert "list of example inputs" in _refused(torch.randn(1, 4, 8))
    assert "buckets[0] is a str" in _refused(["1x8"]) and "(args, kwargs)" in _refused(["1x8"])
    with pytest.raises(BucketError, match="one partitioned program per shape, or drop partition="):
        anefx.compile(Flagged(), (torch.randn(1, 4, 8),), buckets=[(torch.randn(1, 8, 8),)], partition=True)


def test_buckets_that_differ_in_more_than_shapes_are_refused():
    message = _refused([(torch.randint(0, 5, (1, 16, 8)),)])
    assert "buckets[0]: input `x` is int64 where the example's is float32" in message
    assert "pass a float32 tensor" in message
    message = _refused([(torch.randn(1, 16, 8), torch.randn(1, 16, 8))])
    assert "passes tensors (x, y) where the example passes (x)" in message and "same inputs" in message
    message = _refused([((torch.randn(1, 16, 8),), {"scale": True})])
    assert "scale=True where the example passes scale=None" in message and "pass scale=None" in message


def test_duplicate_buckets_are_refused_and_the_example_may_be_listed():
    x = torch.randn(1, 4, 8)
    message = _refused([(torch.randn(1, 16, 8),), torch.randn(1, 16, 8)], example=(x,))
    assert "buckets[1] has the same shapes as buckets[0] (x 1x16x8)" in message
    assert "list each shape once" in message
    from anefx.buckets import bucket_examples

    calls = bucket_examples(Flagged(), (x,), {"scale": True}, [(torch.randn(1, 4, 8),), {"x": torch.randn(1, 2, 8)}])
    assert [c[0][0].shape if c[0] else c[1]["x"].shape for c in calls] == [(1, 4, 8), (1, 2, 8)]
    assert calls[0][0][0] is x and all(c[1]["scale"] is True for c in calls)  # the example's constants apply


def test_function_names_come_from_the_inputs_whose_shapes_vary():
    shapes = [{"input_ids": (1, 64), "mask": (1, 1)}, {"input_ids": (1, 128), "mask": (1, 1)}]
    assert function_names(shapes) == ["input_ids_1x64", "input_ids_1x128"]
    two = [{"input_ids": (1, 64), "attention_mask": (1, 64)}, {"input_ids": (1, 128), "attention_mask": (1, 128)}]
    assert function_names(two) == ["input_ids_1x64_attention_mask_1x64", "input_ids_1x128_attention_mask_1x128"]


# -- a two-bucket MLP (default run: ~1.5 s CPU once torch and coremltools are loaded) -----------------------------

def test_two_bucket_mlp_dispatches_by_shape_and_saves_one_package(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).eval()
    short, long = torch.randn(1, 4, 8), torch.randn(1, 8, 8)
    c = anefx.compile(model, (short,), buckets=[(long,), (short,)], precision="fp32", progress=False)
    assert list(c.buckets) == ["input_1x4x8", "input_1x8x8"]  # the example first, listed once
    for x in (short, long):
        with torch.no_grad():
            torch.testing.assert_close(c(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(BucketShapeError, match=r"input 1x5x8\) are none of this package's buckets: input_1x4x8 "
                       r"\(input 1x4x8\); input_1x8x8 \(input 1x8x8\)\. Pad the input"):
        c(torch.randn(1, 5, 8))
    path = c.save(tmp_path / "mlp")
    assert [(r.function, r.inputs) for r in package_buckets(path)] == [("input_1x4x8", {"input": (1, 4, 8)}),
                                                                       ("input_1x8x8", {"input": (1, 8, 8)})]
    saved = load_mlpackage(path, function="input_1x8x8")(input=long)["output"]
    np.testing.assert_array_equal(saved, c.predict(long, precision="fp32")["output"])


# -- a three-bucket encoder (slow: three verified compiles, ~70 s on a busy 2-core machine) ----------------------

@pytest.fixture(scope="module")
def bert_buckets():
    """fp32, so that the interpreter's fp32 run checks the math at 1e-4 (fp16 weights would round by ~3e-4);
    its fp16 emulation rounds every tensor and weight as the fp16 program does. The CLI test compiles fp16."""
    model = tiny_bert()
    compiled = anefx.compile(model, (ids(SEQS[0]),), buckets=[(ids(s),) for s in SEQS[1:]], precision="fp32",
                             progress=False)
    return model, compiled


@pytest.mark.slow
def test_one_function_per_bucket_default_first_buckets_recorded(bert_buckets, tmp_path):
    _, c = bert_buckets
    names = [f"input_ids_1x{s}" for s in SEQS]
    assert list(c.buckets) == names and c.function == names[0]
    path = c.save(tmp_path / "bert")
    spec = load_spec(path)
    assert set(spec.mlProgram.functions) == set(names) and spec.description.defaultFunctionName == names[0]
    recorded = json.loads(package_metadata(path)[BUCKETS_KEY])
    assert recorded == [{"function": n, "inputs": {"input_ids": [1, s]}} for n, s in zip(names, SEQS, strict=True)]
    assert [r.function for r in package_buckets(path)] == names
    assert all(m.package_check is not None and m.package_check.ok for m in c.buckets.values())  # every bucket


@pytest.mark.slow
def test_three_buckets_store_one_copy_of_the_weights(bert_buckets, tmp_path):
    _, c = bert_buckets
    single = tmp_path / "one.mlpackage"
    c.mlmodel.save(str(single))  # the example's function alone: a one-bucket package
    merged = c.save(tmp_path / "three")
    blob = Path("Data/com.apple.CoreML/weights/weight.bin")
    one, three = (single / blob).stat().st_size, (merged / blob).stat().st_size
    assert one > 100_000 and three <= 1.05 * one, (one, three)  # per bucket: only (B, C, 1, S) position tables


@pytest.mark.slow
def test_each_bucket_matches_the_model_and_calls_dispatch_by_shape(bert_buckets):
    model, c = bert_buckets
    for seed, seq in enumerate(SEQS):
        x = ids(seq, seed=10 + seed)
        with torch.no_grad():
            want = model(x).last_hidden_state
        fp32 = c.predict(x, precision="fp32")["last_hidden_state"]
        assert fp32.shape == (1, seq, HIDDEN)
        assert np.abs(fp32 - want.numpy()).max() <= 1e-4 * want.abs().max().item()
        assert c.verify(x, precision="fp16")["last_hidden_state"].psnr_db > 35  # every tensor rounded to fp16
        other = c.buckets[f"input_ids_1x{SEQS[-1 - seed]}"]  # any bucket's model dispatches the same way
        assert other(x).last_hidden_state.shape == (1, seq, HIDDEN)


@pytest.mark.slow
def test_a_shape_without_a_bucket_is_refused_listing_the_buckets(bert_buckets):
    _, c = bert_buckets
    with pytest.raises(BucketShapeError) as info:
        c(ids(20))
    message = str(info.value)
    assert "input_ids 1x20" in message and "Pad the input to one of these shapes" in message
    assert all(f"input_ids_1x{s} (input_ids 1x{s})" in message for s in SEQS)
    with pytest.raises(anefx.InvalidExampleError, match="input `input_ids` is float32"):
        c(torch.zeros(1, 8))


@pytest.mark.slow
def test_saved_package_round_trip(bert_buckets, tmp_path):
    _, c = bert_buckets
    path = c.save(tmp_path / "bert")
    path = c.save(path)  # replacing a package works (atomic swap)
    for seq in SEQS:
        x = ids(seq, seed=3)
        runner = load_mlpackage(path, precision="fp32", function=f"input_ids_1x{seq}")
        got = runner(input_ids=x)["last_hidden_state"]
        np.testing.assert_array_equal(got, c.predict(x, precision="fp32")["last_hidden_state"])
    default = load_mlpackage(path, precision="fp32")  # a package's default function, as CoreML loads it
    assert default.program.inputs[0][1].shape == (1, SEQS[0])


@pytest.mark.slow
def test_cli_compiles_buckets_and_reports_the_functions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.py").write_text(BERT_FILE)
    runner = CliRunner()
    result = runner.invoke(app, ["compile", "tiny.py:model", "--example", "input_ids:1x8:int64",
                                 "--bucket", "input_ids:1x16", "-o", "tiny"])
    assert result.exit_code == 0, result.output
    assert "2 buckets" in result.output and "input_ids_1x16 (input_ids 1x16)" in result.output
    assert [r.inputs for r in package_buckets(tmp_path / "tiny.mlpackage")] == [{"input_ids": (1, 8)},
                                                                              {"input_ids": (1, 16)}]
    model = tiny_bert()  # the file's model: same seed, same weights
    for seq in (8, 16):  # the fp16 program of each bucket, emulated, against the model
        function = load_mlpackage(tmp_path / "tiny.mlpackage", precision="fp16", function=f"input_ids_1x{seq}")
        assert function.program.inputs[0][1].dtype == np.int32  # the example's dtype (int64 → int32 input)
        with torch.no_grad():
            want = model(ids(seq)).last_hidden_state
        assert compare(function(input_ids=ids(seq))["last_hidden_state"], want).psnr_db > 35
    report = runner.invoke(app, ["report", "tiny.mlpackage"], terminal_width=200)
    assert report.exit_code == 0, report.output
    assert "2 functions (default: input_ids_1x8)" in report.output and "input_ids_1x16" in report.output
    bad = runner.invoke(app, ["compile", "tiny.py:model", "--example", "input_ids:1x8:int64",
                              "--bucket", "ids:1x16", "-o", "bad"])
    assert bad.exit_code == 2 and "no tensor input 'ids'" in bad.output and "input_ids" in bad.output

