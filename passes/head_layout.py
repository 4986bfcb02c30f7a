"""Where the head index lives in a tensor, followed through shape ops and head-local elementwise ops.

Skipping a pruned head's rows of a projection is exact only if every element of the attention's
head h depends on head h's block of features alone, and the output projection reads head h's
output at features [h*Dv, (h+1)*Dv). Feature-width checks cannot tell ``view(B, L, H, D)`` from
``view(B, L, D, H)``; this module can. Each dim of a tracked tensor is a list of atoms, outermost
first; an atom is one mixed-radix digit of the index along that dim:

- "raw": a digit of the projection's output feature index, worth ``stride`` per step;
- "head": the head index (output side);
- "within": a position inside one head (output side, or a slice/cat of within-head digits);
- "other": batch, sequence and the like.

A layout also carries ``offset``, the feature index of element 0 (split chunks, unbind).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph_utils import arg, example_value, is_call, is_method, static_int
from .projections import head_dim_slice, last_dim_slice, second_last_index, split_chunk, unit_split_dim

IDENTITY_METHODS = ("contiguous", "to", "type_as", "float", "half", "bfloat16", "clone")
VIEW_METHODS = ("view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze")
VIEW_FUNCS = (torch.reshape, torch.flatten, torch.unflatten, torch.unsqueeze, torch.squeeze)
ELEMENTWISE = (operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
               torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.sqrt, torch.square)
ELEMENTWISE_METHODS = ("add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "square")
# Reductions that keep their dim (size 1, broadcast back later): head-local over within-head
# digits only. Qwen3's and Cohere's per-head q/k RMSNorm take a mean over the head dim.
LAST_DIM_REDUCTIONS = ("mean", "sum")


@dataclass
class Atom:
    kind: str  # "raw" | "head" | "within" | "other"
    size: Any  # int, or SymInt for batch/sequence dims
    stride: int = 0  # "raw" only
    source_dim: Optional[int] = None  # "other": the projection input's dim it still is, whole

    def same(self, other: "Atom") -> bool:
        return (self.kind == other.kind and self.stride == other.stride and self.source_dim == other.source_dim
                and known_eq(self.size, other.size))


@dataclass
class Layout:
    dims: list[list[Atom]]
    offset: int = 0

    def same(self, other: "Layout") -> bool:
        return self.offset == other.offset and len(self.dims) == len(other.dims) and all(
            len(a) == len(b) and all(x.same(y) for x, y in zip(a, b)) for a, b in zip(self.dims, other.dims))


def known_eq(a: Any, b: Any) -> bool:
    """a == b provably, without adding a guard on symbolic sizes."""
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def _shape(node: Any) -> Optional[tuple]:
    val = example_value(node)
    return None if val is None else tuple(val.shape)


def initial(shape: tuple, last: list[Atom], leading: Optional[list[list[Atom]]] = None) -> Layout:
    """Every dim "other" except the last, described by ``last``; ``leading`` overrides the others."""
    if leading is None:
        leading = [[Atom("other", s, source_dim=i)] for i, s in enumerate(shape[:-1])]
    return Layout([[a for a in d if not known_eq(a.size, 1)] for d in leading + [last]])


def _split(atom: Atom, outer: int) -> tuple[Atom, Atom]:
    inner = static_int(atom.size) // outer
    if atom.kind == "raw":
        return Atom("raw", outer, atom.stride * inner), Atom("raw", inner, atom.stride)
    return Atom(atom.kind, outer), Atom(atom.kind, inner)


def regroup(layout: Layout, sizes: tuple) -> Optional[Layout]:
    """The layout after a view/reshape to ``sizes``; None when a head digit would be cut."""
    queue = [a for d in layout.dims for a in d if not known_eq(a.size, 1)]
    dims: list[list[Atom]] = []
    for s in sizes:
        dim: list[Atom] = []
        p: Any = 1
        while not known_eq(p, s):
            if not queue:
                return None
            a = queue.pop(0)
            ps, ss, asz = static_int(p), static_int(s), static_int(a.size)
            if None not in (ps, ss, asz):
                if ss % ps:
                    return None
                need = ss // ps
                if asz > need:
                    if a.kind == "head" or asz % need:
                        return None
                    a, rest = _split(a, need)
                    queue.insert(0, rest)
                elif need % asz:
                    return None
            elif a.kind == "other" and not known_eq(p * a.size, s):
                # A symbolic batch*sequence dim unflattened again (HF Conv1D's addmm output):
                # "other" digits carry no features, so any provably exact split is safe.
                need = s if known_eq(p, 1) else s // p
                rest = a.size // need
                if not known_eq(rest, 1) and known_eq(rest * need, a.size):
                    a = Atom("other", need)
                    queue.insert(0, Atom("other", rest))
            dim.append(a)
            p = p * a.size
        dims.append(dim)
    if queue:
        return None
    return Layout(dims, layout.offset)


def within_only(dim: list[Atom], head_dim: int) -> bool:
    """Digits that stay inside one head: slicing or concatenating them keeps heads apart."""
    for a in dim:
        if a.kind == "head":
            return False
        if a.kind == "raw" and (static_int(a.size) is None or a.stride * static_int(a.size) > head_dim):
            return False
    return True


def _cut(dim: list[Atom], size: Any, head_dim: int) -> Optional[list[Atom]]:
    """A dim after taking part of it (slice) or adding to it (cat)."""
    if all(a.kind == "other" for a in dim):
        return [] if known_eq(size, 1) else [Atom("other", size)]
    if not within_only(dim, head_dim):
        return None
    return [] if known_eq(size, 1) else [Atom("within", size)]


def _select(layout: Layout, dim: int, index: int) -> Optional[Layout]:
    atoms = layout.dims[dim]
    offset = layout.offset
    if len(atoms) == 1 and atoms[0].kind == "raw":
        offset += index * atoms[0].stride
    elif any(a.kind != "other" for a in atoms):
        return None
    return Layout(layout.dims[:dim] + layout.dims[dim + 1:], offset)


def is_shape_op(node: fx.Node) -> bool:
    """Moves or casts elements without computing new ones (zeros stay zeros)."""
    return (is_method(node, *IDENTITY_METHODS, *VIEW_METHODS, "transpose", "permute")
            or is_call(node, *VIEW_FUNCS, torch.transpose, torch.permute))


def step(node: fx.Node, inputs: dict[fx.Node, Layout], head_dim: int) -> Optional[Layout]:
    """Layout of ``node`` from the layouts of its tracked inputs; None when it mixes heads or is
    not an op this module understands. Tuple-valued nodes (split, unbind) get their input's."""
    shape = _shape(node)
    src = node.args[0] if node.args else None
    if is_method(node, *IDENTITY_METHODS):
        return inputs.get(src)
    if is_method(node, "transpose") or is_call(node, torch.transpose):
        lay = inputs.get(src)
        if lay is None or len(node.args) != 3 or not all(isinstance(d, int) for d in node.args[1:3]):
            return None
        a, b = (d % len(lay.dims) for d in node.args[1:3])
        dims = list(lay.dims)
        dims[a], dims[b] = dims[b], dims[a]
        return Layout(dims, lay.offset)
    if is_method(node, "permute") or is_call(node, torch.permute):
        lay = inputs.get(src)
        dims = node.args[1:] if is_method(node, "permute") else arg(node, 1, "dims", ())
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if lay is None or len(dims) != len(lay.dims) or not all(isinstance(d, int) for d in dims):
            return None
        return Layout([lay.dims[d % len(lay.dims)] for d in dims], lay.offset)
    if is_method(node, *VIEW_METHODS) or is_call(node, *VIEW_FUNCS):
        lay = inputs.get(src)
        return None if lay is None or shape is None else regroup(lay, shape)
    if is_method(node, "split", "chunk", "unbind") or is_call(node, torch.split, torch.chunk, torch.unbind):
        return inputs.get(src)
    if is_call(node, operator.getitem):
        return _getitem(node, inputs, shape, head_dim)
    if is_call(node, torch.cat):
        return _cat(node, inputs, shape, head_dim)
    if is_call(node, torch.stack):
        return _stack(node, inputs, shape, head_dim)
    if is_call(node, *ELEMENTWISE) or is_method(node, *ELEMENTWISE_METHODS):
        tracked = [n for n in node.all_input_nodes if n in inputs]
        if not tracked or shape is None:
            return None
        merged = inputs[tracked[0]]
        for n in tracked:
            s = _shape(n)
            if s is None or len(s) != len(shape):
                return None
            for i, (x, y) in enumerate(zip(s, shape)):
                # broadcast along a dim is allowed only where the operand holds no digit there
                # (a kept reduction); _merge then asks the other side's digits to be within-head
                if not known_eq(x, y) and not (known_eq(x, 1) and inputs[n].dims[i] == []):
                    return None
            merged = _merge(merged, inputs[n], shape, head_dim)
            if merged is None:
                return None
        return merged
    if is_method(node, *LAST_DIM_REDUCTIONS) or is_call(node, torch.mean, torch.sum):
        return _last_dim_reduction(node, inputs.get(src), head_dim)
    if is_call(node, torch.nn.functional.layer_norm):
        # over the last dim only, inside one head: each head normalised on its own
        lay, normalized = inputs.get(src), arg(node, 1, "normalized_shape")
        if lay is None or shape is None or not isinstance(normalized, (tuple, list)) or len(normalized) != 1:
            return None
        if not known_eq(normalized[0], shape[-1]) or not within_only(lay.dims[-1], head_dim):
            return None
        if any(n in inputs for n in node.all_input_nodes if n is not src):
            return None  # a weight computed from the projection itself
        return lay
    return None


def _last_dim_reduction(node: fx.Node, lay: Optional[Layout], head_dim: int) -> Optional[Layout]:
    """x.mean(-1, keepdim=True) over digits inside one head: each result is one head's."""
    dim = arg(node, 1, "dim")
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    if lay is None or not isinstance(dim, int) or not node.kwargs.get("keepdim", False) or len(node.args) > 2:
        return None
    if dim % len(lay.dims) != len(lay.dims) - 1 or not within_only(lay.dims[-1], head_dim):
        return None
    if set(node.kwargs) - {"dim", "keepdim", "dtype"}:
        return None
    return Layout(lay.dims[:-1] + [[]], lay.offset)


def _merge(a: Layout, b: Layout, shape: tuple, head_dim: int) -> Optional[Layout]:
    """Two operands of one elementwise op: equal digits, or within-head digits on both sides
    (RoPE adds q and its rotated copy, whose last dims were sliced and concatenated)."""
    if a.offset != b.offset or len(a.dims) != len(b.dims):
        return None
    dims = []
    for da, db, size in zip(a.dims, b.dims, shape):
        if Layout([da]).same(Layout([db])):
            dims.append(da)
        elif (da == [] or db == []) and within_only(da or db, head_dim):
            dims.append(da or db)  # a kept reduction broadcast back over one head's digits
        elif within_only(da, head_dim) and within_only(db, head_dim):
            dims.append(_cut(da, size, head_dim))
        else:
            return None
    return Layout(dims, a.offset)


def _getitem(node: fx.Node, inputs, shape, head_dim: int) -> Optional[Layout]:
    src, idx = node.args
    lay = inputs.get(src)
    if lay is None:
        return None
    if isinstance(idx, int):
        dim = unit_split_dim(src)
        if dim is not None:
            return _fix_digit(lay, dim, idx)
        if is_method(src, "split", "chunk") or is_call(src, torch.split, torch.chunk):
            chunk = split_chunk(src, idx)
            if chunk is None or shape is None:
                return None
            start, stop = chunk[1]
            last = lay.dims[-1]
            if len(last) == 1 and last[0].kind == "raw" and not within_only(last, head_dim):
                raw = last[0]
                new = [] if stop - start == 1 else [Atom("raw", stop - start, raw.stride)]
                return Layout(lay.dims[:-1] + [new], lay.offset + start * raw.stride)
            # A chunk inside one head (DeepSeek's MLA splits each q head into a part with and a
            # part without RoPE, and concatenates them again) is a cut, like a slice.
            cut = _cut(last, shape[-1], head_dim)
            return None if cut is None else Layout(lay.dims[:-1] + [cut], lay.offset)
        if is_method(src, "unbind") or is_call(src, torch.unbind):
            dim = arg(src, 1, "dim", 0)
            return _select(lay, dim % len(lay.dims), idx) if isinstance(dim, int) else None
        if example_value(src) is not None:
            return _select(lay, 0, idx)
        return None
    if isinstance(idx, tuple) and shape is not None:
        rng = last_dim_slice(idx, list(_shape(src) or ())) if _shape(src) else None
        last = lay.dims[-1] if lay.dims else []
        if rng is not None and len(last) == 1 and last[0].kind == "raw" and not within_only(last, head_dim):
            # a range of a fused projection's features (Phi-3's qkv[..., :q_width]), as a split
            # chunk; a range inside one head (rotate_half's halves) is a cut, below
            start, stop = rng
            new = [] if stop - start == 1 else [Atom("raw", stop - start, last[0].stride)]
            return Layout(lay.dims[:-1] + [new], lay.offset + start * last[0].stride)
        heads = head_dim_slice(idx, list(_shape(src) or ()))
        row = lay.dims[-2] if len(lay.dims) >= 2 else []
        if heads is not None and len(row) == 1 and row[0].kind == "raw":
            # a range of one feature digit (Falcon's qkv[..., :-2, :] and [..., [-2], :] on the
            # head-sized digit of a fused projection): its values start..stop-1, the dim kept
            start, stop = heads
            new = [] if stop - start == 1 else [Atom("raw", stop - start, row[0].stride)]
            return Layout(lay.dims[:-2] + [new, lay.dims[-1]], lay.offset + start * row[0].stride)
        role = second_last_index(idx, list(_shape(src) or ()))
        if role is not None and len(lay.dims) >= 2:
            # x[..., i, :]: one value of the second-to-last dim, which drops (BLOOM's role of a
            # (.., H, 3, D) view of its projection)
            return _select(lay, len(lay.dims) - 2, role)
    if isinstance(idx, tuple) and shape is not None and all(i is Ellipsis or isinstance(i, slice) for i in idx):
        before = _shape(src)
        if before is None or len(before) != len(shape):
            return None
        dims = list(lay.dims)
        for d, (a, b) in enumerate(zip(before, shape)):
            if not known_eq(a, b):
                dims[d] = _cut(dims[d], b, head_dim)
                if dims[d] is None:
                    return None
        return Layout(dims, lay.offset)
    return None


def _fix_digit(lay: Layout, dim: int, index: int) -> Optional[Layout]:
    """Piece ``index`` of a dim cut into size-1 pieces: a head digit (or any one feature digit)
    fixed at ``index``, the dim kept with size 1."""
    atoms = lay.dims[dim]
    if len(atoms) == 1 and atoms[0].kind == "raw":
        return Layout(lay.dims[:dim] + [[]] + lay.dims[dim + 1:], lay.offset + index * atoms[0].stride)
    if all(a.kind == "other" for a in atoms):
        return Layout(lay.dims[:dim] + [[]] + lay.dims[dim + 1:], lay.offset)
    return None


def _restack(parts: list, inputs, dim: int) -> Optional[Layout]:
    """cat along ``dim`` of size-1 pieces that are the digit values 0, 1, ... of one feature digit
    in order (StableLM's heads put back together after their own LayerNorms)."""
    lays = [inputs.get(p) for p in parts]
    if len(parts) < 2 or any(lay is None or lay.dims[dim] != [] for lay in lays):
        return None
    stride = lays[1].offset - lays[0].offset
    first = Layout(lays[0].dims[:dim] + lays[0].dims[dim + 1:])
    for i, lay in enumerate(lays):
        if lay.offset != lays[0].offset + i * stride or not Layout(lay.dims[:dim] + lay.dims[dim + 1:]).same(first):
            return None
    if stride <= 0:
        return None
    dims = list(lays[0].dims)
    dims[dim] = [Atom("raw", len(parts), stride)]
    return Layout(dims, lays[0].offset)


def _cat(node: fx.Node, inputs, shape, head_dim: int) -> Optional[Layout]:
    parts = [p for p in node.args[0] if not (example_value(p) is not None and static_int(example_value(p).numel()) == 0)]
    tracked = [p for p in parts if p in inputs]
    if len(parts) == 1 and tracked:
        return inputs[tracked[0]]  # a cache seeded with an empty tensor
    dim = arg(node, 1, "dim", 0)
    if shape is not None and isinstance(dim, int) and dim % len(shape) != len(shape) - 1:
        d = dim % len(shape)
        if len(tracked) == 1 and all(p in tracked or (isinstance(p, fx.Node) and p.op == "placeholder")
                                     for p in parts):
            # A decoding step's K/V after the cache's rows (a graph input), along a dim that
            # holds no features (the sequence): the other dims line up with the tracked part's.
            lay = inputs[tracked[0]]
            cut = _cut(lay.dims[d], shape[d], head_dim) if len(lay.dims) == len(shape) else None
            return None if cut is None else Layout(lay.dims[:d] + [cut] + lay.dims[d + 1:], lay.offset)
        return _restack(parts, inputs, d)
    if not tracked or shape is None or not isinstance(dim, int) or dim % len(shape) != len(shape) - 1:
        return None
    first = inputs[tracked[0]]
    for p in tracked:
        lay = inputs[p]
        if lay.offset != first.offset or len(lay.dims) != len(first.dims) or not Layout(lay.dims[:-1]).same(Layout(first.dims[:-1])):
            return None
        if _cut(lay.dims[-1], shape[-1], head_dim) is None:
            return None
    cut = _cut(first.dims[-1], shape[-1], head_dim)
    return Layout(first.dims[:-1] + [cut], first.offset)


def _stack(node: fx.Node, inputs, shape, head_dim: int) -> Optional[Layout]:
    """stack(parts, dim=-1) of within-head slices: GPT-J's and Cohere's interleaved RoPE pair
    each even feature with the odd one next to it, inside one head."""
    parts = arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0)
    if shape is None or not isinstance(dim, int) or dim % len(shape) != len(shape) - 1 or not parts:
        return None
    if any(p not in inputs for p in parts):
        return None  # an untracked part could hold anything, other heads included
    first = inputs[parts[0]]
    outer = Layout(first.dims[:-1], first.offset)
    for p in parts:
        lay = inputs[p]
        if not Layout(lay.dims[:-1], lay.offset).same(outer) or not within_only(lay.dims[-1], head_dim):
            return None
    last = _cut(first.dims[-1], shape[-2], head_dim)
    new = [] if known_eq(shape[-1], 1) else [Atom("within", shape[-1])]
    return Layout(first.dims[:-1] + [last, new], first.offset)
