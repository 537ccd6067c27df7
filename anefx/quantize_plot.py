"""A small PNG of the quantization ladder: package size (x, MiB) against fidelity (y, min PSNR in dB).

Drawn with numpy into an RGB raster and written as a PNG with zlib (no plotting library needed): axes with
tick values, one labelled point per rung, joined in ladder order. Text uses a built-in 3×5 pixel font.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

WIDTH, HEIGHT = 480, 320
LEFT, RIGHT, TOP, BOTTOM = 56, 24, 28, 44
SCALE = 2  # font pixels per glyph pixel
INK, AXIS, POINT = (40, 40, 40), (90, 90, 90), (31, 119, 180)

_GLYPHS = {  # 3×5, rows top to bottom
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    " ": "000000000000000", "f": "011010111010010", "p": "000111101111100", "i": "010000010010010",
    "n": "000110101101101", "t": "010111010010011", "l": "010010010010011", "u": "000101101101111",
    "M": "101111101101101", "B": "110101110101110", "P": "111101111100100", "S": "111100111001111",
    "N": "101111111111101", "R": "110101110101101", "d": "001001111101111", "x": "000101010101000",
    "(": "010100100100010", ")": "010001001001010", "m": "000111111101101", "e": "111101111100111",
}


def write_ladder_png(report: Any, path: Path) -> Path:
    """Plot `report.rows` (QuantizeReport) and write the PNG to `path` (its folder must exist)."""
    image = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    sizes = np.array([r.bytes / 2**20 for r in report.rows])
    fidelity = np.array([r.min_psnr_db for r in report.rows])
    fidelity = np.where(np.isfinite(fidelity), fidelity, 0.0)
    x_range = (0.0, float(sizes.max()) * 1.1 or 1.0)
    low, high = float(fidelity.min()), float(fidelity.max())
    y_range = (max(0.0, low - 0.15 * (high - low + 1)), high + 0.15 * (high - low + 1))
    _axes(image, x_range, y_range)
    points = [_to_pixel(s, f, x_range, y_range) for s, f in zip(sizes, fidelity, strict=True)]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        _line(image, x0, y0, x1, y1, POINT)
    for (x, y), row in zip(points, report.rows, strict=True):
        image[max(y - 3, 0):y + 4, max(x - 3, 0):x + 4] = POINT
        _text(image, row.mode, x + 6, y - 12)
    _text(image, "MiB", WIDTH - RIGHT - 18, HEIGHT - 14)
    _text(image, "PSNR dB (min)", 6, 6)
    path.write_bytes(png_bytes(image))
    return path


def _to_pixel(x: float, y: float, x_range: tuple[float, float], y_range: tuple[float, float]) -> tuple[int, int]:
    px = LEFT + (x - x_range[0]) / (x_range[1] - x_range[0]) * (WIDTH - LEFT - RIGHT)
    py = HEIGHT - BOTTOM - (y - y_range[0]) / (y_range[1] - y_range[0]) * (HEIGHT - TOP - BOTTOM)
    return int(round(px)), int(round(py))


def _axes(image: np.ndarray, x_range: tuple[float, float], y_range: tuple[float, float]) -> None:
    image[HEIGHT - BOTTOM, LEFT:WIDTH - RIGHT] = AXIS
    image[TOP:HEIGHT - BOTTOM + 1, LEFT] = AXIS
    for value in np.linspace(*x_range, 5):
        x, _ = _to_pixel(value, y_range[0], x_range, y_range)
        image[HEIGHT - BOTTOM:HEIGHT - BOTTOM + 4, x] = AXIS
        _text(image, _tick(value), x - 8, HEIGHT - BOTTOM + 8)
    for value in np.linspace(*y_range, 5):
        _, y = _to_pixel(x_range[0], value, x_range, y_range)
        image[y, LEFT - 4:LEFT] = AXIS
        _text(image, _tick(value), 6, y - 5)


def _tick(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2f}" if abs(value) < 1 else f"{value:.1f}"


def _line(image: np.ndarray, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    xs = np.round(np.linspace(x0, x1, steps + 1)).astype(int)
    ys = np.round(np.linspace(y0, y1, steps + 1)).astype(int)
    inside = (xs >= 0) & (xs < WIDTH) & (ys >= 0) & (ys < HEIGHT)
    image[ys[inside], xs[inside]] = color


def _text(image: np.ndarray, text: str, x: int, y: int) -> None:
    for char in text:
        glyph = _GLYPHS.get(char, _GLYPHS[" "])
        for index, bit in enumerate(glyph):
            if bit == "1":
                top, left = y + (index // 3) * SCALE, x + (index % 3) * SCALE
                if 0 <= top and top + SCALE <= HEIGHT and 0 <= left and left + SCALE <= WIDTH:
                    image[top:top + SCALE, left:left + SCALE] = INK
        x += 4 * SCALE


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB uint8 image (H, W, 3) as PNG file bytes (8-bit truecolor, no filtering)."""
    height, width, _ = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
