"""No dimension over 16384: the LM head split (split_wide_conv), the embedding table split
(split_wide_embedding), and anefx.llm.head's separate logits outputs and in-model argmax.

Programs are checked in torch (the rewritten graph) and in the saved package run by anefx's MIL
interpreter in fp32, against the model itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

import anefx
from anefx.layout import predicted_layout_cost
from anefx.llm.head import HeadError, argmax_in_model, concat_logits, logits_in_pieces
from anefx.lower import lower
from anefx.mil import MilRuntimeError, load_mlpackage, read_program
from rewrites import split_wide_conv, split_wide_embedding
from rewrites.split_wide_conv import MAX_CHANNELS, piece_sizes
from tests.helpers import ops, rewrite

VOCAB = 40000  # 3 pieces: 13334, 13333, 13333
EDGES = [0, 13333, 13334, 26666, 26667, 39999]  # the first and last id of every piece
aten = torch.ops.aten


class TinyLM(torch.nn.Module):
    """An embedding and an LM head, nothing between: cheap at any vocabulary size."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        return self.head(self.embed(ids))


def wide_tensors(program) -> list[tuple[str, str, tuple]]:
    """(kind, name, shape) of every op output, constant, input and state with a dimension over 16384."""
    found = [(op.type, name, t.shape) for op in program.operations for name, t in op.outputs
             if t is not None and t.shape and max(t.shape) > MAX_CHANNELS]
    found += [("const", name, v.shape) for name, v in program.constants.items()
              if getattr(v, "shape", None) and max(v.shape) > MAX_CHANNELS]
    found += [("input", name, t.shape) for name, t in [*program.inputs, *program.states] if max(t.shape) > MAX_CHANNELS]
    return found


CONVOLUTIONS = (aten.convolution.default, aten.conv2d.default, aten.conv1d.padding)


def transposes(program) -> int:
    return sum(op.type == "transpose" for op in program.operations)


def conv_channels(ep) -> list[int]:
    return [n.meta["val"].shape[1] for n in ep.graph_module.graph.nodes if n.target in CONVOLUTIONS]


def saved(ep, input_names, output_names, path):
    lower(ep, input_names=input_names, output_names=output_names, precision="fp32", load=False).save(str(path))
    return path


@pytest.fixture(scope="module")
def llama():
    """A Llama with vocabulary 40000 (hidden 64, 2 layers) through anefx.compile: (model, ids, logits, compiled)."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=VOCAB)
    model = tf.LlamaForCausalLM(config).eval()
    ids = torch.tensor([EDGES + torch.randint(0, VOCAB, (10,)).tolist()])
    with torch.no_grad():
        expected = model(ids).logits
    # verify=False: the rules' numerics are checked below against the model itself, in torch and the package
    compiled = anefx.compile(model, (ids,), precision="fp32", package_check="skip", verify=False)
    return model, ids, expected, compiled


def test_piece_counts():
    assert piece_sizes(40000) == [13334, 13333, 13333]
    assert len(piece_sizes(32000)) == 2 and len(piece_sizes(151936)) == 10
    assert piece_sizes(16384) == [16384] and max(piece_sizes(16385)) <= MAX_CHANNELS
    assert all(sum(piece_sizes(n)) == n and max(piece_sizes(n)) - min(piece_sizes(n)) <= 1
               for n in (16385, 32000, 40000, 128256, 151936))


def test_llama_compiles_with_no_conv_over_16384_and_the_model_s_logits(llama, tmp_path):
    model, ids, expected, c = llama
    status = {p.name: p.status for p in c.passes}
    assert status["split_wide_conv"] == "applied" and status["split_wide_embedding"] == "applied"  # guard kept them
    assert sorted(conv_channels(c.rewritten), reverse=True)[:4] == [13334, 13333, 13333, 128]
    program = read_program(c.save(tmp_path / "llama.mlpackage"))
    convs = [t.shape for op in program.operations if op.type == "conv" for _, t in op.outputs]
    assert len(convs) == 17 and max(s[1] for s in convs) == 13334  # 14 projections + the head in 3 pieces
    # full logits are the program's output: the cat of the pieces and its layout ops to it are the only wide
    # tensors (no weight, no embedding table, no conv)
    assert sorted(kind for kind, _, _ in wide_tensors(program)) == ["concat", "squeeze", "transpose"]
    got = load_mlpackage(tmp_path / "llama.mlpackage", precision="fp32")(input_ids=ids.numpy())["logits"]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c.rewritten.module()(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_the_splits_add_no_layout_op(llama):
    """Why both rules are default rules: where they match, the never-worse guard's prediction is unchanged."""
    _, _, _, c = llama
    stages = [name for name, _ in c.snapshots]
    for rule in ("split_wide_conv", "split_wide_embedding"):
        i = stages.index(rule)
        assert predicted_layout_cost(c.snapshots[i][1]) == predicted_layout_cost(c.snapshots[i - 1][1])


def test_logits_in_pieces(llama, tmp_path):
    _, ids, expected, c = llama
    ep, sizes = logits_in_pieces(c.rewritten)
    assert sizes == [13334, 13333, 13333] and list(ep.graph_signature.user_outputs) == ["logits_0", "logits_1",
                                                                                          "logits_2"]
    assert len(c.rewritten.graph_signature.user_outputs) == 1  # the program passed in is not changed
    pieces = ep.module()(ids)
    torch.testing.assert_close(torch.cat(pieces, -1), expected, rtol=1e-4, atol=1e-5)
    program = read_program(saved(ep, ["input_ids"], list(ep.graph_signature.user_outputs), tmp_path / "p.mlpackage"))
    assert wide_tensors(program) == []
    outputs = load_mlpackage(tmp_path / "p.mlpackage", precision="fp32")(input_ids=ids.numpy())
    assert [outputs[f"logits_{i}"].shape for i in range(3)] == [(1, 16, s) for s in sizes]
    np.testing.assert_allclose(concat_logits(outputs, sizes), expected.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(HeadError, match="pass the sizes logits_in_pieces returned"):
        concat_logits(outputs, [13333, 13334, 13333])


def test_argmax_in_model_is_torch_argmax(llama, tmp_path):
    _, ids, expected, c = llama
    ep = argmax_in_model(c.rewritten)
    assert list(ep.graph_signature.user_outputs) == ["token", "token_logit"]
    program = read_program(saved(ep, ["input_ids"], ["token", "token_logit"], tmp_path / "a.mlpackage"))
    assert wide_tensors(program) == [] and "reduce_argmax" not in {op.type for op in program.operations}
    logits_program = read_program(c.save(tmp_path / "llama.mlpackage"))
    assert transposes(program) == transposes(logits_program) - 1  # the logits' transpose is gone, none added
    outputs = load_mlpackage(tmp_path / "a.mlpackage", precision="fp32")(input_ids=ids.numpy())
    assert outputs["token"].dtype == np.int32
    np.testing.assert_array_equal(outputs["token"], expected.argmax(-1).numpy())
    np.testing.assert_allclose(outputs["token_logit"], expected.amax(-1).numpy(), rtol=1e-4, atol=1e-5)
    last = argmax_in_model(c.rewritten, positions="last")
    assert conv_channels(last) and {n.meta["val"].shape[-1] for n in last.graph_module.graph.nodes
                                    if n.target is aten.convolution.default and n.meta["val"].shape[1] > 1000} == {1}
    token, logit = last.module()(ids)  # the head ran on the last position only
    assert token.tolist() == [[int(expected[0, -1].argmax())]] and token.dtype == torch.int32
    with pytest.raises(HeadError, match="positions='first' is not one of all, last"):
        argmax_in_model(c.rewritten, positions="first")


def _tied_model() -> tuple[TinyLM, torch.Tensor, list[int]]:
    """Logits built to tie: across pieces, within a piece, everywhere (all zero) — and to win strictly late."""
    model = TinyLM(VOCAB, 4).eval()
    with torch.no_grad():
        model.embed.weight.zero_()
        model.head.weight.zero_()
        rows = {1: [1, 0, 0, 0], 2: [-1, 0, 0, 0], 3: [0, 1, 0, 0], 4: [0, 0, 1, 0]}
        for token, row in rows.items():
            model.embed.weight[token] = torch.tensor(row, dtype=torch.float32)
        model.head.weight[13334 + 5, 0] = model.head.weight[26667 + 7, 0] = 1.0  # a tie across pieces 1 and 2
        model.head.weight[50, 1] = model.head.weight[60, 1] = 1.0  # a tie within piece 0
        model.head.weight[70, 2], model.head.weight[30000, 2] = 1.0, 2.0  # a strictly larger logit in a later piece
    ids = torch.tensor([[1, 2, 3, 4, 1]])
    return model, ids, [13339, 0, 50, 30000, 13339]  # id 2: every logit but two is 0, the first is id 0


def test_ties_give_the_lowest_id_as_torch_argmax(tmp_path):
    model, ids, wanted = _tied_model()
    with torch.no_grad():
        assert model(ids).argmax(-1)[0].tolist() == wanted  # what torch picks
    _, rewritten, _ = rewrite(model, (ids,), anefx.default_rules(), verify=False)
    ep = argmax_in_model(rewritten)
    assert ep.module()(ids)[0][0].tolist() == wanted
    outputs = load_mlpackage(saved(ep, ["ids"], ["token", "token_logit"], tmp_path / "t.mlpackage"))(ids=ids.numpy())
    assert outputs["token"][0].tolist() == wanted
    assert outputs["token_logit"][0].tolist() == [1.0, 0.0, 1.0, 2.0, 1.0]


def test_argmax_of_one_position_and_of_a_batch(tmp_path):
    torch.manual_seed(0)
    model = TinyLM(VOCAB, 8).eval()
    for ids in (torch.tensor([[26667]]), torch.randint(0, VOCAB, (2, 3))):  # decode (S = 1); batch 2
        _, rewritten, _ = rewrite(model, (ids,), anefx.default_rules(), verify=False)
        wanted = model(ids).argmax(-1)
        token, logit = argmax_in_model(rewritten).module()(ids)
        assert torch.equal(token, wanted.int()) and token.shape == ids.shape
        last, _ = argmax_in_model(rewritten, positions="last").module()(ids)
        assert torch.equal(last, wanted[:, -1:].int())
    ep = argmax_in_model(rewrite(model, (ids[:1, :1],), anefx.default_rules(), verify=False)[1])
    program = read_program(saved(ep, ["ids"], ["token", "token_logit"], tmp_path / "d.mlpackage"))
    assert transposes(program) == 0
    assert load_mlpackage(tmp_path / "d.mlpackage")(ids=ids[:1, :1].numpy())["token"].tolist() == \
        model(ids[:1, :1]).argmax(-1).tolist()


def test_embedding_pieces_answer_every_id_and_refuse_ids_outside(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Embedding(10, 3).eval()
    ids = torch.tensor([[0, 3, 4, 7, 8, 9, 5, 1]])  # pieces of 4, 3, 3 rows: their first and last ids
    _, after, records = rewrite(model, (ids,), [split_wide_embedding.make_rule(4)])
    assert records[-1].status == "applied" and ops(after)["embedding"] == 3
    assert torch.equal(after.module()(ids), model(ids))
    before = anefx.compile(model, (ids,), rules=[], precision="fp32", package_check="skip")
    split = anefx.compile(model, (ids,), rules=[split_wide_embedding.make_rule(4)], precision="fp32",
                          package_check="skip")
    runners = {name: load_mlpackage(c.save(tmp_path / f"{name}.mlpackage")) for name, c in
               (("plain", before), ("split", split))}
    assert np.array_equal(runners["split"](input=ids.numpy())["output"], model(ids).detach().numpy())
    for bad in (10, -1):  # outside the table: torch refuses it, and so does the split package
        wrong = ids.clone()
        wrong[0, 2] = bad
        with pytest.raises(IndexError):
            after.module()(wrong)
        with pytest.raises(MilRuntimeError, match="out of bound"):
            runners["split"](input=wrong.numpy())
    with pytest.raises(MilRuntimeError, match="out of bound"):  # as the unsplit one does past the end (it wraps
        runners["plain"](input=wrong.clamp(min=10).numpy())    # negative ids: coremltools' embedding lowering)


def test_conv_and_linear_pieces_are_exact_and_the_model_untouched():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 12, 3, padding=1).eval()
    weights = {k: v.clone() for k, v in conv.state_dict().items()}
    x = torch.randn(1, 3, 5, 5)
    _, after, _ = rewrite(conv, (x,), [split_wide_conv.make_rule(5)])
    assert conv_channels(after) == [4, 4, 4] and ops(after)["cat"] == 1
    torch.testing.assert_close(after.module()(x), conv(x), rtol=0, atol=1e-6)
    assert all(torch.equal(v, weights[k]) for k, v in conv.state_dict().items())
    linear = torch.nn.Linear(3, 11).eval()
    x3 = torch.randn(2, 4, 3)
    _, after, _ = rewrite(linear, (x3,), [split_wide_conv.make_rule(5)])  # a linear the conv rule did not take
    assert [n.meta["val"].shape[-1] for n in after.graph_module.graph.nodes if n.target is aten.linear.default] \
        == [4, 4, 3]
    torch.testing.assert_close(after.module()(x3), linear(x3), rtol=0, atol=1e-6)
    same = torch.nn.Conv1d(3, 11, 3, padding="same").eval()
    x1 = torch.randn(1, 3, 7)
    _, after, _ = rewrite(same, (x1,), [split_wide_conv.make_rule(5)])
    assert conv_channels(after) == [4, 4, 3]
    torch.testing.assert_close(after.module()(x1), same(x1), rtol=0, atol=1e-6)
    grouped = torch.nn.Conv2d(4, 12, 1, groups=2).eval()
    _, _, records = rewrite(grouped, (torch.randn(1, 4, 2, 2),), [split_wide_conv.make_rule(5)])
    assert records[-1].status == "no-match" and "grouped convolution" in records[-1].refusals[0].reason


def _flattened_relu(ctx):
    """A test rule the guard must roll back: every relu runs on a flattened copy (two reshapes more)."""
    for node in [n for n in ctx.graph.nodes if n.target is aten.relu.default]:
        with ctx.graph.inserting_before(node):
            flat = ctx.graph.call_function(aten.view.default, (node.args[0], [-1]))
            flat.meta["val"] = node.args[0].meta["val"].reshape(-1)
        node.replace_input_with(node.args[0], flat)
        with ctx.graph.inserting_after(node):
            back = ctx.graph.call_function(aten.view.default, (node, list(flat.args[0].meta["val"].shape)))
            back.meta["val"] = flat.args[0].meta["val"]
        node.meta["val"] = flat.meta["val"]
        node.replace_all_uses_with(back, delete_user_cb=lambda user, back=back: user is not back)
    return 1, []


def test_the_split_stays_when_the_guard_rolls_back_a_later_rule():
    from anefx.capture import capture
    from anefx.pipeline import run_pipeline
    from anefx.rule import Rule

    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Linear(8, 11), torch.nn.ReLU()).eval(), torch.randn(4, 8)
    worse = Rule(name="flattened_relu", summary="relu on a flattened copy (a test rule)", run=_flattened_relu)
    cap = capture(model, (x,), None)
    final, records, _ = run_pipeline(cap.exported, [split_wide_conv.make_rule(5), worse], (cap.args, cap.kwargs))
    assert [(r.name, r.status) for r in records[1:]] == [("split_wide_conv", "applied"),
                                                         ("flattened_relu", "rolled-back")]
    assert ops(final)["linear"] == 3 and ops(final)["view"] == 0
    torch.testing.assert_close(final.module()(x), model(x), rtol=0, atol=1e-6)


def test_vocabulary_151936_is_ten_pieces():
    torch.manual_seed(0)
    model = TinyLM(151936, 4).eval()
    ids = torch.tensor([[0, 15193, 15194, 151935, 77777]])
    _, after, records = rewrite(model, (ids,), anefx.default_rules(), verify=False)  # numerics checked below
    assert {r.name: r.status for r in records}["split_wide_conv"] == "applied"
    assert conv_channels(after) == piece_sizes(151936) and len(conv_channels(after)) == 10
    assert ops(after)["embedding"] + ops(after)["index_select"] == 10
    torch.testing.assert_close(after.module()(ids), model(ids), rtol=1e-5, atol=1e-6)


def test_a_program_without_lm_logits_is_refused():
    class TwoOutputs(torch.nn.Module):
        def forward(self, x):
            return x + 1, x * 2

    ep = torch.export.export(TwoOutputs(), (torch.randn(2, 3),)).run_decompositions({})
    with pytest.raises(HeadError, match="whose one user output is the logits"):
        logits_in_pieces(ep)


@pytest.mark.slow
def test_stateful_decoder_head_in_pieces_and_argmax(tmp_path):
    """The LLM path: a KV-cache program (buffer mutations as CoreML states) keeps its states and signature."""
    from anefx.llm.capture import CachedDecoder, export_stateful
    from anefx.pipeline import run_pipeline

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               vocab_size=VOCAB)).eval()
    ids, position = torch.tensor([[0, 13334, 26666, 39999]]), torch.tensor([0])
    with torch.no_grad():
        expected = model(ids).logits
    ep = export_stateful(CachedDecoder(model, 32), 4)
    rewritten, _, _ = run_pipeline(ep, anefx.default_rules(), ((ids, position), {}), verify=False)
    feed = {"input_ids": ids.numpy().astype(np.int32), "position": position.numpy().astype(np.int32)}
    pieces, sizes = logits_in_pieces(rewritten)
    argmax = argmax_in_model(rewritten)
    for name, program in (("pieces", pieces), ("argmax", argmax)):
        assert program.graph_signature.buffers_to_mutate == rewritten.graph_signature.buffers_to_mutate
        path = saved(program, ["input_ids", "position"], list(program.graph_signature.user_outputs),
                     tmp_path / f"{name}.mlpackage")
        read = read_program(path)
        assert len(read.states) == 4 and wide_tensors(read) == []
        outputs = load_mlpackage(path, precision="fp32")(**feed)
        if name == "pieces":
            np.testing.assert_allclose(concat_logits(outputs, sizes), expected.numpy(), rtol=1e-4, atol=1e-4)
        else:
            np.testing.assert_array_equal(outputs["token"], expected.argmax(-1).numpy())
