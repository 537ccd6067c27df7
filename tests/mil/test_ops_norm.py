"""layer_norm (any axes), instance/batch norm, softmax and reductions against numpy/torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb

from tests.mil.programs import rand


def _layer_norm(x, axes, gamma, beta, eps):
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    out = (x - mean) / np.sqrt(var + eps)
    out = out * gamma.reshape(shape) if gamma is not None else out
    return out + beta.reshape(shape) if beta is not None else out


@pytest.mark.parametrize(("axes", "affine"), [
    ([1], True),  # channels of (B, C, 1, S): the ANE layout
    ([-1], True),
    ([2, 3], True),
    ([1], False),
    ([-1], "gamma only"),
])
def test_layer_norm(run_mil, axes, affine):
    x = rand(2, 6, 1, 5) * 3 + 1
    norm_axes = tuple(sorted(a % 4 for a in axes))
    shape = tuple(x.shape[a] for a in norm_axes)
    gamma = rand(*shape, seed=1) if affine else None
    beta = rand(*shape, seed=2) if affine is True else None
    kwargs = {k: v for k, v in (("gamma", gamma), ("beta", beta)) if v is not None}
    out = run_mil(lambda x: mb.layer_norm(x=x, axes=axes, epsilon=np.float32(1e-5), **kwargs), "layer_norm",
                  x=x)
    np.testing.assert_allclose(out, _layer_norm(x, norm_axes, gamma, beta, 1e-5), rtol=1e-5, atol=1e-5)


def test_instance_norm(run_mil):
    x, gamma, beta = rand(2, 3, 4, 5), rand(3, seed=1), rand(3, seed=2)
    out = run_mil(lambda x: mb.instance_norm(x=x, gamma=gamma, beta=beta, epsilon=np.float32(1e-5)),
                  "instance_norm", x=x)
    expected = torch.nn.functional.instance_norm(torch.from_numpy(x), weight=torch.from_numpy(gamma),
                                                 bias=torch.from_numpy(beta), eps=1e-5)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_batch_norm(run_mil):
    x, mean, var = rand(2, 3, 4, 5), rand(3, seed=1), rand(3, seed=2, low=0.5, high=2)
    gamma, beta = rand(3, seed=3), rand(3, seed=4)
    out = run_mil(lambda x: mb.batch_norm(x=x, mean=mean, variance=var, gamma=gamma, beta=beta,
                                          epsilon=np.float32(1e-3)), "batch_norm", x=x)
    expected = torch.nn.functional.batch_norm(*(torch.from_numpy(a) for a in (x, mean, var, gamma, beta)),
                                              eps=1e-3)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_softmax_axis(run_mil, axis):
    x = rand(3, 4, 1, 5, low=-20, high=20)
    out = run_mil(lambda x: mb.softmax(x=x, axis=axis), "softmax", x=x)
    expected = torch.softmax(torch.from_numpy(x), dim=axis).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)


REDUCTIONS = {
    "reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
    "reduce_log_sum_exp": lambda x, axis, keepdims: np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims)),
}


@pytest.mark.parametrize("op", sorted(REDUCTIONS))
@pytest.mark.parametrize(("axes", "keep_dims"), [([1], True), ([-1, 0], False), (None, False)])
def test_reductions(run_mil, op, axes, keep_dims):
    x = rand(2, 3, 4, low=0.5, high=1.5)
    kwargs = {} if axes is None else {"axes": axes}
    out = run_mil(lambda x: getattr(mb, op)(x=x, keep_dims=keep_dims, **kwargs), op, x=x)
    axis = None if axes is None else tuple(a % 3 for a in axes)
    np.testing.assert_allclose(out, REDUCTIONS[op](x, axis=axis, keepdims=keep_dims), rtol=1e-5)


@pytest.mark.parametrize("op", ["reduce_argmax", "reduce_argmin"])
@pytest.mark.parametrize(("axis", "keep_dims"), [(1, False), (-1, True)])
def test_arg_reductions(run_mil, op, axis, keep_dims):
    x = rand(2, 5, 4)
    out = run_mil(lambda x: getattr(mb, op)(x=x, axis=axis, keep_dims=keep_dims), op, x=x)
    expected = (np.argmax if op == "reduce_argmax" else np.argmin)(x, axis=axis)
    np.testing.assert_array_equal(out, np.expand_dims(expected, axis) if keep_dims else expected)


def test_l2_norm(run_mil):
    x = rand(2, 3, 4, 5)
    out = run_mil(lambda x: mb.l2_norm(x=x, epsilon=np.float32(1e-6)), "l2_norm", x=x)
    flat = x.reshape(2, -1)
    expected = (flat / np.sqrt((flat ** 2).sum(axis=1, keepdims=True) + 1e-6)).reshape(x.shape)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
