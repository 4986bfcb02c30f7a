"""Compact blocks whose q/k path computes (RoPE): keep the graph's own ops, feed them kept heads.

``compact_heads`` replaces a block by one call that recomputes q, k, v from the projections, which
is only right when nothing but element moves lies in between. Rotary embeddings (Llama, Qwen,
Mistral) multiply and add on that path. They are head-agnostic, though: cos and sin broadcast
over the head dim. So here the graph between the projections and the output projection stays as
it is, and only four kinds of node change, each into a call of the gate's ``chain_module``:

- ``plan = chain(keep, x, kind="plan", ...)``, before the first projection (x: its input): the
  call's kept KV groups and their gathered weights; or, where every head runs, the dense
  originals (all kept; on CPU also rows too short to compact apart, pruned heads then zeroed)
  or None (the head ops run as before);
- each Q/K/V head op: ``chain(keep, x, w, b, flags, unit, in_out, kind="proj", plan=..., role=...)``
  gives [B, L, cap · dim] features;
- the gated op: ``chain(q, k, v, keep, mask, dropout_p, is_causal, scale, kind="core", plan=...)``
  (its first five arguments stay the op's, so the gate's tap is inserted as for the op);
- the output head op: ``chain(keep, o, w, b, flags, unit, in_out, kind="out", plan=...)``.

That is exact only if every op in between works for any head count. Proven per node, from the
layouts ``skip_projections`` tracked: views and reshapes give the head dim as -1; elementwise
operands other than the path broadcast over the head dim; selections, unbinds and
concatenations act on dims that hold no heads (a projection's flat output holds them all, so a
slice of it declines). Anything else declines (``no_compact_chain:<reason>``).

One projection of q, k and v is one "proj" call: role -1 when its features are q's heads, then
k's, then v's (ModernBERT's Wqkv, the order of the gathered rows), role -2 when they are
[q_h, k_h, v_h] head by head (GPT-NeoX). The graph's own view(..., 3, -1, D) and unbind, or
view(..., -1, 3 * D) and chunk, then split the kept heads' features as they split all of them.
Phi-3 instead slices its fused output at fixed widths (``qkv[..., :H * D]``), GPT-2 splits it
(``qkv.split(E, dim=2)``); a slice or split chunk that takes exactly one role's features becomes
``chain(t, kind="role", plan, role, geometry)``, which cuts at the widths of the heads the call
computes.

A view that names the head count (``view(B, L, H, D)``, ``reshape(B, L, H * D)``) is rewritten
to read it off the input dim that holds the same heads where there is one (GPT-2's
``view(-1, H * D)`` of [B, L, H * D]), else to infer it (-1); a size the view inferred before
(OPT's ``view(B, -1, H, D)``) is then named: its static value, or the input's size.

A query chain (``is_query_chain``) is the same with K and V left whole, where something else
reads them (a KV cache): only the Q and output head ops become calls (and, for one projection of
q, k and v, the role cuts), the plan (``query_only``) gathers the kept query heads' Q rows and
W_o columns (HF Conv1D weights too: ``in_out``), and the core takes the graph's K and V of every
head. Only the q path and the output chain need the per-node proof.
"""
from __future__ import annotations

import operator
from typing import Any, NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from . import head_layout as hl
from .compact_heads import _flags_spec
from .graph_utils import example_value, is_call, is_method
from .projections import last_dim_slice, second_last_index, split_chunk
from .rewrite import erase_dead
from .skip_projections import ROLES, _Site

_VIEWS = ("view", "reshape")


def _head_dims(lay: hl.Layout, dim: int, width: Optional[int] = None) -> list[int]:
    """Dims of a layout that hold the head index: a "head" atom, or a digit of the projection's
    features that spans more than one head (``dim`` features: a head's own, or its period in a
    per-head fused layout), short of the role's ``width`` (a
    digit worth a role's whole width picks q, k or v of a fused projection, not a head). A
    projection's flat output is such a dim: a slice of it would cut at a fixed feature, which
    moves when fewer heads are computed."""
    def spans_heads(a: hl.Atom) -> bool:
        if a.kind == "head":
            return True
        if a.kind != "raw" or (width is not None and a.stride >= width):
            return False
        return not isinstance(a.size, int) or a.stride * a.size > dim

    return [i for i, d in enumerate(lay.dims) if any(spans_heads(a) for a in d)]


def _shape_args(node: fx.Node) -> Optional[list]:
    """A view's sizes as given: ints and size nodes; a shape computed as one value (HF Conv1D's
    ``x.size()[:-1] + (nf,)`` under dynamic shapes) as its recorded value's entries."""
    args = list(node.args[1:]) if node.op == "call_method" else list(node.args[1:2])
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    elif len(args) == 1 and is_call(args[0], torch.Size) and isinstance(args[0].args[0], (tuple, list)):
        args = list(args[0].args[0])  # Dynamo's torch.Size([s0, s1, 96]) of the sizes it computed
    return args


def _slices_spare_heads(index, ndim: int, heads: list[int]) -> bool:
    """x[..., a:b:c] or x[:, :, :, :r]: plain slices that cut no dim holding heads."""
    index = index if isinstance(index, tuple) else (index,)
    if not all(i is Ellipsis or isinstance(i, slice) for i in index) or index.count(Ellipsis) > 1:
        return False
    if Ellipsis in index:
        e = index.index(Ellipsis)
        dims = list(range(e)) + list(range(ndim - (len(index) - e - 1), ndim))
        index = index[:e] + index[e + 1:]
    else:
        dims = list(range(len(index)))
    return all(i == slice(None) or d not in heads for d, i in zip(dims, index))


def _node_ok(node: fx.Node, lay: hl.Layout, on_path: set, dim: int, width: Optional[int] = None,
             freed: Optional[list] = None, lay_in: Optional[hl.Layout] = None) -> Optional[str]:
    """None when ``node`` works unchanged on fewer heads, or will once the view it is stops naming
    its head dim's size (appended to ``freed`` as (node, {dim: new size}), see _free_head_sizes);
    else why not. ``lay`` is the node's layout (head_layout gives a tuple-valued node, an unbind or
    split, its input's), ``lay_in`` its input's where known."""
    heads = _head_dims(lay, dim, width)
    if len(heads) > 1:
        return "heads_split"
    if is_method(node, *_VIEWS) or is_call(node, torch.reshape):
        shape = _shape_args(node)
        if shape is None or len(shape) != len(lay.dims):
            return "head_count_in_view"
        named = [i for i in heads if not _is_minus_one(shape[i])]
        if named:
            # view(B, L, H, D) holds the head count; view(B, L, -1, D) infers the same H from
            # every head's features, and the kept heads' count from theirs. Where an input dim
            # holds the same heads (GPT-2's view(-1, H * D) of [B, L, H * D]), its size names
            # them. Otherwise only one size may be inferred: one the view infers already (OPT's
            # view(B, -1, H, D)) must then be named: its static size, or the input dim that
            # holds the same atoms.
            same = _same_dim(lay_in, lay.dims[named[0]])
            if same is not None and freed is not None:
                freed.append((node, {named[0]: ("dim", same)}))
                return None
            inferred = [i for i, a in enumerate(shape) if _is_minus_one(a)]
            source = None
            if len(inferred) == 1:
                val = example_value(node)
                size = val.shape[inferred[0]] if isinstance(val, torch.Tensor) else None
                atoms = lay.dims[inferred[0]]
                same = _same_dim(lay_in, atoms)
                if type(size) is int:
                    source = size
                elif same is not None:
                    source = ("dim", same)
            if freed is None or len(inferred) > 1 or (inferred and source is None):
                return "head_count_in_view"
            freed.append((node, {named[0]: -1, **({inferred[0]: source} if inferred else {})}))
        return None
    if is_method(node, "unflatten") or is_call(node, torch.unflatten):
        return _unflatten_ok(node, heads, freed)
    if is_call(node, *hl.ELEMENTWISE) or is_method(node, *hl.ELEMENTWISE_METHODS):
        out_dims = len(lay.dims)
        for other in node.all_input_nodes:
            if other in on_path:
                continue
            val = example_value(other)
            if not isinstance(val, torch.Tensor):
                continue
            for i in heads:
                j = i - (out_dims - val.dim())
                if j >= 0 and not hl.known_eq(val.shape[j], 1):
                    return "per_head_operand"
        return None
    if is_call(node, operator.getitem):
        if isinstance(node.args[1], int) and _is_unbind(node.args[0]):
            return None  # one tensor of an unbind, whose dim was checked at the unbind
        src = example_value(node.args[0])
        if lay_in is not None and isinstance(src, torch.Tensor) and \
                second_last_index(node.args[1], list(src.shape)) is not None:
            # x[..., i, :] (BLOOM's role of a (.., H, 3, D) view): fine where that dim holds no heads
            return None if src.dim() - 2 not in _head_dims(lay_in, dim, width) else "selection"
        return None if _slices_spare_heads(node.args[1], len(lay.dims), heads) else "selection"
    if _is_unbind(node):  # its layout is its input's (head_layout): the dim must hold no heads
        dim = _unbind_dim(node, len(lay.dims))
        return None if dim is not None and dim not in heads else "unbind_of_heads"
    if is_call(node, torch.cat, torch.stack):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        return None if dim in (-1, len(lay.dims) - 1) else "concatenation"
    if is_method(node, "flatten", "unsqueeze") or is_call(node, torch.flatten, torch.unsqueeze):
        return None  # names no size, so it holds for any head count
    if is_method(node, "transpose", "permute", *hl.IDENTITY_METHODS) or is_call(node, torch.transpose, torch.permute):
        return None
    if is_method(node, *hl.LAST_DIM_REDUCTIONS) or is_call(node, torch.mean, torch.sum):
        return None  # head_layout proved it reduces within one head (a per-head q/k norm)
    return "op"


def _unflatten_ok(node: fx.Node, heads: list[int], freed: Optional[list]) -> Optional[str]:
    """unflatten(d, sizes): where a size names the head count (the bmm matcher's unflatten(0,
    (-1, H)) of heads folded into the batch), that size becomes -1 and the one it inferred is
    named by its static value (appended to ``freed`` as (node, {"unflatten": sizes}))."""
    val = example_value(node)
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    sizes = node.args[2] if len(node.args) > 2 else node.kwargs.get("sizes")
    if not isinstance(val, torch.Tensor) or not isinstance(d, int) or not isinstance(sizes, (tuple, list)):
        return "head_count_in_view"
    d %= val.dim() - len(sizes) + 1
    named = [i for i, size in enumerate(sizes) if d + i in heads and not _is_minus_one(size)]
    if not named:
        return None
    if len(named) > 1 or freed is None:
        return "head_count_in_view"
    new = list(sizes)
    for i, size in enumerate(sizes):
        if _is_minus_one(size):
            if type(val.shape[d + i]) is not int:
                return "head_count_in_view"
            new[i] = val.shape[d + i]
    new[named[0]] = -1
    freed.append((node, {"unflatten": tuple(new)}))
    return None


def _is_minus_one(size) -> bool:
    return isinstance(size, int) and size == -1


def _same_dim(lay_in: Optional[hl.Layout], atoms: list) -> Optional[int]:
    """The dim of ``lay_in`` holding exactly ``atoms`` (a dim of size 1 holds none: no match)."""
    if lay_in is None or not atoms:
        return None
    return next((j for j, d in enumerate(lay_in.dims)
                 if len(d) == len(atoms) and all(a.same(b) for a, b in zip(d, atoms))), None)


def _free_head_sizes(graph: fx.Graph, freed: list) -> None:
    """Rewrite each (view, {dim: size}) of ``freed``: each dim's size becomes -1, a static int, or
    ("dim", j): the view input's size j, read at run time; in whichever form the view takes its
    shape (sizes as arguments, or one tuple)."""
    for node, sizes in freed:
        if "unflatten" in sizes:
            node.args = (node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["dim"],
                         sizes["unflatten"])
            node.kwargs = {}
            continue
        shape = list(_shape_args(node))  # a torch.Size node's entries become the view's own
        for i, size in sizes.items():
            if isinstance(size, tuple):
                with graph.inserting_before(node):
                    size = graph.call_method("size", (node.args[0], size[1]))
            shape[i] = size
        packed = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], fx.Node) else None
        if node.op == "call_method" and not (len(node.args) == 2 and isinstance(node.args[1], (tuple, list))):
            node.args = (node.args[0], *shape)
        else:
            node.args = (node.args[0], tuple(shape), *node.args[2:])
        if packed is not None and not packed.users:
            graph.erase_node(packed)


def _unbind_dim(node: fx.Node, ndim: int) -> Optional[int]:
    position = 1 if node.target in ("unbind", torch.unbind) else 2  # split/chunk: (t, sizes, dim)
    dim = node.kwargs.get("dim", node.args[position] if len(node.args) > position else 0)
    return dim % ndim if isinstance(dim, int) else None


def _is_unbind(node: Any) -> bool:
    """unbind, split or chunk: tuple-valued, along one dim, whatever that dim's size."""
    return isinstance(node, fx.Node) and (is_method(node, "unbind", "split", "chunk")
                                          or is_call(node, torch.unbind, torch.split, torch.chunk))


def _role_slices(state: _Site, fused_node: fx.Node) -> dict[int, fx.Node]:
    """Role index -> the node taking exactly that role's features out of the fused projection:
    a slice (Phi-3's ``qkv[..., :H * D]``, ``qkv[..., H * D:(H + K) * D]``, ``qkv[..., (H + K) * D:]``)
    or a chunk of a split along the features (GPT-2's ``qkv.split(E, dim=2)``), of the
    projection's output or of a view of it that keeps its features in the last dim."""
    val = example_value(fused_node)
    width = val.shape[-1] if isinstance(val, torch.Tensor) else None
    found = {}
    for i, role in enumerate(ROLES):
        features = state.proj.features.get(role)
        for node in (state.paths.get(role) or [])[1:]:
            if features is None or not is_call(node, operator.getitem) or not _features_of(node.args[0], fused_node,
                                                                                            width):
                continue
            if _is_unbind(node.args[0]):
                chunk = split_chunk(node.args[0], node.args[1])
                if chunk is not None and tuple(chunk[1]) == tuple(features):
                    found[i] = node
            else:
                sizes = list(example_value(node.args[0]).shape)
                if last_dim_slice(node.args[1], sizes) == tuple(features):
                    found[i] = node
    return found


class _HeadCuts(NamedTuple):
    """How a graph cuts one projection laid out [q_h, k_h, v_h] head by head into roles."""

    view: fx.Node  # (.., H, period) or (.., H, 3, D) of the projection's output
    moves: list  # transposes / permutes after it, redone on the heads each role's call gives
    split: Optional[fx.Node]  # of the last dim into q's, k's and v's features; None: selects
    cuts: dict  # role index -> its chunk, or its x[..., i, :]

    @property
    def dead(self) -> frozenset:
        """Left without readers once each role reads its own call."""
        return frozenset({self.view, *self.moves, *([self.split] if self.split is not None else []),
                          *self.cuts.values()})


def _per_head_cuts(state: _Site, fused_node: fx.Node) -> Optional[_HeadCuts]:
    """How the graph cuts one projection laid out [q_h, k_h, v_h] head by head: GPT-NeoX views
    its output (.., H, period), transposes or permutes that keep the last dim last, then splits
    the last dim into q's, k's and v's features; BLOOM and Falcon view it (.., H, 3, D) and take
    x[..., i, :] for role i. None for any other form."""
    users = list(fused_node.users)
    if len(users) != 1 or not (is_method(users[0], *_VIEWS) or is_call(users[0], torch.reshape)):
        return None
    view = users[0]
    src, out = example_value(fused_node), example_value(view)
    geometry = [state.role_geometry(r) for r in ROLES]
    dims = [dim for _, dim in geometry]
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and out.dim() > src.dim()
            and all(hl.known_eq(a, b) for a, b in zip(out.shape[:src.dim() - 1], src.shape[:-1]))
            and hl.known_eq(out.shape[src.dim() - 1], state.site.num_heads)):
        return None
    if out.dim() == src.dim() + 2:  # (.., H, 3, D): one role per index of the 3
        if len(set(dims)) != 1 or not (hl.known_eq(out.shape[-2], 3) and hl.known_eq(out.shape[-1], dims[0])):
            return None
        cuts = {}
        for g in view.users:
            role = second_last_index(g.args[1], list(out.shape)) if is_call(g, operator.getitem) else None
            if role is None or role in cuts:
                return None
            cuts[role] = g
        return _HeadCuts(view, [], None, cuts) if len(cuts) == 3 else None
    if out.dim() != src.dim() + 1 or not hl.known_eq(out.shape[-1], sum(dims)):
        return None
    moves, node, last = [], view, out.dim() - 1
    while len(node.users) == 1:
        nxt = next(iter(node.users))
        if is_method(nxt, "transpose") or is_call(nxt, torch.transpose):
            if any(not isinstance(d, int) or d % out.dim() == last for d in nxt.args[1:3]):
                return None
        elif is_method(nxt, "permute") or is_call(nxt, torch.permute):
            order = nxt.args[1:] if is_method(nxt, "permute") else nxt.args[1]
            order = order[0] if len(order) == 1 and isinstance(order[0], (tuple, list)) else order
            if not order or not isinstance(order[-1], int) or order[-1] % out.dim() != last:
                return None
        else:
            break
        moves.append(nxt)
        node = nxt
    split = next(iter(node.users)) if len(node.users) == 1 else None
    if not _is_unbind(split):
        return None
    starts = [0, geometry[0][1], geometry[0][1] + geometry[1][1]]
    cuts: dict[int, fx.Node] = {}
    for g in split.users:
        chunk = split_chunk(split, g.args[1]) if is_call(g, operator.getitem) else None
        role = next((i for i, (start, (_, dim)) in enumerate(zip(starts, geometry))
                     if chunk is not None and tuple(chunk[1]) == (start, start + dim)), None)
        if role is None or role in cuts:
            return None
        cuts[role] = g
    return _HeadCuts(view, moves, split, cuts) if len(cuts) == 3 else None


def _features_of(node: Any, fused_node: fx.Node, width) -> bool:
    """``node`` is the fused projection's output, a view (or unsqueeze) of it with the same last
    dim, or a split of either along the last dim (checked by split_chunk)."""
    if _is_unbind(node):
        node = node.args[0]
    if node is fused_node:
        return True
    if not (is_method(node, *_VIEWS, "unsqueeze") or is_call(node, torch.reshape, torch.unsqueeze)) \
            or node.args[0] is not fused_node:
        return False  # GPTBigCode: unsqueeze(1) before its split
    val = example_value(node)
    return isinstance(val, torch.Tensor) and width is not None and hl.known_eq(val.shape[-1], width)


def _paths_ok(state: _Site, fused: bool = False, role_slices: Optional[dict] = None,
              roles: tuple[str, ...] = ROLES, freed: Optional[list] = None, dead: frozenset = frozenset()
              ) -> Optional[str]:
    # role slices become "role" calls, proven by _role_slices; dead nodes lose their readers
    rewritten = set((role_slices or {}).values()) | dead
    # a split all of whose chunks become "role" calls is left without readers
    rewritten |= {n.args[0] for n in rewritten if _is_unbind(n.args[0])
                  and {u for u in n.args[0].users} <= rewritten}
    for role in roles:
        layouts, path = state.node_layouts.get(role), state.paths.get(role)
        if layouts is None or path is None:
            return "layout"
        on_path = set(path) | {state.replaced.get(role)}  # path[0] is the linear its head op replaced
        heads = state.role_geometry(role)[0]
        period = state.head_stride(role)  # a head's features, or its share of a per-head fused layout
        width = heads * period if fused else None
        for node in path[1:]:
            if node in rewritten:
                continue
            source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if source is not None and source is state.replaced.get(role):
                source = path[0]
            why = _node_ok(node, layouts[node], on_path, period, width, freed, layouts.get(source))
            if why is not None:
                return why
    chain = {node for node, _ in state.out_chain} | {state.gated}
    before = dict(state.out_chain)
    for node, lay in state.out_chain:
        why = _node_ok(node, lay, chain, state.site.value_head_dim, freed=freed, lay_in=before.get(node.args[0]))
        if why is not None:
            return why
    return None


# meta key of a chain's "out" call: the fake value of the output head op it replaced.
OUT_LIKE = "dhp_chain_out_like"

# The roles of a chain "proj" call standing for one projection of q, k and v together: its
# features q's heads, then k's, then v's (ModernBERT's Wqkv), or [q_h, k_h, v_h] head by head
# (GPT-NeoX's query_key_value; MHA only).
FUSED_QKV = -1
FUSED_PER_HEAD = -2


def _fused_layout(state: _Site, node: fx.Node) -> Optional[int]:
    """FUSED_QKV or FUSED_PER_HEAD when one projection holds exactly q's, k's and v's features
    in that layout, else None. The chain computes the kept heads' rows in the same layout, so
    the graph's own view, split and RoPE after it divide them as they divide every head's."""
    val = example_value(node)
    if not isinstance(val, torch.Tensor):
        return None
    starts = [(state.proj.features.get(r) or (None,))[0] for r in ROLES]
    strides = [state.proj.head_strides.get(r) for r in ROLES]
    geometry = [state.role_geometry(r) for r in ROLES]
    if all(s is None for s in strides):
        bounds = [0]
        for heads, dim in geometry:
            bounds.append(bounds[-1] + heads * dim)
        return FUSED_QKV if starts == bounds[:3] and val.shape[-1] == bounds[3] else None
    site = state.site
    period = sum(dim for _, dim in geometry)
    if site.num_kv_heads != site.num_heads or strides != [period] * 3:
        return None
    head_starts = [0, geometry[0][1], geometry[0][1] + geometry[1][1]]
    return FUSED_PER_HEAD if starts == head_starts and val.shape[-1] == site.num_heads * period else None


def compact_chain_site(gm: fx.GraphModule, state: _Site, gate_target: Optional[str]) -> Optional[fx.Node]:
    """Rewrite the site's head ops into chain calls when the proofs allow; returns the node that
    took the gated op's place (the tap goes after it), or None."""
    site = state.site
    chain_module = getattr(gm.get_submodule(gate_target), "chain_module", None) if gate_target else None
    nodes = [state.replaced.get(r) for r in (*ROLES, "out")]
    query_only = is_query_chain(state)
    if query_only == FUSED_QUERY:  # K/V features come out of q's head op, every head's
        nodes[1] = nodes[2] = nodes[0]
    fused = all(n is not None for n in nodes) and nodes[0] is nodes[1] is nodes[2] is not nodes[3]
    layout = _fused_layout(state, nodes[0]) if fused else None
    # Only the role-major layout is cut into roles by slices; GPT-NeoX's per-head one by a view.
    role_slices = _role_slices(state, nodes[0]) if layout == FUSED_QKV else {}
    # A query chain cannot keep a per-head layout (its q has fewer heads than k and v): the
    # view, moves and split that cut it are redone per role on the heads each role computes.
    head_cuts = (_per_head_cuts(state, nodes[0]) if query_only == FUSED_QUERY and layout == FUSED_PER_HEAD
                 else None)
    present = list(dict.fromkeys(n for n in nodes if n is not None))
    roles = ("q",) if query_only else ROLES
    freed: list = []  # views whose head counts become -1, once every proof holds
    why = None
    if not isinstance(chain_module, nn.Module):
        why = "gate_has_no_chain"
    elif not query_only and (any(n is None for n in nodes) or (len(set(nodes)) != 4 and not fused)):
        why = "projections_not_separate"
    elif fused and layout is None:
        why = "fused_layout"  # neither q's heads, k's, v's, nor [q_h, k_h, v_h] head by head
    elif query_only == FUSED_QUERY and (layout != FUSED_QKV or len(role_slices) != 3) and head_cuts is None:
        # k's and v's features move when fewer q rows are computed: each role must be cut by
        # a slice the chain can redo at the new widths
        why = "fused_layout"
    elif layout != FUSED_PER_HEAD and any(state.proj.head_strides.get(r) is not None for r in roles):
        why = "interleaved_heads"
    elif not query_only and any(n.args[5] for n in present):
        why = "conv1d_layout"  # HF Conv1D weights [in, out]: query chains gather them (GPT-2)
    elif site.num_heads < 2:
        why = "one_head"  # nothing to leave out (MQA's one KV head still leaves query heads)
    else:
        why = _paths_ok(state, fused, role_slices, roles, freed, head_cuts.dead if head_cuts else frozenset())
    if why is not None:
        state.result.bump(f"no_compact_chain:{why}")
        return None

    graph = gm.graph
    index = {n: i for i, n in enumerate(graph.nodes)}
    first = min(present[:-1], key=index.__getitem__)
    # wq, bq, wk, bk, wv, bv, wo, bo; a query chain's own K/V projections are the graph's
    weights = tuple(t for n in nodes for t in (n.args[1:3] if n is not None else (None, None)))
    if any(isinstance(t, fx.Node) and index[t] > index[first] for t in weights):
        state.result.bump("no_compact_chain:weights_after_projection")
        return None
    keep = state.gated.args[3]
    old_flags = [n.args[3] for n in present]
    _free_head_sizes(graph, freed)

    target = gate_target.replace("dhp_gate_", "dhp_chain_", 1)
    gm.add_submodule(target, chain_module)
    geometry = (site.num_heads, site.num_kv_heads, site.head_dim, site.value_head_dim)
    starts = tuple((state.proj.features.get(r) or (0,))[0] for r in ROLES)
    with graph.inserting_before(first):
        # first's input gives the rows' token count, which decides whether rows compact apart
        periods = tuple(state.proj.head_strides.get(r) for r in ROLES)
        plan_kwargs = dict(kind="plan", weights=weights[:6] + weights[6:7], starts=starts, geometry=geometry,
                           periods=periods)
        if query_only:
            plan_kwargs["query_only"] = True
            if nodes[0].args[5] or nodes[3].args[5]:
                plan_kwargs["in_out"] = (nodes[0].args[5], nodes[3].args[5])
        plan = graph.call_module(target, (keep, first.args[0]), plan_kwargs)
    done = set()
    for role_index, node in enumerate(nodes):
        if node is None or node in done:
            continue  # a query chain's K/V projection, or a fused projection rewritten as q's
        done.add(node)
        x, w, b, flags, unit, in_out = node.args[:6]
        kind = "proj" if role_index < 3 else "out"
        role = layout if fused and role_index == 0 else role_index
        with graph.inserting_before(node):
            new = graph.call_module(target, (keep, x, w, b, _flags_spec(flags, keep), unit, in_out),
                                    dict(kind=kind, plan=plan, role=role, geometry=geometry))
        new.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        if kind == "out":
            # Its features do not depend on the heads run: an opaque call (dhp_fx/opaque.py)
            # gives its shape to the tracer.
            new.meta[OUT_LIKE] = example_value(node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    for role_index, node in role_slices.items():
        split = node.args[0] if _is_unbind(node.args[0]) else None
        with graph.inserting_before(node):
            cut = graph.call_module(target, (node.args[0] if split is None else split.args[0],),
                                    dict(kind="role", plan=plan, role=role_index, geometry=geometry))
        cut.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        node.replace_all_uses_with(cut)
        graph.erase_node(node)
        if split is not None and not split.users:
            graph.erase_node(split)
    if head_cuts is not None:
        for role_index, node in head_cuts.cuts.items():
            with graph.inserting_before(node):
                cut = graph.call_module(target, (head_cuts.view.args[0],),
                                        dict(kind="role_heads", plan=plan, role=role_index, geometry=geometry))
                for move in head_cuts.moves:
                    cut = graph.create_node(move.op, move.target, (cut, *move.args[1:]), dict(move.kwargs))
            cut.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
            node.replace_all_uses_with(cut)
        for node in reversed([n for n in graph.nodes if n in head_cuts.dead]):
            graph.erase_node(node)
    gated = state.gated
    with graph.inserting_before(gated):
        core = graph.call_module(target, tuple(gated.args[:8]), dict(kind="core", plan=plan, geometry=geometry))
    core.meta.update({k: v for k, v in gated.meta.items() if k != "example_value"})
    gated.replace_all_uses_with(core)
    graph.erase_node(gated)
    for flag in old_flags:
        if isinstance(flag, fx.Node) and flag.graph is not None:
            erase_dead(flag)  # a union the chain names instead of reading
    state.result.bump("compact_query_chain" if query_only else "compact_chain")
    return core


# is_query_chain's answers: q has its own projection, or shares one with k and v (Phi-3)
SEPARATE_QUERY = "separate"
FUSED_QUERY = "fused"


def is_query_chain(state: _Site) -> Optional[str]:
    """Q and the output projection skip heads, K and V do not: something else reads them whole
    (a KV cache, another site). Then a chain can still run the kept query heads alone, their Q
    rows and W_o columns gathered, over every head's K and V as the graph computes them.
    SEPARATE_QUERY where q has its own projection, FUSED_QUERY where one projection computes
    q, k and v (its q features the head op's), else None."""
    replaced, nodes = state.replaced, state.proj.nodes
    if not (replaced.get("q") is not None and replaced.get("out") is not None
            and replaced.get("k") is None and replaced.get("v") is None):
        return None
    shared = [nodes.get(r) is not None and nodes.get(r) is nodes.get("q") for r in ("k", "v")]
    return FUSED_QUERY if all(shared) else None if any(shared) else SEPARATE_QUERY
