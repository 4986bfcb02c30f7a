"""Skip pruned heads in the projections around a rewritten site, not only in the attention core.

Run right after a site is rewritten into ``keep = gate(...)`` + ``dhp::gated_attention``:

- output projection: ``linear(o, W, b)`` → ``dhp::head_linear_in(o, W, b, keep.any(0), Dv)``. Exact
  because the gated op wrote zeros for every pruned (row, head), and a head left out of the
  product is pruned in every row.
- q/k/v projections: only when the gate decides from ``hidden`` alone (``gate.reads_qkv`` is
  False): the gate moves in front of the projections as ``gate(None, None, None, mask,
  hidden=x)`` and ``linear(x, Wq, bq)`` becomes ``dhp::head_linear_out(x, Wq, bq, keep.any(0), D)``;
  k/v use the union over each KV group. Exact because the op never reads a head (or KV head)
  that no row keeps, and each remaining head's values depend on its own rows of W only, which
  ``head_layout`` proves for the ops between the projection and the op.

Anything unproven leaves that projection as it was; why is counted in ``PassResult.counters``.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx as fx

from . import head_layout as hl
from .graph_utils import _meta_value, arg, example_value, insert_node, is_call, static_int
from .projections import _ADDMM, _LINEAR, Projections, _activation_input, split_chunk
from .rewrite import _is_pure
from .site import AttentionSite, PassResult

ROLES = ("q", "k", "v")
# new_empty and its kin read self's dtype and device only (DeepSeek builds its k in one).
_META_METHODS = ("size", "dim", "numel", "stride", "get_device", "new_empty", "new_zeros", "new_ones")
_META_ATTRS = ("shape", "device", "dtype", "ndim", "is_cuda")
_INPLACE = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior)
_MAX_HOIST = 64


def _op(name: str):
    return getattr(torch.ops.dhp, name).default


def _other_chunk(user: fx.Node, split: fx.Node, path: list[fx.Node]) -> bool:
    """``user`` takes another chunk of a last-dim split than the path does: features the head op
    leaves alone, since it zeroes only the role's own (DeepSeek's kv_b_proj output holds each
    head's k_nope beside its v)."""
    if not (is_call(user, operator.getitem) and user.args[0] is split and isinstance(user.args[1], int)):
        return False
    taken = [p for p in path if is_call(p, operator.getitem) and p.args[0] is split]
    if len(taken) != 1 or not isinstance(taken[0].args[1], int) or taken[0].args[1] == user.args[1]:
        return False
    return split_chunk(split, user.args[1]) is not None and split_chunk(split, taken[0].args[1]) is not None


def _is_meta_read(node: fx.Node) -> bool:
    """Reads shape/dtype/device only: a zeroed head cannot change what it returns."""
    if node.op == "call_method" and node.target in _META_METHODS:
        return True
    if node.op == "call_function":
        if node.target is getattr and len(node.args) > 1 and node.args[1] in _META_ATTRS:
            return True
        if node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int):
            return True
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and _is_meta_read(node.args[0]):
            return True
    val = node.meta.get("example_value")
    return isinstance(val, (int, torch.SymInt, torch.Size))


def _index(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def _path(linear: fx.Node, end: fx.Node, index: dict) -> Optional[list[fx.Node]]:
    """Nodes on value paths from linear to end (both included), in graph order."""
    lo, seen, stack = index[linear], set(), [end]
    while stack:
        n = stack.pop()
        if n in seen or index.get(n, -1) < lo or _is_meta_read(n):
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    reached = {linear}
    for n in sorted(seen, key=index.__getitem__):
        if n is not linear and any(i in reached for i in n.all_input_nodes):
            reached.add(n)
    if end not in reached:
        return None
    return sorted(reached, key=index.__getitem__)


def _linear_parts(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node, Optional[fx.Node], bool]]:
    """(x, weight, bias, weight_in_out) of an F.linear or a plain HF-Conv1D addmm."""
    if is_call(node, *_LINEAR):
        return node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias"), False
    if is_call(node, *_ADDMM):
        if len(node.args) != 3 or any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or set(node.kwargs) - {"beta", "alpha"}:
            return None
        bias, x, weight = node.args
        bval = example_value(bias)
        if bval is not None and bval.dim() != 1:
            return None  # a broadcast bias the head op cannot take
        return x, weight, bias, True
    return None


def _leading_dims(linear: fx.Node) -> Optional[list[list["hl.Atom"]]]:
    """The projection output's non-feature dims, named after its input's dims; an HF Conv1D
    addmm reads x.view(-1, nx), so its dim 0 holds all of x's leading dims."""
    x = linear.args[1] if is_call(linear, *_ADDMM) else linear.args[0]
    src = x.args[0] if isinstance(x, fx.Node) and x.op == "call_method" and x.target in ("view", "reshape") else None
    xv, sv = example_value(x), example_value(src)
    if is_call(linear, *_ADDMM) and xv is not None and sv is not None and xv.dim() == 2 and sv.dim() >= 2 \
            and hl.known_eq(sv.shape[-1], xv.shape[-1]):
        return [[hl.Atom("other", s, source_dim=i) for i, s in enumerate(sv.shape[:-1])]]
    return None


def _replace_linear(graph: fx.Graph, node: fx.Node, op_name: str, heads_keep: fx.Node, unit: int) -> fx.Node:
    x, weight, bias, in_out = _linear_parts(node)
    with graph.inserting_before(node):
        new = insert_node(graph, "call_function", _op(op_name), (x, weight, bias, heads_keep, unit, in_out), meta_like=node)
    if "example_value" in node.meta:
        new.meta["example_value"] = node.meta["example_value"]  # same shape; keep has no fake value
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


class _Site:
    """What one site's projection skipping needs to know about the rewritten graph."""

    def __init__(self, gm: fx.GraphModule, gated: fx.Node, site: AttentionSite, proj: Projections,
                 gate_target: Optional[str], result: PassResult):
        self.gm, self.graph, self.gated, self.site, self.proj = gm, gm.graph, gated, site, proj
        self.gate_target, self.result = gate_target, result
        self.keep: fx.Node = gated.args[3]
        self.heads_any: Optional[fx.Node] = None
        self.flag_nodes: list[fx.Node] = []  # helper reductions this pass inserted, in order
        self.done: list[str] = []
        self.replaced: dict[str, fx.Node] = {}  # role -> the head op that took its projection's place
        self.out_lead: list[hl.Atom] = []  # atoms of the dims before the features, entering W_o
        self.out_input: Optional[fx.Node] = None  # the op's value where it enters W_o
        self.layouts: dict[str, hl.Layout] = {}  # of the op's q/k/v inputs, per proven role
        self.paths: dict[str, list[fx.Node]] = {}  # projection -> op input, per proven role
        self.node_layouts: dict[str, dict[fx.Node, hl.Layout]] = {}  # every path node's layout, per role
        self.out_chain: list[tuple[fx.Node, hl.Layout]] = []  # op -> W_o input, each node's layout
        for n in gated.args[:3]:  # the unflatten nodes the rewrite adds for bmm-style sites
            if isinstance(n, fx.Node) and example_value(n) is None:
                val = _meta_value(n.op, n.target, n.args, n.kwargs)
                if val is not None:
                    n.meta["example_value"] = val

    def roles(self) -> tuple[str, ...]:
        return tuple(r for r in ("q", "k", "v", "out") if r in self.done)

    def decline(self, what: str, reason: str) -> None:
        self.result.bump(f"no_skip_{what}_proj:{reason}")

    def any_heads(self) -> fx.Node:
        if self.heads_any is None:
            with self.graph.inserting_after(self.keep):
                self.heads_any = insert_node(self.graph, "call_method", "any", (self.keep, 0), meta_like=self.gated)
            self.flag_nodes.append(self.heads_any)
        return self.heads_any

    def drop_unused_flags(self) -> None:
        """Erase the flag reductions no replacement ended up reading (per-sample projections read
        the gate's own [B, H] mask): each would still run a kernel per layer and call."""
        for node in reversed(self.flag_nodes):
            if not node.users:
                self.graph.erase_node(node)
        self.flag_nodes.clear()

    # ------------------------------------------------------------------ q / k / v
    def role_geometry(self, role: str) -> tuple[int, int]:
        s = self.site
        heads = s.num_heads if role == "q" else s.num_kv_heads
        return heads, s.value_head_dim if role == "v" else s.head_dim

    def head_stride(self, role: str) -> int:
        """Features between two heads' starts: the head dim, or more in a per-head fused layout."""
        stride = self.proj.head_strides.get(role)
        return self.role_geometry(role)[1] if stride is None else stride

    def check_role(self, role: str, index: dict) -> tuple[Optional[list[fx.Node]], str]:
        """(path from the projection to the op, "") when the role's rows can be skipped."""
        linear = self.proj.nodes.get(role)
        if linear is None or linear.graph is None:
            return None, "not_found"
        if _linear_parts(linear) is None:
            return None, "projection_form"
        end = self.gated.args[ROLES.index(role)]
        path = _path(linear, end, index)
        if path is None:
            return None, "no_path"
        heads, head_dim = self.role_geometry(role)
        lay: dict[fx.Node, hl.Layout] = {}
        shape = tuple(example_value(linear).shape) if example_value(linear) is not None else None
        width = static_int(shape[-1]) if shape else None
        if width is None:
            return None, "shape"
        lay[linear] = hl.initial(shape, [hl.Atom("raw", width, 1)], _leading_dims(linear))
        for n in path[1:]:
            out = hl.step(n, lay, head_dim)
            if out is None:
                return None, "mixes_heads"
            lay[n] = out
        start = (self.proj.features.get(role) or (0, width))[0]
        final = lay[end]
        want = [hl.Atom("raw", heads, self.head_stride(role))] if heads > 1 else []
        ok_head = len(final.dims) == 4 and len(final.dims[1]) == len(want) and all(
            a.same(b) for a, b in zip(final.dims[1], want))
        others_within = all(hl.within_only(d, head_dim) for i, d in enumerate(final.dims) if i != 1)
        if not (ok_head and others_within and final.offset == start):
            return None, "layout"
        self.layouts[role] = final
        self.paths[role] = path
        self.node_layouts[role] = lay
        return path, ""

    def batch_leads_hidden(self, hidden: fx.Node) -> bool:
        """The moved gate reads the batch size off hidden's dim 0: it must be q's batch dim
        (nn.MultiheadAttention without batch_first feeds [L, B, E])."""
        q, h = example_value(self.gated.args[0]), example_value(hidden)
        if q is None or h is None or not hl.known_eq(q.shape[0], h.shape[0]):
            return False
        for role, lay in self.layouts.items():
            if _activation_input(self.proj.nodes[role]) is hidden:
                batch = lay.dims[0]
                return batch == [] or (len(batch) == 1 and batch[0].kind == "other" and batch[0].source_dim == 0)
        return False

    def closed(self, paths: dict[str, list[fx.Node]], role: str, everything: set) -> bool:
        """No value of role's path leaks outside the site (a cache, a returned q, another site)."""
        gate = self.keep if self.keep.op == "call_module" else None
        for n in paths[role]:
            for u in n.users:
                if u not in everything and u is not self.gated and u is not gate and not _is_meta_read(u) and not (
                        _other_chunk(u, n, paths[role])):
                    return False
        return True

    def skip_inputs(self) -> None:
        if self.gate_target is None or self.keep.op != "call_module":
            self.decline("qkv", "no_gate")
            return
        if getattr(self.gm.get_submodule(self.gate_target), "reads_qkv", True):
            self.decline("qkv", "gate_reads_qkv")
            return
        hidden = self.keep.kwargs.get("hidden")
        if hidden is None:
            self.decline("qkv", "no_hidden")
            return
        index = _index(self.graph)
        paths: dict[str, list[fx.Node]] = {}
        for role in ROLES:
            path, why = self.check_role(role, index)
            if path is None:
                self.decline(role, why)
            else:
                paths[role] = path
        if paths and not self.batch_leads_hidden(hidden):
            self.decline("qkv", "batch_not_leading")
            return
        everything = {n for p in paths.values() for n in p}
        candidates = [r for r in paths if self.closed(paths, r, everything)]
        for role in set(paths) - set(candidates):
            self.decline(role, "used_elsewhere")
        candidates = self.place_gate(candidates, hidden, everything | {self.gated, self.keep})
        if not candidates:
            return
        self.replace_inputs(candidates, hidden)

    def place_gate(self, roles: list[str], hidden: fx.Node, forbidden: set) -> list[str]:
        """Move the gate before the first projection it lets skip; drop roles it cannot precede."""
        mask = self.keep.args[3] if len(self.keep.args) > 3 else None
        while roles:
            index = _index(self.graph)
            first = min((self.proj.nodes[r] for r in roles), key=index.__getitem__)
            late = None
            if index[hidden] > index[first]:
                late = hidden
            elif isinstance(mask, fx.Node) and index[mask] > index[first] and not _hoist(mask, first, index, forbidden):
                late = mask
            if late is None:
                self.keep.args = (None, None, None, mask)
                first.prepend(self.keep)
                return roles
            for r in [r for r in roles if index[self.proj.nodes[r]] < index[late]]:
                roles.remove(r)
                self.decline(r, "mask_after_projection" if late is mask else "hidden_after_projection")
        return roles

    def kv_flags(self, flags: fx.Node) -> fx.Node:
        """KV-head flags from head flags ([H] or [B, H]): a KV head runs if any of its query heads does."""
        s = self.site
        if s.num_kv_heads == s.num_heads:
            return flags
        with self.graph.inserting_after(flags):
            grouped = insert_node(self.graph, "call_method", "unflatten",
                                  (flags, -1, (s.num_kv_heads, s.num_heads // s.num_kv_heads)), meta_like=self.gated)
        with self.graph.inserting_after(grouped):
            kv = insert_node(self.graph, "call_method", "any", (grouped, -1), meta_like=self.gated)
        self.flag_nodes += [grouped, kv]
        return kv

    def replace_inputs(self, roles: list[str], hidden: fx.Node) -> None:
        s = self.site
        heads_any = self.any_heads()
        kv_any = self.kv_flags(heads_any) if any(r in roles for r in ("k", "v")) else heads_any
        by_linear: dict[fx.Node, list[str]] = {}
        for r in roles:
            by_linear.setdefault(self.proj.nodes[r], []).append(r)
        sample = None
        for linear, rs in by_linear.items():
            keep_units = None
            if len(rs) == 1 and _linear_parts(linear)[0] is hidden:
                # The projection reads the gate's input, whose dim 0 is the batch (checked by
                # batch_leads_hidden): per-sample flags let each row skip its own heads.
                sample = sample or (self.keep, self.kv_flags(self.keep))
                heads, head_dim = self.role_geometry(rs[0])
                start = (self.proj.features.get(rs[0]) or (0,))[0]
                flags = sample[0] if rs[0] == "q" else sample[1]
                segment = (start, heads, head_dim, flags, rs[0], self.head_stride(rs[0]))
                keep_units, unit = self.feature_keep(linear, [segment], whole_only=True)
                if keep_units is not None:
                    self.result.bump("per_sample_proj")
            if keep_units is None:
                segments = []
                for r in rs:
                    heads, head_dim = self.role_geometry(r)
                    start = (self.proj.features.get(r) or (0,))[0]
                    segments.append((start, heads, head_dim, heads_any if r == "q" else kv_any, r, self.head_stride(r)))
                keep_units, unit = self.feature_keep(linear, segments)
            if keep_units is None:
                for r in rs:
                    self.decline(r, "fused_layout")
                continue
            new = _replace_linear(self.graph, linear, "head_linear_out", keep_units, unit)
            self.replaced.update((r, new) for r in rs)
            self.done += rs
        if "q" in self.done:
            self.result.bump("skip_q_proj")
        if "k" in self.done or "v" in self.done:
            self.result.bump("skip_kv_proj")

    def feature_keep(self, linear: fx.Node, segments: list, whole_only: bool = False) -> tuple[Optional[fx.Node], int]:
        """bool [W / unit] over the linear's output features: each role's head flags, True elsewhere.

        whole_only: only when one role covers every feature (the flags themselves, which may then
        be per-sample [B, H]); None otherwise."""
        width = static_int(example_value(linear).shape[-1])
        unit = math.gcd(*[hd for _, _, hd, *_ in segments])
        segments = sorted(segments, key=lambda seg: seg[0])
        if any(stride != head_dim for _, _, head_dim, _, _, stride in segments):
            return (None if whole_only else self.interleaved_keep(linear, segments, width, unit)), unit
        pos = 0
        for start, heads, head_dim, *_ in segments:
            if start < pos or start % unit:
                return None, unit  # overlapping or unaligned roles
            pos = start + heads * head_dim
        if pos > width or width % unit:
            return None, unit
        if len(segments) == 1 and segments[0][0] == 0 and pos == width and segments[0][2] == unit:
            return segments[0][3], unit
        if whole_only:
            return None, unit
        graph, pieces, pos = self.graph, [], 0
        with graph.inserting_before(linear):
            for start, heads, head_dim, flags, *_ in segments + [(width, 0, unit, None, None, unit)]:
                if start > pos:
                    pieces.append(graph.call_method("new_ones", (segments[0][3], ((start - pos) // unit,))))
                if flags is not None:
                    rep = head_dim // unit
                    pieces.append(flags if rep == 1 else graph.call_method("repeat_interleave", (flags, rep)))
                pos = start + heads * head_dim
            cat = graph.call_function(torch.cat, (pieces,))
        return cat, unit

    def interleaved_keep(self, linear: fx.Node, segments: list, width: int, unit: int) -> Optional[fx.Node]:
        """Unit flags for roles interleaved per head (GPT-NeoX: [q_h, k_h, v_h] for each h): the
        roles lie side by side in each head's period, with the same head count; True outside.
        Features of the period the roles leave (DeepSeek's kv_b_proj: [k_nope_h, v_h], v
        skipped alone) stay True."""
        heads, stride = segments[0][1], segments[0][5]
        base = segments[0][0]
        pos = base
        for start, h, head_dim, _, _, s in segments:
            if h != heads or s != stride or start != pos or head_dim % unit:
                return None
            pos = start + head_dim
        gap = base + stride - pos  # after each head's roles, up to the next head's first
        if gap < 0 or gap % unit or base % unit or width % unit or pos + (heads - 1) * stride > width:
            return None
        graph = self.graph
        with graph.inserting_before(linear):
            per_head = [graph.call_method("expand", (graph.call_method("unsqueeze", (flags, -1)), -1, head_dim // unit))
                        for _, _, head_dim, flags, _, _ in segments]
            if gap:
                per_head.append(graph.call_method("new_ones", (segments[0][3], (heads, gap // unit))))
            flat = graph.call_method("flatten", (graph.call_function(torch.cat, (per_head, -1)),))
            end = base + heads * stride
            if end > width:  # the last head's gap runs past the features: it was never there
                flat = graph.call_function(operator.getitem, (flat, slice(None, (width - base) // unit)))
            pieces = [flat]
            if base:
                pieces.insert(0, graph.call_method("new_ones", (segments[0][3], (base // unit,))))
            if end < width:
                pieces.append(graph.call_method("new_ones", (segments[0][3], ((width - end) // unit,))))
            return pieces[0] if len(pieces) == 1 else graph.call_function(torch.cat, (pieces,))

    # ------------------------------------------------------------------ output projection
    def output_route(self) -> tuple[Optional[fx.Node], str]:
        """(the op's value where it enters the output projection, "") when heads reach it head-major.

        Sets ``self.out_batch_leads``: that value's dim 0 is the op's batch dim."""
        self.out_batch_leads = False
        s, linear = self.site, self.proj.nodes.get("out")
        if linear is None or linear.graph is None:
            return None, "not_found"
        q, v = (example_value(self.gated.args[i]) for i in (0, 2))
        if q is None or v is None or q.dim() != 4:
            return None, "shape"
        heads, dv = s.num_heads, s.value_head_dim
        lay = hl.initial((*q.shape[:3], dv), [hl.Atom("within", dv)])
        lay.dims[1] = [] if heads == 1 else [hl.Atom("head", heads)]
        node = self.gated
        self.out_chain = []
        for _ in range(16):
            if len(node.users) != 1:
                break
            (user,) = node.users
            if user is linear:
                parts = _linear_parts(linear)
                if parts is None or parts[0] is not node:
                    break
                if not _head_major(lay, heads, dv):
                    return None, "layout"
                lead = lay.dims[0] if lay.dims else []
                self.out_lead = [a for d in lay.dims[:-1] for a in d]
                self.out_input = node
                self.out_batch_leads = len(lead) == 1 and lead[0].kind == "other" and lead[0].source_dim == 0
                return node, ""
            if not hl.is_shape_op(user):
                break  # an elementwise op could turn the zeros of pruned heads into values
            lay = hl.step(user, {node: lay}, dv)
            if lay is None:
                break
            node = user
            self.out_chain.append((node, lay))
        return None, "not_reached"

    def skip_output(self) -> None:
        node, why = self.output_route()
        if node is None:
            self.decline("out", why)
            return
        # rows reach the projection batch-first: each sample can skip its own heads' columns
        flags = self.keep if self.out_batch_leads else self.any_heads()
        if self.out_batch_leads:
            self.result.bump("per_sample_proj")
        self.replaced["out"] = _replace_linear(self.graph, self.proj.nodes["out"], "head_linear_in", flags,
                                               self.site.value_head_dim)
        self.done.append("out")
        self.result.bump("skip_out_proj")


def _head_major(lay: hl.Layout, heads: int, dv: int) -> bool:
    """The last dim is [head, within...] covering exactly the heads; no other dim holds either."""
    *rest, last = lay.dims
    if any(a.kind in ("head", "within") for d in rest for a in d):
        return False
    within = last[1:] if heads > 1 else last
    if heads > 1 and (not last or last[0].kind != "head"):
        return False
    sizes = [static_int(a.size) for a in within]
    return all(a.kind == "within" for a in within) and None not in sizes and math.prod(sizes) == dv


def _hoist(target: fx.Node, before: fx.Node, index: dict, forbidden: set) -> bool:
    """Move target, and whatever it needs that is computed after ``before``, in front of it.

    Only pure nodes that depend on none of the site's projections move; a node written in place
    moves only if every reader of it moves too, so nothing sees the write earlier.
    """
    need, stack = set(), [target]
    while stack:
        n = stack.pop()
        if n in need or index[n] < index[before]:
            continue
        if n in forbidden or n is before or n.op not in ("call_function", "call_method", "get_attr") or not _is_pure(n):
            return False
        need.add(n)
        if len(need) > _MAX_HOIST:
            return False
        stack.extend(n.all_input_nodes)
    for n in need:
        if n.target in _INPLACE and not set(n.args[0].users) <= need | {n}:
            return False
    for n in sorted(need, key=index.__getitem__):
        before.prepend(n)
    return True


def prove_head_layouts(gm: fx.GraphModule, gated: fx.Node, site: AttentionSite, proj: Projections) -> tuple[str, ...]:
    """Roles whose projection features the graph proves head-major; changes nothing.

    What static pruning needs before it cuts weight rows or columns by head: a model that
    views its projection as [..., D, H] instead of [..., H, D] looks the same by shapes alone.
    """
    state = _Site(gm, gated, site, proj, None, PassResult())
    index = _index(gm.graph)
    proven = [role for role in ROLES if state.check_role(role, index)[0] is not None]
    if state.output_route()[0] is not None:
        proven.append("out")
    return tuple(proven)


def skip_site_projections(gm: fx.GraphModule, gated: fx.Node, site: AttentionSite, proj: Projections,
                          gate_target: Optional[str], result: PassResult) -> "_Site":
    """Replace what can be proven exact around one rewritten site; ``.roles()`` of the returned
    state are the roles skipped, and ``compact_heads`` reads the rest of it."""
    state = _Site(gm, gated, site, proj, gate_target, result)
    state.skip_inputs()
    state.skip_output()
    state.drop_unused_flags()
    return state
