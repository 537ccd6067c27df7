"""Weight quantization (anefx.quantize), the MIL interpreter's constexpr kernels, and the quantization ladder."""

from __future__ import annotations

import copy
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import anefx
from anefx.errors import OptionError
from anefx.mil.packed_bits import unpack_bits
from anefx.mil.reader import Literal
from anefx.mlpackage import histogram
from anefx.quantize import QuantizeConfig, quantize_config
from anefx.quantize_apply import kmeans_lut, quantize_mlmodel

VOCAB, WIDTH, SEQ = 256, 64, 8
CONSTEXPR = {"int8": "constexpr_blockwise_shift_scale", "lut8": "constexpr_lut_to_dense",
             "lut6": "constexpr_lut_to_dense", "lut4": "constexpr_lut_to_dense"}


class TinyEncoder(nn.Module):
    """An embedding, a residual conv, a norm, an MLP layer and an output projection (the head)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.conv = nn.Conv1d(WIDTH, WIDTH, 3, padding=1)
        self.norm = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, 2 * WIDTH)
        self.head = nn.Linear(2 * WIDTH, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(self.fc(self.norm(x))))


WEIGHTS = {"embed.weight": "embeddings", "conv.weight": "default", "fc.weight": "default", "head.weight": "head"}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    return model, ids, anefx.compile(model, (ids,), package_check="skip", progress=False)


# -- options ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "target", "names"), [
    ("lut5", "iOS18", "int8, lut8, lut6, lut4"),
    ({"embeddings": "int8", "tail": "lut4"}, "iOS18", "embeddings, head, default"),
    ({"head": "int3"}, "iOS18", "int8, lut8, lut6, lut4"),
    (QuantizeConfig("lut4", group_size=0), "iOS18", "group_size=16"),
    ("lut4", "iOS17", "deployment_target='iOS18'"),
    (3, "iOS18", "lut4"),
])
def test_bad_quantize_options_name_the_fix(value, target, names):
    with pytest.raises(OptionError) as err:
        quantize_config(value, target)
    assert names in str(err.value)


def test_compile_refuses_a_bad_mode_before_any_work():
    with pytest.raises(OptionError, match="lut6, lut4"):
        anefx.compile(nn.Linear(4, 4), (torch.randn(1, 4),), quantize="int4")


def test_int8_runs_before_ios18_and_the_dict_form_reads_its_parts():
    assert quantize_config("int8", "iOS16").mode == "int8"
    config = quantize_config({"embeddings": "int8", "head": "lut6", "default": "lut4", "group_size": 32})
    assert (config.mode_of("embeddings"), config.mode_of("head"), config.mode_of("default")) == ("int8", "lut6", "lut4")
    assert config.group_size == 32
    assert quantize_config("fp16") is None


# -- k-means and sub-byte packing -------------------------------------------------------------------------

def test_kmeans_lut_is_deterministic_and_beats_a_uniform_grid():
    values = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float16)
    lut, idx = kmeans_lut(values, 4)
    again, idx_again = kmeans_lut(values.copy(), 4)
    assert lut.shape == (16,) and lut.dtype == np.float16 and idx.max() < 16
    assert np.array_equal(lut, again) and np.array_equal(idx, idx_again)
    error = np.abs(lut[idx].reshape(values.shape).astype(np.float32) - values).mean()
    grid = np.linspace(values.min(), values.max(), 16, dtype=np.float32)
    uniform = np.abs(grid[np.abs(values.reshape(-1, 1) - grid).argmin(1)].reshape(values.shape) - values).mean()
    assert error < 0.8 * uniform


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
def test_unpack_bits_reads_what_coremltools_packs(nbits):
    from coremltools.optimize._utils import pack_elements_into_bits, restore_elements_from_packed_bits

    values = np.random.default_rng(nbits).integers(0, 2**nbits, 1001).astype(np.uint8)
    packed = pack_elements_into_bits(values, nbits)
    assert np.array_equal(unpack_bits(packed, nbits, values.size), values)
    assert np.array_equal(unpack_bits(packed, nbits, values.size), restore_elements_from_packed_bits(
        packed, nbits, values.size))
    signed = np.random.default_rng(0).integers(-8, 8, 77).astype(np.int8)
    assert np.array_equal(unpack_bits(pack_elements_into_bits(signed, 4), 4, 77, signed=True), signed)


# -- quantized packages -----------------------------------------------------------------------------------

def _quantized(tiny, quantize, tmp_path: Path):
    _, _, compiled = tiny
    mlmodel, plan = quantize_mlmodel(compiled.mlmodel, quantize_config(quantize))
    path = tmp_path / "q.mlpackage"
    mlmodel.save(str(path))
    return mlmodel, plan, path


def _decompressed_by_coremltools(mlmodel) -> dict[str, np.ndarray]:
    """Each constexpr op's value as coremltools' own numpy reference computes it."""
    from anefx.quantize_apply import _program

    block = _program(mlmodel).functions["main"]
    return {op.outputs[0].name: np.asarray(op.materialized_val_inference(), np.float32)
            for op in block.operations if op.op_type.startswith("constexpr_")}


def _with_weights(model: nn.Module, weights: list[np.ndarray]) -> nn.Module:
    """A copy of `model` whose WEIGHTS are the given arrays (matched by size: they all differ), laid out as the
    parameter (as stored, or transposed) whichever is closer to the original."""
    result = copy.deepcopy(model)
    params = dict(result.named_parameters())
    for name in WEIGHTS:
        p = params[name]
        (w,) = [w for w in weights if w.size == p.numel()]
        flat = torch.from_numpy(w.astype(np.float32)).reshape(w.shape[0], -1)
        layouts = [flat.reshape(p.shape), flat.T.reshape(p.shape)] if flat.shape[1] > 1 else [flat.reshape(p.shape)]
        best = min(layouts, key=lambda t: float((t - p.detach()).abs().mean()))
        with torch.no_grad():
            p.copy_(best)
    return result


@pytest.mark.parametrize("mode", ["int8", "lut8", "lut6", "lut4"])
def test_each_mode_matches_a_dequantize_then_run_reference(tiny, mode, tmp_path):
    model, ids, _ = tiny
    mlmodel, plan, path = _quantized(tiny, mode, tmp_path)
    assert histogram(path)[CONSTEXPR[mode]] == len(WEIGHTS) == len(plan.weights)
    reference = _decompressed_by_coremltools(mlmodel)
    runner = anefx.load_mlpackage(path, precision="fp32")
    for name, value in reference.items():  # the interpreter decompresses exactly as coremltools does
        assert np.array_equal(runner._constants[name], value), name
    dequantized = _with_weights(model, list(reference.values()))
    with torch.no_grad():
        expected = dequantized(ids).numpy()
    got = next(iter(runner(ids).values()))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_small_tensors_stay_fp16(tiny, tmp_path):
    _, _, path = _quantized(tiny, "lut4", tmp_path)
    program = anefx.mil.read_program(path)
    floats = {n: v for n, v in program.constants.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"}
    kept = [v for v in floats.values() if v.dtype == np.float16]
    assert kept and all(v.size < 2048 for v in kept)  # norms and biases
    assert max(v.size for v in floats.values()) <= VOCAB  # luts and the biases: no weight left dense


def test_per_part_mapping_puts_each_mode_on_its_part(tiny, tmp_path):
    quantize = {"embeddings": "int8", "head": "lut6", "default": "lut4"}
    _, plan, path = _quantized(tiny, quantize, tmp_path)
    assert sorted(p for p, _ in plan.weights.values()) == sorted(WEIGHTS.values())
    assert {p: m for p, m in plan.weights.values()} == {"embeddings": "int8", "head": "lut6", "default": "lut4"}
    program = anefx.mil.read_program(path)
    made_by = {name: op for op in program.operations for name, _ in op.outputs}
    gather = next(op for op in program.operations if op.type == "gather")
    assert made_by[gather.inputs["x"][0]].type == "constexpr_blockwise_shift_scale"
    luts = [op.inputs["lut"][0] for op in program.operations if op.type == "constexpr_lut_to_dense"]
    palettes = sorted((b.value if isinstance(b, Literal) else program.constants[b]).shape[-2] for b in luts)
    assert palettes == [16, 16, 64]  # conv and fc: lut4; the head: lut6


def test_a_dict_naming_only_the_head_keeps_the_rest_fp16(tiny, tmp_path):
    _, plan, path = _quantized(tiny, {"head": "int8"}, tmp_path)
    assert sorted(m for _, m in plan.weights.values()) == ["fp16", "fp16", "fp16", "int8"]
    assert histogram(path)["constexpr_blockwise_shift_scale"] == 1 and not histogram(path)["constexpr_lut_to_dense"]


def test_compile_with_quantize_records_it_and_checks_the_package(tiny):
    model, ids, _ = tiny
    compiled = anefx.compile(model, (ids,), quantize="lut6", progress=False)
    assert compiled.options["quantize"] == "lut6"
    assert compiled.package_check.min_psnr == 20.0 and compiled.package_check.ok
    assert sum(1 for op in anefx.lower.mil_operations(compiled.mlmodel) if op.op_type == "constexpr_lut_to_dense") == 4
    assert compiled.verify(precision="fp16")["output"].psnr_db > 25


# -- the ladder -------------------------------------------------------------------------------------------

def test_ladder_rows_shrink_down_the_ladder(tiny):
    from anefx.quantize import LADDER
    from anefx.quantize_report import measure_ladder, rung_configs

    model, _, compiled = tiny
    report = measure_ladder(model, compiled, rung_configs(LADDER, 16, "iOS18"), say=lambda s: None)
    assert [r.mode for r in report.rows] == ["fp16", "int8", "lut6", "lut4"] and not report.decoder
    sizes = [r.bytes for r in report.rows]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    fidelity = [r.min_psnr_db for r in report.rows]
    assert fidelity == sorted(fidelity, reverse=True) and fidelity[1] > 40
    assert report.row("int8").size_ratio < 0.6


def test_plot_writes_a_png(tmp_path):
    from anefx.quantize_report import LadderRow, QuantizeReport

    rows = [LadderRow("fp16", 600_000, {"y": 75.0}), LadderRow("int8", 310_000, {"y": 51.0}),
            LadderRow("lut4", 210_000, {"y": 28.0})]
    path = QuantizeReport(rows, decoder=False).plot(tmp_path / "ladder.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    start = data.index(b"IDAT") + 4
    raw = np.frombuffer(zlib.decompress(data[start:start + int.from_bytes(data[start - 8:start - 4], "big")]),
                        np.uint8).reshape(height, width * 3 + 1)[:, 1:].reshape(height, width, 3)
    blue = (raw == np.array([31, 119, 180], np.uint8)).all(-1)
    assert blue.sum() >= 3 * 49  # three 7×7 points (and the lines joining them)


# -- the command line -------------------------------------------------------------------------------------

def test_cli_refuses_an_unknown_mode_before_loading(tmp_path):
    from typer.testing import CliRunner

    from anefx.cli import app

    result = CliRunner().invoke(app, ["quantize-report", str(tmp_path / "missing.py:make"), "--modes", "int8,lut5"])
    assert result.exit_code == 2
    assert "lut5" in result.output and "int8, lut8, lut6, lut4" in " ".join(result.output.split())


# -- LLMs (slow) ------------------------------------------------------------------------------------------

def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)).eval()


def _blob_offsets(function, compressed_only: bool = False) -> set[int]:
    """Offsets in weight.bin of the values a function reads from it: every const, or only the arguments of its
    constexpr ops (the quantized weights)."""
    block = function.block_specializations[function.opset]
    values = [] if compressed_only else [op.attributes["val"] for op in block.operations if op.type == "const"]
    values += [b.value for op in block.operations for arg in op.inputs.values() for b in arg.arguments
               if b.WhichOneof("binding") == "value" and (not compressed_only or op.type.startswith("constexpr_"))]
    return {v.blobFileValue.offset for v in values if v.WhichOneof("value") == "blobFileValue"}


@pytest.mark.slow
def test_quantized_llm_stores_each_weight_once_and_generates():
    from anefx.mil.blob import BlobFile
    from anefx.mlpackage import load_spec, program_ops

    lm = anefx.compile_llm(_tiny_llama(), context_length=32, prefill_length=8, quantize="lut4", progress=False)
    assert lm.package_check.ok and lm.package_check.min_psnr == 15.0
    path = Path(lm.folder) / lm.manifest.chunks[0].file
    for fn in ("prefill", "decode"):  # 2 layers × 7 projections, the embedding and the head
        assert sum(1 for r in program_ops(path, fn) if r.type == "constexpr_lut_to_dense") == 16
    functions = load_spec(path).mlProgram.functions
    blob = BlobFile(path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin")
    offsets = {fn: _blob_offsets(functions[fn]) for fn in ("prefill", "decode")}
    quantized = {fn: _blob_offsets(functions[fn], compressed_only=True) for fn in offsets}
    assert quantized["prefill"] == quantized["decode"] and len(quantized["decode"]) == 2 * 16  # lut + indices each
    one_function = max(sum(blob.entry(o)[1] for o in found) for found in offsets.values())
    assert blob.data.size <= 1.05 * one_function
    tokens = lm.generate(torch.randint(0, 1024, (1, 6)), max_new_tokens=4, stop_at_eos=False)
    assert len(tokens) == 4 and all(0 <= t < 1024 for t in tokens)


@pytest.mark.slow
def test_quantize_report_on_a_causal_lm_measures_tokens():
    model = _tiny_llama()
    report = anefx.quantize_report(model, (torch.randint(0, 1024, (1, 16)),), progress=False)
    assert report.decoder and report.row("fp16").top1_agreement == 1.0
    assert abs(report.row("int8").perplexity / report.row("fp16").perplexity - 1) < 0.05
    assert all(r.top1_agreement >= 0.5 and np.isfinite(r.perplexity) for r in report.rows)
    sizes = [r.bytes for r in report.rows]
    assert sizes == sorted(sizes, reverse=True)


def test_quantize_is_refused_for_another_target():
    from anefx.quantize_apply import check_quantize

    with pytest.raises(OptionError, match="target='coreml'"):
        check_quantize("int8", "iOS18", "coreai")
    check_quantize(None, "iOS15", "coreai")  # nothing asked, nothing refused
