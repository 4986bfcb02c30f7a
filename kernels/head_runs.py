"""Attention of a few kept query heads over K/V read in place, by runs of adjacent heads.

A query chain (a decoder with a KV cache) computes the kept query heads alone, but K and V are
the cache's, every head's. Gathering the kept heads' K/V copies the cache's share of them at every
call: on a 2-core CPU ``index_select`` along the head dim writes 2–8 GB/s, so gathering and
then attending cost 1.1–21× dense attention over every head (``benchmarks/bench_head_bands.py``).
Running every head instead (the others' q zero) reads the cache once but does the pruned heads'
work.

Slicing a run of adjacent heads is a view: attention per run reads exactly the kept heads' K/V
and copies nothing. Under GQA a run is a band of adjacent KV groups that keep the same number n
of query heads: whole groups go through SDPA's ``enable_gqa``; a part of a group folds its n
query heads into the query-row dim of one head's attention (exact when no row's mask differs by
head; causality then goes into a mask, tiled over the folded rows).

Host-side planning reads the slot index, so this serves CPU tensors (no device sync).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class Band(NamedTuple):
    """Slots [slot, slot + groups * per_group) of q, ``per_group`` of them reading each of KV heads
    [kv, kv + groups); ``head``: the first slot's query head; ``adjacent``: the slots' query heads
    are adjacent (a per-head mask can then be sliced to them)."""

    slot: int
    kv: int
    groups: int
    per_group: int
    head: int
    adjacent: bool


def head_bands(idx: list[int], valid: list[bool], group: int) -> Optional[list[Band]]:
    """The kept slots (ascending heads, then filler slots) as bands: adjacent KV groups keeping
    the same number of query heads share one; None when the kept slots are not first and in
    ascending head order."""
    kept = [h for h, ok in zip(idx, valid) if ok]
    if any(b <= a for a, b in zip(kept, kept[1:])) or any(valid[len(kept):]):
        return None
    bands: list[Band] = []
    s = 0
    while s < len(kept):
        g = kept[s] // group
        n = 1
        while s + n < len(kept) and kept[s + n] // group == g:
            n += 1
        last = bands[-1] if bands else None
        if last is not None and last.per_group == n and last.kv + last.groups == g:
            width = (last.groups + 1) * n
            bands[-1] = last._replace(groups=last.groups + 1,
                                      adjacent=last.adjacent and kept[s + n - 1] - last.head == width - 1)
        else:
            bands.append(Band(s, g, 1, n, kept[s], kept[s + n - 1] - kept[s] == n - 1))
        s += n
    return bands


def _band_mask(mask: Optional[torch.Tensor], band: Band, fold: bool) -> tuple[bool, Optional[torch.Tensor]]:
    """(possible, the band's mask). A mask with a head dim is sliced to the band's heads, which
    must be adjacent and not folded; folding n heads into query rows tiles a query-wise mask."""
    if mask is None:
        return True, None
    if mask.dim() >= 3 and mask.shape[-3] != 1:
        if fold or not band.adjacent:
            return False, None
        return True, mask.narrow(mask.dim() - 3, band.head, band.groups * band.per_group)
    if not fold or mask.shape[-2] == 1:
        return True, mask
    return True, mask.repeat(*([1] * (mask.dim() - 2)), band.per_group, 1)


def with_causality(mask: Optional[torch.Tensor], Lq: int, Lk: int, device) -> torch.Tensor:
    """``mask`` with SDPA's causality (top-left aligned: query row i sees keys up to i) folded in,
    for SDPA, which takes one or the other."""
    above = torch.ones(Lq, Lk, dtype=torch.bool, device=device).triu(1)
    if mask is None:
        return ~above
    return mask & ~above if mask.dtype == torch.bool else mask.masked_fill(above, float("-inf"))


def attend_head_bands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bands: list[Band], group: int,
                      attn_mask: Optional[torch.Tensor], is_causal: bool, scale: Optional[float]
                      ) -> Optional[torch.Tensor]:
    """q [B, slots, Lq, D] (kept slots first), k/v [B, KV heads, Lk, .]: [B, slots, Lq, Dv] with
    the kept slots' attention and zeros for filler slots; None where a band cannot run in place
    (a per-head mask over folded or scattered heads)."""
    B, slots, Lq, _ = q.shape
    if is_causal and (attn_mask is not None or any(1 < b.per_group < group for b in bands)):
        # SDPA takes a mask or is_causal, and folded heads' rows need the causal mask tiled
        attn_mask, is_causal = with_causality(attn_mask, Lq, k.shape[2], q.device), False
    outs = []
    for band in bands:
        n, G = band.per_group, band.groups
        width = n * G
        qb = q.narrow(1, band.slot, width)
        kb, vb = k.narrow(1, band.kv, G), v.narrow(1, band.kv, G)
        fold = 1 < n < group  # part of each group: its heads become query rows of the group's head
        ok, mask = _band_mask(attn_mask, band, fold)
        if not ok:
            return None
        if fold:
            o = F.scaled_dot_product_attention(qb.reshape(B, G, n * Lq, qb.shape[-1]), kb, vb, attn_mask=mask,
                                               scale=scale)
            outs.append(o.reshape(B, width, Lq, o.shape[-1]))
        elif n > 1:  # whole groups
            try:
                outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=is_causal,
                                                           scale=scale, enable_gqa=True))
            except TypeError:  # torch < 2.5: no enable_gqa
                return None
        else:  # one head per group
            outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=is_causal, scale=scale))
    used = sum(b.per_group * b.groups for b in bands)
    if used < slots:
        outs.append(q.new_zeros(B, slots - used, Lq, v.shape[-1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)
