"""coremltools' MIL passes that move layout ops, replayed on a predicted program (anefx.layout_program).

In coremltools' order: `reduce_transposes` (a transpose moves down through elementwise ops, concats, splits and
keepdim reductions until it meets its inverse; a group of transposes that share such ops is removed when fewer
transposes have to be materialised in front of the ops they cannot pass than are removed), then
`merge_consecutive_reshapes`, `merge_consecutive_transposes`, `fuse_transpose_matmul` (a swap of the last two axes
into a matmul is free), `reduce_transposes` again, `remove_redundant_ops` (identical ops of one tensor are one),
and the cleanup passes (no-op elimination, `reduce_transposes`, dead-code elimination).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from anefx.layout_program import Op, live, program, replace_uses, users_of

AXIS_UPDATE = ("binary", "concat", "split", "reduce")


def predicted_ops(ep) -> list[Op]:
    """The predicted MIL program of `ep` after coremltools' layout passes, in topological order."""
    ops = reduce_transposes(live(program(ep)))
    ops = fuse_transpose_matmul(merge_transposes(merge_reshapes(ops)))
    ops = live(remove_redundant(reduce_transposes(ops)))
    ops = reduce_transposes(remove_noops(ops))
    return live(remove_redundant(ops))


def boundary_ops(ops: list[Op]) -> list[Op]:
    """Transposes / reshapes that convert a program input (read from it through layout ops only) or make an
    output (reach it through layout ops only; other ops may read them too)."""
    users = users_of(ops)
    layout = ("transpose", "reshape", "squeeze", "cast")

    def from_input(op: Op) -> bool:
        return op.kind == "input" or (op.kind in layout and from_input(op.inputs[0]))

    def to_output(op: Op) -> bool:
        return any(u.kind == "output" or (u.kind in layout and to_output(u)) for u in users[op])

    return [op for op in ops if op.kind in ("transpose", "reshape") and (from_input(op.inputs[0]) or to_output(op))]


@dataclass(frozen=True, eq=False)
class _Lazy:
    """A value that is `transposes` (all with `perm`) of a value not yet transposed."""

    transposes: frozenset
    perm: tuple[int, ...]


class _TransposeReduction:
    """coremltools' reduce_transposes: one traversal recording where each transpose could go, then the decision."""

    def __init__(self, ops: list[Op]):
        self.ops, self.users = ops, users_of(ops)
        self.value: dict[Op, _Lazy | None] = {}
        self.cancel: dict[Op, list[Op]] = defaultdict(list)
        self.materialize: dict[Op, list[tuple[Op, Op]]] = defaultdict(list)
        self.updates: dict[Op, list[tuple[Op, tuple | None]]] = defaultdict(list)  # axis ops, reshape of the other

    def traverse(self) -> None:
        for op in self.ops:
            if op.kind == "unary":
                self.value[op] = self.value[op.inputs[0]]
            elif op.kind in AXIS_UPDATE:
                self._axis_update(op)
            elif op.kind == "transpose":
                self._transpose(op)
            else:
                self._materialize(op)

    def _materialize(self, op: Op) -> None:
        self.value[op] = None
        for var in op.inputs:
            if (lazy := self.value.get(var)) is not None:
                for t in lazy.transposes:
                    self.materialize[t].append((op, var))

    def _axis_update(self, op: Op) -> None:
        lazies = [self.value[i] for i in op.inputs if self.value.get(i) is not None]
        if not lazies or any(lazy.perm != lazies[0].perm for lazy in lazies):
            return self._materialize(op)
        passes, reshape = self._can_pass(op, lazies[0].perm)
        if not passes:
            return self._materialize(op)
        transposes = frozenset().union(*(lazy.transposes for lazy in lazies))
        for t in transposes:
            self.updates[t].append((op, reshape))
        self.value[op] = _Lazy(transposes, lazies[0].perm)
        return None

    def _can_pass(self, op: Op, perm: tuple[int, ...]) -> tuple[bool, tuple | None]:
        """Whether a transpose passes the op, and the reshape of a non-constant other operand it then needs."""
        lazy = [i for i in op.inputs if self.value.get(i) is not None]
        if op.kind in ("concat", "split", "reduce"):
            return len(lazy) == len(op.inputs), None
        rank = len(perm)
        if len(lazy) == len(op.inputs):  # every non-constant operand is transposed alike; constants move too
            return all(len(c) <= rank for c in op.consts), None
        other = next(i for i in op.inputs if i not in lazy).shape
        if other is None or len(other) > rank:
            return False, None
        full = (1,) * (rank - len(other)) + tuple(other)
        inverse = tuple(perm.index(i) for i in range(rank))
        if full.count(1) < rank - 1 and any(i != a and full[a] != 1 for i, a in enumerate(inverse)):
            return False, None
        new = tuple(full[a] for a in inverse)
        return True, (new if other and new != tuple(other) else None)

    def _transpose(self, op: Op) -> None:
        lazy = self.value.get(op.inputs[0])
        if lazy is None:
            if any(u.kind == "output" for u in self.users[op]):
                return self._materialize(op)
            self.value[op] = _Lazy(frozenset([op]), op.perm)
            return None
        if tuple(lazy.perm[i] for i in op.perm) == tuple(range(len(op.perm))):
            self.value[op] = None
            for t in lazy.transposes:
                self.cancel[t].append(op)
            return None
        return self._materialize(op)

    def removable(self) -> list[Op]:
        """The starting transposes whose group is worth removing (coremltools' _verify_cancellable_transposes)."""
        for t in self.materialize:
            self.cancel.setdefault(t, [])
        cancel_of = defaultdict(set)
        for t, ops in self.cancel.items():
            for c in ops:
                cancel_of[c].add(t)
        materialize_of = defaultdict(set)
        for t, edges in self.materialize.items():
            for m, _ in edges:
                materialize_of[m].add(t)
        keep, seen = [], set()
        for start in list(self.cancel):
            if start in seen:
                continue
            group, cancels, materializes = self._component(start, cancel_of, materialize_of, seen)
            if len(materializes) < len(group) + len(cancels):
                keep.extend(t for t in self.cancel if t in group)
        return keep

    def _component(self, start: Op, cancel_of: dict, materialize_of: dict, seen: set) -> tuple[set, set, set]:
        group, cancels, materializes, queue = {start}, set(), set(), [start]
        seen.add(start)
        while queue:
            op = queue.pop(0)
            if op in self.cancel:
                group.add(op)
                neighbours = [*self.cancel[op], *(m for m, _ in self.materialize.get(op, []))]
            elif op in cancel_of:
                cancels.add(op)
                neighbours = list(cancel_of[op])
            else:
                materializes.add(op)
                neighbours = list(materialize_of[op])
            for n in neighbours:
                if n not in seen:
                    seen.add(n)
                    queue.append(n)
        return group, cancels, materializes

    def apply(self, starts: list[Op]) -> list[Op]:
        ops, removed, handled = list(self.ops), set(), set()
        region = {op for op, lazy in self.value.items() if lazy is not None and lazy.transposes & set(starts)}
        for op in region:  # ops the transposes moved past now compute the untransposed value
            if op.shape is not None and op.kind != "transpose":
                perm = self.value[op].perm
                op.shape = tuple(op.shape[perm.index(i)] for i in range(len(perm)))
        for t in starts:
            for op, reshape in self.updates[t]:
                if reshape is not None and op not in handled:
                    handled.add(op)
                    other = next(i for i in op.inputs if i not in region)
                    _insert(ops, op, other, Op("reshape", [other], reshape, key=(reshape,)))
            for gone in (t, *self.cancel[t]):
                if gone not in removed:
                    removed.add(gone)
                    replace_uses(ops, gone, gone.inputs[0])
            for op, var in self.materialize[t]:
                var = var.inputs[0] if var in removed else var
                if (op, var) not in handled:
                    handled.add((op, var))
                    _insert(ops, op, var, Op("transpose", [var], None, t.perm))
        return [op for op in ops if op not in removed]


def _insert(ops: list[Op], before: Op, var: Op, new: Op) -> None:
    """new (reading var) placed just before `before`, which reads new instead of var."""
    ops.insert(ops.index(before), new)
    before.inputs = [new if i is var else i for i in before.inputs]


def reduce_transposes(ops: list[Op]) -> list[Op]:
    reduction = _TransposeReduction(ops)
    reduction.traverse()
    starts = reduction.removable()
    return reduction.apply(starts) if starts else ops


def merge_reshapes(ops: list[Op]) -> list[Op]:
    """A reshape of a reshape read by nothing else is one reshape."""
    users = users_of(ops)
    for op in ops:
        source = op.inputs[0] if op.kind == "reshape" else None
        if source is not None and source.kind == "reshape" and len(users[source]) == 1:
            op.inputs = [source.inputs[0]]
    return live(ops)


def merge_transposes(ops: list[Op]) -> list[Op]:
    """A transpose of a transpose read by nothing else is one transpose (none when they cancel)."""
    users = users_of(ops)
    for op in ops:
        source = op.inputs[0] if op.kind == "transpose" else None
        if source is not None and source.kind == "transpose" and len(users[source]) == 1:
            op.inputs, op.perm = [source.inputs[0]], tuple(source.perm[i] for i in op.perm)
    return remove_noops(live(ops))


def fuse_transpose_matmul(ops: list[Op]) -> list[Op]:
    """A transpose of the last two axes read by a matmul is the matmul's transpose_x / transpose_y."""
    for op in ops:
        if op.kind == "matmul":
            op.inputs = [i.inputs[0] if _swaps_last_two(i) else i for i in op.inputs]
    return live(ops)


def _swaps_last_two(op: Op) -> bool:
    rank = len(op.perm)
    return op.kind == "transpose" and rank >= 2 and op.perm == (*range(rank - 2), rank - 1, rank - 2)


def remove_noops(ops: list[Op]) -> list[Op]:
    """Identity transposes and reshapes to the shape they read."""
    kept = []
    for op in ops:
        identity = (op.kind == "transpose" and op.perm == tuple(range(len(op.perm)))) or (
            op.kind == "reshape" and op.shape is not None and op.shape == op.inputs[0].shape)
        if identity:
            replace_uses(ops, op, op.inputs[0])
        else:
            kept.append(op)
    return kept


def remove_redundant(ops: list[Op]) -> list[Op]:
    """Identical ops of the same operands are one (coremltools' remove_redundant_ops)."""
    first: dict[tuple, Op] = {}
    kept = []
    for op in ops:
        if op.kind in ("input", "output"):
            kept.append(op)
            continue
        key = (op.kind, op.key, op.perm, tuple(map(id, op.inputs)))
        if key in first:
            replace_uses(ops, op, first[key])
        else:
            first[key] = op
            kept.append(op)
    return kept
