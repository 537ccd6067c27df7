"""torch.compile(backend="anefx"): entry point discovery, equality with eager, caching per shape."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from anefx import zoo
from anefx.backend import AnefxCompiledGraph, BackendOptions, accepts_attention, anefx_backend
from anefx.errors import OptionError


class Block(nn.Module):
    """nanoGPT's transformer block: LayerNorm, causal self-attention (one qkv Linear), GELU MLP."""

    def __init__(self, n_embd: int = 64, n_head: int = 4):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, S, C)
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, H, S, S)
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(B, T, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


RULES = ["rmsnorm_to_layernorm", "linear_to_conv1x1"]  # pinned: the default list grows as rules land


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def spy_backend(made: list, **options):
    def backend(gm, example_inputs):
        compiled = anefx_backend(gm, example_inputs, options=options)
        made.append(compiled)
        return compiled

    return backend


ENTRY_POINT_SCRIPT = """
assert "anefx" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
assert "anefx" not in sys.modules
torch.manual_seed(0)
block = Block().eval()
fast = torch.compile(block, backend="anefx", options={"precision": "fp32"})
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    for seq in (16, 24):
        x = torch.randn(2, seq, 64)
        torch.testing.assert_close(fast(x), block(x), rtol=1e-4, atol=1e-5)
notices = [w for w in seen if type(w.message).__name__ == "AnefxNotice"]
assert len(notices) == 1, [str(w.message) for w in seen]
print("OK", "anefx" in sys.modules)
"""


def test_entry_point_without_importing_anefx():
    header = ("import math, sys, warnings\nimport torch\nimport torch.nn as nn\n"
              "import torch.nn.functional as F\n")
    script = header + inspect.getsource(Block) + ENTRY_POINT_SCRIPT
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK True" in done.stdout


def test_nanogpt_block_recompiles_per_shape():
    torch.manual_seed(0)
    block = Block().eval()
    made: list[AnefxCompiledGraph] = []
    fast = torch.compile(block, backend=spy_backend(made, compute_units="CPU_ONLY", precision="fp32",
                                                    rules=RULES))
    for seq in (8, 12, 8, 12):
        x = torch.randn(1, seq, 64)
        torch.testing.assert_close(fast(x), block(x), rtol=1e-4, atol=1e-5)
    shapes = [e[0] for graph in made for key in graph.cache for e in key if e[0] != "int"]
    # dynamo: a static graph for 8, then a dynamic one (for 12 and 8): anefx specialises that one per
    # shape and serves the fourth call from its cache
    assert sorted(shapes) == [(1, 8, 64), (1, 8, 64), (1, 12, 64)]
    programs = [c for graph in made for c in graph.compiled.values()]
    assert all(c.options["compute_units"] == "CPU_ONLY" for c in programs)
    assert all(c.options["precision"] == "fp32" for c in programs)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_hf_models_equal_eager_by_name(name):
    model, (ids,), kwargs = zoo.build(name)
    fast = torch.compile(model, backend="anefx", options={"rules": RULES})
    for seq in (32, 16):  # the second shape recompiles
        out, ref = fast(ids[:, :seq], **kwargs), model(ids[:, :seq], **kwargs)
        key = "logits" if name == "llama" else "last_hidden_state"
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-5)


def test_graph_break_compiles_each_piece():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            x = torch.relu(self.a(x))
            torch._dynamo.graph_break()
            return self.b(x).softmax(-1)

    model = Broken().eval()
    made: list[AnefxCompiledGraph] = []
    fast = torch.compile(model, backend=spy_backend(made, rules=RULES))
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(made) == 2 and all(len(graph.compiled) == 1 for graph in made)


def test_unknown_option_lists_known_ones():
    with pytest.raises(OptionError, match=r"unknown anefx option\(s\) 'atention'.*attention, verify"):
        BackendOptions.parse({"atention": "split"})
    model = nn.Linear(4, 4)
    with pytest.raises(Exception, match="unknown anefx option"):
        torch.compile(model, backend="anefx", options={"bogus": 1})(torch.randn(2, 4))


def test_options_are_checked_and_attention_is_kept():
    parsed = BackendOptions.parse({"attention": "split_heads", "verify": False, "precision": "fp32"})
    assert parsed.attention == "split_heads" and not parsed.verify
    assert parsed.compile_kwargs()["precision"] == "fp32"
    with pytest.raises(OptionError, match="precision='fp8'"):
        BackendOptions.parse({"precision": "fp8"})
    if accepts_attention():  # anefx.compile checks the attention strategy
        assert parsed.compile_kwargs()["attention"] == "split_heads"
        with pytest.raises(OptionError, match="attention='flash'"):
            BackendOptions.parse({"attention": "flash"})
    with pytest.raises(OptionError, match="mode"):
        anefx_backend(torch.fx.symbolic_trace(nn.ReLU()), [torch.randn(2)], mode="max-autotune")
