"""The KV cache in the Neural Engine form: verification of stateful programs, the cache-write rule, attention
reading the cache per head, and the lowered program run in the MIL interpreter against HF's logits."""

from __future__ import annotations

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
