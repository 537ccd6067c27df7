"""The KV cache in the Neural Engine form: verification of stateful programs, the cache-write rule, attention
reading the cache per head, and the lowered program run in the MIL interpreter against HF's logits."""

from __future__ import annotations

import pytest
import torch

from anefx.pipeline import Tolerance, _run, run_pipeline
from anefx.rule import Rule
from anefx.samples import drawn_like, drawn_states

aten = torch.ops.aten


class ToyCache(torch.nn.Module):
    """A cache buffer written at positions pos … pos + S − 1 and read whole (a KV cache in miniature)."""

    def __init__(self, length: int = 16):
        super().__init__()
        self.register_buffer("cache", torch.zeros(1, 2, length, 4), persistent=False)
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.cache.index_copy_(2, torch.arange(x.shape[2]) + pos.reshape(()), self.proj(x))
        return self.cache.sum(2)


def toy_program(seq: int = 3, model: ToyCache | None = None):
    model = model or ToyCache().eval()
    example = ((torch.randn(1, 2, seq, 4), torch.tensor([5])), {})
    with torch.no_grad():
        ep = torch.export.export(model, example[0], strict=False).run_decompositions({})
    return ep, example


def test_runs_of_a_stateful_program_are_functional_and_return_the_new_state():
    model = ToyCache().eval()
    ep, example = toy_program(model=model)
    own = ep.constants["cache"].clone()
    state = {"cache": torch.randn(1, 2, 16, 4)}
    given = state["cache"].clone()
    first, again = _run(ep, example, state), _run(ep, example, state)
    assert torch.equal(ep.constants["cache"], own) and torch.equal(model.cache, own)  # never written
    assert torch.equal(state["cache"], given)  # nor the states passed in
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    new = first[1]
    with torch.no_grad():
        torch.testing.assert_close(new[:, :, 5:8], model.proj(example[0][0]))
    assert torch.equal(new[:, :, :5], state["cache"][:, :, :5])  # random past entries kept


def test_extra_input_sets_draw_random_states_and_cache_positions_that_fit():
    ep, example = toy_program(seq=3)
    drawn = drawn_like(ep, example, 6)
    starts = {int(args[1]) for args, _ in drawn}
    assert len(starts) > 1 and all(0 <= s <= 16 - 3 for s in starts)
    states = drawn_states(ep, 2)
    assert all(s["cache"].shape == (1, 2, 16, 4) and (s["cache"] != 0).all() for s in states)
    assert not torch.equal(states[0]["cache"], states[1]["cache"])


def _write_wrong_state(ctx):
    """A broken rule: the attention-like output still reads the right write, the state gets another."""
    graph = ctx.graph
    write = next(n for n in graph.nodes if n.target is aten.index_copy.default)
    with graph.inserting_after(write):
        doubled = graph.call_function(aten.mul.Tensor, (write.args[3], 2.0))
        wrong = graph.call_function(aten.index_copy.default, (*write.args[:3], doubled))
    for node in (doubled, wrong):
        node.meta["val"] = write.meta["val"] if node is wrong else write.args[3].meta["val"]
    graph.output_node().replace_input_with(write, wrong)
    return 1, []


def test_a_rule_that_writes_the_state_wrongly_is_rolled_back_even_when_outputs_agree():
    ep, example = toy_program()
    bad = Rule(name="wrong_state", summary="test", run=_write_wrong_state, ane=False)
    _, records, _ = run_pipeline(ep, [bad], example, tolerance=Tolerance(), never_worse=False)
    assert records[-1].status == "rolled-back"
    assert "state cache" in records[-1].detail and "what the next call reads" in records[-1].detail


# -- kv_cache_write: a write at consecutive positions → one slice_update on the state -----------------------

class StridedCache(ToyCache):
    """Writes every other position: not a slice, so the rule refuses and the write lowers to a scatter."""

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.cache.index_copy_(2, torch.arange(x.shape[2]) * 2 + pos.reshape(()), self.proj(x))
        return self.cache.sum(2)


def _lower_and_load(ep, tmp_path, name: str):
    import anefx.mil
    from anefx.lower import lower, mil_histogram

    mlmodel = lower(ep, input_names=["x", "pos"], output_names=["out"], precision="fp32", load=False)
    mlmodel.save(str(tmp_path / f"{name}.mlpackage"))
    return mil_histogram(mlmodel), anefx.mil.load_mlpackage(tmp_path / f"{name}.mlpackage", "fp32")


def _calls_match(model: ToyCache, runner, seq: int) -> None:
    """Three calls in a row: the package's state carries what the model's buffer carries."""
    reference = ToyCache().eval()
    reference.load_state_dict(model.state_dict())
    for pos in (0, 3, 9):
        x = torch.randn(1, 2, seq, 4)
        with torch.no_grad():
            expected = reference(x, torch.tensor([pos]))
        got = runner(x=x.numpy(), pos=torch.tensor([pos]).numpy())["out"]
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-5)


def test_cache_write_becomes_a_slice_update_on_the_state(tmp_path):
    from rewrites import kv_cache_write

    model = ToyCache().eval()
    ep, example = toy_program(model=model)
    after, records, _ = run_pipeline(ep, [kv_cache_write.RULE], example, never_worse=False)
    assert records[-1].status == "applied" and records[-1].op_delta["anefx.slice_write"] == 1
    assert "index_copy" not in {n.target.__name__ for n in after.graph_module.graph.nodes if n.op == "call_function"}
    mil_ops, runner = _lower_and_load(after, tmp_path, "toy")
    assert {"read_state", "slice_update", "coreml_update_state"} <= set(mil_ops) and "scatter" not in mil_ops
    assert dict(runner.program.states)["cache"].dtype == "float16"  # CoreML states are fp16
    _calls_match(model, runner, 3)


def test_a_write_at_strided_positions_is_refused_and_lowers_to_a_scatter(tmp_path):
    from rewrites import kv_cache_write

    model = StridedCache().eval()
    ep, example = toy_program(seq=3, model=model)
    after, records, _ = run_pipeline(ep, [kv_cache_write.RULE], example, never_worse=False)
    (refusal,) = records[-1].refusals
    assert "not arange(S) + an offset" in refusal.reason and "index = torch.arange(S) + position" in refusal.reason
    mil_ops, runner = _lower_and_load(after, tmp_path, "strided")
    assert "scatter" in mil_ops and "slice_update" not in mil_ops
    reference = StridedCache().eval()
    reference.load_state_dict(model.state_dict())
    for pos in (0, 5):
        x = torch.randn(1, 2, 3, 4)
        with torch.no_grad():
            expected = reference(x, torch.tensor([pos]))
        got = runner(x=x.numpy(), pos=torch.tensor([pos]).numpy())["out"]
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-5)


# -- the whole decoder: prefill + decode programs through the default rules, lowered, run from disk ------------

CONTEXT, PREFILL, DECODE_STEPS = 64, 8, 6
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=1024)
FAMILIES = {
    "llama": lambda tf: tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)),
    "qwen2": lambda tf: tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON)),
    "mistral": lambda tf: tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=16)),  # < the cache
    "gemma": lambda tf: tf.GemmaForCausalLM(tf.GemmaConfig(**COMMON, head_dim=16)),
    "phi3": lambda tf: tf.Phi3ForCausalLM(tf.Phi3Config(**COMMON, pad_token_id=0)),
    "gpt2": lambda tf: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=1024,
                                                        bos_token_id=0, eos_token_id=0)),  # K cache padded 48 → 64
}


class Stateful:
    """One family's prefill and decode programs: captured, after the default rules, lowered (fp32) and saved."""

    def __init__(self, family: str, folder):
        import transformers as tf

        from anefx.api import default_rules
        from anefx.llm.capture import CachedDecoder, export_stateful
        from anefx.lower import lower, mil_histogram

        torch.manual_seed(0)
        self.model = FAMILIES[family](tf).eval()
        decoder = CachedDecoder(self.model, CONTEXT)
        self.records, self.rewritten, self.paths, self.mil_ops = {}, {}, {}, {}
        for name, seq in (("prefill", PREFILL), ("decode", 1)):
            ep = export_stateful(decoder, seq)
            example = ((torch.randint(0, 1024, (1, seq)), torch.tensor([(CONTEXT - seq) // 2])), {})
            self.rewritten[name], self.records[name], _ = run_pipeline(ep, default_rules(), example)
            mlmodel = lower(self.rewritten[name], input_names=["input_ids", "position"], output_names=["logits"],
                            precision="fp32", load=False)
            self.mil_ops[name] = mil_histogram(mlmodel)
            self.paths[name] = folder / f"{family}-{name}.mlpackage"
            mlmodel.save(str(self.paths[name]))

    def runners(self, precision: str):
        """prefill and decode runners sharing one set of states (as the functions of one package do)."""
        from anefx.mil import read_program
        from anefx.mil.interpreter import MilRunner

        states: dict = {}
        runners = {name: MilRunner(read_program(path), precision, states=states) for name, path in self.paths.items()}
        return runners, states


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return Stateful("llama", tmp_path_factory.mktemp("cache"))


def run_prompt(programs: Stateful, ids: torch.Tensor, precision: str):
    """Prefill of PREFILL tokens at 0, a second prefill at PREFILL, then one decode call per token: the logits
    of every position, and the states the calls leave."""
    import numpy as np

    runners, states = programs.runners(precision)
    rows = [runners["prefill"](input_ids=ids[:, start:start + PREFILL], position=np.array([start]))["logits"][0]
            for start in (0, PREFILL)]
    for t in range(2 * PREFILL, ids.shape[1]):
        rows.append(runners["decode"](input_ids=ids[:, t:t + 1], position=np.array([t]))["logits"][0])
    return torch.from_numpy(np.concatenate(rows)), states


def check_structure(programs: Stateful, plain_layout_ops: dict[str, int] | None = None) -> None:
    from anefx.mil import read_program
    from anefx.mil.summary import ane_summary

    for name, path in programs.paths.items():
        assert all(r.status != "rolled-back" for r in programs.records[name]), programs.records[name]
        program = read_program(path)
        states = dict(program.states)
        assert states and all(t.dtype == "float16" for t in states.values())  # CoreML states are fp16
        assert all(t.shape[-1] % 32 == 0 for t in states.values())  # the ANE needs this of a state
        assert_writes_slice_the_state(program, set(states))
        assert {"read_state", "coreml_update_state", "slice_update"} <= set(programs.mil_ops[name])
        types = [op.type for op in program.operations]
        layers, heads = 2, 4
        assert "linear" not in types and "scaled_dot_product_attention" not in types and "scatter" not in types
        assert types.count("softmax") == layers * heads  # one softmax per head
        summary = ane_summary(program)
        assert summary["max_rank"] <= 4
        shapes = [t.shape for op in program.operations for _, t in op.outputs if t is not None and t.shape]
        assert max(max(s) for s in [*shapes, *(t.shape for t in states.values())]) <= 16384
        if plain_layout_ops is not None:
            assert summary["layout_ops"] <= plain_layout_ops[name], (summary["layout_ops"], plain_layout_ops)


def assert_writes_slice_the_state(program, states: set[str]) -> None:
    """Each state is written once, by a slice_update of what was read from that same state."""
    made = {name: op for op in program.operations for name, _ in op.outputs}

    def source(name: str):  # through casts (an fp32 program reads the fp16 state and casts it)
        op = made.get(name)
        while op is not None and op.type == "cast":
            op = made.get(op.inputs["x"][0])
        return op

    writes = [op for op in program.operations if op.type == "write_state"]
    assert sorted(op.inputs["input"][0] for op in writes) == sorted(states)
    for write in writes:
        update = source(write.inputs["data"][0])
        assert update.type == "slice_update"
        read = source(update.inputs["x"][0])
        assert read.type == "read_state" and read.inputs["input"] == write.inputs["input"]


def check_numerics(programs: Stateful, record_property=None) -> None:
    ids = torch.randint(0, 1024, (1, 2 * PREFILL + DECODE_STEPS))
    with torch.no_grad():
        expected = programs.model(ids).logits[0]
    got, states = run_prompt(programs, ids, "fp32")
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-4 * scale
    check_states_hold_the_cache(programs, ids, states)
    got16, _ = run_prompt(programs, ids, "fp16")
    agreement = float((got16.argmax(-1) == expected.argmax(-1)).float().mean())
    if record_property is not None:
        record_property("fp16_top1_agreement", agreement)
    assert agreement >= 0.9, agreement


def check_states_hold_the_cache(programs: Stateful, ids: torch.Tensor, states: dict) -> None:
    """The package's states, read back in the model's layout, hold what HF's own cache holds."""
    from anefx.llm.capture import CachedDecoder
    from anefx.states import state_layout

    reference = CachedDecoder(programs.model, CONTEXT)
    with torch.no_grad():
        reference(ids, torch.tensor([0]))
    rewritten = programs.rewritten["decode"]
    for target, stored in states.items():
        layout = state_layout(rewritten, target)
        value = torch.from_numpy(stored)
        logical = layout.to_logical(value) if layout else value
        torch.testing.assert_close(logical, getattr(reference, target), rtol=1e-4, atol=1e-4)


def test_tiny_llama_prefill_and_decode_in_the_ane_form_equal_hf(tiny_llama, record_property):
    from anefx.graph import op_histogram
    from anefx.mil.summary import ane_summary

    plain = {}
    for name, ep in tiny_llama.rewritten.items():
        counts = op_histogram(ep.graph_module)
        assert counts["anefx.slice_write"] == 4 and counts["einsum"] == 2 * 2 * 4  # q·k and w·v per head
        assert {"convolution", "anefx.slice_write"} <= set(counts) and "linear" not in counts
        plain[name] = ane_summary(_plain_program(tiny_llama, name))["layout_ops"]
    check_structure(tiny_llama, plain)
    check_numerics(tiny_llama, record_property)


def _plain_program(programs: Stateful, name: str):
    """The same stateful program lowered with no rules (what coremltools alone makes of it)."""
    from anefx.llm.capture import CachedDecoder, export_stateful
    from anefx.lower import lower
    from anefx.mil import read_program

    seq = PREFILL if name == "prefill" else 1
    ep = export_stateful(CachedDecoder(programs.model, CONTEXT), seq)
    legalized = run_pipeline(ep, [], ((torch.zeros(1, seq, dtype=torch.long), torch.tensor([0])), {}), verify=False)[0]
    path = programs.paths[name].with_name(f"plain-{name}.mlpackage")
    lower(legalized, input_names=["input_ids", "position"], output_names=["logits"], precision="fp32",
          load=False).save(str(path))
    return read_program(path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma", "phi3", "gpt2"])
def test_families_prefill_and_decode_in_the_ane_form_equal_hf(family, tmp_path, record_property):
    programs = Stateful(family, tmp_path)
    check_structure(programs)
    check_numerics(programs, record_property)
