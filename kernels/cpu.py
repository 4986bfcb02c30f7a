"""Gated attention that spends work only on kept heads, built from PyTorch's own SDPA kernels.

Three strategies, chosen per call from ``keep`` (a host sync is cheap on CPU):

* every head kept: one SDPA call, GQA handled natively by ``enable_gqa``;
* few contiguous runs of kept heads (typically one keep pattern shared by the whole batch):
  one SDPA call per run on strided *views* of q/k/v/mask, so nothing is copied in;
* anything else: gather the kept (batch, head) pairs into one batch and make a single SDPA
  call. One large call beats many small ones here: each call is an OpenMP parallel region,
  and on a small, shared CPU every region pays a synchronisation (or a whole scheduler
  quantum when another process holds a core).

Dropout does not go through SDPA: its internal RNG use depends on which backend SDPA picks,
which can differ between the forward and the recompute in backward. An explicit softmax with
a dropout mask drawn from a generator seeded per call replays exactly.
"""
from __future__ import annotations

import hashlib
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

# Above this many SDPA calls the gather strategy wins (measured on a 2-core CPU; see
# benchmarks/bench_cpu_attention.py): the copies it adds are O(L*D) per head against
# O(L*L*D) of attention work, while each extra call costs a parallel-region round trip.
MAX_VIEW_CALLS = 4

Piece = Tuple[int, int, int, int]  # q heads [h0, h1) read kv heads [kv0, kv1)


def _pieces(row: List[bool], group: int) -> Tuple[Piece, ...]:
    """Runs of kept heads, split so each piece maps onto whole kv groups or onto one kv head."""
    out: List[Piece] = []
    h, H = 0, len(row)
    while h < H:
        if not row[h]:
            h += 1
            continue
        start = h
        while h < H and row[h]:
            h += 1
        cur = start
        while cur < h:
            end = min((cur // group + 1) * group, h)
            full = end - cur == group
            prev = out[-1] if out else None
            if full and prev is not None and prev[1] == cur and prev[1] - prev[0] == group * (prev[3] - prev[2]):
                out[-1] = (prev[0], end, prev[2], end // group)
            else:
                out.append((cur, end, cur // group, cur // group + 1))
            cur = end
    return tuple(out)


def _mask4(attn_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if attn_mask is None:
        return None
    return attn_mask[(None,) * (4 - attn_mask.dim())]


def _slice_mask(m4: Optional[torch.Tensor], b0: int, b1: int, h0: int, h1: int):
    """View of the mask for batch rows [b0, b1) and heads [h0, h1); broadcast dims stay size 1."""
    if m4 is None:
        return None
    if m4.shape[0] > 1:
        m4 = m4[b0:b1]
    if m4.shape[1] > 1:
        m4 = m4[:, h0:h1]
    return m4


def _fold_causal(mask: torch.Tensor, Lq: int, Lk: int) -> torch.Tensor:
    above = torch.ones(Lq, Lk, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return mask & ~above
    return mask.masked_fill(above, float("-inf"))


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _attention_dropout(q, k, v, mask, dropout_p, is_causal, scale, seed):
    """softmax(q k^T * scale + mask) with dropout, like SDPA's math backend.

    q [N, 1, Lq, D], k/v [N, 1, Lk, *], mask broadcastable to [N, 1, Lq, Lk].
    """
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * _scale(q, scale)
    Lq, Lk = scores.shape[-2:]
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros((), dtype=compute, device=q.device).masked_fill(~mask, float("-inf"))
        scores = scores + mask.to(compute)
    if is_causal:
        above = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    # _safe_softmax: a fully masked row gives zeros, as every SDPA backend does.
    probs = torch._safe_softmax(scores, -1)
    gen = torch.Generator(device=q.device)
    gen.manual_seed(seed)
    drop = torch.rand(probs.shape, generator=gen, device=q.device, dtype=compute) >= dropout_p
    probs = probs * drop / (1.0 - dropout_p)
    return torch.matmul(probs, vc).to(q.dtype)


def dropout_seed_from_state(state: torch.Tensor) -> int:
    """The per-call dropout seed, a pure function of the CPU generator state after the call.

    Forward and backward cannot share a value through the op's fixed schema; the RNG state
    left behind by the forward is the one thing ``setup_context`` can still observe.
    """
    digest = hashlib.blake2b(state.numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def new_dropout_seed() -> int:
    # Advance the global generator first so consecutive calls draw different masks.
    torch.empty((), dtype=torch.int64).random_()
    return dropout_seed_from_state(torch.get_rng_state())


def gated_attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    seed: Optional[int] = None,
    mask_grad: bool = False,
) -> torch.Tensor:
    """Contiguous [B, Hq, Lq, Dv] output; pruned heads are exact zeros and cost nothing.

    ``seed`` is required when ``dropout_p > 0`` (see :func:`new_dropout_seed`). ``mask_grad``
    marks a recompute under ``torch.func.vjp`` that differentiates the mask: it avoids in-place
    writes, which function transforms reject.
    """
    B, Hq, Lq, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    group = Hq // Hkv
    rows = keep.tolist()
    n_kept = sum(map(sum, rows))
    if n_kept == 0:
        return q.new_zeros(B, Hq, Lq, Dv)
    use_dropout = dropout_p > 0.0
    if use_dropout and seed is None:
        raise ValueError("gated_attention_cpu: dropout_p > 0 needs a seed")

    # The flash kernel wants unit stride along the head dim; anything else falls to the slow
    # math backend, and one copy (even of pruned heads) is cheaper than that.
    q, k, v = (x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous() for x in (q, k, v))
    attn_mask = _mask4(attn_mask)  # SDPA rejects 1-D masks that do broadcast
    if attn_mask is not None and is_causal and not use_dropout and (
        v.shape[-1] != q.shape[-1] or mask_grad or attn_mask.requires_grad
    ):
        # These send SDPA to its math backend, which refuses a mask together with is_causal;
        # folding causality into the mask keeps the op total.
        attn_mask, is_causal = _fold_causal(attn_mask, Lq, k.shape[2]), False

    if n_kept == B * Hq and not use_dropout:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=group > 1
        )
        return out.contiguous()

    m4 = attn_mask
    if not use_dropout and not mask_grad:
        # Consecutive batch rows with the same pattern share one call per piece.
        calls: List[Tuple[int, int, Piece]] = []
        b = 0
        while b < B and len(calls) <= MAX_VIEW_CALLS:
            b_end = b + 1
            while b_end < B and rows[b_end] == rows[b]:
                b_end += 1
            calls.extend((b, b_end, p) for p in _pieces(rows[b], group))
            b = b_end
        if len(calls) <= MAX_VIEW_CALLS:
            out = q.new_zeros(B, Hq, Lq, Dv)
            for b0, b1, (h0, h1, kv0, kv1) in calls:
                out[b0:b1, h0:h1] = F.scaled_dot_product_attention(
                    q[b0:b1, h0:h1], k[b0:b1, kv0:kv1], v[b0:b1, kv0:kv1],
                    attn_mask=_slice_mask(m4, b0, b1, h0, h1),
                    is_causal=is_causal, scale=scale, enable_gqa=h1 - h0 != kv1 - kv0,
                )
            return out

    # Gather: kept (b, h) pairs become the batch dim of one call, laid out [N, 1, L, D] so the
    # flash kernel's output is already contiguous for the scatter back.
    flat = keep.reshape(-1).nonzero().squeeze(1)
    bi = torch.div(flat, Hq, rounding_mode="floor")
    hi = flat - bi * Hq
    kvi = torch.div(hi, group, rounding_mode="floor")
    qg = q[bi, hi].unsqueeze(1)
    kg = k[bi, kvi].unsqueeze(1)
    vg = v[bi, kvi].unsqueeze(1)
    mg = None
    if m4 is not None:
        if m4.shape[0] == 1 and m4.shape[1] == 1:
            mg = m4[0, 0]  # shared by every head: broadcast, never copied
        else:
            mb = bi if m4.shape[0] > 1 else torch.zeros_like(bi)
            mh = hi if m4.shape[1] > 1 else torch.zeros_like(hi)
            mg = m4[mb, mh].unsqueeze(1)
    if use_dropout:
        og = _attention_dropout(qg, kg, vg, mg, dropout_p, is_causal, scale, seed)
    else:
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mg, is_causal=is_causal, scale=scale)
    out = q.new_zeros(B * Hq, Lq, Dv)
    out = out.index_copy(0, flat, og.squeeze(1).to(out.dtype))
    return out.view(B, Hq, Lq, Dv)


def gated_attention_backward_cpu(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: Optional[float],
    seed: Optional[int],
    mask_grad: bool,
) -> List[torch.Tensor]:
    """[dq, dk, dv] (+ dmask when ``mask_grad``) by recomputing through kept heads only.

    Uses ``torch.func.vjp`` rather than ``torch.autograd.grad``: this runs inside a custom op's
    kernel, where the autograd dispatch keys are excluded and a plain autograd graph is not
    recorded even under ``enable_grad``.
    """
    primals = [q.detach(), k.detach(), v.detach()]
    if mask_grad:
        primals.append(attn_mask.detach())
    if not bool(keep.any()):
        return [torch.zeros_like(x).contiguous() for x in primals]

    def fwd(q_, k_, v_, *m):
        mask = m[0] if mask_grad else attn_mask
        return gated_attention_cpu(q_, k_, v_, keep, mask, dropout_p, is_causal, scale, seed, True)

    _, vjp_fn = torch.func.vjp(fwd, *primals)
    return [g.contiguous() for g in vjp_fn(grad_out.to(q.dtype))]
