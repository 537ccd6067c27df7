"""Resampling kernels: F.interpolate converted by coremltools, and MIL's sampling modes against reference values.

Reference values come from coremltools' op tests (`mil/ops/tests/iOS14|iOS16/test_image_resizing.py`, checked
against CoreML on device) and the grids printed in the MIL op reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb

from anefx.mil import MilRuntimeError
from anefx.mil.ops_resample import sample_points
from tests.mil.programs import rand
from tests.mil.torch_programs import Branches, assert_close_to_torch, assert_psnr, run_module

INTERPOLATIONS = {  # (6, 7) input
    "nearest x2": lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
    "nearest x(2, 3)": lambda x: F.interpolate(x, scale_factor=(2, 3), mode="nearest"),
    "nearest x1.5": lambda x: F.interpolate(x, scale_factor=1.5, mode="nearest"),
    "nearest to 13x17": lambda x: F.interpolate(x, size=(13, 17), mode="nearest"),
    "bilinear x2 align_corners": lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True),
    "bilinear x2": lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"),
    "bilinear to 13x17": lambda x: F.interpolate(x, size=(13, 17), mode="bilinear"),
    "bilinear to 13x17 align_corners": lambda x: F.interpolate(x, size=(13, 17), mode="bilinear", align_corners=True),
    "bilinear down to 4x3": lambda x: F.interpolate(x, size=(4, 3), mode="bilinear"),
    "linear 1d x3": lambda x: F.interpolate(x.flatten(2), scale_factor=3, mode="linear"),
    "nearest 1d x2": lambda x: F.interpolate(x.flatten(2), scale_factor=2, mode="nearest"),
}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_interpolate_against_torch(tmp_path, precision):
    x = torch.randn(1, 4, 6, 7, generator=torch.Generator().manual_seed(0))
    module = Branches(INTERPOLATIONS.values())
    actual, expected = run_module(module, x, tmp_path / "r.mlpackage", "upsample_bilinear", precision)
    if precision == "fp32":
        assert_close_to_torch(actual, expected, list(INTERPOLATIONS))
    else:
        assert_psnr(actual, expected, list(INTERPOLATIONS), floor_db=60)


@pytest.mark.parametrize(("mode", "m", "points"), [  # the MIL reference's grids for an input of 2
    ("UNALIGN_CORNERS", 5, [0, 0.1, 0.5, 0.9, 1]),
    ("STRICT_ALIGN_CORNERS", 5, [0, 0.25, 0.5, 0.75, 1]),
    ("DEFAULT", 5, [0, 0.4, 0.8, 1, 1]),
    ("OFFSET_CORNERS", 5, [0.1, 0.3, 0.5, 0.7, 0.9]),
    ("UNALIGN_CORNERS", 6, [0, 0, 1 / 3, 2 / 3, 1, 1]),
    ("ALIGN_CORNERS", 6, [0, 0.2, 0.4, 0.6, 0.8, 1]),
    ("DEFAULT", 6, [0, 1 / 3, 2 / 3, 1, 1, 1]),
    ("OFFSET_CORNERS", 6, [1 / 12, 0.25, 5 / 12, 7 / 12, 0.75, 11 / 12]),
    ("ALIGN_CORNERS", 1, [0.5]),
    ("STRICT_ALIGN_CORNERS", 1, [0]),
])
def test_sampling_grids_of_the_mil_reference(mode, m, points):
    np.testing.assert_allclose(sample_points(2, m, mode), points, atol=1e-12)


def test_resize_bilinear_modes_match_coremltools_reference(run_mil):
    x = np.array([0, 1], dtype=np.float32).reshape(1, 1, 2)
    modes = {"STRICT_ALIGN_CORNERS": [0, 0.25, 0.5, 0.75, 1], "DEFAULT": [0, 0.4, 0.8, 1, 1],
             "OFFSET_CORNERS": [0.1, 0.3, 0.5, 0.7, 0.9]}
    outs = run_mil(lambda x: [mb.resize_bilinear(x=x, target_size_height=1, target_size_width=5, sampling_mode=m)
                              for m in modes], "resize_bilinear", x=x)
    for out, expected in zip(outs.values(), modes.values(), strict=True):
        np.testing.assert_allclose(out.reshape(-1), expected, rtol=1e-6)


UPSAMPLE_ROWS = {  # (align_corners, half_pixel_centers): one output row for input row [1, 2], width x3
    (True, False): [1.0, 1.2, 1.4, 1.6, 1.8, 2.0],
    (False, True): [1.0, 1.0, 4 / 3, 5 / 3, 2.0, 2.0],
    (False, None): [1.0, 1.0, 4 / 3, 5 / 3, 2.0, 2.0],  # half_pixel_centers defaults to not align_corners
    (False, False): [1.0, 4 / 3, 5 / 3, 2.0, 2.0, 2.0],
}


def test_upsample_bilinear_ios16_matches_coremltools_reference(run_mil):
    x = np.array([1, 2], dtype=np.float32).reshape(1, 1, 1, 2)
    outs = run_mil(lambda x: [mb.upsample_bilinear(x=x, scale_factor_height=2, scale_factor_width=3, align_corners=a,
                                                   half_pixel_centers=h) for a, h in UPSAMPLE_ROWS],
                   "upsample_bilinear", x=x)
    for (flags, row), out in zip(UPSAMPLE_ROWS.items(), outs.values(), strict=True):
        np.testing.assert_allclose(out, np.array([row, row], np.float32).reshape(1, 1, 2, 6), rtol=1e-6,
                                   err_msg=f"align_corners, half_pixel_centers = {flags}")


def test_upsample_bilinear_with_both_alignments_is_an_error(run_mil):
    x = rand(1, 1, 2, 2)
    with pytest.raises(MilRuntimeError, match="set at most one"):
        run_mil(lambda x: mb.upsample_bilinear(x=x, scale_factor_height=2, scale_factor_width=2, align_corners=True,
                                               half_pixel_centers=True), "upsample_bilinear", x=x)


def test_nearest_neighbor_ops_match_coremltools_reference(run_mil):
    x = np.array([0.37, 6.17], dtype=np.float32).reshape(1, 1, 2, 1)
    out = run_mil(lambda x: mb.resize_nearest_neighbor(x=x, target_size_height=2, target_size_width=3),
                  "resize_nearest_neighbor", x=x)
    np.testing.assert_array_equal(out, np.array([0.37] * 3 + [6.17] * 3, np.float32).reshape(1, 1, 2, 3))
    x = np.array([1.5, 2.5, 3.5], dtype=np.float32).reshape(1, 1, 1, 3)
    out = run_mil(lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=1, scale_factor_width=2),
                  "upsample_nearest_neighbor", x=x)
    np.testing.assert_array_equal(out.reshape(-1), [1.5, 1.5, 2.5, 2.5, 3.5, 3.5])


def test_ios17_resize_linear_and_nearest(run_mil):
    x = rand(2, 3, 4, 5)
    outs = run_mil(lambda x: [
        mb.resize(x=x, shape=np.array([7, 0], np.int32), resized_dims=np.uint32(2), sampling_mode="UNALIGN_CORNERS"),
        mb.resize(x=x, shape=np.array([8, 10], np.int32), resized_dims=np.uint32(2),
                  interpolation_mode="NEAREST_NEIGHBOR"),
    ], "resize", x=x)
    linear, nearest = outs.values()
    expected = F.interpolate(torch.from_numpy(x), size=(7, 5), mode="bilinear").numpy()
    np.testing.assert_allclose(linear, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(nearest, x.repeat(2, axis=2).repeat(2, axis=3))


def test_crop_matches_coremltools_reference(run_mil):
    x = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)
    out = run_mil(lambda x: mb.crop(x=x, crop_height=[0, 1], crop_width=[1, 1]), "crop", x=x)
    np.testing.assert_array_equal(out.reshape(3, 2), [[2, 3], [6, 7], [10, 11]])


CROP_CASES = [  # roi (CORNERS_HEIGHT_FIRST), target size, normalized, expected (coremltools reference)
    ([1, 1, 2, 2], 2, False, [6, 7, 10, 11]),
    ([1, 1, 2, 2], 4, False, [6, 19 / 3, 20 / 3, 7, 22 / 3, 23 / 3, 8, 25 / 3, 26 / 3, 9, 28 / 3, 29 / 3, 10,
                              31 / 3, 32 / 3, 11]),
    ([1, 1, 2, 2], 1, False, [8.5]),
    ([0, 0, 1 / 3, 1 / 3], 2, True, [1, 2, 5, 6]),
    ([2, 2, 1, 1], 2, False, [11, 10, 7, 6]),
]


def test_crop_resize_ios15_matches_coremltools_reference(run_mil):
    x = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)

    def crops(x):
        return [mb.crop_resize(x=x, roi=np.array([0, *roi] if normalized else roi, np.float32).reshape(1, 1, -1, 1, 1),
                               target_height=size, target_width=size, normalized_coordinates=normalized,
                               sampling_mode="ALIGN_CORNERS") for roi, size, normalized, _ in CROP_CASES]

    outs = run_mil(crops, "crop_resize", opset="iOS15", x=x)
    for (roi, size, _, expected), out in zip(CROP_CASES, outs.values(), strict=True):
        assert out.shape == (1, 1, 1, size, size)
        np.testing.assert_allclose(out.reshape(-1), expected, rtol=1e-6, err_msg=f"roi {roi}")


def test_crop_resize_ios17_boxes_indices_and_pad_value(run_mil):
    x = np.stack([np.arange(1, 17, dtype=np.float32).reshape(1, 4, 4), np.zeros((1, 4, 4), np.float32)])
    boxes = np.array([[1.5, 1.5, 1, 1], [2, 2, 4, 4]], np.float32)  # centre/size, width first; the second runs off x
    out = run_mil(lambda x: mb.crop_resize(x=x, boxes=boxes, box_indices=np.array([0, 1], np.int32), target_height=2,
                                           target_width=2, box_coordinate_mode="CENTER_SIZE_WIDTH_FIRST",
                                           sampling_mode="ALIGN_CORNERS", pad_value=np.float32(-1)),
                  "crop_resize", opset="iOS17", x=x)
    np.testing.assert_allclose(out[0, 0], [[6, 7], [10, 11]])
    np.testing.assert_allclose(out[1, 0], [[0, -1], [-1, -1]])  # samples at 0 and 4: only (0, 0) is inside


def test_crop_resize_other_sampling_modes_are_refused(run_mil):
    x = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)
    with pytest.raises(MilRuntimeError, match="ALIGN_CORNERS and STRICT_ALIGN_CORNERS"):
        run_mil(lambda x: mb.crop_resize(x=x, boxes=np.array([[0, 0, 2, 2]], np.float32), target_height=2,
                                         target_width=2, sampling_mode="DEFAULT"), "crop_resize", opset="iOS17", x=x)
