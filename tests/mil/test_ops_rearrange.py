"""Channel/space/batch rearrangements and conv_transpose against torch and coremltools' reference values."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb

from tests.mil.programs import rand
from tests.mil.torch_programs import Branches, assert_close_to_torch, run_module


def test_pixel_shuffle_and_unshuffle_against_torch(tmp_path):
    calls = {"pixel_shuffle 3": lambda x: F.pixel_shuffle(x, 3), "pixel_unshuffle 2": lambda x: F.pixel_unshuffle(x, 2)}
    x = torch.randn(2, 18, 4, 6, generator=torch.Generator().manual_seed(0))
    actual, expected = run_module(Branches(calls.values()), x, tmp_path / "s.mlpackage", "pixel_shuffle")
    assert_close_to_torch(actual, expected, list(calls), rtol=0)


def _depth_to_space_reference(x: np.ndarray, f: int) -> np.ndarray:
    """TensorFlow's rule, one element at a time: channel (by·f + bx)·C + c moves to offset (by, bx)."""
    n, c_in, h, w = x.shape
    c = c_in // (f * f)
    out = np.zeros((n, c, h * f, w * f), x.dtype)
    for by in range(f):
        for bx in range(f):
            for ch in range(c):
                out[:, ch, by::f, bx::f] = x[:, (by * f + bx) * c + ch]
    return out


def test_depth_to_space_and_back(run_mil):
    x = rand(2, 12, 3, 4)
    outs = run_mil(lambda x: [mb.depth_to_space(x=x, block_size=2),
                              mb.space_to_depth(x=mb.depth_to_space(x=x, block_size=2), block_size=2)],
                   "space_to_depth", x=x)
    spread, back = outs.values()
    np.testing.assert_array_equal(spread, _depth_to_space_reference(x, 2))
    np.testing.assert_array_equal(back, x)


def test_depth_and_space_match_coremltools_reference(run_mil):
    x = np.array([9.0, 5.0, 1.0, 3.0], np.float32).reshape(1, 4, 1, 1)
    out = run_mil(lambda x: mb.depth_to_space(x=x, block_size=2), "depth_to_space", x=x)
    np.testing.assert_array_equal(out, [[[[9, 5], [1, 3]]]])
    x = np.array([[7.0, 9.0], [4.0, 6.0]], np.float32).reshape(1, 1, 2, 2)
    out = run_mil(lambda x: mb.space_to_depth(x=x, block_size=2), "space_to_depth", x=x)
    np.testing.assert_array_equal(out.reshape(-1), [7, 9, 4, 6])


def test_space_to_batch_and_back_match_coremltools_reference(run_mil):
    x = np.arange(1, 17, dtype=np.float32).reshape(2, 1, 2, 4)
    expected = np.array([[0, 1, 3], [0, 9, 11], [0, 2, 4], [0, 10, 12], [0, 5, 7], [0, 13, 15], [0, 6, 8],
                         [0, 14, 16]], np.float32).reshape(8, 1, 1, 3)
    outs = run_mil(lambda x: [mb.space_to_batch(x=x, block_shape=[2, 2], paddings=[[0, 0], [2, 0]]),
                              mb.batch_to_space(x=mb.space_to_batch(x=x, block_shape=[2, 2], paddings=[[0, 0], [2, 0]]),
                                                block_shape=[2, 2], crops=[[0, 0], [2, 0]])],
                   "batch_to_space", x=x)
    batched, back = outs.values()
    np.testing.assert_array_equal(batched, expected)
    np.testing.assert_array_equal(back, x)


def test_sliding_windows(run_mil):
    x = rand(3, 5, 7)
    cases = [(1, 2, 1), (-1, 3, 2), (0, 1, 2)]  # axis, size, stride
    outs = run_mil(lambda x: [mb.sliding_windows(x=x, axis=a, size=n, stride=s) for a, n, s in cases],
                   "sliding_windows", x=x)
    for (axis, size, stride), out in zip(cases, outs.values(), strict=True):
        a = axis % 3
        starts = range(0, x.shape[a] - size + 1, stride)
        expected = np.stack([np.take(x, range(s, s + size), axis=a) for s in starts], axis=a)
        np.testing.assert_array_equal(out, expected, err_msg=f"axis {axis}, size {size}, stride {stride}")


CONV_TRANSPOSES = {  # (label, module) on a (2, 4, 5, 6) input
    "k3 s2 p1 output_padding 1": torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
    "k4 s2 p1": torch.nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1),
    "k3 dilation 2 groups 2, no bias": torch.nn.ConvTranspose2d(4, 6, 3, dilation=2, groups=2, bias=False),
    "k(2,3) s(3,1) p(0,1)": torch.nn.ConvTranspose2d(4, 2, (2, 3), stride=(3, 1), padding=(0, 1)),
}


class ConvTransposes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(CONV_TRANSPOSES.values())
        self.one_d = torch.nn.ConvTranspose1d(4, 5, 3, stride=2)

    def forward(self, x):
        return (*(layer(x) for layer in self.layers), self.one_d(x.flatten(2)))


def test_conv_transpose_against_torch(tmp_path):
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    actual, expected = run_module(ConvTransposes(), x, tmp_path / "t.mlpackage", "conv_transpose")
    assert_close_to_torch(actual, expected, [*CONV_TRANSPOSES, "1d k3 s2"])


def test_conv_transpose_same_padding(run_mil):
    """`same` keeps n·stride cells, cropping the full output's extra (k - s) cells, the smaller half first;
    an output_shape keeps that many cells instead."""
    x, w = rand(1, 2, 4, 5), rand(2, 3, 4, 3, seed=1)
    same = {"weight": w, "strides": [2, 2], "pad_type": "same"}
    outs = run_mil(lambda x: [mb.conv_transpose(x=x, **same),
                              mb.conv_transpose(x=x, output_shape=[1, 3, 9, 10], **same)], "conv_transpose", x=x)
    full = F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), stride=2).numpy()  # (10, 11)
    for (rows, cols), out in zip([(8, 10), (9, 10)], outs.values(), strict=True):
        top, left = (full.shape[2] - rows) // 2, (full.shape[3] - cols) // 2
        np.testing.assert_allclose(out, full[:, :, top:top + rows, left:left + cols], rtol=1e-5, atol=1e-6)
