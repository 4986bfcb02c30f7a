"""The ``dhp::gated_attention`` custom op: registration, argument checks, fake and autograd.

Graph passes emit ``torch.ops.dhp.gated_attention`` by name; the implementation behind it
(CPU path now, Triton on CUDA later) can change without touching the passes.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import gated_attention_reference


def check_gated_attention_args(q, k, v, keep, attn_mask) -> None:
    """Raise ValueError naming the offending argument when shapes or dtypes do not fit."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"gated_attention: q, k, v must be 4-D [batch, heads, seq, dim], got "
            f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    B, Hq, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"gated_attention: batch of k/v ({k.shape[0]}/{v.shape[0]}) != batch of q ({B})")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"gated_attention: k{tuple(k.shape)} and v{tuple(v.shape)} disagree on heads or length")
    if k.shape[3] != D:
        raise ValueError(f"gated_attention: head dim of k ({k.shape[3]}) != head dim of q ({D})")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"gated_attention: query heads ({Hq}) not a multiple of kv heads ({k.shape[1]})")
    if keep.dtype != torch.bool or tuple(keep.shape) != (B, Hq):
        raise ValueError(
            f"gated_attention: keep must be a bool tensor of shape ({B}, {Hq}), "
            f"got {keep.dtype} {tuple(keep.shape)}"
        )
    if attn_mask is not None and attn_mask.dim() > 4:
        raise ValueError(f"gated_attention: attn_mask must have at most 4 dims, got {attn_mask.dim()}")


@torch.library.custom_op("dhp::gated_attention", mutates_args=())
def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention in which heads with ``keep[b, h] == False`` do no work and output exact zeros."""
    check_gated_attention_args(q, k, v, keep, attn_mask)
    return gated_attention_reference(q, k, v, keep, attn_mask, dropout_p, is_causal, scale).contiguous()


@gated_attention.register_fake
def _(q, k, v, keep, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    B, Hq, Lq, _ = q.shape
    return q.new_empty((B, Hq, Lq, v.shape[-1]))
