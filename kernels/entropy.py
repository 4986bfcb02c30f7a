"""Normalised attention entropy per (batch, head), from a subset of query rows.

The gate must judge a head before the head runs, so this path is kept light: only the chosen
query rows are scored (QKᵀ on R rows instead of Lq, no PV product), in float32 whatever the
model dtype, with GQA handled by broadcasting instead of repeating K.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

# Additive-mask entries at or below this count as "may not attend". HF writes finfo(dtype).min
# (-65504 in fp16), relative-position biases stay far above it.
MASKED_BELOW = -1.0e4


def probe_rows(
    num_rows: int,
    fraction: float,
    query_valid: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Indices of the query rows a probe scores: ceil(fraction * rows), at least one.

    Strided and anchored at the last row: under causal masking the last row is the one that sees
    every key, and in decoding (one query row) it is the only row. With ``query_valid`` [B, Lq]
    the rows are spread over each sample's non-padding rows instead, giving [B, R].
    """
    count = min(num_rows, max(1, math.ceil(num_rows * fraction)))
    j = torch.arange(count, device=device)
    if query_valid is None:
        return (num_rows - 1 - (j * num_rows) // count).flip(0)
    valid = query_valid.to(device=device, dtype=torch.long)
    n = valid.sum(-1, keepdim=True)
    rank = (n - 1 - (j[None] * n) // count).clamp_min(0)
    # position of the rank-th valid row: first index where the running count exceeds rank
    idx = torch.searchsorted(valid.cumsum(-1), rank + 1)
    return idx.clamp_max(num_rows - 1).flip(-1)


def _as_4d(mask: torch.Tensor) -> torch.Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def _take_rows(t: torch.Tensor, rows: Optional[torch.Tensor], batch: int) -> torch.Tensor:
    """Select query rows (dim -2) of a [b, h, L, X] tensor; rows is None, [R] or [B, R]."""
    if rows is None or t.shape[-2] == 1:
        return t
    if rows.dim() == 1:
        return t.index_select(-2, rows)
    t = t.expand(batch, *t.shape[1:])
    index = rows[:, None, :, None].expand(batch, t.shape[1], rows.shape[1], t.shape[-1])
    return t.gather(-2, index)


def attention_log_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    rows: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """float32 log attention probabilities [B, Hq, R, Lk] of the chosen query rows.

    Returns (log_probs, allowed, n_keys): ``allowed`` is the bool [B, Hq, R, Lk] mask of keys a
    row may attend to (None: every key), ``n_keys`` how many per row. A row with no allowed key
    gets a uniform distribution (no NaN); callers drop it by ``n_keys == 0``. Differentiable in
    q and k (distillation aligns attention maps through it). Shapes and mask conventions as in
    ``attention_entropy``.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if rows is not None:
        rows = rows.to(q.device)
    row_idx = torch.arange(Lq, device=q.device)[None] if rows is None else (rows[None] if rows.dim() == 1 else rows)
    qs = _take_rows(q, rows, B).float()
    R = qs.shape[-2]
    # [B, Hkv, G, R, D] @ [B, Hkv, 1, D, Lk]: GQA without materialising repeated keys
    scores = torch.matmul(qs.reshape(B, Hkv, group, R, D), k.float().unsqueeze(2).transpose(-1, -2))
    scores = scores.reshape(B, Hq, R, Lk) * scale

    allowed = None
    if attn_mask is not None:
        mask = _take_rows(_as_4d(attn_mask.to(q.device)), rows, B)
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            scores = scores + mask.float()
            allowed = mask > MASKED_BELOW
    if is_causal:
        causal = torch.arange(Lk, device=q.device)[None, None, None, :] <= row_idx[:, None, :, None]
        allowed = causal if allowed is None else allowed & causal

    if allowed is None:
        n_keys = torch.full((1, 1, 1), Lk, device=q.device, dtype=torch.float32)
    else:
        allowed = allowed.expand(B, Hq, R, Lk)
        n_keys = allowed.sum(-1, dtype=torch.float32)
        # a row with nothing to attend to gets uniform scores (no NaN) and is dropped by callers
        scores = scores.masked_fill(~allowed, float("-inf")).masked_fill((n_keys == 0)[..., None], 0.0)
    return torch.log_softmax(scores, dim=-1), allowed, n_keys


def attention_entropy(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    rows: Optional[torch.Tensor] = None,
    query_valid: Optional[torch.Tensor] = None,
    return_first_mass: bool = False,
):
    """Mean normalised entropy of each head's attention distribution: float32 [B, Hq] in [0, 1].

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D] (query head h reads kv head h // (Hq // Hkv)).
    attn_mask follows SDPA (bool True = attend, or additive), broadcastable to [B, Hq, Lq, Lk];
    is_causal is SDPA's top-left causal mask. A row's entropy is divided by log(n), n = keys it
    may attend to (masked and causal-future keys excluded; n = 1 gives 0). Rows are averaged,
    leaving out rows with no key to attend to and rows with ``query_valid`` [B, Lq] False
    (padding queries). A (batch, head) with no row left scores 0.
    rows: query rows to score, [R] shared or [B, R] per sample (see ``probe_rows``); None = all.
    return_first_mass: also return, averaged over the same rows, the probability each row puts
    on the first key it may attend to ([B, Hq] in [0, 1]): heads that park their attention on
    the first token (BERT's [CLS], a decoder's BOS: "attention sinks") have low entropy yet
    contribute little.
    """
    B, Hq = q.shape[:2]
    if rows is not None:
        rows = rows.to(q.device)
    logp, allowed, n_keys = attention_log_probs(q, k, attn_mask, is_causal, scale, rows)
    R = logp.shape[-2]
    # p·log p from log p: one exp, no xlogy (its CPU kernel took a quarter of the probe's time).
    # Keys a row may not attend to have log p = -inf and p = 0: their log p becomes 0 first, so
    # neither the product nor its gradient meets 0·inf.
    if allowed is not None:
        logp_finite = logp.masked_fill(~allowed, 0.0)
        plogp = logp_finite.exp().masked_fill(~allowed, 0.0) * logp_finite
    else:
        plogp = logp.exp() * logp
    entropy = -plogp.sum(-1)  # [B, Hq, R]
    norm = torch.log(n_keys.clamp_min(2.0))
    row_h = torch.where(n_keys > 1, entropy / norm, torch.zeros((), device=q.device))

    weight = (n_keys > 0).float().expand(B, Hq, R)
    if query_valid is not None:
        valid_rows = _take_rows(query_valid.to(q.device)[:, None, :, None], rows, B)[..., 0]  # [B, 1, R]
        weight = weight * valid_rows.float()
    total = weight.sum(-1)
    entropy = (row_h * weight).sum(-1) / total.clamp_min(1.0)
    if not return_first_mass:
        return entropy
    if allowed is None:
        first = logp[..., 0]
    else:
        first = logp.gather(-1, allowed.to(torch.uint8).argmax(-1, keepdim=True))[..., 0]  # first True
    mass = torch.where(n_keys > 0, first.exp(), torch.zeros((), device=q.device))
    return entropy, (mass * weight).sum(-1) / total.clamp_min(1.0)
