"""A program's graph read as the MIL program coremltools' torch frontend builds from it (for the layout cost).

Constants are folded, identities (clone, same-dtype casts, full slices, identity permutes, same-shape views) are
dropped, `repeat_interleave` is the tile + reshape + transpose + reshape its converter emits; every other op is
classed by how coremltools' layout passes treat it (anefx.layout_passes replays them).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from anefx.graph import is_constant

aten = torch.ops.aten
TRANSPOSES = {aten.permute.default, aten.transpose.int, aten.t.default}
RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
IDENTITIES = {aten.clone.default, aten.alias.default, aten.contiguous.default, aten.detach.default,
              aten.lift_fresh_copy.default}
UNARY = {aten.relu.default, aten.gelu.default, aten.tanh.default, aten.sigmoid.default, aten.exp.default,
         aten.log.default, aten.sqrt.default, aten.rsqrt.default, aten.abs.default, aten.erf.default, aten.sin.default,
         aten.cos.default, aten.clamp.default, aten.hardtanh.default, aten.leaky_relu.default, aten.elu.default,
         aten.softplus.default, aten.pow.Tensor_Scalar, aten.floor.default, aten.ceil.default, aten.sign.default}
BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default,
          aten.minimum.default, aten.neg.default}
REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
MATMULS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}  # baddbmm: matmul + add


@dataclass(eq=False)
class Op:
    """One MIL operation of the predicted program. `kind`: input, output, transpose, reshape, squeeze (and
    expand_dims), cast, unary (and split outputs), binary, concat, split, reduce, matmul or other; `consts`:
    shapes of a binary op's constant operands."""

    kind: str
    inputs: list[Op]
    shape: tuple[int, ...] | None
    perm: tuple[int, ...] = ()
    consts: list[tuple[int, ...]] = field(default_factory=list)
    key: tuple = ()  # what else makes two ops of one kind and operands the same op (target, literal arguments)


# -- the MIL program the torch frontend builds ---------------------------------------------------------------
def program(ep) -> list[Op]:
    """The MIL program coremltools' torch frontend builds from `ep`, before its passes."""
    ops: list[Op] = []
    env: dict[fx.Node, Op] = {}
    memo: dict = {}
    constants = {n for n in ep.graph_module.graph.nodes if is_constant(n, ep, memo)}
    for node in ep.graph_module.graph.nodes:
        if node in constants:
            continue
        if node.op == "placeholder":
            env[node] = _append(ops, Op("input", [], _shape(node)))
        elif node.op == "output":
            for value in dict.fromkeys(a for a in node.args[0] if isinstance(a, fx.Node) and a in env):
                _append(ops, Op("output", [env[value]], None))
        elif node.op == "call_function":
            env[node] = _lowered(node, env, constants, ops)
    return ops


def _lowered(node: fx.Node, env: dict, constants: set, ops: list[Op]) -> Op:
    """The Op a call lowers to (appended to ops), or the Op it is an identity of."""
    args = [env[a] for a in node.all_input_nodes if a not in constants and a in env]
    source = env.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    target, out = node.target, _shape(node)
    if source is not None and _is_identity(node, source):
        return source
    if target in TRANSPOSES:
        return _append(ops, Op("transpose", [source], out, _perm(node)))
    if target in RESHAPES:
        return _append(ops, Op("reshape", [source], out, key=(out,)))
    if target is aten.repeat_interleave.self_int:
        return _repeat_interleave(node, source, ops)
    kind = _kind(node)
    operands = [source] if kind in ("unary", "cast") else args  # a cast reads x (type_as: not `other`)
    op = Op(kind, operands, out, key=(str(target), _literals(node, constants)))
    if kind == "binary":
        op.consts = [() if not isinstance(a, fx.Node) else _shape(a) for a in node.args[:2]
                     if not isinstance(a, fx.Node) or a in constants]
    return _append(ops, op)


def _literals(node: fx.Node, constants: set) -> str:
    """The arguments that are not operands: values, and constants by name (two projections differ by weight)."""
    def show(a):
        return ("·" if a not in constants else a.name) if isinstance(a, fx.Node) else a

    return repr(torch.utils._pytree.tree_map(show, (node.args, node.kwargs)))


def _kind(node: fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "unary"  # one output of a split (or of any multi-output op): passes what it reads
    if target in UNARY and isinstance(node.args[0], fx.Node):
        return "unary"
    if target in BINARY:
        return "binary"
    if target is aten.cat.default:
        return "concat"
    if target in SPLITS:
        return "split"
    if target in REDUCTIONS and len(node.args) > 2 and node.args[2]:
        return "reduce"
    if target in MATMULS:
        return "matmul"
    if target in (aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default):
        return "squeeze"
    if target in (aten._to_copy.default, aten.type_as.default):
        return "cast"
    return "other"


def _is_identity(node: fx.Node, source: Op) -> bool:
    target, out = node.target, _shape(node)
    if target in IDENTITIES or (target is aten._to_copy.default and set(node.kwargs) <= {"dtype"}
                                and node.kwargs.get("dtype") in (None, node.args[0].meta["val"].dtype)):
        return True
    if target is aten.type_as.default:  # a cast to the dtype of another tensor, which is not read
        return node.meta["val"].dtype == node.args[0].meta["val"].dtype
    if target in TRANSPOSES:
        return _perm(node) == tuple(range(len(_perm(node))))
    if target in RESHAPES or target is aten.expand.default:
        return out == source.shape
    if target is aten.slice.Tensor:
        return out == source.shape
    return False


def _repeat_interleave(node: fx.Node, source: Op, ops: list[Op]) -> Op:
    """coremltools' converter: [reshape to 1-D] [transpose dim to 0] tile, reshape, transpose, reshape
    [transpose back]."""
    repeats, dim = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    x = source
    if dim is None:
        x = _append(ops, Op("reshape", [x], (-1,)))
    if repeats == 1:
        return x
    rank = len(x.shape)
    dim = 0 if dim is None else dim % rank
    if dim:
        x = _append(ops, Op("transpose", [x], None, (dim, *[i for i in range(rank) if i != dim])))
    x = _append(ops, Op("other", [x], None))  # tile
    x = _append(ops, Op("reshape", [x], None))
    x = _append(ops, Op("transpose", [x], None, (1, 0, *range(2, rank + 1))))
    x = _append(ops, Op("reshape", [x], _shape(node) if not dim else None))
    if dim:
        back = (dim, *[i for i in range(rank) if i != dim])
        x = _append(ops, Op("transpose", [x], _shape(node), tuple(back.index(i) for i in range(rank))))
    return x


def _perm(node: fx.Node) -> tuple[int, ...]:
    rank = len(node.args[0].meta["val"].shape)
    if node.target is aten.permute.default:
        return tuple(d % rank for d in node.args[1])
    if node.target is aten.t.default:
        return (1, 0) if rank == 2 else tuple(range(rank))
    perm = list(range(rank))
    a, b = node.args[1] % rank, node.args[2] % rank
    perm[a], perm[b] = perm[b], perm[a]
    return tuple(perm)


def _shape(node) -> tuple[int, ...] | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(d) for d in value.shape) if isinstance(value, torch.Tensor) else None


def _append(ops: list[Op], op: Op) -> Op:
    ops.append(op)
    return op


def users_of(ops: list[Op]) -> dict[Op, list[Op]]:
    users: dict[Op, list[Op]] = defaultdict(list)
    for op in ops:
        for i in op.inputs:
            users[i].append(op)
    return users


def replace_uses(ops: list[Op], old: Op, new: Op) -> None:
    for op in ops:
        op.inputs = [new if i is old else i for i in op.inputs]


def live(ops: list[Op]) -> list[Op]:
    """Dead-code elimination: the ops an output depends on."""
    needed = {id(op) for op in ops if op.kind == "output"}
    for op in reversed(ops):
        if id(op) in needed:
            needed.update(id(i) for i in op.inputs)
    return [op for op in ops if id(op) in needed]

