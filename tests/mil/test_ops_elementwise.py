"""Elementwise kernels against numpy/torch: binary ops, comparisons, logic, unary math, activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb

from tests.mil.programs import rand

BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide,
    "floor_div": np.floor_divide, "maximum": np.maximum, "minimum": np.minimum, "mod": np.mod,
}
COMPARE = {
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal,
}


@pytest.mark.parametrize("op", sorted(BINARY))
def test_binary_float_broadcasts(run_mil, op):
    x, y = rand(2, 3, 4), rand(3, 1, seed=1, low=0.5, high=2.0)  # y > 0: no division by zero
    out = run_mil(lambda x, y: getattr(mb, op)(x=x, y=y), op, x=x, y=y)
    np.testing.assert_allclose(out, BINARY[op](x, y), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "floor_div", "mod", "maximum"])
def test_binary_int32(run_mil, op):
    x = np.array([[-7, -3, 0, 5, 9]], np.int32)
    y = np.array([[2, 3, 4, -3, 4]], np.int32)
    out = run_mil(lambda x, y: getattr(mb, op)(x=x, y=y), op, x=x, y=y)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, BINARY[op](x, y))


def test_pow(run_mil):
    x, y = rand(3, 4, low=0.1, high=2.0), rand(3, 4, seed=1)
    np.testing.assert_allclose(run_mil(lambda x, y: mb.pow(x=x, y=y), "pow", x=x, y=y), x ** y, rtol=1e-5)


@pytest.mark.parametrize("op", sorted(COMPARE))
def test_comparisons(run_mil, op):
    x = np.array([[1, 2, 3, 4]], np.float32)
    y = np.array([[2, 2, 2, 2]], np.float32)
    out = run_mil(lambda x, y: getattr(mb, op)(x=x, y=y), op, x=x, y=y)
    np.testing.assert_array_equal(out.astype(bool), COMPARE[op](x, y))  # bool outputs leave as fp32


@pytest.mark.parametrize("op", ["logical_and", "logical_or", "logical_xor"])
def test_logical(run_mil, op):
    x = np.array([True, True, False, False])
    y = np.array([True, False, True, False])
    out = run_mil(lambda x, y: getattr(mb, op)(x=x, y=y), op, x=x, y=y)
    np.testing.assert_array_equal(out.astype(bool), getattr(np, op)(x, y))


def test_logical_not(run_mil):
    x = np.array([True, False])
    out = run_mil(lambda x: mb.logical_not(x=x), "logical_not", x=x)
    np.testing.assert_array_equal(out.astype(bool), [False, True])


UNARY = {
    "abs": np.abs, "exp": np.exp, "sin": np.sin, "cos": np.cos, "tanh": np.tanh, "sign": np.sign,
    "floor": np.floor, "ceil": np.ceil, "square": np.square, "relu": lambda x: np.maximum(x, 0),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "silu": lambda x: x / (1 + np.exp(-x)),
    "softplus": lambda x: np.log1p(np.exp(x)), "erf": lambda x: torch.erf(torch.from_numpy(x)).numpy(),
    "round": np.round, "identity": lambda x: x, "exp2": np.exp2, "atan": np.arctan,
}


@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary(run_mil, op):
    x = rand(2, 8)
    x[0, :3] = [0.5, 1.5, -2.5]  # round: halves go to even
    np.testing.assert_allclose(run_mil(lambda x: getattr(mb, op)(x=x), op, x=x), UNARY[op](x),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("op", "reference"), [
    ("sqrt", np.sqrt),
    ("rsqrt", lambda x: 1 / np.sqrt(x + 1e-3)),
    ("log", lambda x: np.log(x + 1e-3)),
    ("inverse", lambda x: 1 / (x + 1e-3)),
])
def test_unary_with_epsilon(run_mil, op, reference):
    x = rand(3, 5, low=0.1, high=3.0)
    kwargs = {} if op == "sqrt" else {"epsilon": np.float32(1e-3)}
    out = run_mil(lambda x: getattr(mb, op)(x=x, **kwargs), op, x=x)
    np.testing.assert_allclose(out, reference(x), rtol=1e-5)


def test_rsqrt_default_epsilon(run_mil):
    x = rand(4, low=0.5, high=2.0)
    np.testing.assert_allclose(run_mil(lambda x: mb.rsqrt(x=x), "rsqrt", x=x), 1 / np.sqrt(x + 1e-12),
                               rtol=1e-6)


def test_clip(run_mil):
    x = rand(3, 4)
    out = run_mil(lambda x: mb.clip(x=x, alpha=np.float32(-0.5), beta=np.float32(1.0)), "clip", x=x)
    np.testing.assert_array_equal(out, np.clip(x, -0.5, 1.0))


@pytest.mark.parametrize(("mode", "approximate"), [
    ("EXACT", "none"), ("TANH_APPROXIMATION", "tanh"), ("SIGMOID_APPROXIMATION", None),
])
def test_gelu_modes(run_mil, mode, approximate):
    x = rand(4, 16, low=-4, high=4)
    out = run_mil(lambda x: mb.gelu(x=x, mode=mode), "gelu", x=x)
    if approximate is None:
        expected = x / (1 + np.exp(-1.702 * x))
    else:
        expected = torch.nn.functional.gelu(torch.from_numpy(x), approximate=approximate).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("op", "kwargs", "reference"), [
    ("leaky_relu", {"alpha": np.float32(0.1)}, lambda x: np.where(x >= 0, x, 0.1 * x)),
    ("elu", {"alpha": np.float32(0.7)}, lambda x: np.where(x > 0, x, 0.7 * np.expm1(x))),
    ("softsign", {}, lambda x: x / (1 + np.abs(x))),
    ("relu6", {}, lambda x: np.clip(x, 0, 6)),
    ("scaled_tanh", {"alpha": np.float32(2.0), "beta": np.float32(0.5)}, lambda x: 2 * np.tanh(0.5 * x)),
    ("sigmoid_hard", {"alpha": np.float32(0.2), "beta": np.float32(0.5)},
     lambda x: np.clip(0.2 * x + 0.5, 0, 1)),
    ("clamped_relu", {"alpha": np.float32(0.1), "beta": np.float32(3.0)},
     lambda x: np.minimum(np.where(x >= 0, x, 0.1 * x), 3.0)),
    ("thresholded_relu", {"alpha": np.float32(1.0)}, lambda x: np.where(x >= 1.0, x, 0)),
    ("linear_activation", {"alpha": np.float32(2.0), "beta": np.float32(-1.0)}, lambda x: 2 * x - 1),
])
def test_activations(run_mil, op, kwargs, reference):
    x = rand(3, 8, low=-8, high=8)
    out = run_mil(lambda x: getattr(mb, op)(x=x, **kwargs), op, x=x)
    np.testing.assert_allclose(out, reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("dtype", "expected"), [
    ("int32", np.array([1, -1, 2, 0], np.int32)),
    ("bool", np.array([True, True, True, False])),
    ("fp16", np.array([1.5, -1.5, 2.25, 0.0], np.float32)),
])
def test_cast(run_mil, dtype, expected):
    x = np.array([1.5, -1.5, 2.25, 0.0], np.float32)
    out = run_mil(lambda x: mb.cast(x=x, dtype=dtype), "cast", x=x)
    np.testing.assert_array_equal(out.astype(expected.dtype), expected)


def test_select_broadcasts(run_mil):
    cond = np.array([[True], [False]])
    a, b = rand(2, 3), rand(1, 3, seed=1)
    out = run_mil(lambda cond, a, b: mb.select(cond=cond, a=a, b=b), "select", cond=cond, a=a, b=b)
    np.testing.assert_array_equal(out, np.where(cond, a, b))


def test_prelu_per_channel(run_mil):
    x, alpha = rand(2, 3, 4, 5), np.array([0.1, 0.5, 2.0], np.float32)
    out = run_mil(lambda x: mb.prelu(x=x, alpha=alpha), "prelu", x=x)
    np.testing.assert_allclose(out, np.where(x > 0, x, alpha.reshape(1, 3, 1, 1) * x), rtol=1e-6)
