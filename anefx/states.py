"""A program's states: the buffers it writes in place (a KV cache), their values, and how each is stored.

torch.export turns a buffer that a model writes (`self.cache.index_copy_(…)`) into a buffer mutation: the
graph reads the buffer as an input and returns its new value as an extra output, which `ep.module()` copies
back into the program's own tensor. The verification runs such a program functionally instead: the states go
in as fresh tensors and the run returns their new values next to the user outputs (`anefx.pipeline`), so two
runs never share a cache, and a rewrite that writes the cache wrongly is caught even when this call's
outputs do not show it.

A rule may store a state in another layout than the model's (the KV cache in the Neural Engine's
(B, C, 1, S) form). It records a `StateLayout` on the buffer's placeholder (`STATE_LAYOUT` in its meta):
states are given and compared in the model's (logical) layout and converted at the program's edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.export import ExportedProgram

from anefx.graph import fake_mode_of

STATE_LAYOUT = "anefx_state_layout"  # placeholder meta key


@dataclass(frozen=True)
class StateLayout:
    """stored = zero-pad(reshape(permute(logical, perm), shape), to `stored`); padding sits at the end of axes."""

    logical: tuple[int, ...]
    perm: tuple[int, ...]
    shape: tuple[int, ...]
    stored: tuple[int, ...]

    def to_stored(self, t: torch.Tensor) -> torch.Tensor:
        x = t.permute(self.perm).reshape(self.shape)
        if self.stored == self.shape:
            return x.contiguous()
        out = torch.zeros(self.stored, dtype=t.dtype)
        out[tuple(slice(0, n) for n in self.shape)] = x
        return out

    def to_logical(self, t: torch.Tensor) -> torch.Tensor:
        x = t[tuple(slice(0, n) for n in self.shape)]
        permuted = tuple(self.logical[p] for p in self.perm)
        inverse = sorted(range(len(self.perm)), key=lambda i: self.perm[i])
        return x.reshape(permuted).permute(inverse).contiguous()


def mutated_states(ep: ExportedProgram) -> list[str]:
    """The buffers the program writes, in the order of their mutation outputs."""
    return list(ep.graph_signature.buffers_to_mutate.values())


def state_placeholder(ep: ExportedProgram, target: str) -> fx.Node:
    name = next(s.arg.name for s in ep.graph_signature.input_specs if s.target == target)
    return next(n for n in ep.graph_module.graph.nodes if n.op == "placeholder" and n.name == name)


def state_layout(ep: ExportedProgram, target: str) -> StateLayout | None:
    return state_placeholder(ep, target).meta.get(STATE_LAYOUT)


def stored_value(ep: ExportedProgram, target: str) -> torch.Tensor:
    """The tensor the program holds for a buffer (persistent buffers in state_dict, others in constants)."""
    return ep.state_dict[target] if target in ep.state_dict else ep.constants[target]


def logical_states(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    """{buffer: its current value in the model's layout} for every state the program writes (copies)."""
    found = {}
    for target in mutated_states(ep):
        layout, value = state_layout(ep, target), stored_value(ep, target)
        found[target] = layout.to_logical(value) if layout else value.clone()
    return found


def stored_states(ep: ExportedProgram, states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh tensors holding `states` (logical values) as this program stores them."""
    found = {}
    for target, value in states.items():
        layout = state_layout(ep, target)
        found[target] = layout.to_stored(value) if layout else value.clone()
    return found


def restore_logical(ep: ExportedProgram, stored: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The states after a run, in the model's layout, in mutation-output order."""
    values = []
    for target in mutated_states(ep):
        layout = state_layout(ep, target)
        values.append(layout.to_logical(stored[target]) if layout else stored[target])
    return values


def relayout_state(ep: ExportedProgram, target: str, layout: StateLayout) -> fx.Node:
    """Store the buffer `target` in `layout` (its tensor in the program and its placeholder's meta). The
    tensor is replaced, never written: the model's buffer is untouched. Returns the placeholder."""
    node = state_placeholder(ep, target)
    if STATE_LAYOUT in node.meta:
        raise ValueError(f"state {target} already has a layout")
    value = layout.to_stored(stored_value(ep, target))
    (ep.state_dict if target in ep.state_dict else ep.constants)[target] = value
    node.meta["val"] = fake_mode_of(ep.graph_module).from_tensor(value, static_shapes=True)
    node.meta[STATE_LAYOUT] = layout
    return node
