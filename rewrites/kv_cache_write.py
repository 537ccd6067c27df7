"""kv_cache_write: a cache write at consecutive positions becomes one slice write at the first position.

Before (an HF StaticCache update as torch.export records it; p is the position input, S new tokens)::

    index = aten.add(arange(S), p)                                       # arange(S): a folded constant
    k_new = aten.index_copy(k_cache, 2, index, k)                        # (1, H_kv, T, d), a buffer mutation

After::

    k_new = anefx.slice_write(k_cache, k, 2, p)                          # MIL slice_update, begin = p

Why: coremltools has no lowering of `index_copy`; its general form is a MIL scatter, a data-dependent write
that is not a Neural Engine layer. A write of S consecutive positions is a `slice_update` at a begin given
by the input, the form Apple's stateful models use to update a KV cache held as CoreML state in place.

Refuses (the write stays an index_copy, which lowers to a MIL scatter): an index that is not provably
arange(S) + p with p one integer (positions given as a tensor, a stride, an offset that is not one number).
"""

from __future__ import annotations

import torch
import torch.fx as fx

import anefx.ops  # noqa: F401 - defines torch.ops.anefx.slice_write
from anefx.graph import add_constant, constant_value, emit, is_constant, module_path, shape
from anefx.rule import Context, Refusal, Rule

aten = torch.ops.aten
ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step)
UNIT_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.squeeze.dims,
              aten.squeeze.dim, aten.squeeze.default, aten.unsqueeze.default, aten.clone.default)


def integer_values(node, ep) -> torch.Tensor | None:
    """The values of a constant integer tensor (a lifted constant or an arange with literal bounds), or None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in ARANGES and all(isinstance(a, int) for a in node.args):
        return torch.arange(*node.args)
    value = constant_value(node, ep) if node.op == "placeholder" else None
    return value if value is not None and not value.is_floating_point() else None


def write_start(index: fx.Node, length: int, ctx: Context) -> tuple[fx.Node | int | None, str]:
    """(start, '') when index = arange(length) + start with start one integer (a node, or an int when the
    whole index is constant), else (None, why not)."""
    constant = integer_values(index, ctx.ep)
    if constant is not None:
        first = int(constant.reshape(-1)[0]) if constant.numel() else 0
        if torch.equal(constant.reshape(-1), torch.arange(first, first + length)):
            return first, ""
        return None, "the written positions are constant but not consecutive"
    if index.target is not aten.add.Tensor or index.kwargs.get("alpha", 1) != 1 or len(shape(index)) != 1:
        return None, f"the written positions come from a {getattr(index.target, '__name__', index.op)} op"
    for ramp, offset in (index.args, index.args[::-1]):
        values = integer_values(ramp, ctx.ep)
        if values is None or not torch.equal(values.reshape(-1), torch.arange(length)):
            continue
        if isinstance(offset, fx.Node) and not is_constant(offset, ctx.ep) and offset.meta["val"].numel() == 1 \
                and not offset.meta["val"].is_floating_point():
            return offset, ""
        return None, "the offset added to arange(S) is not one integer"
    return None, "the written positions are not arange(S) + an offset"


def as_vector(start: fx.Node) -> fx.Node:
    """The (1,)-shaped tensor a one-element start is a view of, when there is one (the position input itself:
    MIL's slice_update takes its begin as a vector, and a 0-d start would be reshaped back)."""
    node = start
    while node.target in UNIT_VIEWS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        if shape(node) == (1,):
            return node
    return start


def check(node: fx.Node, ctx: Context) -> str | None:
    _, dim, index, source = node.args
    if not isinstance(index, fx.Node) or len(shape(index)) != 1 or shape(index)[0] != shape(source)[dim]:
        return "the index is not one position per written row"
    return write_start(index, shape(index)[0], ctx)[1] or None


def run(ctx: Context) -> tuple[int, list[Refusal]]:
    written, refusals = 0, []
    for node in list(ctx.graph.nodes):
        if node.op != "call_function" or node.target is not aten.index_copy.default:
            continue
        reason = check(node, ctx)
        if reason:
            refusals.append(Refusal(module_path(node) or node.name, node.name,
                                    f"{reason}; the cache write stays a scatter (slower, not on the Neural Engine)"
                                    ": write consecutive positions, index = torch.arange(S) + position"))
            continue
        cache, dim, index, source = node.args
        start = write_start(index, shape(index)[0], ctx)[0]
        with ctx.graph.inserting_before(node):
            start = add_constant(ctx.ep, "write_start", torch.tensor([start])) if isinstance(start, int) \
                else as_vector(start)
            new = emit(ctx.graph, torch.ops.anefx.slice_write.default, (cache, source, dim % len(shape(cache)), start),
                       origin=node, rule=ctx.rule)
        node.replace_all_uses_with(new)
        ctx.graph.erase_node(node)
        written += 1
    return written, refusals


RULE = Rule(
    name="kv_cache_write",
    summary="a cache write at consecutive positions (index_copy at arange(S) + p) → one slice_update at p",
    run=run,
    ane=False,  # a slice_update is the right write on every compute unit
)
