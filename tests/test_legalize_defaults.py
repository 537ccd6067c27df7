"""legalize: ops coremltools converts only in another form (where with a number, pooling with its schema's
defaults left out) and MoE experts implementations that route with data-dependent ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import anefx
from anefx.legalize import ExpertsImplementationError
from tests.helpers import ane_summary, assert_outputs_close, ops, program, rewrite

aten = torch.ops.aten


def targets(ep) -> list:
    return [n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"]


class DefaultsLeftOut(torch.nn.Module):
    def forward(self, x):
        pooled = F.max_pool2d(x, 2) + F.avg_pool2d(x, 2)  # stride = kernel size, padding 0
        strided = F.max_pool1d(x.flatten(2), 3, 2)  # stride given, padding left out
        mask = x > 0
        return pooled, strided, torch.where(mask, x, -3.5), torch.where(mask, 2.0, x), torch.where(mask, 1.0, 0.0)


def test_where_with_numbers_and_pooling_defaults_lower_and_compute_the_model(tmp_path):
    model, x = DefaultsLeftOut(), torch.randn(1, 4, 8, 8)
    c = anefx.compile(model, (x,), precision="fp32")
    assert c.passes[0].detail == "pool_defaults: 3, where_scalar: 3"
    legalized = targets(dict(c.snapshots)["legalize"])
    assert legalized.count(aten.where.self) == 3 and all("where.Scalar" not in str(t) for t in legalized)
    pools = [n for n in dict(c.snapshots)["legalize"].graph.nodes if "pool" in str(n.target)]
    assert sorted(n.args[2] for n in pools) == [[2], [2, 2], [2, 2]]  # stride: the kernel size unless given
    s = ane_summary(program(c, tmp_path))
    assert s["types"]["max_pool"] == 2 and s["types"]["avg_pool"] == 1 and s["types"]["select"] == 3
    with torch.no_grad():
        assert_outputs_close(c(x), model(x))
        assert_outputs_close(c(-x), model(-x))


def test_where_keeps_the_dtype_torch_computes_in():
    class Half(torch.nn.Module):
        def forward(self, x):
            return torch.where(x > 0, x.half(), 1e-3)  # 1e-3 rounds to fp16 as torch computes it

    _, after, _ = rewrite(Half(), (torch.randn(2, 8),), [])
    assert targets(after).count(aten.where.self) == 1
    x = torch.randn(2, 8)
    torch.testing.assert_close(after.module()(x), Half()(x), rtol=0, atol=0)


def _mixtral(**extra):
    import transformers as tf

    config = tf.MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                              num_experts_per_tok=2, **extra)
    return tf.MixtralForCausalLM(config).eval()


def test_data_dependent_experts_are_refused_with_the_setting_that_converts():
    model, ids = _mixtral(), torch.randint(0, 256, (1, 8))
    before = model.config._experts_implementation
    with pytest.raises(ExpertsImplementationError) as info:
        anefx.compile(model, (ids,))
    message = str(info.value)
    assert "model.layers.0.mlp.experts (MixtralExperts)" in message and "histc" in message
    assert "experts_implementation='batched_mm'" in message and len(message.splitlines()) <= 15
    assert model.config._experts_implementation == before  # the user's model is left as it was
    model.set_experts_implementation("batched_mm")  # the setting the message names
    _, after, _ = rewrite(model, (ids,), [])
    assert not any(op in name for name in ops(after) for op in ("histc", "grouped_mm", "nonzero"))
    with torch.no_grad():
        assert_outputs_close(after.module()(ids), model(ids, use_cache=False).logits)


class NewFilled(torch.nn.Module):  # the x.new_ones(...) form of HF's sliding-window masks
    def forward(self, x):
        return x + x.new_ones((2, 3)) * 2 + x.new_zeros(3) + x.new_full((2, 3), 5.0)


def test_new_ones_zeros_full_become_constants_that_lower():
    x = torch.randn(2, 3)
    _, after, records = rewrite(NewFilled(), (x,), [])
    assert "new_filled: 3" in records[0].detail
    assert not any(name.startswith("aten.new_") for name in ops(after))
    torch.testing.assert_close(after.module()(x), NewFilled()(x), rtol=0, atol=0)
    c = anefx.compile(NewFilled(), (x,), precision="fp32", progress=False)  # coremltools has no new_ones
    assert c.verify()["output"].max_abs < 1e-5
