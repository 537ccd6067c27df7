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
from anefx.backend_graph import describe_graph
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


@pytest.mark.parametrize("name", ["bert", pytest.param("llama", marks=pytest.mark.slow)])  # llama: see below
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
            scale = x.abs().max().item()  # a graph break; the float enters the next graph
            return self.b(x / scale).softmax(-1)

    torch.manual_seed(0)
    model = Broken().eval()
    made: list[AnefxCompiledGraph] = []
    fast = torch.compile(model, backend=spy_backend(made, rules=RULES))
    for _ in range(2):  # a new float: dynamo recompiles the second graph with it as a 0-d float64 input
        x = torch.randn(2, 5, 16)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert [len(graph.compiled) for graph in made] == [1, 1, 1] and not any(g.failures for g in made)
    assert ((), torch.float64) in next(iter(made[2].cache))  # it runs in the program as (1,) float32


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
    compiled = anefx_backend(torch.fx.symbolic_trace(nn.ReLU()), [torch.randn(2)], mode="max-autotune")
    with pytest.raises(OptionError, match="drop `mode`"):  # raised by the call, as itself (not wrapped by dynamo)
        compiled(torch.randn(2))


# -- HF decoders called the ordinary way: use_cache on, the DynamicCache's tensors are graph outputs --------


def _cache_tensors(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _assert_step_equal(out, ref):
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    got, expected = _cache_tensors(out.past_key_values), _cache_tensors(ref.past_key_values)
    assert len(got) == len(expected) == 4  # 2 layers × (keys, values)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _generate_two_steps(name: str):
    """Prefill with the default use_cache, then one generation step fed the returned cache."""
    model, (ids,), _ = zoo.build(name)
    made: list[AnefxCompiledGraph] = []
    fast = torch.compile(model, backend=spy_backend(made))  # default rules: split_head_attention included
    out, ref = fast(ids), model(ids)
    _assert_step_equal(out, ref)
    step = ref.logits[:, -1:].argmax(-1)
    out2, ref2 = fast(step, past_key_values=out.past_key_values), model(step, past_key_values=ref.past_key_values)
    _assert_step_equal(out2, ref2)
    assert out2.past_key_values.layers[0].keys.shape[-2] == ids.shape[1] + 1
    return made


def test_llama_with_cache_generates_like_eager():
    made = _generate_two_steps("llama")
    assert [len(g.compiled) for g in made] == [1, 1] and not any(g.failures for g in made)
    prefill = next(iter(made[0].compiled.values()))
    # the regression: the empty cache's first update (cat with an empty tensor) broke split_head_attention
    assert {p.name: p.status for p in prefill.passes}["split_head_attention"] == "applied"
    assert "empty_cat: 4" in prefill.passes[0].detail  # legalize dropped the empty K/V tensors
    assert len(prefill.output_names) == 5  # logits and the 4 cache tensors come from the program


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_decoders_with_cache_generate_like_eager(name):
    made = _generate_two_steps(name)
    assert all(len(g.compiled) == 1 for g in made) and not any(g.failures for g in made)


class PrefixAttention(nn.Module):
    """Attention with learned key/value prefix tokens (prefix tuning): K/V = cat([prefix, k], seq)."""

    def __init__(self, dim: int = 32, heads: int = 2, prefix: int = 3):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.prefix_k = nn.Parameter(torch.randn(1, heads, prefix, dim // heads))
        self.prefix_v = nn.Parameter(torch.randn(1, heads, prefix, dim // heads))

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = (t.view(b, s, self.heads, c // self.heads).transpose(1, 2) for t in self.qkv(x).split(c, 2))
        k, v = torch.cat([self.prefix_k, k], 2), torch.cat([self.prefix_v, v], 2)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, c))


def test_constant_kv_prefix_is_taken_per_head():
    """The root of the `_folded_clone` failure: split_head_attention replayed a constant cat input (a lifted
    placeholder) as if it were an op. A parameter prefix is such an input, cache or no cache."""
    import anefx

    torch.manual_seed(0)
    model, x = PrefixAttention().eval(), torch.randn(1, 8, 32)
    c = anefx.compile(model, (x,), precision="fp32", rules=["split_head_attention"])
    assert {p.name: (p.status, p.matches) for p in c.passes}["split_head_attention"] == ("applied", 1)
    torch.testing.assert_close(c.rewritten.module()(x), model(x), rtol=1e-4, atol=1e-5)


# -- graph breaks -------------------------------------------------------------------------------------------


class BrokenGPT(nn.Module):
    """Two nanoGPT blocks with Python in between: a print, a branch on a tensor's value, `.item()`."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Block(), Block()

    def forward(self, x):
        h = self.first(x)
        print("hidden norm", float(h.norm()))  # noqa: T201 - the graph break under test
        if h.mean() > 0:  # data-dependent Python branch
            h = h * 0.5
        scale = h.abs().max().item()
        return self.second(h / scale)


@pytest.mark.slow
def test_graph_breaks_compile_each_piece_and_equal_eager(capsys):
    torch.manual_seed(0)
    model = BrokenGPT().eval()
    made: list = []
    fast = torch.compile(model, backend=spy_backend(made, precision="fp32", rules=RULES))
    with torch.no_grad():
        for shift in (3.0, -3.0):  # both sides of the branch
            x = torch.randn(1, 8, 64) + shift
            torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert capsys.readouterr().out.count("hidden norm") == 4  # the print ran each time, as in eager
    graphs = [g for g in made if isinstance(g, AnefxCompiledGraph)]  # the others compute nothing on x
    assert not any(graph.failures for graph in graphs)
    assert all(len(g.compiled) == len(g.cache) for g in graphs)  # every piece compiled, none fell back
    blocks = [c for g in graphs if describe_graph(g.gm).startswith(("first", "second")) for c in g.compiled.values()]
    assert len(blocks) >= 2 and all({p.name: p.status for p in c.passes}["linear_to_conv1x1"] == "applied"
                                    for c in blocks)
    # `.item()`'s float reaches the second block as a 0-d float64 tensor: it enters the program as (1,) float32
    keys = [key for g in graphs for key in g.cache]
    assert any(((), torch.float64) in key for key in keys)


# -- outputs that must stay as eager has them --------------------------------------------------------------


class Outputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        y = self.lin(x).relu()
        return y, x, x.transpose(0, 1), y, x.shape[0] * 2, x[0], y + 1, self.lin.weight


def test_inputs_duplicates_views_and_ints_come_back_as_in_eager():
    torch.manual_seed(0)
    model = Outputs().eval()
    made: list[AnefxCompiledGraph] = []
    fast = torch.compile(model, backend=spy_backend(made, precision="fp32", rules=[]), dynamic=True)
    for rows in (4, 5):  # dynamic: x.shape[0] * 2 is a symbolic int output of the graph
        x = torch.randn(rows, 6)
        out, ref = fast(x), model(x)
        assert len(out) == len(ref) == 8
        for a, b in zip(out, ref, strict=True):
            if isinstance(b, torch.Tensor):
                torch.testing.assert_close(a, b)
        assert type(out[4]) is int and out[4] == 2 * rows
        assert out[1] is x and out[0] is out[3]  # the input itself; one tensor listed twice
        assert out[2].data_ptr() == x.data_ptr() and out[5].data_ptr() == x.data_ptr()  # views of x
        assert out[7] is model.lin.weight
    [graph] = made
    assert [kind for kind, _ in graph.plan.sources] == ["program", "torch", "torch", "torch", "program"]
    assert len(graph.compiled) == 2  # one program per row count; y and y + 1 are its outputs
    assert all(c.output_names == ["output_0", "output_1"] for c in graph.compiled.values())


def test_whole_tensor_reductions_lower_behind_layout_rules():
    """`x.abs().max().item()` is the usual graph break; coremltools failed on a reduction without axes
    behind linear_to_conv1x1's transposes (KeyError 'axes'): legalize names the axes."""
    import anefx

    class Reductions(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return h.sum(), h.mean(), h.max(), h.min()

    torch.manual_seed(0)
    model, x = Reductions().eval(), torch.randn(2, 5, 16)
    c = anefx.compile(model, (x,), precision="fp32", rules=["linear_to_conv1x1"])
    assert "reduction_axes: 4" in c.passes[0].detail and c.passes[1].status == "applied"
    for got, expected in zip(c(x), model(x), strict=True):  # the lowered program, in the MIL interpreter
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
