"""Gated attention that spends work only on kept heads, built from PyTorch's own SDPA kernels.

Forward strategies, chosen per call from ``keep`` (reading it on the host is cheap on CPU):

* every head kept: one SDPA call, GQA handled natively by ``enable_gqa``;
* few contiguous runs of kept heads (typically one keep pattern shared by the whole batch):
  one SDPA call per run on strided *views* of q/k/v/mask, so nothing is copied in;
* anything else: gather the kept (batch, head) pairs into one batch and make a single SDPA
  call. One large call beats many small ones: each call is an OpenMP parallel region, and on
  a small, shared CPU every region pays a barrier (or a whole scheduler quantum when another
  process holds a core).

Dropout and the backward use explicit math on the gathered heads instead of SDPA. Dropout:
SDPA's RNG use depends on the backend it picks, so its mask could not be replayed; here the
mask comes from a generator seeded per call. Backward: it runs inside a custom op's kernel,
where autograd is switched off, so the gradients are written out rather than recorded.
"""
from __future__ import annotations

import hashlib
import math
import threading
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

# Above this many SDPA calls the gather strategy wins (2-core CPU; see
# benchmarks/bench_cpu_attention.py): its copies are O(L*D) per head against O(L*L*D) of
# attention work, while each extra call costs a parallel-region round trip.
MAX_VIEW_CALLS = 4
# Explicit-math paths materialise [heads, Lq, Lk] scores; chunk over heads to bound memory.
CHUNK_ELEMS = 1 << 24

Piece = Tuple[int, int, int, int]  # q heads [h0, h1) read kv heads [kv0, kv1)


def _pieces(row: List[bool], group: int) -> List[Piece]:
    """Runs of kept heads, split so each piece covers whole kv groups or lies inside one."""
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
            prev = out[-1] if out else None
            if (end - cur == group and prev is not None and prev[1] == cur
                    and prev[1] - prev[0] == group * (prev[3] - prev[2])):
                out[-1] = (prev[0], end, prev[2], end // group)
            else:
                out.append((cur, end, cur // group, cur // group + 1))
            cur = end
    return out


def _slice_mask(m4: Optional[torch.Tensor], b0: int, b1: int, h0: int, h1: int):
    """View of the mask for batch rows [b0, b1) and heads [h0, h1); broadcast dims stay size 1."""
    if m4 is None:
        return None
    if m4.shape[0] > 1:
        m4 = m4[b0:b1]
    if m4.shape[1] > 1:
        m4 = m4[:, h0:h1]
    return m4


_local = threading.local()
WORKSPACE_MAX_BYTES = 64 << 20


def _workspace(numel: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    if like.device.type != "cpu" or numel * like.element_size() > WORKSPACE_MAX_BYTES:
        return None
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get(like.dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[like.dtype] = torch.empty(numel, dtype=like.dtype)
    return buf[:numel]


def _gather(q, k, v, keep, m4, use_workspace=False):
    """Kept (b, h) pairs as the batch dim of [N, 1, L, E] tensors, plus the index tensors."""
    Hq, Hkv = q.shape[1], k.shape[1]
    flat = keep.reshape(-1).nonzero().squeeze(1)
    bi = torch.div(flat, Hq, rounding_mode="floor")
    hi = flat - bi * Hq
    kvi = torch.div(hi, Hq // Hkv, rounding_mode="floor")
    mg = mask_rows = None
    if m4 is not None:
        if m4.shape[0] == 1 and m4.shape[1] == 1:
            mg = m4[0, 0]  # shared by every head: broadcast, never copied
        else:
            ib = bi if m4.shape[0] > 1 else torch.zeros_like(bi)
            ih = hi if m4.shape[1] > 1 else torch.zeros_like(hi)
            mg = m4[ib, ih].unsqueeze(1)  # copies only the kept heads' rows
            mask_rows = ib * m4.shape[1] + ih
    N = flat.numel()
    sizes = [N * t.shape[2] * t.shape[3] for t in (q, k, v)]
    ws = _workspace(sum(sizes), q) if use_workspace else None
    outs, off = [], 0
    for t, i, n in zip((q, k, v), (hi, kvi, kvi), sizes):
        if ws is None:
            outs.append(t[bi, i].unsqueeze(1))
        else:
            buf = ws[off:off + n].view(N, t.shape[2], t.shape[3])
            outs.append(torch.ops.aten.index.Tensor_out(t, [bi, i], out=buf).unsqueeze(1))
        off += n
    return (flat, bi * Hkv + kvi, *outs, mg, mask_rows)


def _chunks(N: int, Lq: int, Lk: int):
    step = max(1, CHUNK_ELEMS // max(1, Lq * Lk))
    return [(s, min(N, s + step)) for s in range(0, N, step)]


def _sl(t: Optional[torch.Tensor], s: int, e: int):
    return t if t is None or t.dim() < 3 else t[s:e]


def _probs(qg, kg, mg, is_causal: bool, scale: float, compute: torch.dtype) -> torch.Tensor:
    """softmax(q k^T * scale + mask) in ``compute`` precision; fully masked rows give zeros."""
    s = torch.matmul(qg.to(compute), kg.to(compute).transpose(-1, -2)) * scale
    if mg is not None:
        if mg.dtype == torch.bool:
            s = s.masked_fill(~mg, float("-inf"))
        else:
            s = s + mg.to(compute)
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch._safe_softmax(s, -1)  # zeros for all -inf rows, as every SDPA backend gives


def _dropout_mult(seed: int, chunk: int, like: torch.Tensor, p: float) -> torch.Tensor:
    gen = torch.Generator(device=like.device)
    gen.manual_seed((seed + chunk * 0x9E3779B97F4A7C15) % (1 << 63))
    keep = torch.rand(like.shape, generator=gen, device=like.device, dtype=like.dtype) >= p
    return keep.to(like.dtype) / (1.0 - p)


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


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _prepare(q, k, v, attn_mask):
    # The flash kernel wants unit stride along the head dim; anything else falls to the slow
    # math backend, and one copy (even of pruned heads) is cheaper than that.
    q, k, v = (x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous() for x in (q, k, v))
    if attn_mask is not None:
        attn_mask = attn_mask[(None,) * (4 - attn_mask.dim())]  # SDPA rejects 1-D masks
    return q, k, v, attn_mask


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
) -> torch.Tensor:
    """Contiguous [B, Hq, Lq, Dv] output; pruned heads are exact zeros and cost nothing.

    ``seed`` (see :func:`new_dropout_seed`) is required when ``dropout_p > 0``.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    group = Hq // Hkv
    rows = keep.tolist()
    n_kept = sum(map(sum, rows))
    if n_kept == 0:
        return q.new_zeros(B, Hq, Lq, Dv)
    q, k, v, m4 = _prepare(q, k, v, attn_mask)

    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("gated_attention_cpu: dropout_p > 0 needs a seed")
        flat, _, qg, kg, vg, mg, _ = _gather(q, k, v, keep, m4)
        compute, sc = _compute_dtype(q), D ** -0.5 if scale is None else scale
        outs = []
        for i, (s, e) in enumerate(_chunks(len(flat), Lq, Lk)):
            p = _probs(qg[s:e], kg[s:e], _sl(mg, s, e), is_causal, sc, compute)
            outs.append(torch.matmul(p * _dropout_mult(seed, i, p, dropout_p), vg[s:e].to(compute)))
        og = torch.cat(outs)
    else:
        if m4 is not None and is_causal and (Dv != D or m4.requires_grad):
            # These send SDPA to its math backend, which refuses a mask together with
            # is_causal; folding causality into the mask keeps the op total.
            above = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).triu(1)
            m4 = m4 & ~above if m4.dtype == torch.bool else m4.masked_fill(above, float("-inf"))
            is_causal = False
        if n_kept == B * Hq:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=m4, is_causal=is_causal, scale=scale, enable_gqa=group > 1
            )
            return out.contiguous()
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
        # [N, 1, L, E] rather than [1, N, L, E]: the flash kernel then returns a contiguous
        # result, so the scatter below reads it linearly.
        flat, _, qg, kg, vg, mg, _ = _gather(q, k, v, keep, m4, use_workspace=True)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mg, is_causal=is_causal, scale=scale)
    out = q.new_zeros(B * Hq, Lq, Dv)
    out.index_copy_(0, flat, og.squeeze(1).to(out.dtype))
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
    """[dq, dk, dv] (+ dmask when ``mask_grad``), contiguous; only kept heads do any work."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    compute = _compute_dtype(q)
    sc = D ** -0.5 if scale is None else scale
    q, k, v, m4 = _prepare(q, k, v, attn_mask)
    flat, kv_flat, qg, kg, vg, mg, mask_rows = _gather(q, k, v, keep, m4)
    go = grad_out.reshape(B * Hq, Lq, Dv)[flat].unsqueeze(1).to(compute)
    zeros = lambda *shape: torch.zeros(shape, dtype=compute, device=q.device)  # noqa: E731
    dq, dk, dv = zeros(B * Hq, Lq, D), zeros(B * Hkv, Lk, D), zeros(B * Hkv, Lk, Dv)
    dm = None
    if mask_grad:
        mb, mh, mq, mk = m4.shape
        dm = zeros(mb * mh, mq, mk)
    for i, (s, e) in enumerate(_chunks(len(flat), Lq, Lk)):
        qc, kc, vc, gc = qg[s:e].to(compute), kg[s:e].to(compute), vg[s:e].to(compute), go[s:e]
        p = _probs(qc, kc, _sl(mg, s, e), is_causal, sc, compute)
        mult = _dropout_mult(seed, i, p, dropout_p) if dropout_p > 0.0 else None
        pd = p if mult is None else p * mult
        dv.index_add_(0, kv_flat[s:e], torch.matmul(pd.transpose(-1, -2), gc).squeeze(1))
        dp = torch.matmul(gc, vc.transpose(-1, -2))
        if mult is not None:
            dp = dp * mult
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))  # softmax backward; masked entries stay 0
        dq.index_copy_(0, flat[s:e], torch.matmul(ds, kc).squeeze(1) * sc)
        dk.index_add_(0, kv_flat[s:e], torch.matmul(ds.transpose(-1, -2), qc).squeeze(1) * sc)
        if dm is not None:
            ds = ds.sum(-2, keepdim=True) if mq == 1 else ds
            ds = ds.sum(-1, keepdim=True) if mk == 1 else ds
            if mask_rows is None:
                dm[0] += ds.sum(0)[0]
            else:
                dm.index_add_(0, mask_rows[s:e], ds.squeeze(1))
    grads = [dq.view(B, Hq, Lq, D).to(q.dtype), dk.view(B, Hkv, Lk, D).to(k.dtype),
             dv.view(B, Hkv, Lk, Dv).to(v.dtype)]
    if dm is not None:
        grads.append(dm.reshape(attn_mask.shape).to(attn_mask.dtype))
    return grads
