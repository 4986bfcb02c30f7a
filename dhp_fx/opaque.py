"""Compact blocks, chains and gate taps as opaque ops, for the downstream compilers that trace a graph.

aot_eager and inductor trace the rewritten graph with fake tensors. A compact block decides on
the host, at each call, which heads run and gathers their weights; traced, that logic would fail
on a data-dependent read or be frozen at the traced call's decision. A gate's tap (recording the
scores of a gate that ran before the projections) would trace to the identity. As custom ops
both run for real at every call, as ``dhp::run_gate`` does for the gates, and the compiler still
compiles everything around them. A block that alone reads its gate's decision calls the gate
inside its op.

A compact chain (RoPE between the projections and attention) is several calls with the graph's
own ops between them, on tensors whose widths follow the decision. Its whole region, from the
gate (or the plan) to the output projection's call, becomes one GraphModule run eagerly by
``dhp::run_chain``; the trace sees the output alone, whose shape does not depend on the decision.

Inference graphs only: these ops have no autograd formula, so a graph traced for training keeps
the head ops (whose autograd is exact) and gets no compact blocks (``DHPCompiler``).
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
import torch.fx as fx

from .compact_block import CompactBlock, CompactChain
from .gates import GateTap, HeadGate, _GATES, _register
from .passes.compact_chain import OUT_LIKE
from .passes.graph_utils import example_value, holds_non_tensor
from .passes.regions import holds_size, inputs_of, leaks, region_between, shape_recipe


class _Slot(int):
    """Where a call's template takes tensor argument number ``self``."""


# call id -> (block, a builder of the call's (args, kwargs) from the op's tensors, and the same
# two for the gate whose decision only this block reads, called inside the op, or None). Entries
# are a few hundred bytes per compiled block and live as long as the process, like the compiled
# graphs that hold their ids.
_CALLS: dict[int, tuple] = {}
_CALL_IDS = itertools.count()


def _builder(template):
    """A function ``(tensors) -> value`` that rebuilds ``template`` with tensor ``i`` at each
    ``_Slot(i)``, generated once per call site: walking the nested arguments at every call cost
    0.2–0.3 ms under cProfile (pytree's unflatten, then a recursive walk), most of an opaque
    block's host time at short sequences."""
    consts: list = []

    def code(t) -> str:
        if type(t) is _Slot:
            return f"t[{int(t)}]"
        if isinstance(t, tuple):
            return "(" + "".join(code(v) + ", " for v in t) + ")"
        if isinstance(t, dict):
            if not all(isinstance(k, str) for k in t):
                raise TypeError(f"dhp_fx: opaque call arguments hold a dict with non-string keys: {list(t)}")
            return "{" + ", ".join(f"{k!r}: {code(v)}" for k, v in t.items()) + "}"
        consts.append(t)
        return f"c[{len(consts) - 1}]"

    fn = eval(f"lambda t, c: {code(template)}")  # noqa: S307 (source built above from slots and indices only)
    return lambda tensors: fn(tensors, consts)


def _template(value, tensors: list):
    if isinstance(value, fx.Node):
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    if isinstance(value, (tuple, list)):
        return tuple(_template(v, tensors) for v in value)
    if isinstance(value, dict):
        return {key: _template(v, tensors) for key, v in value.items()}
    return value


def _rebuild(call_id: int, tensors, decide: bool = True) -> tuple[Optional[CompactBlock], tuple, dict]:
    ref, build, gate_ref, build_gate_args = _CALLS[call_id]
    args, kwargs = build(tensors)
    if gate_ref is not None and decide:
        gate = gate_ref()
        if gate is None:
            raise RuntimeError(f"dhp::run_block: the gate of call {call_id} no longer exists (its model was freed)")
        gate_args, gate_kwargs = build_gate_args(tensors)
        args = (gate(*gate_args, **gate_kwargs), *args[1:])
    return ref(), args, kwargs


def _aliases(out: torch.Tensor, tensors) -> bool:
    storage = out.untyped_storage().data_ptr()
    return any(t.untyped_storage().data_ptr() == storage for t in tensors)


@torch.library.custom_op("dhp::run_block", mutates_args=())
def run_block(tensors: list[torch.Tensor], call_id: int) -> torch.Tensor:
    """Run compiled block call ``call_id`` (its module and non-tensor arguments were recorded
    when the graph was compiled) on ``tensors``."""
    block, args, kwargs = _rebuild(call_id, tensors)
    if block is None:
        raise RuntimeError(f"dhp::run_block: the block of call {call_id} no longer exists (its model was freed)")
    out = block(*args, **kwargs)
    # The op contract forbids returning an input's memory; a block never should, but a cheap
    # check keeps a future fast path honest.
    return out.clone() if _aliases(out, tensors) else out


@run_block.register_fake
def _(tensors, call_id):
    _, args, kwargs = _rebuild(call_id, tensors, decide=False)
    return block_output_like(*args, **kwargs)


def block_output_like(keep, attn_mask, dropout_p, is_causal, scale, *, projections, roles, out_projection,
                      geometry, qk_factors=(1.0, 1.0)) -> torch.Tensor:
    """An empty tensor shaped like a block call's output: the output projection's features per
    token of the query projection's input, [B, L, out] or [B * L, out] (``flat``)."""
    w_o, _b, _flags, _unit, in_out, flat = out_projection
    x3 = projections[roles[0][0]][6]
    B, L = x3.shape[:2]
    features = w_o.shape[1] if in_out else w_o.shape[0]
    return x3.new_empty((B * L, features) if flat else (B, L, features))


@torch.library.custom_op("dhp::gated_attention_tapped", mutates_args=())
def gated_attention_tapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                           attn_mask: Optional[torch.Tensor], dropout_p: float, is_causal: bool,
                           scale: Optional[float], gate_id: int) -> torch.Tensor:
    """``dhp::gated_attention`` followed by gate ``gate_id``'s tap, in one op: the tap's output is
    then the op's own fresh tensor, never a copy of the attention output."""
    out = torch.ops.dhp.gated_attention(q, k, v, keep, attn_mask, dropout_p, is_causal, scale)
    gate = _GATES.get(gate_id)
    if gate is None:
        raise RuntimeError(f"dhp::gated_attention_tapped: gate {gate_id} no longer exists (its model was freed)")
    return gate.tap_module(out, q, k, v, attn_mask)


@gated_attention_tapped.register_fake
def _(q, k, v, keep, attn_mask, dropout_p, is_causal, scale, gate_id):
    return torch.ops.dhp.gated_attention(q, k, v, keep, attn_mask, dropout_p, is_causal, scale)


def _replace(gm: fx.GraphModule, node: fx.Node, target, args: tuple) -> fx.Node:
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _block_to_op(gm: fx.GraphModule, node: fx.Node, block: CompactBlock) -> bool:
    """Replace a block call by ``dhp::run_block``; True when its gate moved into the op."""
    tensors: list[fx.Node] = []
    keep = node.args[0]
    gate_ref = gate_template = None
    if (isinstance(keep, fx.Node) and keep.op == "call_module" and list(keep.users) == [node]
            and isinstance(gm.get_submodule(keep.target), HeadGate)):
        # The block is the decision's only reader: the op calls the gate itself. That saves a
        # second op and the copy its output must be, and hands the block the gate's own tensor,
        # so a static decision keeps its identity and its gathered weights (on a GPU, where
        # comparing values would sync, a fresh copy would gather again at every call).
        gate_ref = weakref.ref(gm.get_submodule(keep.target))
        gate_template = _template((keep.args, dict(keep.kwargs)), tensors)
        template = _template(((None, *node.args[1:]), dict(node.kwargs)), tensors)
    else:
        template = _template((node.args, dict(node.kwargs)), tensors)
    for arg in tensors:
        if holds_non_tensor(arg):  # the pass declines such blocks for traced graphs
            raise RuntimeError(f"dhp_fx: block {node.target} has a non-tensor graph argument {arg.name}")
    call_id = next(_CALL_IDS)
    _CALLS[call_id] = (weakref.ref(block), _builder(template), gate_ref,
                       None if gate_template is None else _builder(gate_template))
    _replace(gm, node, torch.ops.dhp.run_block.default, (tensors, call_id))
    if gate_ref is not None:
        target = keep.target
        gm.graph.erase_node(keep)
        if not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
            # An unused submodule's buffers would still be seen as state of the traced graph.
            gm.delete_submodule(target)
    return gate_ref is not None


# call id -> (a weak reference to the chain's region as a GraphModule, which its chain module
# holds; where each of its inputs comes from, (True, i) tensor i or (False, k) size k; the slot of
# the tensor whose dtype and device the output takes; its dtype; its shape's recipe, from
# passes/regions.shape_recipe)
_CHAINS: dict[int, tuple] = {}


@torch.library.custom_op("dhp::run_chain", mutates_args=())
def run_chain(tensors: list[torch.Tensor], sizes: list[int], call_id: int) -> torch.Tensor:
    """Run compiled chain call ``call_id``: the graph from the gate's decision (or the plan) to
    the output projection, recorded when the graph was compiled, on ``tensors`` and ``sizes``
    (symbolic under dynamic shapes)."""
    ref, sources, *_ = _CHAINS[call_id]
    region = ref()
    if region is None:
        raise RuntimeError(f"dhp::run_chain: the chain of call {call_id} no longer exists (its model was freed)")
    out = region(*[tensors[i] if is_tensor else sizes[i] for is_tensor, i in sources])
    return out.clone() if _aliases(out, tensors) else out


@run_chain.register_fake
def _(tensors, sizes, call_id):
    _, _, slot, dtype, recipe = _CHAINS[call_id]
    reference = tensors[slot]
    shape = [n if kind == "const" else reference.shape[n] if kind == "dim" else sizes[n] for kind, n in recipe]
    return reference.new_empty(shape, dtype=dtype)


def _chain_inputs(region: list[fx.Node], sink: fx.Node, like, x: fx.Node):
    """(inputs, tensor inputs, size inputs, the output shape's recipe) of a region that can run
    as one opaque call, else a reason it cannot."""
    inputs = inputs_of(region)
    sizes = [n for n in inputs if holds_size(n)]
    tensors = [n for n in inputs if not holds_size(n)]
    ref = example_value(x)
    recipe = shape_recipe(like, ref, sizes) if isinstance(like, torch.Tensor) and ref is not None else None
    if recipe is None:
        return "its output's shape does not follow from its inputs"
    if leaks(region, sink):
        return "a node inside is read from outside"
    if any(holds_non_tensor(n) for n in tensors):
        return "it reads a number that is not a size"
    return inputs, tensors, sizes, recipe


def _chain_to_op(gm: fx.GraphModule, plan: fx.Node, chain: CompactChain) -> bool:
    """Replace a chain (its plan, its calls and the graph's own ops between them, up to the
    output projection's call) by ``dhp::run_chain``; True when its gate moved into the op.
    A chain's calls hand a host-side plan along and its widths follow the host's decision, so
    the trace sees only the output, whose shape does not depend on the decision."""
    sinks = [u for u in plan.users if u.op == "call_module" and u.kwargs.get("kind") == "out"]
    if len(sinks) != 1:
        raise RuntimeError(f"dhp_fx: chain {plan.target} has {len(sinks)} output calls")
    sink, x, keep = sinks[0], plan.args[1], plan.args[0]
    like = sink.meta.get(OUT_LIKE)
    candidates = []
    if isinstance(keep, fx.Node) and keep.op == "call_module" and isinstance(gm.get_submodule(keep.target), HeadGate):
        # As for blocks: one op, and the gate's own tensor (a static decision keeps its gather).
        # The region then starts at the gate and takes what reads its decision on the way to the
        # output (GQA's per-group unions of it, read by the K/V calls).
        candidates.append((region_between([keep], sink), True))
    candidates.append((region_between([plan], sink), False))
    for region, moved_gate in candidates:
        found = _chain_inputs(region, sink, like, x)
        if not isinstance(found, str):
            break
    else:  # the pass checked the region without its gate before building the chain (pipeline)
        raise RuntimeError(f"dhp_fx: chain {plan.target} cannot run as one opaque call: {found}")
    inputs, tensors, sizes, recipe = found

    sub = fx.Graph()
    env = {n: sub.placeholder(f"input_{i}") for i, n in enumerate(inputs)}
    for node in region:
        env[node] = sub.node_copy(node, env.__getitem__)
    sub.output(env[sink])
    graph_module = fx.GraphModule(gm, sub, class_name="OpaqueChain")
    call_id = next(_CALL_IDS)
    chain.opaque_graphs[call_id] = graph_module
    sources = tuple((True, tensors.index(n)) if n in tensors else (False, sizes.index(n)) for n in inputs)
    _CHAINS[call_id] = (weakref.ref(graph_module), sources, tensors.index(x), like.dtype, recipe)

    with gm.graph.inserting_before(sink):
        new = gm.graph.call_function(torch.ops.dhp.run_chain.default, (tensors, sizes, call_id))
    sink.replace_all_uses_with(new)
    targets = {n.target for n in region if n.op == "call_module"}
    for node in reversed(region):
        gm.graph.erase_node(node)
    for target in targets:
        if not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
            gm.delete_submodule(target)  # its state would be seen as the traced graph's
    return moved_gate


def _tap_to_op(gm: fx.GraphModule, node: fx.Node, tap: GateTap) -> bool:
    gated = node.args[0]
    if not (isinstance(gated, fx.Node) and gated.target is torch.ops.dhp.gated_attention.default
            and list(gated.users) == [node]):
        return False
    new = _replace(gm, node, torch.ops.dhp.gated_attention_tapped.default, (*gated.args[:8], _register(tap.gate)))
    new.meta.update(gated.meta)
    gm.graph.erase_node(gated)
    return True


def make_opaque(gm: fx.GraphModule) -> dict[str, int]:
    """Turn a rewritten inference graph's compact chains, compact blocks and taps into opaque op
    calls, for a downstream compiler that traces it; returns counts for the compiler's counters
    (``opaque_block_gates`` counts the gates that moved into a block's or a chain's op)."""
    counts = {"opaque_blocks": 0, "opaque_block_gates": 0, "opaque_taps": 0, "opaque_chains": 0}
    plans = [n for n in gm.graph.nodes if n.op == "call_module" and n.kwargs.get("kind") == "plan"
             and isinstance(gm.get_submodule(n.target), CompactChain)]
    for plan in plans:
        counts["opaque_block_gates"] += _chain_to_op(gm, plan, gm.get_submodule(plan.target))
        counts["opaque_chains"] += 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, CompactChain):
            raise RuntimeError(f"dhp_fx: chain call {node.name} lies outside its plan's region")
        if isinstance(module, CompactBlock):
            counts["opaque_block_gates"] += _block_to_op(gm, node, module)
            counts["opaque_blocks"] += 1
        elif isinstance(module, GateTap) and _tap_to_op(gm, node, module):
            counts["opaque_taps"] += 1
    gm.graph.lint()
    gm.recompile()
    return counts
