"""Bad inputs and faults for torch.compile(backend="anefx").

Each one reaches the user as an AnefxError (not dynamo's BackendCompilerFailed) whose message is at most
15 lines, says what to change, and, where the whole graph would help, names a debug file holding it.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from anefx.compiled import AnefxNotice
from anefx.errors import (
    AnefxError,
    CaptureError,
    OptionError,
    RuleError,
    UnknownRuleError,
    short_reason,
)
from anefx.rule import Pattern, Rule

MAX_LINES = 15


@pytest.fixture(autouse=True)
def _fresh_dynamo(tmp_path, monkeypatch):
    monkeypatch.setenv("ANEFX_DEBUG_DIR", str(tmp_path / "anefx-debug"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class KthValue(nn.Module):
    """kthvalue has no coremltools lowering: the graph compiles through the rules, then lowering fails."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x).kthvalue(2, -1).values


def run(model: nn.Module, x: torch.Tensor | None = None, **options):
    return torch.compile(model.eval(), backend="anefx", options=options)(torch.randn(2, 8) if x is None else x)


def raised(exc_type: type[AnefxError], model: nn.Module, **options) -> str:
    with pytest.raises(AnefxError) as info:
        run(model, **options)
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert len(message.splitlines()) <= MAX_LINES, message
    assert "graph():" not in message and "%" not in message  # never a graph dump
    return message


def debug_file(message: str) -> Path:
    found = re.findall(r"(/\S+\.txt)", message)
    assert found, f"no debug file named in: {message}"
    path = Path(found[-1])
    assert path.is_file()
    return path


def test_unknown_option_names_the_known_ones():
    message = raised(OptionError, Net(), precison="fp32")
    assert "unknown anefx option(s) 'precison'" in message and "precision" in message.split("accepts:")[1]


def test_option_value_outside_its_choices():
    message = raised(OptionError, Net(), precision="fp8")
    assert "precision='fp8' is not one of fp16, fp32" in message


def test_flag_that_is_not_a_bool():
    message = raised(OptionError, Net(), verify="no")
    assert "options['verify'] must be True or False, got 'no'" in message


def test_rules_given_as_one_string():
    message = raised(OptionError, Net(), rules="linear_to_conv1x1")
    assert "must be a list of rule names, e.g. ['linear_to_conv1x1']" in message


def test_unknown_rule_name_lists_the_rules():
    message = raised(UnknownRuleError, Net(), rules=["linear_to_conv"])
    assert "unknown rule 'linear_to_conv'; known rules:" in message and "linear_to_conv1x1" in message


def test_options_that_are_not_a_dict():
    with pytest.raises(OptionError, match=r"takes a dict, e\.g\. \{'precision': 'fp32'\}, got list"):
        torch.compile(Net().eval(), backend="anefx", options=["fp32"])(torch.randn(2, 8))


def test_mode_is_refused():
    with pytest.raises(OptionError, match=r"torch.compile\(mode='max-autotune'\) means nothing to anefx; drop `mode`"):
        torch.compile(Net().eval(), backend="anefx", mode="max-autotune")(torch.randn(2, 8))


def test_graph_with_an_op_coremltools_cannot_lower_is_partitioned_even_without_fallback():
    model, x = KthValue().eval(), torch.randn(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnefxNotice)
        out = torch.compile(model, backend="anefx", options={"fallback": False, "precision": "fp32"})(x)
    torch.testing.assert_close(out, model(x))  # the linear as a package, kthvalue in torch: no error


def test_graph_anefx_cannot_lower_is_partitioned_with_one_notice(monkeypatch: pytest.MonkeyPatch):
    from anefx import partition_run

    monkeypatch.setattr(partition_run, "_PARTITIONS_NOTED", set())  # another test may have noted this place
    model = KthValue().eval()
    fast = torch.compile(model, backend="anefx", options={"precision": "fp32"})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for rows in (2, 3, 2):
            x = torch.randn(rows, 8)
            torch.testing.assert_close(fast(x), model(x))  # the package in the interpreter, kthvalue in torch
    notices = [str(w.message) for w in seen if w.category is AnefxNotice and "in torch on the CPU" in str(w.message)]
    assert len(notices) == 1, notices
    assert "aten.kthvalue.default" in notices[0] and "1 CoreML package(s)" in notices[0]
    assert not any("could not compile" in str(w.message) for w in seen)  # partitioned, not a fallback


def _relu_rule(replace) -> Rule:
    return Rule("broken_relu", "a rule with a bug, for the tests", replace=replace,
                patterns=lambda: [Pattern("relu", torch.relu, lambda: (torch.randn(2, 8),))])


def test_rule_that_raises_is_named_with_the_way_around_it():
    def replace(match, ctx):
        raise IndexError("list index out of range")

    message = raised(RuleError, Net(), rules=[_relu_rule(replace)], fallback=False)
    assert "rule broken_relu failed (IndexError: list index out of range)" in message
    assert "It failed at the top level (node relu)" in message
    assert "Compile without it: rules=[r for r in anefx.default_rules() if r.name != 'broken_relu']" in message
    assert "relu" in debug_file(message).read_text()


def test_very_long_internal_error_is_cut_and_kept_in_a_file():
    """torch's lint errors print the whole graph into the message (27,000-31,000 characters on an HF decoder)."""
    dump = "\n".join(f"    %relu_{i} : [num_users=1] = call_function[target=torch.ops.aten.relu.default]"
                     f"(args = (%relu_{i - 1},), kwargs = {{}})" for i in range(400))
    text = f"Node [graph = graph():\n{dump}\n    return (relu_399,), name = 'relu_x'] target relu_x has type str " \
           "but a Callable is expected"
    assert len(text) > 30_000

    def replace(match, ctx):
        raise ValueError(text)

    message = raised(RuleError, Net(), rules=[_relu_rule(replace)], fallback=False)
    assert len(message) < 2_000
    assert "ValueError: Node [graph = <graph>, name = 'relu_x'] target relu_x has type str but a Callable" in message
    files = sorted((Path(re.findall(r"(/\S+)-\d+\.txt", message)[0]).parent).glob("*.txt"))
    assert any(text in f.read_text() for f in files)  # the rule's full error, graph included


def test_graph_that_writes_to_its_input():
    class Doubling(nn.Module):
        def forward(self, x):
            x.mul_(2)
            return x.sin()

    x = torch.ones(2, 8)
    with pytest.raises(CaptureError) as info:
        run(Doubling(), x, fallback=False)
    message = str(info.value)
    assert "writes to x in place" in message and "out of place (`x = x * 2`" in message
    assert len(message.splitlines()) <= MAX_LINES
    assert torch.equal(x, torch.ones(2, 8))  # nothing ran on the caller's tensor
    torch._dynamo.reset()
    with pytest.warns(AnefxNotice, match="writes to x in place"):
        out = run(Doubling(), x)  # the default: the graph runs in torch, as eager (x doubled once)
    assert torch.equal(x, torch.full((2, 8), 2.0)) and torch.equal(out, x.sin())


def test_short_reason_of_torchs_lint_error():
    graph = torch.fx.symbolic_trace(Net()).graph
    with pytest.raises(ValueError) as info:
        graph.create_node("call_function", "not_callable", ())
    assert len(str(info.value)) > 300 and "graph():" in str(info.value)
    reason = short_reason(info.value)
    assert reason == ("ValueError: Node [graph = <graph>, name = 'not_callable'] target not_callable has type str "
                      "but a Callable is expected")
