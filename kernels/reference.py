"""Plain-PyTorch definition of gated attention: the semantics every other path must reproduce."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention, then the rows of pruned heads replaced by exact zeros.

    q: [B, Hq, Lq, D]   k: [B, Hkv, Lk, D]   v: [B, Hkv, Lk, Dv]   keep: bool [B, Hq]
    Query head h reads kv head h // (Hq // Hkv). attn_mask follows SDPA: bool (True = attend) or
    additive, broadcastable to [B, Hq, Lq, Lk]. Returns [B, Hq, Lq, Dv].
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )
    # where(), not a multiply: a pruned head whose row is fully masked must give 0, not NaN.
    return torch.where(keep[:, :, None, None], out, out.new_zeros(()))
