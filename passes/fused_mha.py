"""Decompose fused multi-head-attention nodes into projections + SDPA, so their heads are visible.

Handled: torch._transformer_encoder_layer_fwd (nn.TransformerEncoderLayer fast path),
torch._native_multi_head_attention (nn.MultiheadAttention fast path) and
F.multi_head_attention_forward (nn.MultiheadAttention otherwise). q/k/v become separate
F.linear calls on row slices of in_proj_weight/bias so projections.py can name each slice.

Mask semantics differ between the fused kernels and F.multi_head_attention_forward, and both
were pinned down numerically against torch: the native kernels treat a mask as boolean
"ignore" (True, or any non-zero float, masks the key), while F.multi_head_attention_forward
turns bool masks into -inf and adds float masks as they are.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .graph_utils import example_value, insert_node, module_path_of, parameter_name
from .site import SkippedSite

SDPA = torch._C._nn.scaled_dot_product_attention
_TEL = torch._transformer_encoder_layer_fwd
_NATIVE_MHA = torch._native_multi_head_attention
_F_MHA = F.multi_head_attention_forward

_TEL_ARGS = (
    "src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "use_gelu",
    "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2", "norm_bias_2", "ffn_weight_1",
    "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask", "mask_type",
)
_NATIVE_ARGS = (
    ("query", None), ("key", None), ("value", None), ("embed_dim", None), ("num_head", None),
    ("qkv_weight", None), ("qkv_bias", None), ("proj_weight", None), ("proj_bias", None), ("mask", None),
    ("need_weights", True), ("average_attn_weights", True), ("mask_type", None),
)
_F_MHA_ARGS = (
    ("query", None), ("key", None), ("value", None), ("embed_dim_to_check", None), ("num_heads", None),
    ("in_proj_weight", None), ("in_proj_bias", None), ("bias_k", None), ("bias_v", None),
    ("add_zero_attn", None), ("dropout_p", None), ("out_proj_weight", None), ("out_proj_bias", None),
    ("training", True), ("key_padding_mask", None), ("need_weights", True), ("attn_mask", None),
    ("use_separate_proj_weight", False), ("q_proj_weight", None), ("k_proj_weight", None),
    ("v_proj_weight", None), ("static_k", None), ("static_v", None), ("average_attn_weights", True),
    ("is_causal", False),
)


class _Skip(Exception):
    pass


def _bind(node: fx.Node, spec) -> dict[str, Any]:
    names = [s if isinstance(s, str) else s[0] for s in spec]
    bound = {s[0]: s[1] for s in spec if not isinstance(s, str)}
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


class _Builder:
    """Inserts nodes before the fused node, each carrying fake-tensor meta and a module stack."""

    def __init__(self, graph: fx.Graph, like: fx.Node, created: list, stack: Optional[dict] = None):
        self.graph, self.like, self.created, self.stack = graph, like, created, stack

    def _done(self, node: fx.Node) -> fx.Node:
        if self.stack is not None:
            node.meta["nn_module_stack"] = self.stack
        self.created.append(node)
        return node

    def fn(self, target, *args, **kwargs) -> fx.Node:
        return self._done(insert_node(self.graph, "call_function", target, args, kwargs, meta_like=self.like))

    def method(self, name: str, *args, **kwargs) -> fx.Node:
        return self._done(insert_node(self.graph, "call_method", name, args, kwargs, meta_like=self.like))


def _rows(b: _Builder, t: Optional[fx.Node], i: int, e: int) -> Optional[fx.Node]:
    return None if t is None else b.fn(operator.getitem, t, slice(i * e, (i + 1) * e, None))


def _attention(b: _Builder, q_in, k_in, v_in, heads, weights, biases, w_o, b_o, mask, causal, dropout_p, seq_first):
    """Projections, heads split, SDPA, heads merged, output projection; returns the output node."""
    split = (lambda t: b.method("permute", t, 1, 2, 0, 3)) if seq_first else (lambda t: b.method("transpose", t, 1, 2))
    qkv = []
    for x, w, bias in zip((q_in, k_in, v_in), weights, biases):
        proj = b.fn(F.linear, x, w, bias)
        qkv.append(split(b.method("unflatten", proj, -1, (heads, -1))))
    o = b.fn(SDPA, *qkv, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
    o = b.method("permute", o, 2, 0, 1, 3) if seq_first else b.method("transpose", o, 1, 2)
    return b.fn(F.linear, b.method("flatten", o, -2), w_o, b_o)


def _native_mask(b: _Builder, mask: Optional[fx.Node], mask_type: Any) -> Optional[fx.Node]:
    """SDPA bool mask (True = attend) equivalent to a native-kernel mask (True/non-zero = ignore)."""
    if mask is None:
        return None
    val = example_value(mask)
    if val is None:
        raise _Skip("mask carries no dtype/shape information")
    if mask_type not in (0, 1, 2):
        raise _Skip(f"mask_type {mask_type!r} is not 0, 1 or 2")
    attend = b.method("logical_not", mask) if val.dtype == torch.bool else b.fn(operator.eq, mask, 0)
    if mask_type == 1:
        if val.dim() != 2:
            raise _Skip(f"key padding mask has {val.dim()} dims, expected [batch, keys]")
        return b.fn(operator.getitem, attend, (slice(None), None, None, slice(None)))
    if (mask_type == 0 and val.dim() != 2) or val.dim() > 4:
        raise _Skip(f"mask_type {mask_type} mask with shape {tuple(val.shape)}")
    return attend


def _check_batched(node: Any, what: str) -> torch.Tensor:
    val = example_value(node)
    if val is None:
        raise _Skip(f"{what} carries no shape information")
    if val.is_nested:
        raise _Skip(f"{what} is a nested tensor")
    if val.dim() != 3:
        raise _Skip(f"{what} is not batched 3-D (dims {val.dim()})")
    return val


def _attn_stack(node: fx.Node, in_proj_weight: Any) -> Optional[dict]:
    """The fused node's module stack plus the MultiheadAttention that owns in_proj_weight, so the
    site is named after the attention module rather than the whole encoder layer."""
    stack = dict(node.meta.get("nn_module_stack") or {})
    name = parameter_name(in_proj_weight)
    if name is None or not name.endswith(".in_proj_weight"):
        return stack or None
    stack["dhp_fx.self_attn"] = (name[: -len(".in_proj_weight")], nn.MultiheadAttention)
    return stack


def _weights_output_unused(node: fx.Node) -> None:
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1)):
            raise _Skip(f"the fused output tuple is used whole by {user.name}")
        if user.args[1] == 1 and user.users:
            raise _Skip("the attention weights output is used")


def _replace_output(node: fx.Node, out: fx.Node) -> None:
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        node.graph.erase_node(user)
    node.graph.erase_node(node)


def _decompose_tel(gm: fx.GraphModule, node: fx.Node, created: list) -> None:
    a = _bind(node, _TEL_ARGS)
    val = _check_batched(a["src"], "src")
    e, heads = a["embed_dim"], a["num_heads"]
    if not isinstance(e, int) or not isinstance(heads, int) or val.shape[-1] != e or e % heads:
        raise _Skip("embed_dim/num_heads are not constants that fit the input")
    if not isinstance(a["use_gelu"], bool) or not isinstance(a["norm_first"], bool):
        raise _Skip("activation/norm_first flags are not constants")
    layer = _Builder(gm.graph, node, created)
    attn = _Builder(gm.graph, node, created, _attn_stack(node, a["qkv_weight"]))
    with gm.graph.inserting_before(node):
        mask = _native_mask(attn, a["mask"], a["mask_type"])

        def norm(x, i):
            return layer.fn(F.layer_norm, x, (e,), a[f"norm_weight_{i}"], a[f"norm_bias_{i}"], a["eps"])

        src = a["src"]
        x = norm(src, 1) if a["norm_first"] else src
        weights = [_rows(attn, a["qkv_weight"], i, e) for i in range(3)]
        biases = [_rows(attn, a["qkv_bias"], i, e) for i in range(3)]
        x = _attention(attn, x, x, x, heads, weights, biases, a["proj_weight"], a["proj_bias"], mask, False, 0.0, False)
        x = layer.fn(operator.add, x, src)
        if not a["norm_first"]:
            x = norm(x, 1)
        residual = x
        if a["norm_first"]:
            x = norm(x, 2)
        x = layer.fn(F.linear, x, a["ffn_weight_1"], a["ffn_bias_1"])
        x = layer.fn(F.gelu if a["use_gelu"] else F.relu, x)
        x = layer.fn(F.linear, x, a["ffn_weight_2"], a["ffn_bias_2"])
        x = layer.fn(operator.add, x, residual)
        if not a["norm_first"]:
            x = norm(x, 2)
    node.replace_all_uses_with(x)
    gm.graph.erase_node(node)


def _decompose_native(gm: fx.GraphModule, node: fx.Node, created: list) -> None:
    a = _bind(node, _NATIVE_ARGS)
    _weights_output_unused(node)
    vals = [_check_batched(a[r], r) for r in ("query", "key", "value")]
    if len({tuple(v.shape) for v in vals}) != 1:
        raise _Skip("query/key/value shapes differ (the native kernel requires equal shapes)")
    e, heads = a["embed_dim"], a["num_head"]
    if not isinstance(e, int) or not isinstance(heads, int) or vals[0].shape[-1] != e or e % heads:
        raise _Skip("embed_dim/num_head are not constants that fit the input")
    b = _Builder(gm.graph, node, created)
    with gm.graph.inserting_before(node):
        mask = _native_mask(b, a["mask"], a["mask_type"])
        weights = [_rows(b, a["qkv_weight"], i, e) for i in range(3)]
        biases = [_rows(b, a["qkv_bias"], i, e) for i in range(3)]
        out = _attention(b, a["query"], a["key"], a["value"], heads, weights, biases, a["proj_weight"],
                         a["proj_bias"], mask, False, 0.0, False)
    _replace_output(node, out)


def _additive(b: _Builder, mask: Optional[fx.Node], dtype: torch.dtype) -> Optional[fx.Node]:
    """F._canonical_mask: bool True becomes -inf, float masks are added as they are."""
    if mask is None:
        return None
    val = example_value(mask)
    if val is None:
        raise _Skip("mask carries no dtype information")
    if val.dtype == torch.bool:
        return b.method("masked_fill", b.fn(torch.zeros_like, mask, dtype=dtype), mask, float("-inf"))
    if not val.is_floating_point():
        raise _Skip(f"mask dtype {val.dtype} is neither bool nor float")
    return mask


def _decompose_f_mha(gm: fx.GraphModule, node: fx.Node, created: list) -> None:
    a = _bind(node, _F_MHA_ARGS)
    _weights_output_unused(node)
    vals = [_check_batched(a[r], r) for r in ("query", "key", "value")]
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[name] is not None:
            raise _Skip(f"{name} is set")
    flags = ("add_zero_attn", "training", "need_weights", "use_separate_proj_weight", "is_causal")
    if any(not isinstance(a[f], bool) for f in flags):
        raise _Skip("a flag of multi_head_attention_forward is computed at run time")
    if a["add_zero_attn"]:
        raise _Skip("add_zero_attn is set")
    e, heads, p = a["embed_dim_to_check"], a["num_heads"], a["dropout_p"]
    if not isinstance(e, int) or not isinstance(heads, int):
        raise _Skip("embed_dim/num_heads are not constants")
    if a["training"] and not isinstance(p, (int, float)):
        raise _Skip("dropout_p is computed at run time")  # in eval it is ignored, symbolic or not
    if vals[0].shape[-1] != e or e % heads:
        raise _Skip("embed_dim does not fit the query or the heads")
    dtype = vals[0].dtype
    b = _Builder(gm.graph, node, created)
    with gm.graph.inserting_before(node):
        if a["use_separate_proj_weight"]:
            weights = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
            if any(w is None for w in weights):
                raise _Skip("use_separate_proj_weight without q/k/v weights")
        else:
            weights = [_rows(b, a["in_proj_weight"], i, e) for i in range(3)]
        biases = [_rows(b, a["in_proj_bias"], i, e) for i in range(3)]
        kpm, am, causal = a["key_padding_mask"], a["attn_mask"], a["is_causal"]
        if causal and am is None:
            raise _Skip("is_causal without attn_mask (multi_head_attention_forward raises)")
        if causal and kpm is None and not a["need_weights"]:
            am = None  # the is_causal hint replaces the mask, as torch does on this path
        else:
            causal = False
        kpm = _additive(b, kpm, dtype)
        if kpm is not None:
            kv = example_value(kpm)
            if kv is None or kv.dim() != 2:
                raise _Skip("key_padding_mask is not [batch, keys]")
            kpm = b.fn(operator.getitem, kpm, (slice(None), None, None, slice(None)))
        am = _additive(b, am, dtype)
        if am is not None:
            av = example_value(am)
            if av.dim() == 3 and av.shape[0] != 1:
                am = b.method("unflatten", am, 0, (-1, heads))
            elif av.dim() not in (2, 3):
                raise _Skip(f"attn_mask has {av.dim()} dims")
        mask = am if kpm is None else kpm if am is None else b.fn(operator.add, am, kpm)
        dropout = float(p) if a["training"] else 0.0
        out = _attention(b, a["query"], a["key"], a["value"], heads, weights, biases, a["out_proj_weight"],
                         a["out_proj_bias"], mask, causal, dropout, True)
    _replace_output(node, out)


_DECOMPOSERS = {_TEL: _decompose_tel, _NATIVE_MHA: _decompose_native, _F_MHA: _decompose_f_mha}


def decompose_fused_mha_report(gm: fx.GraphModule) -> tuple[int, list[SkippedSite]]:
    """Decompose every supported fused node; returns (how many, the ones left alone and why)."""
    count, skipped = 0, []
    for node in list(gm.graph.nodes):
        fn = _DECOMPOSERS.get(node.target) if node.op == "call_function" else None
        if fn is None:
            continue
        created: list[fx.Node] = []
        try:
            fn(gm, node, created)
        except _Skip as why:
            for new in reversed(created):  # a refused decomposition leaves nothing behind
                gm.graph.erase_node(new)
            path, _ = module_path_of(node)
            skipped.append(SkippedSite(path, "mha_fused", str(why)))
            continue
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count, skipped


def decompose_fused_mha(gm: fx.GraphModule) -> int:
    return decompose_fused_mha_report(gm)[0]
