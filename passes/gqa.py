"""Undo repeat-KV expansion (GQA/MQA) so a site records its true kv heads and the op reads them.

Only expansions whose semantics are exactly "expanded head j is source head j // n_rep" are
undone, because that is the grouping the gated op applies itself.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph_utils import arg, example_value, is_call, is_method, static_int
from .site import AttentionMatch

_FULL = slice(None, None, None)


def _shape(node: Any) -> Optional[tuple]:
    """The shape; batch/sequence dims may be SymInts under dynamic shapes."""
    val = example_value(node)
    return None if val is None else tuple(val.shape)


def _same(a: tuple, b: tuple) -> bool:
    """Shapes provably equal (symbolic dims must be the same expression; no guard is added)."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _is_head_unsqueeze(node: Any, src_shape: tuple[int, ...]) -> Optional[fx.Node]:
    """The 4-D source x when node is x[:, :, None] (any spelling) with shape [B, h, 1, S, D]."""
    if not isinstance(node, fx.Node):
        return None
    if is_call(node, operator.getitem):
        x, idx = node.args
        idx = idx if isinstance(idx, tuple) else (idx,)
        if sum(i is None for i in idx) != 1 or not all(i is None or i is Ellipsis or i == _FULL for i in idx):
            return None
    elif is_method(node, "unsqueeze") or is_call(node, torch.unsqueeze):
        x = node.args[0]
    else:
        return None
    xs = _shape(x)
    # With only full slices and one inserted axis, the shape says where the axis went; a size-1
    # axis inserted elsewhere with the same resulting shape has the same memory order anyway.
    if xs is None or len(xs) != 4 or not _same(src_shape, xs[:2] + (1,) + xs[2:]):
        return None
    return x


def _unrepeat(node: Any) -> Optional[tuple[fx.Node, int]]:
    """(source [B, h, S, D], n_rep) when node is the source with every head repeated n_rep times
    consecutively (head j of node = head j // n_rep of the source)."""
    out = _shape(node)
    if out is None or len(out) != 4:
        return None
    if is_call(node, torch.repeat_interleave) or is_method(node, "repeat_interleave"):
        x = node.args[0]
        reps = arg(node, 1, "repeats")
        dim = arg(node, 2, "dim")
        xs = _shape(x)
        if not isinstance(reps, int) or dim not in (1, -3) or xs is None or len(xs) != 4:
            return None
        if not _same(out, (xs[0], xs[1] * reps) + xs[2:]):
            return None
        return x, reps
    if is_method(node, "expand") or is_call(node, torch.Tensor.expand):
        # MQA by broadcast: one kv head expanded to all query heads.
        x = node.args[0]
        xs = _shape(x)
        n = static_int(out[1])
        if xs is None or len(xs) != 4 or xs[1] != 1 or n is None or not _same((xs[0],) + xs[2:], (out[0],) + out[2:]):
            return None
        return x, n
    if is_method(node, "reshape", "view") or is_call(node, torch.reshape):
        expanded = node.args[0]
        es = _shape(expanded)
        if es is None or len(es) != 5 or static_int(es[2]) is None or not _same(out, (es[0], es[1] * es[2], es[3], es[4])):
            return None
        if is_method(expanded, "contiguous"):
            expanded = expanded.args[0]
        if not is_method(expanded, "expand"):
            return None
        unsq = expanded.args[0]
        us = _shape(unsq)
        if us is None or len(us) != 5 or us[2] != 1 or not _same(us[:2] + us[3:], es[:2] + es[3:]):
            return None
        src = _is_head_unsqueeze(unsq, us)
        if src is None:
            return None
        return src, static_int(es[2])
    return None


def resolve_repeat_kv(match: AttentionMatch) -> None:
    if match.heads_folded:
        return  # bmm-style: k/v heads are folded with the batch; nothing to undo there
    k, v = _unrepeat(match.k), _unrepeat(match.v)
    if k is None or v is None or k[1] != v[1] or k[1] < 2:
        return
    (k_src, n), (v_src, _) = k, v
    ks, vs, qv = _shape(k_src), _shape(v_src), example_value(match.q)
    if ks is None or vs is None or qv is None or static_int(ks[1]) is None or ks[1] != vs[1] or qv.shape[1] % ks[1]:
        return
    match.k, match.v = k_src, v_src
    match.notes.append(f"repeat-KV x{n} undone: {ks[1]} kv heads")
