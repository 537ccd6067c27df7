"""Bad inputs and faults a user will try against the Python API: each is an AnefxError naming the fix (or,
where the input is legitimate but unusual, a correct result). CLI, backend and file faults have their own
files: tests/test_bad_inputs_files.py and tests/test_bad_inputs_backend.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import anefx
from anefx.binding import NarrowingNotice
from anefx.package_check import PrecisionError, PrecisionWarning


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Flagged(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, a, b, scale: float = 1.0, double: bool = False):
        y = self.fc(a) * scale + b
        return y * 2 if double else y


class Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(32, 8)

    def forward(self, ids):
        return self.table(ids % 32)


class Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * self.calls


class InPlaceInput(torch.nn.Module):
    def forward(self, x):
        x.mul_(2)
        return x + 1


class Branchy(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class ReturnsObject(torch.nn.Module):
    def forward(self, x):
        return x * 2, object()


class Overflow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x) * 1000
        return torch.softmax(h * h, dim=-1)


X = torch.randn(1, 4, 8)


def _compile(model, *args, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("precision", "fp32")
    return anefx.compile(model, *args, **kwargs)


# -- what is handed to anefx.compile ------------------------------------------------------------------
COMPILE_ERRORS = [
    ("a function, not a module", lambda: _compile(torch.relu, (X,)), anefx.InvalidModelError,
     r"Wrap a function in an nn.Module"),
    ("a module class, not an instance", lambda: _compile(MLP, (X,)), anefx.InvalidModelError, r"got type"),
    ("example_args a dict", lambda: _compile(MLP(), {"x": X}), anefx.InvalidExampleError,
     r"example_args must be a tuple.*pass e\.g\."),
    ("a string among the positional examples", lambda: _compile(MLP(), (X, "fast")), anefx.InvalidExampleError,
     r"must be a tensor \(pass flags through example_kwargs\)"),
    ("example_kwargs a list", lambda: _compile(Flagged(), (X,), [X]), anefx.InvalidExampleError,
     r"example_kwargs must be a dict"),
    ("a keyword example that is an object", lambda: _compile(Flagged(), (X, X), {"scale": object()}),
     anefx.InvalidExampleError, r"must be tensors or plain constants"),
    ("an example of the wrong shape", lambda: _compile(MLP(), (torch.randn(1, 4, 5),)), anefx.InvalidExampleError,
     r"shapes and dtypes the model expects"),
    ("an integer example for a float model", lambda: _compile(MLP(), (torch.ones(1, 4, 8, dtype=torch.int64),)),
     anefx.InvalidExampleError, r"shapes and dtypes the model expects"),
    ("a keyword forward does not take", lambda: _compile(MLP(), (X,), {"mask": X}), anefx.InvalidExampleError,
     r"does not take these arguments.*unexpected keyword argument 'mask'"),
    ("a required argument left out", lambda: _compile(Flagged(), (X,)), anefx.InvalidExampleError,
     r"missing a required argument: 'b'"),
    ("int64 ids beyond int32", lambda: _compile(Embed(), (torch.tensor([[3_000_000_000, 1]]),)),
     anefx.InvalidExampleError, r"`ids` holds 3000000000, outside the int32 range.*Pass values within int32"),
    ("float64 beyond float32's range", lambda: _compile(MLP().double(), (torch.full((1, 4, 8), 1e300,
                                                                                    dtype=torch.float64),)),
     anefx.InvalidExampleError, r"beyond float32's range.*Scale the input"),
    ("a forward that counts its calls in a buffer", lambda: _compile(Counter(), (torch.randn(2, 4),)),
     anefx.CaptureError, r"updates buffer\(s\) calls in place.*Move the update out of forward"),
    ("a forward that writes its input", lambda: _compile(InPlaceInput(), (torch.randn(2, 4),)), anefx.CaptureError,
     r"modifies its input\(s\) x in place.*out-of-place"),
    ("a branch on a tensor's value", lambda: _compile(Branchy(), (torch.randn(2, 4),)), anefx.CaptureError,
     r"torch\.where"),
    ("an output that is not a tensor", lambda: _compile(ReturnsObject(), (torch.randn(2, 4),)), anefx.CaptureError,
     r"output\[1\] is a object.*Return only tensors"),
    ("unknown compute units", lambda: _compile(MLP(), (X,), compute_units="NPU"), anefx.OptionError,
     r"compute_units='NPU' is not one of CPU_AND_NE"),
    ("unknown precision", lambda: _compile(MLP(), (X,), precision="int8"), anefx.OptionError,
     r"precision='int8' is not one of fp16, fp32"),
    ("unknown deployment target", lambda: _compile(MLP(), (X,), deployment_target="iOS99"), anefx.OptionError,
     r"deployment_target='iOS99' is not one of"),
    ("unknown attention strategy", lambda: _compile(MLP(), (X,), attention="flash"), anefx.OptionError,
     r"attention='flash' is not one of split_heads, sdpa"),
    ("unknown package check", lambda: _compile(MLP(), (X,), package_check="maybe"), anefx.OptionError,
     r"package_check='maybe' is not one of warn, raise, skip"),
    ("an unknown rule name", lambda: _compile(MLP(), (X,), rules=["linear_to_conv"]), anefx.UnknownRuleError,
     r"unknown rule 'linear_to_conv'; known rules: .*linear_to_conv1x1"),
    ("an fp16 overflow, raised on request", lambda: _compile(Overflow(), (X,), precision="fp16", rules=[],
                                                            package_check="raise"),
     PrecisionError, r"first op whose fp16 output overflows: `mul`.*precision='fp32'"),
]


@pytest.mark.parametrize(("case", "call", "error", "fix"), COMPILE_ERRORS, ids=[c[0] for c in COMPILE_ERRORS])
def test_compile_refuses_with_the_fix(case, call, error, fix):
    with pytest.raises(error, match=fix) as info:
        call()
    assert isinstance(info.value, anefx.AnefxError)
    assert len(str(info.value).splitlines()) <= 15


def test_a_refused_forward_leaves_the_model_and_the_example_as_they_were():
    model = Counter()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(anefx.CaptureError):
        _compile(model, (torch.randn(2, 4),))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 4)
    kept = x.clone()
    with pytest.raises(anefx.CaptureError):
        _compile(InPlaceInput(), (x,))
    assert torch.equal(x, kept)


def test_compile_leaves_parameters_buffers_and_mode_untouched():
    class Calls(MLP):
        def __init__(self):
            super().__init__()
            self.register_buffer("stat", torch.randn(8))
            self.dropout = torch.nn.Dropout(0.5)
            self.seen = 0

        def forward(self, x):
            self.seen += 1
            return self.dropout(super().forward(x)) + self.stat

    model = Calls().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = _compile(model, (X,))
    assert model.training  # put back in training mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.seen <= 2  # eager reference (+ nothing that re-runs the user's forward per stage)
    model.eval()
    torch.testing.assert_close(c(X), model(X), rtol=1e-4, atol=1e-5)


def test_float64_inputs_are_narrowed_with_a_notice():
    model = MLP().double().eval()
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    with pytest.warns(NarrowingNotice, match="float64.*Pass float32 to silence"):
        c = _compile(model, (x,))
    torch.testing.assert_close(c(x.float()).double(), model(x), rtol=1e-4, atol=1e-5)


# -- calling the compiled model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def flagged():
    model = Flagged().eval()
    a, b = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    return model, a, b, _compile(model, (), {"b": b, "a": a, "scale": 2.0})


def test_inputs_are_bound_by_name_in_any_order(flagged):
    model, a, b, c = flagged
    expected = model(a, b, scale=2.0)
    for result in (c(a=a, b=b, scale=2.0), c(b=b, a=a, scale=2.0), c(a, b, scale=2.0), c(a, b=b, scale=2.0)):
        torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5)


CALL_ERRORS = [
    ("another value for a baked constant", lambda c, a, b: c(a, b, scale=3.0), r"`scale=3\.0` differs.*baked into it"),
    ("a baked constant left out", lambda c, a, b: c(a, b), r"compiled with scale=2\.0.*pass scale=2\.0 explicitly"),
    ("a constant the program never saw", lambda c, a, b: c(a, b, scale=2.0, double=True),
     r"`double=True` differs.*compile again with double=True"),
    ("a missing tensor", lambda c, a, b: c(a, scale=2.0), r"missing a required argument: 'b'"),
    ("a tensor of another shape", lambda c, a, b: c(a, b[:, :2], scale=2.0),
     r"`b` has shape \(1, 2, 8\).*compiled for \(1, 4, 8\).*static shapes"),
    ("integers where floats are expected", lambda c, a, b: c(a, b.long(), scale=2.0),
     r"`b` is int64, but the program takes float32"),
    ("a numpy array instead of a tensor", lambda c, a, b: c(a, b.numpy(), scale=2.0), r"`b` is a ndarray; pass a tensor"),
    ("an unknown keyword", lambda c, a, b: c(a, b, scale=2.0, mask=a), r"unexpected keyword argument 'mask'"),
]


@pytest.mark.parametrize(("case", "call", "fix"), CALL_ERRORS, ids=[c[0] for c in CALL_ERRORS])
def test_calls_that_do_not_fit_the_program_are_refused(flagged, case, call, fix):
    _, a, b, c = flagged
    with pytest.raises(anefx.InvalidExampleError, match=fix):
        call(c, a, b)


def test_ids_beyond_int32_at_call_time_are_refused():
    model = Embed().eval()
    c = _compile(model, (torch.tensor([[1, 2, 3]]),))
    with pytest.raises(anefx.InvalidExampleError, match=r"`ids` holds -3000000000, outside the int32 range"):
        c(torch.tensor([[1, 2, -3_000_000_000]]))
    ids = torch.tensor([[31, 0, 7]])
    torch.testing.assert_close(c(ids), model(ids))


# -- outputs that coremltools handles badly ----------------------------------------------------------
class Repeats(torch.nn.Module):
    def forward(self, x, y):
        h = x * 2
        return h, h, x, y.sum(), x


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_repeated_outputs_inputs_as_outputs_and_scalars_come_back_right(tmp_path, precision):
    from anefx.mlpackage import load_spec

    x, y = torch.randn(2, 3), torch.randn(2, 3)
    c = _compile(Repeats(), (x, y), precision=precision)
    saved = c.save(tmp_path / "repeats.mlpackage")
    names = [o.name for o in load_spec(saved).description.output]
    assert names == c.output_names and len(set(names)) == 5
    got, expected = c(x, y), Repeats()(x, y)
    assert got[3].shape == ()
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=2e-3, atol=2e-3)


def test_an_fp16_overflow_warns_by_default_and_names_the_op():
    with pytest.warns(PrecisionWarning, match=r"inf/NaN.*first op whose fp16 output overflows"):
        c = _compile(Overflow(), (X,), precision="fp16", rules=[])
    assert c.package_check.not_finite == ["output"]


def test_interpreter_load_of_a_missing_package_names_the_path(tmp_path):
    with pytest.raises(anefx.AnefxError, match="missing.mlpackage"):
        anefx.load_mlpackage(tmp_path / "missing.mlpackage")


def test_a_quiet_compile_prints_nothing(capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _compile(MLP(), (X,))
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_numpy_outputs_are_torch_tensors_of_the_model_dtype():
    c = _compile(MLP(), (X,))
    out = c(X)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert not isinstance(out, np.ndarray)


def test_the_fingerprint_is_of_the_weights_compiled_even_if_the_model_changes_before_save(tmp_path):
    from anefx.mlpackage import WEIGHTS_KEY, module_weights_sha256, package_metadata

    model = MLP().eval()
    compiled_weights = module_weights_sha256(model)
    c = _compile(model, (X,), package_check="skip")
    with torch.no_grad():
        model.fc1.weight.add_(1.0)  # the user edits the model after compiling
    saved = c.save(tmp_path / "mlp.mlpackage")
    assert package_metadata(saved)[WEIGHTS_KEY] == compiled_weights != module_weights_sha256(model)
