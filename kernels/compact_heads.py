"""An attention block run on its kept heads only: gathered weights, dense GEMMs, dense attention.

The head-skipping ops (``head_linear``, the gated core) keep every tensor H heads wide and write
zeros for pruned heads; at BERT-like sizes their GEMMs trail cuBLAS and the zeros cost a write.
When the host knows that a call keeps at most ``cap`` heads (from the gate's budget: no device
sync), the block can instead gather the kept heads' rows of W_q/W_k/W_v and columns of W_o by a
device-side index of length ``cap`` and run ordinary GEMMs and attention on [B, L, cap, D].
The index lists the kept heads first and then, to fill it up to ``cap``, pruned ones: those
filler heads get zero V rows and biases (the CUDA and autograd gathers zero their Q/K rows and
W_o columns too), so they add nothing and the result is exact whether the call keeps ``cap``
heads or fewer.

``dhp::gather_heads`` does the gathering in one op (one Triton launch on CUDA,
``triton_gather_heads.py``) for inference; on CPU :func:`gather_heads_inference` index_selects
into one buffer without the op's dispatch; under autograd the gather runs as torch ops, so
gradients reach the kept heads' weights.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .head_runs import Band, attend_head_bands, head_bands, with_causality


class HeadProjection(NamedTuple):
    """One role's projection: ``x @ weight`` restricted to features [start, start + heads * dim).

    ``in_out``: weight is [d_in, d_out] (an HF Conv1D addmm), else [d_out, d_in] (F.linear)."""

    x: torch.Tensor  # [B, L, d_in]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    in_out: bool
    start: int
    # features between two slots' starts where that is more than a slot's own features: one
    # projection interleaving q, k and v per head (GPT-NeoX: [q_h, k_h, v_h] for each head h)
    period: Optional[int] = None


def slot_view(t: torch.Tensor, axis: int, start: int, slots: int, dim: int, period: Optional[int] = None):
    """t's features ``start + s * period + j`` (j < dim; period None: dim) for slots s < slots,
    as a view with [slots, dim] in place of ``axis``: gathers index_select slots out of it."""
    if period is None or period == dim:
        return t.narrow(axis, start, slots * dim).unflatten(axis, (slots, dim))
    base, offset = start - start % period, start % period
    if offset + dim > period:
        raise ValueError(f"a slot's {dim} features from {offset} overrun its period of {period}")
    return t.narrow(axis, base, slots * period).unflatten(axis, (slots, period)).narrow(axis + 1, offset, dim)


def kept_first(union: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [cap], valid [cap]): the heads of the bool [H] mask ``union`` in ascending order,
    then pruned heads as filler; valid says which entries are kept heads."""
    # A stable sort of 0 (kept) / 1 (pruned): sort-free alternatives (nonzero) need the count on
    # the host, which is a device sync.
    idx = torch.sort((~union).to(torch.int32), stable=True).indices[:cap]
    return idx, union.index_select(0, idx)


def _head_rows(weight, bias, start, in_out, idx, valid, heads: int, dim: int, period: Optional[int] = None):
    """Rows of heads ``idx`` as [len(idx) * dim, d_in] (F.linear's layout) and their bias, zero
    for filler entries (valid False): one index_select over a [heads, dim, ...] view each."""
    n = idx.numel() * dim
    if in_out:
        w = slot_view(weight, 1, start, heads, dim, period).index_select(1, idx)
        w = torch.where(valid[None, :, None], w, w.new_zeros(())).reshape(-1, n).t()
    else:
        w = slot_view(weight, 0, start, heads, dim, period).index_select(0, idx)
        w = torch.where(valid[:, None, None], w, w.new_zeros(())).reshape(n, -1)
    b = None
    if bias is not None:
        b = slot_view(bias, 0, start, heads, dim, period).index_select(0, idx)
        b = torch.where(valid[:, None], b, b.new_zeros(())).reshape(n)
    return w, b


def gather_heads_torch(keep, cap: int, weights, biases, starts, in_out, out_weight, out_in_out: bool, dims,
                       periods=(None, None, None)):
    """(idx, valid, w_qkv [cap * (dq + dk + dv), d_in], b_qkv or None, w_o [d_out, cap * do]) in
    torch ops (differentiable: the weights' gradients flow back to the kept slots' rows).

    keep: bool [B, S] over slots (heads, or KV groups under GQA); dims: (dq, dk, dv, do), each
    role's features per slot (a KV group's q features are its heads' q features, adjacent)."""
    S = keep.shape[1]
    idx, valid = kept_first(keep.any(0), cap)
    parts = [_head_rows(w, b, st, io, idx, valid, S, dim, per)
             for w, b, st, io, dim, per in zip(weights, biases, starts, in_out, dims[:3], periods)]
    w_qkv = torch.cat([w for w, _ in parts])
    b_qkv = None if any(b is None for _, b in parts) else torch.cat([b for _, b in parts])
    return idx, valid, w_qkv, b_qkv, _out_columns(out_weight, out_in_out, idx, valid, S, dims[3])


def _out_columns(out_weight, out_in_out: bool, idx, valid, slots: int, dim: int) -> torch.Tensor:
    """W_o's input columns of slots ``idx`` as [d_out, len(idx) * dim] (F.linear's layout), zero for
    filler entries (valid False)."""
    n = idx.numel() * dim
    if out_in_out:
        w_o = out_weight.unflatten(0, (slots, dim)).index_select(0, idx)
        return torch.where(valid[:, None, None], w_o, w_o.new_zeros(())).reshape(n, -1).t()
    w_o = out_weight.unflatten(1, (slots, dim)).index_select(1, idx)
    return torch.where(valid[None, :, None], w_o, w_o.new_zeros(())).reshape(-1, n)


def gather_heads_inference(keep, cap: int, weights, biases, starts, in_out, out_weight, out_in_out: bool, dims,
                           periods=(None, None, None)):
    """:func:`gather_heads_torch` for calls without autograd, on CPU: each role's kept slots are
    index_selected straight into one [cap * (dq + dk + dv), d_in] buffer (no concatenation), and
    only V's filler rows and bias are zeroed. With V zero a filler slot's attention output is zero
    whatever its Q and K, and so is its share of the output projection, so the other fillers need
    no pass of their own (finite weights assumed: a NaN there would reach the output). A batch-1
    MiniLM layer gathered in 0.07 ms instead of 0.20 (2-core CPU)."""
    S = keep.shape[1]
    idx, valid = kept_first(keep[0] if keep.shape[0] == 1 else keep.any(0), cap)
    w0 = weights[0]
    d_in = w0.shape[0] if in_out[0] else w0.shape[1]
    w_qkv = torch.empty(cap * sum(dims[:3]), d_in, dtype=w0.dtype, device=w0.device)
    b_qkv = None if any(b is None for b in biases) else w_qkv.new_empty(w_qkv.shape[0])
    lo = 0
    for role, (w, b, start, io, dim, per) in enumerate(zip(weights, biases, starts, in_out, dims[:3], periods)):
        rows = w_qkv[lo:lo + cap * dim].view(cap, dim, d_in)
        if io:  # [d_in, features]: gathered along dim 1, then laid out as rows
            rows.copy_(slot_view(w, 1, start, S, dim, per).index_select(1, idx).permute(1, 2, 0))
        else:
            torch.index_select(slot_view(w, 0, start, S, dim, per), 0, idx, out=rows)
        if b_qkv is not None:
            torch.index_select(slot_view(b, 0, start, S, dim, per), 0, idx,
                               out=b_qkv[lo:lo + cap * dim].view(cap, dim))
        if role == 2:
            rows.masked_fill_(~valid[:, None, None], 0)
            if b_qkv is not None:
                b_qkv[lo:lo + cap * dim].view(cap, dim).masked_fill_(~valid[:, None], 0)
        lo += cap * dim
    d_o = dims[3]
    if out_in_out:
        w_o = out_weight.unflatten(0, (S, d_o)).index_select(0, idx).reshape(cap * d_o, -1).t()
    else:
        w_o = out_weight.unflatten(1, (S, d_o)).index_select(1, idx).reshape(-1, cap * d_o)
    return idx, valid, w_qkv, b_qkv, w_o


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_gather_for(keep: torch.Tensor, tensors, per_row: bool = False) -> Optional[object]:
    """The one-launch Triton gather module where it serves these weights (CUDA, triton present,
    ``keep`` [B, slots] within its MAX_HEADS, or ROWS_MAX_HEADS per row, one float dtype
    throughout), else None."""
    if not keep.is_cuda:
        return None
    from .triton_attention import triton_available

    if not triton_available(keep.device):
        return None
    try:
        from . import triton_gather_heads
    except ImportError:
        return None
    dtype = tensors[0].dtype
    most = triton_gather_heads.ROWS_MAX_HEADS if per_row else triton_gather_heads.MAX_HEADS
    if (keep.shape[1] > most or dtype not in _TRITON_DTYPES
            or any(t is not None and t.dtype != dtype for t in tensors)):
        return None
    return triton_gather_heads


@torch.library.custom_op("dhp::gather_heads", mutates_args=())
def gather_heads(keep: torch.Tensor, cap: int, wq: torch.Tensor, bq: Optional[torch.Tensor], wk: torch.Tensor,
                 bk: Optional[torch.Tensor], wv: torch.Tensor, bv: Optional[torch.Tensor], wo: torch.Tensor,
                 starts: list[int], in_out: list[int], out_in_out: bool,
                 dims: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compact block's gather as one op (one launch on CUDA). Inference only: no autograd.

    Returns (idx, valid, w_qkv, b_qkv, w_o) as :func:`gather_heads_torch`; b_qkv is zeros when
    the projections have no bias."""
    weights, biases, flags = (wq, wk, wv), (bq, bk, bv), [bool(f) for f in in_out]
    triton = triton_gather_for(keep, (wq, wk, wv, wo, bq, bk, bv))
    impl = triton.gather_heads_triton if triton is not None else gather_heads_torch
    idx, valid, w_qkv, b_qkv, w_o = impl(keep, cap, weights, biases, starts, flags, wo, out_in_out, dims)
    if b_qkv is None:
        b_qkv = w_qkv.new_zeros(w_qkv.shape[0])
    # custom ops may not return views of their inputs or of each other
    return idx, valid, w_qkv, b_qkv, w_o if w_o.is_contiguous() and w_o._base is None else w_o.contiguous()


@gather_heads.register_fake
def _(keep, cap, wq, bq, wk, bk, wv, bv, wo, starts, in_out, out_in_out, dims):
    d_in = wq.shape[0] if in_out[0] else wq.shape[1]
    d_out = wo.shape[1] if out_in_out else wo.shape[0]
    rows = cap * (dims[0] + dims[1] + dims[2])
    return (keep.new_empty(cap, dtype=torch.int64), keep.new_empty(cap, dtype=torch.bool), wq.new_empty(rows, d_in),
            wq.new_empty(rows), wq.new_empty(d_out, cap * dims[3]))


def _heads_of_mask(attn_mask: Optional[torch.Tensor], heads: int, q_heads: torch.Tensor) -> Optional[torch.Tensor]:
    """The mask restricted to the gathered query heads when it has a head dim (a T5-style bias)."""
    if attn_mask is None or attn_mask.dim() < 3 or attn_mask.shape[-3] == 1 or heads == 1:
        return attn_mask
    return attn_mask.index_select(attn_mask.dim() - 3, q_heads)


def dense_attention(q, k, v, mask, dropout_p, is_causal, scale, group: int):
    """SDPA on the gathered heads; k and v hold one head per ``group`` query heads. A mask
    together with is_causal (which the gated op takes, top-left aligned, and SDPA refuses) has
    causality folded into it."""
    if mask is not None and is_causal:
        mask, is_causal = with_causality(mask, q.shape[-2], k.shape[-2], q.device), False
    if group > 1:
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                                  scale=scale, enable_gqa=True)
        except TypeError:  # torch < 2.5: no enable_gqa
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale)


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class GatheredHeads(NamedTuple):
    """What a compact block computes with: slot index and filler flags, the kept slots' Q/K/V rows
    (and biases) in one [rows, d_in] weight, and W_o's columns. Reusable while the keep decision
    and the weights are unchanged (``dhp_fx.compact_block`` caches it for static decisions)."""

    idx: torch.Tensor
    valid: torch.Tensor
    w_qkv: torch.Tensor
    b_qkv: Optional[torch.Tensor]
    w_o: torch.Tensor


def block_geometry(keep: torch.Tensor, cap: int, kv_heads: Optional[int],
                   what: str = "compact_attention_block") -> tuple[int, int]:
    """(kv heads, query heads per kv head) after checking keep, cap and kv_heads agree."""
    H = keep.shape[1]
    kv = H if kv_heads is None else kv_heads
    if kv <= 0 or H % kv:
        raise ValueError(f"{what}: {H} query heads are not a multiple of {kv} kv heads")
    if not 0 < cap <= kv:
        raise ValueError(f"{what}: cap must be in [1, {kv}], got {cap}")
    return kv, H // kv


def gather_block_weights(q_proj: HeadProjection, k_proj: HeadProjection, v_proj: HeadProjection,
                         out_weight: torch.Tensor, out_in_out: bool, keep: torch.Tensor, cap: int, head_dim: int,
                         v_head_dim: int, kv_heads: Optional[int] = None) -> GatheredHeads:
    """The gather of :func:`compact_attention_block`: torch ops when gradients must reach the
    weights, :func:`gather_heads_inference` on CPU (where no Triton gather serves), else one
    ``dhp::gather_heads`` launch."""
    kv, group = block_geometry(keep, cap, kv_heads)
    groups_keep = keep if group == 1 else keep.view(keep.shape[0], kv, group).any(-1)
    projs = (q_proj, k_proj, v_proj)
    weights, biases = [p.weight for p in projs], [p.bias for p in projs]
    starts, in_out = [p.start for p in projs], [p.in_out for p in projs]
    periods = [p.period for p in projs]
    dims = [group * head_dim, head_dim, v_head_dim, group * v_head_dim]
    if needs_grad(*weights, *biases, out_weight):
        return GatheredHeads(*gather_heads_torch(groups_keep, cap, weights, biases, starts, in_out, out_weight,
                                                 out_in_out, dims, periods))
    # interleaved roles (periods) take the torch gather on every device: the Triton one reads
    # each role's slots as one contiguous range
    if any(p is not None for p in periods) or (
            not keep.is_cuda and triton_gather_for(groups_keep, (*weights, *biases, out_weight)) is None):
        return GatheredHeads(*gather_heads_inference(groups_keep, cap, weights, biases, starts, in_out, out_weight,
                                                     out_in_out, dims, periods))
    return GatheredHeads(*torch.ops.dhp.gather_heads(
        groups_keep, cap, *(t for p in projs for t in (p.weight, p.bias)), out_weight, starts,
        [int(f) for f in in_out], out_in_out, dims))


def compact_attention_block(
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
    rows_shared: bool = False,
    kv_heads: Optional[int] = None,
    gathered: Optional[GatheredHeads] = None,
) -> torch.Tensor:
    """The block's output [B, Lq, d_out], computing at most ``cap`` KV groups (heads, for MHA).

    keep: bool [B, H] over query heads; kv_heads: K/V heads (H when None), each serving
    H / kv_heads query heads. The caller guarantees that the rows' kept heads lie, in union, in
    at most ``cap`` KV groups (the groups are what gets computed). rows_shared: every row keeps
    the same heads and whole groups (one row, a batch-shared gate over groups): dense attention
    runs on the gathered heads; otherwise the gated op zeroes each row's own pruned heads among
    them. Filler groups get zero weights, so they add nothing (a query row that masks every key
    is NaN in every head, as in SDPA). gathered: :func:`gather_block_weights` of this keep and
    these weights, when the caller kept it from an earlier call.
    """
    B, H = keep.shape
    _, group = block_geometry(keep, cap, kv_heads)
    if gathered is None:
        gathered = gather_block_weights(q_proj, k_proj, v_proj, out_weight, out_in_out, keep, cap, head_dim,
                                        v_head_dim, kv_heads)
    w_qkv, b_qkv = gathered.w_qkv, gathered.b_qkv
    widths = role_widths(cap, group, head_dim, v_head_dim)
    q, k, v = _project((q_proj, k_proj, v_proj), w_qkv, b_qkv, widths)
    Lq, Lk = q_proj.x.shape[1], k_proj.x.shape[1]
    q = q.view(B, Lq, cap * group, head_dim).transpose(1, 2)
    k = k.view(B, Lk, cap, head_dim).transpose(1, 2)
    v = v.view(B, Lk, cap, v_head_dim).transpose(1, 2)
    o = compact_core(q, k, v, keep, gathered, group, attn_mask, dropout_p, is_causal, scale, rows_shared)
    return F.linear(o.transpose(1, 2).reshape(B, Lq, cap * group * v_head_dim), gathered.w_o, out_bias)


def role_widths(cap: int, group: int, head_dim: int, v_head_dim: int) -> list[int]:
    """Features of q, k and v for ``cap`` kept KV groups: their rows' extents in ``w_qkv``."""
    return [cap * group * head_dim, cap * head_dim, cap * v_head_dim]


def compact_core(q, k, v, keep, gathered: GatheredHeads, group: int, attn_mask, dropout_p, is_causal, scale,
                 rows_shared: bool) -> torch.Tensor:
    """Attention over the gathered heads: q [B, cap * group, Lq, D], k and v [B, cap, Lk, .]
    (from the gathered weights, any layout); keep [B, H] over the site's query heads."""
    idx, valid = gathered.idx, gathered.valid
    H = keep.shape[1]
    q_heads = idx if group == 1 else (idx[:, None] * group + torch.arange(group, device=idx.device)).flatten()
    mask = _heads_of_mask(attn_mask, H, q_heads)
    if rows_shared:
        return dense_attention(q, k, v, mask, dropout_p, is_causal, scale, group)
    rows = keep.index_select(1, q_heads) & (valid if group == 1 else valid.repeat_interleave(group))
    return torch.ops.dhp.gated_attention(q, k, v, rows, mask, dropout_p, is_causal, scale)


def _project(projs, w_qkv: torch.Tensor, b_qkv: Optional[torch.Tensor], widths: list[int]) -> list[torch.Tensor]:
    """q, k, v features [B, L, width] from the gathered rows; roles reading one input share a GEMM
    (their rows are adjacent in w_qkv)."""
    bounds = [0, widths[0], widths[0] + widths[1], sum(widths)]
    out: list[torch.Tensor] = []
    i = 0
    while i < 3:
        j = i + 1
        while j < 3 and projs[j].x is projs[i].x:
            j += 1
        lo, hi = bounds[i], bounds[j]
        y = F.linear(projs[i].x, w_qkv[lo:hi], None if b_qkv is None else b_qkv[lo:hi])
        out += list(y.split(widths[i:j], dim=-1)) if j - i > 1 else [y]
        i = j
    return out


def gather_query_heads(q_proj: HeadProjection, k_proj: HeadProjection, v_proj: HeadProjection,
                       out_weight: torch.Tensor, out_in_out: bool, keep: torch.Tensor, cap: int, head_dim: int,
                       v_head_dim: int, kv_heads: Optional[int] = None) -> GatheredHeads:
    """Under GQA, where the kept heads touch every KV group: the Q rows and W_o columns of at most
    ``cap`` query heads (kept first, then filler heads whose W_o columns are zero), every KV
    group's K/V computed as before. ``w_qkv`` holds the Q rows, followed by every K and V row when
    one projection computes q, k and v (so one GEMM serves it). Torch ops: differentiable, any
    device."""
    H = keep.shape[1]
    if not 0 < cap <= H:
        raise ValueError(f"gather_query_heads: cap must be in [1, {H}], got {cap}")
    idx, valid = kept_first(keep[0] if keep.shape[0] == 1 else keep.any(0), cap)
    w_q, b_q = _head_rows(q_proj.weight, q_proj.bias, q_proj.start, q_proj.in_out, idx, valid, H, head_dim,
                          q_proj.period)
    w_o = _out_columns(out_weight, out_in_out, idx, valid, H, v_head_dim)
    if q_proj.weight is k_proj.weight is v_proj.weight:
        kv = H if kv_heads is None else kv_heads
        every = torch.arange(kv, device=idx.device)
        full = torch.ones(kv, dtype=torch.bool, device=idx.device)
        rows = [_head_rows(p.weight, p.bias, p.start, p.in_out, every, full, kv, dim, p.period)
                for p, dim in ((k_proj, head_dim), (v_proj, v_head_dim))]
        w_q = torch.cat([w_q, *(w for w, _ in rows)])
        b_q = None if b_q is None else torch.cat([b_q, *(b for _, b in rows)])
    return GatheredHeads(idx, valid, w_q, b_q, w_o)


# A/B switch for benchmarks: False gathers the kept heads' K/V on a GPU too.
IN_PLACE_DECODE = True
# A/B switch for benchmarks and tests: False runs a CPU query chain's heads shared by the rows
# as a GPU without Triton does (every head, or K/V gathered) instead of by runs of heads.
HEAD_BANDS = True
# Query rows up to which a query chain's heads shared by the rows attend over every head (the
# others' q zero) rather than over their own K/V gathered: at 16 rows the two cost the same.
SCATTER_MAX_LQ = 16


def _in_place_decode(q, k, v, dropout_p: float):
    """The Triton module where a query chain's decode step reads K/V in place: the gated op's GPU
    path would serve the call, q is a decode query (the head map lives in the decode kernels) and
    nothing needs a gradient (they have no backward)."""
    if not IN_PLACE_DECODE:
        return None
    from .gated_attention import _triton_path

    triton = _triton_path(q, v, dropout_p)
    if triton is None or needs_grad(q, k, v):
        return None
    from .triton_decode import MAX_DECODE_LQ

    return triton if q.shape[2] <= MAX_DECODE_LQ else None


def query_heads_core(q, k, v, keep, gathered: GatheredHeads, group: int, attn_mask, dropout_p, is_causal, scale,
                     rows_shared: bool, bands: Optional[list[Band]] = None) -> torch.Tensor:
    """Attention for :func:`gather_query_heads`: q [B, cap, Lq, D] of the gathered query heads,
    k and v [B, KV heads, Lk, .] of every group; each gathered head reads its own group's K/V.

    Decoding on a GPU the Triton decode kernels read each head's group in place: gathering the
    kept heads' K/V would copy the cache's share of them at every step (read and written once,
    then read by the attention: three times the bytes the attention alone reads). On a CPU, heads
    shared by the rows attend by runs of adjacent heads, K/V sliced in place
    (kernels/head_runs.py; ``bands``: :func:`head_bands` of ``gathered``, where the caller keeps
    them). Elsewhere a few query rows shared by the rows run every head (see SCATTER_MAX_LQ);
    otherwise K/V are gathered and attention runs dense."""
    idx, valid = gathered.idx, gathered.valid
    H = keep.shape[1]
    triton = _in_place_decode(q, k, v, dropout_p)
    if triton is not None:
        groups = idx if group == 1 else torch.div(idx, group, rounding_mode="floor")
        rows = (valid if rows_shared else keep.index_select(1, idx) & valid).expand(q.shape[0], -1)
        return triton.triton_gated_attention(q, k, v, rows, _heads_of_mask(attn_mask, H, idx), is_causal, scale,
                                             kv_heads=groups, kv_group=group)
    if HEAD_BANDS and rows_shared and q.device.type == "cpu" and dropout_p == 0.0:
        if bands is None:
            bands = head_bands(idx.tolist(), valid.tolist(), group)
        out = None if bands is None else attend_head_bands(q, k, v, bands, group, attn_mask, is_causal, scale)
        if out is not None:
            return out
    groups = idx if group == 1 else torch.div(idx, group, rounding_mode="floor")
    mask = _heads_of_mask(attn_mask, H, idx)
    if rows_shared and q.shape[2] <= SCATTER_MAX_LQ:
        # A few query rows (decoding) where no band runs in place (a GPU without the Triton
        # path; on a CPU a per-head mask over folded or scattered heads):
        # attention over every head, q zero for the others, reads each cached K/V once;
        # gathering the kept heads' K/V first copies them. On a 2-core CPU at 8 x 8 heads x 160
        # keys it took 311 us against 964 us, at 8 x 32 heads (8 KV) x 512 keys 2.7 ms against
        # 34 ms; at 16 rows the two were even (session 21).
        full = q.new_zeros(q.shape[0], H, *q.shape[2:]).index_copy(1, idx, q)
        return dense_attention(full, k, v, attn_mask, dropout_p, is_causal, scale, group).index_select(1, idx)
    k, v = k.index_select(1, groups), v.index_select(1, groups)
    if rows_shared:
        return dense_attention(q, k, v, mask, dropout_p, is_causal, scale, 1)
    return torch.ops.dhp.gated_attention(q, k, v, keep.index_select(1, idx) & valid, mask, dropout_p, is_causal,
                                         scale)
