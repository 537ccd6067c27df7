"""State kernels (iOS18): a state input is a buffer the program reads and overwrites across calls."""

from __future__ import annotations

import numpy as np

from anefx.mil.registry import kernel


@kernel("read_state")
def read_state(ctx, input):
    return ctx.states[input.name].copy()


@kernel("write_state")
def write_state(ctx, input, data):
    ctx.states[input.name] = np.array(data, dtype=ctx.states[input.name].dtype)
    return ()


@kernel("coreml_update_state")
def coreml_update_state(ctx, state, value):
    ctx.states[state.name] = np.array(value, dtype=ctx.states[state.name].dtype)
    return value
