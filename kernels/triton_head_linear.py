"""Triton head-skipping projections for CUDA tensors: no host sync, no work for pruned heads.

The torch path of ``dhp::head_linear_*`` (``head_linear.py``) sizes its gathers from the keep
mask, which costs a device-to-host sync per projection: four per layer, each one draining the
launch queue. Here the mask is read inside the kernels:

* ``head_linear_out``: grid (row blocks, heads). A program whose rows all prune head h runs its
  K loop zero times and stores zeros; otherwise it computes the head's D output features.
* ``head_linear_in``: grid (row blocks, output blocks). The reduction walks the heads and skips
  the K range of every head that no row of the block keeps (pruned inputs are zeros anyway).

Masks are [H] (every row) or [B, H] with rows grouped by sample (x viewed as [B * rows, K]).
Accumulation is float32; under the interpreter dot operands go through float32 as well (its
bf16 dot is wrong).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK_M = 16 if _INTERPRET else 64
BLOCK_K = 16 if _INTERPRET else 32
BLOCK_N = 16 if _INTERPRET else 64


@triton.jit
def _keep_rows(Keep, offs_m, row_ok, h, rows_per_sample, stride_kb, PER_SAMPLE: tl.constexpr):
    if PER_SAMPLE:
        k = tl.load(Keep + (offs_m // rows_per_sample) * stride_kb + h, mask=row_ok, other=0)
    else:
        k = tl.load(Keep + h) + offs_m * 0
    return (k != 0) & row_ok


@triton.jit
def _mma(acc, x, w, DOT_F32: tl.constexpr):
    if DOT_F32:
        return acc + tl.dot(x.to(tl.float32), w.to(tl.float32))
    return acc + tl.dot(x, w)


@triton.jit
def _head_linear_out_kernel(X, W, Bias, Keep, Y, M, K, rows_per_sample,
                            stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_kb,
                            HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, PER_SAMPLE: tl.constexpr,
                            DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = offs_m < M
    row_keep = _keep_rows(Keep, offs_m, row_ok, h, rows_per_sample, stride_kb, PER_SAMPLE)
    # a product, not a branch: the loop runs zero times when no row of the block keeps head h
    k_hi = K * tl.max(row_keep.to(tl.int32), axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    n_idx = h * HEAD_D + offs_d
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + n_idx[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _mma(acc, x, w, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(Bias + n_idx, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.where(row_keep[:, None], acc, 0.0)
    tl.store(Y + offs_m[:, None] * stride_ym + n_idx[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _head_linear_in_kernel(X, W, Bias, Keep, Y, M, N, H, rows_per_sample,
                           stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_kb,
                           HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, PER_SAMPLE: tl.constexpr,
                           DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for h in range(H):
        row_keep = _keep_rows(Keep, offs_m, row_ok, h, rows_per_sample, stride_kb, PER_SAMPLE)
        d_hi = HEAD_D * tl.max(row_keep.to(tl.int32), axis=0)
        for d0 in range(0, d_hi, BLOCK_K):
            offs_d = d0 + tl.arange(0, BLOCK_K)
            d_ok = offs_d < HEAD_D
            offs_k = h * HEAD_D + offs_d
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(W + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                        mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(acc, x, w, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


def _prepare(x: torch.Tensor, weight: torch.Tensor, heads_keep: torch.Tensor, weight_in_out: bool):
    x2 = x.reshape(-1, x.shape[-1])
    # (n, k) element strides whatever the storage: out_in [N, K], in_out [K, N]
    s_wn, s_wk = (weight.stride(1), weight.stride(0)) if weight_in_out else (weight.stride(0), weight.stride(1))
    keep = heads_keep.to(torch.uint8)
    per_sample = keep.dim() == 2
    rows = x2.shape[0] // keep.shape[0] if per_sample else 1
    return x2, s_wn, s_wk, keep, per_sample, rows, (keep.stride(0) if per_sample else 0)


def _dot_f32(x: torch.Tensor) -> bool:
    return _INTERPRET or x.dtype == torch.float32


def head_linear_out_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           heads_keep: torch.Tensor, head_dim: int, weight_in_out: bool = False) -> torch.Tensor:
    x2, s_wn, s_wk, keep, per_sample, rows, s_kb = _prepare(x, weight, heads_keep, weight_in_out)
    M, K = x2.shape
    H = heads_keep.shape[-1]
    y = torch.empty((M, H * head_dim), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, BLOCK_M), H)
    _head_linear_out_kernel[grid](
        x2, weight, bias if bias is not None else x2, keep, y, M, K, rows,
        x2.stride(0), x2.stride(1), s_wn, s_wk, y.stride(0), y.stride(1), s_kb,
        HEAD_D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
        HAS_BIAS=bias is not None, PER_SAMPLE=per_sample, DOT_F32=_dot_f32(x))
    return y.view(*x.shape[:-1], H * head_dim)


def head_linear_in_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          heads_keep: torch.Tensor, head_dim: int, weight_in_out: bool = False) -> torch.Tensor:
    x2, s_wn, s_wk, keep, per_sample, rows, s_kb = _prepare(x, weight, heads_keep, weight_in_out)
    M = x2.shape[0]
    H = heads_keep.shape[-1]
    N = weight.shape[1] if weight_in_out else weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _head_linear_in_kernel[grid](
        x2, weight, bias if bias is not None else x2, keep, y, M, N, H, rows,
        x2.stride(0), x2.stride(1), s_wn, s_wk, y.stride(0), y.stride(1), s_kb,
        HEAD_D=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        HAS_BIAS=bias is not None, PER_SAMPLE=per_sample, DOT_F32=_dot_f32(x))
    return y.view(*x.shape[:-1], N)
