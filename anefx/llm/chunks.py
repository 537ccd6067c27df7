"""Cut a (stateful) program into consecutive layer chunks: `plan_chunks` picks the layer ranges, `split_program`
builds one ExportedProgram per range.

    plan = plan_chunks([prefill_ep, decode_ep], max_chunk_bytes=950_000_000, max_chunk_ops=10_000)
    prefill_chunks = split_program(prefill_ep, plan)     # the same layer ranges for both programs
    decode_chunks = split_program(decode_ep, plan)

Layers are found from the graph alone: every node's `nn_module_stack` names the modules it came from, and the
module list holding the repeated blocks is the `<prefix>.<i>` path that covers the most nodes (`model.layers`,
`transformer.h`, ...). Every node then falls in one of two kinds:

- recomputed: it reads no parameter together with a user input, no cache state and no layer's value: positions,
  the causal mask, rotary tables, and weights reshaped from parameters alone. Each chunk that reads one computes
  it again (a few cheap ops), so chunk boundaries carry no masks or tables.
- placed: everything else (the embedding gather, the layers, the final norm, the head) has a home layer: the
  layer its module stack names, or the latest home among its inputs (the final norm and the head land after the
  last layer, the embedding before the first). A chunk runs the placed nodes of its layers.

A placed value read by a later chunk crosses the boundary as a named input: the residual stream entering layer k
is `hidden_states_<k>`; anything else a model carries between layers is passed too, named after the module that
made it. Each chunk keeps only the parameters, constants and buffers it reads, and the cache writes (buffer
mutations, the CoreML states) of its own layers; the model's outputs come from the last chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.export import ExportedProgram

from anefx.errors import OptionError
from anefx.llm.chunk_graph import (
    ChunkingError,
    ProgramLayers,
    build_chunk,
    crossing_values,
    layer_container,
    layer_of,
    module_paths,
)

__all__ = ["Chunk", "ChunkPlan", "ChunkingError", "layer_container", "layer_of", "module_paths", "plan_chunks",
           "run_chunks", "split_program"]

# Predicted MIL ops of a chunk: 1.1 per counted FX node (a call_function node that reads a user input, a state or
# a layer's value: constant subgraphs fold into weights, getitem and asserts lower to nothing) + 2 per state
# (read_state, coreml_update_state). Measured by lowering the tiny Llama, Qwen2 and GPT-2 (4 layers), prefill and
# decode, legalized only and after the default rules, whole and one layer per chunk: MIL ops / (counted nodes +
# 2 per state) was 0.74-1.09, so with 1.1 the prediction is an upper bound on those programs (legalized-only
# graphs are overestimated by up to ~25%: coremltools folds their views and copies).
MIL_OPS_PER_FX_NODE = 1.1
FP16_BYTES = 2  # weights are stored in fp16 in an fp16 package: 2 bytes per float element


@dataclass
class ChunkPlan:
    """Consecutive layer ranges, one per chunk, and what each chunk is predicted to hold (the largest over the
    programs planned together)."""

    ranges: list[range]
    weight_bytes: list[int]
    predicted_ops: list[int]
    container: str  # the module list of the repeated layers ("model.layers"), "" when none was found
    layers: int


@dataclass
class Chunk:
    """One chunk's program and what crosses its boundaries. `inputs` and `outputs` are the program's user
    inputs and outputs in order (the names a package's inputs and outputs get); `states` the buffers it writes
    in place."""

    index: int
    layers: range
    program: ExportedProgram
    inputs: list[str]
    outputs: list[str]
    states: list[str]
    weight_bytes: int
    predicted_ops: int
    crossing: dict[str, str] = field(default_factory=dict)  # output or input name → the original node's name


# -- the plan ---------------------------------------------------------------------------------------------------

def plan_chunks(programs: ExportedProgram | Sequence[ExportedProgram], max_chunk_bytes: int, max_chunk_ops: int,
                *, bytes_per_float: int = FP16_BYTES) -> ChunkPlan:
    """The fewest consecutive layer ranges whose weights (floats at `bytes_per_float` bytes: 2 for an fp16
    package, 4 for fp32) stay within max_chunk_bytes and whose predicted MIL ops stay within max_chunk_ops in every
    program given (a prefill and a decode program get one plan that fits both); as even as the limits allow."""
    for name, value in (("max_chunk_bytes", max_chunk_bytes), ("max_chunk_ops", max_chunk_ops)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"{name}={value!r}: pass a positive integer.")
    views = [ProgramLayers(ep) for ep in ([programs] if isinstance(programs, ExportedProgram) else programs)]
    count = views[0].layers
    if any(v.layers != count or v.container != views[0].container for v in views):
        found = ", ".join(f"{v.layers} in {v.container or 'no module list'}" for v in views)
        raise ChunkingError(f"the programs planned together have different layers ({found}); plan each model's "
                            "programs separately.")
    spans = [s for v in views for s in v.state_spans()]

    def cost(r: range) -> tuple[int, int]:
        figures = [v.cost(r, bytes_per_float, MIL_OPS_PER_FX_NODE) for v in views]
        return max(b for b, _ in figures), max(o for _, o in figures)

    def fits(r: range) -> bool:
        weight, ops = cost(r)
        return weight <= max_chunk_bytes and ops <= max_chunk_ops

    def refuse(r: range) -> None:
        _too_big(r, cost(r), views[0], max_chunk_bytes, max_chunk_ops, bytes_per_float)

    cuts = {k for k in range(1, count) if not any(s.start < k < s.stop for s in spans)}  # no state split
    ranges = _greedy(count, cuts, fits, refuse)
    even = _even(count, len(ranges))
    if all(fits(r) and (r.start in cuts or r.start == 0) for r in even):
        ranges = even
    figures = [cost(r) for r in ranges]
    return ChunkPlan(ranges, [b for b, _ in figures], [o for _, o in figures], views[0].container, count)


def _greedy(count: int, cuts: set[int], fits, refuse) -> list[range]:
    """Each chunk takes as many layers as fit (the fewest chunks: a chunk's cost grows with its layers),
    ending only where a cut is allowed (`cuts`: layers a chunk may start at)."""
    if count == 0:
        if not fits(range(0, 0)):
            refuse(range(0, 0))
        return [range(0, 0)]
    ranges, start = [], 0
    while start < count:
        ends = [e for e in range(start + 1, count + 1) if e == count or e in cuts]
        if not fits(range(start, ends[0])):
            refuse(range(start, ends[0]))
        end = ends[0]
        for e in ends[1:]:
            if not fits(range(start, e)):
                break
            end = e
        ranges.append(range(start, end))
        start = end
    return ranges


def _even(count: int, chunks: int) -> list[range]:
    """`count` layers in `chunks` consecutive ranges whose sizes differ by at most one (larger ones first)."""
    sizes = [count // chunks + (1 if i < count % chunks else 0) for i in range(chunks)]
    starts = [sum(sizes[:i]) for i in range(chunks)]
    return [range(s, s + n) for s, n in zip(starts, sizes, strict=True)]


def _too_big(r: range, figures: tuple[int, int], view: ProgramLayers, max_bytes: int, max_ops: int,
             bytes_per_float: int) -> None:
    weight, ops = figures
    if not len(r):
        what = "the program (it has no repeated layers to split between)"
    else:
        what = f"layer {r.start} ({view.container}.{r.start})" if len(r) == 1 else (
            f"layers {r.start}-{r.stop - 1} (they share a cache state, so one chunk holds them all)")
        extras = [x for x, on in (("the embeddings", r.start == 0), ("the final norm and head", r.stop == view.layers))
                  if on]
        what += f" with {' and '.join(extras)}" if extras else ""
    if weight > max_bytes:
        raise ChunkingError(
            f"{what} alone holds {weight:,} bytes of weights (floats at {bytes_per_float} bytes each), over "
            f"max_chunk_bytes={max_bytes:,}. Raise max_chunk_bytes to at least {weight:,}.")
    raise ChunkingError(
        f"{what} alone is predicted to lower to {ops:,} MIL ops, over max_chunk_ops={max_ops:,}. Raise "
        f"max_chunk_ops to at least {ops:,} (devices fail to compile programs past ~18,000 ops).")


# -- the programs -----------------------------------------------------------------------------------------------

def split_program(ep: ExportedProgram, plan: ChunkPlan | Sequence[range | tuple[int, int]], *,
                  output_names: Sequence[str] | None = None, bytes_per_float: int = FP16_BYTES) -> list[Chunk]:
    """One program per layer range of `plan`, run in order: chunk 0 takes the user inputs it reads (input_ids,
    position), each later chunk the values crossing into it (`hidden_states_<first layer>`) and the user inputs
    it reads; the last chunk returns the model's outputs (named `output_names`; default `logits` for one
    output). `ep` is not changed."""
    view = ProgramLayers(ep)
    ranges = check_ranges(plan.ranges if isinstance(plan, ChunkPlan) else plan, view.layers)
    chunk_of = view.chunk_index(ranges)
    view.check_states(chunk_of)
    outputs = list(output_names) if output_names is not None else _default_output_names(ep)
    if len(outputs) != len(ep.graph_signature.user_outputs):
        raise OptionError(f"output_names={outputs!r}: the program has {len(ep.graph_signature.user_outputs)} "
                          "outputs; pass one name per output.")
    crossing = crossing_values(view, chunk_of, len(ranges))
    chunks = []
    for index, layers in enumerate(ranges):
        program, inputs, outs, states, names = build_chunk(view, chunk_of, index, ranges, crossing, outputs)
        weight, ops = view.cost(layers, bytes_per_float, MIL_OPS_PER_FX_NODE)
        chunks.append(Chunk(index, layers, program, inputs, outs, states, weight, ops, names))
    return chunks


def check_ranges(ranges: Sequence[range | tuple[int, int]], layers: int) -> list[range]:
    """The plan as ranges, checked: consecutive, non-empty, from layer 0 to the last."""
    out = [r if isinstance(r, range) else range(*r) for r in ranges]
    expected = 0
    for r in out:
        if r.step != 1 or r.start != expected or (len(r) == 0 and layers > 0):
            shown = ", ".join(f"[{x.start}, {x.stop})" for x in out)
            raise ChunkingError(f"the chunk plan {shown} does not cover layers 0..{layers - 1} in consecutive, "
                                "non-empty ranges; pass the ranges plan_chunks returned for this program.")
        expected = r.stop
    if expected != layers or not out:
        raise ChunkingError(f"the chunk plan ends at layer {expected} but the program has {layers} layers; plan "
                            "the chunks for this program (plan_chunks).")
    return out


def _default_output_names(ep: ExportedProgram) -> list[str]:
    count = len(ep.graph_signature.user_outputs)
    return ["logits"] if count == 1 else [f"output_{i}" for i in range(count)]


def run_chunks(modules: Sequence[torch.nn.Module], chunks: Sequence[Chunk], feed: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """Run the chunks' modules (`chunk.program.module()`, kept between calls: they hold the cache buffers) in
    order, passing values by name; returns every value produced (the last chunk's outputs among them)."""
    values = dict(feed)
    for module, chunk in zip(modules, chunks, strict=True):
        produced = module(*[values[name] for name in chunk.inputs])
        values.update(zip(chunk.outputs, produced, strict=True))
    return values

