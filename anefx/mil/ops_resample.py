"""Resampling kernels: upsample/resize (nearest, bilinear), iOS17 resize, crop_resize, crop.

Bilinear sampling follows the grids of the MIL reference (coremltools `mil/ops/defs/iOS15..17/
image_resizing.py`), per axis for an input of size n and an output of size m, clamped to [0, n-1]:

- STRICT_ALIGN_CORNERS: i·(n-1)/(m-1) (upsample_bilinear with align_corners=True);
- ALIGN_CORNERS: the same, except (n-1)/2 when m == 1;
- DEFAULT: i·n/m (upsample_bilinear with align_corners=False, half_pixel_centers=False);
- UNALIGN_CORNERS: (i + 0.5)·n/m - 0.5, the half-pixel grid (upsample_bilinear's default when
  align_corners=False, PyTorch's align_corners=False);
- OFFSET_CORNERS: (i + 0.5)·max(1, n-1)/m.

Nearest-neighbour sampling reads input index floor(i·n/m), PyTorch's `nearest` for an output size; the
MIL reference does not state the rule for fractional scale factors (integer factors repeat each value).
Interpolation runs in float32 and the interpreter rounds the result once.
"""

from __future__ import annotations

import numpy as np

from anefx.mil.registry import as_float, as_int, as_ints, kernel

F32 = np.float32
SAMPLING_MODES = ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "DEFAULT", "UNALIGN_CORNERS", "OFFSET_CORNERS")


def sample_points(n: int, m: int, mode: str) -> np.ndarray:
    """Where each of `m` outputs samples an axis of `n` inputs, under a MIL sampling mode."""
    i = np.arange(m, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        points = i * ((n - 1) / (m - 1)) if m > 1 else np.full(m, (n - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0)
    elif mode == "DEFAULT":
        points = i * (n / m)
    elif mode == "UNALIGN_CORNERS":
        points = (i + 0.5) * (n / m) - 0.5
    elif mode == "OFFSET_CORNERS":
        points = (i + 0.5) * (max(1, n - 1) / m)
    else:
        raise ValueError(f"unknown sampling_mode {mode!r}; MIL knows {', '.join(SAMPLING_MODES)}")
    return np.clip(points, 0, n - 1)


def lerp_axis(x: np.ndarray, axis: int, points: np.ndarray) -> np.ndarray:
    """Linear interpolation of `x` along `axis` at fractional `points` (inside [0, size-1])."""
    size = x.shape[axis]
    low = np.clip(np.floor(points).astype(np.int64), 0, size - 1)
    high = np.minimum(low + 1, size - 1)
    shape = [1] * x.ndim
    shape[axis] = -1
    frac = (points - low).astype(F32).reshape(shape)
    return np.take(x, low, axis=axis) * (F32(1) - frac) + np.take(x, high, axis=axis) * frac


def nearest_axis(x: np.ndarray, axis: int, m: int) -> np.ndarray:
    n = x.shape[axis]
    return np.take(x, np.minimum(np.arange(m) * n // m, n - 1), axis=axis)


def _scaled_sizes(ctx, x: np.ndarray, scale_height, scale_width) -> tuple[int, int]:
    """The output's (height, width): as the program declares them, else floor(size · scale).

    The declared sizes come first: coremltools infers them from the fp32 scale, and the fp16 emulation
    would otherwise see the scale rounded to fp16 (floor(6 · 2.1667) = 13, but floor(6 · 2.166) = 12).
    """
    declared = ctx.op.outputs[0][1].shape if ctx.op.outputs and ctx.op.outputs[0][1] is not None else None
    if declared is not None and len(declared) == x.ndim and min(declared[-2:]) > 0:
        return declared[-2], declared[-1]
    return tuple(int(np.floor(np.asarray(scale).reshape(-1)[0] * n))
                 for n, scale in ((x.shape[-2], scale_height), (x.shape[-1], scale_width)))


@kernel("upsample_nearest_neighbor")
def upsample_nearest_neighbor(ctx, x, scale_factor_height=1, scale_factor_width=1):
    height, width = _scaled_sizes(ctx, x, scale_factor_height, scale_factor_width)
    return nearest_axis(nearest_axis(x, x.ndim - 2, height), x.ndim - 1, width)


@kernel("resize_nearest_neighbor")
def resize_nearest_neighbor(ctx, x, target_size_height, target_size_width):
    out = nearest_axis(x, x.ndim - 2, as_int(target_size_height))
    return nearest_axis(out, x.ndim - 1, as_int(target_size_width))


def _bilinear(x: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    out = lerp_axis(x, x.ndim - 2, sample_points(x.shape[-2], height, mode))
    return lerp_axis(out, x.ndim - 1, sample_points(x.shape[-1], width, mode))


@kernel("upsample_bilinear")
def upsample_bilinear(ctx, x, scale_factor_height=1, scale_factor_width=1, align_corners=True,
                      half_pixel_centers=None):
    align = bool(align_corners)
    half_pixel = (not align) if half_pixel_centers is None else bool(half_pixel_centers)
    if align and half_pixel:
        raise ctx.error("align_corners and half_pixel_centers are both true, which MIL does not define; "
                        "set at most one of them.")
    mode = "STRICT_ALIGN_CORNERS" if align else "UNALIGN_CORNERS" if half_pixel else "DEFAULT"
    return _bilinear(x, *_scaled_sizes(ctx, x, scale_factor_height, scale_factor_width), mode)


@kernel("resize_bilinear")
def resize_bilinear(ctx, x, target_size_height=1, target_size_width=1, sampling_mode="DEFAULT"):
    if sampling_mode not in SAMPLING_MODES:
        raise ctx.error(f"unknown sampling_mode {sampling_mode!r}; MIL knows {', '.join(SAMPLING_MODES)}.")
    return _bilinear(x, as_int(target_size_height), as_int(target_size_width), sampling_mode)


@kernel("resize")
def resize(ctx, x, shape, resized_dims, interpolation_mode="LINEAR", sampling_mode="DEFAULT"):
    """iOS17: the last `resized_dims` dims of x take the last entries of `shape` (0 keeps x's size)."""
    dims, targets = as_int(resized_dims), as_ints(shape)
    if interpolation_mode == "NEAREST_NEIGHBOR" and sampling_mode != "DEFAULT":
        raise ctx.error(f"nearest-neighbour resize with sampling_mode {sampling_mode!r} is not defined by the "
                        "MIL reference; the interpreter runs it only with sampling_mode DEFAULT.")
    if interpolation_mode not in ("LINEAR", "NEAREST_NEIGHBOR") or sampling_mode not in SAMPLING_MODES:
        raise ctx.error(f"unknown interpolation_mode {interpolation_mode!r} or sampling_mode {sampling_mode!r}.")
    out = x.astype(F32) if interpolation_mode == "LINEAR" else x
    for k in range(dims):
        axis, target = x.ndim - dims + k, targets[len(targets) - dims + k]
        target = target or x.shape[axis]
        if interpolation_mode == "LINEAR":
            out = lerp_axis(out, axis, sample_points(x.shape[axis], target, sampling_mode))
        else:
            out = nearest_axis(out, axis, target)
    return out


@kernel("crop")
def crop(ctx, x, crop_height, crop_width):
    (top, bottom), (left, right) = as_ints(crop_height), as_ints(crop_width)
    return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]


_BOX_MODES = ("CORNERS_HEIGHT_FIRST", "CORNERS_WIDTH_FIRST", "CENTER_SIZE_HEIGHT_FIRST", "CENTER_SIZE_WIDTH_FIRST")


def box_corners(boxes: np.ndarray, mode: str) -> np.ndarray:
    """(N, 4) boxes in a MIL box_coordinate_mode as (N, 4) [h_start, w_start, h_end, w_end]."""
    b = boxes.astype(np.float64)
    if mode.endswith("WIDTH_FIRST"):
        b = b[:, [1, 0, 3, 2]]
    if mode.startswith("CENTER_SIZE"):
        centre, size = b[:, :2], b[:, 2:]
        b = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    return b


def _box_points(start: float, end: float, m: int, mode: str) -> np.ndarray:
    if m == 1:
        return np.array([(start + end) / 2 if mode == "ALIGN_CORNERS" else start])
    return start + np.arange(m) * ((end - start) / (m - 1))


def _crop_one(image: np.ndarray, corners: np.ndarray, height: int, width: int, mode: str, pad_value: float):
    """One (C, height, width) crop of a (C, H, W) image; samples outside the image read pad_value."""
    rows = _box_points(corners[0], corners[2], height, mode)
    cols = _box_points(corners[1], corners[3], width, mode)
    out = lerp_axis(lerp_axis(image, 1, np.clip(rows, 0, image.shape[1] - 1)), 2,
                    np.clip(cols, 0, image.shape[2] - 1))
    outside = (rows < 0) | (rows > image.shape[1] - 1)
    outside = outside[:, None] | ((cols < 0) | (cols > image.shape[2] - 1))[None, :]
    return np.where(outside[None], F32(pad_value), out)


@kernel("crop_resize")
def crop_resize(ctx, x, roi=None, boxes=None, box_indices=None, target_height=1, target_width=1,
                normalized_coordinates=False, spatial_scale=1.0, box_coordinate_mode="CORNERS_HEIGHT_FIRST",
                sampling_mode="DEFAULT", pad_value=0.0):
    """Bilinear crops of boxes: iOS15/16 take `roi` (N, 1, 4 or 5, 1, 1), iOS17 `boxes` (N, 4) + `box_indices`."""
    if sampling_mode not in ("ALIGN_CORNERS", "STRICT_ALIGN_CORNERS"):
        raise ctx.error(f"sampling_mode {sampling_mode!r} is not run by the interpreter: the MIL reference defines "
                        "how a box is sampled only for ALIGN_CORNERS and STRICT_ALIGN_CORNERS. Convert with one "
                        "of those (TensorFlow's crop_and_resize is ALIGN_CORNERS).")
    if box_coordinate_mode not in _BOX_MODES:
        raise ctx.error(f"unknown box_coordinate_mode {box_coordinate_mode!r}; MIL knows {', '.join(_BOX_MODES)}.")
    if roi is not None:
        flat = roi.reshape(roi.shape[0], -1)
        indices = flat[:, 0].astype(np.int64) if flat.shape[1] == 5 else None
        boxes = flat[:, -4:]
    else:
        indices = np.arange(len(boxes)) if box_indices is None else np.asarray(box_indices, np.int64)
    corners = box_corners(boxes, box_coordinate_mode) * as_float(spatial_scale)
    if bool(normalized_coordinates):
        corners = corners * np.array([x.shape[2] - 1, x.shape[3] - 1] * 2)
    if indices is not None and ((indices < 0) | (indices >= x.shape[0])).any():
        raise ctx.error(f"box index out of range for a batch of {x.shape[0]}; make the box indices valid.")
    size = (as_int(target_height), as_int(target_width), sampling_mode, as_float(pad_value))
    if indices is None:  # iOS15/16 four-value roi: every box on every image -> (N, B, C, h, w)
        return np.stack([np.stack([_crop_one(image, c, *size) for image in x]) for c in corners])
    crops = np.stack([_crop_one(x[i], c, *size) for i, c in zip(indices, corners, strict=True)])
    return crops[:, None] if roi is not None else crops
