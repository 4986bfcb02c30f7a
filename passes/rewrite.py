"""Replace one matched attention core by gate + ``dhp::gated_attention``."""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from .graph_utils import example_value
from .site import AttentionMatch

GATED_ATTENTION = "dhp::gated_attention"

# Calls that must survive even when their result looks unused.
_EFFECTFUL_PREFIXES = ("torch._C._set_grad_enabled", "torch.autograd.grad_mode", "torch._C._autograd")


def gated_attention_op():
    """The op by name: passes never import the kernels package."""
    namespace, name = GATED_ATTENTION.split("::")
    packet = getattr(getattr(torch.ops, namespace), name, None)
    if packet is None:
        raise RuntimeError(
            f"{GATED_ATTENTION} is not registered; import dhp_fx (or dhp_fx.kernels) before running the passes"
        )
    return packet.default


def _is_pure(node: fx.Node) -> bool:
    if node.op == "call_method":
        return not str(node.target).endswith("_")
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", str(node.target))
    if name.endswith("_") and not name.startswith("_"):
        return False
    qual = f"{getattr(node.target, '__module__', '')}.{name}"
    return not qual.startswith(_EFFECTFUL_PREFIXES) and not node.is_impure()


def erase_dead(start: fx.Node) -> int:
    """Erase start and then, transitively, its inputs that became unused and are side-effect free."""
    erased, stack = 0, [start]
    while stack:
        node = stack.pop()
        if node.graph is None or getattr(node, "_erased", False) or node.users or not _is_pure(node):
            continue
        inputs = list(node.all_input_nodes)
        node.graph.erase_node(node)
        erased += 1
        stack.extend(inputs)
    return erased


def _set_meta(node: fx.Node, like: Optional[torch.Tensor]) -> None:
    if like is not None:
        node.meta["example_value"] = like


def rewrite_match(
    gm: fx.GraphModule,
    match: AttentionMatch,
    num_heads: int,
    scale: float,
    gate_target: Optional[str],
    hidden: Optional[fx.Node] = None,
) -> fx.Node:
    """Insert the gated op in place of ``match.anchor``; returns the new output node.

    ``scale`` is the site's scale as a number; a run-time scale (``match.scale_node``) is passed
    to the op as that node instead, so the op scales by the value the original code would use."""
    graph = gm.graph
    scale_arg = match.scale_node if match.scale_node is not None else scale
    anchor = match.anchor
    anchor_val = example_value(anchor)
    with graph.inserting_before(anchor):
        q, k, v = match.q, match.k, match.v
        if match.heads_folded:
            # bmm-style [B*H, L, D]: expose the head axis so the gate can address single heads.
            q = graph.call_method("unflatten", (q, 0, (-1, match.heads_folded)))
            kv_heads = match.kv_heads_folded or match.heads_folded
            k = graph.call_method("unflatten", (k, 0, (-1, kv_heads)))
            v = graph.call_method("unflatten", (v, 0, (-1, kv_heads)))
        if gate_target is None:
            q_size = graph.call_method("size", (q,))
            batch = graph.call_function(operator.getitem, (q_size, 0))
            keep = graph.call_function(
                torch.ones, ((batch, num_heads),), {"dtype": torch.bool, "device": graph.call_function(getattr, (q, "device"))}
            )
        else:
            keep = graph.call_module(gate_target, (q, k, v, match.attn_mask), {"hidden": hidden})
        out = graph.call_function(
            gated_attention_op(),
            (q, k, v, keep, match.attn_mask, match.dropout_p, match.is_causal, scale_arg),
        )
        if match.heads_folded:
            out = graph.call_method("flatten", (out, 0, 1))
        _set_meta(out, anchor_val)
        out.meta["dhp_site"] = True
        for key in ("nn_module_stack", "source_fn_stack", "stack_trace"):
            if key in anchor.meta:
                out.meta[key] = anchor.meta[key]
    anchor.replace_all_uses_with(out)
    _keep_views_valid(graph, out, anchor_val)
    erase_dead(anchor)
    return out


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "view"
    return node.op == "call_function" and node.target in (torch.Tensor.view, torch.ops.aten.view.default)


def _keep_views_valid(graph: fx.Graph, out: fx.Node, anchor_val) -> None:
    """The gated op lays its output out as q is (token-major for a model's [B, L, H, D] storage),
    where an eager ``probs @ v`` returned [B, H, L, D]-contiguous memory. A ``.view`` that relied
    on that would fail: such users read a contiguous copy (free when the output already is one);
    every other user reads the output as it is."""
    views = [u for u in out.users if _is_view(u)]
    if not views or not isinstance(anchor_val, torch.Tensor) or not anchor_val.is_contiguous():
        return
    with graph.inserting_after(out):
        dense = graph.call_method("contiguous", (out,))
    _set_meta(dense, anchor_val)
    for user in views:
        user.replace_input_with(out, dense)
