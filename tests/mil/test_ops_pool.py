"""Pooling kernels: torch modules converted by coremltools, and MIL-only modes against reference values.

The reference values of `same`, `same_lower` and l2_pool are those of coremltools' own op tests
(`mil/ops/tests/iOS14/test_pool.py`), which are checked against CoreML on device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb

from anefx.mil import MilRuntimeError
from anefx.mil.ops_pool import pool_axes
from tests.mil.programs import rand
from tests.mil.torch_programs import Branches, assert_close_to_torch, assert_psnr, run_module

POOLS_2D = {  # label: torch call; (9, 10) input: odd and even sizes, ceil overhang on both
    "max k3 s2 p1": lambda x: F.max_pool2d(x, 3, 2, 1),
    "max k3 s2 p1 ceil": lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
    "max k2 s2 ceil": lambda x: F.max_pool2d(x, 2, 2, ceil_mode=True),
    "max k(3,2) s(1,2) p(1,0)": lambda x: F.max_pool2d(x, (3, 2), (1, 2), (1, 0)),
    "avg k3 s2 p1 count_include_pad": lambda x: F.avg_pool2d(x, 3, 2, 1),
    "avg k3 s2 p1 exclude pad": lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
    "avg k3 s2 p1 ceil count_include_pad": lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True),
    "avg k3 s2 p1 ceil exclude pad": lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
    "avg k2 s2 ceil": lambda x: F.avg_pool2d(x, 2, 2, ceil_mode=True),
    "avg k(2,3) s(2,1) p(1,1)": lambda x: F.avg_pool2d(x, (2, 3), (2, 1), (1, 1)),
    "adaptive avg (3, 5)": lambda x: F.adaptive_avg_pool2d(x, (3, 5)),
    "adaptive max (3, 5)": lambda x: F.adaptive_max_pool2d(x, (3, 5)),
}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_pool2d_against_torch(tmp_path, precision):
    x = torch.randn(2, 3, 9, 10, generator=torch.Generator().manual_seed(0)) * 3
    actual, expected = run_module(Branches(POOLS_2D.values()), x, tmp_path / "p.mlpackage", "avg_pool", precision)
    if precision == "fp32":
        assert_close_to_torch(actual, expected, list(POOLS_2D))
    else:
        assert_psnr(actual, expected, list(POOLS_2D), floor_db=60)


def test_pool1d_and_pool3d_against_torch(tmp_path):
    calls = {
        "max1d k3 s2 p1 ceil": lambda x: F.max_pool1d(x.flatten(2), 3, 2, 1, ceil_mode=True),
        "avg1d k3 s2 p1 exclude pad": lambda x: F.avg_pool1d(x.flatten(2), 3, 2, 1, count_include_pad=False),
        "max3d k2 s2": lambda x: F.max_pool3d(x.unsqueeze(1), 2, 2),
        "avg3d k3 s2 p1": lambda x: F.avg_pool3d(x.unsqueeze(1), 3, 2, 1),
        "max3d k2 s2 ceil": lambda x: F.max_pool3d(x.unsqueeze(1), 2, 2, ceil_mode=True),
    }
    x = torch.randn(2, 5, 7, 6, generator=torch.Generator().manual_seed(1))
    actual, expected = run_module(Branches(calls.values()), x, tmp_path / "p.mlpackage", "max_pool")
    assert_close_to_torch(actual, expected, list(calls))


def test_same_padding_matches_coremltools_reference(run_mil):
    x = np.arange(1, 8, dtype=np.float32).reshape(1, 1, 7)
    pool = {"kernel_sizes": [3], "strides": [3], "pad_type": "same"}
    outs = run_mil(lambda x: [mb.avg_pool(x=x, exclude_padding_from_average=True, **pool), mb.max_pool(x=x, **pool),
                              mb.l2_pool(x=x, **pool)], "l2_pool", x=x)
    expected = {"avg_pool": [1.5, 4.0, 6.5],  # excluding padding: the edge windows average 2 cells
                "max_pool": [2.0, 5.0, 7.0], "l2_pool": [2.236068, 7.071068, 9.219544]}
    for (op, values), out in zip(expected.items(), outs.values(), strict=True):
        np.testing.assert_allclose(out.reshape(-1), values, rtol=1e-6, err_msg=op)


def test_same_lower_padding_matches_coremltools_reference(run_mil):
    """The odd padding cell goes before (and counts in the average), for 1, 2 and 3 spatial dims."""
    shapes = {"x1": (1, 1, 2), "x2": (1, 1, 2, 2), "x3": (1, 1, 2, 2, 2)}
    inputs = {name: np.arange(1, np.prod(shape) + 1, dtype=np.float32).reshape(shape)
              for name, shape in shapes.items()}

    def pools(x1, x2, x3):
        line, square, cube = ({"kernel_sizes": [2] * n, "pad_type": "same_lower"} for n in (1, 2, 3))
        return [mb.avg_pool(x=x1, **line), mb.avg_pool(x=x2, **square), mb.avg_pool(x=x3, **cube),
                mb.max_pool(x=x2, **square), mb.l2_pool(x=x2, **square)]

    outs = run_mil(pools, "l2_pool", **inputs)
    expected = [[0.5, 1.5], [0.25, 0.75, 1, 2.5], [0.125, 0.375, 0.5, 1.25, 0.75, 1.75, 2, 4.5], [1, 2, 3, 4],
                [1, 2.236068, 3.162278, 5.477226]]
    for out, values in zip(outs.values(), expected, strict=True):
        np.testing.assert_allclose(out.reshape(-1), values, rtol=1e-6)


@pytest.mark.parametrize("pad_type", ["same", "same_lower"])
def test_same_padding_against_torch_with_explicit_pads(run_mil, pad_type):
    """9 rows, k=4, s=2: 3 padding rows; same puts 1 before and 2 after, same_lower 2 before and 1 after."""
    x = rand(1, 2, 9, 8)
    out = run_mil(lambda x: mb.max_pool(x=x, kernel_sizes=[4, 3], strides=[2, 2], pad_type=pad_type), "max_pool", x=x)
    rows = (1, 2) if pad_type == "same" else (2, 1)
    padded = F.pad(torch.from_numpy(x), (0, 1, *rows) if pad_type == "same" else (1, 0, *rows), value=-np.inf)
    np.testing.assert_array_equal(out, F.max_pool2d(padded, (4, 3), 2).numpy())


def test_ceil_mode_output_size_follows_mil():
    """MIL drops a last window that would start in the right padding (only when there is padding)."""
    (axis,) = pool_axes((5,), [2], [2], "custom", [1, 1], ceil_mode=True)
    assert (axis.out, axis.overhang) == (3, 0)  # ceil((5 + 2 - 2) / 2) + 1 = 4, minus the one in the padding
    (axis,) = pool_axes((5,), [2], [2], "valid", None, ceil_mode=True)
    assert (axis.out, axis.overhang) == (3, 1)  # the last window covers the last cell and one past it


def test_window_outside_the_input_is_an_error(run_mil):
    """kernel 1, stride 2, ceil_mode: MIL's size rule keeps a window that starts past the input."""
    x = rand(1, 1, 4, 4)
    with pytest.raises(MilRuntimeError, match="covers no input cell.*ceil_mode=False"):
        run_mil(lambda x: mb.max_pool(x=x, kernel_sizes=[1, 1], strides=[2, 2], pad_type="valid", ceil_mode=True),
                "max_pool", x=x)


def test_local_response_norm_matches_coremltools_reference(run_mil):
    """A rank-3 input normalises over axis -3 (of size 1 here): each element by its own square."""
    x = np.array([[[1.0, -7.0], [5.0, -6.0], [-3.0, -5.0]]], dtype=np.float32)
    out = run_mil(lambda x: mb.local_response_norm(x=x, size=2), "local_response_norm", x=x)
    expected = [[[0.99996257, -6.98716545], [4.99531746, -5.99191284], [-2.99898791, -4.99531746]]]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_local_response_norm_against_torch(run_mil):
    x = rand(2, 6, 3, 4, low=-3, high=3)
    sizes = [2, 3, 5]
    params = {"alpha": np.float32(0.1), "beta": np.float32(0.75), "k": np.float32(2.0)}
    outs = run_mil(lambda x: [mb.local_response_norm(x=x, size=size, **params) for size in sizes],
                   "local_response_norm", x=x)
    for size, out in zip(sizes, outs.values(), strict=True):
        expected = torch.nn.LocalResponseNorm(size, alpha=0.1, beta=0.75, k=2.0)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6, err_msg=f"size {size}")
