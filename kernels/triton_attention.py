"""Triton forward of gated attention: FA2-style online softmax that launches no work for pruned heads.

Grid: (query blocks, B*Hq slots). Two ways to map slots to (batch, head) pairs, neither syncing
with the host:
* compacted: slot s reads pair ``pairs[s]`` of a device-side list sorted kept-first; slots at or
  past ``n_kept`` belong to pruned pairs. A kept program also stores the zeros of up to
  ``PRUNED_TILES_PER_KEPT`` pruned pairs' tiles (slots n_kept + s, 2 n_kept + s, ...) before its
  key loop, so those stores drain while the tensor cores work, and the pruned programs they
  cover exit without a store; only the pruned slots left over (fewer than 1 in
  1 + PRUNED_TILES_PER_KEPT heads kept) store their own. Building the list costs one small
  launch, which pays at long sequences only.
* early exit: slot s is pair s, and a pruned pair's programs store zeros and return. No
  preparation at all, so it serves pairs of fewer than ``COMPACT_MIN_WORK`` query-key products
  unless the caller passes a list (the backward passes the forward's).
Pruned tiles get their zeros from programs of this launch rather than a memset over the whole
output first: a memset writes every element, then kept programs write theirs again, i.e. up to
twice the output traffic, while this way every element is written exactly once.
A persistent compacted grid (one program per resident slot walking the device-counted tiles, so
no program launches only to exit) was built in session 9 and timed on an H200 in session 10: 1.15-
1.21x the time of a program per tile at every keep ratio (benchmarks/RESULTS.md). It was removed.

Two inner loops over the full (unmasked-edge) key blocks, both in every autotune list:
* plain: Q@K^T, softmax, P@V per block. On sm_90 the softmax waits for Q@K^T and P@V for the
  softmax, so the tensor cores idle through every exp2;
* P@V behind (``_fwd_inner_pv_behind``): block j's softmax runs while block j - 1's P@V is in
  flight. Same arithmetic in the same order, so the outputs agree bit for bit.

Everything runs in the log2 domain: logits are scaled by ``scale * log2(e)`` so the softmax
uses ``exp2``; additive masks are multiplied by log2(e) on load.

Rows with no visible key (fully masked) give output 0, entropy 0 and lse = +inf, matching
PyTorch's math SDPA (``_safe_softmax``) and keeping the backward NaN-free.
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .layout import attention_output

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: pointer loads only
    TensorDescriptor = None

# Read once at import: the interpreter cannot benchmark, and its bf16 tl.dot is wrong.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# fp32 finfo.min * log2(e) overflows to -inf; clamping finite masks keeps "huge negative"
# (HF's padding value) distinct from -inf, so fully masked HF rows stay uniform as in SDPA.
_MASK_FLOOR = tl.constexpr(-1.0e38)

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2

# The config lists are checked for register spills and shared memory up to this head dim; the
# op sends larger ones (Gemma's 256) to the PyTorch path rather than risk an out-of-resources launch.
MAX_HEAD_DIM = 128


# Host-side integer helpers. triton.cdiv / triton.next_power_of_2 are jit-aware wrappers costing
# microseconds a call: on an H100 the decode split heuristic's 130 cdiv calls were most of a
# decode step's 0.4 ms host time.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def _bucket(n: int) -> int:
    # Autotune keys on buckets, not exact lengths, so decode (Lk grows by one per step)
    # does not retune at every step.
    return next_pow2(n)


# DHP_FX_TRITON_AUTOTUNE=0 keeps only each kernel's first config: no tuning-time compiles (CI).
_AUTOTUNE = os.environ.get("DHP_FX_TRITON_AUTOTUNE", "1") != "0"


class ConfigLimits(NamedTuple):
    max_block_d: Optional[int] = None  # largest padded head dim served without spills (None: any)
    plain_only: bool = False  # only for launches without mask, entropy, lse or causal test
    light_only: bool = False  # only for launches without mask, entropy or lse (causal allowed)


# Kept beside the configs, not on them: triton's autotune disk cache (TRITON_CACHE_AUTOTUNING=1)
# rebuilds a config as Config(**config.__dict__), which any extra attribute breaks (seen on an
# H100: TypeError at the second process that read the cache).
_LIMITS: dict = {}


def set_config_limits(config, **limits) -> None:
    _LIMITS[id(config)] = (config, ConfigLimits(**limits))


def config_limits(config) -> ConfigLimits:
    entry = _LIMITS.get(id(config))
    return entry[1] if entry is not None and entry[0] is config else ConfigLimits()


def make_configs(shapes, pruned_by_query_len=True, extra=None, pre_hook=None):
    """The autotune list from (BLOCK_M, BLOCK_N, warps, stages[, max BLOCK_D]) tuples; a single
    small fixed config under the interpreter, which cannot time. The optional fifth entry is the
    largest padded head dim the config serves without register spills on sm_90
    (``benchmarks/kernel_resources.py`` measures it); :func:`prune_configs` drops it above that.
    Without autotuning, kernels pruned by query length keep a decode config too: the pruning
    leaves exactly one of the two, so nothing is ever timed. The first config must serve every
    head dim: with a single config the autotuner never calls the pruning. ``extra`` adds fixed
    meta-parameters to every config, ``pre_hook`` runs before each launch with one of them."""
    extra = dict(extra or {})
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, **extra}, num_warps=4, num_stages=1,
                              pre_hook=pre_hook)]
    if not _AUTOTUNE:
        shapes = shapes[:1] + ([s for s in shapes if s[0] == 16][:1] if pruned_by_query_len else [])
    configs = []
    for m, n, w, s, *cap in shapes:
        c = triton.Config({"BLOCK_M": m, "BLOCK_N": n, **extra}, num_warps=w, num_stages=s, pre_hook=pre_hook)
        set_config_limits(c, max_block_d=cap[0] if cap else None)
        configs.append(c)
    return configs


# Each list was checked with benchmarks/kernel_resources.py (sm_90, bf16, causal, additive mask,
# entropy on; triton 3.6 and 3.9): no config spills at the head dims it serves.
def _fwd_configs():
    pointer_shapes = [
        (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 4),
        (64, 128, 8, 3, 64), (64, 64, 4, 3, 64), (128, 32, 4, 4, 64),
        # decode / short query blocks (16 x 128 spills 16 B at D = 128 unmasked under triton 3.9)
        (16, 64, 4, 4), (16, 128, 8, 3, 64),
    ]
    if _INTERPRET:
        # One config, the loading kind passed by the caller: triton 3.6's autotuner times any
        # list longer than one, even once pruned to one, and the interpreter cannot time.
        return make_configs(pointer_shapes, pre_hook=_tma_block_shapes)
    pointer = make_configs(pointer_shapes, extra={"USE_TMA": False, "PV_BEHIND": False})
    # Hopper's copy engine (TMA) moves whole tiles without per-thread address math or predicates,
    # which frees the registers that let larger key tiles run. Query blocks of 64+ only: decode
    # shapes have their own kernel and too little work to repay the descriptor setup.
    tma = make_configs([
        (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 32, 8, 4), (64, 128, 8, 3, 64),
    ], pruned_by_query_len=False, extra={"USE_TMA": True, "PV_BEHIND": False}, pre_hook=_tma_block_shapes)
    # P@V one block behind the softmax (_fwd_inner_pv_behind): the leading prefill tiles of each
    # loading kind, for the autotuner to weigh against the plain loop.
    # (64 x 64 with 8 warps made ptxas serialise every wgmma of the kernel: 4 warps instead.)
    behind = (make_configs([(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)], pruned_by_query_len=False,
                           extra={"USE_TMA": False, "PV_BEHIND": True})
              + make_configs([(128, 64, 8, 3), (128, 64, 8, 4)], pruned_by_query_len=False,
                             extra={"USE_TMA": True, "PV_BEHIND": True}, pre_hook=_tma_block_shapes))
    # With a mask, entropy and lse at D = 128 these sit at the 255-register cap: 8 B of spills on
    # sm_90 (descriptor configs under triton 3.9 since session 6; pointer 128 x 64 once the
    # compacted grid's pruned-tile stores went in). Light launches only, then.
    for c in behind:
        set_config_limits(c, light_only=True)
    plain = []
    if _AUTOTUNE:
        # 128 x 128 tiles halve the accumulator rescales per key and the K/V re-reads per query
        # at D = 128, but fit the registers only without masks, entropy, lse or causal tests
        # (sm_90, triton 3.6: 221-247 registers; with them, 128-392 B of spills).
        plain = (make_configs([(128, 128, 8, 2)], pruned_by_query_len=False,
                              extra={"USE_TMA": False, "PV_BEHIND": False})
                 + make_configs([(128, 128, 8, 3), (128, 128, 8, 2)], pruned_by_query_len=False,
                                extra={"USE_TMA": True, "PV_BEHIND": False}, pre_hook=_tma_block_shapes))
        for c in plain:
            set_config_limits(c, plain_only=True)
    return pointer + tma + behind + plain


def fits_head_dim(config, block_d: int) -> bool:
    cap = config_limits(config).max_block_d
    return cap is None or block_d <= cap


def prune_by_head_dim(configs, named_args, **kwargs):
    """Drop configs that would spill at this head dim."""
    block_d = max(kwargs.get("BLOCK_D", 0), kwargs.get("BLOCK_DV", 0))
    return [c for c in configs if fits_head_dim(c, block_d)] or configs[:1]


def is_light_launch(kwargs) -> bool:
    """No mask, entropy or lse: what inference of a causal LM or an unpadded encoder runs."""
    return kwargs.get("MASK_KIND", 0) == 0 and not kwargs.get("ENTROPY") and not kwargs.get("STORE_LSE")


def is_plain_launch(kwargs) -> bool:
    """A light launch without the causal test either: the variant the largest tiles fit."""
    return is_light_launch(kwargs) and not kwargs.get("IS_CAUSAL")


def launch_allows(config, kwargs) -> bool:
    """Whether a launch with these constexprs may run the config (its plain/light-only limits)."""
    limits = config_limits(config)
    return not ((limits.plain_only and not is_plain_launch(kwargs))
                or (limits.light_only and not is_light_launch(kwargs)))


def prune_configs(configs, named_args, **kwargs):
    """:func:`prune_by_head_dim`, then drop query blocks far larger than Lq (decode) and tiny
    query blocks for long queries, and configs whose limits the launch does not meet."""
    configs = [c for c in configs if launch_allows(c, kwargs)] or configs[:1]
    configs = prune_by_head_dim(configs, named_args, **kwargs)
    lq = named_args["Lq"]
    cap = max(16, next_pow2(lq))
    out = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and (lq < 64 or c.kwargs["BLOCK_M"] >= 64)]
    return out or configs[:1]


# How the forward may load Q/K/V/O: pointers only, either (the autotuner picks), TMA only.
TMA_OFF, TMA_AUTO, TMA_ONLY = 0, 1, 2


# Which inner loop the forward may run: the plain one, either (the autotuner picks), P@V behind.
PV_OFF, PV_AUTO, PV_ONLY = 0, 1, 2


def prune_fwd_configs(configs, named_args, **kwargs):
    """:func:`prune_configs` over the loading kind the launch's ``TMA_MODE`` allows and the inner
    loop its ``PV_MODE`` allows. Without timing (interpreter, no autotune) the AUTO modes mean
    pointers and the plain loop, so exactly one config remains."""
    timing = _AUTOTUNE and not _INTERPRET
    tma = {TMA_OFF: (False,), TMA_AUTO: (False, True) if timing else (False,),
           TMA_ONLY: (True,)}[named_args["TMA_MODE"]]
    behind = {PV_OFF: (False,), PV_AUTO: (False, True) if timing else (False,),
              PV_ONLY: (True,)}[named_args["PV_MODE"]]
    pool = [c for c in configs if c.kwargs["USE_TMA"] in tma and c.kwargs.get("PV_BEHIND", False) in behind]
    return prune_configs(pool or configs[:1], named_args, **kwargs)


def _tma_block_shapes(nargs):
    # Descriptors are built before the config is known; the tile they copy is the config's.
    if not nargs["USE_TMA"]:
        return
    m, n, d, dv = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_D"], nargs["BLOCK_DV"]
    for name, rows, cols in (("DescQ", m, d), ("DescK", n, d), ("DescV", n, dv), ("DescO", m, dv)):
        nargs[name].block_shape = [1, 1, rows, cols]


@triton.jit
def _load2d(ptrs, ok0, ok1, CHECK0: tl.constexpr, CHECK1: tl.constexpr):
    # Constexpr flags let full interior tiles load without predication.
    if CHECK0:
        if CHECK1:
            x = tl.load(ptrs, mask=ok0 & ok1, other=0)
        else:
            x = tl.load(ptrs, mask=ok0, other=0)
    else:
        if CHECK1:
            x = tl.load(ptrs, mask=ok1, other=0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    if DOT_F32:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PRECISION)
    else:
        r = tl.dot(a, b, input_precision=DOT_PRECISION)
    return r


@triton.jit
def _dot_acc(a, b, acc, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with the accumulator as the MMA's own (no separate add, no second tile)."""
    if DOT_F32:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PRECISION)
    else:
        r = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return r


@triton.jit
def _apply_mask(t, mask_base, mi, nj, mi_ok, nj_ok, Lk, stride_mm, stride_mn,
                EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """Mask log2-domain logits ``t``; mi/nj are query/key indices already broadcast to t's shape
    (either orientation, so the transposed dK/dV tiles share this code)."""
    if MASK_KIND != 0:
        mb = _load2d(mask_base + mi * stride_mm + nj * stride_mn, mi_ok, nj_ok, True, EDGE)
        if MASK_KIND == 1:
            t = tl.where(mb != 0, t, float("-inf"))
        else:
            mb = mb.to(tl.float32)
            mb = tl.where(mb == float("-inf"), mb, tl.maximum(mb, _MASK_FLOOR))
            t = t + mb * _LOG2E
    if EDGE:
        ok = nj_ok
        if IS_CAUSAL:
            ok = ok & (nj <= mi)
        t = tl.where(ok, t, float("-inf"))
    return t


@triton.jit
def _k_tile(k_base, desc_k, kv_b, kv_h, start_n, offs_d, offs_n, col_ok, stride_kn, stride_kd,
            BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, EDGE: tl.constexpr,
            USE_TMA: tl.constexpr):
    """K^T tile [BLOCK_D, BLOCK_N] of the keys from start_n."""
    if USE_TMA:
        # The copy engine zero-fills keys past Lk and head-dim padding: no predicates.
        kt = tl.trans(desc_k.load([kv_b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D))
    else:
        kt = _load2d(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                     offs_d[:, None] < HEAD_D, col_ok[None, :], BLOCK_D != HEAD_D, EDGE)
    return kt


@triton.jit
def _v_tile(v_base, desc_v, kv_b, kv_h, start_n, offs_dv, offs_n, col_ok, stride_vn, stride_vd,
            BLOCK_N: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, EDGE: tl.constexpr,
            USE_TMA: tl.constexpr):
    """V tile [BLOCK_N, BLOCK_DV] of the keys from start_n."""
    if USE_TMA:
        v = desc_v.load([kv_b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
    else:
        v = _load2d(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    col_ok[:, None], offs_dv[None, :] < HEAD_DV, EDGE, BLOCK_DV != HEAD_DV)
    return v


@triton.jit
def _softmax_step(qk, m_i, l_i, s_i, mask_base, offs_m, offs_n, row_ok, col_ok, Lk, stride_mm, stride_mn,
                  scale_log2, EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                  ENTROPY: tl.constexpr, FOLD_SCALE: tl.constexpr):
    """One key block of the online softmax: (p, alpha, m, l, s) from the raw logits ``qk``, p
    relative to the new running max m, alpha the factor that moves the old state onto it."""
    if FOLD_SCALE and MASK_KIND == 0 and not EDGE:
        # Unmasked interior tiles, most of the work: with a positive scale, max(qk) * scale is
        # the scaled max, and scaling folds into one multiply-add with the max subtraction.
        # The softmax's per-element ops compete with the tensor cores for issue slots.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        t = qk * scale_log2 - m_use[:, None]
    else:
        t = _apply_mask(qk * scale_log2, mask_base, offs_m[:, None], offs_n[None, :], row_ok[:, None],
                        col_ok[None, :], Lk, stride_mm, stride_mn, EDGE, IS_CAUSAL, MASK_KIND)
        m_new = tl.maximum(m_i, tl.max(t, 1))
        # A row that has seen only -inf keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        t = t - m_use[:, None]
    # t: log2-domain logits relative to the running max.
    p = tl.exp2(t)
    alpha = tl.exp2(m_i - m_use)
    if ENTROPY:
        # s_i = sum p * (t - m): relative to the running max, so no cancellation against m.
        # Select before multiplying so 0 * -inf never forms a NaN at all.
        pd = p * tl.where(p > 0.0, t, 0.0)
        # After keys padded with finfo.min, m_i - m_use is ~ -1e38 and l_i * it overflows to
        # -inf, and -inf * (alpha = 0) is NaN. Their weight alpha is exactly 0 then: select it.
        carried = (s_i + l_i * tl.where(l_i > 0.0, m_i - m_use, 0.0)) * alpha
        s_i = tl.where(alpha > 0.0, carried, 0.0) + tl.sum(pd, 1)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i, s_i


@triton.jit
def _fwd_inner(acc, l_i, m_i, s_i, q, k_base, v_base, mask_base, lo, hi, offs_m, offs_d, offs_dv,
               Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale_log2,
               desc_k, desc_v, kv_b, kv_h,
               BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EDGE: tl.constexpr,
               IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, ENTROPY: tl.constexpr,
               COMPUTE_PV: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
               USE_TMA: tl.constexpr, FOLD_SCALE: tl.constexpr):
    row_ok = offs_m < Lq
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < Lk
        kt = _k_tile(k_base, desc_k, kv_b, kv_h, start_n, offs_d, offs_n, col_ok, stride_kn, stride_kd,
                     BLOCK_N, HEAD_D, BLOCK_D, EDGE, USE_TMA)
        qk = _dot(q, kt, DOT_F32, DOT_PRECISION)
        p, alpha, m_i, l_i, s_i = _softmax_step(qk, m_i, l_i, s_i, mask_base, offs_m, offs_n, row_ok, col_ok, Lk,
                                                stride_mm, stride_mn, scale_log2, EDGE, IS_CAUSAL, MASK_KIND,
                                                ENTROPY, FOLD_SCALE)
        if COMPUTE_PV:
            v = _v_tile(v_base, desc_v, kv_b, kv_h, start_n, offs_dv, offs_n, col_ok, stride_vn, stride_vd,
                        BLOCK_N, HEAD_DV, BLOCK_DV, EDGE, USE_TMA)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32, DOT_PRECISION)
    return acc, l_i, m_i, s_i


@triton.jit
def _fwd_inner_pv_behind(acc, l_i, m_i, s_i, q, k_base, v_base, mask_base, lo, hi, offs_m, offs_d, offs_dv,
                         Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale_log2,
                         desc_k, desc_v, kv_b, kv_h,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
                         HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, ENTROPY: tl.constexpr,
                         DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
                         FOLD_SCALE: tl.constexpr):
    """:func:`_fwd_inner` over interior blocks [lo, hi) (block-aligned, possibly empty) with P@V
    one block behind the softmax.

    In the plain loop the softmax waits for Q@K^T and P@V waits for the softmax, so the tensor
    cores idle through every exp2: the sm_90 SASS has the wgmma wait right after Q@K^T and no MMA
    in flight during the softmax. Here each step issues Q@K^T of block j, then P@V of block j - 1,
    and the softmax of block j runs while that P@V is still on the tensor cores; the accumulator
    is rescaled only after it lands (FlashAttention-3's intra-warpgroup overlap). Exact: the same
    sums, each block's P@V added one step later.

    No branch peels the first block: an ``if`` around the loop made ptxas serialise every wgmma
    in the kernel (C7515, sm_90a). The first step multiplies a zero P by block lo's values
    instead, and the last P@V reads its tile from Lk on (nothing: zeros) when the range is empty.
    """
    row_ok = offs_m < Lq
    # P in V's dtype, as the plain loop rounds it (DOT_F32 widens both operands at the dot)
    if USE_TMA:
        p_dtype = desc_v.dtype
    else:
        p_dtype = v_base.dtype.element_ty
    if p_dtype.primitive_bitwidth == 32:
        bits_dtype = tl.int32
    else:
        bits_dtype = tl.int16
    # Invariant at the top of each step: acc holds every block before the previous one, scaled
    # to the max before the previous block's alpha_prev; p_bits holds the previous block's
    # probabilities, relative to the current running max m_i.
    # P is carried as raw bits: triton puts a dot operand that is a loop-carried value (or a
    # load) in shared memory, which makes the dot wait at once; bits turned back into P by an
    # elementwise bitcast inside the loop stay in registers.
    p_bits = tl.zeros([BLOCK_M, BLOCK_N], dtype=bits_dtype)
    alpha_prev = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < Lk
        kt = _k_tile(k_base, desc_k, kv_b, kv_h, start_n, offs_d, offs_n, col_ok, stride_kn, stride_kd,
                     BLOCK_N, HEAD_D, BLOCK_D, False, USE_TMA)
        qk = _dot(q, kt, DOT_F32, DOT_PRECISION)
        # The rescale comes after Q@K^T's wait and the P@V result is only carried: that is what
        # lets triton leave this P@V in flight (no wgmma wait until the next step's Q@K^T).
        acc = acc * alpha_prev[:, None]
        prev = tl.maximum(start_n - BLOCK_N, lo)
        offs_p = prev + tl.arange(0, BLOCK_N)
        v = _v_tile(v_base, desc_v, kv_b, kv_h, prev, offs_dv, offs_p, offs_p < Lk, stride_vn, stride_vd,
                    BLOCK_N, HEAD_DV, BLOCK_DV, False, USE_TMA)
        acc = _dot_acc(p_bits.to(p_dtype, bitcast=True), v, acc, DOT_F32, DOT_PRECISION)
        p, alpha_prev, m_i, l_i, s_i = _softmax_step(qk, m_i, l_i, s_i, mask_base, offs_m, offs_n, row_ok, col_ok,
                                                     Lk, stride_mm, stride_mn, scale_log2, False, IS_CAUSAL,
                                                     MASK_KIND, ENTROPY, FOLD_SCALE)
        p_bits = p.to(p_dtype).to(bits_dtype, bitcast=True)
    acc = acc * alpha_prev[:, None]
    last = tl.where(hi > lo, hi - BLOCK_N, Lk)
    offs_p = last + tl.arange(0, BLOCK_N)
    v = _v_tile(v_base, desc_v, kv_b, kv_h, last, offs_dv, offs_p, offs_p < Lk, stride_vn, stride_vd,
                BLOCK_N, HEAD_DV, BLOCK_DV, True, USE_TMA)
    return _dot_acc(p_bits.to(p_dtype, bitcast=True), v, acc, DOT_F32, DOT_PRECISION), l_i, m_i, s_i


@triton.jit
def _attend(q, k_base, v_base, mask_base, lo, mid, hi, offs_m, offs_d, offs_dv,
            Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale_log2,
            desc_k, desc_v, kv_b, kv_h, USE_TMA: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
            ENTROPY: tl.constexpr, COMPUTE_PV: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
            FOLD_SCALE: tl.constexpr, PV_BEHIND: tl.constexpr = False):
    """(acc, l, m, s) of the online softmax over keys [lo, hi) from a fresh state: [lo, mid) are
    full blocks that need no edge or causal test, [mid, hi) the blocks that do. With USE_TMA,
    K/V tiles come through the [B, Hkv, Lk, D] descriptors at (kv_b, kv_h) instead of the bases.
    FOLD_SCALE (scale > 0 only) lets unmasked interior blocks scale inside the max subtraction;
    PV_BEHIND runs their P@V one block behind the softmax (:func:`_fwd_inner_pv_behind`)."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if PV_BEHIND and COMPUTE_PV:
        acc, l_i, m_i, s_i = _fwd_inner_pv_behind(
            acc, l_i, m_i, s_i, q, k_base, v_base, mask_base, lo, mid, offs_m, offs_d, offs_dv,
            Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale_log2,
            desc_k, desc_v, kv_b, kv_h, BLOCK_M, BLOCK_N, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, IS_CAUSAL,
            MASK_KIND, ENTROPY, DOT_F32, DOT_PRECISION, USE_TMA, FOLD_SCALE)
    else:
        acc, l_i, m_i, s_i = _fwd_inner(
            acc, l_i, m_i, s_i, q, k_base, v_base, mask_base, lo, mid, offs_m, offs_d, offs_dv,
            Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale_log2,
            desc_k, desc_v, kv_b, kv_h, BLOCK_N, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, False, IS_CAUSAL, MASK_KIND,
            ENTROPY, COMPUTE_PV, DOT_F32, DOT_PRECISION, USE_TMA, FOLD_SCALE)
    return _fwd_inner(
        acc, l_i, m_i, s_i, q, k_base, v_base, mask_base, mid, hi, offs_m, offs_d, offs_dv,
        Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale_log2,
        desc_k, desc_v, kv_b, kv_h, BLOCK_N, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, True, IS_CAUSAL, MASK_KIND,
        ENTROPY, COMPUTE_PV, DOT_F32, DOT_PRECISION, USE_TMA, FOLD_SCALE)


@triton.jit
def _store_row_stats(Ent, Lse, row_ptr, rows, l_ok, l_safe, m_i, s_i, ENTROPY: tl.constexpr,
                     STORE_LSE: tl.constexpr):
    """The epilogue's per-row entropy (nats) and log2 lse; rows with no visible key (or pruned)
    give entropy 0 and lse +inf."""
    if ENTROPY:
        ent = tl.where(l_ok, _LN2 * (tl.log2(l_safe) - s_i / l_safe), 0.0)
        tl.store(Ent + row_ptr, tl.maximum(ent, 0.0), mask=rows)
    if STORE_LSE:
        tl.store(Lse + row_ptr, tl.where(l_ok, m_i + tl.log2(l_safe), float("inf")), mask=rows)


@triton.jit
def _store_pruned_tile(Out, Ent, Lse, pair, offs_m, offs_dv, n_rows, Hq, Lq, stride_ob, stride_oh, stride_om,
                       stride_od, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                       COMPUTE_PV: tl.constexpr, ENTROPY: tl.constexpr, STORE_LSE: tl.constexpr):
    """A pruned pair's rows offs_m (those below n_rows): output 0, entropy 0, lse +inf. Pointer
    stores even in descriptor configs: a TMA store would stage the tile in shared memory."""
    rows = offs_m < n_rows
    if COMPUTE_PV:
        b = pair // Hq
        h = pair % Hq
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, tl.zeros([BLOCK_M, BLOCK_DV], dtype=Out.dtype.element_ty),
                 mask=rows[:, None] & (offs_dv[None, :] < HEAD_DV))
    if ENTROPY:
        tl.store(Ent + pair * Lq + offs_m, tl.zeros([BLOCK_M], dtype=tl.float32), mask=rows)
    if STORE_LSE:
        tl.store(Lse + pair * Lq + offs_m, tl.full([BLOCK_M], float("inf"), dtype=tl.float32), mask=rows)


@triton.autotune(
    configs=_fwd_configs(),
    key=["LQ_KEY", "LK_KEY", "HEAD_D", "HEAD_DV", "IS_CAUSAL", "MASK_KIND", "ENTROPY", "COMPUTE_PV", "TMA_MODE",
         "PV_MODE"],
    prune_configs_by={"early_config_prune": prune_fwd_configs},
)
# Autotune keys only: specialising them (== 1, % 16) would compile extra copies of the kernel.
@triton.jit(do_not_specialize=["LQ_KEY", "LK_KEY", "TMA_MODE", "PV_MODE"])
def _gated_attn_fwd(
    Q, K, V, Mask, Out, Ent, Lse, Pairs, NKept, DescQ, DescK, DescV, DescO,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, GROUP, Lq, Lk, scale_log2, keep_row_stride, LQ_KEY, LK_KEY, TMA_MODE, PV_MODE,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, ENTROPY: tl.constexpr, STORE_LSE: tl.constexpr,
    COMPUTE_PV: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, COMPACT: tl.constexpr,
    FOLD_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
    PV_BEHIND: tl.constexpr = False, ZERO_SHARE: tl.constexpr = 0,
):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        # Last query blocks see the most keys: schedule them first so the tail wave is short.
        pid_m = tl.num_programs(0) - 1 - pid_m
    slot = tl.program_id(1)
    if COMPACT:
        pair = tl.load(Pairs + slot).to(tl.int64)
        n_kept = tl.load(NKept)
        kept = slot < n_kept
        if BLOCK_M >= SHARE_MIN_BLOCK_M:
            # A pruned slot within ZERO_SHARE * n_kept of the kept run is stored by a kept program.
            stores_own = kept | (slot - n_kept >= ZERO_SHARE * n_kept)
        else:
            stores_own = True
    else:  # Pairs is the [B, Hq] keep mask itself, rows keep_row_stride apart (0: one shared row)
        pair = slot.to(tl.int64)
        kept = tl.load(Pairs + (pair // Hq) * keep_row_stride + pair % Hq) != 0
        stores_own = True
    # int64 base offsets: b * stride_b overflows int32 for large batches / full masks.
    b = pair // Hq
    h = pair % Hq
    hk = h // GROUP

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq

    if COMPACT and BLOCK_M >= SHARE_MIN_BLOCK_M:
        if kept:
            n_slots = tl.num_programs(1)
            for j in tl.static_range(ZERO_SHARE):
                z = n_kept * (j + 1) + slot
                z_pair = tl.load(Pairs + tl.minimum(z, n_slots - 1)).to(tl.int64)
                _store_pruned_tile(Out, Ent, Lse, z_pair, offs_m, offs_dv, tl.where(z < n_slots, Lq, 0), Hq, Lq,
                                   stride_ob, stride_oh, stride_om, stride_od, HEAD_DV, BLOCK_M, BLOCK_DV,
                                   COMPUTE_PV, ENTROPY, STORE_LSE)

    # Pruned slots read no Q.
    if USE_TMA:
        # Descriptor coordinates are int32; (b, h, hk) < 2**31 always.
        b32 = b.to(tl.int32)
        h32 = h.to(tl.int32)
        hk32 = hk.to(tl.int32)
        if kept:
            q = DescQ.load([b32, h32, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        else:
            q = tl.zeros([BLOCK_M, BLOCK_D], dtype=DescQ.dtype)
    else:
        b32 = b
        h32 = h
        hk32 = hk
        # A comparison against a masked length rather than `& kept`: the interpreter turns
        # bool & scalar-bool into int32, which tl.load rejects as a mask.
        q_rows = tl.where(kept, Lq, 0)
        q = _load2d(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    offs_m[:, None] < q_rows, offs_d[None, :] < HEAD_D, True, BLOCK_D != HEAD_D)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh

    if IS_CAUSAL:
        # Top-left aligned: row i sees keys j <= i. Blocks ending at or before the block's first
        # row need no causal test; blocks past its last row are skipped entirely.
        hi = tl.minimum(Lk, start_m + BLOCK_M)
        full_hi = tl.minimum(((start_m + 1) // BLOCK_N) * BLOCK_N, (Lk // BLOCK_N) * BLOCK_N)
    else:
        hi = Lk
        full_hi = (Lk // BLOCK_N) * BLOCK_N
    # Pruned slots run zero iterations and fall through to storing zeros.
    hi = tl.where(kept, hi, 0)
    full_hi = tl.where(kept, full_hi, 0)

    acc, l_i, m_i, s_i = _attend(
        q, k_base, v_base, mask_base, 0, full_hi, hi, offs_m, offs_d, offs_dv,
        Lq, Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale_log2,
        DescK, DescV, b32, hk32, USE_TMA,
        BLOCK_M, BLOCK_N, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, IS_CAUSAL, MASK_KIND, ENTROPY,
        COMPUTE_PV, DOT_F32, DOT_PRECISION, FOLD_SCALE, PV_BEHIND)

    if stores_own:
        l_ok = l_i > 0.0
        l_safe = tl.where(l_ok, l_i, 1.0)
        if COMPUTE_PV:
            out = acc / l_safe[:, None]
            if USE_TMA:
                # The copy engine clips rows past Lq and head-dim padding on the way out.
                DescO.store([b32, h32, start_m, 0], out.to(DescO.dtype).reshape(1, 1, BLOCK_M, BLOCK_DV))
            else:
                o_ptrs = (Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                          + offs_dv[None, :] * stride_od)
                if BLOCK_DV == HEAD_DV:
                    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
                else:
                    tl.store(o_ptrs, out.to(Out.dtype.element_ty),
                             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
        _store_row_stats(Ent, Lse, pair * Lq + offs_m, row_ok, l_ok, l_safe, m_i, s_i, ENTROPY, STORE_LSE)


# ----------------------------------------------------------------------------------------------
# host side


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (launch sizing asks per call: cached)."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def triton_available(device) -> bool:
    """True where the Triton path should serve the op: CUDA devices of compute capability >= 8.0
    (bf16 tl.dot). CPU tensors keep the PyTorch path even under TRITON_INTERPRET (tests call the
    kernels directly)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


# Pruned tiles whose zeros each kept program of the compacted grid stores ahead of its key loop,
# for the kept programs' compute to hide; run as programs of their own they came last and ran
# alone. At p = 0.25 on causal 8 x 32 x 2048 x 128 the zeros are 100 MB: about 24 us at the
# 4.2 TB/s copy rate measured on an H200 (session 7). Three covers every pruned tile down to a
# quarter of the heads kept. (Untimed: benchmarks/bench_attention.py prints the A/B.)
PRUNED_TILES_PER_KEPT = 3
# Short query tiles (decode-like launches) have too little compute to hide the stores behind, and
# the store code made the 16-row tile spill at D = 128 (sm_90, triton 3.6): they store their own.
# (The interpreter's one config has 16-row tiles: there the threshold drops so tests reach the path.)
_SHARE_MIN_BLOCK_M = 16 if _INTERPRET else 64
SHARE_MIN_BLOCK_M = tl.constexpr(_SHARE_MIN_BLOCK_M)


# Per (batch, head) pair: below this many query-key products the compacted grid's list costs more
# than it saves (H200 anchors: early exit ahead at 512 x 512, compaction at 2048 x 2048).
COMPACT_MIN_WORK = 1 << 20


# Kept-first index lists in one launch. The compacted grid and the head-skipping output
# projection walk lists of kept (batch, head) pairs or heads, kept ones first, built on the device
# so nothing syncs with the host. With torch ops that is a stable argsort of the negated flags
# plus a sum and dtype conversions: four to six small launches (radix-sort passes included) per
# call, which at short sequences or a decode step rival the kernel they feed. One program per row
# computes the same partition from a running prefix sum instead.
# Elements per chunk: one chunk covers a row of heads or the pairs of a modest batch.
_PARTITION_MAX_BLOCK = 1024


@triton.jit
def _stable_partition_kernel(Flags, Order, Count, N, stride_row, BLOCK: tl.constexpr):
    """Order[row] = indices i of Flags[row, :N] with flag != 0 in order, then those with 0 in
    order; Count[row] = how many are kept. Two passes over the row: the total decides where the
    pruned run starts."""
    row = tl.program_id(0).to(tl.int64)
    flags = Flags + row * stride_row
    total = 0
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        total += tl.sum((tl.load(flags + offs, mask=offs < N, other=0) != 0).to(tl.int32), 0)
    kept_before = 0
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < N
        f = (tl.load(flags + offs, mask=ok, other=0) != 0).to(tl.int32)
        kept_upto = kept_before + tl.cumsum(f, 0)  # kept flags at or before each index
        pos = tl.where(f != 0, kept_upto - 1, total + offs - kept_upto)
        tl.store(Order + row * N + pos, offs.to(tl.int32), mask=ok)
        kept_before += tl.sum(f, 0)
    tl.store(Count + row, total)


def mask_bytes(flags: torch.Tensor) -> torch.Tensor:
    """Flags as uint8 with a unit innermost stride, for kernels to read through their strides:
    a bool mask is viewed as its own bytes (no conversion kernel per call), and a batch-shared
    gate's stride-0 [B, H] expand stays a view."""
    flags = (flags if flags.dtype == torch.bool else flags != 0).view(torch.uint8)
    return flags if flags.stride(-1) == 1 else flags.contiguous()


def stable_partition(flags: torch.Tensor):
    """(order, count) for a bool or integer [..., N] tensor on a CUDA device (or on the CPU under
    the Triton interpreter): per row, int32 indices of the nonzero entries first and the zero ones
    after, both in index order, and the int32 number of nonzero entries (shape ``flags.shape[:-1]``).
    Equal to ``argsort(flags == 0, stable=True)`` and ``(flags != 0).sum(-1)`` in one launch."""
    if flags.dim() == 0:
        raise ValueError("stable_partition: flags must have at least one dimension")
    lead, n = flags.shape[:-1], flags.shape[-1]
    rows = mask_bytes(flags.reshape(math.prod(lead), n))
    order = torch.empty(rows.shape, device=flags.device, dtype=torch.int32)
    count = torch.empty(rows.shape[0], device=flags.device, dtype=torch.int32)
    if rows.shape[0] and n:
        block = 16 if _INTERPRET else min(_PARTITION_MAX_BLOCK, max(16, next_pow2(n)))
        _stable_partition_kernel[(rows.shape[0],)](rows, order, count, n, rows.stride(0), BLOCK=block,
                                                   num_warps=4 if block <= 256 else 8)
    elif rows.shape[0]:
        count.zero_()
    return order.view(*lead, n), count.view(lead)


def kept_pairs(keep: torch.Tensor):
    """(pairs sorted kept-first as int32 [B*Hq], n_kept as int32 0-d), both on keep's device, in
    one launch (:func:`stable_partition`)."""
    return stable_partition(keep.reshape(-1))


def mask_operand(attn_mask, B, Hq, Lq, Lk, like: torch.Tensor):
    """(kind, tensor, strides): broadcast dims get stride 0 through expand(), nothing is copied."""
    if attn_mask is None:
        return MASK_NONE, like, (0, 0, 0, 0)
    m = attn_mask.expand(B, Hq, Lq, Lk)
    if m.dtype == torch.bool:
        return MASK_BOOL, m.view(torch.uint8), m.stride()
    return MASK_ADD, m, m.stride()


def dot_flags(dtype: torch.dtype):
    """(DOT_F32, DOT_PRECISION): fp32 inputs use exact fp32 dots (SDPA parity, not tf32);
    bf16 is upcast under the interpreter, whose bf16 tl.dot is wrong."""
    return _INTERPRET and dtype == torch.bfloat16, "ieee" if dtype == torch.float32 else "tf32"


def _descriptor_strides(t: torch.Tensor, ordered: bool = False):
    """t's strides as a TMA descriptor accepts them, or None: unit innermost stride, 16-byte
    aligned base and outer strides (``ordered``: also non-increasing inwards, i.e. [B, H, L, D]
    storage). A size-1 dim is only ever read at index 0, so its stride is free: it gets the span
    of the dims inside it, rounded up to 16 bytes."""
    size = t.element_size()
    if t.dim() != 4 or t.data_ptr() % 16 or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return None
    strides = [1] * 4
    for i in (2, 1, 0):
        if t.shape[i] == 1:
            span = max((n - 1) * st for n, st in zip(t.shape[i + 1:], strides[i + 1:])) + 1
            strides[i] = -(-span * size // 16) * 16 // size
        elif (t.stride(i) * size) % 16:
            return None
        else:
            strides[i] = t.stride(i)
    if ordered and any(a < b for a, b in zip(strides, strides[1:])):
        return None
    return strides


def tma_descriptors(*tensors, ordered: bool = False):
    """One [B, H, L, D] TMA descriptor per tensor (block shapes set per config at launch), or None
    when triton has no descriptors or a tensor's layout or dtype does not suit the copy engine."""
    if TensorDescriptor is None:
        return None
    descs = []
    for t in tensors:
        ok = t.dtype in (torch.float16, torch.bfloat16, torch.float32) and min(t.shape) > 0
        strides = _descriptor_strides(t, ordered) if ok else None
        if strides is None:
            return None
        descs.append(TensorDescriptor(t, list(t.shape), strides, [1, 1, 16, 16]))
    return descs


def _uses_tma_by_default(device, Lq: int) -> bool:
    # Hopper and later have the copy engine; decode-length queries repay no descriptor setup.
    # DHP_FX_TRITON_TMA=0 keeps tma=None calls on pointer loads (read per call: a switch for a
    # card or driver where the descriptor path misbehaves, without touching code).
    if os.environ.get("DHP_FX_TRITON_TMA", "1") == "0":
        return False
    return (Lq >= 64 and torch.device(device).type == "cuda"
            and torch.cuda.get_device_capability(device) >= (9, 0))


def head_blocks(D: int, Dv: int):
    # tl.arange needs powers of two and tl.dot needs >= 16: head dims 80/96 pad to 128 with masks.
    return max(16, next_pow2(D)), max(16, next_pow2(Dv))


def _checked_head_map(kv_heads, kv_group, Hq: int, Hkv: int, Lq: int, device) -> torch.Tensor:
    """kv_heads as the decode kernels read it (int32, contiguous), after checking what can be
    checked without reading device memory; its values too where it lives on the host."""
    from .triton_decode import MAX_DECODE_LQ  # lazy: it imports this module

    if Lq > MAX_DECODE_LQ:
        raise ValueError(f"kv_heads: the head map serves decode (Lq <= {MAX_DECODE_LQ}), got Lq = {Lq}")
    if kv_heads.shape != (Hq,) or kv_heads.dtype not in (torch.int32, torch.int64) or kv_heads.device != device:
        raise ValueError(f"kv_heads must be an int32/int64 [{Hq}] tensor on {device}, "
                         f"got {kv_heads.dtype} {tuple(kv_heads.shape)} on {kv_heads.device}")
    if isinstance(kv_group, bool) or not isinstance(kv_group, int) or kv_group < 1:
        raise ValueError(f"kv_heads needs kv_group, a positive int, got {kv_group!r}")
    if kv_heads.device.type == "cpu" and Hq:
        if int(kv_heads.min()) < 0 or int(kv_heads.max()) >= Hkv:
            raise ValueError(f"kv_heads must name kv heads in [0, {Hkv}), got {kv_heads.tolist()}")
        most = int(torch.bincount(kv_heads, minlength=Hkv).max())
        if most > kv_group:
            raise ValueError(f"kv_heads names one kv head {most} times, more than kv_group = {kv_group}")
    return kv_heads.to(torch.int32).contiguous()


def triton_gated_attention(q, k, v, keep, attn_mask=None, is_causal=False, scale=None,
                           return_entropy=False, *, return_lse=False, out=None, compute_out=True,
                           pairs=None, entropy_rows=False, num_splits=None, tma=None, pv_behind=None,
                           kv_heads=None, kv_group=None):
    """Gated attention on the Triton kernel. Returns ``out``, or a tuple ``(out, [entropy], [lse])``
    when ``return_entropy`` / ``return_lse`` ask for them.

    entropy: float32 [B, Hq], mean over all Lq query rows of each row's attention entropy in
    nats (masked keys excluded; fully masked rows and pruned heads count as 0).
    ``entropy_rows=True`` returns the per-row entropies [B, Hq, Lq] instead, for callers that
    weight or normalise rows themselves. lse: float32 [B, Hq, Lq] in log2 units (+inf for fully
    masked rows), as the backward wants it. ``out`` may be a preallocated [B, Hq, Lq, Dv] tensor
    of any strides; every element is written. Without it the output is laid out as q is
    (:func:`layout.attention_output`). ``compute_out=False`` skips P@V (lse/entropy
    only; the output slot is then None). ``pairs`` reuses a (pairs, n_kept) from
    :func:`kept_pairs` and selects the compacted grid; without it, shapes under
    ``COMPACT_MIN_WORK`` use the early-exit grid. ``keep`` must be on q's device. Decode shapes
    (Lq <= 16) with too few (batch, head) pairs to fill the GPU split the keys across programs
    (``triton_decode``);
    ``num_splits`` forces that path with that many splits. ``tma`` picks how the prefill kernel
    loads Q/K/V and stores O: None lets the autotuner also try TMA descriptor configs on Hopper
    (sm_90+) for query lengths of 64+ when q, k, v and out have [B, H, L, D] storage, True requires
    them for any layout with 16-byte aligned strides (ValueError otherwise), False keeps pointer loads.
    ``pv_behind`` picks the prefill kernel's inner loop the same way: None lets the autotuner
    also try the loop with P@V one key block behind the softmax (overlapping the tensor cores
    with the exp2s on Hopper), True runs only that loop, False only the plain one.
    ``kv_heads`` (int [Hq], on q's device) names each query head's KV head, for a q that holds
    some heads only (a query chain's kept heads over every head's cached K/V): K/V are read in
    place instead of gathered per step. Decode shapes only (Lq <= 16); ``kv_group`` bounds how
    many query heads name one KV head (at most the model's query heads per KV head).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if keep.shape != (B, Hq) or keep.dtype != torch.bool:
        raise ValueError(f"keep must be bool [{B}, {Hq}], got {keep.dtype} {tuple(keep.shape)}")
    if kv_heads is not None:
        kv_heads = _checked_head_map(kv_heads, kv_group, Hq, Hkv, Lq, q.device)
    elif Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) not a multiple of kv heads ({Hkv})")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if compute_out and out is None:
        out = attention_output(q, Dv)
    o_arg = out if compute_out else q
    o_strides = out.stride() if compute_out else (0, 0, 0, 0)
    ent_rows = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32) if return_entropy else None
    lse = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32) if return_lse else None
    kind, mask_t, mstr = mask_operand(attn_mask, B, Hq, Lq, Lk, q)
    dot_f32, precision = dot_flags(q.dtype)
    block_d, block_dv = head_blocks(D, Dv)

    from .triton_decode import decode_splits, gated_decode_forward  # lazy: it imports this module

    group = None if kv_heads is None else kv_group
    splits = decode_splits(B, Hq, Lq, Lk, is_causal, q.device, num_splits, Hkv=Hkv, group=group)
    if splits is None and kv_heads is not None:
        splits = 1  # the head map lives in the decode kernels only
    if splits is not None:
        gated_decode_forward(q, k, v, (kind, mask_t, mstr), out if compute_out else None, ent_rows, lse,
                             keep, is_causal, scale, splits, kv_heads=kv_heads, group=group)
    elif B * Hq > 0 and Lq > 0:
        descs, tma_mode = None, TMA_OFF
        if tma or (tma is None and _uses_tma_by_default(q.device, Lq)):
            # Without an output the O descriptor is never stored through: any tensor serves.
            # By default only [B, H, L, D] storage: a descriptor over HF's [B, L, H, D] views
            # (strides not ordered) is exercised by tma=True until measured on a card.
            descs = tma_descriptors(q, k, v, out if compute_out else q, ordered=not tma)
            if descs is None and tma and min(k.shape[2], v.shape[2]) > 0:
                raise ValueError("tma=True: q, k, v and out need a unit innermost stride, 16-byte aligned base "
                                 "and outer strides, and a float16/bfloat16/float32 dtype")
            tma_mode = TMA_OFF if descs is None else TMA_ONLY if tma else TMA_AUTO
        pv_mode = PV_AUTO if pv_behind is None else PV_ONLY if pv_behind else PV_OFF
        compact = pairs is not None or Lq * Lk >= COMPACT_MIN_WORK
        if compact:
            pair_idx, n_kept = kept_pairs(keep) if pairs is None else pairs
        else:
            pair_idx = n_kept = mask_bytes(keep)
        grid = lambda meta: (cdiv(Lq, meta["BLOCK_M"]), B * Hq)
        _gated_attn_fwd[grid](
            q, k, v, mask_t, o_arg, ent_rows if ent_rows is not None else q, lse if lse is not None else q,
            pair_idx, n_kept, *(descs or (q, k, v, o_arg)),
            *q.stride(), *k.stride(), *v.stride(), *mstr, *o_strides,
            Hq, Hq // Hkv, Lq, Lk, scale * 1.4426950408889634, 0 if compact else pair_idx.stride(0),
            _bucket(Lq), _bucket(Lk), tma_mode, pv_mode,
            HEAD_D=D, HEAD_DV=Dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
            IS_CAUSAL=bool(is_causal), MASK_KIND=kind, ENTROPY=bool(return_entropy),
            STORE_LSE=bool(return_lse), COMPUTE_PV=bool(compute_out),
            DOT_F32=dot_f32, DOT_PRECISION=precision, COMPACT=compact, FOLD_SCALE=scale > 0,
            ZERO_SHARE=PRUNED_TILES_PER_KEPT if compact else 0,
            **({"USE_TMA": tma_mode == TMA_ONLY, "PV_BEHIND": pv_mode == PV_ONLY} if _INTERPRET else {}),
        )
    extras = []
    if return_entropy:
        extras.append(ent_rows if entropy_rows else ent_rows.mean(-1) if Lq > 0 else ent_rows.sum(-1))
    if return_lse:
        extras.append(lse)
    result = out if compute_out else None
    return (result, *extras) if extras else result


from .triton_attention_bwd import (  # noqa: E402  (the backward reuses the helpers above)
    TritonGatedAttention,
    triton_gated_attention_backward,
    triton_gated_attention_autograd,
)

__all__ = [
    "triton_available",
    "triton_gated_attention",
    "triton_gated_attention_backward",
    "triton_gated_attention_autograd",
    "TritonGatedAttention",
    "kept_pairs",
    "stable_partition",
]
