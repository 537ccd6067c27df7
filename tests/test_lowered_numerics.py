"""The saved program computes the model's function: checked with anefx's MIL interpreter (any OS).

These caught a real mistranslation: coremltools lowers `zeros_like(bool, dtype=float)` as a bool
tensor, so a padding mask built with masked_fill added +1 instead of -inf to masked scores — the torch
graph was right, the .mlpackage was not.
"""

from __future__ import annotations

import torch

import anefx
from anefx import zoo


def padding(length: int, pad: int) -> torch.Tensor:
    mask = torch.ones(1, length, dtype=torch.long)
    mask[0, length - pad:] = 0
    return mask


def test_bert_with_a_padding_mask_input():
    model, (ids,), _ = zoo.build("bert")
    c = anefx.compile(model, (ids,), {"attention_mask": padding(32, 5)}, precision="fp32")
    assert c.input_names == ["input_ids", "attention_mask"]
    for mask in (padding(32, 5), padding(32, 11), padding(32, 0)):
        report = c.verify(ids, attention_mask=mask)
        assert all(r.max_rel <= 1e-4 for r in report.values()), report
    fp16 = anefx.compile(model, (ids,), {"attention_mask": padding(32, 5)}).verify()
    assert all(r.psnr_db >= 60 for r in fp16.values()), fp16


def test_verify_uses_the_example_and_names_outputs():
    model, args, kwargs = zoo.build("gpt2")
    report = anefx.compile(model, args, kwargs, precision="fp32").verify()
    assert list(report) == ["logits"] and report["logits"].max_rel <= 1e-4
