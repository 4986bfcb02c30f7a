"""Triton backward of gated attention (FA2 style): delta = rowsum(dO * O), a dK/dV kernel over key
blocks and a dQ kernel over query blocks, both recomputing P from the forward's log2 lse.

Pruned heads do no work and get exact-zero gradients: the dQ grid walks the same kept-first pair
list as the forward; the dK/dV program of a kv head loops over the query heads of its GQA group,
skipping pruned ones, so group gradients are summed in registers without atomics (which also
keeps autotuning, that reruns kernels, safe).

As in the forward, only tiles that need an edge test pay for masks: each loop is split into
edge blocks (masked) and full interior blocks (EDGE=False: unpredicated loads, no Lq/Lk edge or
causal test; attention masks still apply). Causal is top-left aligned (row i sees keys j <= i).
dQ: key blocks [full_hi, hi) (the diagonal and the ragged Lk block) masked, then [0, full_hi)
unmasked. dK/dV, per kept head: the diagonal query blocks [lo, mid) and the ragged tail past
Lq's last full block masked (one loop that jumps the interior), then the interior [mid,
interior_hi): full query blocks whose every row is at/after the key block's last key, and only
when the key block itself is full. Edge loops run first: fewer registers on sm_90.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_attention import (
    _INTERPRET,
    _apply_mask,
    _bucket,
    _dot,
    cdiv,
    _load2d,
    dot_flags,
    head_blocks,
    kept_pairs,
    make_configs,
    mask_operand,
    prune_by_head_dim,
    prune_configs,
    triton_gated_attention,
)


# Spill-free at the head dims each serves (benchmarks/kernel_resources.py, sm_90 bf16, triton 3.6
# and 3.9, causal or not, every mask kind). dK/dV keep two [BLOCK_N, D] fp32 accumulators live
# across the whole loop, and the edge/interior split costs another 15-40 registers: at D = 128
# only 2-stage or 16-row configs stay under 255 (32x64 at 3 stages and 32x128 spill there, 64x128
# at D = 64 too).
_DKDV_CONFIGS = make_configs([(32, 64, 8, 2), (16, 128, 8, 3), (16, 64, 8, 2),
                              (32, 64, 8, 3, 64), (32, 128, 8, 2, 64), (64, 64, 8, 2, 64), (16, 64, 4, 3, 64),
                              (32, 64, 4, 3, 64)],
                             pruned_by_query_len=False)
_DQ_CONFIGS = make_configs([(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3),
                            (128, 32, 4, 3, 64), (16, 64, 4, 3), (16, 128, 8, 3)])
_KEY = ["LQ_KEY", "LK_KEY", "HEAD_D", "HEAD_DV", "IS_CAUSAL", "MASK_KIND"]


@triton.jit
def _bwd_delta(O, DO, Delta, stride_ob, stride_oh, stride_om, stride_od,
               stride_db, stride_dh, stride_dm, stride_dd, Hq, Lq,
               HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < Lq) & (offs_dv[None, :] < HEAD_DV)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                mask=ok, other=0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_dv[None, :] * stride_dd,
                 mask=ok, other=0).to(tl.float32)
    tl.store(Delta + bh * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _dkdv_head(dk, dv, k, v, Q, DO, Mask, Lse, Delta, Keep, b, h, Hq, lo, mid, q_full, offs_n, offs_d, offs_dv,
               Lq, Lk, stride_qb, stride_qh, stride_qm, stride_qd, stride_db, stride_dh, stride_dm, stride_dd,
               stride_mb, stride_mh, stride_mm, stride_mn, scale_log2,
               BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
               DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK/dV contributions of query head h (none when pruned): EDGE, its query blocks [lo, Lq) but
    the interior; else the interior [mid, interior_hi), full blocks at or past the key block's
    last key (q_full is 0 when the key block is ragged)."""
    kept = tl.load(Keep + b * Hq + h) != 0
    hi = tl.where(kept, Lq, 0)
    interior_hi = tl.maximum(mid, tl.where(kept, q_full, 0))
    if EDGE:
        # One loop that jumps the interior rather than a loop per side: each extra loop body cost
        # dK/dV 15-40 registers on sm_90, close to the 255 limit already.
        gap_lo = tl.minimum(mid, hi)
        gap = tl.minimum(interior_hi, hi) - gap_lo
        first = lo
        last = hi - gap
    else:
        first = mid
        last = interior_hi
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_db + h * stride_dh
    mask_base = Mask + b * stride_mb + h * stride_mh
    row_base = (b * Hq + h) * Lq
    col_ok = offs_n < Lk
    for s in range(first, last, BLOCK_M):
        if EDGE:
            start_m = tl.where(s < gap_lo, s, s + gap)
        else:
            start_m = s
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
        q = _load2d(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    row_ok[:, None], offs_d[None, :] < HEAD_D, EDGE, BLOCK_D != HEAD_D)
        do = _load2d(do_base + offs_m[:, None] * stride_dm + offs_dv[None, :] * stride_dd,
                     row_ok[:, None], offs_dv[None, :] < HEAD_DV, EDGE, BLOCK_DV != HEAD_DV)
        if EDGE:
            # +inf lse on padding rows makes their P exactly 0.
            lse = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
        else:
            lse = tl.load(Lse + row_base + offs_m)
            delta = tl.load(Delta + row_base + offs_m)
        # Transposed tiles [BLOCK_N, BLOCK_M]: dK/dV accumulate along the key axis.
        tT = _dot(k, tl.trans(q), DOT_F32, DOT_PRECISION) * scale_log2
        tT = _apply_mask(tT, mask_base, offs_m[None, :], offs_n[:, None], row_ok[None, :], col_ok[:, None],
                         Lk, stride_mm, stride_mn, EDGE, IS_CAUSAL, MASK_KIND)
        pT = tl.exp2(tT - lse[None, :])
        dv += _dot(pT.to(do.dtype), do, DOT_F32, DOT_PRECISION)
        dpT = _dot(v, tl.trans(do), DOT_F32, DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(q.dtype), q, DOT_F32, DOT_PRECISION)
    return dk, dv


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, mask_base, ds_base, lo, hi, offs_m, offs_d, offs_dv,
              Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale_log2,
              BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
              STORE_DS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ contributions of key blocks [lo, hi); EDGE=False blocks are full and before the diagonal."""
    row_ok = offs_m < Lq
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < Lk
        kt = _load2d(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                     offs_d[:, None] < HEAD_D, col_ok[None, :], BLOCK_D != HEAD_D, EDGE)
        vt = _load2d(v_base + offs_dv[:, None] * stride_vd + offs_n[None, :] * stride_vn,
                     offs_dv[:, None] < HEAD_DV, col_ok[None, :], BLOCK_DV != HEAD_DV, EDGE)
        t = _dot(q, kt, DOT_F32, DOT_PRECISION) * scale_log2
        t = _apply_mask(t, mask_base, offs_m[:, None], offs_n[None, :], row_ok[:, None], col_ok[None, :],
                        Lk, stride_mm, stride_mn, EDGE, IS_CAUSAL, MASK_KIND)
        p = tl.exp2(t - lse[:, None])
        dp = _dot(do, vt, DOT_F32, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(q.dtype), tl.trans(kt), DOT_F32, DOT_PRECISION)
        if STORE_DS:
            # dS in natural units is exactly d(loss)/d(additive mask).
            tl.store(ds_base + offs_m[:, None] * Lk + offs_n[None, :], ds, mask=row_ok[:, None] & col_ok[None, :])
    return dq


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": prune_by_head_dim})
@triton.jit(do_not_specialize=["LQ_KEY", "LK_KEY"])  # autotune keys only
def _bwd_dkdv(
    Q, K, V, Mask, DO, Lse, Delta, DK, DV, Keep,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hq, Hkv, GROUP, Lq, Lk, scale_log2, scale, LQ_KEY, LK_KEY,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // Hkv
    hk = bhk % Hkv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < Lk
    d_ok = offs_d < HEAD_D
    dv_ok = offs_dv < HEAD_DV
    k = _load2d(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                col_ok[:, None], d_ok[None, :], True, BLOCK_D != HEAD_D)
    v = _load2d(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                col_ok[:, None], dv_ok[None, :], True, BLOCK_DV != HEAD_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    if IS_CAUSAL:
        # Only rows i >= start_n see this key block; from the first query block starting at or
        # after its last key on, every row sees every key: no causal test.
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    # End of the full query blocks; none are unmasked when this key block is ragged.
    q_full = tl.where(start_n + BLOCK_N <= Lk, (Lq // BLOCK_M) * BLOCK_M, 0)
    # Edge blocks of every kept head, then their interiors: two head loops each holding one inner
    # loop took fewer registers on sm_90 than one head loop holding both (spills at D = 128).
    for part in tl.static_range(2):
        for g in range(GROUP):
            dk, dv = _dkdv_head(dk, dv, k, v, Q, DO, Mask, Lse, Delta, Keep, b, hk * GROUP + g, Hq, lo, mid, q_full,
                                offs_n, offs_d, offs_dv, Lq, Lk, stride_qb, stride_qh, stride_qm, stride_qd,
                                stride_db, stride_dh, stride_dm, stride_dd, stride_mb, stride_mh, stride_mm, stride_mn,
                                scale_log2, BLOCK_M, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, part == 0, IS_CAUSAL,
                                MASK_KIND, DOT_F32, DOT_PRECISION)
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & dv_ok[None, :])


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": prune_configs})
@triton.jit(do_not_specialize=["LQ_KEY", "LK_KEY"])
def _bwd_dq(
    Q, K, V, Mask, DO, Lse, Delta, DQ, DMask, Pairs, NKept,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Hq, GROUP, Lq, Lk, scale_log2, scale, LQ_KEY, LK_KEY,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, STORE_DS: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    slot = tl.program_id(1)
    pair = tl.load(Pairs + slot).to(tl.int64)
    kept = slot < tl.load(NKept)
    b = pair // Hq
    h = pair % Hq
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    d_ok = offs_d < HEAD_D
    dv_ok = offs_dv < HEAD_DV
    ld_ok = offs_m < tl.where(kept, Lq, 0)
    q = _load2d(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                ld_ok[:, None], d_ok[None, :], True, BLOCK_D != HEAD_D)
    do = _load2d(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_dv[None, :] * stride_dd,
                 ld_ok[:, None], dv_ok[None, :], True, BLOCK_DV != HEAD_DV)
    lse = tl.load(Lse + pair * Lq + offs_m, mask=ld_ok, other=float("inf"))
    delta = tl.load(Delta + pair * Lq + offs_m, mask=ld_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh
    ds_base = DMask + pair * Lq * Lk
    # Key blocks [0, full_hi) need no Lk edge or causal test (the forward's split).
    if IS_CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M)
        full_hi = tl.minimum(((start_m + 1) // BLOCK_N) * BLOCK_N, (Lk // BLOCK_N) * BLOCK_N)
    else:
        hi = Lk
        full_hi = (Lk // BLOCK_N) * BLOCK_N
    hi = tl.where(kept, hi, 0)
    full_hi = tl.where(kept, full_hi, 0)
    if STORE_DS:
        # The dS store already holds this kernel at 255 registers: a second loop body spills.
        full_hi = 0
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, mask_base, ds_base, full_hi, hi, offs_m, offs_d, offs_dv,
                   Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale_log2,
                   BLOCK_N, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, True, IS_CAUSAL, MASK_KIND, STORE_DS,
                   DOT_F32, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, mask_base, ds_base, 0, full_hi, offs_m, offs_d, offs_dv,
                   Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale_log2,
                   BLOCK_N, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, False, IS_CAUSAL, MASK_KIND, STORE_DS,
                   DOT_F32, DOT_PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def triton_gated_attention_backward(grad_out, q, k, v, keep, out, lse=None, attn_mask=None, is_causal=False,
                                    scale=None, mask_grad=None, pairs=None):
    """Gradients (dq, dk, dv, dmask) of :func:`triton_gated_attention`'s output.

    ``out`` is the forward output and ``lse`` its log2 lse (``return_lse=True``). Missing ones are
    recomputed: lse alone by a P@V-free forward pass, out (with lse) by a full forward pass. ``mask_grad`` (default: a float mask that requires
    grad) also returns d(attn_mask), summed to the mask's shape and dtype; otherwise dmask is None.
    Pruned heads get exactly zero dq and contribute nothing to dk/dv/dmask.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    pairs = kept_pairs(keep) if pairs is None else pairs
    if out is None:
        out, lse = triton_gated_attention(q, k, v, keep, attn_mask, is_causal, scale, return_lse=True, pairs=pairs)
    elif lse is None:
        _, lse = triton_gated_attention(q, k, v, keep, attn_mask, is_causal, scale, return_lse=True,
                                        compute_out=False, pairs=pairs)
    if mask_grad is None:
        mask_grad = attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad
    kind, mask_t, mstr = mask_operand(attn_mask, B, Hq, Lq, Lk, q)
    mask_grad = bool(mask_grad) and kind == 2
    dot_f32, precision = dot_flags(q.dtype)
    block_d, block_dv = head_blocks(D, Dv)
    lse = lse.contiguous()

    dq = torch.empty((B, Hq, Lq, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Hkv, Lk, D), device=k.device, dtype=k.dtype)
    dv = torch.empty((B, Hkv, Lk, Dv), device=v.device, dtype=v.dtype)
    dmask_full = torch.zeros((B, Hq, Lq, Lk), device=q.device, dtype=torch.float32) if mask_grad else None
    if B * Hq == 0 or Lq == 0 or Lk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, (torch.zeros_like(attn_mask) if mask_grad else None)

    delta = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
    dm = 16 if _INTERPRET else 64
    _bwd_delta[(cdiv(Lq, dm), B * Hq)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), Hq, Lq,
        HEAD_DV=Dv, BLOCK_DV=block_dv, BLOCK_M=dm)
    common = dict(HEAD_D=D, HEAD_DV=Dv, BLOCK_D=block_d, BLOCK_DV=block_dv, IS_CAUSAL=bool(is_causal),
                  MASK_KIND=kind, DOT_F32=dot_f32, DOT_PRECISION=precision)
    scale_log2 = scale * 1.4426950408889634
    keep_u8 = keep.reshape(-1).to(torch.uint8)
    _bwd_dkdv[lambda meta: (cdiv(Lk, meta["BLOCK_N"]), B * Hkv)](
        q, k, v, mask_t, grad_out, lse, delta, dk, dv, keep_u8,
        *q.stride(), *k.stride(), *v.stride(), *mstr, *grad_out.stride(), *dk.stride(), *dv.stride(),
        Hq, Hkv, Hq // Hkv, Lq, Lk, scale_log2, scale, _bucket(Lq), _bucket(Lk), **common)
    _bwd_dq[lambda meta: (cdiv(Lq, meta["BLOCK_M"]), B * Hq)](
        q, k, v, mask_t, grad_out, lse, delta, dq, dmask_full if mask_grad else q, pairs[0], pairs[1],
        *q.stride(), *k.stride(), *v.stride(), *mstr, *grad_out.stride(), *dq.stride(),
        Hq, Hq // Hkv, Lq, Lk, scale_log2, scale, _bucket(Lq), _bucket(Lk), STORE_DS=mask_grad, **common)
    dmask = None
    if mask_grad:
        dmask = dmask_full.sum_to_size(attn_mask.shape).to(attn_mask.dtype)
    return dq, dk, dv, dmask


class TritonGatedAttention(torch.autograd.Function):
    """Autograd pairing of the Triton forward and backward (saves the log2 lse, no recompute)."""

    @staticmethod
    def forward(ctx, q, k, v, keep, attn_mask=None, is_causal=False, scale=None):
        pairs = kept_pairs(keep)
        out, lse = triton_gated_attention(q, k, v, keep, attn_mask, is_causal, scale, return_lse=True, pairs=pairs)
        ctx.save_for_backward(q, k, v, keep, attn_mask, out, lse, *pairs)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, keep, attn_mask, out, lse, pair_idx, n_kept = ctx.saved_tensors
        dq, dk, dv, dmask = triton_gated_attention_backward(
            grad_out, q, k, v, keep, out, lse, attn_mask, ctx.is_causal, ctx.scale,
            mask_grad=ctx.needs_input_grad[4], pairs=(pair_idx, n_kept))
        return dq, dk, dv, None, dmask, None, None


def triton_gated_attention_autograd(q, k, v, keep, attn_mask=None, is_causal=False, scale=None):
    return TritonGatedAttention.apply(q, k, v, keep, attn_mask, is_causal, scale)
