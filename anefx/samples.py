"""Inputs drawn like the example, so that verification is not fooled by one lucky input.

A rewrite that is right only for positive values (relu → abs) or only for the example's values passes a
check on the example alone. Each stage is therefore also checked on inputs of the example's shapes and
dtypes drawn at random (from a fixed seed, so a compile is reproducible):

- floats: both signs, over twice the example's largest magnitude; inputs holding infinities or values
  beyond ±1e4 (additive masks) keep the example's values, since random ones would only make NaNs;
- integers feeding an embedding: any id the embedding accepts; other integers: within the example's
  range (they may be indices or masks);
- integers giving where a cache write starts (`index_copy(cache, dim, arange(S) + p, …)`, a KV cache's
  position): any start at which the S written positions fit in the cache;
- booleans: random;
- states (buffers the program writes, e.g. a KV cache; `drawn_states`): random values, both signs, so
  that reads of past positions are exercised (a zero cache hides a wrong read).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

aten = torch.ops.aten
MASK_LIKE = 1e4  # a float input with values beyond this (or infinities) is treated as a mask
_GATHERS = {aten.embedding.default: 1, aten.index_select.default: 2}  # op → position of the index argument
_SHAPE_ONLY = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
               aten.squeeze.dim, aten.squeeze.dims, aten.clone.default, aten._to_copy.default,
               aten.flatten.using_ints, aten.expand.default, aten.contiguous.default}


def drawn_like(ep: ExportedProgram, example: tuple[tuple, dict], count: int = 2,
               seed: int = 0) -> list[tuple[tuple, dict]]:
    """`count` input sets shaped like `example`, for the program `ep` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    bounds = _integer_bounds(ep)
    leaves, spec = pytree.tree_flatten(example)
    names = _input_names(ep)
    drawn = []
    for draw in range(count):
        new = [_draw(t, bounds.get(names[i]) if i < len(names) else None, draw, generator)
               if isinstance(t, torch.Tensor) else t for i, t in enumerate(_tensors_first(leaves))]
        drawn.append(pytree.tree_unflatten(_restore(leaves, new), spec))
    return drawn


def drawn_states(ep: ExportedProgram, count: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` random values of the states `ep` writes ({buffer: tensor}, in the model's layout)."""
    from anefx.states import logical_states

    generator = torch.Generator().manual_seed(seed + 1)
    own = logical_states(ep)
    return [{target: _draw_state(value, draw, generator) for target, value in own.items()} for draw in range(count)]


def _draw_state(t: torch.Tensor, draw: int, generator: torch.Generator) -> torch.Tensor:
    if not t.is_floating_point():
        return _draw(t, None, draw, generator)
    finite = t[torch.isfinite(t)]
    scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1.0)  # a zero cache: unit values
    values = torch.rand(t.shape, generator=generator, dtype=torch.float64) * 2 - 1 if draw % 2 == 0 else \
        torch.randn(t.shape, generator=generator, dtype=torch.float64)
    return (values * scale).to(t.dtype)


def _tensors_first(leaves: list) -> list:
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _restore(leaves: list, tensors: list) -> list:
    it = iter(tensors)
    return [next(it) if isinstance(t, torch.Tensor) else t for t in leaves]


def _draw(t: torch.Tensor, high: int | None, draw: int, generator: torch.Generator) -> torch.Tensor:
    if t.dtype == torch.bool:
        return torch.rand(t.shape, generator=generator) < 0.5
    if t.is_floating_point():
        finite = t[torch.isfinite(t)]
        if finite.numel() != t.numel() or (finite.numel() and float(finite.abs().max()) > MASK_LIKE):
            return t.clone()
        scale = max(float(finite.abs().max()) if finite.numel() else 1.0, 1e-3)
        if draw % 2 == 0:  # uniform over twice the example's range, both signs
            values = (torch.rand(t.shape, generator=generator, dtype=torch.float64) * 4 - 2) * scale
        else:
            values = torch.randn(t.shape, generator=generator, dtype=torch.float64) * scale
        return values.to(t.dtype)
    if not t.numel():
        return t.clone()
    low, top = (0, high - 1) if high is not None else (int(t.min()), int(t.max()))
    return torch.randint(low, top + 1, t.shape, generator=generator, dtype=torch.int64).to(t.dtype)


def _input_names(ep: ExportedProgram) -> list[str]:
    return [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"
            and hasattr(s.arg, "name") and not hasattr(s.arg, "value")]


def _integer_bounds(ep: ExportedProgram) -> dict[str, int]:
    """{integer input name: how many values it may take} for inputs that feed gathers directly (rows of the
    table) or give where a cache write starts (starts that fit)."""
    bounds: dict[str, int] = {}
    for node in ep.graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        frontier, seen = [node], set()
        while frontier:  # through reshapes and copies, which keep the values
            value = frontier.pop()
            seen.add(value)
            for user in value.users:
                rows = _rows_indexed(user, value)
                if rows is None:
                    rows = _write_starts(user, value)
                if rows is not None:
                    bounds[node.name] = min(rows, bounds.get(node.name, rows))
                elif user.target in _SHAPE_ONLY and user.args and user.args[0] is value and user not in seen:
                    frontier.append(user)
    return bounds


def _write_starts(user: fx.Node, start: fx.Node) -> int | None:
    """For p in index_copy(cache, dim, arange(S) + p, …): how many starts keep the write in the cache."""
    if user.target is not aten.add.Tensor or user.kwargs.get("alpha", 1) != 1 or start not in user.args:
        return None
    ramp = user.args[1] if user.args[0] is start else user.args[0]
    if not (isinstance(ramp, fx.Node) and ramp.target is aten.arange.default and isinstance(ramp.args[0], int)):
        return None
    for write in user.users:
        if write.target is aten.index_copy.default and write.args[2] is user and isinstance(write.args[0], fx.Node):
            size = int(write.args[0].meta["val"].shape[int(write.args[1])])
            return max(size - ramp.args[0] + 1, 1)
    return None


def _rows_indexed(user: fx.Node, index: fx.Node) -> int | None:
    position = _GATHERS.get(user.target)
    if position is None or len(user.args) <= position or user.args[position] is not index:
        return None
    table = user.args[0]
    value = table.meta.get("val") if isinstance(table, fx.Node) else None
    if value is None:
        return None
    axis = 0 if user.target is aten.embedding.default else int(user.args[1])
    return int(value.shape[axis])
