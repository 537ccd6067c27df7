"""The loader and runner: unknown ops, weight blobs, inputs, the two precisions, metrics."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb

from anefx.errors import AnefxError, OptionError
from anefx.mil import (
    MilInputError,
    MilProgramError,
    UnsupportedOpError,
    compare,
    load_mlpackage,
    read_program,
)
from anefx.mil.registry import KERNELS
from tests.mil.programs import rand, save_program


def _relu_package(tmp_path, name="relu"):
    return save_program(lambda x: mb.relu(x=x), {"x": rand(2, 3)}, tmp_path / f"{name}.mlpackage")


def test_unknown_op_names_type_and_output(tmp_path, monkeypatch):
    path = _relu_package(tmp_path)
    monkeypatch.delitem(KERNELS, "relu")
    with pytest.raises(UnsupportedOpError, match=r"no kernel for op 'relu' \(output 'relu_0'\)") as err:
        load_mlpackage(path)
    assert isinstance(err.value, AnefxError)
    assert "add a kernel" in str(err.value)


def test_kernels_take_every_argument_of_the_mil_spec():
    """A program may bind any argument the op reference declares (in any opset): kernels must accept it."""
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    for op_type, fn in KERNELS.items():
        params = set(list(inspect.signature(fn).parameters)[1:])
        for version, cls in SSAOpRegistry.core_ops.get(op_type, {}).items():
            missing = set(cls.input_spec.input_types) - params
            assert not missing, f"{op_type} (opset {version}) kernel lacks {missing}"


def test_blob_weights_match_coremltools_reader(tmp_path):
    from coremltools.libmilstoragepython import _BlobStorageReader

    w32, w16 = rand(64, 32), rand(16, 8, seed=1).astype(np.float16)
    path = save_program(lambda x: mb.add(x=mb.matmul(x=x, y=w32), y=np.float32(1.0)), {"x": rand(4, 64)},
                        tmp_path / "w.mlpackage")
    program = read_program(path)
    stored = [v for v in program.constants.values() if isinstance(v, np.ndarray) and v.shape == (64, 32)]
    np.testing.assert_array_equal(stored[0], w32)
    reader = _BlobStorageReader(str(path / "Data/com.apple.CoreML/weights/weight.bin"))
    np.testing.assert_array_equal(reader.read_float_data(64).reshape(64, 32), w32)
    path16 = save_program(lambda x: mb.matmul(x=x, y=w16), {"x": rand(4, 16).astype(np.float16)},
                          tmp_path / "w16.mlpackage")
    stored16 = [v for v in read_program(path16).constants.values() if getattr(v, "shape", None) == (16, 8)]
    assert stored16[0].dtype == np.float16
    np.testing.assert_array_equal(stored16[0], w16)


def test_corrupt_weight_file_is_reported(tmp_path):
    path = save_program(lambda x: mb.matmul(x=x, y=rand(64, 32)), {"x": rand(4, 64)},
                        tmp_path / "c.mlpackage")
    blob = path / "Data/com.apple.CoreML/weights/weight.bin"
    data = bytearray(blob.read_bytes())
    data[64:68] = b"\0\0\0\0"  # the first blob's sentinel
    blob.write_bytes(bytes(data))
    with pytest.raises(MilProgramError, match="bad sentinel"):
        load_mlpackage(path)


def test_missing_package_is_reported(tmp_path):
    with pytest.raises(AnefxError, match="does not exist"):
        load_mlpackage(tmp_path / "nothing.mlpackage")


def test_inputs_by_name_position_numpy_or_torch(tmp_path):
    runner = load_mlpackage(_relu_package(tmp_path))
    x = rand(2, 3)
    assert runner.input_names == ["x"] and runner.output_names == ["relu_0"]
    for call in (lambda: runner(x=x), lambda: runner(x), lambda: runner(x=torch.from_numpy(x))):
        np.testing.assert_array_equal(call()["relu_0"], np.maximum(x, 0))


def test_input_errors_say_what_to_pass(tmp_path):
    runner = load_mlpackage(_relu_package(tmp_path))
    with pytest.raises(MilInputError, match=r"missing: x.*unknown: y.*x: float32 \(2, 3\)"):
        runner(y=rand(2, 3))
    with pytest.raises(MilInputError, match=r"shape \(3, 2\); the program expects \(2, 3\)"):
        runner(x=rand(3, 2))


def test_int64_token_ids_are_cast_to_int32(tmp_path):
    table = rand(10, 4)
    path = save_program(lambda ids: mb.gather(x=table, indices=ids, axis=0),
                        {"ids": np.array([[1, 9, 3]], np.int32)}, tmp_path / "g.mlpackage")
    runner = load_mlpackage(path)
    out = runner(ids=torch.tensor([[1, 9, 3]], dtype=torch.int64))
    np.testing.assert_array_equal(next(iter(out.values())), table[[[1, 9, 3]]])
    with pytest.raises(MilInputError, match="outside the range of int32"):
        runner(ids=np.array([[1, 2**40, 3]], np.int64))


def test_unknown_precision_is_an_option_error(tmp_path):
    with pytest.raises(OptionError, match="precision='bf16'"):
        load_mlpackage(_relu_package(tmp_path), precision="bf16")


def _fp16_program(tmp_path):
    """An fp16 program (fp32 inputs cast to fp16, computed in fp16, cast back) as anefx writes them."""
    import coremltools as ct

    w = rand(32, 8, seed=1)
    prog = mb.program(input_specs=[mb.TensorSpec(shape=(4, 32))], opset_version=ct.target.iOS18)(
        lambda x: mb.add(x=mb.matmul(x=x, y=w), y=np.float32(1e-3)))
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    model.save(str(tmp_path / "h.mlpackage"))
    return tmp_path / "h.mlpackage", w


def test_precisions_on_an_fp16_program(tmp_path):
    path, w = _fp16_program(tmp_path)
    x = rand(4, 32)
    h = np.float16
    w16 = w.astype(h).astype(np.float32)
    fp32 = next(iter(load_mlpackage(path, "fp32")(x=x).values()))
    assert fp32.dtype == np.float32  # fp16 casts are kept in float32: the program's math
    np.testing.assert_allclose(fp32, x @ w16 + np.float32(h(1e-3)), rtol=1e-6, atol=1e-6)
    fp16 = next(iter(load_mlpackage(path, "fp16")(x=x).values()))
    # fp16: inputs rounded, matmul accumulated in float32 then rounded, the add rounded again
    product = (x.astype(h).astype(np.float32) @ w16).astype(h)
    np.testing.assert_array_equal(fp16, (product + h(1e-3)).astype(np.float32))
    assert not np.array_equal(fp16, fp32)


def test_compare_metrics():
    ref = np.array([1.0, -4.0, 2.0, 0.0])
    report = compare(ref + np.array([0.0, 0.0, 0.04, -0.03]), ref)
    assert report.max_abs == pytest.approx(0.04)
    assert report.max_rel == pytest.approx(0.01)  # relative to max |ref| = 4
    assert report.psnr_db == pytest.approx(20 * math.log10(4 / math.sqrt((0.04**2 + 0.03**2) / 4)))
    assert compare(ref, ref).psnr_db == math.inf
    assert compare(torch.tensor(ref), ref).max_abs == 0.0
