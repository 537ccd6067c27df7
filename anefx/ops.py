"""anefx's custom ops: a torch reference implementation, a fake kernel, and a coremltools converter.

`anefx::layer_norm(x, axis, weight, bias, eps)` normalises over one axis of x and lowers to a single
MIL `layer_norm(axes=[axis], gamma, beta)`; coremltools fuses a hand-written norm over a non-last
axis only in one exact form, so the rules emit this op instead.

`anefx::output_copy(x)` is a copy of x that lowers to a MIL `identity`. Lowering puts it on an input the
model returns as an output: coremltools treats `clone` as no op and would rename the input itself.

`anefx::slice_write(x, update, axis, start)` is x with the block of update's shape at `start` along `axis`
(at 0 on the other axes) replaced by `update`, and lowers to one MIL `slice_update` with begin = start: a KV
cache write at consecutive positions (rewrites/kv_cache_write.py), in place on a CoreML state. `start` is a
one-element integer tensor (a program input, e.g. the position of the first new token).

coremltools gets a converter for aten `index_copy` as well (MIL `scatter` along the axis, mode update), so
a write at positions the rule cannot prove consecutive still lowers, correctly if slower.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("anefx::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, axis: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    axis = axis % x.dim()
    moved = x.movedim(axis, -1)
    y = torch.nn.functional.layer_norm(moved, (moved.shape[-1],), weight, bias, eps)
    return y.movedim(-1, axis).contiguous()


@layer_norm.register_fake
def _(x, axis, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)  # as the kernel: contiguous


@torch.library.custom_op("anefx::output_copy", mutates_args=())
def output_copy(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@output_copy.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("anefx::slice_write", mutates_args=())
def slice_write(x: torch.Tensor, update: torch.Tensor, axis: int, start: torch.Tensor) -> torch.Tensor:
    begin = int(start.reshape(-1)[0])
    axis = axis % x.dim()
    if begin < 0 or begin + update.shape[axis] > x.shape[axis]:
        raise IndexError(f"slice_write: positions {begin}..{begin + update.shape[axis] - 1} are outside axis "
                         f"{axis} of size {x.shape[axis]}")
    region = [slice(0, n) for n in update.shape]
    region[axis] = slice(begin, begin + update.shape[axis])
    out = x.clone()
    out[tuple(region)] = update
    return out


@slice_write.register_fake
def _(x, update, axis, start):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _register_converters() -> None:
    import logging

    import numpy as np

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op
    from coremltools.converters.mil.mil import types

    @register_torch_op(torch_alias=["anefx::layer_norm"])
    def anefx_layer_norm(context, node):
        x, axis, weight, bias, eps = _get_inputs(context, node, expected=5)
        kwargs = {"x": x, "axes": [int(axis.val)], "epsilon": float(eps.val), "name": node.name}
        if weight is not None:
            kwargs["gamma"] = weight
        if bias is not None:
            kwargs["beta"] = bias
        context.add(mb.layer_norm(**kwargs))

    @register_torch_op(torch_alias=["anefx::output_copy"])
    def anefx_output_copy(context, node):
        (x,) = _get_inputs(context, node, expected=1)
        context.add(mb.identity(x=x, name=node.name))

    @register_torch_op(torch_alias=["anefx::slice_write"])
    def anefx_slice_write(context, node):
        x, update, axis, start = _get_inputs(context, node, expected=4)
        axis = int(axis.val) % x.rank
        start = mb.cast(x=start, dtype="int32")
        start = start if start.shape == (1,) else mb.reshape(x=start, shape=[1])
        before, after = np.zeros(axis, dtype=np.int32), np.zeros(x.rank - axis - 1, dtype=np.int32)
        begin = mb.concat(values=[v for v in (before, start, after) if not isinstance(v, np.ndarray) or v.size],
                          axis=0)
        end = mb.add(x=begin, y=np.array(update.shape, dtype=np.int32))
        context.add(mb.slice_update(x=x, update=update, begin=begin, end=end, name=node.name))

    @register_torch_op(override=True)
    def atan2(context, node):
        """atan2 in every quadrant and on the axes, replacing coremltools' lowering (it gives 0 for
        atan2(0, x < 0) where torch gives pi, and shifts |x| < 1e-8 by 2e-8, which flips the quadrant of a
        tiny negative x and underflows in fp16). The angle comes from atan(min/max) of the magnitudes, which
        never divides by zero and stays in [0, 1] for fp16, then is reflected into its quadrant."""
        y, x = _get_inputs(context, node, expected=2)
        y, x = (v if types.is_float(v.dtype) else mb.cast(x=v, dtype="fp32") for v in (y, x))
        ay, ax = mb.abs(x=y), mb.abs(x=x)
        high, low = mb.maximum(x=ay, y=ax), mb.minimum(x=ay, y=ax)
        zero = mb.equal(x=high, y=0.0)
        ratio = mb.select(cond=zero, a=0.0, b=mb.real_div(x=low, y=mb.select(cond=zero, a=1.0, b=high)))
        angle = mb.atan(x=ratio)
        angle = mb.select(cond=mb.greater(x=ay, y=ax), a=mb.sub(x=np.pi / 2, y=angle), b=angle)
        angle = mb.select(cond=mb.less(x=x, y=0.0), a=mb.sub(x=np.pi, y=angle), b=angle)
        context.add(mb.select(cond=mb.less(x=y, y=0.0), a=mb.mul(x=angle, y=-1.0), b=angle, name=node.name))

    if _TORCH_OPS_REGISTRY.get_func("index_copy") is None:  # coremltools 9 has none
        @register_torch_op(torch_alias=["index_copy"])
        def anefx_index_copy(context, node):
            x, dim, index, source = _get_inputs(context, node, expected=4)
            index = mb.cast(x=index, dtype="int32")
            context.add(mb.scatter(data=x, indices=index, updates=source, axis=int(dim.val), mode="update",
                                   name=node.name))


_register_converters()
