"""The ``dhp::gated_attention`` custom op: registration, argument checks, fake and autograd.

Graph passes emit ``torch.ops.dhp.gated_attention`` by name; the implementation behind it
(CPU path now, Triton on CUDA later) can change without touching the passes.

Autograd goes through a second op, ``dhp::gated_attention_backward``, so that AOT autograd
traces the backward as one opaque node (with a fake impl) instead of tracing into the
recompute. With dropout, the forward's mask must be replayed in the backward but the schema
has no spare output to carry a seed: the forward seeds its dropout from the CPU generator
state it leaves behind, and ``setup_context`` reads that state back through
``dhp::_dropout_seed``, whose data dependency on the output orders it right after the forward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .cpu import dropout_seed_from_state, gated_attention_backward_cpu, gated_attention_cpu, new_dropout_seed
from .layout import as_output_layout, attention_output


def check_gated_attention_args(q, k, v, keep, attn_mask, dropout_p: float = 0.0) -> None:
    """Raise ValueError naming the offending argument when shapes or dtypes do not fit."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"gated_attention: q, k, v must be 4-D [batch, heads, seq, dim], got "
            f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"gated_attention: batch of k/v ({k.shape[0]}/{v.shape[0]}) != batch of q ({B})")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"gated_attention: k{tuple(k.shape)} and v{tuple(v.shape)} disagree on heads or length")
    if k.shape[3] != D:
        raise ValueError(f"gated_attention: head dim of k ({k.shape[3]}) != head dim of q ({D})")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"gated_attention: query heads ({Hq}) not a multiple of kv heads ({k.shape[1]})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"gated_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if keep.dtype != torch.bool or tuple(keep.shape) != (B, Hq):
        raise ValueError(
            f"gated_attention: keep must be a bool tensor of shape ({B}, {Hq}), "
            f"got {keep.dtype} {tuple(keep.shape)}"
        )
    if attn_mask is not None:
        if attn_mask.dim() > 4:
            raise ValueError(f"gated_attention: attn_mask must have at most 4 dims, got {attn_mask.dim()}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(
                f"gated_attention: attn_mask must be bool or floating point, got {attn_mask.dtype}"
            )
        full = (B, Hq, Lq, k.shape[2])
        padded = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
        if any(m not in (1, f) for m, f in zip(padded, full)):
            raise ValueError(
                f"gated_attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {full}"
            )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"gated_attention: dropout_p must be in [0, 1), got {dropout_p}")


def _triton_path(q: torch.Tensor, v: torch.Tensor, dropout_p: float):
    """The Triton module when it should serve this call, else None (CPU, dropout, no triton, < sm80,
    head dims above the ones its configs were checked for)."""
    if not q.is_cuda or dropout_p != 0.0:
        return None
    try:
        from . import triton_attention  # triton is optional: imported only when a CUDA tensor arrives
    except ImportError:
        return None
    if max(q.shape[-1], v.shape[-1]) > triton_attention.MAX_HEAD_DIM:
        return None
    return triton_attention if triton_attention.triton_available(q.device) else None


@torch.library.custom_op("dhp::gated_attention", mutates_args=())
def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention in which heads with ``keep[b, h] == False`` do no work and output exact zeros."""
    check_gated_attention_args(q, k, v, keep, attn_mask, dropout_p)
    triton = _triton_path(q, v, dropout_p)
    if triton is not None:
        return triton.triton_gated_attention(q, k, v, keep.to(q.device), attn_mask, is_causal, scale)
    seed = new_dropout_seed() if dropout_p > 0.0 else None
    return as_output_layout(gated_attention_cpu(q, k, v, keep, attn_mask, dropout_p, is_causal, scale, seed), q)


@gated_attention.register_fake
def _(q, k, v, keep, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    return attention_output(q, v.shape[-1])


@torch.library.custom_op("dhp::_dropout_seed", mutates_args=())
def _dropout_seed(after: torch.Tensor) -> torch.Tensor:
    """Seed of the dropout call that produced ``after`` (read from the CPU generator state)."""
    return torch.tensor(dropout_seed_from_state(torch.get_rng_state()), dtype=torch.int64)


@_dropout_seed.register_fake
def _(after):
    return torch.empty((), dtype=torch.int64)


@torch.library.custom_op("dhp::gated_attention_backward", mutates_args=())
def gated_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: Optional[float],
    seed: Optional[torch.Tensor],
    mask_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmask); dmask is empty unless ``mask_grad``. Pruned heads get zero grads."""
    triton = _triton_path(q, v, dropout_p)
    if triton is not None:
        dq, dk, dv, dmask = triton.triton_gated_attention_backward(
            grad_out, q, k, v, keep.to(q.device), None, None, attn_mask, is_causal, scale, mask_grad=mask_grad
        )
        return dq, dk, dv, (dmask if mask_grad else q.new_empty((0,)))
    grads = gated_attention_backward_cpu(
        grad_out, q, k, v, keep, attn_mask, dropout_p, is_causal, scale,
        None if seed is None else int(seed), mask_grad,
    )
    if not mask_grad:
        grads.append(q.new_empty((0,)))
    return tuple(grads)


@gated_attention_backward.register_fake
def _(grad_out, q, k, v, keep, attn_mask, dropout_p, is_causal, scale, seed, mask_grad):
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_grad else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, keep, attn_mask, dropout_p, is_causal, scale = inputs
    seed = torch.ops.dhp._dropout_seed(output) if dropout_p > 0.0 else None
    ctx.save_for_backward(q, k, v, keep, attn_mask, seed)
    ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale


def _backward(ctx, grad):
    q, k, v, keep, attn_mask, seed = ctx.saved_tensors
    mask_grad = attn_mask is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dmask = torch.ops.dhp.gated_attention_backward(
        grad, q, k, v, keep, attn_mask, ctx.dropout_p, ctx.is_causal, ctx.scale, seed, mask_grad
    )
    return dq, dk, dv, None, dmask if mask_grad else None, None, None, None


gated_attention.register_autograd(_backward, setup_context=_setup_context)
