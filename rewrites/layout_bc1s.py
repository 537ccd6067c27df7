"""layout_bc1s: the network body runs in (B, C, 1, S); conversions only at its entry and exit.

Before (a residual block after the projection and norm rules; every conv is wrapped in layout ops)::

    h  = aten.permute(aten.squeeze(conv(…), [2]), [0, 2, 1])        # (B, S, C)
    y  = aten.add(x, h)                                             # residual, (B, S, C)
    g  = aten.gelu(y)
    z  = conv(aten.unsqueeze(aten.permute(g, [0, 2, 1]), 2))         # (B, C', 1, S)

After::

    y4 = aten.add(x4, conv(…))                                      # (B, C, 1, S)
    g4 = aten.gelu(y4)
    z  = conv(g4)

Every elementwise op, residual add, activation, cast, channel concat/slice/split, reduction and
softmax whose input is (B, S, C) is rewritten on the (B, C, 1, S) form by remapping its axes
(S → 3, C → 1); broadcast operands (biases, position tables, scalars) are moved to the same layout,
which coremltools folds because they are constants. A tensor joins the body when one of its inputs
is already in it, or when every consumer wants (B, C, 1, S) and at most one input has to be
converted; what stays outside (embeddings, graph outputs, ops with no mapping) gets one conversion.
Finally, chains of layout ops that compose to nothing, or to less, are shortened.

Why: (B, C, 1, S) is the ANE's native data format (the 1×1 convolutions and channel norms already
read and write it); every transpose/reshape between them is a memory copy, and in (B, S, C) the
small channel axis is last, where the ANE pads rows to 64 bytes.

Refuses (stays in (B, S, C), reported): reductions without keepdim, and ops whose other operands
cannot be moved (rank above 3).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from anefx.graph import emit, is_constant, shape
from anefx.layout import BC1S, from_bc1s, is_layout_op, simplify_layout_chains, to_physical
from anefx.rule import Context, Refusal, Rule

aten = torch.ops.aten
ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
    aten.exp.default, aten.sqrt.default, aten.rsqrt.default, aten.erf.default, aten.abs.default,
    aten.pow.Tensor_Scalar, aten.clone.default, aten._to_copy.default, aten.where.self,
    aten.maximum.default, aten.minimum.default, aten.hardtanh.default, aten.leaky_relu.default,
    aten.log.default, aten.sin.default, aten.cos.default, aten.add.Scalar, aten.mul.Scalar,
    aten.softplus.default, aten.alias.default,
}
DIM_OPS = {aten.cat.default, aten.slice.Tensor, aten._softmax.default, aten.softmax.int,
           aten.split.Tensor, aten.split_with_sizes.default, aten.mean.dim, aten.sum.dim_IntList,
           aten.amax.default}
TUPLE_OPS = {aten.split.Tensor, aten.split_with_sizes.default}


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def _is_rank3(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, list | tuple):
        return bool(val) and all(isinstance(v, torch.Tensor) and v.dim() == 3 for v in val)
    return isinstance(val, torch.Tensor) and val.dim() == 3


def refusal(node: fx.Node, ctx: Context) -> str | None:
    """Why this rank-3 op cannot run in (B, C, 1, S); None when it can."""
    target = node.target
    if node.op != "call_function" or not _is_rank3(node):
        return "not a (B, S, C) op"
    if target is operator.getitem:
        return None if node.args[0].target in TUPLE_OPS else "not a (B, S, C) op"
    if target is aten.embedding.default:
        return _embedding_refusal(node, ctx)
    if target not in ELEMENTWISE and target not in DIM_OPS:
        return "no (B, C, 1, S) mapping"
    if target in (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default):
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if not keepdim:
            return f"{target.__name__} without keepdim changes the rank"
    if target is aten._to_copy.default and set(node.kwargs) - {"dtype", "memory_format"}:
        return "a copy that changes more than the dtype"
    for arg in _tensor_inputs(node):
        if len(shape(arg)) > 3 and not isinstance(arg.meta.get("val"), list | tuple):
            return f"operand {arg.name} has rank {len(shape(arg))}"
    return None


def _embedding_refusal(node: fx.Node, ctx: Context) -> str | None:
    """An embedding gathers straight into (B, C, 1, S) from its transposed table, when that table
    is a constant used nowhere else (a tied table would be stored twice) and the batch is 1."""
    weight, ids = node.args[0], node.args[1]
    if not is_constant(weight, ctx.ep) or len(weight.users) != 1:
        return "embedding table shared with another op (tied weights): gathered in (B, S, C)"
    if len(shape(ids)) != 2 or shape(ids)[0] != 1:
        return "embedding with batch ≠ 1: gathered in (B, S, C)"
    return None


def _from_conv(node: fx.Node) -> bool:
    """node reads a (B, C, 1, S) tensor as (B, S, C) through layout ops (permute(squeeze(x4, [2]), [0, 2, 1]),
    or squeezes and unsqueezes when S = 1): a free entry."""
    if not is_layout_op(node) or len(shape(node)) != 3:
        return False
    sq = node.args[0]
    if (node.target is aten.permute.default and list(node.args[1]) == [0, 2, 1] and isinstance(sq, fx.Node)
            and sq.target in (aten.squeeze.dims, aten.squeeze.dim) and len(shape(sq.args[0])) == 4
            and shape(sq.args[0])[2] == 1):
        return True
    chain, source = [node], node.args[0]
    while is_layout_op(source):
        chain.append(source)
        source = source.args[0]
    if not isinstance(source, fx.Node) or len(shape(source)) != 4 or shape(source)[2] != 1:
        return False
    return _replays_as(chain[::-1], source, lambda x: x.squeeze(2).permute(0, 2, 1))


def _wants_bc1s(user: fx.Node, body: set[fx.Node]) -> bool:
    """A consumer that reads (B, C, 1, S): in the body, or the layout ops before a conv."""
    if user in body:
        return True
    if (user.target is aten.permute.default and list(user.args[1]) == [0, 2, 1]
            and all(u.target is aten.unsqueeze.default and u.args[1] == 2 for u in user.users)):
        return True
    return _into_bc1s(user)


def _into_bc1s(user: fx.Node) -> bool:
    """user starts a chain of layout ops that turns its (B, S, C) input into (B, C, 1, S) (the unit-axis
    squeezes and unsqueezes a conversion becomes when S = 1)."""
    source = user.args[0] if is_layout_op(user) else None
    if not isinstance(source, fx.Node) or len(shape(source)) != 3:
        return False
    b, s, c = shape(source)
    chain = [user]
    while shape(chain[-1]) != (b, c, 1, s) and len(chain[-1].users) == 1 and is_layout_op(next(iter(chain[-1].users))):
        chain.append(next(iter(chain[-1].users)))
    return shape(chain[-1]) == (b, c, 1, s) and _replays_as(chain, source, lambda x: x.permute(0, 2, 1).unsqueeze(2))


def _replays_as(chain: list[fx.Node], source: fx.Node, conversion) -> bool:
    """Whether the layout ops of `chain` move the elements of `source` as `conversion` does."""
    index = torch.arange(int(torch.tensor(shape(source)).prod())).view(shape(source))
    value = index
    try:
        for node in chain:
            target = aten.reshape.default if node.target in (aten.view.default, aten._unsafe_view.default) \
                else node.target
            value = target(value, *node.args[1:], **node.kwargs)
    except (RuntimeError, TypeError, IndexError):
        return False
    expected = conversion(index)
    return value.shape == expected.shape and torch.equal(value, expected)


def assign(graph: fx.Graph, ctx: Context) -> tuple[list[fx.Node], list[Refusal]]:
    """The body, in graph order, and the refusals of rank-3 ops that have to stay outside."""
    candidates = {n for n in graph.nodes if refusal(n, ctx) is None}
    body: set[fx.Node] = set()
    changed = True
    while changed:
        changed = False
        for node in graph.nodes:  # forward: an input already in the body, or a conv's output
            if node in candidates and node not in body and any(
                    a in body or _from_conv(a) for a in _tensor_inputs(node)):
                body.add(node)
                changed = True
        for node in reversed(graph.nodes):  # backward: every consumer wants (B, C, 1, S)
            if node not in candidates or node in body or not node.users:
                continue
            if node.target is operator.getitem:
                continue
            outside = [a for a in _tensor_inputs(node) if a not in body and a not in candidates
                       and not _from_conv(a) and not is_constant(a, ctx.ep)
                       and node.target is not aten.embedding.default]  # indices need no conversion
            if len(outside) <= 1 and all(_wants_bc1s(u, body) for u in node.users):
                body.add(node)
                changed = True
        for node in list(body):  # a split's pieces follow the split
            if node.target in TUPLE_OPS:
                for user in node.users:
                    if user not in body:
                        body.add(user)
                        changed = True
    quiet = (None, "no (B, C, 1, S) mapping", "not a (B, S, C) op")
    refusals = [Refusal(_where(n), n.name, reason) for n in graph.nodes
                if n.op == "call_function" and _is_rank3(n) and (reason := refusal(n, ctx)) not in quiet]
    return [n for n in graph.nodes if n in body], refusals


def _where(node: fx.Node) -> str:
    from anefx.graph import module_path

    return module_path(node) or node.name


def run(ctx: Context) -> tuple[int, list[Refusal]]:
    graph = ctx.graph
    body, refusals = assign(graph, ctx)
    physical: dict[fx.Node, fx.Node] = {}
    converted: dict[fx.Node, fx.Node] = {}

    def operand(arg, origin):
        if not isinstance(arg, fx.Node):
            return arg
        if arg in physical:
            return physical[arg]
        if arg not in converted:
            with graph.inserting_before(_after(arg)):
                converted[arg] = to_physical(graph, arg, BC1S, origin=origin, rule=ctx.rule)
        return converted[arg]

    for node in body:
        with graph.inserting_before(node):
            physical[node] = _rewrite(node, operand, graph, ctx.rule)
    body_set = set(body)
    for node in body:
        outside = [u for u in node.users if u not in body_set]
        if not outside:
            continue
        with graph.inserting_before(_after(physical[node])):
            back = from_bc1s(graph, physical[node], origin=node, rule=ctx.rule)
        for user in outside:
            user.replace_input_with(node, back)
    graph.eliminate_dead_code()
    sunk = sink_channels_last(ctx)
    shortened = simplify_layout_chains(graph, ctx.rule)  # also between ops with no body in between
    return len(body) + sunk + shortened, refusals


CHANNELS_LAST = [0, 2, 3, 1]  # (B, C, H, W) → (B, H, W, C)
FROM_CHANNELS_LAST = [0, 3, 1, 2]


def _channels_last_source(arg) -> fx.Node | None:
    """x when arg = permute(x, [0, 2, 3, 1]) read only by one op: that op can run on x instead."""
    if (isinstance(arg, fx.Node) and arg.target is aten.permute.default and list(arg.args[1]) == CHANNELS_LAST
            and len(arg.users) == 1):
        return arg.args[0]
    return None


def _sinkable(node: fx.Node, ctx: Context) -> bool:
    """An elementwise op on channels-last permutes of (B, C, H, W) tensors and constants (γ, scalars)."""
    if node.op != "call_function" or node.target not in ELEMENTWISE or node.target is aten._to_copy.default:
        return False
    if not isinstance(node.meta.get("val"), torch.Tensor) or node.meta["val"].dim() != 4:
        return False
    inputs = node.all_input_nodes
    permuted = [a for a in inputs if _channels_last_source(a) is not None]
    return bool(permuted) and all(a in permuted or (is_constant(a, ctx.ep) and len(shape(a)) <= 4)
                                  for a in inputs)


def sink_channels_last(ctx: Context) -> int:
    """Channels-last elementwise ops (ConvNeXt's GELU and γ scale between its 1×1 convolutions) run on the
    (B, C, H, W) tensors the permutes came from; the permute moves after them and cancels with the next."""
    graph, sunk = ctx.graph, 0
    for node in list(graph.nodes):
        if node._erased or not _sinkable(node, ctx):
            continue

        def operand(arg, node=node):
            if not isinstance(arg, fx.Node):
                return arg
            source = _channels_last_source(arg)
            if source is not None:
                return source
            if len(shape(arg)) == 0:
                return arg
            aligned = arg if len(shape(arg)) == 4 else \
                emit(graph, aten.view.default, (arg, [1] * (4 - len(shape(arg))) + list(shape(arg))),
                     origin=node, rule=ctx.rule)
            return emit(graph, aten.permute.default, (aligned, FROM_CHANNELS_LAST), origin=node, rule=ctx.rule)

        with graph.inserting_before(node):
            kwargs = {k: v for k, v in node.kwargs.items() if k != "memory_format"}
            moved = emit(graph, node.target, tuple(operand(a) for a in node.args), kwargs, origin=node,
                         rule=ctx.rule)
            back = emit(graph, aten.permute.default, (moved, CHANNELS_LAST), origin=node, rule=ctx.rule)
        node.replace_all_uses_with(back)
        graph.erase_node(node)
        sunk += 1
    graph.eliminate_dead_code()
    return sunk


def _after(node: fx.Node) -> fx.Node:
    """The node before which to insert so that new nodes follow `node` (and all placeholders)."""
    nxt = node.next
    while nxt.op == "placeholder":
        nxt = nxt.next
    return nxt


def _rewrite(node: fx.Node, operand, graph: fx.Graph, rule: str) -> fx.Node:
    target = node.target

    def emit_(t, *args, **kwargs):
        return emit(graph, t, args, kwargs, origin=node, rule=rule)

    if target is operator.getitem:
        return emit_(operator.getitem, operand(node.args[0], node), node.args[1])
    if target is aten.embedding.default:  # rows of the table are columns of its transpose
        table = emit_(aten.permute.default, node.args[0], [1, 0])  # (C, V), folded by coremltools
        rows = emit_(aten.index_select.default, table, 1, emit_(aten.squeeze.dims, node.args[1], [0]))  # (C, S)
        return emit_(aten.unsqueeze.default, emit_(aten.unsqueeze.default, rows, 0), 2)  # (1, C, 1, S)
    if target is aten.cat.default:
        parts = [operand(p, node) for p in node.args[0]]
        return emit_(aten.cat.default, parts, BC1S.dim(node.args[1] if len(node.args) > 1 else 0))
    if target in DIM_OPS:
        x = operand(node.args[0], node)
        dim = node.args[1]
        new_dim = [BC1S.dim(d) for d in dim] if isinstance(dim, list | tuple) else BC1S.dim(dim)
        if target in TUPLE_OPS:  # split(x, sizes, dim): the sizes stay, the dim moves
            return emit_(target, x, node.args[1], BC1S.dim(node.args[2] if len(node.args) > 2 else 0))
        return emit_(target, x, new_dim, *node.args[2:], **node.kwargs)
    kwargs = {k: v for k, v in node.kwargs.items() if k != "memory_format"}
    return emit_(target, *[operand(a, node) for a in node.args], **kwargs)


RULE = Rule(
    name="layout_bc1s",
    summary="the body runs in (B, C, 1, S): elementwise ops, residuals, norms' neighbours, slices, "
            "concats remapped; conversions only at entry and exit",
    run=run,
)
