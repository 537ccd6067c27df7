"""Capture: bad input gives actionable AnefxErrors; outputs get readable names; inputs stay the user's."""

from __future__ import annotations

import pytest
import torch

import anefx
from anefx.capture import capture
from tests.helpers import assert_outputs_close


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.proj(x)


def test_not_a_module():
    with pytest.raises(anefx.InvalidModelError, match="expects a torch.nn.Module, got function"):
        anefx.compile(lambda x: x, (torch.randn(2, 8),))


def test_example_that_is_not_a_tensor():
    with pytest.raises(anefx.InvalidExampleError, match=r"example_args\[0\]\[0\] is a float, not a tensor") as info:
        anefx.compile(Small(), ([1.0, 2.0],))
    assert "every positional example must be a tensor" in str(info.value)


def test_keyword_example_of_unsupported_type():
    with pytest.raises(anefx.InvalidExampleError, match=r"example_kwargs\['x'\] is a object"):
        anefx.compile(Small(), (), {"x": object()})


def test_wrong_example_shape_names_shapes_and_the_user_line():
    with pytest.raises(anefx.InvalidExampleError) as info:
        anefx.compile(Small(), (torch.randn(2, 3),))
    message = str(info.value)
    assert "Tensor(2, 3) float32" in message
    assert "mat1 and mat2 shapes cannot be multiplied" in message
    assert "test_capture.py" in message and "`return self.proj(x)`" in message
    assert "Pass example inputs with the shapes and dtypes the model expects" in message


class Branchy(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_data_dependent_control_flow_is_explained():
    with pytest.raises(anefx.CaptureError) as info:
        anefx.compile(Branchy(), (torch.randn(2, 3),))
    message = str(info.value)
    assert message.startswith("torch.export could not capture the model: Could not guard on data-dependent")
    assert "`if x.sum() > 0:`" in message and "test_capture.py" in message
    assert "torch.where" in message


class ReturnsObject(torch.nn.Module):
    def forward(self, x):
        return x * 2, {"shape": object()}


def test_non_tensor_output_is_explained():
    with pytest.raises(anefx.CaptureError, match=r"output\[1\]\['shape'\] is a object, not a tensor"):
        anefx.compile(ReturnsObject(), (torch.randn(2, 3),))


class Nested(torch.nn.Module):
    def forward(self, x, mask=None):
        return {"scores": x * 2, "extra": (x + 1, {"deep": x - mask})}


def test_nested_outputs_are_flat_and_named():
    x, mask = torch.randn(2, 3), torch.randn(2, 3)
    cap = capture(Nested(), (x,), {"mask": mask})
    assert cap.output_names == ["scores", "extra_0", "extra_1_deep"]
    assert cap.input_names == ["x", "mask"]
    c = anefx.compile(Nested(), (x,), {"mask": mask})
    assert [o.name for o in c.mlmodel.get_spec().description.output] == c.output_names
    assert [i.name for i in c.mlmodel.get_spec().description.input] == ["x", "mask"]
    assert_outputs_close(c.rewritten.module()(x, mask=mask), Nested()(x, mask=mask))


class Pair(torch.nn.Module):
    def forward(self, x):
        return x + 1, x * 3


def test_tuple_outputs_and_a_bare_tensor_example():
    c = anefx.compile(Pair(), torch.randn(4, 5))
    assert c.output_names == ["output_0", "output_1"]
    assert c.input_names == ["x"]


def test_constant_keywords_are_baked_in_not_inputs():
    class Flagged(torch.nn.Module):
        def forward(self, x, double=False):
            return x * 2 if double else x

    x = torch.randn(3)
    c = anefx.compile(Flagged(), (x,), {"double": True})
    assert c.input_names == ["x"]
    torch.testing.assert_close(c.rewritten.module()(x), x * 2)


def test_the_user_model_is_left_untouched():
    model = Small().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    anefx.compile(model, (torch.randn(2, 8),))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.proj.forward) is type(torch.nn.Linear(1, 1).forward)
