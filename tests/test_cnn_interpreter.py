"""CNNs end to end off macOS: anefx.compile → the saved program run by the MIL interpreter → torch.

Four small CNNs (random weights, random batch-norm statistics): a ResNet-style classifier, a
MobileNet-style one (depthwise-separable convs, hardswish/ReLU6, squeeze-excitation), a UNet-ish net
(max pooling down, nearest and bilinear upsampling and a transposed conv up), and HF ResNet/ConvNeXt
models built from tiny configs. Every MIL op of their programs has an interpreter kernel; an fp32
program matches torch within 1e-4 relative and an fp16 one stays above 60 dB PSNR.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import anefx
from anefx.mil import SUPPORTED_OPS
from anefx.mlpackage import histogram


def _randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding them into convs is checked."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c_in, c_out, 3, stride), nn.ReLU(), conv_bn(c_out, c_out, 3))
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNetStyle(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.blocks = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, stride=2))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, reduced, 1), nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        scale = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(scale))))


class MobileNetStyle(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), nn.Hardswish())
        self.separable = nn.Sequential(conv_bn(16, 16, 3, groups=16), nn.ReLU6(), SqueezeExcite(16, 8),
                                       conv_bn(16, 24, 1))
        self.inverted = nn.Sequential(conv_bn(24, 48, 1), nn.Hardswish(), conv_bn(48, 48, 5, 2, groups=48),
                                      nn.Hardswish(), SqueezeExcite(48, 16), conv_bn(48, 24, 1))
        self.head = nn.Linear(24, classes)

    def forward(self, x):
        x = self.separable(self.stem(x))
        x = self.inverted(x) + nn.functional.avg_pool2d(x, 2)  # residual across the stride-2 block
        return self.head(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class UNetStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1, self.enc2 = conv_bn(3, 8, 3), conv_bn(8, 16, 3)
        self.mid = conv_bn(16, 16, 3)
        self.up_transposed = nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.dec2, self.dec1 = conv_bn(32, 8, 3), conv_bn(16, 8, 3)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = torch.relu(self.enc1(x))  # 32x32
        e2 = torch.relu(self.enc2(nn.functional.max_pool2d(e1, 2, 2)))  # 16x16
        m = torch.relu(self.mid(nn.functional.max_pool2d(e2, 2, 2)))  # 8x8
        up2 = nn.functional.interpolate(m, scale_factor=2, mode="nearest") + self.up_transposed(m)
        d2 = torch.relu(self.dec2(torch.cat([up2, e2], dim=1)))
        up1 = nn.functional.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False)
        d1 = torch.relu(self.dec1(torch.cat([up1, e1], dim=1)))
        return self.out(d1)


def _hf_resnet():
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    return _randomize_batch_norms(ResNetModel(config)), torch.randn(1, 3, 64, 64)


def _hf_convnext():
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    config = ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=32)
    return ConvNextModel(config).eval(), torch.randn(1, 3, 32, 32)


def _seeded(cls: type[nn.Module], *shape: int) -> Callable[[], tuple[nn.Module, torch.Tensor]]:
    def build():
        torch.manual_seed(0)
        return _randomize_batch_norms(cls()), torch.randn(*shape)

    return build


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "resnet_style": _seeded(ResNetStyle, 1, 3, 64, 64),
    "mobilenet_style": _seeded(MobileNetStyle, 1, 3, 32, 32),
    "unet_style": _seeded(UNetStyle, 1, 3, 32, 32),
    "hf_resnet": _hf_resnet,
    "hf_convnext": _hf_convnext,
}

EXPECTED_OPS = {  # ops each program must hold, so the test exercises what it claims
    "resnet_style": {"max_pool", "conv", "reduce_mean"},
    "mobilenet_style": {"sigmoid_hard", "avg_pool", "conv"},
    "unet_style": {"max_pool", "upsample_nearest_neighbor", "upsample_bilinear", "conv_transpose", "concat"},
    "hf_resnet": {"max_pool", "conv"},
    "hf_convnext": {"conv", "layer_norm", "gelu"},
}
DEFAULT_RUN = {("resnet_style", "fp32"), ("unet_style", "fp16")}  # the rest: -m slow
PSNR_BAR_DB = 60.0


def _cases():
    for name in MODELS:
        for precision in ("fp32", "fp16"):
            marks = () if (name, precision) in DEFAULT_RUN else (pytest.mark.slow,)
            yield pytest.param(name, precision, marks=marks, id=f"{name}-{precision}")


@pytest.mark.parametrize(("name", "precision"), _cases())
def test_cnn_runs_in_the_interpreter(tmp_path, name, precision):
    from torch.utils._pytree import tree_leaves

    from anefx.mil import compare

    model, x = MODELS[name]()
    with torch.no_grad():
        expected = [t for t in tree_leaves(model(x)) if isinstance(t, torch.Tensor)]
    c = anefx.compile(model, (x,), precision=precision)
    ops = histogram(c.save(tmp_path / f"{name}.mlpackage"))
    assert not set(ops) - set(SUPPORTED_OPS), f"no kernel for {set(ops) - set(SUPPORTED_OPS)}"
    assert EXPECTED_OPS[name] <= set(ops), f"{name} lowered to {dict(ops)}"
    called = [t for t in tree_leaves(c(x)) if isinstance(t, torch.Tensor)]
    verified = c.verify()
    reports = [*verified.values(), *(compare(a, e) for a, e in zip(called, expected, strict=True))]
    print(f"\n{name} {precision}: {', '.join(sorted(ops))}")
    print("\n".join(f"  {output}: {report}" for output, report in verified.items()))
    for report in reports:
        if precision == "fp32":
            assert report.max_rel <= 1e-4, report
        else:
            assert report.psnr_db >= PSNR_BAR_DB, report
