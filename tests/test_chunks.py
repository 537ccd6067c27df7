"""Chunking a stateful program into consecutive layer chunks (anefx.llm.chunks).

The chunks, run in order with values passed by name, must equal the whole program: its logits and the new
value of every cache buffer, for a prefill call (S tokens) and a decode call (one token), with every cache
filled with random values first so that what a chunk reads from its states matters.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as tf
from torch import nn

from anefx.errors import OptionError
from anefx.llm.capture import CachedDecoder, export_stateful
from anefx.llm.chunks import ChunkingError, layer_container, layer_of, plan_chunks, run_chunks, split_program

VOCAB, CACHE, PREFILL = 256, 32, 4
LAYERS = 4
BIG = 10**12
FAMILIES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=LAYERS, n_head=4, vocab_size=VOCAB,
                                                     bos_token_id=0, eos_token_id=0)),
}
CONTAINER = {"llama": "model.model.layers", "gpt2": "model.transformer.h"}
FINAL_NORM = {"llama": "model.model.norm", "gpt2": "model.transformer.ln_f"}
EMBEDDING = {"llama": "model.model.embed_tokens", "gpt2": "model.transformer.wte"}
FIRST_ONLY = {"llama": ("model.model.embed_tokens.",),  # GPT-2's embedding reads lm_head.weight, tied to wte
              "gpt2": ("model.transformer.wte.", "model.transformer.wpe.", "model.lm_head.")}
LAST_ONLY = {"llama": ("model.model.norm.", "model.lm_head."), "gpt2": ("model.transformer.ln_f.", "model.lm_head.")}
SEQ = {"prefill": PREFILL, "decode": 1}
POSITION = {"prefill": 5, "decode": 9}  # earlier cache entries are read, later ones masked


@functools.cache
def model(family: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


@functools.cache
def program(family: str, function: str, rules: bool = False):
    ep = export_stateful(CachedDecoder(model(family), CACHE), SEQ[function])
    if not rules:
        return ep
    from anefx.api import default_rules
    from anefx.pipeline import run_pipeline

    ids, pos = call_inputs(function)
    return run_pipeline(ep, default_rules(), ((ids, pos), {}), never_worse=False)[0]


def call_inputs(function: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (1, SEQ[function]), generator=torch.Generator().manual_seed(1))
    return ids, torch.tensor([POSITION[function]])


def even(parts: int, layers: int = LAYERS) -> list[range]:
    return [range(i * layers // parts, (i + 1) * layers // parts) for i in range(parts)]


def states_of(ep) -> list[str]:
    return list(ep.graph_signature.buffers_to_mutate.values())


def random_states(ep) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    held = {**ep.state_dict, **ep.constants}  # persistent buffers are in the state_dict, others constants
    return {name: torch.randn(held[name].shape, generator=generator) for name in states_of(ep)}


def set_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """A fresh tensor for the buffer (a program's module shares its buffers with the program: never write them)."""
    owner, _, leaf = name.rpartition(".")
    (module.get_submodule(owner) if owner else module).register_buffer(leaf, value.clone(), persistent=False)


def run_whole(ep, states, *args):
    module = ep.module()
    for name, value in states.items():
        set_buffer(module, name, value)
    with torch.no_grad():
        out = module(*args)
    return out, {name: module.get_buffer(name) for name in states}


def run_split(chunks, states, feed):
    modules = [c.program.module() for c in chunks]
    for module, chunk in zip(modules, chunks, strict=True):
        for name in chunk.states:
            set_buffer(module, name, states[name])
    with torch.no_grad():
        values = run_chunks(modules, chunks, feed)
    written = {name: m.get_buffer(name) for m, c in zip(modules, chunks, strict=True) for name in c.states}
    return values, written


def assert_split_equals_whole(ep, chunks, feed: dict[str, torch.Tensor], output: str = "logits") -> None:
    states = random_states(ep)
    expected, expected_states = run_whole(ep, states, *feed.values())
    values, written = run_split(chunks, states, feed)
    torch.testing.assert_close(values[output], expected, rtol=1e-6, atol=1e-6)
    assert sorted(written) == sorted(states)  # every state written by exactly one chunk
    assert sum(len(c.states) for c in chunks) == len(states)
    for name, value in expected_states.items():
        assert not torch.equal(value, states[name])  # the call wrote this cache
        torch.testing.assert_close(written[name], value, rtol=1e-6, atol=1e-6)


def check_records(chunks, family: str) -> None:
    """Inputs, outputs and states by name; each chunk holds only its own layers' parameters."""
    for chunk in chunks:
        chunk.program.validate()
        first = chunk.index == 0
        last = chunk.index == len(chunks) - 1
        assert chunk.inputs == (["input_ids", "position"] if first else
                                [f"hidden_states_{chunk.layers.start}", "position"])
        assert chunk.outputs == (["logits"] if last else [f"hidden_states_{chunk.layers.stop}"])
        assert chunk.states == [f"{kind}_cache_{i}" for i in chunk.layers for kind in "kv"]
        for name in chunk.program.state_dict:
            layer = _layer_in_name(name, CONTAINER[family])
            if layer is not None:
                assert layer in chunk.layers, name
            else:
                assert (first and name.startswith(FIRST_ONLY[family])) or (last and name.startswith(LAST_ONLY[family]))


def _layer_in_name(name: str, container: str) -> int | None:
    if not name.startswith(container + "."):
        return None
    return int(name[len(container) + 1:].split(".")[0])


# -- layers ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layer_container_and_layer_of_from_the_graph(family):
    ep = program(family, "decode")
    container = layer_container(ep.graph)
    assert container == CONTAINER[family]
    layers = {}
    for node in ep.graph.nodes:
        layers.setdefault(layer_of(node, container), set()).add(node)
    assert sorted(k for k in layers if k is not None) == list(range(LAYERS))
    embedding = next(n for n in ep.graph.nodes if n.target == torch.ops.aten.embedding.default)
    assert layer_of(embedding) is None  # the container found from the node's graph
    writes = [n for n in ep.graph.nodes if n.target == torch.ops.aten.index_copy.default]
    assert [layer_of(n, container) for n in writes] == [i for i in range(LAYERS) for _ in "kv"]


# -- split = whole -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("function", ["prefill", "decode"])
def test_llama_chunks_equal_the_whole_program(function, parts):
    ep = program("llama", function)
    chunks = split_program(ep, even(parts))
    check_records(chunks, "llama")
    ids, pos = call_inputs(function)
    assert_split_equals_whole(ep, chunks, {"input_ids": ids, "position": pos})


def test_gpt2_chunks_equal_the_whole_program():
    ep = program("gpt2", "decode")  # the other GPT-2 cases run in the slow test below
    chunks = split_program(ep, even(4))
    check_records(chunks, "gpt2")
    ids, pos = call_inputs("decode")
    assert_split_equals_whole(ep, chunks, {"input_ids": ids, "position": pos})


@pytest.mark.slow
@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("rules", [False, True], ids=["captured", "rules"])
@pytest.mark.parametrize("function", ["prefill", "decode"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_chunks_equal_the_whole_program_after_rules(family, function, rules, parts):
    ep = program(family, function, rules)
    chunks = split_program(ep, even(parts))
    check_records(chunks, family)
    ids, pos = call_inputs(function)
    assert_split_equals_whole(ep, chunks, {"input_ids": ids, "position": pos})


def test_final_norm_once_in_the_last_chunk_and_embeddings_in_the_first():
    ep = program("llama", "prefill")
    chunks = split_program(ep, even(4))

    def count(graph, module: str) -> int:
        return sum(1 for n in graph.nodes if n.op == "call_function" and _in_module(n, module))

    for module, home in ((FINAL_NORM["llama"], 3), (EMBEDDING["llama"], 0)):
        counts = [count(c.program.graph, module) for c in chunks]
        assert counts[home] == count(ep.graph, module) > 0
        assert sum(counts) == counts[home]
    rotary = [count(c.program.graph, "model.model.rotary_emb") for c in chunks]
    assert rotary[0] > 0 and len(set(rotary)) == 1  # input-only tables are recomputed in every chunk


def _in_module(node, module: str) -> bool:
    from anefx.llm.chunks import module_paths

    return module in module_paths(node)


def test_the_users_model_is_not_modified():
    m = model("llama")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ep = program("llama", "decode")
    chunks = split_program(ep, even(2))
    ids, pos = call_inputs("decode")
    run_split(chunks, random_states(ep), {"input_ids": ids, "position": pos})
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# -- the plan ----------------------------------------------------------------------------------------------------

def test_plan_fits_the_limits_with_the_fewest_even_chunks():
    ep = program("llama", "prefill")
    assert plan_chunks(ep, BIG, BIG).ranges == [range(0, LAYERS)]
    halves = split_program(ep, even(2))
    limit = max(c.weight_bytes for c in halves)
    plan = plan_chunks(ep, limit, BIG)
    assert plan.ranges == even(2) and plan.container == CONTAINER["llama"]
    assert plan.weight_bytes == [c.weight_bytes for c in halves]
    quarters = split_program(ep, even(4))
    plan = plan_chunks(ep, BIG, max(c.predicted_ops for c in quarters))
    assert plan.ranges == even(4)
    three = split_program(ep, [range(0, 3), range(3, 4)])  # fits 3 layers, but 2 + 2 is as few chunks and even
    assert plan_chunks(ep, max(c.weight_bytes for c in three), BIG).ranges == even(2)


def test_weight_bytes_are_the_stored_fp16_sizes():
    ep = program("llama", "prefill")
    for chunk in split_program(ep, even(2)):
        tensors = [*chunk.program.state_dict.values(),
                   *(v for k, v in chunk.program.constants.items() if k not in chunk.states)]
        floats = sum(t.numel() for t in tensors if t.is_floating_point())
        others = sum(t.numel() * min(t.element_size(), 4) for t in tensors if not t.is_floating_point())
        assert chunk.weight_bytes == 2 * floats + others
    fp16, fp32 = (plan_chunks(ep, BIG, BIG, bytes_per_float=n).weight_bytes[0] for n in (2, 4))
    assert fp32 == 2 * fp16 > 0  # this program's lifted tensors are all floats


def test_one_plan_fits_prefill_and_decode():
    programs = [program("llama", "prefill"), program("llama", "decode")]
    limit = min(max(c.predicted_ops for c in split_program(ep, even(2))) for ep in programs)
    plan = plan_chunks(programs, BIG, limit)
    for ep in programs:
        assert all(c.predicted_ops <= limit for c in split_program(ep, plan))
    assert len(plan.ranges) >= 2


def test_a_layer_over_a_limit_is_refused_naming_the_option():
    ep = program("llama", "prefill")
    with pytest.raises(ChunkingError) as bytes_error:
        plan_chunks(ep, 1000, BIG)
    message = str(bytes_error.value)
    assert "layer 0 (model.model.layers.0) with the embeddings" in message
    assert "Raise max_chunk_bytes to at least" in message and len(message.splitlines()) <= 15
    with pytest.raises(ChunkingError, match=r"layer 0 .* MIL ops, over max_chunk_ops=10\. Raise max_chunk_ops"):
        plan_chunks(ep, BIG, 10)
    for bad in (0, True, 2.5):
        with pytest.raises(OptionError, match="max_chunk_bytes"):
            plan_chunks(ep, bad, BIG)


@pytest.mark.parametrize("ranges, says", [
    ([range(0, 2), range(3, 4)], "consecutive"),
    ([range(0, 3)], "ends at layer 3 but the program has 4"),
    ([range(0, 4), range(4, 4)], "non-empty"),
])
def test_a_plan_that_does_not_fit_the_program_is_refused(ranges, says):
    with pytest.raises(ChunkingError, match=says):
        split_program(program("llama", "decode"), ranges)


# -- any stack of blocks: values carried between layers, states shared by two layers -----------------------------

class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.register_buffer("cache", torch.zeros(1, 8, width))  # persistent: in the program's state_dict

    def forward(self, h, carried, first, positions, peek=None):
        self.cache.index_copy_(1, positions, h)
        h = h + self.proj(h + carried) + self.cache.mean(1, keepdim=True)
        if peek is not None:  # reads the cache of another layer
            h = h + peek.mean(1, keepdim=True)
        return h + first, carried * 0.5 + h


class Stack(nn.Module):
    """Blocks that carry a second tensor and all read the embeddings; with `peek`, block 0 reads block 1's cache."""

    def __init__(self, peek: bool = False, width: int = 16, vocab: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.peek = peek

    def forward(self, ids, pos):
        first = self.embed(ids)
        h, carried = first, torch.zeros_like(first)
        positions = pos + torch.arange(ids.shape[1])
        for i, block in enumerate(self.blocks):
            peek = self.blocks[1].cache if self.peek and i == 0 else None
            h, carried = block(h, carried, first, positions, peek)
        return self.head(self.norm(h))


@functools.cache
def stack_program(peek: bool):
    torch.manual_seed(0)
    stack = Stack(peek).eval()
    ids, pos = torch.randint(0, 32, (1, 3)), torch.tensor([2])
    return torch.export.export(stack, (ids, pos), strict=False).run_decompositions({}), ids, pos, stack


@pytest.mark.parametrize("parts", [2, 4])
def test_values_carried_between_layers_are_passed_named(parts):
    ep, ids, pos, stack = stack_program(False)
    assert layer_container(ep.graph) == "blocks"
    chunks = split_program(ep, even(parts))
    assert_split_equals_whole(ep, chunks, {"ids": ids, "pos": pos})
    with torch.no_grad():
        run_chunks([c.program.module() for c in chunks], chunks, {"ids": ids, "pos": pos})  # states as split
    assert not any(block.cache.any() for block in stack.blocks)  # the chunks wrote their own copies of the states
    for chunk in chunks[1:]:
        k = chunk.layers.start
        assert chunk.inputs == [f"hidden_states_{k}", f"embed_{k}", f"layer{k - 1}_{k}", "pos"]
        assert chunk.crossing[f"embed_{k}"] == "embedding"  # made in chunk 0, passed on by every chunk
    assert [c.states for c in chunks] == [[f"blocks.{i}.cache" for i in r] for r in even(parts)]


def test_layers_sharing_a_state_stay_in_one_chunk():
    ep, ids, pos, _ = stack_program(True)
    quarters = split_program(ep, [range(0, 2), range(2, 3), range(3, 4)])
    assert_split_equals_whole(ep, quarters, {"ids": ids, "pos": pos})
    plan = plan_chunks(ep, BIG, quarters[0].predicted_ops)
    assert plan.ranges[0].stop >= 2 and len(plan.ranges) >= 2  # never a cut between layers 0 and 1
    with pytest.raises(ChunkingError, match=r"blocks\.1\.cache is used by layers 0, 1\b.*Keep layers 0\.\.1 in one"):
        split_program(ep, even(4))
    with pytest.raises(ChunkingError, match=r"layers 0-1 \(they share a cache state"):
        plan_chunks(ep, BIG, quarters[1].predicted_ops)


# -- lowering ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("function", ["prefill", "decode"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_each_chunk_lowers_with_its_own_states(family, function):
    from anefx.lower import lower, mil_histogram

    ep = program(family, function, True)
    chunks = split_program(ep, even(4))
    for chunk in chunks:
        mlmodel = lower(chunk.program, input_names=chunk.inputs, output_names=chunk.outputs, load=False)
        spec = mlmodel.get_spec()
        assert [s.name for s in spec.description.state] == chunk.states
        assert [i.name for i in spec.description.input] == chunk.inputs
        assert [o.name for o in spec.description.output] == chunk.outputs
        ops = mil_histogram(mlmodel)
        assert sum(ops.values()) <= chunk.predicted_ops  # the prediction is an upper bound here
        last = chunk.index == len(chunks) - 1
        assert ops["layer_norm"] == 2 * len(chunk.layers) + last  # the final norm once, in the last chunk
        assert ops["read_state"] >= 2 and ops["coreml_update_state"] == 2
