"""Matcher for scaled_dot_product_attention calls (torch-level in Dynamo graphs, aten-level in exports)."""
from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import arg, example_value, module_path_of
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
        if scale is not None and not isinstance(scale, (int, float)):
            skip("scale is computed at run time")
            continue
        kind = _mask_kind(mask)
        if kind is None:
            skip("attn_mask carries no dtype information")
            continue
        hq, hkv = shapes[0].shape[1], shapes[1].shape[1]
        if hq != hkv and not enable_gqa:
            skip(f"query heads ({hq}) != kv heads ({hkv}) without enable_gqa")
            continue
        found.append(
            AttentionMatch(
                pattern="sdpa",
                anchor=node,
                q=q,
                k=k,
                v=v,
                attn_mask=mask,
                mask_kind=kind,
                scale=None if scale is None else float(scale),
                is_causal=is_causal,
                dropout_p=float(dropout_p),
            )
        )
    return found
