"""Triton head-skipping projections for CUDA tensors: no host sync, no work for pruned heads.

The torch path of ``dhp::head_linear_*`` (``head_linear.py``) sizes its gathers from the keep
mask, which costs a device-to-host sync per projection: four per layer, each one draining the
launch queue. Here the mask is read inside the kernels:

* ``head_linear_out``: grid (row blocks, heads). Program j of a row block computes the head at
  slot j of the block's kept-first order (kept heads first, in index order) and stores the zeros
  of up to ``PRUNED_PROGRAMS_PER_KEPT`` fully pruned slots before its K loop; the pruned programs
  it covers exit without a store. Heads of 64 or fewer features go two to a program
  (``_head_linear_out_pair_kernel``): the program takes two slots of the block's kept-head
  order, so x is read once per two kept heads and the tile is the 128 columns wide GEMMs want.
* ``head_linear_in``: grid (row blocks, output blocks). The reduction walks the kept heads in
  order (the mask's, or with [B, H] masks the sample's when the block's rows lie in one sample);
  a block straddling samples walks every head some of its rows keep (pointer loads), and its
  rows that prune a head read zeros there.

Each program ranks its mask row itself (``_kept_first_slots``: H flags, a prefix sum), so a
projection is one launch: no list-building launch before it.

The backward reuses them with the weight read transposed (strides only): dx of head_linear_out is
the head_linear_in reduction over the kept heads' gradient features, dx of head_linear_in is the
head_linear_out product per kept head. The weight gradient (and head_linear_out's bias gradient)
is ``_head_weight_grad_kernel``, grid (column blocks, heads): per head, a reduction over the rows
keeping it, none at all for a head no row keeps (its rows/columns are stored as zeros).

Each grid is one axis, walked by ``_grouped_tile`` in groups of row (or column) blocks, so the
programs in flight share their x tiles and weight slices through L2 rather than each re-reading
its own from memory.

On Hopper the forward kernels also have descriptor configs (x and weight tiles moved by TMA, no
address math or predicates in the K loop), autotuned against the pointer ones; ``tma=`` forces
either kind.

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

# Tune per power-of-two row count, as the attention kernels do per length.
from .triton_attention import (TMA_AUTO, TMA_OFF, TMA_ONLY, TensorDescriptor, _bucket, _uses_tma_by_default, cdiv,
                               mask_bytes, next_pow2)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# DHP_FX_TRITON_AUTOTUNE=0 keeps each kernel's first config (no tuning-time compiles).
_AUTOTUNE = os.environ.get("DHP_FX_TRITON_AUTOTUNE", "1") != "0"


# Tiles walked together along the grid's first axis (see _grouped_tile). 8 row blocks of 128 rows
# at d_model 4096 is 8 MiB of x in L2 with the weight slices of the heads in flight beside it.
_GROUP = 8


def _configs(shapes, names, extra=None, pre_hook=None):
    """Autotune list from tuples of block sizes + (warps, stages); the interpreter, which cannot
    time, gets one small config (groups of 2, so small test grids still hold several groups and a
    ragged last one). Every list was checked spill-free on sm_90 at head dims 64 and 128, [H] and
    [B, H] masks (benchmarks/kernel_resources.py)."""
    if _INTERPRET:
        # the loading kind (USE_TMA) then comes from the caller: one config, nothing to time
        if extra and extra.get("USE_TMA"):
            return []
        return [triton.Config({**{n: 16 for n in names}, "GROUP": 2}, num_warps=4, num_stages=1,
                              pre_hook=pre_hook)]
    if not _AUTOTUNE:
        shapes = shapes[:1]
    return [triton.Config({**dict(zip(names, sh[:-2])), "GROUP": _GROUP, **(extra or {})}, num_warps=sh[-2],
                          num_stages=sh[-1], pre_hook=pre_hook)
            for sh in shapes]


def _tma_blocks(x_rows: str, w_cols: str):
    """Pre-hook setting the descriptors' tiles to the config's: x [x_rows, BLOCK_K]; the weight's
    [w_cols, BLOCK_K] as [N, K] storage, [BLOCK_K, w_cols] as [K, N] (W_IN_OUT)."""
    def hook(nargs):
        if not nargs.get("USE_TMA"):
            return
        k, cols = nargs["BLOCK_K"], nargs[w_cols]
        nargs["DescX"].block_shape = [nargs[x_rows], k]
        nargs["DescW"].block_shape = [k, cols] if nargs["W_IN_OUT"] else [cols, k]
    return hook


def _prune_loading(configs, named_args, **kwargs):
    """The loading kinds the launch's TMA_MODE allows; without timing, AUTO means pointers."""
    timing = _AUTOTUNE and not _INTERPRET
    allowed = {TMA_OFF: (False,), TMA_AUTO: (False, True) if timing else (False,),
               TMA_ONLY: (True,)}[named_args["TMA_MODE"]]
    return [c for c in configs if c.kwargs.get("USE_TMA", False) in allowed] or configs[:1]


# (BLOCK_M, BLOCK_K, warps, stages): the N tile is one head.
_OUT_SHAPES = [(128, 64, 8, 3), (64, 64, 4, 4), (128, 32, 4, 3), (64, 32, 4, 3), (128, 64, 8, 4), (256, 64, 8, 3)]
# Hopper's copy engine moves the x and weight tiles: no per-thread address math or predicates in
# the K loop (pointer loads ran at 1.37x cuBLAS's time at 16k x 4096 x 4096 on an H200).
_OUT_CONFIGS = (_configs(_OUT_SHAPES, ("BLOCK_M", "BLOCK_K"), {"USE_TMA": False}, _tma_blocks("BLOCK_M", "BLOCK_D"))
                + _configs([(128, 64, 8, 3), (256, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3)],
                           ("BLOCK_M", "BLOCK_K"), {"USE_TMA": True}, _tma_blocks("BLOCK_M", "BLOCK_D")))
# (BLOCK_M, BLOCK_K, warps, stages) of the two-heads-per-program kernel (head dims <= 64).
_OUT_PAIR_CONFIGS = (_configs([(128, 64, 8, 3), (128, 64, 4, 3), (256, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3)],
                              ("BLOCK_M", "BLOCK_K"), {"USE_TMA": False}, _tma_blocks("BLOCK_M", "BLOCK_D"))
                     + _configs([(128, 64, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3)], ("BLOCK_M", "BLOCK_K"),
                                {"USE_TMA": True}, _tma_blocks("BLOCK_M", "BLOCK_D")))
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
# (128 x 256 tiles left the lists, pointer and descriptor alike: with a batch-shared mask triton
# 3.6's ptxas serialised their wgmmas, each waiting for itself; benchmarks/kernel_resources.py
# flags that per config.)
_IN_CONFIGS = (_configs([(128, 128, 64, 8, 3), (64, 64, 32, 4, 3), (128, 64, 64, 4, 3), (128, 128, 32, 8, 4),
                         (64, 128, 64, 4, 3)], ("BLOCK_M", "BLOCK_N", "BLOCK_K"), {"USE_TMA": False},
                        _tma_blocks("BLOCK_M", "BLOCK_N"))
               + _configs([(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)],
                          ("BLOCK_M", "BLOCK_N", "BLOCK_K"), {"USE_TMA": True}, _tma_blocks("BLOCK_M", "BLOCK_N")))
# (BLOCK_M, BLOCK_T, warps, stages): the feature tile is one head.
_WGRAD_CONFIGS = _configs([(64, 64, 8, 3), (32, 64, 8, 3), (64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3),
                           (128, 128, 8, 3)], ("BLOCK_M", "BLOCK_T"))


def _k_fits_head(configs, named_args, **kwargs):
    """A reduction step wider than a head reads padding; keep the steps that fit (or the narrowest),
    of the loading kinds the launch allows."""
    configs = _prune_loading(configs, named_args, **kwargs)
    head = max(16, next_pow2(kwargs["HEAD_D"]))
    fit = [c for c in configs if c.kwargs["BLOCK_K"] <= head]
    return fit or [min(configs, key=lambda c: c.kwargs["BLOCK_K"])]


@triton.jit
def _grouped_tile(pid, n_a, n_b, GROUP: tl.constexpr):
    """(a, b) tile of program pid, with GROUP consecutive a-tiles walked across every b before the
    next group. Programs in flight then share a few a-tiles and a few b-tiles through L2. Walking a
    fastest instead (a 2-D grid's axis 0) puts every a-tile of one b in flight at once: with x
    tiles as a, each head's wave re-streams all of x from memory (at 16k rows x 4096 that is
    128 MiB per head, more than L2 holds)."""
    per_group = GROUP * n_b
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_a - first, GROUP)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def _keep_rows(Keep, offs_m, row_ok, h, rows_per_sample, stride_kb, PER_SAMPLE: tl.constexpr):
    if PER_SAMPLE:
        k = tl.load(Keep + (offs_m // rows_per_sample) * stride_kb + h, mask=row_ok, other=0)
    else:
        k = tl.load(Keep + h) + offs_m * 0
    return (k != 0) & row_ok


@triton.jit
def _mma(acc, x, w, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    if DOT_F32:
        return acc + tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=DOT_PRECISION)
    return acc + tl.dot(x, w)


@triton.jit
def _w_tile(DescW, k0, n0, W_IN_OUT: tl.constexpr):
    """The weight's [BLOCK_K, n-tile] at (k0, n0) through its descriptor, whichever its storage."""
    # One return after the branch: triton 3.6 type-checks a return behind a taken constexpr
    # branch too, and the two tiles' shapes differ (seen on an H200: "Inconsistent return types").
    if W_IN_OUT:
        w = DescW.load([k0, n0])
    else:
        w = tl.trans(DescW.load([n0, k0]))
    return w


@triton.jit
def _x_tile(X, DescX, pid_m, offs_m, row_ok, k0, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr,
            BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr):
    """x[row block pid_m, k0 : k0 + BLOCK_K], zeros past M and K (masks, or the copy engine's fill)."""
    if USE_TMA:
        x = DescX.load([pid_m * BLOCK_M, k0])
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=row_ok[:, None] & (offs_k < K)[None, :], other=0.0)
    return x


@triton.jit
def _head_w_tile(W, DescW, k0, h, offs_d, cols_ok, K, stride_wn, stride_wk, HEAD_D: tl.constexpr,
                 BLOCK_K: tl.constexpr, W_IN_OUT: tl.constexpr, USE_TMA: tl.constexpr):
    """Head h's weight [BLOCK_K, BLOCK_D] from k0; ``cols_ok`` masks the pointer load's columns
    (descriptor tiles are whole heads, and only power-of-two heads take them)."""
    if USE_TMA:
        w = _w_tile(DescW, k0, h * HEAD_D, W_IN_OUT)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(W + (h * HEAD_D + offs_d)[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=(offs_k < K)[:, None] & cols_ok[None, :], other=0.0)
    return w


@triton.jit
def _kept_first_slots(Keep, row, H, BLOCK_H: tl.constexpr):
    """(slot of each head in its mask row's kept-first order, kept count): kept heads take slots
    0.. in index order, pruned heads the slots after them, lanes past H slots >= H. Computed by
    each program from the H flags (a few hundred bytes, cached) rather than read from a list built
    by a launch of its own before every projection: H loads and a prefix sum per program instead
    of a launch (and its host call) per projection."""
    heads = tl.arange(0, BLOCK_H)
    f = (tl.load(Keep + row + heads, mask=heads < H, other=0) != 0).to(tl.int32)
    n_kept = tl.sum(f, axis=0)
    kept_before = tl.cumsum(f, axis=0) - f
    return tl.where(f != 0, kept_before, n_kept + heads - kept_before), n_kept


@triton.jit
def _head_at(slots, slot):
    """The head at ``slot`` of the order :func:`_kept_first_slots` gave (slot < H)."""
    return tl.sum(tl.where(slots == slot, tl.arange(0, slots.shape[0]), 0), axis=0)


# Fully pruned programs of a row block (every head slot past the kept count) whose zeros each
# program with a kept head stores ahead of its K loop, so that the stores drain under its MMAs
# and the pruned programs exit without one. At 32 x 512 rows x 768 (BERT-sized) and p = 0.5 half
# of the pair programs only stored zeros, and the projection fell from 40 to 31 us, not 20
# (H200). Three covers every pruned program down to a quarter of the heads kept.
PRUNED_PROGRAMS_PER_KEPT = 3


@triton.jit
def _store_covered_zeros(Y, slots, j, kept_progs, H, offs_m, M, stride_ym, stride_yn, HEAD_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ZERO_SHARE: tl.constexpr,
                         PER_PROGRAM: tl.constexpr):
    """Whether program j of a row block stores its own tile. A program holding a kept head
    (j < kept_progs) also stores the zeros of the fully pruned programs kept_progs * i + j,
    i = 1..ZERO_SHARE, each PER_PROGRAM heads of the kept-first order ``slots``; the pruned
    programs so covered store nothing. With kept_progs = every program, nothing is shared."""
    n_progs = (H + PER_PROGRAM - 1) // PER_PROGRAM
    if (j < kept_progs) & (kept_progs + j < n_progs):
        offs_d = tl.arange(0, BLOCK_D)
        for i in tl.static_range(1, ZERO_SHARE + 1):
            for half in tl.static_range(PER_PROGRAM):
                slot = PER_PROGRAM * (kept_progs * i + j) + half
                cols = _head_at(slots, tl.minimum(slot, H - 1)) * HEAD_D + offs_d
                tl.store(Y + offs_m[:, None] * stride_ym + cols[None, :] * stride_yn,
                         tl.zeros([BLOCK_M, BLOCK_D], dtype=Y.dtype.element_ty),
                         mask=(offs_m < tl.where(slot < H, M, 0))[:, None] & (offs_d < HEAD_D)[None, :])
    return (j < kept_progs) | (j - kept_progs >= ZERO_SHARE * kept_progs)


@triton.autotune(configs=_OUT_CONFIGS, key=["M_KEY", "K", "HEAD_D", "HAS_BIAS", "PER_SAMPLE", "TMA_MODE"],
                 prune_configs_by={"early_config_prune": _prune_loading})
@triton.jit(do_not_specialize=["M_KEY", "TMA_MODE"])  # autotune keys only
def _head_linear_out_kernel(X, W, Bias, Keep, Y, DescX, DescW, M, K, H, rows_per_sample, M_KEY, TMA_MODE,
                            stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_kb,
                            HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                            PER_SAMPLE: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            W_IN_OUT: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_H: tl.constexpr,
                            ZERO_SHARE: tl.constexpr = 0):
    # Program j of a row block computes slot j of the block's kept-head order, as the pair kernel
    # does two slots, and stores the zeros of ZERO_SHARE fully pruned programs ahead of its loop.
    # A block straddling two samples of a [B, H] mask takes head j and masks rows instead.
    pid_m, j = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), H, GROUP)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = offs_m < M
    b = 0
    one_sample = True
    if PER_SAMPLE:
        b = pid_m * BLOCK_M // rows_per_sample
        one_sample = b == (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // rows_per_sample
    kept_progs = H
    slots, n_kept = _kept_first_slots(Keep, b * stride_kb, H, BLOCK_H)
    if one_sample:
        h = _head_at(slots, j)
        row_keep = offs_m < tl.where(j < n_kept, M, 0)
        kept_progs = n_kept
    else:
        h = j
        row_keep = _keep_rows(Keep, offs_m, row_ok, h, rows_per_sample, stride_kb, PER_SAMPLE)
    stores_own = _store_covered_zeros(Y, slots, j, kept_progs, H, offs_m, M, stride_ym, stride_yn, HEAD_D, BLOCK_M,
                                      BLOCK_D, ZERO_SHARE, 1)
    # a product, not a branch: the loop runs zero times when no row of the block keeps head h
    k_hi = K * tl.max(row_keep.to(tl.int32), axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    n_idx = h * HEAD_D + offs_d
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, k_hi, BLOCK_K):
        x = _x_tile(X, DescX, pid_m, offs_m, row_ok, k0, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K, USE_TMA)
        w = _head_w_tile(W, DescW, k0, h, offs_d, d_ok, K, stride_wn, stride_wk, HEAD_D, BLOCK_K, W_IN_OUT, USE_TMA)
        acc = _mma(acc, x, w, DOT_F32, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + n_idx, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    if stores_own:
        acc = tl.where(row_keep[:, None], acc, 0.0)
        tl.store(Y + offs_m[:, None] * stride_ym + n_idx[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


# Widest head tile the pair kernel serves: two 64-wide heads make the 128-wide tile cuBLAS-class
# GEMMs use. One 64-wide head per program ran at 1.8x cuBLAS's time (H200, 16k x 768 x 768, bf16),
# each program re-reading its x rows for half the columns.
PAIR_MAX_BLOCK_D = 64


@triton.autotune(configs=_OUT_PAIR_CONFIGS, key=["M_KEY", "K", "HEAD_D", "HAS_BIAS", "PER_SAMPLE", "TMA_MODE"],
                 prune_configs_by={"early_config_prune": _prune_loading})
@triton.jit(do_not_specialize=["M_KEY", "TMA_MODE"])  # autotune keys only
def _head_linear_out_pair_kernel(X, W, Bias, Keep, Y, DescX, DescW, M, K, H, rows_per_sample, M_KEY,
                                 TMA_MODE, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                                 stride_kb, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_K: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 PER_SAMPLE: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                 W_IN_OUT: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_H: tl.constexpr,
                                 ZERO_SHARE: tl.constexpr = 0):
    # Program j of a row block computes slots 2j and 2j+1 of the block's kept-head order (the mask
    # row ranked kept-first, :func:`_kept_first_slots`): kept heads pair up whichever they are,
    # so the work is ceil(kept / 2) double tiles, and the slots past the kept count, which hold
    # the pruned heads, store their zeros (or a program with a kept head stores them for it:
    # PRUNED_PROGRAMS_PER_KEPT). A block straddling two samples of a [B, H] mask has no single list:
    # it takes heads 2j and 2j+1 and masks rows per head instead.
    pid_m, j = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(H, 2), GROUP)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = offs_m < M
    slot_a = 2 * j
    has_b = slot_a + 1 < H
    b = 0
    one_sample = True
    if PER_SAMPLE:
        b = pid_m * BLOCK_M // rows_per_sample
        one_sample = b == (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // rows_per_sample
    kept_progs = (H + 1) // 2  # programs holding a kept head; a straddling block counts them all
    # (ranked outside the branch: the zero stores below read it, and a straddling block stores none)
    slots, n_kept = _kept_first_slots(Keep, b * stride_kb, H, BLOCK_H)
    # Row masks as comparisons against a length (M or 0), not `& scalar_bool`: the interpreter
    # turns bool & scalar-bool into int32, which tl.load rejects as a mask.
    if one_sample:
        h_a = _head_at(slots, slot_a)
        h_b = _head_at(slots, tl.minimum(slot_a + 1, H - 1))
        keep_a = offs_m < tl.where(slot_a < n_kept, M, 0)
        keep_b = offs_m < tl.where(slot_a + 1 < n_kept, M, 0)
        kept_progs = (n_kept + 1) // 2
    else:
        h_a = slot_a
        h_b = tl.minimum(slot_a + 1, H - 1)
        keep_a = _keep_rows(Keep, offs_m, row_ok, h_a, rows_per_sample, stride_kb, PER_SAMPLE)
        keep_b = _keep_rows(Keep, offs_m, offs_m < tl.where(has_b, M, 0), h_b, rows_per_sample, stride_kb,
                            PER_SAMPLE)
    stores_own = _store_covered_zeros(Y, slots, j, kept_progs, H, offs_m, M, stride_ym, stride_yn, HEAD_D, BLOCK_M,
                                      BLOCK_D, ZERO_SHARE, 2)
    any_kept = tl.maximum(tl.max(keep_a.to(tl.int32), axis=0), tl.max(keep_b.to(tl.int32), axis=0))
    k_hi = K * any_kept
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    n_a = h_a * HEAD_D + offs_d
    n_b = h_b * HEAD_D + offs_d
    b_ok = offs_d < tl.where(has_b, HEAD_D, 0)
    acc_a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, k_hi, BLOCK_K):
        # (without a second head, h_b repeats the last one: read, never stored)
        x = _x_tile(X, DescX, pid_m, offs_m, row_ok, k0, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K, USE_TMA)
        w_a = _head_w_tile(W, DescW, k0, h_a, offs_d, d_ok, K, stride_wn, stride_wk, HEAD_D, BLOCK_K, W_IN_OUT,
                           USE_TMA)
        w_b = _head_w_tile(W, DescW, k0, h_b, offs_d, b_ok, K, stride_wn, stride_wk, HEAD_D, BLOCK_K, W_IN_OUT,
                           USE_TMA)
        acc_a = _mma(acc_a, x, w_a, DOT_F32, DOT_PRECISION)
        acc_b = _mma(acc_b, x, w_b, DOT_F32, DOT_PRECISION)
    if HAS_BIAS:
        acc_a += tl.load(Bias + n_a, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        acc_b += tl.load(Bias + n_b, mask=b_ok, other=0.0).to(tl.float32)[None, :]
    if stores_own:
        acc_a = tl.where(keep_a[:, None], acc_a, 0.0)
        acc_b = tl.where(keep_b[:, None], acc_b, 0.0)
        y_rows = Y + offs_m[:, None] * stride_ym
        tl.store(y_rows + n_a[None, :] * stride_yn, acc_a.to(Y.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(y_rows + n_b[None, :] * stride_yn, acc_b.to(Y.dtype.element_ty),
                 mask=row_ok[:, None] & b_ok[None, :])


@triton.jit
def _in_step(acc, X, W, DescX, DescW, row0, n0, offs_m, offs_n, rows, n_ok, k0, d0, stride_xm, stride_xk, stride_wn,
             stride_wk, HEAD_D: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
             DOT_PRECISION: tl.constexpr, W_IN_OUT: tl.constexpr, USE_TMA: tl.constexpr):
    """acc += x[rows, k0 + d0 : +BLOCK_K] @ w[k0 + d0 : +BLOCK_K, offs_n] within one head (with
    descriptors, every row of the block: rows past M read zeros; with pointers, rows outside ``rows``
    read zeros)."""
    if USE_TMA:
        x = DescX.load([row0, k0 + d0])
        w = _w_tile(DescW, k0 + d0, n0, W_IN_OUT)
        return _mma(acc, x, w, DOT_F32, DOT_PRECISION)
    offs_d = d0 + tl.arange(0, BLOCK_K)
    d_ok = offs_d < HEAD_D
    offs_k = k0 + offs_d
    x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=rows[:, None] & d_ok[None, :], other=0.0)
    w = tl.load(W + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                mask=d_ok[:, None] & n_ok[None, :], other=0.0)
    return _mma(acc, x, w, DOT_F32, DOT_PRECISION)


@triton.autotune(configs=_IN_CONFIGS, key=["M_KEY", "N", "H", "HEAD_D", "HAS_BIAS", "PER_SAMPLE", "TMA_MODE"],
                 prune_configs_by={"early_config_prune": _k_fits_head})
@triton.jit(do_not_specialize=["M_KEY", "TMA_MODE"])  # autotune keys only
def _head_linear_in_kernel(X, W, Bias, Keep, Y, DescX, DescW, M, N, H, rows_per_sample, M_KEY,
                           TMA_MODE, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, stride_kb,
                           HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                           PER_SAMPLE: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           W_IN_OUT: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Walk the kept heads of mask row b in order (_kept_first_slots): the inner trip count is then a
    # constant, so the nest flattens into one software-pipelined loop, where a per-head nest
    # pipelines only inside a head (one or two steps at D = 64-128) and stalls on every head's
    # first loads. [H] masks have one list; [B, H] masks one per sample, usable when the block's
    # rows all belong to one sample (then they all keep the listed heads and no other).
    b = 0
    one_sample = True
    if PER_SAMPLE:
        b = pid_m * BLOCK_M // rows_per_sample
        one_sample = b == (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // rows_per_sample
    if one_sample:
        slots, n_kept = _kept_first_slots(Keep, b * stride_kb, H, BLOCK_H)
        for i in tl.range(0, n_kept, flatten=True):
            k0 = _head_at(slots, i) * HEAD_D
            for d0 in range(0, HEAD_D, BLOCK_K):
                acc = _in_step(acc, X, W, DescX, DescW, pid_m * BLOCK_M, pid_n * BLOCK_N, offs_m, offs_n, row_ok,
                               n_ok, k0, d0, stride_xm, stride_xk, stride_wn, stride_wk, HEAD_D, BLOCK_K, DOT_F32,
                               DOT_PRECISION, W_IN_OUT, USE_TMA)
    else:
        # A block straddling samples (at most one per sample boundary): per head, the K range of
        # heads some row keeps, its rows that prune the head masked out. Pointer loads, and not
        # pipelined: the same loop through TMA descriptors (a where() zeroing the rows after the
        # load) gave wrong sums on an H200 under triton 3.6 (bf16 and fp16, D = 64 and 128), and
        # a pipelined copy of it would take shared memory the kept-head loop needs (256 KiB at
        # the first config). Few blocks take this branch; their speed does not matter.
        for h in range(H):
            row_keep = _keep_rows(Keep, offs_m, row_ok, h, rows_per_sample, stride_kb, PER_SAMPLE)
            d_hi = HEAD_D * tl.max(row_keep.to(tl.int32), axis=0)
            for d0 in tl.range(0, d_hi, BLOCK_K, num_stages=1):
                # rows pruning h read zeros: the reduction is exact whatever the pruned inputs
                # hold (the backward feeds it gradients, which are not zero there)
                acc = _in_step(acc, X, W, DescX, DescW, pid_m * BLOCK_M, pid_n * BLOCK_N, offs_m, offs_n, row_keep,
                               n_ok, h * HEAD_D, d0, stride_xm, stride_xk, stride_wn, stride_wk, HEAD_D, BLOCK_K,
                               DOT_F32, DOT_PRECISION, W_IN_OUT, False)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_WGRAD_CONFIGS, key=["M_KEY", "T", "HEAD_D", "HAS_BIAS", "PER_SAMPLE"])
@triton.jit(do_not_specialize=["M_KEY"])  # an autotune key only
def _head_weight_grad_kernel(A, Bm, Keep, DW, DBias, M, T, H, rows_per_sample, n_samples, M_KEY,
                             stride_am, stride_af, stride_bm, stride_bt, stride_dwf, stride_dwt, stride_kb,
                             HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_T: tl.constexpr, GROUP: tl.constexpr, BLOCK_B: tl.constexpr,
                             HAS_BIAS: tl.constexpr, PER_SAMPLE: tl.constexpr, DOT_F32: tl.constexpr,
                             DOT_PRECISION: tl.constexpr):
    """DW[h*D + d, t] = sum over rows m keeping h of A[m, h*D + d] * Bm[m, t] (DW addressed through
    (feature, t) strides, so one kernel serves both weight layouts and both ops), and DBias[h*D + d]
    = the same rows' sum of A. One program per (t block, head), grouped: programs in flight walk
    the rows in near lockstep, so a group shares the Bm tiles and head features it reads."""
    pid_t, h = _grouped_tile(tl.program_id(0), tl.cdiv(T, BLOCK_T), H, GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    f_idx = h * HEAD_D + offs_d
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    acc = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    # a head that no row keeps runs no M loop and stores zeros
    if PER_SAMPLE:
        offs_b = tl.arange(0, BLOCK_B)
        kept = tl.load(Keep + offs_b * stride_kb + h, mask=offs_b < n_samples, other=0)
        m_hi = M * tl.max((kept != 0).to(tl.int32), axis=0)
    else:
        m_hi = M * (tl.load(Keep + h) != 0).to(tl.int32)
    for m0 in range(0, m_hi, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = offs_m < M
        row_keep = _keep_rows(Keep, offs_m, row_ok, h, rows_per_sample, stride_kb, PER_SAMPLE)
        # Rows pruning h load zeros (their gradients are not zero) and move no memory. No branch
        # skips the dot of a row block that no row keeps (per-sample masks): a branch around
        # the loads or the dot stops the loop's loads from being pipelined (checked on sm_90).
        a = tl.load(A + offs_m[None, :] * stride_am + f_idx[:, None] * stride_af,
                    mask=d_ok[:, None] & row_keep[None, :], other=0.0)
        b = tl.load(Bm + offs_m[:, None] * stride_bm + offs_t[None, :] * stride_bt,
                    mask=row_keep[:, None] & t_ok[None, :], other=0.0)
        acc = _mma(acc, a, b, DOT_F32, DOT_PRECISION)
        if HAS_BIAS:
            acc_b += tl.sum(a.to(tl.float32), axis=1)
    tl.store(DW + f_idx[:, None] * stride_dwf + offs_t[None, :] * stride_dwt, acc.to(DW.dtype.element_ty),
             mask=d_ok[:, None] & t_ok[None, :])
    if HAS_BIAS:
        if pid_t == 0:
            tl.store(DBias + f_idx, acc_b.to(DBias.dtype.element_ty), mask=d_ok)


def _nk_strides(t: torch.Tensor, weight_in_out: bool):
    """(n, k) element strides whatever the storage: out_in [N, K], in_out [K, N]."""
    return (t.stride(1), t.stride(0)) if weight_in_out else (t.stride(0), t.stride(1))


def _prepare(x: torch.Tensor, weight: torch.Tensor, heads_keep: torch.Tensor, weight_in_out: bool):
    x2 = x.reshape(-1, x.shape[-1])
    s_wn, s_wk = _nk_strides(weight, weight_in_out)
    # The kernels dereference the mask on x's device: a host mask would be a wild pointer there.
    keep = mask_bytes(heads_keep.to(device=x.device))
    per_sample = keep.dim() == 2
    rows = x2.shape[0] // keep.shape[0] if per_sample else 1
    return x2, s_wn, s_wk, keep, per_sample, rows, (keep.stride(0) if per_sample else 0)


def _block_h(H: int) -> int:
    # the lanes of a mask row the kernels rank (_kept_first_slots): a power of two
    return max(16, next_pow2(H))


def _dot_f32(x: torch.Tensor) -> bool:
    return _INTERPRET or x.dtype == torch.float32


def _f32_precision(x: torch.Tensor) -> str:
    """How fp32 operands multiply: as nn.Linear would on this device. torch keeps exact fp32
    matmuls unless the user opted into tf32 (set_float32_matmul_precision("high"/"medium")), and
    a projection must match the dense model's within fp32 tolerance (measured on an H100: tf32
    dots put tiny GPT-2/Llama 2e-4..6e-4 away from the original, ten times fp32's 2e-5)."""
    if x.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _pairs_heads(head_dim: int, n_heads: int) -> bool:
    # DHP_FX_HEAD_PAIRS=0 keeps one head per program (read per call: an A/B switch for benchmarks)
    return (n_heads > 1 and max(16, next_pow2(head_dim)) <= PAIR_MAX_BLOCK_D
            and os.environ.get("DHP_FX_HEAD_PAIRS", "1") != "0")


# The reduction step of every descriptor config (the interpreter's single config: 16).
_TMA_BLOCK_K = 16 if _INTERPRET else 64


def _descriptor_2d(t: torch.Tensor):
    if t.dim() != 2 or t.stride(1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
        return None
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])


def _loading(x2: torch.Tensor, weight: torch.Tensor, head_dim: int, tma: Optional[bool]):
    """(TMA_MODE, descriptors or the plain tensors) for a projection launch. ``tma``: None tries
    descriptor configs beside pointer ones on Hopper (the autotuner picks), True forces them
    (ValueError when the tensors do not suit the copy engine), False keeps pointer loads."""
    if tma is False or (tma is None and (_INTERPRET or not _uses_tma_by_default(x2.device, x2.shape[0]))):
        return TMA_OFF, (x2, weight)
    descs = None
    # Descriptor tiles have no column masks: a head must be a whole number of reduction steps
    # (head_linear_in walks the kept heads' features BLOCK_K at a time).
    if (TensorDescriptor is not None and x2.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x2.dtype
            and head_dim == next_pow2(head_dim) and head_dim >= _TMA_BLOCK_K and min(x2.shape) > 0):
        dx, dw = _descriptor_2d(x2), _descriptor_2d(weight)
        descs = (dx, dw) if dx is not None and dw is not None else None
    if descs is None:
        if tma:
            raise ValueError("tma=True: x and the weight need a unit innermost stride, 16-byte aligned base and "
                             "row stride, one float16/bfloat16 dtype, and the head dim a power of two "
                             f">= {_TMA_BLOCK_K}")
        return TMA_OFF, (x2, weight)
    return (TMA_ONLY if tma else TMA_AUTO), descs


def _interpreted_loading(mode: int) -> dict:
    # The interpreter's single config carries no loading kind: the launch names it.
    return {"USE_TMA": mode == TMA_ONLY} if _INTERPRET else {}


def head_linear_out_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           heads_keep: torch.Tensor, head_dim: int, weight_in_out: bool = False,
                           tma: Optional[bool] = None) -> torch.Tensor:
    x2, s_wn, s_wk, keep, per_sample, rows, s_kb = _prepare(x, weight, heads_keep, weight_in_out)
    M, K = x2.shape
    H = heads_keep.shape[-1]
    y = torch.empty((M, H * head_dim), device=x.device, dtype=x.dtype)
    mode, (desc_x, desc_w) = _loading(x2, weight, head_dim, tma)
    kernel, per_program = ((_head_linear_out_pair_kernel, 2) if _pairs_heads(head_dim, H)
                           else (_head_linear_out_kernel, 1))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(H, per_program),)  # noqa: E731
    kernel[grid](
        x2, weight, bias if bias is not None else x2, keep, y, desc_x, desc_w, M, K, H, rows, _bucket(M), mode,
        x2.stride(0), x2.stride(1), s_wn, s_wk, y.stride(0), y.stride(1), s_kb,
        HEAD_D=head_dim, BLOCK_D=max(16, next_pow2(head_dim)), BLOCK_H=_block_h(H),
        HAS_BIAS=bias is not None, PER_SAMPLE=per_sample, DOT_F32=_dot_f32(x), DOT_PRECISION=_f32_precision(x),
        W_IN_OUT=weight_in_out, ZERO_SHARE=PRUNED_PROGRAMS_PER_KEPT, **_interpreted_loading(mode))
    return y.view(*x.shape[:-1], H * head_dim)


def head_linear_in_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          heads_keep: torch.Tensor, head_dim: int, weight_in_out: bool = False,
                          tma: Optional[bool] = None) -> torch.Tensor:
    x2, s_wn, s_wk, keep, per_sample, rows, s_kb = _prepare(x, weight, heads_keep, weight_in_out)
    M = x2.shape[0]
    H = heads_keep.shape[-1]
    N = weight.shape[1] if weight_in_out else weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    mode, (desc_x, desc_w) = _loading(x2, weight, head_dim, tma)
    _head_linear_in_kernel[grid](
        x2, weight, bias if bias is not None else x2, keep, y, desc_x, desc_w, M, N, H, rows,
        _bucket(M), mode, x2.stride(0), x2.stride(1), s_wn, s_wk, y.stride(0), y.stride(1), s_kb,
        HEAD_D=head_dim, BLOCK_H=_block_h(H),
        HAS_BIAS=bias is not None, PER_SAMPLE=per_sample, DOT_F32=_dot_f32(x), DOT_PRECISION=_f32_precision(x),
        W_IN_OUT=weight_in_out, **_interpreted_loading(mode))
    return y.view(*x.shape[:-1], N)


def _weight_grad(a2: torch.Tensor, b2: torch.Tensor, keep: torch.Tensor, per_sample: bool, rows: int, s_kb: int,
                 head_dim: int, dw: torch.Tensor, s_dwf: int, s_dwt: int, dbias: Optional[torch.Tensor]) -> None:
    M, T = b2.shape
    H = keep.shape[-1]
    grid = lambda meta: (cdiv(T, meta["BLOCK_T"]) * H,)  # noqa: E731
    _head_weight_grad_kernel[grid](
        a2, b2, keep, dw, dbias if dbias is not None else dw, M, T, H, rows, keep.shape[0], _bucket(M),
        a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1), s_dwf, s_dwt, s_kb,
        HEAD_D=head_dim, BLOCK_D=max(16, next_pow2(head_dim)),
        BLOCK_B=next_pow2(keep.shape[0]) if per_sample else 1,
        HAS_BIAS=dbias is not None, PER_SAMPLE=per_sample, DOT_F32=_dot_f32(a2), DOT_PRECISION=_f32_precision(a2))


def head_linear_out_backward_triton(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                    bias: Optional[torch.Tensor], heads_keep: torch.Tensor, head_dim: int,
                                    weight_in_out: bool = False):
    """(dx, dweight, dbias) of ``head_linear_out``; dbias is empty without a bias.

    dx = the kept heads' gradient features times their weight rows: the head_linear_in reduction
    on the gradient, with the weight read transposed (the flipped layout flag swaps its strides).
    """
    gx = head_linear_in_triton(grad, weight, None, heads_keep, head_dim, not weight_in_out)
    g2, _, _, keep, per_sample, rows, s_kb = _prepare(grad, weight, heads_keep, weight_in_out)
    x2 = x.reshape(-1, x.shape[-1])
    gw = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
    gb = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias is not None else x.new_empty(0)
    s_n, s_k = _nk_strides(gw, weight_in_out)
    _weight_grad(g2, x2, keep, per_sample, rows, s_kb, head_dim, gw, s_n, s_k, gb if bias is not None else None)
    return gx, gw, gb


def head_linear_in_backward_triton(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                   bias: Optional[torch.Tensor], heads_keep: torch.Tensor, head_dim: int,
                                   weight_in_out: bool = False):
    """(dx, dweight, dbias) of ``head_linear_in``; dbias is empty without a bias.

    dx[:, head h] = the gradient times the weight's head-h columns, zero for rows pruning h: the
    head_linear_out kernel on the gradient with the weight read transposed.
    """
    gx = head_linear_out_triton(grad, weight, None, heads_keep, head_dim, not weight_in_out)
    x2, _, _, keep, per_sample, rows, s_kb = _prepare(x, weight, heads_keep, weight_in_out)
    g2 = grad.reshape(-1, grad.shape[-1])
    gw = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
    s_n, s_k = _nk_strides(gw, weight_in_out)
    # the kernel's head features are the weight's input (k) side here, its t side the outputs
    _weight_grad(x2, g2, keep, per_sample, rows, s_kb, head_dim, gw, s_k, s_n, None)
    gb = g2.sum(0) if bias is not None else x.new_empty(0)
    return gx, gw, gb
