"""Find the projection parameters that produce q/k/v and consume the attention output.

Walks back from q/k/v through shape ops, casts, head-level elementwise ops (RoPE, q/k norms,
pre-scaling), KV-cache concatenation with empty tensors and fused-QKV splits, to one F.linear
or addmm (HF Conv1D). Whatever is ambiguous (two linears reachable, a split it cannot place)
gives a None reference rather than a guess.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

from .graph_utils import arg, constant_factor, example_value, is_call, is_method, parameter_name, static_int
from .site import AttentionMatch, ProjectionRef

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default)
_ADDMM = (torch.addmm,)
_SHAPE_METHODS = ("view", "reshape", "transpose", "permute", "contiguous", "unflatten", "flatten", "to", "type_as",
                  "float", "half", "bfloat16", "clone")
_SHAPE_FUNCS = (torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unflatten)
# Ops that leave the last (feature) dim's element order alone, usable after a feature slice.
_LAST_DIM_SAFE = ("view", "reshape", "contiguous", "to", "type_as", "float", "half", "bfloat16", "clone")
_ELEMENTWISE = (operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
                torch.add, torch.sub, torch.mul, torch.div, torch.neg)
_ELEMENTWISE_METHODS = ("add", "sub", "mul", "div", "neg")
_MAX_DEPTH = 24


@dataclass
class Projections:
    q: Optional[ProjectionRef] = None
    k: Optional[ProjectionRef] = None
    v: Optional[ProjectionRef] = None
    out: Optional[ProjectionRef] = None
    hidden: Optional[fx.Node] = None  # the input of the q projection: what a router may look at
    cross_attention: bool = False
    # The graph nodes behind the references (F.linear or addmm), for passes that replace them.
    # ``features`` holds each role's range of its node's output features (q/k/v) relative to that
    # node, which differs from ProjectionRef.features when the weight is a row slice.
    nodes: dict[str, fx.Node] = field(default_factory=dict)
    features: dict[str, Optional[tuple[int, int]]] = field(default_factory=dict)
    head_strides: dict[str, Optional[int]] = field(default_factory=dict)  # ProjectionRef.head_stride


def _sizes(node: Any) -> Optional[list]:
    """The shape as a list; dims may be SymInts under dynamic shapes (batch, sequence)."""
    val = example_value(node)
    return None if val is None else list(val.shape)


def _param_slice(node: Any) -> tuple[Optional[str], Optional[tuple[int, int]]]:
    """(parameter name, row range) for a parameter or a row slice of one (weight[a:b])."""
    name = parameter_name(node)
    if name is not None:
        return name, None
    if is_call(node, operator.getitem):
        base, idx = node.args
        idx = idx[0] if isinstance(idx, tuple) and len(idx) == 1 else idx
        if isinstance(idx, slice) and idx.step in (None, 1) and isinstance(idx.start, int) and isinstance(idx.stop, int):
            name = parameter_name(base)
            if name is not None:
                return name, (idx.start, idx.stop)
    return None, None


def _compose(outer: Optional[tuple[int, int]], inner: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
    """inner is relative to outer (a slice of a slice)."""
    if outer is None:
        return inner
    if inner is None:
        return outer
    return outer[0] + inner[0], outer[0] + inner[1]


@dataclass(frozen=True)
class _Found:
    node: fx.Node  # the linear or addmm
    features: Optional[tuple[int, int]]
    # (stride, count) when ``features`` is one head's range of a per-head-interleaved fused
    # projection (GPT-NeoX): head h owns features + h * stride, for count heads.
    period: Optional[tuple[int, int]] = None


def last_dim_slice(idx: Any, src_sizes: Optional[list]) -> Optional[tuple[int, int]]:
    """(start, stop) when ``x[idx]`` takes a constant, step-1 range of x's last dim only."""
    if src_sizes is None or not isinstance(idx, tuple) or not idx or static_int(src_sizes[-1]) is None:
        return None
    *lead, last = idx
    if not isinstance(last, slice) or last.step not in (None, 1):
        return None
    if lead.count(Ellipsis) > 1 or any(i is not Ellipsis and i != slice(None) for i in lead):
        return None
    if Ellipsis not in lead and len(lead) != len(src_sizes) - 1:
        return None
    n = static_int(src_sizes[-1])
    if not all(b is None or isinstance(b, int) for b in (last.start, last.stop)):
        return None
    start, stop, _ = slice(last.start, last.stop).indices(n)
    return (start, stop) if stop > start else None


def _second_last_pick(idx: Any, src_sizes: Optional[list]) -> Optional[tuple[int, Any]]:
    """(the static size of x's second-to-last dim, idx's entry for it) when ``x[idx]`` indexes
    that dim only, every other dim whole; None otherwise."""
    if src_sizes is None or not isinstance(idx, tuple) or idx.count(Ellipsis) > 1 or len(src_sizes) < 2:
        return None
    n, items = len(src_sizes), list(idx)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (n - len(items) + 1)
    items += [slice(None)] * (n - len(items))
    size = static_int(src_sizes[-2])
    if len(items) != n or size is None or any(i != slice(None) for d, i in enumerate(items) if d != n - 2):
        return None
    return size, items[-2]


def second_last_index(idx: Any, src_sizes: Optional[list]) -> Optional[int]:
    """i when ``x[idx]`` is ``x[..., i, :]``: one constant index into x's second-to-last dim, every
    other dim whole (BLOOM's and Falcon's role of a (.., H, 3, D) view)."""
    got = _second_last_pick(idx, src_sizes)
    if got is None:
        return None
    size, pick = got
    return pick % size if isinstance(pick, int) and not isinstance(pick, bool) and -size <= pick < size else None


def head_dim_slice(idx: Any, src_sizes: Optional[list]) -> Optional[tuple[int, int]]:
    """(start, stop) when ``x[idx]`` takes a constant, step-1 range of x's second-to-last dim
    only: a slice, or a one-element index list (Falcon's multi-query ``qkv[..., :-2, :]`` and
    ``qkv[..., [-2], :]`` on [B, L, H + 2, D])."""
    got = _second_last_pick(idx, src_sizes)
    if got is None:
        return None
    heads, pick = got
    if isinstance(pick, list) and len(pick) == 1 and isinstance(pick[0], int) and -heads <= pick[0] < heads:
        return pick[0] % heads, pick[0] % heads + 1
    if not isinstance(pick, slice) or pick.step not in (None, 1) or pick == slice(None):
        return None
    if not all(b is None or isinstance(b, int) for b in (pick.start, pick.stop)):
        return None
    start, stop, _ = pick.indices(heads)
    return (start, stop) if stop > start else None


def _split_chunk(getitem: fx.Node) -> Optional[tuple[fx.Node, tuple[int, int]]]:
    """(input, feature range) when getitem picks chunk i of a split/chunk along the last dim."""
    src, i = getitem.args
    return split_chunk(src, i)


def split_chunk(src: Any, i: Any) -> Optional[tuple[fx.Node, tuple[int, int]]]:
    """(input, feature range) of chunk i of a split/chunk node along the last dim."""
    if not isinstance(src, fx.Node) or not isinstance(i, int):
        return None
    x = src.args[0] if src.args else None
    sizes = _sizes(x)
    if sizes is None or static_int(sizes[-1]) is None:
        return None
    sizes[-1] = static_int(sizes[-1])
    last = len(sizes) - 1
    if is_method(src, "split") or is_call(src, torch.split):
        size = arg(src, 1, "split_size", src.kwargs.get("split_size_or_sections"))
        if isinstance(size, fx.Node):  # x.size(-1) under dynamic=True, specialized to an int
            size = static_int(size.meta.get("example_value"))
        dim = arg(src, 2, "dim", 0)
        if not isinstance(dim, int) or dim % len(sizes) != last:
            return None
        if isinstance(size, int):
            bounds = [(s, min(s + size, sizes[-1])) for s in range(0, sizes[-1], size)]
        elif isinstance(size, (list, tuple)) and all(isinstance(s, int) for s in size):
            starts = [sum(size[:j]) for j in range(len(size))]
            bounds = [(s, s + n) for s, n in zip(starts, size)]
        else:
            return None
    elif is_method(src, "chunk") or is_call(src, torch.chunk):
        n, dim = arg(src, 1, "chunks"), arg(src, 2, "dim", 0)
        if not isinstance(n, int) or not isinstance(dim, int) or dim % len(sizes) != last:
            return None
        size = -(-sizes[-1] // n)
        bounds = [(s, min(s + size, sizes[-1])) for s in range(0, sizes[-1], size)]
    else:
        return None
    return (x, bounds[i]) if 0 <= i < len(bounds) else None


def _splits_heads(src: Optional[list], sizes: Optional[list], features: tuple[int, int]) -> bool:
    """A view that splits src's last dim into (heads, period), features inside one period."""
    if src is None or sizes is None or len(sizes) < 3 or len(src) < 2:
        return False
    heads, period, width = (static_int(x) for x in (sizes[-2], sizes[-1], src[-1]))
    if None in (heads, period, width) or heads * period != width or heads < 2:
        return False
    # Leading dims equal but for size-1 dims: DeepSeek's MLA runs kv_b_proj on a [B, 1, L, r]
    # latent and views its output [B, L, H, .].
    lead = lambda dims: [d for d in dims if static_int(d) != 1]  # noqa: E731
    return lead(sizes[:-2]) == lead(src[:-1]) and 0 <= features[0] < features[1] <= period


def _keeps_last_dim(node: fx.Node, sizes: Optional[list]) -> bool:
    """transpose/permute/unsqueeze that leaves the last dim where it is (GPTBigCode splits its
    fused projection after an unsqueeze(1))."""
    if sizes is None:
        return False
    n = len(sizes)
    if is_method(node, "unsqueeze") or is_call(node, torch.unsqueeze):
        dim = arg(node, 1, "dim")
        return isinstance(dim, int) and dim % n != n - 1
    if is_method(node, "transpose") or is_call(node, torch.transpose):
        dims = node.args[1:3]
        return len(dims) == 2 and all(isinstance(d, int) and d % n != n - 1 for d in dims)
    if is_method(node, "permute") or is_call(node, torch.permute):
        dims = node.args[1:] if is_method(node, "permute") else arg(node, 1, "dims", ())
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        return len(dims) == n and isinstance(dims[-1], int) and dims[-1] % n == n - 1
    return False


def unit_split_dim(src: Any) -> Optional[int]:
    """The dim, not the last, that a split/chunk node cuts into size-1 pieces (StableLM splits q
    and k head by head to give each head its own LayerNorm); None for anything else."""
    if not isinstance(src, fx.Node) or not (is_method(src, "split", "chunk") or is_call(src, torch.split, torch.chunk)):
        return None
    sizes, dim = _sizes(src.args[0] if src.args else None), arg(src, 2, "dim", 0)
    if sizes is None or not isinstance(dim, int) or len(sizes) < 2:
        return None
    dim %= len(sizes)
    if dim == len(sizes) - 1:
        return None
    if is_method(src, "chunk") or is_call(src, torch.chunk):
        unit = arg(src, 1, "chunks") == static_int(sizes[dim])
    else:
        unit = arg(src, 1, "split_size", src.kwargs.get("split_size_or_sections")) == 1
    return dim if unit else None


def _is_empty(node: Any) -> bool:
    val = example_value(node)
    return val is not None and static_int(val.numel()) == 0


class _Walker:
    """Depth-first walk back to projections; collects every linear reachable by allowed paths."""

    def __init__(self):
        self.found: set[_Found] = set()
        self.unclear = False

    def walk(self, node: Any, features=None, pending=None, depth: int = 0, period=None) -> None:
        if depth > _MAX_DEPTH or not isinstance(node, fx.Node):
            self.unclear = self.unclear or depth > _MAX_DEPTH
            return
        sizes = _sizes(node)
        if is_call(node, *_LINEAR) or is_call(node, *_ADDMM):
            if pending is not None:
                self.unclear = True  # picked a sub-tensor we could not place in the features
                return
            self.found.add(_Found(node, features, period))
            return
        nxt = lambda n, f=features, p=pending: self.walk(n, f, p, depth + 1, period)  # noqa: E731
        if pending is not None:
            self._walk_pending(node, features, pending, sizes, depth)
            return
        if features is not None:
            if is_method(node, *_LAST_DIM_SAFE) or is_call(node, torch.reshape):
                src = _sizes(node.args[0])
                if src is not None and sizes is not None and src[-1] == sizes[-1]:
                    return nxt(node.args[0])
                if period is None and _splits_heads(src, sizes, features):
                    # view(B, L, H, 3·D) of a fused projection, chunked per head afterwards
                    return self.walk(node.args[0], features, None, depth + 1,
                                     (static_int(sizes[-1]), static_int(sizes[-2])))
            if _keeps_last_dim(node, sizes):
                return nxt(node.args[0])
            if is_call(node, operator.getitem) and period is None:
                chunk = _split_chunk(node)
                if chunk is not None:
                    return nxt(chunk[0], _compose(chunk[1], features))
            self.unclear = True
            return
        if is_method(node, *_SHAPE_METHODS) or is_call(node, *_SHAPE_FUNCS):
            return nxt(node.args[0])
        if is_call(node, operator.getitem):
            return self._walk_getitem(node, sizes, depth)
        if is_call(node, torch.cat):
            return self._walk_cat(node, sizes, depth)
        if is_call(node, torch.stack) and sizes is not None and len(sizes) >= 5:
            # Interleaved RoPE's (-x2, x1) pairs, one new dim after the head dim
            for p in arg(node, 0, "tensors"):
                self._branch(p, depth)
            return
        if sizes is not None and len(sizes) < 4 and constant_factor(node) is not None:
            # A constant factor before the head split (OPT and Whisper scale q there; the compact
            # block folds it into the scale): feature by feature, so it keeps heads apart.
            return nxt(node.all_input_nodes[0])
        if sizes is not None and len(sizes) >= 4 and is_call(node, torch.nn.functional.layer_norm):
            return nxt(node.args[0])  # a per-head q/k norm; head_layout checks what it normalises
        if sizes is not None and len(sizes) >= 4 and (is_call(node, *_ELEMENTWISE) or is_method(node, *_ELEMENTWISE_METHODS)):
            # Head-level elementwise ops (RoPE, scaling): the residual stream is never 4-D,
            # so this cannot wander into earlier layers.
            for operand in node.all_input_nodes:
                self._branch(operand, depth)
            return
        self.unclear = True

    def _branch(self, operand: Any, depth: int) -> None:
        """One operand of a head-level op: a dead end (cos/sin tables, constants) adds nothing;
        a branch that reaches a projection must be clear all the way."""
        sub = _Walker()
        sub.walk(operand, None, None, depth + 1)
        if sub.found:
            self.found |= sub.found
            self.unclear = self.unclear or sub.unclear

    def _walk_getitem(self, node: fx.Node, sizes, depth: int) -> None:
        src, idx = node.args
        if isinstance(idx, int) and isinstance(src, fx.Node):
            chunk = _split_chunk(node)
            if chunk is not None:
                return self.walk(chunk[0], chunk[1], None, depth + 1)
            if is_method(src, "unbind") or is_call(src, torch.unbind):
                dim = arg(src, 1, "dim", 0)
                return self.walk(src.args[0], None, (dim, idx), depth + 1)
            if sizes is not None and len(sizes) >= 4 and unit_split_dim(src) is not None:
                return self.walk(src.args[0], None, None, depth + 1)  # one head of a head-by-head split
            if example_value(src) is not None:  # qkv[i]: select along dim 0
                return self.walk(src, None, (0, idx), depth + 1)
        src_sizes = _sizes(src)
        heads = head_dim_slice(idx, src_sizes)
        view_in = _sizes(src.args[0]) if is_method(src, "view", "reshape") and src.args else None
        role = second_last_index(idx, src_sizes)
        if role is not None and view_in is not None and len(src_sizes) == len(view_in) + 2:
            # role i of a view(.., H, R, D) of the projection: features [i·D, (i + 1)·D) of each
            # head's period of R·D (BLOOM, Falcon: [q_h, k_h, v_h] head by head)
            n_heads, roles, dim = (static_int(d) for d in src_sizes[-3:])
            whole = static_int(view_in[-1])
            if (None not in (n_heads, roles, dim, whole) and whole == n_heads * roles * dim
                    and all(a == b for a, b in zip(src_sizes[:-3], view_in[:-1]))):
                return self.walk(src.args[0], (role * dim, (role + 1) * dim), None, depth + 1,
                                 (roles * dim, n_heads))
        if heads is not None and view_in is not None and _splits_heads(view_in, src_sizes, (0, 1)):
            # heads [a, b) of a view(..., H, D) of the projection: features [a·D, b·D) of it
            dim = static_int(src_sizes[-1])
            return self.walk(src.args[0], (heads[0] * dim, heads[1] * dim), None, depth + 1)
        if isinstance(idx, tuple) and sizes is not None and len(sizes) >= 4:
            if all(i is Ellipsis or isinstance(i, slice) for i in idx):
                return self.walk(src, None, None, depth + 1)  # rotate_half's halves of the head dim
        if isinstance(idx, tuple) and sizes is not None:
            features = last_dim_slice(idx, _sizes(src))
            if features is not None:  # Phi-3's fused qkv[..., :q_width]
                return self.walk(src, features, None, depth + 1)
        self.unclear = True

    def _walk_cat(self, node: fx.Node, sizes, depth: int) -> None:
        parts = node.args[0]
        dim = arg(node, 1, "dim", 0)
        if sizes is None or not isinstance(dim, int):
            self.unclear = True
            return
        live = [p for p in parts if not _is_empty(p)]
        if len(live) == 1:
            return self.walk(live[0], None, None, depth + 1)  # KV cache seeded with an empty tensor
        computed = [p for p in live if not (isinstance(p, fx.Node) and p.op == "placeholder")]
        if len(computed) == 1 and len(sizes) >= 4 and dim % len(sizes) == len(sizes) - 2:
            # A decoding step's K/V: the cache's rows (a graph input) and this step's, along the
            # sequence. Only this step's come from a projection.
            return self.walk(computed[0], None, None, depth + 1)
        if len(sizes) >= 4 and (dim % len(sizes) == len(sizes) - 1 or all(
                (_sizes(p) or [0] * len(sizes))[dim] == 1 for p in live)):
            # within-head pieces on the last dim, or per-head pieces put back together
            for p in live:
                self._branch(p, depth)
            return
        self.unclear = True

    def _walk_pending(self, node: fx.Node, features, pending, sizes, depth: int) -> None:
        """Follow the axis that a later unbind/select indexes until the view that created it."""
        axis, index = pending
        if sizes is None:
            self.unclear = True
            return
        axis %= len(sizes)
        if is_method(node, "contiguous", "clone", "to", "float", "half", "bfloat16"):
            return self.walk(node.args[0], features, (axis, index), depth + 1)
        if is_method(node, "permute") or is_call(node, torch.permute):
            dims = node.args[1:] if is_method(node, "permute") else node.args[1]
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
            return self.walk(node.args[0], features, (dims[axis] % len(sizes), index), depth + 1)
        if is_method(node, "transpose") or is_call(node, torch.transpose):
            a, b = (d % len(sizes) for d in node.args[1:3])
            axis = b if axis == a else a if axis == b else axis
            return self.walk(node.args[0], features, (axis, index), depth + 1)
        if is_method(node, "view", "reshape", "unflatten") or is_call(node, torch.reshape, torch.unflatten):
            src = _sizes(node.args[0])
            n = len(src) if src is not None else 0
            # The view split the input's last dim into (chunks, ...) and axis is the chunks axis.
            split = sizes[n - 1:] if src is not None else []
            if (src is not None and axis == n - 1 and all(static_int(d) is not None for d in split + src[-1:])
                    and sizes[: n - 1] == src[: n - 1] and math.prod(split) == src[-1]):
                width = static_int(src[-1]) // static_int(sizes[axis])
                return self.walk(node.args[0], (index * width, (index + 1) * width), None, depth + 1)
        self.unclear = True


def _ref(found: _Found) -> Optional[ProjectionRef]:
    node = found.node
    if is_call(node, *_ADDMM):
        bias, weight, layout = node.args[0], node.args[2], "in_out"
    else:
        weight, bias, layout = arg(node, 1, "weight"), arg(node, 2, "bias"), "out_in"
    name, rows = _param_slice(weight)
    if name is None:
        return None
    bias_name, _ = _param_slice(bias) if isinstance(bias, fx.Node) else (None, None)
    if rows is not None and layout != "out_in":
        return None
    features, stride = found.features, None
    if found.period is not None:
        stride, count = found.period
        features = (features[0], features[0] + (count - 1) * stride + features[1] - features[0])
    return ProjectionRef(weight=name, bias=bias_name, layout=layout, features=_compose(rows, features),
                         head_stride=stride)


def _activation_input(node: fx.Node) -> Any:
    """What the projection reads: for addmm on x.view(-1, d), the un-flattened x."""
    if is_call(node, *_ADDMM):
        x = node.args[1]
        if is_method(x, "view", "reshape") and _sizes(x.args[0]) is not None and len(_sizes(x.args[0])) >= 3:
            return x.args[0]
        return x
    return node.args[0]


def _out_width(found: _Found) -> Optional[int]:
    if found.period is not None:
        return (found.features[1] - found.features[0]) * found.period[1]
    if found.features is not None:
        return found.features[1] - found.features[0]
    val = example_value(found.node)
    return None if val is None else static_int(val.shape[-1])


def _whole_heads(found: set[_Found]) -> set[_Found]:
    """Pieces of one projection that tile each head's period, as that projection whole: DeepSeek's
    MLA splits every q head into a part without and a part with RoPE, and concatenates them back."""
    if len(found) < 2 or len({(f.node, f.period) for f in found}) != 1:
        return found
    ranges = sorted(f.features for f in found)
    period = next(iter(found)).period
    if period is None or ranges[0][0] != 0 or ranges[-1][1] != period[0]:
        return found
    if any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        return found
    return {_Found(next(iter(found)).node, (0, period[0] * period[1]), None)}


def _projection(node: fx.Node, width: Optional[int]) -> Optional[_Found]:
    walker = _Walker()
    walker.walk(node)
    found = _whole_heads(walker.found)
    if walker.unclear or len(found) != 1:
        return None
    (found,) = found
    if width is not None and _out_width(found) != width:
        return None  # not the whole of this role's heads: some other linear
    return found


def _role_width(match: AttentionMatch, role: str) -> Optional[int]:
    val = example_value(getattr(match, role))
    if val is None:
        return None
    if match.heads_folded:
        heads = match.heads_folded if role == "q" else (match.kv_heads_folded or match.heads_folded)
        dim = static_int(val.shape[-1])
        return None if dim is None else heads * dim
    if val.dim() != 4:
        return None
    heads, dim = static_int(val.shape[1]), static_int(val.shape[-1])
    return None if heads is None or dim is None else heads * dim


def _walk_forward(node: fx.Node, width: Optional[int], limit: int = 12) -> Optional[_Found]:
    """The linear/addmm that node reaches through a single-user chain of shape ops."""
    for _ in range(limit):
        if len(node.users) != 1:
            return None
        (user,) = node.users
        if is_call(user, *_LINEAR) and user.args[0] is node:
            found = _Found(user, None)
        elif is_call(user, *_ADDMM) and user.args[1] is node:
            found = _Found(user, None)
        elif is_method(user, *_SHAPE_METHODS) or is_call(user, *_SHAPE_FUNCS):
            node = user
            continue
        else:
            return None
        val = example_value(node)
        if width is not None and (val is None or static_int(val.shape[-1]) != width):
            return None  # the linear reads more (or less) than this site's heads
        return found
    return None


def _recent_activations(node: Any, depth: int) -> set[fx.Node]:
    """Computed nodes (not inputs or parameters) at most ``depth`` steps before node."""
    seen, frontier = set(), [node] if isinstance(node, fx.Node) else []
    for _ in range(depth + 1):
        nxt = []
        for n in frontier:
            if n in seen or n.op in ("placeholder", "get_attr"):
                continue
            seen.add(n)
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return seen


def _same_stream(kv_input: Any, q_input: Any, depth: int = _MAX_DEPTH // 2) -> bool:
    """K/V read the sequence that q reads: the same node, or (DeepSeek's MLA, whose q and kv
    pass through low-rank projections and norms of their own) nodes computed from one recent
    node. Cross-attention reads another model's output, many layers away from q's input."""
    if kv_input is q_input:
        return True
    return bool(_recent_activations(kv_input, depth) & _recent_activations(q_input, depth))


def find_projections(match: AttentionMatch, out_node: fx.Node) -> Projections:
    found = Projections()
    sources: dict[str, _Found] = {}
    for role in ("q", "k", "v"):
        src = _projection(getattr(match, role), _role_width(match, role))
        if src is not None:
            sources[role] = src
            setattr(found, role, _ref(src))
            if getattr(found, role) is not None:
                found.nodes[role], found.features[role] = src.node, src.features
                found.head_strides[role] = None if src.period is None else src.period[0]
    out_val = example_value(out_node)
    out_width = None
    if out_val is not None:
        heads = match.heads_folded or (out_val.shape[1] if out_val.dim() == 4 else None)
        out_width = None if heads is None else static_int(heads * out_val.shape[-1])
    out = _walk_forward(out_node, out_width)
    found.out = None if out is None else _ref(out)
    if found.out is not None:
        found.nodes["out"] = out.node
    if "q" in sources:
        found.hidden = _activation_input(sources["q"].node)
        kv = sources.get("k") or sources.get("v")
        if kv is not None:
            found.cross_attention = not _same_stream(_activation_input(kv.node), found.hidden)
    return found
