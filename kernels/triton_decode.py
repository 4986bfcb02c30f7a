"""Split-KV (flash-decoding) forward of gated attention, for short queries against long keys.

The regular forward runs one program per (query block, slot). At decode (Lq <= 16) that is one
program per (batch, head): B=1, Hq=32 launches 32 programs on a GPU with 132 SMs, each walking
every key alone. Here the key range is cut into ``num_splits`` contiguous pieces:

* ``_decode_split``, grid (splits, B*Hq slots): one program per (piece, slot) runs the forward's
  own key loop (``_attend``) over its piece for all Lq rows at once (BLOCK_M = 16) and
  stores the unnormalised partials (acc, running max m, sum l, entropy accumulator s, all in
  the log2 domain) to fp32 scratch, pair-major [B*Hq, splits, Lq].
* ``_decode_combine``, grid (B*Hq slots): merges the pieces per row and writes out, entropy and
  lse exactly as the forward defines them.

The split count is chosen on the host for every pair (how many are kept is on the device). So
that pruning frees programs for the kept pairs rather than leaving them idle, each split program
g = slot * splits + split ranks the [B*Hq] keep flags itself (``SHARE_PIECES``): with n kept
pairs, kept pair r gets pieces r * P .. r * P + P - 1 of the launch's programs, P =
:func:`_pieces_per_kept` (at least ``splits``), and the combine finds its pair's pieces by the
same rank. With every pair kept that is exactly (pair, split). No list is built by a launch of
its own: a decode step is short, and that took several small launches per step. Pruned pairs
run zero key iterations and the combine stores their exact zeros. A piece past the end of the
keys (more splits than key blocks) stores m = -inf, l = 0, which the merge weighs by exactly 0,
so any split count is valid.

GQA (Hq = GROUP * Hkv): decode is bound by streaming K/V, and one program per query head reads
its KV head's K/V GROUP times. ``_decode_split_packed``, grid (splits, B*Hkv slots), instead gives
one program all GROUP heads of a KV group as rows r = g * Lq + i of one tile (padded to a power of
two >= 16, GROUP * Lq <= MAX_PACKED_ROWS), so each K/V block is read once per group. It reuses
``_attend`` unchanged: query indices i go in as the row indices (padded rows get Lq, which the
row test rejects), so causal stays top-left on i, and the mask base is a per-row pointer column
(head h = hk * GROUP + g), so per-head masks work. Slot s is (batch, KV head) group s; a group is
kept when any of its heads' flags is set, and fully pruned groups run no keys. Pruned heads of a
kept group are computed with the rest and dropped: with several splits their partials land in
the same pair-major scratch, which the per-pair combine never reads for pruned pairs; with one
split the packed program stores the results itself (no scratch, no combine), zeros / entropy 0 /
lse +inf for pruned heads from the per-pair keep flags. GQA decode takes the packed kernel even where
one split suffices; the split heuristic then counts B*Hkv programs. ``PACK_GQA`` forces either
kernel (tests).

Head map (``HEAD_MAP``): a query chain's q holds the kept query heads only, while K/V (a KV
cache) hold every KV head. ``KvHeads`` [Hq] names each q slot's KV head, so K/V are read in place
rather than gathered per step (gathered, the kept heads' cached rows are read and written, then
read again: three times the bytes). The per-head kernel reads its slot's entry; the packed
kernel finds its KV head's slots by scanning the map (``_group_slots``), at most GROUP of them.

Nothing reads device values on the host: no sync.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .triton_attention import (_INTERPRET, _attend, _store_row_stats, cdiv, dot_flags, head_blocks, next_pow2,
                               sm_count)

# A split program holds all query rows in one 16-row block: longer queries take the regular grid.
MAX_DECODE_LQ = 16
_BLOCK_M = 16
# Interpreter: small tiles keep test shapes multi-block and the runs short.
_BLOCK_N = 16 if _INTERPRET else 64
# Under the interpreter a pretend GPU of a few SMs lets small test shapes take the split path.
_INTERPRET_SMS = 4
# FA2 sizes splits against 2 resident programs per SM (small tiles, memory-bound loop).
_PROGRAMS_PER_SM = 2
_MAX_SPLITS = 128
# Pieces shorter than this save less key streaming than the combine launch and the scratch round
# trip cost (an estimate, not yet measured on a GPU).
_MIN_BLOCKS_PER_SPLIT = 2
MIN_BLOCKS_PER_SPLIT = tl.constexpr(_MIN_BLOCKS_PER_SPLIT)
# Per-head decode shares its programs among the kept pairs (the split count is sized on the host
# for every pair, as how many are kept is on the device). False: pruned pairs' programs exit.
SHARE_PIECES = True
# GQA packing: GROUP * Lq rows in one program (padded to a power of two >= 16). The cap is the
# register budget: 64 rows already need 8 warps and 32-key tiles at D = 128 (16-key tiles for
# exact fp32) to stay spill-free on sm_90, and a 128-row tile would hold twice the accumulator
# with less left to shrink. 64 covers the decode shapes that matter (groups of 2-8 at Lq <= 8,
# 4 at Lq = 16); the rest (e.g. group 8 at Lq 9-16, which would pad 72 rows to 128) keep the
# per-head kernels, correct but reading K/V once per head.
MAX_PACKED_ROWS = 64
# Tests force the packed (True) or per-head (False) decode kernel; None chooses by shape.
PACK_GQA = None


@triton.jit
def _flag_chunk(KeepFlags, start, N, BLOCK: tl.constexpr):
    """(indices, 0/1 int32 keep flags) of pairs [start, start + BLOCK), zeros past N."""
    offs = start + tl.arange(0, BLOCK)
    return offs, (tl.load(KeepFlags + offs, mask=offs < N, other=0) != 0).to(tl.int32)


@triton.jit
def _kept_count_and_rank(KeepFlags, N, pair, BLOCK: tl.constexpr):
    """(kept pairs among all N, kept pairs before ``pair``), from the [N] flags."""
    total = 0
    before = 0
    for start in range(0, N, BLOCK):
        offs, f = _flag_chunk(KeepFlags, start, N, BLOCK)
        total += tl.sum(f, axis=0)
        before += tl.sum(tl.where(offs < pair, f, 0), axis=0)
    return total, before


@triton.jit
def _kth_kept(KeepFlags, N, k, BLOCK: tl.constexpr):
    """Index of the k-th kept pair (0-based; 0 when fewer are kept)."""
    found = 0
    seen = 0
    for start in range(0, N, BLOCK):
        offs, f = _flag_chunk(KeepFlags, start, N, BLOCK)
        hit = (f != 0) & (seen + tl.cumsum(f, axis=0) == k + 1)
        found += tl.sum(tl.where(hit, offs, 0), axis=0)
        seen += tl.sum(f, axis=0)
    return found


@triton.jit
def _pieces_per_kept(n_kept, n_programs, splits, n_blocks, MIN_BLOCKS: tl.constexpr):
    """Key pieces per kept pair when the launch's programs are shared among the kept pairs only:
    as many as the programs allow, each at least MIN_BLOCKS key blocks, never fewer than the
    launch's own split count (every pair kept: exactly that)."""
    share = n_programs // tl.maximum(n_kept, 1)
    return tl.maximum(splits, tl.minimum(share, tl.maximum(n_blocks // MIN_BLOCKS, 1)))


@triton.jit
def _split_keys(split, keys_per_split, kept, Lq, Lk, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, mid, hi) of this split's key piece: [lo, mid) unmasked, [mid, hi) edge blocks; empty
    for pruned slots. Top-left causal: no row below Lq sees a key at or past Lq, and every block
    needs the causal test. keys_per_split is a multiple of BLOCK_N, so mid is block aligned."""
    if IS_CAUSAL:
        key_end = tl.minimum(Lk, Lq)
        full_end = 0
    else:
        key_end = Lk
        full_end = (Lk // BLOCK_N) * BLOCK_N
    lo = split * keys_per_split
    hi = tl.where(kept, tl.minimum(lo + keys_per_split, key_end), 0)
    return lo, tl.maximum(tl.minimum(full_end, hi), lo), hi


@triton.jit
def _store_partials(Acc, M, L, S, row, rows, acc, m_i, l_i, s_i, offs_dv, BLOCK_DV: tl.constexpr,
                    ENTROPY: tl.constexpr, COMPUTE_PV: tl.constexpr):
    """One split's unnormalised state of each row to the fp32 scratch, row-indexed pair-major."""
    tl.store(M + row, m_i, mask=rows)
    tl.store(L + row, l_i, mask=rows)
    if ENTROPY:
        tl.store(S + row, s_i, mask=rows)
    if COMPUTE_PV:
        tl.store(Acc + row[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=rows[:, None])


@triton.jit
def _decode_split(
    Q, K, V, Mask, Acc, M, L, S, KeepFlags, KvHeads,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, GROUP, Lq, Lk, keys_per_split, n_blocks, scale_log2,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, ENTROPY: tl.constexpr, COMPUTE_PV: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SHARE: tl.constexpr = False, BLOCK_PAIRS: tl.constexpr = 16, HEAD_MAP: tl.constexpr = False,
):
    # Program g = slot * splits + split. Its partials go to scratch row g: pair-major, since
    # with every pair kept g is (pair, split).
    g = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    if SHARE:
        # The launch's programs serve the kept pairs only (_pieces_per_kept pieces each): at
        # p = 0.25 the kept heads get four times the pieces instead of three quarters of the
        # programs exiting. Pruned or surplus programs run no keys and store nothing.
        n_kept, _ = _kept_count_and_rank(KeepFlags, tl.num_programs(1), 0, BLOCK_PAIRS)
        pieces = _pieces_per_kept(n_kept, tl.num_programs(0) * tl.num_programs(1), tl.num_programs(0), n_blocks,
                                  MIN_BLOCKS_PER_SPLIT)
        rank = g // pieces
        kept = rank < n_kept
        split = g - rank * pieces
        pair = _kth_kept(KeepFlags, tl.num_programs(1), rank, BLOCK_PAIRS).to(tl.int64)
        keys_per_split = tl.cdiv(n_blocks, pieces) * BLOCK_N
    else:
        split = tl.program_id(0)
        pair = tl.program_id(1).to(tl.int64)
        kept = tl.load(KeepFlags + pair) != 0
    b = pair // Hq
    h = pair % Hq
    if HEAD_MAP:  # q holds some heads only (a query chain's kept heads): each names its KV head
        hk = tl.load(KvHeads + h).to(tl.int64)
    else:
        hk = h // GROUP

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # A row-count limit rather than `& kept` (the interpreter rejects bool & scalar-bool masks).
    rows = tl.where(kept, Lq, 0)
    row_st = offs_m < rows
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_st[:, None] & (offs_d[None, :] < HEAD_D), other=0)

    lo, mid, hi = _split_keys(split, keys_per_split, kept, Lq, Lk, IS_CAUSAL, BLOCK_N)

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh
    acc, l_i, m_i, s_i = _attend(
        q, k_base, v_base, mask_base, lo, mid, hi, offs_m, offs_d, offs_dv,
        Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale_log2,
        k_base, v_base, 0, 0, False, BLOCK_M, BLOCK_N, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, IS_CAUSAL, MASK_KIND, ENTROPY,
        COMPUTE_PV, DOT_F32, DOT_PRECISION, False)

    # Scratch is pair-major [B*Hq, splits, Lq(, BLOCK_DV)], so the combine reads one pair's pieces
    # contiguously and the packed kernel, one program per KV group, shares it.
    # Pruned slots store nothing: the combine never reads them.
    _store_partials(Acc, M, L, S, g * Lq + offs_m, row_st, acc, m_i, l_i, s_i, offs_dv, BLOCK_DV, ENTROPY,
                    COMPUTE_PV)


@triton.jit
def _group_slots(KvHeads, hk, Hq, Lq, r, SLOT_CHUNK: tl.constexpr):
    """(slot of each packed row, rows in use) where q holds some heads only, each naming its KV
    head: KV head hk's g-th query head is the g-th slot, in slot order, that names hk, and row
    r = g * Lq + i belongs to it. Rows past the group's get slot 0 (masked by the callers). The
    slots are scanned SLOT_CHUNK at a time: a [rows, all slots] comparison spilled at 64 rows."""
    g = r // Lq
    h = tl.zeros_like(r)
    found = 0
    for start in range(0, Hq, SLOT_CHUNK):
        slots = start + tl.arange(0, SLOT_CHUNK)
        mine = (tl.load(KvHeads + slots, mask=slots < Hq, other=-1) == hk).to(tl.int32)
        nth = (mine[None, :] != 0) & ((found + tl.cumsum(mine, axis=0))[None, :] == g[:, None] + 1)
        h += tl.sum(tl.where(nth, slots[None, :], 0), axis=1)
        found += tl.sum(mine, axis=0)
    return h.to(tl.int64), found * Lq


@triton.jit
def _decode_split_packed(
    Q, K, V, Mask, Acc, M, L, S, Out, Ent, Lse, KeepFlags, KvHeads,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, Hkv, GROUP, Lq, Lk, keys_per_split, scale_log2,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, ENTROPY: tl.constexpr, STORE_LSE: tl.constexpr,
    COMPUTE_PV: tl.constexpr, ONE_SPLIT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_MAP: tl.constexpr = False, SLOT_CHUNK: tl.constexpr = 16,
):
    split = tl.program_id(0)
    # int32 division (a 64-bit one is a subroutine call whose spills showed up at some head
    # dims); int64 from there on for the base offsets.
    grp = tl.program_id(1)
    b = (grp // Hkv).to(tl.int64)
    hk = (grp % Hkv).to(tl.int64)

    # Row r holds query i of the group's g-th head, r = g * Lq + i. Padded rows get query index Lq,
    # which the forward loop's row test rejects, so their mask loads stay in bounds.
    r = tl.arange(0, BLOCK_M)
    if HEAD_MAP:
        h, n_rows = _group_slots(KvHeads, hk, Hq, Lq, r, SLOT_CHUNK)
        valid = r < n_rows
        g = tl.where(valid, r // Lq, 0)
        kept = tl.max((tl.load(KeepFlags + (b * Hq + h), mask=valid, other=0) != 0).to(tl.int32), axis=0) > 0
    else:
        n_rows = GROUP * Lq
        valid = r < n_rows
        g = tl.where(valid, r // Lq, 0)
        h = hk * GROUP + g
        # Kept when any head of the group is: a scalar loop (a vector load and reduction here, live
        # across the key loop, cost spills at D = 128).
        n_heads = 0
        for g0 in range(GROUP):
            n_heads += (tl.load(KeepFlags + (b * Hq + hk * GROUP + g0)) != 0).to(tl.int32)
        kept = n_heads > 0
    qi = tl.where(valid, r - g * Lq, Lq)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # A row-count limit rather than `& kept` (the interpreter rejects bool & scalar-bool masks).
    row_st = r < tl.where(kept, n_rows, 0)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_st[:, None] & (offs_d[None, :] < HEAD_D), other=0)

    lo, mid, hi = _split_keys(split, keys_per_split, kept, Lq, Lk, IS_CAUSAL, BLOCK_N)

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    # Per-row pointers [BLOCK_M, 1]: _apply_mask adds qi * stride_mm + key * stride_mn to them.
    mask_base = Mask + b * stride_mb + h[:, None] * stride_mh
    acc, l_i, m_i, s_i = _attend(
        q, k_base, v_base, mask_base, lo, mid, hi, qi, offs_d, offs_dv,
        Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale_log2,
        k_base, v_base, 0, 0, False, BLOCK_M, BLOCK_N, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, IS_CAUSAL, MASK_KIND, ENTROPY,
        COMPUTE_PV, DOT_F32, DOT_PRECISION, False)

    if HEAD_MAP:
        # Found again rather than kept live across the key loop (a 120-byte spill at D = 128 in
        # the 64-row tile that stores partials).
        h, _ = _group_slots(KvHeads, hk, Hq, Lq, r, SLOT_CHUNK)
    pair = b * Hq + h
    if ONE_SPLIT:
        # The program owns its rows' results: no scratch, no combine. Every valid row is stored,
        # kept group or not, so pruned heads get their exact zeros here too (l = 0 for pruned
        # groups, which ran no keys; pruned heads of kept groups are computed, then dropped).
        # Reloaded rather than kept live across the key loop: at D = 128 that cost a spill.
        row_keep = tl.load(KeepFlags + pair, mask=row_st, other=0) != 0
        l_ok = (l_i > 0.0) & row_keep
        l_safe = tl.where(l_ok, l_i, 1.0)
        if COMPUTE_PV:
            o = tl.where(l_ok[:, None], acc / l_safe[:, None], 0.0)
            o_ptrs = (Out + b * stride_ob + h[:, None] * stride_oh + qi[:, None] * stride_om
                      + offs_dv[None, :] * stride_od)
            tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=valid[:, None] & (offs_dv[None, :] < HEAD_DV))
        _store_row_stats(Ent, Lse, pair * Lq + qi, valid, l_ok, l_safe, m_i, s_i, ENTROPY, STORE_LSE)
    else:
        # Partials per (b, h) pair, in the unpacked kernel's layout, for the per-pair combine (which
        # never reads pruned pairs, so pruned heads' rows of kept groups may land here unused).
        _store_partials(Acc, M, L, S, (pair * tl.num_programs(0) + split) * Lq + qi, row_st, acc, m_i, l_i, s_i,
                        offs_dv, BLOCK_DV, ENTROPY, COMPUTE_PV)


@triton.jit
def _shifted(x, l, m, m_use, w):
    # w * (x + l * (m - m_use)): moves an entropy accumulator from max m to max m_use. Where the
    # weight w underflowed to 0 the piece contributes nothing, and l * (m - m_use) may overflow
    # (finfo.min masks give m ~ -1.4e38): select instead of forming 0 * inf.
    return tl.where(w > 0.0, w * (x + l * tl.where(l > 0.0, m - m_use, 0.0)), 0.0)


@triton.jit
def _decode_combine(
    Acc, M, L, S, Out, Ent, Lse, KeepFlags,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, Lq, num_splits, n_blocks,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, ENTROPY: tl.constexpr, STORE_LSE: tl.constexpr,
    COMPUTE_PV: tl.constexpr, BLOCK_M: tl.constexpr, SHARE: tl.constexpr = False, BLOCK_PAIRS: tl.constexpr = 16,
):
    pair = tl.program_id(0).to(tl.int64)
    kept = tl.load(KeepFlags + pair) != 0
    b = pair // Hq
    h = pair % Hq
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    pieces = num_splits
    base = pair * num_splits * Lq
    if SHARE:  # the split kernel's sharing: this pair's pieces follow those of the kept pairs before it
        n_kept, rank = _kept_count_and_rank(KeepFlags, tl.num_programs(0), pair, BLOCK_PAIRS)
        pieces = _pieces_per_kept(n_kept, num_splits * tl.num_programs(0), num_splits, n_blocks, MIN_BLOCKS_PER_SPLIT)
        base = rank.to(tl.int64) * pieces * Lq
    # Pruned slots merge nothing and fall through to storing zeros (their scratch is unwritten).
    for split in range(0, tl.where(kept, pieces, 0)):
        row = base + split * Lq + offs_m
        m_s = tl.load(M + row, mask=row_ok, other=float("-inf"))
        l_s = tl.load(L + row, mask=row_ok, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        # Rows with no visible key so far keep m = -inf; subtract 0 to avoid inf - inf.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        beta = tl.exp2(m_s - m_use)
        if ENTROPY:
            s_s = tl.load(S + row, mask=row_ok, other=0.0)
            s_i = _shifted(s_i, l_i, m_i, m_use, alpha) + _shifted(s_s, l_s, m_s, m_use, beta)
        if COMPUTE_PV:
            acc_s = tl.load(Acc + row[:, None] * BLOCK_DV + offs_dv[None, :], mask=row_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + acc_s * beta[:, None]
        l_i = l_i * alpha + l_s * beta
        m_i = m_new

    # Same epilogue as the forward: fully masked rows give 0 / entropy 0 / lse +inf.
    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    if COMPUTE_PV:
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
    _store_row_stats(Ent, Lse, pair * Lq + offs_m, row_ok, l_ok, l_safe, m_i, s_i, ENTROPY, STORE_LSE)


# ----------------------------------------------------------------------------------------------
# host side


def _sm_count(device: torch.device) -> int:
    if _INTERPRET or device.type != "cuda":
        return _INTERPRET_SMS
    return sm_count(device)


def _key_blocks(Lq: int, Lk: int, is_causal: bool, block_n: int = _BLOCK_N) -> int:
    # Top-left causal rows below Lq never see keys at or past Lq.
    return cdiv(min(Lk, Lq) if is_causal else Lk, block_n)


@functools.lru_cache(maxsize=4096)  # pure in its ints; called every decode step
def split_heuristic(programs: int, n_blocks: int, n_sms: int) -> int:
    """Splits for ``programs`` (B*Hq) decode programs over ``n_blocks`` key blocks: FA2's rule.

    A wave is ``n_sms * _PROGRAMS_PER_SM`` programs. Already most of a wave (>= 80%) -> 1.
    Otherwise the smallest split count whose wave efficiency (waves over their ceiling) is within
    85% of the best, among counts that each change the blocks per split (others only add empty
    pieces), with every piece at least _MIN_BLOCKS_PER_SPLIT blocks long. ``programs`` counts
    pruned pairs too: how many are kept is on the device, and reading it would sync.
    """
    slots = n_sms * _PROGRAMS_PER_SM
    if programs <= 0 or programs >= 0.8 * slots:
        return 1
    top = min(_MAX_SPLITS, slots, n_blocks // _MIN_BLOCKS_PER_SPLIT)
    if top <= 1:
        return 1

    def efficiency(s):  # busy fraction of the last wave's slots, averaged over all waves
        waves = programs * s / slots
        return waves / math.ceil(waves)

    useful = [s for s in range(1, top + 1) if s == 1 or cdiv(n_blocks, s) != cdiv(n_blocks, s - 1)]
    best = max(efficiency(s) for s in useful)
    return next(s for s in useful if efficiency(s) >= 0.85 * best)


def packs_gqa(Hq: int, Hkv: int, Lq: int, group: int | None = None) -> bool:
    """Whether decode runs one program per (batch, KV head) over all its query heads' rows:
    for GQA (group > 1) with group * Lq <= MAX_PACKED_ROWS, unless ``PACK_GQA`` forces a kernel.
    ``group``: the most query heads sharing one KV head, where q holds some heads only."""
    if group is None:
        group = Hq // Hkv if Hkv else 1
    fits = Lq <= MAX_DECODE_LQ and group * Lq <= MAX_PACKED_ROWS
    if PACK_GQA is None:
        return group > 1 and fits
    if PACK_GQA and not fits:
        raise ValueError(f"PACK_GQA: {group} heads x Lq = {Lq} rows exceed the packed cap of {MAX_PACKED_ROWS}")
    return bool(PACK_GQA)


def decode_splits(B: int, Hq: int, Lq: int, Lk: int, is_causal: bool, device, num_splits=None, Hkv=None,
                  group=None):
    """Split count for the split-KV path, or None where the regular forward should run.

    ``num_splits`` forces the split path with exactly that many pieces (tests; a count past the
    key blocks only adds empty pieces). Otherwise the path is taken for Lq <= 16 when the
    heuristic wants more than one split, or always when the query heads of a KV group pack into
    one program (:func:`packs_gqa`; ``Hkv`` None means no GQA): one packed split still reads K/V
    once per group where the regular forward reads them once per head. Packed, the heuristic
    counts B*Hkv programs. ``group`` as :func:`packs_gqa` takes it. Shapes only: no device values
    are read.
    """
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
            raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
        if Lq > MAX_DECODE_LQ:
            raise ValueError(f"num_splits: the split-KV path serves Lq <= {MAX_DECODE_LQ}, got Lq = {Lq}")
        return num_splits
    if Lq > MAX_DECODE_LQ:
        return None
    packed = packs_gqa(Hq, Hkv or Hq, Lq, group)
    programs = B * (Hkv if packed else Hq)
    splits = split_heuristic(programs, _key_blocks(Lq, Lk, is_causal), _sm_count(torch.device(device)))
    return splits if splits > 1 or packed else None


def _launch_options(dtype: torch.dtype, block_d: int) -> dict:
    # Checked for spills on sm_90 (benchmarks/kernel_resources.py's compile_usage), head dims
    # 32-128, every mask/causal/entropy/lse-only variant: 16-bit tiles fit 4 warps with 3 stages
    # of K/V prefetch (72 KiB shared at D = 128). Exact fp32 dots run on FMA units: with 4 warps,
    # or with prefetch stages, some variants spill; 8 warps unpipelined do not.
    if _INTERPRET:
        return dict(num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(num_warps=8, num_stages=1)
    return dict(num_warps=4, num_stages=3 if block_d <= 128 else 2)


def _packed_launch_options(dtype: torch.dtype, block_d: int, block_m: int) -> dict:
    """num_warps, num_stages and BLOCK_N of the packed kernel for a BLOCK_M-row tile."""
    # Checked for spills on sm_90 (benchmarks/kernel_resources.py), head dims 64 and 128, 16 to 64
    # rows, every mask kind, causal or not, one split or several. The per-row mask pointers cost
    # registers the unpacked kernel does not spend: with its 64-key tiles and 4 warps, 32+ rows
    # spill at D = 128 (16 rows sit at 255 registers; 4 warps at 32-key tiles still spill causal),
    # so wide heads stream 32-key tiles with 8 warps, as do 32+ rows; D <= 32 spilled a few bytes
    # at 64-key tiles (and is spill-free with far fewer registers at 32). Exact fp32 dots (FMA units)
    # spill at 64-key tiles from 16 rows at D = 128 and 32 rows at D = 64; D = 128 (and 16) needs
    # 16-key tiles (32-key ones spilled 16 B at 16 rows under triton 3.6 once the group's keep
    # test moved into the kernel), while at D = 32 and 64 it is 16-key tiles that spill. Register
    # allocation is not monotonic here: rerun the survey after any change.
    if _INTERPRET:
        return dict(num_warps=4, num_stages=1, BLOCK_N=_BLOCK_N)
    if dtype == torch.float32:
        return dict(num_warps=8, num_stages=1, BLOCK_N=16 if block_d in (16, 128) else 32)
    # 16 rows at D = 128: 64-key tiles with 8 warps; 32-key tiles left an 8-byte stack frame under
    # triton 3.6 (the device's version) though not under 3.9. D = 16 takes 16-key tiles: 32-key ones
    # spilled 8 B at 16 rows under 3.9 once the group's keep test moved into the kernel.
    wide_keys = block_d == 64 or (block_d == 128 and block_m <= 16)
    return dict(num_warps=4 if block_m <= 16 and block_d <= 64 else 8, num_stages=3 if block_d <= 128 else 2,
                BLOCK_N=64 if wide_keys else (16 if block_d == 16 else 32))


def _packed_forward(q, k, v, mask, out, ent_rows, lse, keep_flags, is_causal, scale, num_splits, kv_heads=None,
                    group=None):
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hkv if group is None else group
    kind, mask_t, mstr = mask
    dot_f32, precision = dot_flags(q.dtype)
    block_d, block_dv = head_blocks(D, Dv)
    block_m = max(16, next_pow2(group * Lq))
    launch = _packed_launch_options(q.dtype, max(block_d, block_dv), block_m)
    block_n = launch["BLOCK_N"]
    compute_pv, entropy = out is not None, ent_rows is not None
    keys_per_split = cdiv(_key_blocks(Lq, Lk, is_causal, block_n), num_splits) * block_n

    n = B * Hq
    one = num_splits == 1
    f32 = dict(device=q.device, dtype=torch.float32)
    if one:
        m_part = l_part = s_part = acc_part = q  # unused: the kernel writes the results itself
    else:
        m_part = torch.empty((n, num_splits, Lq), **f32)
        l_part = torch.empty((n, num_splits, Lq), **f32)
        s_part = torch.empty((n, num_splits, Lq), **f32) if entropy else m_part
        acc_part = torch.empty((n, num_splits, Lq, block_dv), **f32) if compute_pv else m_part
    _decode_split_packed[(num_splits, B * Hkv)](
        q, k, v, mask_t, acc_part, m_part, l_part, s_part, out if compute_pv else q,
        ent_rows if entropy else q, lse if lse is not None else q, keep_flags,
        kv_heads if kv_heads is not None else keep_flags,
        *q.stride(), *k.stride(), *v.stride(), *mstr, *(out.stride() if compute_pv else (0, 0, 0, 0)),
        Hq, Hkv, group, Lq, Lk, keys_per_split, scale * 1.4426950408889634,
        HEAD_D=D, HEAD_DV=Dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
        IS_CAUSAL=bool(is_causal), MASK_KIND=kind, ENTROPY=entropy, STORE_LSE=lse is not None,
        COMPUTE_PV=compute_pv, ONE_SPLIT=one, DOT_F32=dot_f32, DOT_PRECISION=precision,
        BLOCK_M=block_m, **_head_map_args(kv_heads), **launch,
    )
    if not one:
        _decode_combine[(n,)](
            acc_part, m_part, l_part, s_part, out if compute_pv else q,
            ent_rows if entropy else q, lse if lse is not None else q, keep_flags,
            *(out.stride() if compute_pv else (0, 0, 0, 0)), Hq, Lq, num_splits, 0,
            HEAD_DV=Dv, BLOCK_DV=block_dv, ENTROPY=entropy, STORE_LSE=lse is not None,
            COMPUTE_PV=compute_pv, BLOCK_M=_BLOCK_M, num_warps=4,
        )


def _head_map_args(kv_heads) -> dict:
    return {} if kv_heads is None else dict(HEAD_MAP=True)


def gated_decode_forward(q, k, v, mask, out, ent_rows, lse, keep, is_causal, scale, num_splits, kv_heads=None,
                         group=None):
    """Split-KV forward into preallocated results, for :func:`triton_gated_attention`.

    ``mask`` is :func:`mask_operand`'s (kind, tensor, strides); ``out`` (any strides), ``ent_rows``
    [B, Hq, Lq] and ``lse`` [B, Hq, Lq] (fp32, contiguous) are written where not None;
    ``keep`` is the bool [B, Hq] keep mask, on q's device. ``kv_heads`` (int32 [Hq], on q's device)
    names each query head's KV head where q holds some heads only; ``group`` then bounds how many
    query heads name one KV head.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if Lq > MAX_DECODE_LQ:
        raise ValueError(f"split-KV decode serves Lq <= {MAX_DECODE_LQ}, got Lq = {Lq}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    slots = B * Hq
    if slots == 0 or Lq == 0:
        return
    keep_flags = keep.reshape(-1).view(torch.uint8)
    if packs_gqa(Hq, Hkv, Lq, group):
        _packed_forward(q, k, v, mask, out, ent_rows, lse, keep_flags, is_causal, scale, num_splits,
                        kv_heads=kv_heads, group=group)
        return
    kind, mask_t, mstr = mask
    dot_f32, precision = dot_flags(q.dtype)
    block_d, block_dv = head_blocks(D, Dv)
    compute_pv, entropy = out is not None, ent_rows is not None
    # Whole blocks per piece keep every piece's boundary block aligned for the unmasked loop.
    keys_per_split = cdiv(_key_blocks(Lq, Lk, is_causal), num_splits) * _BLOCK_N

    f32 = dict(device=q.device, dtype=torch.float32)
    m_part = torch.empty((slots, num_splits, Lq), **f32)
    l_part = torch.empty((slots, num_splits, Lq), **f32)
    s_part = torch.empty((slots, num_splits, Lq), **f32) if entropy else m_part
    acc_part = torch.empty((slots, num_splits, Lq, block_dv), **f32) if compute_pv else m_part
    launch = _launch_options(q.dtype, block_d)
    n_blocks = _key_blocks(Lq, Lk, is_causal)
    share = dict(SHARE=SHARE_PIECES, BLOCK_PAIRS=min(1024, max(16, next_pow2(slots))))
    _decode_split[(num_splits, slots)](
        q, k, v, mask_t, acc_part, m_part, l_part, s_part, keep_flags,
        kv_heads if kv_heads is not None else keep_flags,
        *q.stride(), *k.stride(), *v.stride(), *mstr,
        Hq, max(1, Hq // Hkv), Lq, Lk, keys_per_split, n_blocks, scale * 1.4426950408889634,
        HEAD_D=D, HEAD_DV=Dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
        IS_CAUSAL=bool(is_causal), MASK_KIND=kind, ENTROPY=entropy, COMPUTE_PV=compute_pv,
        DOT_F32=dot_f32, DOT_PRECISION=precision, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, **share,
        **_head_map_args(kv_heads), **launch,
    )
    _decode_combine[(slots,)](
        acc_part, m_part, l_part, s_part, out if compute_pv else q,
        ent_rows if entropy else q, lse if lse is not None else q, keep_flags,
        *(out.stride() if compute_pv else (0, 0, 0, 0)), Hq, Lq, num_splits, n_blocks,
        HEAD_DV=Dv, BLOCK_DV=block_dv, ENTROPY=entropy, STORE_LSE=lse is not None,
        COMPUTE_PV=compute_pv, BLOCK_M=_BLOCK_M, **share, num_warps=4,
    )


__all__ = ["decode_splits", "gated_decode_forward", "packs_gqa", "split_heuristic", "MAX_DECODE_LQ",
           "MAX_PACKED_ROWS"]
