"""GraphDiff: per-stage node changes grouped by module, the rich view, the HTML page in a browser."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from rich.console import Console

import anefx
from anefx import zoo
from anefx.diff import TOP_LEVEL, GraphDiff


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Tiny(nn.Module):
    """norm → two parallel projections (separate modules) → sum → out projection."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.left, self.right, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 8)

    def forward(self, x):
        h = self.norm(x)
        return self.out(torch.relu(self.left(h)) + self.right(h))


RULES = ["rmsnorm_to_layernorm", "linear_to_conv1x1"]  # the rules these tests read the diff of


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return anefx.compile(Tiny().eval(), (torch.randn(1, 16, 32),), rules=RULES)


@pytest.fixture(scope="module")
def llama():
    model, args, kwargs = zoo.build("llama")
    return anefx.compile(model, args, kwargs, rules=RULES)


def test_stages_follow_the_pipeline(tiny):
    d = tiny.diff()
    assert [s.stage for s in d.stages] == [p.name for p in tiny.passes]
    for stage, record in zip(d.stages, tiny.passes, strict=True):
        assert stage.op_delta == record.op_delta, stage.stage
        assert stage.status == record.status


def test_each_projection_is_its_own_region_in_its_module(tiny):
    stage = tiny.diff().stage("linear_to_conv1x1")
    assert sorted(stage.by_module()) == ["left", "out", "right"]
    for region in stage.regions:
        assert [n.op for n in region.removed] == ["linear"]
        assert "convolution" in [n.op for n in region.added]
        assert all(n.rule == "linear_to_conv1x1" for n in region.added)
        assert all(region.removed[0].name in n.origins for n in region.added if n.op == "convolution")
    rewired = {b.op for b, _ in stage.changed}
    assert rewired == {"relu", "add", "output"}  # consumers of the replaced linears, not removed


def test_norm_region_and_context(tiny):
    stage = tiny.diff().stage("rmsnorm_to_layernorm")
    (region,) = stage.regions
    assert region.module == "norm"
    assert {"pow", "mean", "rsqrt"} <= {n.op for n in region.removed}
    assert "layer_norm" in {n.op for n in region.added}
    assert region.before.status["x"] == "context"  # the input it reads is drawn, greyed
    assert all(region.before.status[n.name] == "removed" for n in region.removed)
    assert ("layer_norm", "(1, 16, 64) f32") in {(n.op, n.shape) for n in region.added}


def test_diff_of_any_two_programs(tiny):
    d = anefx.diff(tiny.exported, tiny.rewritten)
    (stage,) = d.stages
    assert stage.stage == "after"
    assert sum(n.op == "linear" for n in stage.removed) == 3
    assert anefx.diff(tiny.rewritten, tiny.rewritten).stages[0].empty
    with pytest.raises(anefx.OptionError, match="stages: after"):
        d.stage("nope")


def test_unchanged_stage_is_empty():
    model = nn.Sequential(nn.ReLU())
    c = anefx.compile(model, (torch.randn(2, 8),), rules=[])
    (legalize,) = c.diff().stages
    assert isinstance(c.diff(), GraphDiff) and not legalize.regions
    assert TOP_LEVEL == "(top level)"


def test_show_prints_stages_and_modules(tiny):
    console = Console(record=True, width=160)
    tiny.diff(title="tiny diff").show(console)
    text = console.export_text()
    for word in ("tiny diff", "legalize", "rmsnorm_to_layernorm", "linear_to_conv1x1", "left", "right",
                 "convolution"):
        assert word in text


def test_html_is_standalone(tiny, tmp_path):
    html = tiny.diff(title="tiny <diff>").to_html(tmp_path / "d.html").read_text()
    assert "<title>tiny &lt;diff&gt;</title>" in html
    for banned in ("<script", "<link", "src=", "@import", "https://"):
        assert banned not in html
    assert html.count("<svg") == 2 * sum(1 for s in tiny.diff().stages for _ in _groups(s))


def _groups(stage):
    from anefx.diff import group_regions

    for regions in stage.by_module().values():
        yield from group_regions(regions)


# --- in a real browser -----------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                    "(apt-get install chromium chromium-driver; .ci/run does)")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


@needs_chromium
def test_page_renders_in_chromium(llama, tmp_path):
    page = llama.diff(title="anefx graph diff — llama").to_html(tmp_path / "diff.html")
    png = tmp_path / "diff.png"
    shot = chromium(tmp_path, f"--screenshot={png}", "--window-size=1400,1000", page.as_uri())
    assert png.exists(), shot.stderr[-2000:]
    pixels = read_png(png)
    assert pixels.shape[:2] == (1000, 1400)
    assert pixels[..., :3].astype(float).var() > 100  # text, tables and boxes, not a blank page
    dom = chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    assert "<title>anefx graph diff — llama</title>" in dom
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.norm",
                   "model.layers.0.input_layernorm", "lm_head"):
        assert f"<code>{module}</code>" in dom
    assert dom.count("<svg") >= 20


def read_png(path: Path) -> np.ndarray:
    """8-bit non-interlaced PNG → (H, W, C) uint8 (no imaging library needed)."""
    data = path.read_bytes()
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data[pos + 8:pos + 8 + length])
        elif kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and interlace == 0, header
    ch = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, 1 + width * ch)
    out = np.zeros((height, width * ch), np.int32)
    prev = np.zeros(width * ch, np.int32)
    for y in range(height):
        out[y] = prev = _unfilter(raw[y, 0], raw[y, 1:].astype(np.int32), prev, ch)
    return out.reshape(height, width, ch).astype(np.uint8)


def _unfilter(kind: int, row: np.ndarray, prev: np.ndarray, ch: int) -> np.ndarray:
    if kind == 0:
        return row
    if kind == 1:
        return row.reshape(-1, ch).cumsum(axis=0).reshape(-1) % 256
    if kind == 2:
        return (row + prev) % 256
    cur = np.zeros_like(row)
    zero = np.zeros(ch, np.int32)
    for x in range(0, row.size, ch):
        left = cur[x - ch:x] if x else zero
        up = prev[x:x + ch]
        if kind == 3:
            cur[x:x + ch] = (row[x:x + ch] + (left + up) // 2) % 256
            continue
        corner = prev[x - ch:x] if x else zero
        p = left + up - corner
        pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
        pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, corner))
        cur[x:x + ch] = (row[x:x + ch] + pred) % 256
    return cur
