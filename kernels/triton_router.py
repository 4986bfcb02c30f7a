"""A per-sample router in two launches: masked mean pooling, then LayerNorm → Linear → GELU →
Linear → sigmoid per sample, and optionally each sample's top-k heads.

Run as torch ops, a router on [B, L, d] is a dozen kernels per layer (mask cast, count,
product, sum, division, LayerNorm, two GEMMs with cuBLAS's split-K reduction, GELU, sigmoid).
Each is tiny: on an H200 a BERT-base encoder with router gates ran 3.54 ms against 2.48 with static
gates (CUDA graphs, p = 0.5), and its profile showed 24 fp32 ``sgemm_largek`` calls (286 µs) for
matrix-vector products of 32 rows. Here:

* ``_pool_kernel``, grid (samples, feature blocks, token chunks): each program sums its features
  over the sample's valid tokens in float32 and divides by their count. Feature blocks spread a
  sample's read over many SMs; one program per sample would stream it through one. Small
  batches also split the tokens into chunks, summed in order by ``_pool_finish_kernel``.
* ``_router_head_kernel``, grid (samples,): LayerNorm statistics and the affine map, then each
  Linear as a matrix-vector product in float32 (weights read in their own dtype), the activation,
  and the sigmoid; with a budget, the keep row as well (the decision's topk, zeros and scatter).

Padded tokens are selected out (``where``), not multiplied by 0: a non-finite value in padding
cannot reach the pooled mean.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_attention import next_pow2

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

ACT_NONE, ACT_GELU, ACT_GELU_TANH = 0, 1, 2

# Register budget of the head kernel: its widest tiles are [hidden, BLOCK_K] and [heads, hidden]
# float32, 64 per thread at 8 warps. Wider routers keep the torch ops.
MAX_TILE = 16384
# The fused top-k compares every head with every other: [heads, heads] in registers.
TOP_K_MAX_HEADS = 128


@triton.jit
def _pool_kernel(X, Valid, Pooled, Counts, L, d, chunk, stride_xb, stride_xl, stride_xd, stride_vb, stride_vl,
                 HAS_VALID: tl.constexpr, SPLIT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (b, c, s) sums features block c of sample b over tokens [s * chunk, (s + 1) * chunk).
    Unsplit (one chunk) it stores the mean; split it stores the partial sum at Pooled[b, s] and
    the valid count at Counts[b, s], for ``_pool_finish_kernel``."""
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(2)
    c_ok = offs_c < d
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_L], dtype=tl.float32)
    lo = s * chunk
    hi = tl.minimum(lo + chunk, L)
    for l0 in range(lo, hi, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_ok = offs_l < hi
        x = tl.load(X + b * stride_xb + offs_l[:, None] * stride_xl + offs_c[None, :] * stride_xd,
                    mask=l_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        if HAS_VALID:
            ok = tl.load(Valid + b * stride_vb + offs_l * stride_vl, mask=l_ok, other=0) != 0
            x = tl.where(ok[:, None], x, 0.0)
            count += ok.to(tl.float32)
        acc += tl.sum(x, axis=0)
    if SPLIT:
        n_s = tl.num_programs(2)
        tl.store(Pooled + (b * n_s + s) * d + offs_c, acc, mask=c_ok)
        if HAS_VALID:
            if tl.program_id(1) == 0:
                tl.store(Counts + b * n_s + s, tl.sum(count, axis=0))
    else:
        if HAS_VALID:
            n = tl.maximum(tl.sum(count, axis=0), 1.0)
        else:
            n = tl.maximum(L, 1).to(tl.float32)
        tl.store(Pooled + b * d + offs_c, acc / n, mask=c_ok)


@triton.jit
def _pool_finish_kernel(Partial, Counts, Pooled, L, d, n_split, HAS_VALID: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """The mean from the split partial sums, added in split order (deterministic, unlike atomics:
    a router's top-k must not flip between identical calls)."""
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < n_split
    c_ok = offs_c < d
    part = tl.load(Partial + (b * n_split + offs_s[:, None]) * d + offs_c[None, :], mask=s_ok[:, None] & c_ok[None, :],
                   other=0.0)
    acc = tl.sum(part, axis=0)
    if HAS_VALID:
        n = tl.maximum(tl.sum(tl.load(Counts + b * n_split + offs_s, mask=s_ok, other=0.0), axis=0), 1.0)
    else:
        n = tl.maximum(L, 1).to(tl.float32)
    tl.store(Pooled + b * d + offs_c, acc / n, mask=c_ok)


@triton.jit
def _layer_norm_stats(Row, d, eps, BLOCK_K: tl.constexpr):
    """(mean, 1 / std) of Row[:d], two passes (the row is small and stays in cache)."""
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        total += tl.load(Row + offs, mask=offs < d, other=0.0)
    mean = tl.sum(total, axis=0) / d
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        diff = tl.where(offs < d, tl.load(Row + offs, mask=offs < d, other=0.0) - mean, 0.0)
        sq += diff * diff
    return mean, 1.0 / tl.sqrt(tl.sum(sq, axis=0) / d + eps)


@triton.jit
def _sigmoid(z):
    # exp of -|z| only: never overflows, so no inf enters the division
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _store_scores(Out, Keep, b, scores, offs, n, n_keep, TOP_K: tl.constexpr):
    """Scores [n] of sample b, and with TOP_K its keep row: the n_keep highest scores, ties to the
    lower index (a head's rank = the heads scoring above it, or equal and listed before it)."""
    ok = offs < n
    tl.store(Out + b * n + offs, scores, mask=ok)
    if TOP_K:
        s = tl.where(ok, scores, -1.0)  # probabilities are >= 0: padding lanes rank last
        ahead = (s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & (offs[None, :] < offs[:, None]))
        rank = tl.sum(ahead.to(tl.int32), axis=1)
        tl.store(Keep + b * n + offs, (rank < n_keep).to(tl.uint8), mask=ok)


@triton.jit
def _router_head_kernel(Pooled, LnW, LnB, W1, B1, W2, B2, Out, Keep, d, n1, n2, eps, n_keep,
                        stride_w1n, stride_w1k, stride_w2n, stride_w2k,
                        HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr, HAS_B1: tl.constexpr,
                        HAS_B2: tl.constexpr, HIDDEN: tl.constexpr, ACT: tl.constexpr, TOP_K: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr):
    """Out[b] = sigmoid(W2 act(W1 LN(p) + b1) + b2), or sigmoid(W1 LN(p) + b1) without HIDDEN;
    with TOP_K also Keep[b] = its n_keep highest (:func:`_store_scores`)."""
    b = tl.program_id(0).to(tl.int64)
    row = Pooled + b * d
    mean, rstd = _layer_norm_stats(row, d, eps, BLOCK_K)
    offs_n1 = tl.arange(0, BLOCK_N1)
    n1_ok = offs_n1 < n1
    acc = tl.zeros([BLOCK_N1], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < d
        y = (tl.load(row + offs_k, mask=k_ok, other=0.0) - mean) * rstd
        if HAS_LN_W:
            y = y * tl.load(LnW + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        if HAS_LN_B:
            y = y + tl.load(LnB + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(W1 + offs_n1[:, None] * stride_w1n + offs_k[None, :] * stride_w1k,
                    mask=n1_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * y[None, :], axis=1)
    if HAS_B1:
        acc += tl.load(B1 + offs_n1, mask=n1_ok, other=0.0).to(tl.float32)
    if HIDDEN:
        if ACT == 1:
            h = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
        elif ACT == 2:
            inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            # tanh(z) = 2 sigmoid(2z) - 1: tl.exp only, no libdevice call to resolve per target
            h = 0.5 * acc * (1.0 + (2.0 * _sigmoid(2.0 * inner) - 1.0))
        else:
            h = acc
        h = tl.where(n1_ok, h, 0.0)
        offs_n2 = tl.arange(0, BLOCK_N2)
        n2_ok = offs_n2 < n2
        w2 = tl.load(W2 + offs_n2[:, None] * stride_w2n + offs_n1[None, :] * stride_w2k,
                     mask=n2_ok[:, None] & n1_ok[None, :], other=0.0).to(tl.float32)
        s = tl.sum(w2 * h[None, :], axis=1)
        if HAS_B2:
            s += tl.load(B2 + offs_n2, mask=n2_ok, other=0.0).to(tl.float32)
        _store_scores(Out, Keep, b, _sigmoid(s), offs_n2, n2, n_keep, TOP_K)
    else:
        _store_scores(Out, Keep, b, _sigmoid(acc), offs_n1, n1, n_keep, TOP_K)


def head_blocks(width: int, heads: int):
    """(BLOCK_K, BLOCK_N1, BLOCK_N2, num_warps) of the head kernel for a router of this hidden
    width (0: none) and head count, or None when a tile would exceed MAX_TILE."""
    n1 = width or heads
    block_n1 = max(16, next_pow2(n1))
    block_n2 = max(16, next_pow2(heads)) if width else 16
    block_k = max(16, min(128, 4096 // block_n1))
    widest = max(block_n1 * block_k, block_n2 * block_n1 if width else 0)
    if widest > MAX_TILE:
        return None
    return block_k, block_n1, block_n2, 4 if widest <= 4096 else 8


# Split a sample's tokens over programs when the (sample, feature block) grid leaves most SMs
# idle: on an H200 one BERT-base layer at batch 1 x 512 pooled in 21.7 µs on 6 programs, each
# streaming 512 tokens (session 10). Below this many programs the tokens are split.
POOL_SPLIT_BELOW = 128
POOL_MAX_SPLITS = 16


def pool_splits(B: int, d_blocks: int, L: int, block_l: int) -> int:
    """How many token chunks each (sample, feature block) is summed in (1: no split)."""
    programs = B * d_blocks
    if programs >= POOL_SPLIT_BELOW:
        return 1
    return max(1, min(POOL_MAX_SPLITS, triton.cdiv(L, 2 * block_l), POOL_SPLIT_BELOW // max(programs, 1)))


def masked_mean_triton(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 [B, d]: the mean of x [B, L, d] over the tokens with valid [B, L] nonzero (every
    token without it); 0 for a sample with none. Any float dtype and strides."""
    B, L, d = x.shape
    pooled = torch.empty((B, d), device=x.device, dtype=torch.float32)
    if B == 0 or d == 0:
        return pooled
    if valid is not None:
        valid = (valid if valid.dtype == torch.bool else valid != 0).view(torch.uint8)
    block_c = 16 if _INTERPRET else 128
    block_l = 16 if _INTERPRET else 32
    d_blocks = triton.cdiv(d, block_c)
    splits = pool_splits(B, d_blocks, L, block_l)
    chunk = triton.cdiv(triton.cdiv(L, splits), block_l) * block_l  # whole token blocks per split
    splits = max(1, triton.cdiv(L, chunk)) if L else 1
    partial = pooled if splits == 1 else torch.empty((B, splits, d), device=x.device, dtype=torch.float32)
    counts = partial if splits == 1 or valid is None else torch.empty((B, splits), device=x.device,
                                                                       dtype=torch.float32)
    valid_arg = valid if valid is not None else x
    _pool_kernel[(B, d_blocks, splits)](
        x, valid_arg, partial, counts, L, d, chunk if splits > 1 else max(L, 1), *x.stride(),
        *(valid.stride() if valid is not None else (0, 0)),
        HAS_VALID=valid is not None, SPLIT=splits > 1, BLOCK_L=block_l, BLOCK_C=block_c, num_warps=4)
    if splits > 1:
        _pool_finish_kernel[(B, d_blocks)](partial, counts, pooled, L, d, splits, HAS_VALID=valid is not None,
                                           BLOCK_S=next_pow2(splits), BLOCK_C=block_c, num_warps=4)
    return pooled


def fuses_top_k(width: int, heads: int) -> bool:
    """Whether :func:`router_keep_triton` serves a router of this width and head count: up to
    TOP_K_MAX_HEADS heads, on the 4-warp tiles (on the 8-warp ones, under triton 3.9, the [heads,
    heads] comparison spilled 8 B on sm_90)."""
    blocks = head_blocks(width, heads)
    return heads <= TOP_K_MAX_HEADS and blocks is not None and blocks[3] == 4


def router_keep_triton(x: torch.Tensor, valid: Optional[torch.Tensor], n_keep: int, *router) -> tuple:
    """(bool keep [B, H], float32 scores [B, H]): :func:`router_scores_triton`'s scores and, in
    the same launch, each sample's ``n_keep`` highest of them, ties to the lower head index."""
    return _router(x, valid, *router, n_keep=n_keep)


def router_scores_triton(x: torch.Tensor, valid: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor],
                         ln_bias: Optional[torch.Tensor], eps: float, w1: torch.Tensor, b1: Optional[torch.Tensor],
                         w2: Optional[torch.Tensor] = None, b2: Optional[torch.Tensor] = None,
                         act: int = ACT_GELU) -> torch.Tensor:
    """float32 [B, H] = sigmoid(MLP(LayerNorm(mean of x over valid tokens))).

    x: [B, L, d] in any float dtype and strides. valid: bool/integer [B, L] (nonzero = a real
    token) or None for every token. w1: [n1, d] (nn.Linear layout), w2: [H, n1] or None for a
    router without a hidden layer (then w1 is [H, d] and ``act`` is unused). Raises ValueError on
    mismatched shapes or a router too wide for the head kernel's tiles (:func:`head_blocks`)."""
    return _router(x, valid, ln_weight, ln_bias, eps, w1, b1, w2, b2, act)[1]


def _router(x, valid, ln_weight, ln_bias, eps, w1, b1, w2=None, b2=None, act=ACT_GELU, n_keep=None):
    if x.dim() != 3:
        raise ValueError(f"router_scores_triton: x must be [B, L, d], got {tuple(x.shape)}")
    B, L, d = x.shape
    if w1.dim() != 2 or w1.shape[1] != d:
        raise ValueError(f"router_scores_triton: w1 {tuple(w1.shape)} does not take {d} features")
    if w2 is not None and (w2.dim() != 2 or w2.shape[1] != w1.shape[0]):
        raise ValueError(f"router_scores_triton: w2 {tuple(w2.shape)} does not take w1's {w1.shape[0]} outputs")
    if valid is not None and tuple(valid.shape) != (B, L):
        raise ValueError(f"router_scores_triton: valid must be [{B}, {L}], got {tuple(valid.shape)}")
    heads = (w2 if w2 is not None else w1).shape[0]
    blocks = head_blocks(w1.shape[0] if w2 is not None else 0, heads)
    if blocks is None:
        raise ValueError(f"router_scores_triton: a router of width {w1.shape[0]} and {heads} heads exceeds "
                         f"the head kernel's {MAX_TILE}-element tiles")
    block_k, block_n1, block_n2, warps = blocks
    if n_keep is not None and not fuses_top_k(w1.shape[0] if w2 is not None else 0, heads):
        raise ValueError(f"router_keep_triton: the fused top-k serves at most {TOP_K_MAX_HEADS} heads on 4-warp "
                         f"tiles, got {heads} heads, width {w1.shape[0] if w2 is not None else 0}")
    out = torch.empty((B, heads), device=x.device, dtype=torch.float32)
    keep = torch.empty((B, heads), device=x.device, dtype=torch.bool) if n_keep is not None else None
    if B == 0:
        return keep, out
    pooled = masked_mean_triton(x, valid)
    w2_arg = w2 if w2 is not None else w1
    _router_head_kernel[(B,)](
        pooled, ln_weight if ln_weight is not None else pooled, ln_bias if ln_bias is not None else pooled,
        w1, b1 if b1 is not None else pooled, w2_arg, b2 if b2 is not None else pooled, out,
        keep.view(torch.uint8) if keep is not None else out,
        d, w1.shape[0], heads, float(eps), 0 if n_keep is None else int(n_keep), *w1.stride(), *w2_arg.stride(),
        HAS_LN_W=ln_weight is not None, HAS_LN_B=ln_bias is not None, HAS_B1=b1 is not None,
        HAS_B2=b2 is not None, HIDDEN=w2 is not None, ACT=int(act), TOP_K=n_keep is not None,
        BLOCK_K=block_k, BLOCK_N1=block_n1, BLOCK_N2=block_n2, num_warps=warps)
    return keep, out


@triton.jit
def _batch_vote_kernel(Keep, Scores, Shared, B, H, cap, min_keep, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program: the batch's shared keep row from the rows' own keeps and scores (the rule of
    ``dhp_fx.gates.decide_keep`` with batch_shared): heads ranked by votes, then mean score; the
    voted heads among the ``cap`` best, and the ``min_keep`` best in any case."""
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    votes = tl.zeros([BLOCK_H], dtype=tl.float32)
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        ok = (offs_b[:, None] < B) & h_ok[None, :]
        k = tl.load(Keep + offs_b[:, None] * H + offs_h[None, :], mask=ok, other=0)
        votes += tl.sum((k != 0).to(tl.float32), axis=0)
        total += tl.sum(tl.load(Scores + offs_b[:, None] * H + offs_h[None, :], mask=ok, other=0.0), axis=0)
    mean = tl.minimum(tl.maximum(total / B, 0.0), 1.0)
    # votes are integers and 0.5 * mean < 1: the rank orders by votes, then by score
    rank = tl.where(h_ok, votes + 0.5 * mean, -1.0)
    ahead = (rank[None, :] > rank[:, None]) | ((rank[None, :] == rank[:, None]) & (offs_h[None, :] < offs_h[:, None]))
    pos = tl.sum(ahead.to(tl.int32), axis=1)
    shared = ((votes > 0) & (pos < cap)) | (pos < min_keep)
    tl.store(Shared + offs_h, shared.to(tl.uint8), mask=h_ok)


def batch_vote_triton(keep: torch.Tensor, scores: torch.Tensor, cap: int, min_keep: int) -> torch.Tensor:
    """bool [H]: the heads a batch shares, from each row's keep [B, H] and scores [B, H] (float32,
    contiguous), in one launch instead of the dozen torch ops of ``decide_keep``'s vote. ``cap``
    and ``min_keep`` as there (already clipped to [0, H]). Up to TOP_K_MAX_HEADS heads."""
    B, H = keep.shape
    if H > TOP_K_MAX_HEADS or scores.shape != keep.shape:
        raise ValueError(f"batch_vote_triton: keep {tuple(keep.shape)} and scores {tuple(scores.shape)} must match "
                         f"and have at most {TOP_K_MAX_HEADS} heads")
    shared = torch.empty(H, device=keep.device, dtype=torch.bool)
    if H == 0 or B == 0:
        return shared.zero_()
    keep_u8 = keep.contiguous().view(torch.uint8)
    _batch_vote_kernel[(1,)](keep_u8, scores.float().contiguous(), shared.view(torch.uint8), B, H, int(cap),
                             int(min_keep), BLOCK_B=16 if _INTERPRET else 32, BLOCK_H=next_pow2(max(H, 2)),
                             num_warps=4)
    return shared
