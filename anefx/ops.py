"""anefx's custom ops: a torch reference implementation, a fake kernel, and a coremltools converter.

`anefx::layer_norm(x, axis, weight, bias, eps)` normalises over one axis of x and lowers to a single
MIL `layer_norm(axes=[axis], gamma, beta)`; coremltools fuses a hand-written norm over a non-last
axis only in one exact form, so the rules emit this op instead.

`anefx::output_copy(x)` is a copy of x that lowers to a MIL `identity`. Lowering puts it on an input the
model returns as an output: coremltools treats `clone` as no op and would rename the input itself.
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


def _register_converters() -> None:
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

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


_register_converters()
