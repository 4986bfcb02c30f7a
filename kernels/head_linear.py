"""Projections that skip pruned heads: only kept heads' rows (q/k/v) or columns (output) are multiplied.

``dhp::head_linear_out``: a projection producing heads. Features of heads with
``heads_keep[h] == False`` are not computed and come out as exact zeros, so the graph after it
keeps its shapes; the gated attention op never reads them.

``dhp::head_linear_in``: the output projection consuming heads. The input features of pruned
heads hold zeros (the gated op wrote them), so leaving them out of the product is exact.

Both take weights as stored by the model: "out_in" [out, in] (nn.Linear) or, with
``weight_in_out``, [in, out] (HF Conv1D).

CUDA tensors (fp16/bf16/fp32) run the Triton kernels of ``triton_head_linear.py``, forward and
backward, which read the mask on the device; the rest of this module is the CPU (and fallback) path.

``heads_keep`` is [H] (one head set for every row) or [B, H] with ``x.shape[0] == B`` (per-sample
gates). Per sample, when every row keeps the same number of heads (top-k budgets) and the rows
are long enough to pay for it (``row_cost.py``), each sample's kept weight rows/columns are
gathered into one batched GEMM, so a head is computed only for the samples that keep it;
otherwise the union of the rows' heads is computed (and pruned features of head_linear_out are
zeroed per row). On the torch path the backward of the per-sample form uses
masked dense products: training pays full projection cost there.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import row_cost


def _feature_index(heads_keep: torch.Tensor, head_dim: int) -> torch.Tensor:
    heads = heads_keep.nonzero().flatten()
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def _check(x, weight, heads_keep, head_dim, weight_in_out, features_dim: int, name: str) -> None:
    if heads_keep.dtype != torch.bool or heads_keep.dim() not in (1, 2):
        raise ValueError(f"{name}: heads_keep must be a bool tensor [H] or [B, H], got {heads_keep.dtype} "
                         f"{tuple(heads_keep.shape)}")
    if heads_keep.dim() == 2 and (x.dim() < 2 or x.shape[0] != heads_keep.shape[0]):
        raise ValueError(f"{name}: per-sample heads_keep {tuple(heads_keep.shape)} needs x with the batch "
                         f"({heads_keep.shape[0]}) as dim 0, got x {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D, got {tuple(weight.shape)}")
    width = weight.shape[1 if weight_in_out else 0] if features_dim == 0 else weight.shape[0 if weight_in_out else 1]
    if width != heads_keep.shape[-1] * head_dim:
        raise ValueError(
            f"{name}: weight {tuple(weight.shape)} has {width} head features, expected "
            f"{heads_keep.shape[-1]} heads x head_dim {head_dim}"
        )


# Per-sample masks with equal counts per row: one batched GEMM over each row's own heads (True),
# or the union of the rows' heads (False; what benchmarks compare against).
PER_SAMPLE_GEMM = True


def _feature_mask(heads_keep: torch.Tensor, head_dim: int, x: torch.Tensor) -> torch.Tensor:
    """float mask over features, broadcastable against [B, ..., H*D]."""
    mask = heads_keep.repeat_interleave(head_dim, dim=-1).to(x.dtype)
    if heads_keep.dim() == 2:
        mask = mask.reshape(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[-1])
    return mask


def _per_sample_index(heads_keep: torch.Tensor, head_dim: int, tokens: int) -> Optional[torch.Tensor]:
    """[B, n*D] feature indices of each row's kept heads, or None for the union of the rows'
    heads: when rows keep different counts, or rows of ``tokens`` tokens are too short to pay
    for gathering their own weights (row_cost)."""
    if not PER_SAMPLE_GEMM:
        return None
    counts = heads_keep.sum(-1)
    n = int(counts[0])
    if not bool((counts == n).all()) or n == 0:
        return None
    if not row_cost.rows_pay(tokens, n, int(heads_keep.any(0).sum())):
        return None
    heads = heads_keep.nonzero()[:, 1].view(heads_keep.shape[0], n)
    return (heads[..., None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten(1)


def _rows_agree(heads_keep: torch.Tensor) -> bool:
    return bool((heads_keep == heads_keep[:1]).all())


def head_linear_out_reference(x, weight, bias, heads_keep, head_dim, weight_in_out=False):
    w = weight.t() if weight_in_out else weight
    y = F.linear(x, w, bias)
    return y * _feature_mask(heads_keep, head_dim, y)


def head_linear_in_reference(x, weight, bias, heads_keep, head_dim, weight_in_out=False):
    w = weight.t() if weight_in_out else weight
    return F.linear(x * _feature_mask(heads_keep, head_dim, x), w, bias)


def _out_per_sample(x, w, bias, heads_keep, head_dim):
    if _rows_agree(heads_keep):
        return _out_compute(x, w, bias, heads_keep[0], head_dim, False)
    idx = _per_sample_index(heads_keep, head_dim, row_cost.tokens_per_row(x, x.shape[0]))
    if idx is None:  # the union, then zero each row's pruned features
        y = _out_compute(x, w, bias, heads_keep.any(0), head_dim, False)
        return y * _feature_mask(heads_keep, head_dim, y)
    B = x.shape[0]
    xs = x.reshape(B, -1, x.shape[-1])
    w_rows = w[idx]  # [B, n*D, in]: each sample's kept rows
    y_kept = torch.bmm(xs, w_rows.transpose(1, 2))
    if bias is not None:
        y_kept += bias[idx][:, None, :]
    y = x.new_zeros((B, xs.shape[1], w.shape[0]))
    y.scatter_(-1, idx[:, None, :].expand_as(y_kept), y_kept)
    return y.view(*x.shape[:-1], w.shape[0])


def _in_per_sample(x, w, bias, heads_keep, head_dim):
    if _rows_agree(heads_keep):
        return _in_compute(x, w, bias, heads_keep[0], head_dim, False)
    idx = _per_sample_index(heads_keep, head_dim, row_cost.tokens_per_row(x, x.shape[0]))
    if idx is None:  # pruned inputs are zeros: the union of the rows' heads is exact
        return _in_compute(x, w, bias, heads_keep.any(0), head_dim, False)
    B = x.shape[0]
    xs = x.reshape(B, -1, x.shape[-1])
    x_kept = xs.gather(-1, idx[:, None, :].expand(B, xs.shape[1], idx.shape[1]))
    w_cols = w.t()[idx]  # [B, n*D, out]: each sample's kept columns
    y = torch.bmm(x_kept, w_cols)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], w.shape[0])


def _out_compute(x, weight, bias, heads_keep, head_dim, weight_in_out):
    w = weight.t() if weight_in_out else weight  # [out, in]
    if heads_keep.dim() == 2:
        return _out_per_sample(x, w, bias, heads_keep, head_dim)
    if bool(heads_keep.all()):
        return F.linear(x, w, bias)
    idx = _feature_index(heads_keep, head_dim)
    y = x.new_zeros((*x.shape[:-1], w.shape[0]))
    if idx.numel():
        y_kept = F.linear(x, w.index_select(0, idx), None if bias is None else bias.index_select(0, idx))
        y.index_copy_(-1, idx, y_kept)
    return y


def _in_compute(x, weight, bias, heads_keep, head_dim, weight_in_out):
    w = weight.t() if weight_in_out else weight  # [out, in]
    if heads_keep.dim() == 2:
        return _in_per_sample(x, w, bias, heads_keep, head_dim)
    if bool(heads_keep.all()):
        return F.linear(x, w, bias)
    idx = _feature_index(heads_keep, head_dim)
    if idx.numel() == 0:
        y = x.new_zeros((*x.shape[:-1], w.shape[0]))
        return y + bias if bias is not None else y
    return F.linear(x.index_select(-1, idx), w.index_select(1, idx), bias)


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _in_activation_dtype(x, weight, bias):
    """weight and bias in x's dtype. Under autocast the graph hands these ops bf16/fp16
    activations with the fp32 parameters, and nn.Linear there computes in the activation dtype:
    so do these (seen on an H100: a bf16 @ fp32 product in the backward stopped distillation)."""
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return weight, bias


def _triton_module(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], head_dim: int):
    """The Triton kernels for CUDA tensors they support (they read the mask on the device: no
    host sync per projection), else None and the torch path below: other devices and dtypes,
    cards below sm_80 (bf16 dots), and head dims above the ones the configs were checked for."""
    if not x.is_cuda or x.dtype not in _TRITON_DTYPES or weight.dtype != x.dtype or (
            bias is not None and bias.dtype != x.dtype):
        return None
    try:
        from . import triton_attention, triton_head_linear
    except ImportError:  # no triton
        return None
    if head_dim > triton_attention.MAX_HEAD_DIM or not triton_attention.triton_available(x.device):
        return None
    return triton_head_linear


@torch.library.custom_op("dhp::head_linear_out", mutates_args=())
def head_linear_out(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], heads_keep: torch.Tensor,
    head_dim: int, weight_in_out: bool = False,
) -> torch.Tensor:
    _check(x, weight, heads_keep, head_dim, weight_in_out, 0, "head_linear_out")
    weight, bias = _in_activation_dtype(x, weight, bias)
    triton_impl = _triton_module(x, weight, bias, head_dim)
    if triton_impl is not None:
        return triton_impl.head_linear_out_triton(x, weight, bias, heads_keep, head_dim, weight_in_out)
    return _out_compute(x, weight, bias, heads_keep, head_dim, weight_in_out)


@head_linear_out.register_fake
def _(x, weight, bias, heads_keep, head_dim, weight_in_out=False):
    return x.new_empty((*x.shape[:-1], weight.shape[1 if weight_in_out else 0]))


@torch.library.custom_op("dhp::head_linear_in", mutates_args=())
def head_linear_in(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], heads_keep: torch.Tensor,
    head_dim: int, weight_in_out: bool = False,
) -> torch.Tensor:
    _check(x, weight, heads_keep, head_dim, weight_in_out, 1, "head_linear_in")
    weight, bias = _in_activation_dtype(x, weight, bias)
    triton_impl = _triton_module(x, weight, bias, head_dim)
    if triton_impl is not None:
        return triton_impl.head_linear_in_triton(x, weight, bias, heads_keep, head_dim, weight_in_out)
    return _in_compute(x, weight, bias, heads_keep, head_dim, weight_in_out)


@head_linear_in.register_fake
def _(x, weight, bias, heads_keep, head_dim, weight_in_out=False):
    return x.new_empty((*x.shape[:-1], weight.shape[1 if weight_in_out else 0]))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _masked_grads(grad, x, w, bias, mask_out, mask_in):
    """Dense grads of y = (x·mask_in) @ wᵀ + b, then ·mask_out (masks broadcast like x / y)."""
    g = grad * mask_out if mask_out is not None else grad
    xm = x * mask_in if mask_in is not None else x
    gx = g @ w
    if mask_in is not None:
        gx = gx * mask_in
    gw = _flat(g).t() @ _flat(xm)
    gb = _flat(g).sum(0) if bias is not None else x.new_empty(0)
    return gx, gw, gb


def _triton_backward_module(grad, x, weight, bias, head_dim):
    if grad.dtype != x.dtype or grad.device != x.device:
        return None
    return _triton_module(x, weight, bias, head_dim)


def _out_grads(grad, x, weight, bias, heads_keep, head_dim, weight_in_out):
    triton_impl = _triton_backward_module(grad, x, weight, bias, head_dim)
    if triton_impl is not None:
        return triton_impl.head_linear_out_backward_triton(grad, x, weight, bias, heads_keep, head_dim, weight_in_out)
    # Explicit formulas: custom-op bodies run below autograd, so no recompute-and-differentiate.
    w = weight.t() if weight_in_out else weight  # [out, in]
    if heads_keep.dim() == 2:
        gx, gw, gb = _masked_grads(grad, x, w, bias, _feature_mask(heads_keep, head_dim, grad), None)
        return gx, gw.t().contiguous() if weight_in_out else gw, gb
    idx = _feature_index(heads_keep, head_dim)
    g_kept = grad.index_select(-1, idx)
    gx = g_kept @ w.index_select(0, idx)
    gw = torch.zeros_like(w)
    gw.index_copy_(0, idx, _flat(g_kept).t() @ _flat(x))
    gb = x.new_empty(0)
    if bias is not None:
        gb = torch.zeros_like(bias)
        gb.index_copy_(0, idx, _flat(g_kept).sum(0))
    return gx, gw.t().contiguous() if weight_in_out else gw, gb


def _in_grads(grad, x, weight, bias, heads_keep, head_dim, weight_in_out):
    triton_impl = _triton_backward_module(grad, x, weight, bias, head_dim)
    if triton_impl is not None:
        return triton_impl.head_linear_in_backward_triton(grad, x, weight, bias, heads_keep, head_dim, weight_in_out)
    w = weight.t() if weight_in_out else weight  # [out, in]
    if heads_keep.dim() == 2:
        gx, gw, gb = _masked_grads(grad, x, w, bias, None, _feature_mask(heads_keep, head_dim, x))
        return gx, gw.t().contiguous() if weight_in_out else gw, gb
    idx = _feature_index(heads_keep, head_dim)
    gx = torch.zeros_like(x)
    gx.index_copy_(-1, idx, grad @ w.index_select(1, idx))
    gw = torch.zeros_like(w)
    gw.index_copy_(1, idx, _flat(grad).t() @ _flat(x.index_select(-1, idx)))
    gb = _flat(grad).sum(0) if bias is not None else x.new_empty(0)
    return gx, gw.t().contiguous() if weight_in_out else gw, gb


def _grads_in_activation_dtype(grads_fn, grad, x, weight, bias, heads_keep, head_dim, weight_in_out):
    """grads_fn computed as the forward ran (in x's dtype), returned in each input's own dtype."""
    w, b = _in_activation_dtype(x, weight, bias)
    gx, gw, gb = grads_fn(grad.to(x.dtype), x, w, b, heads_keep, head_dim, weight_in_out)
    return gx, gw.to(weight.dtype), gb.to(bias.dtype) if bias is not None else gb


@torch.library.custom_op("dhp::head_linear_out_backward", mutates_args=())
def head_linear_out_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    heads_keep: torch.Tensor, head_dim: int, weight_in_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _grads_in_activation_dtype(_out_grads, grad, x, weight, bias, heads_keep, head_dim, weight_in_out)


@torch.library.custom_op("dhp::head_linear_in_backward", mutates_args=())
def head_linear_in_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    heads_keep: torch.Tensor, head_dim: int, weight_in_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _grads_in_activation_dtype(_in_grads, grad, x, weight, bias, heads_keep, head_dim, weight_in_out)


def _backward_fake(grad, x, weight, bias, heads_keep, head_dim, weight_in_out):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias) if bias is not None else x.new_empty(0)


head_linear_out_backward.register_fake(_backward_fake)
head_linear_in_backward.register_fake(_backward_fake)


def _setup(ctx, inputs, output):
    x, weight, bias, heads_keep, head_dim, weight_in_out = inputs
    ctx.save_for_backward(x, weight, bias, heads_keep)
    ctx.has_bias, ctx.head_dim, ctx.weight_in_out = bias is not None, head_dim, weight_in_out


def _backward_via(backward_op):
    def backward(ctx, grad):
        x, weight, bias, heads_keep = ctx.saved_tensors
        gx, gw, gb = backward_op(grad, x, weight, bias if ctx.has_bias else None, heads_keep, ctx.head_dim, ctx.weight_in_out)
        return gx, gw, gb if ctx.has_bias else None, None, None, None

    return backward


head_linear_out.register_autograd(_backward_via(head_linear_out_backward), setup_context=_setup)
head_linear_in.register_autograd(_backward_via(head_linear_in_backward), setup_context=_setup)
