"""The unmodified HF DistilBERT-base reaches the form of Apple's hand-written ANE DistilBERT.

Reference (ml-ane-transformers, coremltools 9, S = 128): 36 conv, 72 softmax on (1, 128, 1, 128)
over axis 1, 13 layer_norm over axis 1, 7 transposes and 0 reshapes, no tensor of rank 5.
"""

from __future__ import annotations

import pytest
import torch

import anefx
from tests.helpers import ane_summary, assert_outputs_close, program


@pytest.fixture(scope="module")
def distilbert_base():
    import transformers as tf

    torch.manual_seed(0)
    model = tf.DistilBertModel(tf.DistilBertConfig()).eval()  # the base config: dim 768, 6 layers, 12 heads
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):  # random γ/β so nothing folds away
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.5, 0.5)
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    return model, ids, anefx.compile(model, (ids,))


def test_numerics_equal_the_original(distilbert_base):
    model, ids, c = distilbert_base
    with torch.no_grad():
        assert_outputs_close(c.rewritten.module()(ids), model(ids))


def test_program_matches_the_hand_written_reference(distilbert_base, tmp_path):
    _, _, c = distilbert_base
    s = ane_summary(program(c, tmp_path))
    print("DistilBERT-base S=128:", dict(s["types"]))
    assert s["types"]["linear"] == 0
    assert s["types"]["conv"] == 36
    assert s["softmax_shapes"] == {(1, 128, 1, 128): 72} and s["softmax_axes"] == {1: 72}
    assert s["norm_axes"] == {(1,): 13}
    assert s["layout_ops"] <= 7
    assert s["max_rank"] <= 4
