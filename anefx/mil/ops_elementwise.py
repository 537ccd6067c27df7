"""Elementwise kernels: binary arithmetic, comparisons, logic, unary math, activations, cast, select.

A fused activation (gelu, silu, softplus, ...) is computed in float32 and rounded once at its output.
"""

from __future__ import annotations

import numpy as np

from anefx.mil.registry import as_float, kernel

F32 = np.float32

_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide,
    "floor_div": np.floor_divide, "pow": np.power, "maximum": np.maximum, "minimum": np.minimum,
    "mod": np.mod, "equal": np.equal, "not_equal": np.not_equal, "less": np.less,
    "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}


def _binary(fn):
    return lambda ctx, x, y: fn(x, y)


for _name, _fn in _BINARY.items():
    kernel(_name)(_binary(_fn))


def _erf(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.special.erf(torch.from_numpy(np.ascontiguousarray(x, dtype=F32))).numpy()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return F32(0.5) * (np.tanh(F32(0.5) * x) + F32(1))  # overflow-free logistic


_UNARY = {
    "abs": np.abs, "exp": np.exp, "exp2": np.exp2, "sqrt": np.sqrt, "sin": np.sin, "cos": np.cos,
    "tan": np.tan, "tanh": np.tanh, "sinh": np.sinh, "cosh": np.cosh, "asin": np.arcsin,
    "acos": np.arccos, "atan": np.arctan, "atanh": np.arctanh, "sign": np.sign, "floor": np.floor,
    "ceil": np.ceil, "round": np.round, "square": np.square, "logical_not": np.logical_not,
    "erf": _erf, "relu": lambda x: np.maximum(x, np.zeros((), x.dtype)), "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x), "softsign": lambda x: x / (F32(1) + np.abs(x)),
    "relu6": lambda x: np.clip(x, F32(0), F32(6)), "identity": lambda x: x,
}


def _unary(fn):
    return lambda ctx, x: fn(x)


for _name, _fn in _UNARY.items():
    kernel(_name)(_unary(_fn))


@kernel("rsqrt")
def rsqrt(ctx, x, epsilon=1e-12):
    return F32(1) / np.sqrt(x + F32(as_float(epsilon)))


@kernel("inverse")
def inverse(ctx, x, epsilon=1e-4):
    return F32(1) / (x + F32(as_float(epsilon)))


@kernel("log")
def log(ctx, x, epsilon=1e-45):
    return np.log(x + F32(as_float(epsilon)))


@kernel("clip")
def clip(ctx, x, alpha, beta):
    return np.minimum(np.maximum(x, alpha), beta)


@kernel("threshold")
def threshold(ctx, x, alpha):
    return np.maximum(x, alpha)


@kernel("gelu")
def gelu(ctx, x, mode="EXACT"):
    if mode == "TANH_APPROXIMATION":
        inner = F32(np.sqrt(2 / np.pi)) * (x + F32(0.044715) * x ** 3)
        return F32(0.5) * x * (F32(1) + np.tanh(inner))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(F32(1.702) * x)
    return F32(0.5) * x * (F32(1) + _erf(x / F32(np.sqrt(2))))


@kernel("leaky_relu")
def leaky_relu(ctx, x, alpha=0.01):
    return np.where(x >= 0, x, F32(as_float(alpha)) * x)


@kernel("elu")
def elu(ctx, x, alpha=1.0):
    return np.where(x > 0, x, F32(as_float(alpha)) * np.expm1(np.minimum(x, F32(0))))


@kernel("softplus")
def softplus(ctx, x):
    return np.logaddexp(F32(0), x)


@kernel("softplus_parametric")
def softplus_parametric(ctx, x, alpha, beta):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return alpha.reshape(shape) * np.logaddexp(F32(0), beta.reshape(shape) * x)


@kernel("prelu")
def prelu(ctx, x, alpha):
    return np.where(x > 0, x, alpha.reshape((1, -1) + (1,) * (x.ndim - 2)) * x)


@kernel("clamped_relu")
def clamped_relu(ctx, x, alpha, beta):
    return np.minimum(np.where(x >= 0, x, F32(as_float(alpha)) * x), F32(as_float(beta)))


@kernel("thresholded_relu")
def thresholded_relu(ctx, x, alpha=1.0):
    return np.where(x >= F32(as_float(alpha)), x, F32(0))


@kernel("linear_activation")
def linear_activation(ctx, x, alpha, beta=0.0):
    return F32(as_float(alpha)) * x + F32(as_float(beta))


@kernel("scaled_tanh")
def scaled_tanh(ctx, x, alpha=1.0, beta=1.0):
    return F32(as_float(alpha)) * np.tanh(F32(as_float(beta)) * x)


@kernel("sigmoid_hard")
def sigmoid_hard(ctx, x, alpha=0.2, beta=0.5):
    return np.clip(F32(as_float(alpha)) * x + F32(as_float(beta)), F32(0), F32(1))


CAST_DTYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int8": np.int8,
               "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
               "int64": np.int64, "bool": np.bool_}


@kernel("cast")
def cast(ctx, x, dtype):
    if dtype not in CAST_DTYPES:
        raise ctx.error(f"unknown dtype {dtype!r}; MIL casts to {', '.join(CAST_DTYPES)}.")
    target = np.dtype(CAST_DTYPES[dtype])
    if target.kind == "f":
        return x.astype(F32)  # the interpreter rounds to the precision it emulates
    if target.kind in "iu" and x.dtype.kind == "f":
        x = np.trunc(x)
    return x.astype(target)


@kernel("select")
def select(ctx, cond, a, b):
    return np.where(cond, a, b)
