"""Graph fixes every program needs before coremltools accepts it (they run whatever the rules).

- `_assert_tensor_metadata` nodes are checks with no value; they also hide matches from patterns.
- `aten.alias` (HF logits slicing) has no coremltools converter; an alias is its input.
- Subgraphs that depend on no user input and no parameter (HF's causal-mask construction with
  `aten.diff` / `aten.new_ones`, rotary cos/sin tables, position ids) are evaluated once and become
  lifted constants: the shapes are static, so their values are too.
- SDPA's `scale=` equal to the default 1/sqrt(head_dim) is dropped (HF always passes it).
- SDPA's `enable_gqa=True` (no coremltools lowering) becomes transformers' repeat_kv form, which the
  split-head attention rule recognises and indexes instead of copying.
- `__and__` / `__or__` on booleans (HF's padding-mask construction) become `logical_and` / `logical_or`,
  which coremltools lowers.
- Reductions over the whole tensor (`x.sum()`, `x.mean()`, `x.max()`, `x.min()`) name their axes:
  coremltools' transpose-folding pass fails on a reduction without axes behind a layout change.
- `torch.where` with a Python number (`where(mask, bias, finfo.min)` in T5's relative attention bias) takes
  that number as a 0-d constant tensor of the result's dtype: coremltools lowers only the tensor form.
- Pooling ops get the arguments their schema leaves to defaults written out (`F.max_pool2d(x, 2)`: stride =
  kernel size, padding 0, dilation 1, ceil_mode False): coremltools' converter indexes them.
- A transformers MoE whose experts implementation routes tokens with data-dependent ops (the default
  `grouped_mm`: `histc` and a grouped matmul over per-expert token counts) is refused with the setting that
  converts (`experts_implementation="batched_mm"`: every token gathers its top-k experts' weights).
- Empty tensors leave `aten.cat` (an empty KV cache's first update, `cat([empty, k], -2)`, as dynamo
  records HF's DynamicCache): they add nothing, and a rank-1 empty tensor cannot be lowered or split
  per head.
"""

from __future__ import annotations

import functools
import math
from collections import Counter

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from anefx.errors import LoweringError
from anefx.graph import add_constant, constant_value, copy_provenance, emit, finish

aten = torch.ops.aten
DROPPED = (aten._assert_tensor_metadata.default,)
ALIASES = (aten.alias.default, aten.lift_fresh_copy.default)
NONDETERMINISTIC = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial", "empty")
FOLD_LIMIT = 1 << 24  # elements; a larger input-free tensor stays computed in the program


def legalize(ep: ExportedProgram) -> Counter:
    """Apply the fixes in place; returns what was done, e.g. {'folded': 3, 'alias': 1}."""
    done: Counter = Counter()
    graph = ep.graph_module.graph
    _check_experts(graph)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in DROPPED:
            graph.erase_node(node)
            done["assert"] += 1
        elif node.target in ALIASES:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            done["alias"] += 1
        elif node.target is aten.scaled_dot_product_attention.default:
            if _default_scale(node):
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "scale"}
                done["sdpa_scale"] += 1
            if node.kwargs.get("enable_gqa"):
                _repeat_kv(node)
                done["sdpa_gqa"] += 1
        elif node.target in BOOLEAN and all(_is_bool(a) for a in node.args[:2]):
            node.target = BOOLEAN[node.target]
            done["logical"] += 1
        elif node.target is aten.cat.default and _drop_empty(node):
            done["empty_cat"] += 1
        elif node.target in FULL_REDUCTIONS and _rank(node.args[0]) > 0:
            _name_axes(node)
            done["reduction_axes"] += 1
        elif node.target in SCALAR_WHERE:
            _where_tensor_form(ep, node)
            done["where_scalar"] += 1
        elif node.target in POOLING and _write_defaults(node):
            done["pool_defaults"] += 1
        elif node.target in NEW_FILLED:
            _full_form(node)
            done["new_filled"] += 1
    done["folded"] = fold_constants(ep)
    finish(ep)
    return +done


BOOLEAN = {aten.__and__.Tensor: aten.logical_and.default, aten.__or__.Tensor: aten.logical_or.default,
           aten.bitwise_and.Tensor: aten.logical_and.default, aten.bitwise_or.Tensor: aten.logical_or.default}


def _is_bool(arg) -> bool:
    return isinstance(arg, fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor) \
        and arg.meta["val"].dtype == torch.bool


FULL_REDUCTIONS = {aten.sum.default: aten.sum.dim_IntList, aten.mean.default: aten.mean.dim,
                   aten.max.default: aten.amax.default, aten.min.default: aten.amin.default}


def _rank(arg) -> int:
    value = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else 0


def _name_axes(node: fx.Node) -> None:
    """x.sum() → x.sum([0, …, rank-1]) (same value, the same dtype keyword)."""
    x = node.args[0]
    with node.graph.inserting_before(node):
        new = emit(node.graph, FULL_REDUCTIONS[node.target], (x, list(range(_rank(x))), False), dict(node.kwargs),
                   origin=node, rule="legalize")
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


SCALAR_WHERE = (aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)


def _where_tensor_form(ep: ExportedProgram, node: fx.Node) -> None:
    """where(c, x, 2.0) → where(c, x, tensor(2.0)): each number becomes a 0-d constant of the result's dtype
    (the dtype torch computes the result in), so the value and its rounding are those of the number form."""
    dtype = node.meta["val"].dtype
    args = list(node.args)
    with node.graph.inserting_before(node):
        for i in (1, 2):
            if not isinstance(args[i], fx.Node):
                const = add_constant(ep, f"_where_{node.name}", torch.tensor(args[i], dtype=dtype))
                copy_provenance(const, node, "legalize")
                args[i] = const
        new = emit(node.graph, aten.where.self, tuple(args), origin=node, rule="legalize")
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


POOLING = {getattr(aten, f"{kind}_pool{d}d").default for kind in ("max", "avg") for d in (1, 2, 3)} \
    | {getattr(aten, f"max_pool{d}d_with_indices").default for d in (2, 3)}


def _write_defaults(node: fx.Node) -> bool:
    """Every positional argument of the schema written out (a keyword one moved into place, a left-out one
    given its default), and an empty stride (the schema's 'same as kernel_size') as the kernel size."""
    schema = node.target._schema
    positional = [a for a in schema.arguments if not a.kwarg_only]
    args, kwargs = list(node.args), dict(node.kwargs)
    for arg in positional[len(args):]:
        if arg.name not in kwargs and not arg.has_default_value():
            return False
        args.append(kwargs.pop(arg.name) if arg.name in kwargs else arg.default_value)
    names = [a.name for a in positional]
    stride = names.index("stride")
    if not args[stride]:
        args[stride] = list(args[names.index("kernel_size")])
    if tuple(args) == tuple(node.args) and kwargs == dict(node.kwargs):
        return False
    node.args, node.kwargs = tuple(args), kwargs
    return True


class ExpertsImplementationError(LoweringError):
    """A mixture-of-experts layer routes tokens with data-dependent ops that CoreML cannot lower."""


ROUTING_OPS = ("histc", "bincount", "nonzero", "grouped_mm")
STATIC_EXPERTS = "batched_mm"


def _check_experts(graph: fx.Graph) -> None:
    """Refuse a transformers experts module whose implementation routes with data-dependent ops, naming
    the implementation that exports as static gathers and batched matmuls (checked in tests/test_zoo_families.py)."""
    for node in graph.nodes:
        if node.op != "call_function" or not any(op in str(node.target) for op in ROUTING_OPS):
            continue
        experts = [(path, kind) for path, kind in (node.meta.get("nn_module_stack") or {}).values()
                   if str(kind).rsplit(".", 1)[-1].endswith("Experts")]
        if not experts:
            continue
        path, kind = experts[-1]
        op = str(node.target).split(".")[-2]
        raise ExpertsImplementationError(
            f"{path} ({str(kind).rsplit('.', 1)[-1]}) runs a transformers experts implementation that routes "
            f"tokens with data-dependent ops ({op}), which CoreML cannot lower.\n"
            f"Build the model with the {STATIC_EXPERTS!r} implementation, which converts: "
            f"from_pretrained(..., experts_implementation={STATIC_EXPERTS!r}), or the config's keyword "
            f"experts_implementation={STATIC_EXPERTS!r}, or model.set_experts_implementation({STATIC_EXPERTS!r}) "
            "before anefx.compile.")


def _drop_empty(cat: fx.Node) -> bool:
    """Take the inputs with no elements out of a cat (when that leaves the result's dtype as it is); a cat
    left with one input becomes that input, unless the program returns it (an output stays its own node)."""
    parts = cat.args[0]
    kept = [p for p in parts if not (isinstance(p, fx.Node) and isinstance(p.meta.get("val"), torch.Tensor)
                                     and p.meta["val"].numel() == 0)]
    if len(kept) == len(parts) or not kept or not all(isinstance(p, fx.Node) for p in kept):
        return False
    if functools.reduce(torch.promote_types, (p.meta["val"].dtype for p in kept)) != cat.meta["val"].dtype:
        return False
    if len(kept) == 1 and all(u.op != "output" for u in cat.users):
        cat.replace_all_uses_with(kept[0])
        cat.graph.erase_node(cat)
    else:
        cat.args = (kept, *cat.args[1:])
    return True


def _repeat_kv(node: fx.Node) -> None:
    """enable_gqa → K/V repeated per query head, as transformers' repeat_kv writes it."""
    q, k, v = node.args[:3]
    b, heads, _, _ = q.meta["val"].shape
    graph = node.graph
    new_args = list(node.args)
    with graph.inserting_before(node):
        for i, kv in ((1, k), (2, v)):
            _, kv_heads, s, d = kv.meta["val"].shape
            if kv_heads == heads:
                continue
            rep = heads // kv_heads
            u = emit(graph, aten.unsqueeze.default, (kv, 2), origin=node, rule="legalize")
            e = emit(graph, aten.expand.default, (u, [b, kv_heads, rep, s, d]), origin=node, rule="legalize")
            c = emit(graph, aten.clone.default, (e,), {"memory_format": torch.contiguous_format},
                     origin=node, rule="legalize")
            new_args[i] = emit(graph, aten._unsafe_view.default, (c, [b, heads, s, d]), origin=node,
                               rule="legalize")
    node.args = tuple(new_args)
    node.kwargs = {k: val for k, val in node.kwargs.items() if k != "enable_gqa"}


def _default_scale(node: fx.Node) -> bool:
    scale = node.kwargs.get("scale")
    if scale is None:
        return False
    head_dim = node.args[0].meta["val"].shape[-1]
    return math.isclose(float(scale), 1 / math.sqrt(int(head_dim)), rel_tol=1e-9)


# x.new_ones(shape) & co. read only x's dtype: as `full` they are input-free (folded) and coremltools converts them
NEW_FILLED = {aten.new_ones.default: 1, aten.new_zeros.default: 0, aten.new_full.default: None}


def _full_form(node: fx.Node) -> None:
    value = NEW_FILLED[node.target]
    if value is None:
        value = node.args[2] if len(node.args) > 2 else node.kwargs["fill_value"]
    dtype = node.kwargs.get("dtype") or node.meta["val"].dtype
    node.target = aten.full.default
    node.args = (list(node.args[1]), value)
    node.kwargs = {"dtype": dtype, "device": torch.device("cpu")}


def fold_constants(ep: ExportedProgram) -> int:
    """Replace input- and parameter-free subgraphs by their values; returns the number folded."""
    graph = ep.graph_module.graph
    values: dict[fx.Node, object] = {}
    params = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.PARAMETER}
    for node in graph.nodes:
        if node.op == "placeholder" and node.name not in params:
            value = constant_value(node, ep)
            if value is not None:
                values[node] = value
        elif node.op == "call_function" and _foldable(node, values):
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
            values[node] = node.target(*args, **kwargs)
    folded = 0
    for node, value in values.items():
        if node.op != "call_function" or not isinstance(value, torch.Tensor):
            continue
        if value.numel() > FOLD_LIMIT or all(u in values for u in node.users):
            continue
        with graph.inserting_before(node):
            const = add_constant(ep, f"_folded_{node.name}", value.detach().clone().contiguous())
        copy_provenance(const, node, "legalize")
        node.replace_all_uses_with(const)
        folded += 1
    return folded


def _foldable(node: fx.Node, values: dict) -> bool:
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    schema = node.target._schema
    if schema.is_mutable or any(word in schema.name for word in NONDETERMINISTIC):
        return False
    return all(n in values for n in node.all_input_nodes) and isinstance(node.meta.get("val"), torch.Tensor)
