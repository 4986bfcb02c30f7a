"""Hand a whole attention block to one call that can run its kept heads only.

After ``skip_projections`` has routed all four projections of a site through the head ops and
moved the gate in front of them, the layouts it proved say what the block computes: q is the Q
projection's features [start + h*D, start + (h+1)*D) viewed [B, H, L, D], likewise k and v, and
the output projection reads head h's output at features [h*Dv, (h+1)*Dv). When the batch and
sequence dims of each projection's input reach the op in order (the standard
``view(B, L, H, D).transpose(1, 2)``), the block is determined by its inputs, its weights and the
keep mask. It is then replaced by the gate's ``block_module``, which chooses per call between
gathering the kept heads' weights (dense GEMMs and attention on the kept heads only) and the
head ops the graph held before.

The gate's tap is not inserted for such a site: the block module calls it itself whenever the
gate left work that needs every head's q, k, v (calibration, attention maps, training).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from . import head_layout as hl
from .graph_utils import constant_factor, example_value, holds_non_tensor, is_call, is_method
from .rewrite import erase_dead
from .skip_projections import ROLES, _Site

_VIEWS = ("view", "reshape")


def _in_order(dims: list[list[hl.Atom]], sizes: tuple, want: list[tuple[int, int]]) -> bool:
    """dims[i] is source dim j of the projection input, whole, for each (i, j) of want; a dim of
    size 1 leaves no atom (``head_layout.initial`` drops them)."""
    for i, j in want:
        atoms = dims[i]
        if atoms == [] and hl.known_eq(sizes[j], 1):
            continue
        if len(atoms) != 1 or atoms[0].kind != "other" or atoms[0].source_dim != j:
            return False
    return True


def _moves_elements(node: fx.Node) -> bool:
    return (hl.is_shape_op(node) or is_call(node, operator.getitem, torch.cat, torch.stack, torch.split, torch.chunk,
                                             torch.unbind)
            or is_method(node, "split", "chunk", "unbind"))


def _path_factor(path: list[fx.Node]) -> Optional[float]:
    """The product of constant factors on a path that otherwise only moves elements and keeps
    their dtype (views, transposes, splits, selections); None when anything else computes: an
    elementwise op with a tensor operand (RoPE) or a cast computes values the block, which
    recomputes the op's input from the projection alone, would not. OPT and Whisper scale q by a
    constant before the head split; the block folds that into the attention scale."""
    want = example_value(path[0])
    factor = 1.0
    for node in path[1:]:
        if is_call(node, *hl.ELEMENTWISE) or is_method(node, *hl.ELEMENTWISE_METHODS):
            c = constant_factor(node)
            if c is None:
                return None
            factor *= c
            continue
        if not _moves_elements(node):
            return None  # a per-head LayerNorm, a reduction: values the block would not compute
        val = example_value(node)
        if isinstance(val, torch.Tensor) and want is not None and val.dtype != want.dtype:
            return None
    return factor


def _block_input(state: _Site, role: str) -> Optional[fx.Node]:
    """The [B, L, d_in] tensor whose features reach the op as [B, H, L, D] in the standard way."""
    node, lay, path = state.replaced.get(role), state.layouts.get(role), state.paths.get(role)
    if node is None or lay is None or path is None or _path_factor(path) is None:
        return None
    x = node.args[0]
    if node.args[5]:  # HF Conv1D: addmm on x.view(-1, d_in); the layouts name the 3-D source's dims
        x = x.args[0] if isinstance(x, fx.Node) and x.op == "call_method" and x.target in _VIEWS else None
    val = example_value(x)
    if val is None or val.dim() != 3:
        return None
    _, dim = state.role_geometry(role)
    within = lay.dims[3]
    one_digit = len(within) == 1 and within[0].kind == "raw" and within[0].stride == 1
    if not (one_digit and hl.known_eq(within[0].size, dim)):
        return None
    return x if _in_order(lay.dims, tuple(val.shape), [(0, 0), (2, 1)]) else None


def _output_in_order(state: _Site) -> bool:
    """The output projection reads rows in (batch, query) order of the op's output, in its dtype
    (a cast on the way would change what the block's output GEMM computes)."""
    q = example_value(state.gated.args[0])  # the op's output has q's dtype
    entering = example_value(state.out_input) if state.out_input is not None else None
    if q is None or entering is None or entering.dtype != q.dtype:
        return False
    lead = state.out_lead
    want = [j for j in (0, 2) if not hl.known_eq(q.shape[j], 1)]
    return len(lead) == len(want) and all(a.kind == "other" and a.source_dim == j for a, j in zip(lead, want))


def _flags_spec(flags: fx.Node, keep: fx.Node):
    """What a head op's flags were, for the block's fallback: "keep" (the gate's [B, H] mask),
    "any" (its union over the batch), a recipe (see :func:`flags_recipe`) or the node itself.
    Only the fallback reads them, so a name lets the block skip computing them when it runs the
    kept heads alone: on an H200 the two unions per layer cost 13 µs at batch 1 (session 10); a
    fused projection's feature flags (any, unsqueeze, expand, new_ones, cat, flatten) cost 24 µs
    per layer on a 2-core CPU between a decoding step's GEMMs (session 22)."""
    if flags is keep:
        return "keep"
    if (flags.op == "call_method" and flags.target == "any" and flags.args == (keep, 0) and not flags.kwargs):
        return "any"
    recipe = flags_recipe(flags, keep)
    return flags if recipe is None else recipe


# What a flags recipe may replay: the ops skip_projections builds feature flags with.
_RECIPE_METHODS = frozenset({"any", "unflatten", "new_ones", "repeat_interleave", "unsqueeze", "expand", "flatten"})
_RECIPE_FUNCTIONS = {"cat": torch.cat, "getitem": operator.getitem}
RECIPE = "flags_recipe"


def flags_recipe(flags: fx.Node, keep: fx.Node) -> Optional[tuple]:
    """``(RECIPE, steps)``: the ops computing flags from keep alone, as literals the graph can
    carry (strings "%keep" and "%i" name keep and step i's value); None when flags read anything
    else or an op a recipe does not replay. :func:`replay_flags` computes them again."""
    steps: list[tuple] = []
    number: dict[fx.Node, int] = {}

    def encode(a):
        if isinstance(a, fx.Node):
            if a is keep:
                return "%keep"
            if a not in number and not visit(a):
                raise LookupError
            return f"%{number[a]}"
        if isinstance(a, (tuple, list)):
            return tuple(encode(x) for x in a)
        if isinstance(a, slice):  # its bounds must be literals too
            return slice(*(encode(x) for x in (a.start, a.stop, a.step)))
        if isinstance(a, str) or not isinstance(a, (int, float, bool, type(None))):
            raise LookupError  # a literal string would read as a reference
        return a

    def visit(node: fx.Node) -> bool:
        if node.kwargs:
            return False
        if node.op == "call_method" and node.target in _RECIPE_METHODS:
            kind, name = "method", node.target
        elif node.op == "call_function" and any(node.target is f for f in _RECIPE_FUNCTIONS.values()):
            kind, name = "function", next(k for k, f in _RECIPE_FUNCTIONS.items() if node.target is f)
        else:
            return False
        steps.append((kind, name, encode(node.args)))
        number[node] = len(steps) - 1
        return True

    try:
        if not visit(flags):
            return None
    except LookupError:
        return None
    return RECIPE, tuple(steps)


def replay_flags(recipe: tuple, keep: torch.Tensor) -> torch.Tensor:
    """The flags a :func:`flags_recipe` recorded, computed from this call's keep."""
    values: list = []

    def decode(a):
        if isinstance(a, str):
            return keep if a == "%keep" else values[int(a[1:])]
        if isinstance(a, tuple):
            return tuple(decode(x) for x in a)
        return a

    for kind, name, args in recipe[1]:
        args = decode(args)
        values.append(getattr(args[0], name)(*args[1:]) if kind == "method" else _RECIPE_FUNCTIONS[name](*args))
    return values[-1]


def compact_site(gm: fx.GraphModule, state: _Site, gate_target: Optional[str], tensor_args_only: bool = False) -> bool:
    """Replace the site's block by its gate's block module when the proofs allow; True if done.
    ``tensor_args_only``: decline when a graph argument of the call is not a tensor (a symbolic
    scale), which an opaque op's tensor list cannot carry."""
    site = state.site
    if set(state.roles()) != {"q", "k", "v", "out"}:
        state.result.bump("no_compact_block:projections_not_all_skipped")
        return False
    if any(state.proj.head_strides.get(r) is not None for r in ROLES):
        # The block gathers each role's heads as one contiguous range of rows.
        state.result.bump("no_compact_block:interleaved_heads")
        return False
    block = getattr(gm.get_submodule(gate_target), "block_module", None) if gate_target else None
    if not isinstance(block, nn.Module):
        state.result.bump("no_compact_block:gate_has_no_block")
        return False
    if site.num_kv_heads < 2:  # one KV group: nothing to leave out (MQA, a single head)
        state.result.bump("no_compact_block:one_kv_head")
        return False
    inputs = {role: _block_input(state, role) for role in ROLES}
    if any(x is None for x in inputs.values()) or not _output_in_order(state):
        state.result.bump("no_compact_block:layout")
        return False

    nodes: list[fx.Node] = []
    for role in ROLES:
        if state.replaced[role] not in nodes:
            nodes.append(state.replaced[role])
    keep = state.gated.args[3]
    projections = tuple((*n.args[:3], _flags_spec(n.args[3], keep), *n.args[4:6],
                         inputs[next(r for r in ROLES if state.replaced[r] is n)]) for n in nodes)
    roles = tuple((nodes.index(state.replaced[r]), (state.proj.features.get(r) or (0,))[0]) for r in ROLES)
    out = state.replaced["out"]
    out_val = example_value(out)
    flat = out_val is not None and out_val.dim() == 2
    _x, w_o, b_o, flags_o, unit_o, in_out_o = out.args[:6]
    flags_o = _flags_spec(flags_o, keep)
    mask, dropout_p, is_causal, scale = state.gated.args[4:8]
    factors = tuple(_path_factor(state.paths[r]) for r in ROLES)
    if factors[2] != 1.0 or (factors[:2] != (1.0, 1.0) and isinstance(scale, fx.Node)):
        state.result.bump("no_compact_block:scaled_v_or_runtime_scale")  # nothing to fold v's factor into
        return False

    args = (keep, mask, dropout_p, is_causal, scale)
    kwargs = dict(projections=projections, roles=roles, out_projection=(w_o, b_o, flags_o, unit_o, in_out_o, flat),
                  geometry=(site.num_heads, site.num_kv_heads, site.head_dim, site.value_head_dim),
                  qk_factors=factors[:2])
    if tensor_args_only and any(map(holds_non_tensor, pytree.tree_leaves((args, kwargs)))):
        state.result.bump("no_compact_block:symbolic_argument")
        return False

    target = gate_target.replace("dhp_gate_", "dhp_block_", 1)
    gm.add_submodule(target, block)
    with gm.graph.inserting_before(out):
        call = gm.graph.call_module(target, args, kwargs)
    for key in ("example_value", "nn_module_stack", "source_fn_stack", "stack_trace"):
        if key in out.meta:
            call.meta[key] = out.meta[key]
    out.replace_all_uses_with(call)
    erase_dead(out)
    state.result.bump("compact_block")
    return True
