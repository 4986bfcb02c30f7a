"""The compact block's weight gather in one launch: kept-head index, Q/K/V rows, biases, W_o columns.

As torch ops the gather is a sort, an index per weight and bias, a concatenation and a fill: on
an H200 that was ~60 µs per BERT-base layer replayed from a CUDA graph (session 10), more than the
heads it let the block skip. Here one grid does all of it; every program derives the index from
the keep mask itself (a [B, H] read, tiny) instead of waiting for a separate launch.

Grid (row tiles, column tiles, 4): axis 2 is the role (q, k, v rows; 3 = the output projection's
columns). A role-q/k/v program copies one [BLOCK_R, BLOCK_K] tile of ``[cap * dim, d_in]``; a
role-3 program one tile of W_o's ``[d_out, cap * Dv]``; programs past their role's extent exit.
Filler slots (index entries past the kept heads) are written
as zeros, so a filler head computes nothing and adds nothing. ``gather_rows_triton`` does the
same for each batch row's own keep row (axis 2 = 4 * row + role), for ``compact_rows``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_attention import next_pow2

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read by the interpreter tests' loader
BLOCK_R = 32
# Every program ranks the heads with [heads, heads] compares in registers: at 128 heads that
# spilled under triton 3.9 for sm_90. Sites with more heads keep the torch gather.
MAX_HEADS = 64
# The per-row kernel reached 255 registers and spilled at 64 under triton 3.6 (sm_90): 32 there.
ROWS_MAX_HEADS = 32
BLOCK_K = 128


@triton.jit
def _ranks(Keep, B, H, stride_kb, stride_kh, HP: tl.constexpr, BLOCK_B: tl.constexpr):
    """(slot of each head [HP], kept count): kept heads ascending take slots 0.., pruned ones follow."""
    offs_h = tl.arange(0, HP)
    h_ok = offs_h < H
    union = tl.zeros([HP], dtype=tl.int32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        k = tl.load(Keep + offs_b[:, None] * stride_kb + offs_h[None, :] * stride_kh,
                    mask=(offs_b[:, None] < B) & h_ok[None, :], other=0)
        union = tl.maximum(union, tl.max((k != 0).to(tl.int32), axis=0))
    before = offs_h[None, :] < offs_h[:, None]  # [h, h'] : h' < h
    kept_before = tl.sum(tl.where(before, union[None, :], 0), axis=1)
    pruned_before = tl.sum(tl.where(before & h_ok[None, :], 1 - union[None, :], 0), axis=1)
    n_kept = tl.sum(union, axis=0)
    pos = tl.where(union != 0, kept_before, n_kept + pruned_before)
    return tl.where(h_ok, pos, -1), n_kept


@triton.jit
def _heads_at(pos, n_kept, slots, HP: tl.constexpr):
    """(head, valid) of each entry of ``slots``, from ``_ranks``."""
    offs_h = tl.arange(0, HP)
    head = tl.sum(tl.where(pos[None, :] == slots[:, None], offs_h[None, :], 0), axis=1)
    return head, slots < n_kept


@triton.jit
def _copy_rows(pos, n_kept, W, Bias, start, s_f, s_i, row0, dim, WQKV, BQKV, d_in, cap, pid_r, pid_c,
               HAS_BIAS: tl.constexpr, HP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile (pid_r, pid_c) of one role's [cap * dim, d_in] slab, and (first column tile) its bias."""
    rows = cap * dim
    if (pid_r * BLOCK_R < rows) & (pid_c * BLOCK_K < d_in):
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < rows
        head, valid = _heads_at(pos, n_kept, offs_r // dim, HP)
        valid = valid & r_ok
        feat = (start + head * dim + offs_r % dim).to(tl.int64)
        dst = (row0 + offs_r).to(tl.int64)
        cols = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
        c_ok = cols < d_in
        w = tl.load(W + feat[:, None] * s_f + cols[None, :] * s_i, mask=valid[:, None] & c_ok[None, :], other=0.0)
        tl.store(WQKV + dst[:, None] * d_in + cols[None, :], w, mask=r_ok[:, None] & c_ok[None, :])
        if HAS_BIAS:
            if pid_c == 0:
                bias = tl.load(Bias + feat, mask=valid, other=0.0)
                tl.store(BQKV + dst, bias, mask=r_ok)


@triton.jit
def _copy_out_cols(pos, n_kept, Wo, so_o, so_f, WO, d_out, cap, Do, pid_r, pid_c,
                   HP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile (pid_r, pid_c) of W_o's [d_out, cap * Do] columns for the slots (filler zero)."""
    width = cap * Do
    if (pid_r * BLOCK_R < d_out) & (pid_c * BLOCK_K < width):
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < d_out
        cols = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
        c_ok = cols < width
        head, valid = _heads_at(pos, n_kept, cols // Do, HP)
        feat = (head * Do + cols % Do).to(tl.int64)
        ok = r_ok[:, None] & (c_ok & valid)[None, :]
        w = tl.load(Wo + offs_r[:, None].to(tl.int64) * so_o + feat[None, :] * so_f, mask=ok, other=0.0)
        tl.store(WO + offs_r[:, None].to(tl.int64) * width + cols[None, :], w, mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _gather_role(pos, n_kept, role, pid_r, pid_c,
                 Wq, Bq, Wk, Bk, Wv, Bv, Wo, start_q, start_k, start_v,
                 sq_f, sq_i, sk_f, sk_i, sv_f, sv_i, so_o, so_f,
                 Idx, Valid, WQKV, BQKV, WO, d_in, d_out, cap, Dq, Dk, Dv, Do,
                 HAS_BIAS: tl.constexpr, HP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program's share of one gather (slots ``pos``): a tile of the q, k or v rows (role 0-2,
    role 0's first program also the slot index) or of W_o's columns (role 3)."""
    if role == 0:
        _copy_rows(pos, n_kept, Wq, Bq, start_q, sq_f, sq_i, 0, Dq, WQKV, BQKV, d_in, cap, pid_r, pid_c,
                   HAS_BIAS, HP, BLOCK_R, BLOCK_K)
        if (pid_r == 0) & (pid_c == 0):
            offs_s = tl.arange(0, HP)
            s_head, s_valid = _heads_at(pos, n_kept, offs_s, HP)
            tl.store(Idx + offs_s, s_head.to(tl.int64), mask=offs_s < cap)
            tl.store(Valid + offs_s, s_valid.to(tl.int8), mask=offs_s < cap)
    elif role == 1:
        _copy_rows(pos, n_kept, Wk, Bk, start_k, sk_f, sk_i, cap * Dq, Dk, WQKV, BQKV, d_in, cap, pid_r, pid_c,
                   HAS_BIAS, HP, BLOCK_R, BLOCK_K)
    elif role == 2:
        _copy_rows(pos, n_kept, Wv, Bv, start_v, sv_f, sv_i, cap * (Dq + Dk), Dv, WQKV, BQKV, d_in, cap, pid_r, pid_c,
                   HAS_BIAS, HP, BLOCK_R, BLOCK_K)
    else:
        _copy_out_cols(pos, n_kept, Wo, so_o, so_f, WO, d_out, cap, Do, pid_r, pid_c, HP, BLOCK_R, BLOCK_K)


@triton.jit
def _gather_heads_kernel(
    Keep, B, H, stride_kb, stride_kh,
    Wq, Bq, Wk, Bk, Wv, Bv, Wo,
    start_q, start_k, start_v,
    sq_f, sq_i, sk_f, sk_i, sv_f, sv_i, so_o, so_f,
    Idx, Valid, WQKV, BQKV, WO,
    d_in, d_out, cap, Dq, Dk, Dv, Do,
    HAS_BIAS: tl.constexpr, HP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One tile per program, no loop over the rows' width: the copies are small, so latency (one
    # load and store in flight per program) rather than bandwidth sets the time.
    pos, n_kept = _ranks(Keep, B, H, stride_kb, stride_kh, HP, BLOCK_B)
    _gather_role(pos, n_kept, tl.program_id(2), tl.program_id(0), tl.program_id(1),
                 Wq, Bq, Wk, Bk, Wv, Bv, Wo, start_q, start_k, start_v, sq_f, sq_i, sk_f, sk_i, sv_f, sv_i, so_o, so_f,
                 Idx, Valid, WQKV, BQKV, WO, d_in, d_out, cap, Dq, Dk, Dv, Do, HAS_BIAS, HP, BLOCK_R, BLOCK_K)


@triton.jit
def _gather_rows_kernel(
    Keep, H, stride_kb, stride_kh,
    Wq, Bq, Wk, Bk, Wv, Bv, Wo,
    start_q, start_k, start_v,
    sq_f, sq_i, sk_f, sk_i, sv_f, sv_i, so_o, so_f,
    Idx, Valid, WQKV, BQKV, WO,
    d_in, d_out, cap, Dq, Dk, Dv, Do,
    HAS_BIAS: tl.constexpr, HP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per-row gathers (kernels/compact_rows): axis 2 is 4 * row + role; row b ranks its own keep
    row and writes its own slab of each output."""
    b = (tl.program_id(2) // 4).to(tl.int64)
    pos, n_kept = _ranks(Keep + b * stride_kb, 1, H, stride_kb, stride_kh, HP, 2)
    rows = cap * (Dq + Dk + Dv)
    _gather_role(pos, n_kept, tl.program_id(2) % 4, tl.program_id(0), tl.program_id(1),
                 Wq, Bq, Wk, Bk, Wv, Bv, Wo, start_q, start_k, start_v, sq_f, sq_i, sk_f, sk_i, sv_f, sv_i, so_o, so_f,
                 Idx + b * cap, Valid + b * cap, WQKV + b * rows * d_in, BQKV + b * rows, WO + b * d_out * cap * Do,
                 d_in, d_out, cap, Dq, Dk, Dv, Do, HAS_BIAS, HP, BLOCK_R, BLOCK_K)


def _launch(kernel, keep, cap, weights, biases, starts, in_out, out_weight, out_in_out, dims, per_row: bool):
    B, S = keep.shape
    dq, dk, dv, do = dims
    wq = weights[0]
    d_in = wq.shape[0] if in_out[0] else wq.shape[1]
    d_out = out_weight.shape[1] if out_in_out else out_weight.shape[0]
    dev, dtype = wq.device, wq.dtype
    rows = cap * (dq + dk + dv)
    lead = (B,) if per_row else ()
    w_qkv = torch.empty(*lead, rows, d_in, device=dev, dtype=dtype)
    has_bias = all(b is not None for b in biases)
    b_qkv = torch.empty(*lead, rows, device=dev, dtype=dtype) if has_bias else w_qkv
    w_o = torch.empty(*lead, d_out, cap * do, device=dev, dtype=dtype)
    idx = torch.empty(*lead, cap, device=dev, dtype=torch.int64)
    valid = torch.empty(*lead, cap, device=dev, dtype=torch.int8)
    strides = []
    for w, io in zip(weights, in_out):
        strides += [w.stride(1), w.stride(0)] if io else [w.stride(0), w.stride(1)]
    so = [out_weight.stride(1), out_weight.stride(0)] if out_in_out else [out_weight.stride(0), out_weight.stride(1)]
    keep_i8 = keep.view(torch.int8) if keep.dtype == torch.bool else keep
    row_blocks = max(triton.cdiv(cap * max(dq, dk, dv), BLOCK_R), triton.cdiv(d_out, BLOCK_R))
    col_blocks = max(triton.cdiv(d_in, BLOCK_K), triton.cdiv(cap * do, BLOCK_K))
    bq, bk, bv = biases if has_bias else (w_qkv, w_qkv, w_qkv)
    common = (weights[0], bq, weights[1], bk, weights[2], bv, out_weight, starts[0], starts[1], starts[2], *strides,
              *so, idx, valid, w_qkv, b_qkv, w_o, d_in, d_out, cap, dq, dk, dv, do)
    hp = next_pow2(max(S, cap, 2))
    if per_row:
        kernel[(row_blocks, col_blocks, 4 * B)](keep_i8, S, keep_i8.stride(0), keep_i8.stride(1), *common,
                                                 HAS_BIAS=has_bias, HP=hp, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    else:
        kernel[(row_blocks, col_blocks, 4)](keep_i8, B, S, keep_i8.stride(0), keep_i8.stride(1), *common,
                                            HAS_BIAS=has_bias, HP=hp, BLOCK_B=min(next_pow2(max(B, 1)), 16),
                                            BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    return idx, valid.view(torch.bool), w_qkv, (b_qkv if has_bias else None), w_o


def gather_heads_triton(keep, cap, weights, biases, starts, in_out, out_weight, out_in_out, dims):
    """:func:`dhp_fx.kernels.compact_heads.gather_heads_torch` in one launch: (idx [cap] int64,
    valid [cap] bool, w_qkv [cap * (dq + dk + dv), d_in], b_qkv or None, w_o [d_out, cap * do]).

    keep: bool [B, S] over slots (heads or KV groups); weights/biases/starts/in_out: q, k, v in
    that order, each weight as the model stores it; dims: (dq, dk, dv, do) features per slot."""
    return _launch(_gather_heads_kernel, keep, cap, weights, biases, starts, in_out, out_weight, out_in_out, dims,
                   per_row=False)


def gather_rows_triton(keep, cap, weights, biases, starts, in_out, out_weight, out_in_out, dims):
    """Each row's own slots in one launch (kernels/compact_rows): (idx [B, cap], valid [B, cap],
    w_qkv [B, cap * (dq + dk + dv), d_in], b_qkv [B, ...] or None, w_o [B, d_out, cap * do]),
    row b as :func:`gather_heads_triton` of ``keep[b:b + 1]``."""
    return _launch(_gather_rows_kernel, keep, cap, weights, biases, starts, in_out, out_weight, out_in_out, dims,
                   per_row=True)
