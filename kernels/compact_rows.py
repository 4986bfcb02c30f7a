"""An attention block run on each row's own kept heads: per-row gathered weights, batched GEMMs.

``compact_heads.py`` computes the union of the rows' kept heads for every row. Under per-sample
gates that union grows with the batch (at 8 rows it is usually every head), so each row pays
for heads only other rows keep, and the block falls back to the H-wide head ops. Here row ``b``
gathers its own ``cap`` KV groups (kept first, then zero-weight filler, as in
``compact_heads.kept_first``): the projections become batched GEMMs
``[B, L, d_in] @ [B, d_in, cap * width]`` and attention runs on ``[B, cap * group, L, D]``, so a
row computes only what it keeps, and no zeros are written for pruned heads.

The price is the gather: every row copies its groups' weights (B x cap groups). On a CPU that
is small next to the GEMMs it saves; on a GPU at large batch it is not (BERT-base, 32 rows,
half the heads: 75 MB a layer), which is why ``dhp_fx.compact_block`` takes this route on CPU
only. Torch ops throughout, so gradients reach the kept rows' weights.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .compact_heads import (HeadProjection, block_geometry, dense_attention, needs_grad, role_widths, slot_view,
                            triton_gather_for)


class RowGathered(NamedTuple):
    """Per-row slots and weights, oriented for ``x @ w``: idx / valid [B, cap]; weights (q, k, v),
    each [B, d_in, cap * dim] (often a strided view of the gather, which batched GEMMs read as it
    is); biases (q, k, v), each [B, cap * dim] or None; w_o [B, cap * do, d_out]."""

    idx: torch.Tensor
    valid: torch.Tensor
    weights: tuple
    biases: tuple
    w_o: torch.Tensor


def kept_first_rows(keep: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx [B, cap], valid [B, cap]): each row's kept slots in ascending order, then pruned
    ones as filler (a stable sort: no count read back from the device)."""
    idx = torch.sort((~keep).to(torch.int32), dim=1, stable=True).indices[:, :cap]
    return idx, keep.gather(1, idx)


def _role_rows(p: HeadProjection, idx, valid, slots: int, dim: int, zero_filler: bool):
    """The slots ``idx`` of one role per row: weight [B, d_in, cap * dim], bias [B, cap * dim].
    One index_select over whole slots; the result is only ever viewed, never copied again."""
    B, cap = idx.shape
    flat = idx.reshape(-1)
    if p.in_out:  # [d_in, features]: slots gathered along dim 1, [d_in, B * cap, dim]
        w = slot_view(p.weight, 1, p.start, slots, dim, p.period).index_select(1, flat)
        if zero_filler:
            w.masked_fill_(~valid.reshape(1, -1, 1), 0)
        w = w.reshape(-1, B, cap * dim).permute(1, 0, 2)
    else:  # [features, d_in]: [B * cap, dim, d_in]
        w = slot_view(p.weight, 0, p.start, slots, dim, p.period).index_select(0, flat)
        if zero_filler:
            w.masked_fill_(~valid.reshape(-1, 1, 1), 0)
        w = w.reshape(B, cap * dim, -1).transpose(1, 2)
    b = None
    if p.bias is not None:
        b = slot_view(p.bias, 0, p.start, slots, dim, p.period).index_select(0, flat)
        if zero_filler:
            b.masked_fill_(~valid.reshape(-1, 1), 0)
        b = b.reshape(B, cap * dim)
    return w, b


def gather_rows(q_proj: HeadProjection, k_proj: HeadProjection, v_proj: HeadProjection, out_weight: torch.Tensor,
                out_in_out: bool, keep: torch.Tensor, cap: int, head_dim: int, v_head_dim: int,
                kv_heads: Optional[int] = None) -> RowGathered:
    """Each row's kept KV groups (up to ``cap``) of W_q/W_k/W_v and W_o.

    Only the filler's V rows are zeroed: with V zero, a filler head's attention output is zero
    whatever its Q and K, and so is its share of the output projection, so the other weights need
    no pass of their own (a CPU pays for every pass over the gathered copies). That takes finite
    weights: a NaN in a filler head's Q/K rows or W_o columns would reach the output."""
    B = keep.shape[0]
    kv, group = block_geometry(keep, cap, kv_heads, "compact_rows_block")
    groups_keep = keep if group == 1 else keep.view(B, kv, group).any(-1)
    projs = (q_proj, k_proj, v_proj)
    tensors = (*(t for p in projs for t in (p.weight, p.bias)), out_weight)
    interleaved = any(p.period is not None for p in projs)  # the Triton gather reads contiguous slots
    triton = None if needs_grad(*tensors) or interleaved else triton_gather_for(groups_keep, tensors, per_row=True)
    if triton is not None:
        return _from_triton(triton.gather_rows_triton(
            groups_keep, cap, [p.weight for p in projs], [p.bias for p in projs], [p.start for p in projs],
            [p.in_out for p in projs], out_weight, out_in_out,
            (group * head_dim, head_dim, v_head_dim, group * v_head_dim)), cap, group, head_dim, v_head_dim)
    idx, valid = kept_first_rows(groups_keep, cap)
    dims = (group * head_dim, head_dim, v_head_dim)
    parts = [_role_rows(p, idx, valid, kv, dim, role == 2)
             for role, (p, dim) in enumerate(zip((q_proj, k_proj, v_proj), dims))]
    d_o = group * v_head_dim
    flat = idx.reshape(-1)
    if out_in_out:  # [heads * dv, d_out]
        w_o = out_weight.unflatten(0, (kv, d_o)).index_select(0, flat).reshape(B, cap * d_o, -1)
    else:  # [d_out, heads * dv]: [d_out, B * cap, do], viewed per row
        w_o = out_weight.unflatten(1, (kv, d_o)).index_select(1, flat).reshape(-1, B, cap * d_o).permute(1, 2, 0)
    return RowGathered(idx, valid, tuple(w for w, _ in parts), tuple(b for _, b in parts), w_o)


def _from_triton(gathered, cap: int, group: int, head_dim: int, v_head_dim: int) -> RowGathered:
    """RowGathered views of ``gather_rows_triton``'s [B, rows, d_in] and [B, d_out, cap * do]."""
    idx, valid, w_qkv, b_qkv, w_o = gathered
    widths = role_widths(cap, group, head_dim, v_head_dim)
    bounds = [0, widths[0], widths[0] + widths[1], sum(widths)]
    roles = [slice(bounds[i], bounds[i + 1]) for i in range(3)]
    return RowGathered(idx, valid, tuple(w_qkv[:, r].transpose(1, 2) for r in roles),
                       tuple(None if b_qkv is None else b_qkv[:, r] for r in roles), w_o.transpose(1, 2))


def project_rows(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """x [B, L, d_in] through per-row weights w [B, d_in, n] (+ b [B, n]): [B, L, n]."""
    if b is None:
        return torch.bmm(x, w)
    return torch.baddbmm(b[:, None, :], x, w)


def _row_heads_of_mask(attn_mask: Optional[torch.Tensor], heads: int, q_heads: torch.Tensor):
    """The mask restricted to each row's gathered query heads when it has a head dim."""
    if attn_mask is None or attn_mask.dim() < 3 or attn_mask.shape[-3] == 1 or heads == 1:
        return attn_mask
    m4 = attn_mask if attn_mask.dim() == 4 else attn_mask[None]
    B = q_heads.shape[0]
    rows = torch.arange(B, device=q_heads.device)[:, None] if m4.shape[0] == B else q_heads.new_zeros(B, 1)
    return m4[rows, q_heads]


def rows_core(q, k, v, keep: torch.Tensor, gathered: RowGathered, group: int, attn_mask, dropout_p, is_causal, scale,
              whole: bool) -> torch.Tensor:
    """Attention on each row's gathered heads: q [B, cap * group, Lq, D], k and v [B, cap, Lk, .];
    keep [B, H] over the site's query heads. whole: rows keep whole KV groups (always so for
    MHA), so the filler's zero weights make dense attention exact; otherwise the gated op
    zeroes the heads each row prunes inside its kept groups."""
    idx, valid = gathered.idx, gathered.valid
    B = idx.shape[0]
    H = keep.shape[1]
    q_heads = idx if group == 1 else (idx[..., None] * group + torch.arange(group, device=idx.device)).flatten(1)
    mask = _row_heads_of_mask(attn_mask, H, q_heads)
    if whole:
        return dense_attention(q, k, v, mask, dropout_p, is_causal, scale, group)
    rows = keep.gather(1, q_heads) & (valid if group == 1 else valid.repeat_interleave(group, dim=1))
    return torch.ops.dhp.gated_attention(q, k, v, rows.reshape(B, -1), mask, dropout_p, is_causal, scale)


def compact_rows_block(
    q_proj: HeadProjection,
    k_proj: HeadProjection,
    v_proj: HeadProjection,
    out_weight: torch.Tensor,
    out_bias: Optional[torch.Tensor],
    out_in_out: bool,
    keep: torch.Tensor,
    cap: int,
    head_dim: int,
    v_head_dim: int,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    whole: bool = True,
    kv_heads: Optional[int] = None,
    gathered: Optional[RowGathered] = None,
) -> torch.Tensor:
    """The block's output [B, Lq, d_out], each row computing at most ``cap`` KV groups of its own.

    The caller guarantees that no row's kept heads lie in more than ``cap`` KV groups; whole says
    each row keeps whole groups (see :func:`rows_core`). Arguments as
    ``compact_heads.compact_attention_block``; gathered: :func:`gather_rows` of this keep and
    these weights, when the caller kept it."""
    B = keep.shape[0]
    kv, group = block_geometry(keep, cap, kv_heads, "compact_rows_block")
    if gathered is None:
        gathered = gather_rows(q_proj, k_proj, v_proj, out_weight, out_in_out, keep, cap, head_dim, v_head_dim, kv)
    q, k, v = _project_roles((q_proj, k_proj, v_proj), gathered)
    Lq, Lk = q_proj.x.shape[1], k_proj.x.shape[1]
    q = q.view(B, Lq, cap * group, head_dim).transpose(1, 2)
    k = k.view(B, Lk, cap, head_dim).transpose(1, 2)
    v = v.view(B, Lk, cap, v_head_dim).transpose(1, 2)
    o = rows_core(q, k, v, keep, gathered, group, attn_mask, dropout_p, is_causal, scale, whole)
    out = torch.bmm(o.transpose(1, 2).reshape(B, Lq, cap * group * v_head_dim), gathered.w_o)
    return out if out_bias is None else out + out_bias


def _project_roles(projs, gathered: RowGathered) -> list[torch.Tensor]:
    # One batched GEMM per role: fusing roles that share an input would first copy their
    # gathered weights into one tensor, a pass that costs what the fusion saves.
    return [project_rows(p.x, w, b) for p, w, b in zip(projs, gathered.weights, gathered.biases)]
