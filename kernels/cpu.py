"""Gated attention that spends work only on kept heads, built from PyTorch's own SDPA kernels.

Forward strategies, chosen per call from ``keep`` (reading it on the host is cheap on CPU):

* every head kept: one SDPA call, GQA handled natively by ``enable_gqa``;
* few, wide runs of kept heads (typically one keep pattern shared by the whole batch):
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

import array
import hashlib
import itertools
import threading
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

# Views vs gather, measured on a 2-core CPU (benchmarks/bench_cpu_attention.py): an extra
# SDPA call costs about as much as gathering 1 MiB (a parallel-region round trip, far worse
# when another process holds a core), so views win only while they need few calls for the
# bytes a gather would move. Each call must also hold enough (batch, head) pairs to keep every
# thread busy: a call on one or two heads of a causal row leaves threads idle at the barrier.
VIEW_CALL_BYTES = 1 << 20
MIN_VIEW_CALLS = 2
VIEW_PAIRS_PER_THREAD = 2


def _max_view_calls(gather_bytes: int) -> int:
    return max(MIN_VIEW_CALLS, gather_bytes // VIEW_CALL_BYTES)


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


# The gathered q/k/v of the forward live in a per-thread buffer reused across calls. Fresh
# multi-MB temporaries each call make glibc hand pages back to the OS and fault them in again
# (thousands of page faults per call, as costly as the attention itself at short sequences).
_local = threading.local()
WORKSPACE_MAX_BYTES = 64 << 20
USE_WORKSPACE = True


def _workspace(numel: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    if like.device.type != "cpu" or numel * like.element_size() > WORKSPACE_MAX_BYTES:
        return None
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get(like.dtype)
    if buf is None or buf.numel() < numel:
        # A buffer born under inference_mode could not be written outside it later.
        with torch.inference_mode(False):
            buf = bufs[like.dtype] = torch.empty(numel, dtype=like.dtype)
    return buf[:numel]


def _int_tensor(values: List[int], device: torch.device) -> torch.Tensor:
    # 5x cheaper than torch.tensor(list), which parses the list element by element.
    if not values:
        return torch.empty(0, dtype=torch.int64, device=device)
    # Copied out of the array: a tensor must never borrow memory from a temporary Python object.
    return torch.frombuffer(array.array("q", values), dtype=torch.int64).clone().to(device)


def _select_heads(t: torch.Tensor, pair: torch.Tensor, buf: Optional[torch.Tensor]) -> torch.Tensor:
    """Heads ``pair = b * H + h`` of t [B, H, L, E] as [N, L, E], written into ``buf`` if given.

    index_select over rows is ~3x faster than advanced indexing on CPU, so the two layouts
    models produce get a row view: [B*H, L, E] for [B, H, L, E] storage, and [B*L*H, E] rows
    for the [B, L, H, E] storage of a transposed projection output.
    """
    B, H, L, E = t.shape
    N = pair.numel()
    if B == 1 or H == 1 or t.stride(0) == H * t.stride(1):
        out = None if buf is None else buf.view(N, L, E)
        return torch.index_select(t.flatten(0, 1), 0, pair, out=out)
    if t.stride() == (L * H * E, E, H * E, 1):
        # row of (b, l, h) is b*L*H + l*H + h = pair + b*H*(L-1) + l*H
        start = pair + torch.div(pair, H, rounding_mode="floor") * (H * (L - 1))
        rows = start[None, :] + torch.arange(0, L * H, H, device=t.device)[:, None]
        out = None if buf is None else buf.view(L * N, E)
        picked = torch.index_select(t.transpose(1, 2).reshape(B * L * H, E), 0, rows.reshape(-1), out=out)
        return picked.view(L, N, E).transpose(0, 1)
    bi, hi = torch.div(pair, H, rounding_mode="floor"), pair % H
    if buf is None:
        return t[bi, hi]
    return torch.ops.aten.index.Tensor_out(t, [bi, hi], out=buf.view(N, L, E))


def _gather(q, k, v, rows: List[List[bool]], m4, use_workspace=False):
    """Kept (b, h) pairs as the batch dim of [N, 1, L, E] tensors.

    Returns (q_pair, kv_pair, qg, kg, vg, mg, mask_row): pair indices b*H + h into q's and
    k/v's heads, the gathered tensors, the mask for them (broadcast when shared by every head)
    and, for a per-batch or per-head mask, the row of its flattened [B', H'] dims each uses.
    Indices are built on the host from ``rows``: a handful of tiny tensor ops would cost more.
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    group = Hq // Hkv
    pairs = [(b, h) for b, row in enumerate(rows) for h, kept in enumerate(row) if kept]
    index = [[b * Hq + h for b, h in pairs], [b * Hkv + h // group for b, h in pairs]]
    mg = None
    if m4 is not None:
        mb, mh = m4.shape[:2]
        if mb == 1 and mh == 1:
            mg = m4[0, 0]  # shared by every head: broadcast, never copied
        else:
            index.append([(b if mb > 1 else 0) * mh + (h if mh > 1 else 0) for b, h in pairs])
    index_t = _int_tensor([i for part in index for i in part], q.device).view(len(index), len(pairs))
    q_pair, kv_pair = index_t[0], index_t[1]
    mask_row = index_t[2] if len(index) == 3 else None
    if mask_row is not None:
        mg = torch.index_select(m4.flatten(0, 1), 0, mask_row).unsqueeze(1)  # kept heads' rows only
    sizes = [len(pairs) * t.shape[2] * t.shape[3] for t in (q, k, v)]
    ws = _workspace(sum(sizes), q) if use_workspace else None
    outs, off = [], 0
    for t, pair, n in zip((q, k, v), (q_pair, kv_pair, kv_pair), sizes):
        outs.append(_select_heads(t, pair, None if ws is None else ws[off:off + n]).unsqueeze(1))
        off += n
    return (q_pair, kv_pair, *outs, mg, mask_row)


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
        _, _, qg, kg, vg, mg, _ = _gather(q, k, v, rows, m4)
        compute, sc = _compute_dtype(q), D ** -0.5 if scale is None else scale
        outs = []
        for i, (s, e) in enumerate(_chunks(n_kept, Lq, Lk)):
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
            return _all_kept(q, k, v, m4, is_causal, scale)
        # Consecutive batch rows with the same pattern share one call per piece.
        gather_bytes = n_kept * (Lq * D + Lk * (D + Dv) + 2 * Lq * Dv) * q.element_size()
        max_calls = _max_view_calls(gather_bytes)
        calls: List[Tuple[int, int, Piece]] = []
        b = 0
        while b < B and len(calls) <= max_calls:
            b_end = b + 1
            while b_end < B and rows[b_end] == rows[b]:
                b_end += 1
            calls.extend((b, b_end, p) for p in _pieces(rows[b], group))
            b = b_end
        min_pairs = VIEW_PAIRS_PER_THREAD * torch.get_num_threads()
        if len(calls) <= max_calls and all((b1 - b0) * (p[1] - p[0]) >= min_pairs for b0, b1, p in calls):
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
        _, _, qg, kg, vg, mg, _ = _gather(q, k, v, rows, m4, use_workspace=USE_WORKSPACE)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mg, is_causal=is_causal, scale=scale)
    return _scatter(og.to(q.dtype), rows)


def _heads_as_batch(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None or t.shape[0] == 1 or t.shape[1] == 1 or t.stride(0) == t.shape[1] * t.stride(1):
        return None if t is None else t.flatten(0, 1).unsqueeze(1)
    return None


def _all_kept(q, k, v, m4, is_causal, scale):
    """One SDPA call. The flash kernel writes [B, L, H, E] memory; with the heads folded into
    the batch dim ([B*H, 1, L, E]) that memory is already the contiguous [B, H, L, E] the op
    returns, which saves copying the whole output when the inputs allow the fold."""
    B, Hq, Lq, _ = q.shape
    if k.shape[1] == Hq and (m4 is None or m4.shape[:2] == (1, 1) or m4.shape[:2] == (B, Hq)):
        folded = [_heads_as_batch(t) for t in (q, k, v)]
        mask = m4 if m4 is None or m4.shape[:2] == (1, 1) else _heads_as_batch(m4)
        if all(t is not None for t in folded) and (mask is not None or m4 is None):
            out = F.scaled_dot_product_attention(*folded, attn_mask=mask, is_causal=is_causal, scale=scale)
            if out.is_contiguous():
                return out.view(B, Hq, Lq, -1)
            return out.contiguous().view(B, Hq, Lq, -1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=m4, is_causal=is_causal, scale=scale, enable_gqa=k.shape[1] != Hq
    )
    return out.contiguous()


def _scatter(og: torch.Tensor, rows: List[List[bool]]) -> torch.Tensor:
    """[B, Hq, Lq, Dv] with og's rows at the kept heads and zeros elsewhere, in one pass.

    A gather from [og; 0] into a fresh tensor beats zero-filling and index_copy_-ing, which
    writes the kept rows twice and is itself slower than index_select.
    """
    N, Lq, Dv = og.shape[0], og.shape[-2], og.shape[-1]
    ws = _workspace((N + 1) * Lq * Dv, og)  # the gathered inputs are dead by now
    parts = [og.reshape(N, Lq * Dv), og.new_zeros(1, Lq * Dv)]
    src = torch.cat(parts) if ws is None else torch.cat(parts, out=ws.view(N + 1, Lq * Dv))
    slot = itertools.count()
    pos = [next(slot) if kept else N for row in rows for kept in row]
    return torch.index_select(src, 0, _int_tensor(pos, og.device)).view(len(rows), len(rows[0]), Lq, Dv)


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
    flat, kv_flat, qg, kg, vg, mg, mask_rows = _gather(q, k, v, keep.tolist(), m4)
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
