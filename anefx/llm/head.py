"""The LM head of a rewritten program as pieces no wider than 16384: separate logits outputs, or an argmax.

`split_wide_conv` computes a head wider than the Neural Engine's 16384 channels as pieces joined by a
cat; the cat itself — and the (B, S, vocabulary) logits after it — is still wider. These functions take a
rewritten program whose single user output is those logits and return one without the wide tensor:

    ep, sizes = logits_in_pieces(ep)     # outputs logits_0 .. logits_{k-1}: (B, S, sizes[i]) each
    full = concat_logits(runner(**inputs), sizes)          # the model's logits, (B, S, vocabulary)

    ep = argmax_in_model(ep)             # outputs token (B, S) int32 and token_logit (B, S)

The argmax is torch.argmax's over the whole vocabulary: each piece's first maximum, and across pieces the
first piece holding the largest value (a later piece wins only with a strictly larger logit), so a tie
gives the lowest id. It is computed at every position by default: a padded prefill block's last real
token is not its last position, and the caller picks the row it needs. `positions="last"` computes the
head for the last position only (the head runs on one position instead of S; for a caller that ends
each block at the prompt's end).

A head that is not split (vocabulary ≤ 16384) is one piece. The program passed in is not changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import OutputKind, OutputSpec, TensorArgument
from torch.utils import _pytree as pytree

from anefx.errors import AnefxError
from anefx.graph import add_constant, emit, finish, refresh_meta, shape, snapshot

aten = torch.ops.aten
RULE = "llm_head"  # provenance of the nodes made here
CHAIN_OPS = (aten.squeeze.dims, aten.squeeze.dim, aten.unsqueeze.default, aten.permute.default)
CONV, LINEAR = aten.convolution.default, aten.linear.default
POSITIONS = ("all", "last")


class HeadError(AnefxError):
    """The program's logits are not the LM head these functions can take apart."""


@dataclass
class Head:
    """Where the logits come from: pieces (joined on `axis` by a cat, or one piece) and the layout ops
    from their layout to the output's (B, S, vocabulary)."""

    output: fx.Node
    pieces: list[fx.Node]
    axis: int  # the vocabulary axis of every piece
    chain: list[fx.Node]  # layout ops from the joined pieces to the output, in order

    @property
    def sizes(self) -> list[int]:
        return [shape(p)[self.axis] for p in self.pieces]


def find_head(ep: ExportedProgram) -> Head:
    """The head behind the program's single user output (the logits, vocabulary on the last axis)."""
    specs = ep.graph_signature.output_specs
    users = [i for i, s in enumerate(specs) if s.kind == OutputKind.USER_OUTPUT]
    if len(users) != 1:
        raise HeadError(f"the program has {len(users)} user outputs; the head functions take a program whose one "
                        "user output is the logits (pass the decoder's program before other head changes).")
    output = ep.graph_module.graph.output_node().args[0][users[0]]
    if not isinstance(output, fx.Node) or len(shape(output)) < 2:
        raise HeadError("the program's output is not (…, S, vocabulary) logits; pass an LM's program.")
    chain, node = [], output
    while node.op == "call_function" and node.target in CHAIN_OPS and (node is output or len(node.users) == 1):
        chain.append(node)
        node = node.args[0]
    chain.reverse()
    pieces, axis = ([*node.args[0]], node.args[1] if len(node.args) > 1 else 0) \
        if node.target is aten.cat.default and len(node.users) == 1 else ([node], None)
    rank = len(shape(pieces[0]))
    axis = _source_axis(chain, rank, len(shape(output)) - 1) if axis is None else axis % rank
    if axis is None or _final_axis(chain, rank, axis) != len(shape(output)) - 1:
        raise HeadError("the logits' vocabulary axis is not their last axis after the head's layout ops; the head "
                        "functions take (…, S, vocabulary) logits as HF causal LMs return them.")
    return Head(output, pieces, axis, chain)


def _axis_labels(chain: Sequence[fx.Node], rank: int) -> list[int | None]:
    """For each axis of the chain's result, the axis of its input it comes from (None: inserted)."""
    labels: list[int | None] = list(range(rank))
    for node in chain:
        if node.target is aten.permute.default:
            labels = [labels[d % len(labels)] for d in node.args[1]]
        elif node.target is aten.unsqueeze.default:
            labels.insert(node.args[1] % (len(labels) + 1), None)
        else:
            dims = node.args[1] if isinstance(node.args[1], list | tuple) else [node.args[1]]
            source = shape(node.args[0])
            gone = {d % len(labels) for d in dims if source[d % len(labels)] == 1}
            labels = [a for i, a in enumerate(labels) if i not in gone]
    return labels


def _final_axis(chain: Sequence[fx.Node], rank: int, axis: int) -> int | None:
    labels = _axis_labels(chain, rank)
    return labels.index(axis) if axis in labels else None


def _source_axis(chain: Sequence[fx.Node], rank: int, final: int) -> int | None:
    return _axis_labels(chain, rank)[final]


def logits_in_pieces(ep: ExportedProgram) -> tuple[ExportedProgram, list[int]]:
    """A copy of `ep` whose logits are the head's pieces, outputs `logits_0..`, each (…, S, sizes[i]),
    and the sizes (concatenated on the last axis they are the logits: `concat_logits`)."""
    ep = snapshot(ep)
    head = find_head(ep)
    graph = ep.graph_module.graph
    outputs = []
    with graph.inserting_before(head.output):
        for piece in head.pieces:
            outputs.append(_replay(head.chain, piece, graph))
    _set_user_outputs(ep, outputs, [f"logits_{i}" for i in range(len(outputs))])
    return ep, head.sizes


def concat_logits(outputs: Mapping[str, np.ndarray], sizes: Sequence[int]) -> np.ndarray:
    """The full logits from a run's `logits_0..` outputs (a `logits` output is returned as it is)."""
    if "logits" in outputs:
        return np.asarray(outputs["logits"])
    pieces = [np.asarray(outputs[f"logits_{i}"]) for i in range(len(sizes))]
    for i, (piece, size) in enumerate(zip(pieces, sizes, strict=True)):
        if piece.shape[-1] != size:
            raise HeadError(f"logits_{i} has {piece.shape[-1]} entries on its last axis, the head's piece {size}; "
                            "pass the sizes logits_in_pieces returned for this program.")
    return np.concatenate(pieces, axis=-1)


def _replay(chain: Sequence[fx.Node], node: fx.Node, graph: fx.Graph) -> fx.Node:
    """The chain's layout ops applied to `node` (a piece, or a reduction of one with keepdim)."""
    for op in chain:
        node = emit(graph, op.target, (node, *op.args[1:]), dict(op.kwargs), origin=op, rule=RULE)
    return node


def _set_user_outputs(ep: ExportedProgram, nodes: list[fx.Node], names: list[str]) -> None:
    """Replace the one user output by `nodes`, named `names` (what lowering calls the outputs)."""
    graph = ep.graph_module.graph
    for node, name in zip(nodes, names, strict=True):
        taken = next((n for n in graph.nodes if n.name == name and n is not node), None)
        if taken is not None:
            taken._rename(f"{name}_before_head")
        node._rename(name)
    output = graph.output_node()
    specs = ep.graph_signature.output_specs
    index = next(i for i, s in enumerate(specs) if s.kind == OutputKind.USER_OUTPUT)
    values = list(output.args[0])
    output.args = (tuple(values[:index] + nodes + values[index + 1:]),)
    specs[index:index + 1] = [OutputSpec(kind=OutputKind.USER_OUTPUT, arg=TensorArgument(name=n.name), target=None)
                              for n in nodes]
    signature = ep.module_call_graph[0].signature
    if signature is not None:
        signature.outputs = [TensorArgument(name=n.name) for n in nodes]
        signature.out_spec = pytree.tree_structure(tuple(nodes))
    finish(ep)


def argmax_in_model(ep: ExportedProgram, positions: str = "all") -> ExportedProgram:
    """A copy of `ep` whose outputs are `token` (…, S) int32 — torch.argmax of the logits over the whole
    vocabulary, the lowest id on ties — and `token_logit` (…, S), that logit. `positions="last"`: the
    last position only (…, 1), the head computed for it alone."""
    if positions not in POSITIONS:
        raise HeadError(f"positions={positions!r} is not one of {', '.join(POSITIONS)}.")
    ep = snapshot(ep)
    head = find_head(ep)
    graph = ep.graph_module.graph
    if positions == "last":
        _last_position(head, graph)
    with graph.inserting_before(head.output):
        best_id, best = _argmax_over_pieces(ep, head)
        token = _squeezed(head, best_id, graph)
        logit = _squeezed(head, best, graph)
    _set_user_outputs(ep, [token, logit], ["token", "token_logit"])
    return ep


def _argmax_over_pieces(ep: ExportedProgram, head: Head) -> tuple[fx.Node, fx.Node]:
    """(id, logit) of the first largest logit, reduced with keepdim on the pieces' vocabulary axis.

    MIL's reduce_argmax does not say which index it returns on a tie, so each piece's first maximum is
    the smallest index holding its maximum: min(where(piece == max, index, vocabulary))."""
    graph = ep.graph_module.graph

    def op(target, *args):
        return emit(graph, target, args, origin=head.output, rule=RULE)

    rank, vocabulary = len(shape(head.pieces[0])), sum(head.sizes)
    outside = add_constant(ep, "vocabulary_size", torch.tensor(vocabulary, dtype=torch.int32))
    best_id = best = None
    start = 0
    for piece, size in zip(head.pieces, head.sizes, strict=True):
        column = [1] * rank
        column[head.axis] = size
        ids = add_constant(ep, "vocabulary_ids", torch.arange(start, start + size, dtype=torch.int32).view(column))
        value = op(aten.amax.default, piece, [head.axis], True)
        index = op(aten.amin.default, op(aten.where.self, op(aten.eq.Tensor, piece, value), ids, outside),
                   [head.axis], True)
        if best is None:
            best_id, best = index, value
        else:
            larger = op(aten.gt.Tensor, value, best)  # strictly: on a tie the earlier piece keeps the lower id
            best_id = op(aten.where.self, larger, index, best_id)
            best = op(aten.maximum.default, best, value)
        start += size
    return best_id, best


def _squeezed(head: Head, reduced: fx.Node, graph: fx.Graph) -> fx.Node:
    """A keepdim reduction of the pieces in the output's layout, without its (unit) vocabulary axis. When the
    head's layout ops only move unit axes of it (the (B, 1, 1, S) of a (B, V, 1, S) head), squeezes and
    unsqueezes do it (no transpose); otherwise the layout ops are replayed."""
    rank = len(shape(reduced))
    final = [a for a in _axis_labels(head.chain, rank) if a != head.axis]
    sizes = shape(reduced)
    kept = [a for a in final if a is not None and sizes[a] != 1]
    if kept == sorted(kept) and set(kept) == {a for a in range(rank) if sizes[a] != 1}:
        def op(target, *args):
            return emit(graph, target, args, origin=head.output, rule=RULE)

        units = [a for a in range(rank) if sizes[a] == 1]
        node = op(aten.squeeze.dims, reduced, units if kept else units[:-1])  # (…non-unit) or (1,): never 0-d
        target = [1 if a is None else sizes[a] for a in final]
        for i, size in enumerate(target if kept else target[1:]):
            if size == 1:
                node = op(aten.unsqueeze.default, node, i)
        return node
    laid_out = _replay(head.chain, reduced, graph)
    return emit(graph, aten.squeeze.dims, (laid_out, [len(shape(laid_out)) - 1]), origin=head.output, rule=RULE)


def _last_position(head: Head, graph: fx.Graph) -> None:
    """Run the head on the last position only: slice its input when every piece maps positions one to one
    (a 1×1 convolution or a linear), otherwise each piece's output."""
    rank = len(shape(head.pieces[0]))
    position_axis = _source_axis(head.chain, rank, len(shape(head.output)) - 2)
    if position_axis == head.axis:
        raise HeadError("the logits have no position axis before the vocabulary; positions='last' needs (…, S, "
                        "vocabulary) logits.")
    if position_axis is None:  # a unit axis the layout ops inserted: one position (S = 1), already the last
        return
    length = shape(head.pieces[0])[position_axis]
    inputs = {p.args[0] for p in head.pieces}
    if all(_pointwise(p) for p in head.pieces) and len(inputs) == 1:
        (x,) = inputs
        with graph.inserting_after(x):
            last = emit(graph, aten.slice.Tensor, (x, position_axis, length - 1, length), origin=head.output,
                        rule=RULE)
        for piece in head.pieces:
            piece.replace_input_with(x, last)
        refresh_meta(graph, head.pieces)
        return
    for i, piece in enumerate(head.pieces):
        with graph.inserting_after(piece):
            head.pieces[i] = emit(graph, aten.slice.Tensor, (piece, position_axis, length - 1, length),
                                  origin=head.output, rule=RULE)


def _pointwise(piece: fx.Node) -> bool:
    """A piece whose output position i reads only input position i: a linear, or a 1×1 stride-1 conv."""
    if piece.op != "call_function":
        return False
    if piece.target is LINEAR:
        return True
    if piece.target is not CONV or len(piece.args) < 9:
        return False
    weight = shape(piece.args[1])
    stride, padding, dilation, transposed, _, groups = piece.args[3:9]
    return (all(k == 1 for k in weight[2:]) and all(s == 1 for s in stride) and not any(padding)
            and not transposed and groups == 1 and all(d == 1 for d in dilation))


__all__ = ["Head", "HeadError", "argmax_in_model", "concat_logits", "find_head", "logits_in_pieces"]
