"""Memory layout of the gated op's output, shared by every implementation and the fake one.

Models hold q as a [B, H, L, D] view of [B, L, H, D] storage (a projection's output split into
heads), and what follows attention is ``transpose(1, 2).reshape(B, L, H * D)``. Writing the output
in that token-major storage makes the reshape a view; a [B, H, L, D]-contiguous output made it a
full copy (on an H200, 38 us of a 0.2 ms BERT-sized block at 32 x 512 tokens, 0.2 ms at 8 x 2048 x
4096). SDPA's flash and cuDNN kernels answer the same way. The fake implementation must allocate
exactly what the real ones return: compiled graphs trust its strides.
"""
from __future__ import annotations

import torch


def token_major(q: torch.Tensor) -> bool:
    """Whether q's heads sit inside its tokens in memory (size-1 dims decide nothing)."""
    return q.shape[1] > 1 and q.shape[2] > 1 and q.stride(1) < q.stride(2)


def attention_output(q: torch.Tensor, dv: int) -> torch.Tensor:
    """An uninitialised [B, H, Lq, dv] output laid out as q is (token-major or [B, H, L, D])."""
    B, H, L, _ = q.shape
    if token_major(q):
        return q.new_empty((B, L, H, dv)).transpose(1, 2)
    return q.new_empty((B, H, L, dv))


def as_output_layout(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """out itself when it already has q's output layout, else a copy in that layout."""
    want = attention_output(q, out.shape[-1])
    if want.stride() == out.stride():
        return out
    return want.copy_(out)
