"""fft_to_dft and unfold_to_conv: spectrograms framed with unfold + torch.fft become convolutions and DFT
projections; no unfold, FFT or complex tensor is left, and the result is torch's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import anefx
from anefx.package_report import ANE_UNSUPPORTED, package_report
from rewrites.fft_to_dft import RULE as FFT_RULE
from rewrites.unfold_to_conv import RULE as UNFOLD_RULE
from tests.helpers import ops, rewrite

N_FFT, HOP, N_MELS, WIDTH = 64, 16, 16, 32


class Unfold(torch.nn.Module):
    def __init__(self, dim, size, step):
        super().__init__()
        self.dim, self.size, self.step = dim, size, step

    def forward(self, x):
        return x.unfold(self.dim, self.size, self.step) * 2


def _no_complex(ep) -> bool:
    return not any(isinstance(v := n.meta.get("val"), torch.Tensor) and v.is_complex() for n in ep.graph.nodes)


@settings(max_examples=4, deadline=None)
@given(shape=st.sampled_from([(50,), (2, 37), (1, 3, 29), (2, 21, 3)]), dim=st.integers(0, 2),
       size=st.integers(1, 9), step=st.integers(1, 9))
def test_property_unfold_becomes_an_identity_convolution(shape, dim, size, step):
    dim = dim % len(shape)
    size = min(size, shape[dim])
    x = torch.randn(*shape)
    model = Unfold(dim - len(shape), size, step).eval()  # a negative dim, as in x.unfold(-1, ...)
    _, after, records = rewrite(model, (x,), [UNFOLD_RULE])
    assert records[-1].status == "applied" and records[-1].matches == 1
    assert ops(after)["unfold"] == 0
    assert ops(after)["convolution"] == (0 if step == size else 1)  # frames that do not overlap: a reshape
    y = after.module()(x)
    assert y.shape == model(x).shape
    torch.testing.assert_close(y, model(x), rtol=0, atol=1e-6)  # each frame sample is one input × 1


class Spectrum(torch.nn.Module):
    def __init__(self, fft, n, norm, reader, dim=-1, frame=None):
        super().__init__()
        self.fft, self.n, self.norm, self.reader, self.dim, self.frame = fft, n, norm, reader, dim, frame

    def forward(self, x):
        frames = x.unfold(-1, *self.frame) if self.frame else x
        s = self.fft(frames, n=self.n, dim=self.dim, norm=self.norm)
        match self.reader:
            case "abs":
                return s.abs() + 1
            case "power":
                return s.abs() ** 2
            case "view_as_real":
                return torch.view_as_real(s) * 2
            case "real_imag":
                return s.real - 2 * s.imag
            case "angle":
                return s.angle()


@settings(max_examples=6, deadline=None)
@given(fft=st.sampled_from([torch.fft.rfft, torch.fft.fft]), length=st.integers(2, 40),
       n=st.sampled_from([None, 7, 16, 33]), norm=st.sampled_from([None, "backward", "ortho", "forward"]),
       reader=st.sampled_from(["abs", "power", "view_as_real", "real_imag", "angle"]),
       layout=st.sampled_from(["last", "middle", "framed"]), step=st.integers(1, 6))
def test_property_fft_becomes_dft_projections(fft, length, n, norm, reader, layout, step):
    x = {"last": torch.randn(2, 3, length), "middle": torch.randn(2, length, 3), "framed": torch.randn(2, 50)}[layout]
    frame = (length, step) if layout == "framed" else None
    model = Spectrum(fft, n, norm, reader, dim=1 if layout == "middle" else -1, frame=frame).eval()
    _, after, records = rewrite(model, (x,), [FFT_RULE])
    assert records[-1].status == "applied" and records[-1].matches == 1, records[-1]
    assert ops(after)["fft_rfft"] + ops(after)["fft_fft"] == 0 and _no_complex(after)
    if layout == "framed":  # unfold + DFT: one strided convolution per part on the signal, no unfold left
        assert ops(after)["convolution"] == 2 and ops(after)["unfold"] == 0 and ops(after)["linear"] == 0
    else:
        assert ops(after)["linear"] == 2
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-4, atol=1e-4)


class Windowed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT))

    def forward(self, frames):
        return torch.view_as_real(torch.fft.rfft(frames * self.window, norm="ortho"))


def test_a_constant_window_is_folded_into_the_dft_weights():
    x = torch.randn(1, 9, N_FFT)
    model = Windowed().eval()
    before, after, records = rewrite(model, (x,), [FFT_RULE])
    assert ops(before)["mul"] == 1 and ops(after)["mul"] == 0  # no window multiply left
    assert ops(after)["linear"] == 2 and ops(after)["stack"] == 1
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_angle_of_a_negative_real_bin_is_pi_in_the_lowered_program():
    # coremltools lowers atan2(0, x < 0) to 0; torch.angle gives π there (the DC bin of a negative-mean signal)
    x = torch.tensor([[-1.0, -2.0, 0.5, -3.0, -0.25, -1.5, 1.0, -2.5]])
    model = Spectrum(torch.fft.rfft, None, None, "angle").eval()
    c = anefx.compile(model, (x,), precision="fp32", rules=[FFT_RULE])
    angle = next(iter(c.predict(x, precision="fp32").values()))
    expected = model(x).numpy()
    assert expected[0, 0] == pytest.approx(math.pi)  # the case: a negative DC bin, imaginary part exactly 0
    np.testing.assert_allclose(angle, expected, atol=1e-5)


def test_the_never_worse_guard_keeps_an_unfold_rewrite_that_adds_layout_ops():
    # over a middle axis the rewrite adds transposes that plain coremltools would not have, but plain cannot lower
    # unfold at all: rolling it back would fail the compile
    x = torch.randn(2, 21, 3)
    model = Unfold(1, 4, 2).eval()
    c = anefx.compile(model, (x,), precision="fp32")
    assert {p.name: p.status for p in c.passes}["unfold_to_conv"] == "applied"
    np.testing.assert_allclose(next(iter(c.predict(x, precision="fp32").values())), model(x).numpy(), atol=1e-6)


class PowerSpectrogram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT))

    def forward(self, audio):
        return torch.fft.rfft(audio.unfold(-1, N_FFT, HOP) * self.window).abs() ** 2


def test_windowed_frames_become_one_strided_convolution_per_part():
    x = torch.randn(1, HOP * 15 + N_FFT)
    model = PowerSpectrogram().eval()
    _, after, records = rewrite(model, (x,), [FFT_RULE, UNFOLD_RULE])
    assert [r.matches for r in records[1:]] == [1, 0]  # nothing left for unfold_to_conv
    assert ops(after)["unfold"] == 0 and ops(after)["convolution"] == 2 and ops(after)["linear"] == 0
    assert ops(after)["mul"] == 2 and ops(after)["add"] == 1  # re² + im²: the window is in the kernels
    conv = next(n for n in after.graph.nodes if n.target == torch.ops.aten.convolution.default)
    assert conv.args[3] == [1, HOP] and tuple(conv.meta["val"].shape) == (1, N_FFT // 2 + 1, 1, 16)
    torch.testing.assert_close(after.module()(x), model(x), rtol=1e-4, atol=1e-3)


class Unreadable(torch.nn.Module):
    def forward(self, x):
        return torch.fft.irfft(torch.fft.rfft(x) * 2)  # a complex product: not rewritten to real arithmetic


class ComplexOutput(torch.nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x)


def test_an_unknown_reader_or_a_complex_output_is_refused_with_the_readers_anefx_rewrites():
    x = torch.randn(1, 16)
    _, after, records = rewrite(Unreadable().eval(), (x,), [FFT_RULE])
    assert records[-1].matches == 0 and ops(after)["fft_rfft"] == 1  # left as it was, never half-rewritten
    reason = records[-1].refusals[0].reason
    assert "aten.mul.Tensor" in reason and "torch.view_as_real" in reason and ".abs()" in reason
    _, _, records = rewrite(ComplexOutput().eval(), (x,), [FFT_RULE], verify=False)
    assert records[-1].matches == 0
    assert "program output" in records[-1].refusals[0].reason
    assert "view_as_real" in records[-1].refusals[0].reason


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int = 16000) -> torch.Tensor:
    """Triangular mel filters (n_freqs, n_mels), HTK mel scale."""
    def mel(f):
        return 2595 * math.log10(1 + f / 700)
    edges = 700 * (10 ** (torch.linspace(mel(0), mel(sample_rate / 2), n_mels + 2) / 2595) - 1)
    freqs = torch.linspace(0, sample_rate / 2, n_freqs)[:, None]
    lo, centre, hi = edges[:-2], edges[1:-1], edges[2:]
    return torch.clamp(torch.minimum((freqs - lo) / (centre - lo), (hi - freqs) / (hi - centre)), min=0)


class LogMelEncoder(torch.nn.Module):
    """A log-mel front end framed with unfold + rfft, then a small transformer encoder."""

    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT))
        self.register_buffer("mel", mel_filterbank(N_FFT // 2 + 1, N_MELS))
        self.proj = torch.nn.Linear(N_MELS, WIDTH)
        layer = torch.nn.TransformerEncoderLayer(WIDTH, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, audio):
        frames = audio.unfold(-1, N_FFT, HOP) * self.window
        power = torch.fft.rfft(frames).abs() ** 2
        logmel = torch.log(power @ self.mel + 1e-6)
        return self.encoder(self.proj(logmel))


@pytest.mark.slow
def test_log_mel_transformer_compiles_whole_for_the_ane_and_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = LogMelEncoder().eval()
    audio = torch.randn(1, HOP * 31 + N_FFT)  # 32 frames
    state = {k: v.clone() for k, v in model.state_dict().items()}
    c = anefx.compile(model, (audio,))  # fp16, as the Neural Engine runs it
    status = {p.name: p.status for p in c.passes}
    assert status["fft_to_dft"] == "applied" and status["unfold_to_conv"] == "no-match"  # framing in the DFT
    report = package_report(c.save(tmp_path / "logmel.mlpackage"))
    assert not report.unsupported and not set(report.histogram) & set(ANE_UNSUPPORTED)
    assert report.histogram["conv"] == 12  # the two strided DFT convolutions, mel, input and encoder projections
    psnr = c.verify(audio, precision="fp16")["output"].psnr_db
    fp32 = anefx.compile(model, (audio,), precision="fp32")
    reference = model(audio).detach().numpy()
    error = np.abs(next(iter(fp32.predict(audio, precision="fp32").values())) - reference).max()
    print(f"log-mel transformer: fp32 package max error {error / np.abs(reference).max():.2g} of the largest "
          f"output, fp16 package PSNR {psnr:.1f} dB")  # docs/rules.md cites both
    assert error / np.abs(reference).max() <= 1e-3 and psnr > 50
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the model is not modified
