"""Layout and gather kernels against numpy: reshape, concat, split, slicing, padding, gathers, ..."""

from __future__ import annotations

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from anefx.mil import MilRuntimeError
from tests.mil.programs import rand


@pytest.mark.parametrize(("shape", "expected"), [
    ([0, -1, 4], (2, 3, 4)),  # 0 copies the input dim it lines up with
    ([1, 0, -1, 0], (1, 2, 3, 4)),  # iOS17: zeros match input dims counting from the right
    ([0, 1, 0, -1, 0], (1, 1, 2, 3, 4)),  # ... and a 0 with no input dim to match is 1
    ([-1], (24,)),
])
def test_reshape(run_mil, shape, expected):
    x = rand(2, 3, 4)
    out = run_mil(lambda x: mb.reshape(x=x, shape=shape), "reshape", x=x)
    np.testing.assert_array_equal(out, x.reshape(expected))


def test_transpose_expand_squeeze(run_mil):
    x = rand(2, 1, 3)

    def fn(x):
        t = mb.transpose(x=x, perm=[2, 0, 1])  # (3, 2, 1)
        e = mb.expand_dims(x=t, axes=[0, -1])  # (1, 3, 2, 1, 1)
        return mb.squeeze(x=e, axes=[0, 3, 1])  # axis 1 (size 3) is not single: left alone

    out = run_mil(fn, "squeeze", x=x)
    np.testing.assert_array_equal(out, np.transpose(x, (2, 0, 1)).reshape(3, 2, 1))


@pytest.mark.parametrize(("axis", "interleave"), [(0, False), (1, True), (-1, True), (0, True)])
def test_concat(run_mil, axis, interleave):
    a, b, c = rand(2, 3, 4), rand(2, 3, 4, seed=1), rand(2, 3, 4, seed=2)
    out = run_mil(lambda a, b, c: mb.concat(values=(a, b, c), axis=axis, interleave=interleave), "concat",
                  a=a, b=b, c=c)
    if interleave:
        expected = np.stack([a, b, c], axis=axis % 3 + 1).reshape(
            [d * 3 if i == axis % 3 else d for i, d in enumerate(a.shape)])
    else:
        expected = np.concatenate([a, b, c], axis=axis)
    np.testing.assert_array_equal(out, expected)


def test_concat_interleave_example(run_mil):
    """The example of the MIL reference: rows alternate between the inputs."""
    a = np.array([[1, 2], [3, 4], [5, 6]], np.float32)
    b = np.array([[7, 8], [9, 10], [11, 12]], np.float32)
    out = run_mil(lambda a, b: mb.concat(values=(a, b), axis=0, interleave=True), "concat", a=a, b=b)
    np.testing.assert_array_equal(out, [[1, 2], [7, 8], [3, 4], [9, 10], [5, 6], [11, 12]])


@pytest.mark.parametrize("kwargs", [{"num_splits": 3}, {"split_sizes": [1, 4, 1]}, {"split_sizes": [6]}])
def test_split(run_mil, kwargs):
    x = rand(2, 6, 3)
    outs = run_mil(lambda x: mb.split(x=x, axis=1, **kwargs), "split", x=x)
    outs = list(outs.values()) if isinstance(outs, dict) else [outs]
    sizes = kwargs.get("split_sizes") or [2, 2, 2]
    expected = np.split(x, np.cumsum(sizes)[:-1], axis=1)
    assert len(outs) == len(expected)
    for o, e in zip(outs, expected, strict=True):
        np.testing.assert_array_equal(o, e)


@pytest.mark.parametrize(("kwargs", "index"), [
    ({"begin": [0, 1, 0], "end": [2, 5, 4], "stride": [1, 2, 1]}, np.s_[0:2, 1:5:2, 0:4]),
    ({"begin": [1, -3, 0], "end": [0, -1, 3], "begin_mask": [False, False, True],
      "end_mask": [True, False, False]}, np.s_[1:, -3:-1, :3]),
    ({"begin": [1, 2, 0], "end": [2, 3, 4], "squeeze_mask": [True, False, False]}, np.s_[1, 2:3, 0:4]),
    ({"begin": [0, -1, 0], "end": [0, 0, 0], "squeeze_mask": [False, True, False],
      "end_mask": [True, False, True]}, np.s_[:, -1, :]),
    ({"begin": [0, 4, 3], "end": [2, 0, 0], "stride": [1, -2, -1], "end_mask": [False, True, True]},
     np.s_[0:2, 4::-2, 3::-1]),
])
def test_slice_by_index(run_mil, kwargs, index):
    x = rand(2, 6, 4)
    args = {k: np.array(v, np.int32 if k in ("begin", "end", "stride") else bool) for k, v in kwargs.items()}
    out = run_mil(lambda x: mb.slice_by_index(x=x, **args), "slice_by_index", x=x)
    np.testing.assert_array_equal(out, x[index])


def test_slice_by_size(run_mil):
    x = rand(3, 6, 4)
    out = run_mil(lambda x: mb.slice_by_size(x=x, begin=[1, 2, 0], size=[2, -1, 3]), "slice_by_size", x=x)
    np.testing.assert_array_equal(out, x[1:3, 2:, 0:3])


@pytest.mark.parametrize(("op", "build", "reference"), [
    ("stack", lambda x: mb.stack(values=(x, x), axis=1), lambda x: np.stack([x, x], axis=1)),
    ("reverse", lambda x: mb.reverse(x=x, axes=[0, 2]), lambda x: x[::-1, :, ::-1]),
    ("flatten2d", lambda x: mb.flatten2d(x=x, axis=2), lambda x: x.reshape(6, 4)),
    ("shape", lambda x: mb.shape(x=x), lambda x: np.array(x.shape)),
    ("fill_like", lambda x: mb.fill_like(ref_tensor=x, value=np.float32(2.5)),
     lambda x: np.full(x.shape, 2.5)),
])
def test_small_layout_ops(run_mil, op, build, reference):
    x = rand(2, 3, 4)
    np.testing.assert_array_equal(run_mil(build, op, x=x), reference(x))


def test_tile(run_mil):
    x = rand(2, 1, 3)
    np.testing.assert_array_equal(run_mil(lambda x: mb.tile(x=x, reps=[1, 4, 2]), "tile", x=x),
                                  np.tile(x, (1, 4, 2)))


@pytest.mark.parametrize(("mode", "np_mode"), [("constant", "constant"), ("reflect", "reflect"),
                                                ("replicate", "edge")])
def test_pad(run_mil, mode, np_mode):
    x = rand(2, 4, 5)
    kwargs = {"constant_val": np.float32(1.5)} if mode == "constant" else {}
    out = run_mil(lambda x: mb.pad(x=x, pad=[1, 2, 0, 3], mode=mode, **kwargs), "pad", x=x)
    extra = {"constant_values": 1.5} if mode == "constant" else {}
    np.testing.assert_array_equal(out, np.pad(x, [(0, 0), (1, 2), (0, 3)], mode=np_mode, **extra))


@pytest.mark.parametrize(("axis", "batch_dims"), [(0, 0), (1, 0), (-1, 0), (1, 1)])
def test_gather(run_mil, axis, batch_dims):
    x = rand(3, 5, 4)
    indices = np.array([[0, 2, 1], [2, 0, 3], [1, 1, 0]], np.int32)  # (3, 3)
    indices = np.minimum(indices, x.shape[axis] - 1).astype(np.int32)
    out = run_mil(lambda x, i: mb.gather(x=x, indices=i, axis=axis, batch_dims=batch_dims), "gather",
                  x=x, i=indices)
    if batch_dims:
        expected = np.stack([np.take(x[b], indices[b], axis=axis - 1) for b in range(3)])
    else:
        expected = np.take(x, indices, axis=axis)
    np.testing.assert_array_equal(out, expected)


def test_gather_negative_indices_before_ios17(run_mil):
    """iOS15/16 gathers count a negative index from the end."""
    x, indices = rand(5, 3), np.array([-1, 0, -5, 2], np.int32)
    out = run_mil(lambda x, i: mb.gather(x=x, indices=i, axis=0), "gather", opset="iOS16", x=x, i=indices)
    np.testing.assert_array_equal(out, x[[4, 0, 0, 2]])


def test_gather_negative_index_is_out_of_bound_from_ios17(run_mil):
    """iOS17+ reads a negative index as out of bound (undefined on device): refuse, naming the op."""
    x, indices = rand(5, 3), np.array([-1, 0], np.int32)
    with pytest.raises(MilRuntimeError, match=r"gather .*index -1 is out of bound.*iOS17"):
        run_mil(lambda x, i: mb.gather(x=x, indices=i, axis=0), "gather", x=x, i=indices)


def test_gather_along_axis(run_mil):
    x = rand(3, 4)
    indices = np.array([[2, 0, 1, 1], [0, 2, 0, 1]], np.int32)
    out = run_mil(lambda x, i: mb.gather_along_axis(x=x, indices=i, axis=0), "gather_along_axis",
                  x=x, i=indices)
    np.testing.assert_array_equal(out, np.take_along_axis(x, indices, axis=0))


@pytest.mark.parametrize("batch_dims", [0, 1])
def test_gather_nd(run_mil, batch_dims):
    x = rand(2, 3, 4)
    indices = np.array([[[1, 2], [0, 3]], [[2, 0], [1, 1]]] if batch_dims else  # into (3, 4) per batch
                       [[[1, 2], [0, 1]], [[1, 0], [0, 2]]], np.int32)  # into (2, 3)
    out = run_mil(lambda x, i: mb.gather_nd(x=x, indices=i, batch_dims=batch_dims), "gather_nd",
                  x=x, i=indices)
    if batch_dims:
        expected = np.stack([x[b][tuple(indices[b].T)] for b in range(2)])
    else:
        expected = x[tuple(np.moveaxis(indices, -1, 0))]
    np.testing.assert_array_equal(out, expected)


def test_fill_range_cumsum_band_part(run_mil):
    x = rand(4, 4)

    def fn(x):
        ramp = mb.range_1d(start=np.int32(0), end=np.int32(4), step=np.int32(1))  # (4,)
        ones = mb.fill(shape=np.array([4, 4], np.int32), value=np.float32(1.0))
        band = mb.band_part(x=mb.add(x=x, y=ones), lower=np.int32(1), upper=np.int32(0))
        summed = mb.cumsum(x=band, axis=np.int32(0), exclusive=True, reverse=True)
        return mb.add(x=summed, y=mb.cast(x=ramp, dtype="fp32"))

    out = run_mil(fn, "band_part", x=x)
    m, n = np.indices((4, 4))
    band = np.where((m - n <= 1) & (n - m <= 0), x + 1, 0)
    summed = np.flip(np.cumsum(np.flip(band, 0), axis=0), 0) - band
    np.testing.assert_allclose(out, summed + np.arange(4), rtol=1e-6)


def test_states_read_and_update(tmp_path):
    from anefx.mil import load_mlpackage
    from tests.mil.programs import save_program

    def fn(x, s):
        total = mb.add(x=x, y=mb.read_state(input=s))
        return mb.mul(x=mb.coreml_update_state(state=s, value=total), y=np.float16(2.0))

    x = rand(2, 3).astype(np.float16)  # CoreML states are fp16
    path = save_program(fn, {"x": x}, tmp_path / "s.mlpackage", states={"s": np.zeros((2, 3), np.float16)})
    runner = load_mlpackage(path)
    assert runner.state_names == ["s"]
    first, second = runner(x=x), runner(x=x)
    x = x.astype(np.float32)
    np.testing.assert_allclose(next(iter(first.values())), 2 * x, rtol=1e-6)
    np.testing.assert_allclose(next(iter(second.values())), 4 * x, rtol=1e-6)  # the state persisted
    runner.reset_states()
    np.testing.assert_allclose(next(iter(runner(x=x, s=np.ones((2, 3))).values())), 2 * (x + 1), rtol=1e-6)


def test_slice_update(run_mil):
    x, update = rand(2, 6, 4), rand(2, 2, 4, seed=1)
    def fn(x, u):
        return mb.slice_update(x=x, update=u, begin=[0, 1, 0], end=[2, 5, 4], stride=[1, 2, 1])

    out = run_mil(fn, "slice_update", x=x, u=update)
    expected = x.copy()
    expected[:, 1:5:2, :] = update
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("mode", ["update", "add", "mul", "max"])
def test_scatter_family(run_mil, mode):
    data = rand(4, 3)
    ufunc = {"add": np.add, "mul": np.multiply, "max": np.maximum}.get(mode)

    def expect(index, updates):
        out = data.copy()
        if ufunc is None:
            out[index] = updates
        else:
            ufunc.at(out, index, updates)
        return out

    rows, updates = np.array([2, 0], np.int32), rand(2, 3, seed=1)
    out = run_mil(lambda d, i, u: mb.scatter(data=d, indices=i, updates=u, axis=0, mode=mode), "scatter",
                  d=data, i=rows, u=updates)
    np.testing.assert_allclose(out, expect((rows,), updates), rtol=1e-6)
    along = np.array([[3, 0, 1]], np.int32)
    out = run_mil(lambda d, i, u: mb.scatter_along_axis(data=d, indices=i, updates=u, axis=0, mode=mode),
                  "scatter_along_axis", d=data, i=along, u=updates[:1])
    np.testing.assert_allclose(out, expect((along, np.arange(3)[None, :]), updates[:1]), rtol=1e-6)
    points = np.array([[1, 2], [3, 0]], np.int32)
    out = run_mil(lambda d, i, u: mb.scatter_nd(data=d, indices=i, updates=u, mode=mode), "scatter_nd",
                  d=data, i=points, u=updates[0, :2].copy())
    np.testing.assert_allclose(out, expect((points[:, 0], points[:, 1]), updates[0, :2]), rtol=1e-6)


@pytest.mark.parametrize("ascending", [False, True])
def test_topk_and_argsort(run_mil, ascending):
    x = rand(3, 6)
    outs = run_mil(lambda x: mb.topk(x=x, k=2, axis=1, ascending=ascending), "topk", x=x)
    values, indices = outs.values()
    order = np.argsort(x if ascending else -x, axis=1)
    np.testing.assert_array_equal(indices, order[:, :2])
    np.testing.assert_array_equal(values, np.take_along_axis(x, order[:, :2], axis=1))
    out = run_mil(lambda x: mb.argsort(x=x, axis=-1, ascending=ascending), "argsort", x=x)
    np.testing.assert_array_equal(out, order)


def test_one_hot(run_mil):
    ids = np.array([[0, 3], [2, 1]], np.int32)
    out = run_mil(lambda i: mb.one_hot(indices=i, one_hot_vector_size=4, axis=1, on_value=np.float32(2),
                                       off_value=np.float32(-1)), "one_hot", i=ids)
    expected = np.moveaxis(np.where(np.eye(4)[ids] > 0, 2.0, -1.0), -1, 1)
    np.testing.assert_array_equal(out, expected)
