"""Matcher for scaled_dot_product_attention calls (torch-level in Dynamo graphs, aten-level in exports)."""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .graph_utils import arg, const_number, example_value, float_scalar_node, module_path_of, runtime_scalar_hint
from .site import AttentionMatch, SkippedSite

SDPA_TARGETS = (
    torch._C._nn.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
)


def _mask_kind(mask) -> str | None:
    if mask is None:
        return "none"
    val = example_value(mask)
    if val is None:
        return None
    return "bool" if val.dtype == torch.bool else "additive"


def match_sdpa(gm: fx.GraphModule) -> list[AttentionMatch | SkippedSite]:
    found: list[AttentionMatch | SkippedSite] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        path, _ = module_path_of(node)
        q, k, v = (arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
        mask = arg(node, 3, "attn_mask")
        dropout_p = arg(node, 4, "dropout_p", 0.0)
        is_causal = arg(node, 5, "is_causal", False)
        scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
        enable_gqa = node.kwargs.get("enable_gqa", node.args[7] if len(node.args) > 7 else False)

        def skip(reason: str) -> None:
            found.append(SkippedSite(path, "sdpa", reason))

        shapes = [example_value(t) for t in (q, k, v)]
        if any(s is None for s in shapes):
            skip("q/k/v carry no shape information")
            continue
        if any(s.dim() != 4 for s in shapes):
            skip(f"q/k/v are not 4-D [B, H, L, D] (dims {[s.dim() for s in shapes]})")
            continue
        if not isinstance(dropout_p, (int, float)):
            skip("dropout_p is computed at run time")
            continue
        if not isinstance(is_causal, bool):
            skip("is_causal is computed at run time")
            continue
        scale_value, scale_node, notes = None, None, []
        if scale is not None:
            scale_value = const_number(scale)
            if scale_value is None and isinstance(scale, fx.Node):
                # dynamic=True: Dynamo lifts float attributes (HF's self.scaling) to graph inputs,
                # so scale= is a run-time scalar. The op is handed the same node; the site
                # describes it by its value at capture.
                scale_value = runtime_scalar_hint(scale)
                if scale_value is not None and not math.isfinite(scale_value):
                    skip(f"run-time scale {scale.name} is {scale_value} at capture, not finite")
                    continue
                if scale_value is not None:
                    scale_node = scale
                    notes.append(f"scale is the run-time value {scale.name} ({scale_value:g} at capture)")
            if scale_value is None:
                skip("scale is neither a Python number nor a run-time scalar of the graph inputs "
                     "(a tensor, or a value computed from tensor data)")
                continue
        kind = _mask_kind(mask)
        if kind is None:
            skip("attn_mask carries no dtype information")
            continue
        hq, hkv = shapes[0].shape[1], shapes[1].shape[1]
        # One kv head broadcasts over the query heads (Falcon's multi-query SDPA call): the op's
        # GQA with a single group computes exactly that.
        if hq != hkv and not enable_gqa and hkv != 1:
            skip(f"query heads ({hq}) != kv heads ({hkv}) without enable_gqa")
            continue
        if scale_node is not None:
            with gm.graph.inserting_before(node):
                scale_node = float_scalar_node(gm.graph, scale_node, meta_like=node)
        found.append(
            AttentionMatch(
                pattern="sdpa",
                anchor=node,
                q=q,
                k=k,
                v=v,
                attn_mask=mask,
                mask_kind=kind,
                scale=scale_value,
                is_causal=is_causal,
                dropout_p=float(dropout_p),
                notes=notes,
                scale_node=scale_node,
            )
        )
    return found
