"""Never worse than plain: on every model anefx's saved program has no more transposes + reshapes between its ops
than the plain lowering (`rules=[]`) — the conversion of the model's inputs and outputs to and from (B, C, 1, S)
aside —, no rank above max(plain's, 4), and computes what the model computes. The layout cost the pipeline's
guard predicts from the graph (anefx.layout.predicted_layout_cost) is checked against the real saved programs:
it is exact, for both lowerings, on every case here."""

from __future__ import annotations

import pytest
import torch

import anefx
from anefx.layout import LayoutCost, predicted_layout_cost, saved_layout_cost
from anefx.rule import Rule
from anefx.zoo import FAMILIES, build
from tests.helpers import ane_summary, assert_outputs_close, ops, program

aten = torch.ops.aten


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class ChannelsLastBlock(torch.nn.Module):
    """ConvNeXt's block: dwconv → (B, H, W, C) → LayerNorm → Linear → GELU → Linear → γ → (B, C, H, W) + x."""

    def __init__(self, c=16):
        super().__init__()
        self.dw = torch.nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm, self.up, self.down = torch.nn.LayerNorm(c), torch.nn.Linear(c, 4 * c), torch.nn.Linear(4 * c, c)
        self.gamma = torch.nn.Parameter(torch.rand(c))

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.gamma * self.down(torch.nn.functional.gelu(self.up(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


def _images(batch=1):
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


def _hf(cls, config, **kw):
    def make():
        import transformers as tf

        return getattr(tf, cls)(getattr(tf, config)(**kw)), _images(), {}
    return make


def _tokens(seq, batch=1):
    return torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))


def _llama_step():
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return tf.LlamaForCausalLM(config), (_tokens(1),), {"use_cache": False}


def _bert_batch_2():
    import transformers as tf

    config = tf.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=128)
    return tf.BertModel(config), (_tokens(16, 2),), {}


class ResidualMLP(torch.nn.Module):
    """docs/cli.md's example: LayerNorm → Linear → GELU → Linear, residual, on (B, S, C)."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(64)
        self.fc1, self.fc2 = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


CASES = {
    "mlp rank 2": lambda: (MLP(), (torch.randn(4, 32),), {}),
    "cnn with head, batch 2": lambda: (CNN(), (torch.randn(2, 3, 16, 16),), {}),
    "channels-last block": lambda: (ChannelsLastBlock(), (torch.randn(1, 16, 8, 8),), {}),
    "residual mlp (B, S, C)": lambda: (ResidualMLP(), (torch.randn(1, 128, 64),), {}),
    "llama S=1": _llama_step,
    "bert batch 2": _bert_batch_2,
    "resnet classifier": _hf("ResNetForImageClassification", "ResNetConfig", embedding_size=16,
                             hidden_sizes=[16, 32], depths=[1, 1], num_labels=10),
    "mobilenet_v2 classifier": _hf("MobileNetV2ForImageClassification", "MobileNetV2Config", image_size=32,
                                   depth_multiplier=0.25, num_labels=10),
    "convnext classifier": _hf("ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[16, 32],
                               depths=[1, 1], num_stages=2, num_labels=10),
}
DEFAULT_RUN = {"mlp rank 2", "cnn with head, batch 2", "channels-last block", "residual mlp (B, S, C)", "llama S=1"}


def _cases():
    for name in CASES:
        yield pytest.param(name, CASES[name], id=name, marks=() if name in DEFAULT_RUN else pytest.mark.slow)
    for name in FAMILIES:
        yield pytest.param(f"zoo {name}", lambda name=name: build(name), id=f"zoo {name}", marks=pytest.mark.slow)


@pytest.mark.parametrize(("name", "make"), _cases())
def test_anefx_program_is_never_worse_than_plain(name, make, tmp_path):
    model, args, kwargs = make()
    model.eval()
    plain = anefx.compile(model, args, kwargs, rules=[], progress=False, package_check="skip")
    c = anefx.compile(model, args, kwargs, progress=False, package_check="skip")
    plain_cost = saved_layout_cost(program(plain, tmp_path / "plain"))
    cost = saved_layout_cost(program(c, tmp_path / "anefx"))
    assert cost.inner_ops <= plain_cost.inner_ops, (cost, plain_cost, c.passes)
    assert cost.max_rank <= max(plain_cost.max_rank, 4), (cost, plain_cost)
    assert cost.boundary <= len(c.input_names) + len(c.output_names)  # at most one conversion per input/output
    # the guard's prediction is what coremltools really emits, for both programs
    assert predicted_layout_cost(plain.rewritten) == plain_cost
    assert predicted_layout_cost(c.rewritten) == cost
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}  # constants are baked in
    with torch.no_grad():
        assert_outputs_close(c.rewritten.module()(*args, **tensors), model(*args, **kwargs), rtol=1e-4, atol=1e-4)


def test_a_b_s_c_model_keeps_the_rules_and_pays_only_the_input_and_output_conversion(tmp_path):
    """docs/cli.md's example: plain has no layout op; anefx's body runs in (B, C, 1, S) with 2 convolutions and the
    channel LayerNorm, entered and left by one transpose each — kept, not rolled back."""
    model, x = ResidualMLP().eval(), torch.randn(1, 128, 64)
    c = anefx.compile(model, (x,), progress=False, package_check="skip")
    assert all(p.status != "rolled-back" for p in c.passes), c.passes
    s = ane_summary(program(c, tmp_path))
    assert s["types"]["conv"] == 2 and s["types"]["linear"] == 0 and s["norm_axes"] == {(1,): 1}
    assert saved_layout_cost(program(c, tmp_path / "again")) == LayoutCost(2, 4, 2)


def _around_relu(wrap):
    def run(ctx):
        """Every relu runs between a layout op and its inverse (exact; what they cost depends on coremltools)."""
        count = 0
        for node in [n for n in ctx.graph.nodes if n.target is aten.relu.default]:
            with ctx.graph.inserting_before(node):
                inner = ctx.graph.call_function(*wrap(node.args[0], True))
                node.replace_input_with(node.args[0], inner)
            with ctx.graph.inserting_after(node):
                outer = ctx.graph.call_function(*wrap(node, False))
            node.replace_all_uses_with(outer, delete_user_cb=lambda user, outer=outer: user is not outer)
            for new in (inner, outer):
                new.meta["val"] = new.target(new.args[0].meta["val"], *new.args[1:])
            count += 1
        return count, []

    return run


# coremltools cannot move a reshape through the relu: two reshapes more than plain, really worse
RESHAPED_RELU = Rule(name="reshaped_relu", summary="relu on a flattened copy (a test rule)", run=_around_relu(
    lambda x, entering: (aten.view.default, (x, [-1] if entering else list(x.args[0].args[0].meta["val"].shape)))))
# reduce_transposes moves the first transpose through the relu onto the second: they cancel, nothing is lost
TRANSPOSED_RELU = Rule(name="transposed_relu", summary="relu between two transposes (a test rule)",
                       run=_around_relu(lambda x, entering: (aten.transpose.int, (x, 0, 1))))


def _guarded(model, x, rules):
    """The pipeline as anefx.compile runs the default rules: with the never-worse guard."""
    from anefx.capture import capture
    from anefx.pipeline import run_pipeline

    cap = capture(model, (x,), None)
    return run_pipeline(cap.exported, rules, (cap.args, cap.kwargs), never_worse=True)


def test_guard_rolls_back_a_rule_that_adds_layout_ops_and_says_why(tmp_path):
    model, x = MLP().eval(), torch.randn(4, 32)
    rewritten, records, _ = _guarded(model, x, [RESHAPED_RELU])
    record = next(p for p in records if p.name == "reshaped_relu")
    assert record.status == "rolled-back"
    assert "2 transposes/reshapes" in record.detail and "plain coremltools has 0" in record.detail
    assert predicted_layout_cost(rewritten) == LayoutCost(0, 2)
    torch.testing.assert_close(rewritten.module()(x), model(x))
    chosen = anefx.compile(model, (x,), rules=[RESHAPED_RELU], progress=False, package_check="skip")
    assert saved_layout_cost(program(chosen, tmp_path)).inner_ops == 2  # really worse once lowered


def test_guard_keeps_layout_ops_coremltools_cancels(tmp_path):
    model, x = MLP().eval(), torch.randn(4, 32)
    rewritten, records, _ = _guarded(model, x, [TRANSPOSED_RELU])
    assert next(p for p in records if p.name == "transposed_relu").status == "applied"
    assert ops(rewritten)["transpose"] == 2 and predicted_layout_cost(rewritten) == LayoutCost(0, 2)
    chosen = anefx.compile(model, (x,), rules=[TRANSPOSED_RELU], progress=False, package_check="skip")
    assert saved_layout_cost(program(chosen, tmp_path)) == LayoutCost(0, 2)  # the prediction was right


def test_guard_keeps_the_rules_before_the_one_that_made_it_worse():
    model, x = MLP().eval(), torch.randn(4, 32)
    conv_rule = next(r for r in anefx.default_rules() if r.name == "linear_to_conv1x1")
    rewritten, records, _ = _guarded(model, x, [conv_rule, RESHAPED_RELU])
    assert [(p.name, p.status) for p in records[1:]] == [("linear_to_conv1x1", "applied"),
                                                         ("reshaped_relu", "rolled-back")]
    counts = ops(rewritten)
    assert counts["convolution"] == 2 and counts["linear"] == 0 and predicted_layout_cost(rewritten).layout_ops == 0


def test_rules_the_user_chose_stay_and_the_note_says_what_they_cost():
    model, x = MLP().eval(), torch.randn(4, 32)
    c = anefx.compile(model, (x,), rules=[RESHAPED_RELU], progress=False, package_check="skip")
    assert next(p for p in c.passes if p.name == "reshaped_relu").status == "applied"
    assert any("with the rules you chose" in n and "plain coremltools has 0" in n for n in c.notes)
    torch.testing.assert_close(c.rewritten.module()(x), model(x))


def test_a_rank_above_plain_is_explained_in_the_notes():
    """A rank-2 MLP runs as 1x1 convolutions on rank-4 tensors (the ANE's layout, no more layout ops than
    plain): the higher rank is said, with the option that keeps the plain form."""
    import anefx
    from anefx import zoo

    model, args, kwargs = zoo.build("mlp")
    c = anefx.compile(model, args, kwargs, progress=False)
    assert any("rank 4 where plain coremltools keeps rank 2" in n and "rules=[]" in n for n in c.notes)
    plain = anefx.compile(model, args, kwargs, rules=[], progress=False)
    assert not any("rank" in n for n in plain.notes)
