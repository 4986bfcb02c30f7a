"""Matcher for eager attention: matmul(q, kᵀ) → scale → masks → softmax(-1) → dropout → matmul(·, v).

The walk starts at every softmax and goes back along the scores to the first matmul and forward
along the probabilities to the second. A softmax with no batched matmul behind it is not
attention and is ignored silently; once both matmuls are there, anything the matcher cannot
reproduce exactly is reported as a SkippedSite and the graph is left alone.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import (
    arg, const_number, example_value, float_scalar_node, folded_heads, functionalize_writes, insert_node, is_call,
    is_method, module_path_of, runtime_scalar_hint, untranspose,
)
from .site import AttentionMatch, SkippedSite

_SOFTMAX_FUNCS = (torch.softmax, F.softmax, torch.special.softmax)
_MATMUL_FUNCS = (torch.matmul, operator.matmul, torch.bmm)
_MATMUL_METHODS = ("matmul", "bmm")
_ADD_FUNCS = (operator.add, operator.iadd, torch.add)
_SUB_FUNCS = (operator.sub, operator.isub, torch.sub)
_MUL_FUNCS = (operator.mul, operator.imul, torch.mul)
_DIV_FUNCS = (operator.truediv, operator.itruediv, torch.div, torch.true_divide)
# Value-preserving for the softmax input: precision casts and copies.
_CAST_METHODS = ("float", "double", "half", "bfloat16", "to", "type", "type_as", "contiguous", "clone")
_DROPOUT_FUNCS = (F.dropout, torch.dropout)
_INPLACE_TO_PURE = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "masked_fill_": "masked_fill"}
# A finite masked_fill value is turned into an additive term: exact after softmax only when it
# underflows exp() like -inf does, so small "mask" values are refused.
_MIN_FILL = -1e4
_MAX_CHAIN = 24
# Elementwise ops the gated op cannot express between scores and softmax (Gemma 2's logit
# softcapping is tanh(s / c) * c): a core behind them is reported as skipped, not passed over.
_UNEXPRESSIBLE_FUNCS = (torch.tanh, torch.sigmoid, torch.clamp, torch.clip, torch.abs, torch.neg, torch.exp,
                        torch.log, torch.erf, torch.relu, F.relu, F.gelu, F.silu, F.softplus, F.hardtanh)
_UNEXPRESSIBLE_METHODS = ("tanh", "sigmoid", "clamp", "clip", "abs", "neg", "exp", "log", "erf", "relu")


class _Skip(Exception):
    pass


def _is_softmax(node: fx.Node) -> bool:
    return is_call(node, *_SOFTMAX_FUNCS) or is_method(node, "softmax")


def _einsum_form(node: Any) -> Optional[str]:
    """"scores" for P·q·d, P·k·d -> P·q·k; "output" for P·q·k, P·k·d -> P·q·d (P: shared batch
    letters, same order everywhere); None for any other einsum. Other layouts are left alone."""
    if not is_call(node, torch.einsum) or not node.args or not isinstance(node.args[0], str):
        return None
    if len(_einsum_operands(node)) != 2:
        return None
    eq = node.args[0].replace(" ", "").replace("...", "#")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != 2 or any(len(t) < 3 for t in (*ins, out)) or len(set(out)) != len(out):
        return None
    (a, b), n = ins, len(out) - 2
    batch = out[:n]
    if a[:-2] != batch or b[:-2] != batch or len(a) != len(out) or len(b) != len(out):
        return None
    x, y = out[-2:]
    if a[-2] == x and b[-2] == y and a[-1] == b[-1] and a[-1] not in out:
        return "scores"
    if a[-2:] == out[-2] + b[-2] and b[-1] == out[-1] and b[-2] not in out:
        return "output"
    return None


def _einsum_operands(node: fx.Node) -> tuple:
    ops = node.args[1:]
    return tuple(ops[0]) if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else tuple(ops)


def _is_mm(node: Any) -> bool:
    """A product whose left operand is reduced over its last dim against the right's second-last."""
    return is_call(node, *_MATMUL_FUNCS) or is_method(node, *_MATMUL_METHODS) or _einsum_form(node) == "output"


def _is_first_mm(node: Any) -> bool:
    return (_is_mm(node) or is_call(node, torch.baddbmm) or is_method(node, "baddbmm")
            or _einsum_form(node) == "scores")


def _mm_operands(node: fx.Node) -> tuple:
    """(left, right) of a matmul-like node; for baddbmm the two batches, for einsum the operands."""
    if is_call(node, torch.einsum):
        return _einsum_operands(node)
    if is_call(node, torch.baddbmm) or is_method(node, "baddbmm"):
        return arg(node, 1, "batch1"), arg(node, 2, "batch2")  # BLOOM names them
    return node.args[0], node.args[1]


def _is_tensor_node(x: Any) -> bool:
    return isinstance(x, fx.Node) and example_value(x) is not None


def _const_tensor_value(node: Any) -> Optional[float]:
    """The value of a 0-dim tensor built from a literal (torch.tensor(-1e9), torch.full((), v))."""
    if is_call(node, torch.tensor):
        return const_number(node.args[0]) if node.args else None
    if is_call(node, torch.full) and len(node.args) > 1:
        return const_number(node.args[1])
    return None


def _binary(node: fx.Node) -> tuple[Any, Any]:
    # Functions and methods alike record self/input first, then other.
    return node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")


def _kind(node: Any) -> Optional[str]:
    """Which scores-chain operation a node is, if any."""
    if not isinstance(node, fx.Node):
        return None
    if is_call(node, *_ADD_FUNCS) or is_method(node, "add", "add_"):
        return "add"
    if is_call(node, *_SUB_FUNCS) or is_method(node, "sub", "sub_"):
        return "sub"
    if is_call(node, *_MUL_FUNCS) or is_method(node, "mul", "mul_"):
        return "mul"
    if is_call(node, *_DIV_FUNCS) or is_method(node, "div", "div_"):
        return "div"
    if is_method(node, "masked_fill", "masked_fill_") or is_call(node, torch.masked_fill):
        return "fill"
    if is_call(node, torch.where) and len(node.args) == 3:
        return "where"
    if is_method(node, *_CAST_METHODS):
        return "cast"
    if is_method(node, "view", "reshape") or is_call(node, torch.reshape):
        return "reshape"
    return None


def _scores_operands(node: fx.Node, kind: str) -> list:
    """Operands of a chain node that could carry the scores (the others are masks or constants)."""
    if kind in ("add", "sub", "mul", "div"):
        a, b = _binary(node)
        return [a, b] if kind in ("add", "mul") else [a]
    if kind == "where":
        return [node.args[1], node.args[2]]
    return [node.args[0]]


def _is_unexpressible(node: Any) -> bool:
    return isinstance(node, fx.Node) and (is_call(node, *_UNEXPRESSIBLE_FUNCS)
                                          or is_method(node, *_UNEXPRESSIBLE_METHODS))


def _walk_scores(start: Any, probe: bool = False,
                 passed: Optional[list] = None) -> Optional[tuple[fx.Node, list[fx.Node]]]:
    """(first matmul, chain nodes after it in forward order) behind a softmax input, or None.

    passed: walk through the elementwise ops the op cannot express too, listing them there
    (only to tell a core they hide from a softmax with no attention behind it)."""
    chain: list[fx.Node] = []
    node = start
    for _ in range(_MAX_CHAIN):
        if _is_first_mm(node):
            return node, chain[::-1]
        kind = _kind(node)
        if kind is None and passed is not None and _is_unexpressible(node):
            passed.append(node)
            chain.append(node)
            node = node.args[0]
            continue
        if kind is None:
            return None
        candidates = [c for c in _scores_operands(node, kind) if _is_tensor_node(c)]
        if len(candidates) > 1:
            # Both operands are tensors: the scores are the one a batched matmul produced.
            candidates = [c for c in candidates if _walk_scores(c, True, None if passed is None else []) is not None]
            if len(candidates) > 1:
                if probe:
                    return None
                raise _Skip(f"both operands of {node.name} look like attention scores")
        if not candidates:
            return None
        chain.append(node)
        node = candidates[0]
    return None


@dataclass
class _Term:
    """One additive contribution to the mask, scaled by every constant applied after it."""

    kind: str  # "add" | "fill"
    node: fx.Node  # the additive tensor, or the fill condition
    sign: float = 1.0
    value: float = 0.0  # fill value
    invert: bool = False  # fill where the condition is False
    mult: float = 1.0
    frame: int = 4  # rank of the scores it was applied to: 3 = heads folded into dim 0


@dataclass
class _Chain:
    scale: float = 1.0
    terms: list[_Term] = field(default_factory=list)
    inplace: list[fx.Node] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    heads: set[int] = field(default_factory=set)  # head counts read off [B, H, Lq, Lk] views
    # Run-time factors (dynamic=True: HF's self.scaling is a graph input): (node, "mul" | "div").
    # ``scale`` includes their values at capture; the op is handed a node computing the product.
    dynamic: list[tuple[fx.Node, str]] = field(default_factory=list)
    dynamic_hint: float = 1.0  # their product at capture (``scale`` holds the constant factors)

    def rescale(self, c: float, where: str) -> None:
        if not math.isfinite(c) or c <= 0:
            raise _Skip(f"scale {c} at {where} is not a positive finite constant")
        self.scale *= c
        for t in self.terms:
            t.mult *= c

    def rescale_dynamic(self, factor: fx.Node, kind: str, hint: float, where: str) -> None:
        if not math.isfinite(hint) or hint <= 0:
            raise _Skip(f"run-time scale {factor.name} at {where} is {hint} at capture, not positive and finite")
        if self.terms:
            # Mask terms would need the run-time factor folded in; not supported.
            raise _Skip(f"scores are scaled by the run-time value {factor.name} at {where} after a mask was applied")
        self.dynamic_hint *= hint if kind == "mul" else 1.0 / hint
        self.dynamic.append((factor, kind))


def _scale_node(graph: fx.Graph, factors: list[tuple[fx.Node, str]], const: float, like: fx.Node) -> fx.Node:
    """A node computing const · Π factors (÷ for "div" factors) at run time, as a float."""
    node: Any = None
    for factor, kind in factors:
        if node is None:
            node = factor if kind == "mul" else insert_node(graph, "call_function", operator.truediv, (1.0, factor),
                                                            meta_like=like)
        else:
            op = operator.mul if kind == "mul" else operator.truediv
            node = insert_node(graph, "call_function", op, (node, factor), meta_like=like)
    if const != 1.0:
        node = insert_node(graph, "call_function", operator.mul, (node, const), meta_like=like)
    return float_scalar_node(graph, node, meta_like=like)


def _fill_value(value: Any, where: str, st: _Chain) -> float:
    v = const_number(value)
    if v is None:
        v = _const_tensor_value(value)
    if v is None:
        raise _Skip(f"mask fill value at {where} is not a constant")
    if not v <= _MIN_FILL:
        raise _Skip(f"mask fill value {v} at {where} is not a large negative constant")
    if math.isfinite(v):
        st.notes.append(f"fill {v:g} at {where} became additive: equal unless a whole row is masked")
    return v


def _read_chain(mm1: fx.Node, chain: list[fx.Node]) -> _Chain:
    st = _Chain()
    if is_call(mm1, torch.baddbmm) or is_method(mm1, "baddbmm"):
        beta = const_number(mm1.kwargs.get("beta", 1.0))
        alpha = const_number(mm1.kwargs.get("alpha", 1.0))
        if beta is None or alpha is None:
            raise _Skip("baddbmm beta/alpha are not constants")
        st.rescale(alpha, mm1.name)
        if beta != 0.0:  # beta == 0 ignores the input entirely, NaNs included
            st.terms.append(_Term("add", arg(mm1, 0, "input"), mult=beta, frame=example_value(mm1).dim()))
    prev = mm1
    for node in chain:
        kind = _kind(node)
        frame = example_value(node).dim()
        if frame == 4:
            st.heads.add(int(example_value(node).shape[1]))
        if node.op == "call_method" and node.target in _INPLACE_TO_PURE:
            st.inplace.append(node)
        if kind == "cast":
            val = example_value(node)
            if val is None or not val.is_floating_point():
                raise _Skip(f"{node.name} casts the scores to a non-float type")
        elif kind in ("mul", "div"):
            a, b = _binary(node)
            other = b if a is prev else a
            if (kind == "div" and other is a) or node.kwargs.get("rounding_mode") is not None:
                raise _Skip(f"scores are scaled by a non-constant at {node.name}")
            c = const_number(other)
            if c is not None:
                st.rescale(c if kind == "mul" else 1.0 / c, node.name)
            else:
                hint = runtime_scalar_hint(other)
                if hint is None:
                    raise _Skip(
                        f"scores are scaled at {node.name} by something that is neither a Python number nor a "
                        "run-time scalar of the graph inputs (a tensor, or a value computed from tensor data)"
                    )
                st.rescale_dynamic(other, kind, hint, node.name)
        elif kind in ("add", "sub"):
            a, b = _binary(node)
            if a is b:
                raise _Skip(f"{node.name} combines the scores with themselves")
            other = b if a is prev else a
            alpha = node.kwargs.get("alpha", 1)
            if alpha != 1:
                raise _Skip(f"{node.name} adds with alpha={alpha}")
            if isinstance(other, fx.Node):
                st.terms.append(_Term("add", other, sign=-1.0 if kind == "sub" else 1.0, frame=frame))
            elif const_number(other) is None:
                raise _Skip(f"{node.name} adds something that is neither a tensor nor a constant")
            # A constant shift of every score leaves the softmax unchanged.
        elif kind == "fill":
            mask = arg(node, 1, "mask")
            value = arg(node, 2, "value")
            st.terms.append(_Term("fill", mask, value=_fill_value(value, node.name, st), frame=frame))
        elif kind == "where":
            cond, a, b = node.args
            keep_where_true = a is prev
            value = b if keep_where_true else a
            st.terms.append(_Term("fill", cond, value=_fill_value(value, node.name, st), invert=keep_where_true,
                                  frame=frame))
        prev = node
    return st


def _softmax_dim(node: fx.Node) -> Any:
    # F.softmax(input, dim), torch.softmax(input, dim) and Tensor.softmax(dim) all put dim second.
    return arg(node, 1, "dim")


def _check_fold(node: fx.Node, before: Optional[torch.Tensor]) -> None:
    """A reshape inside the core may only fold/unfold heads into the batch: [B*H, Lq, Lk] <->
    [B, H, Lq, Lk], keys and queries untouched."""
    after = example_value(node)
    if before is None or after is None:
        raise _Skip(f"{node.name} carries no shape information")
    ok = (
        after.dim() in (3, 4) and before.dim() in (3, 4)
        and tuple(after.shape[-2:]) == tuple(before.shape[-2:])
        and math.prod(after.shape[:-2]) == math.prod(before.shape[:-2])
    )
    if not ok:
        raise _Skip(f"{node.name} reshapes the attention scores beyond folding heads into the batch")


def _walk_probs(softmax: fx.Node) -> tuple[fx.Node, list[fx.Node], float]:
    """(second matmul, nodes between softmax and it, dropout probability)."""
    node, between, dropout_p = softmax, [], 0.0
    for _ in range(_MAX_CHAIN):
        users = list(node.users)
        if len(users) != 1:
            raise _Skip(
                "attention probabilities are used outside the attention core"
                + (" (e.g. returned with output_attentions=True)" if users else "")
            )
        user = users[0]
        if _is_mm(user):
            if _mm_operands(user)[0] is not node:
                raise _Skip("attention probabilities are the right operand of the second matmul")
            return user, between, dropout_p
        if _kind(user) == "reshape" and user.args[0] is node:
            _check_fold(user, example_value(node))
        elif is_method(user, *_CAST_METHODS) and user.args[0] is node:
            val = example_value(user)
            if val is None or not val.is_floating_point():
                raise _Skip(f"{user.name} casts the probabilities to a non-float type")
        elif is_call(user, *_DROPOUT_FUNCS) and user.args[0] is node:
            p = arg(user, 1, "p", 0.5)
            training = arg(user, 2, "training" if user.target is F.dropout else "train", True)
            if not isinstance(training, bool) or (training and const_number(p) is None):
                raise _Skip(f"dropout {user.name} has a run-time probability or training flag")
            if training and dropout_p:
                raise _Skip("two active dropouts on the attention probabilities")
            dropout_p = float(p) if training else dropout_p  # p is irrelevant (maybe symbolic) in eval
        else:
            raise _Skip(f"attention probabilities feed {user.name}, not a matmul with the values")
        between.append(user)
        node = user
    raise _Skip("probabilities chain too long")


def _unscale(node: Any) -> tuple[Any, float]:
    """Strip constant multiplications/divisions (pre-scaled q or k); returns (base, factor)."""
    factor = 1.0
    for _ in range(4):
        kind = _kind(node)
        if kind not in ("mul", "div") or node.kwargs.get("rounding_mode") is not None:
            break
        a, b = _binary(node)
        if kind == "mul" and const_number(a) is not None and isinstance(b, fx.Node):
            a, b = b, a
        c = const_number(b)
        if c is None or not isinstance(a, fx.Node) or not math.isfinite(c) or c <= 0:
            break
        factor *= c if kind == "mul" else 1.0 / c
        node = a
    return node, factor


def _build_mask(graph: fx.Graph, st: _Chain, score_dtype: torch.dtype, q_dtype: torch.dtype, heads: int,
                like: fx.Node):
    """One additive mask node, broadcastable to [B, H, Lq, Lk], equivalent to every term."""
    parts = []
    for t in st.terms:
        if t.kind == "add":
            n = t.node
            if t.sign < 0:
                n = insert_node(graph, "call_function", operator.neg, (n,), meta_like=like)
            if t.mult != 1.0:
                n = insert_node(graph, "call_function", operator.mul, (n, t.mult), meta_like=like)
        else:
            cond = t.node
            if t.invert:
                cond = insert_node(graph, "call_method", "logical_not", (cond,), meta_like=like)
            zeros = insert_node(graph, "call_function", torch.zeros_like, (cond,), {"dtype": score_dtype}, meta_like=like)
            n = insert_node(graph, "call_method", "masked_fill", (zeros, cond, t.value * t.mult), meta_like=like)
        val = example_value(n)
        if t.frame == 3 and val is not None and val.dim() == 3 and val.shape[0] != 1:
            # Added to [B*H, Lq, Lk] scores: its dim 0 is batch*heads, not heads.
            n = insert_node(graph, "call_method", "unflatten", (n, 0, (-1, heads)), meta_like=like)
        parts.append(n)
    if not parts:
        return None
    mask = parts[0]
    for p in parts[1:]:
        mask = insert_node(graph, "call_function", operator.add, (mask, p), meta_like=like)
    val = example_value(mask)
    if val is None or val.dtype != q_dtype:
        mask = insert_node(graph, "call_method", "to", (mask, q_dtype), meta_like=like)
    return mask


def _functionalize(x: fx.Node) -> bool:
    # Only a tensor this core allocated: a view's writes would reach its base.
    fresh = _is_first_mm(x) or (_kind(x) in ("add", "sub", "mul", "div", "fill", "where")
                                and not str(x.target).endswith("_"))
    return fresh and functionalize_writes(x, _INPLACE_TO_PURE)


def _batched(mm1: fx.Node) -> bool:
    vals = [example_value(x) for x in _mm_operands(mm1)]
    return all(v is not None and v.dim() >= 3 for v in vals)


def _match_at(gm: fx.GraphModule, softmax: fx.Node) -> Optional[AttentionMatch]:
    found = _walk_scores(softmax.args[0])
    if found is None:
        passed: list[fx.Node] = []
        hidden = _walk_scores(softmax.args[0], passed=passed)
        if hidden is not None and passed and _batched(hidden[0]):
            ops = ", ".join(sorted({str(getattr(n.target, "__name__", n.target)) for n in passed}))
            raise _Skip(f"{ops} between the attention scores and the softmax (logit softcapping?): "
                        f"the gated op has no such term")
        return None
    mm1, chain = found
    q_kt = _mm_operands(mm1)
    if not _batched(mm1):
        return None  # not batched: a classifier or some other projection, not attention

    for node in [mm1] + chain:
        if len(node.users) != 1 and _functionalize(node):
            return _match_at(gm, softmax)
    for node in [mm1] + chain:
        if len(node.users) != 1:
            raise _Skip(f"attention scores ({node.name}) are used outside the attention core")
    scores = example_value(mm1)
    sm_in = example_value(softmax.args[0])
    dim = _softmax_dim(softmax)
    if not isinstance(dim, int) or sm_in is None or dim % sm_in.dim() != sm_in.dim() - 1:
        raise _Skip(f"softmax is over dim {dim}, not the key dim (-1)")
    prev = scores
    for node in chain + [softmax]:
        val = example_value(node)
        if val is None:
            raise _Skip(f"{node.name} carries no shape information")
        if _kind(node) == "reshape":
            _check_fold(node, prev)
        elif tuple(val.shape) != tuple(prev.shape):
            raise _Skip(f"{node.name} broadcasts the attention scores to a new shape")
        prev = val

    mm2, _, dropout_p = _walk_probs(softmax)
    st = _read_chain(mm1, chain)

    q, q_factor = _unscale(q_kt[0])
    kt, kt_factor = _unscale(q_kt[1])
    k_factor = 1.0
    if _einsum_form(mm1) == "scores":
        k, kt = kt, None  # einsum reads k untransposed
    else:
        k = untranspose(kt)
    if k is not None:
        k, k_factor = _unscale(k)
    v = _mm_operands(mm2)[1]
    qv, vv, outv = (example_value(x) for x in (q, v, mm2))
    # Only rank, batch, heads and dtype of kᵀ are checked below: k's value serves as well.
    ktv = example_value(kt) if kt is not None else example_value(k)
    if any(x is None for x in (qv, ktv, vv, outv)):
        raise _Skip("q/k/v carry no shape information")
    nd = qv.dim()
    if not (ktv.dim() == vv.dim() == outv.dim() == nd) or nd not in (3, 4):
        raise _Skip(f"q/k/v/output ranks {qv.dim()}/{ktv.dim()}/{vv.dim()}/{outv.dim()} are not all 3 or all 4")
    if not (qv.shape[0] == ktv.shape[0] == vv.shape[0]):
        raise _Skip("q/k/v batch sizes differ (broadcast batch)")
    if nd == 4 and (ktv.shape[1] != vv.shape[1] or qv.shape[1] % ktv.shape[1] != 0):
        raise _Skip(f"query heads {qv.shape[1]} / key heads {ktv.shape[1]} / value heads {vv.shape[1]} do not group")
    if not (qv.dtype == ktv.dtype == vv.dtype == outv.dtype) or not qv.is_floating_point():
        raise _Skip("q/k/v/output dtypes differ")

    if nd == 4:
        heads = int(qv.shape[1])
        if st.heads - {heads}:
            raise _Skip(f"scores are viewed with {sorted(st.heads)} heads but q has {heads}")
    else:
        found_heads = {folded_heads(x) for x in (q, k if k is not None else kt, v)} | st.heads
        found_heads.discard(None)
        if len(found_heads) != 1:
            raise _Skip(
                "3-D attention whose number of heads cannot be read from a reshape" if not found_heads
                else f"q/k/v/scores reshapes disagree on the number of heads: {sorted(found_heads)}"
            )
        (heads,) = found_heads
        if qv.shape[0] % heads:
            raise _Skip(f"{heads} heads do not divide the folded batch {qv.shape[0]}")

    graph = gm.graph
    for node in st.inplace:
        # Every chain node has one user, so nobody else can observe the in-place write; the
        # pure form lets the dead chain be erased after the rewrite.
        node.target = _INPLACE_TO_PURE[node.target]
    with graph.inserting_before(mm2):
        if k is None:
            k = insert_node(graph, "call_method", "transpose", (kt, -2, -1), meta_like=mm1)
        mask = _build_mask(graph, st, example_value(chain[-1] if chain else mm1).dtype, qv.dtype, heads, mm1)
        const_scale = st.scale * q_factor * kt_factor * k_factor
        scale = const_scale * st.dynamic_hint
        scale_node = _scale_node(graph, st.dynamic, const_scale, mm1) if st.dynamic else None
    if scale_node is not None:
        names = ", ".join(n.name for n, _ in st.dynamic)
        st.notes.append(f"scale is a run-time value (from {names}); {scale:g} at capture")
    return AttentionMatch(
        pattern="eager_matmul" if nd == 4 else "eager_bmm",
        anchor=mm2,
        q=q,
        k=k,
        v=v,
        attn_mask=mask,
        mask_kind="none" if mask is None else "additive",
        scale=scale,
        dropout_p=dropout_p,
        heads_folded=heads if nd == 3 else None,
        kv_heads_folded=heads if nd == 3 else None,
        notes=st.notes,
        scale_node=scale_node,
    )


def match_eager(gm: fx.GraphModule) -> list[AttentionMatch | SkippedSite]:
    found: list[AttentionMatch | SkippedSite] = []
    for softmax in [n for n in gm.graph.nodes if _is_softmax(n)]:
        try:
            match = _match_at(gm, softmax)
        except _Skip as why:
            path, _ = module_path_of(softmax)
            found.append(SkippedSite(path, "eager", str(why)))
            continue
        if match is not None:
            found.append(match)
    return found
