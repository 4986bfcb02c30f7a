"""Head importance: S(l, h, x) = α·ŵ(l, h) + (1 − α)·(1 − Ĥ(l, h, x)).

ŵ is the L2 norm of a head's weight slices (Q rows of head h, K and V rows of its kv head, O
columns of head h), min-max normalised per site; Ĥ is its normalised attention entropy
(``dhp_fx.kernels.entropy``). Low S means low norm and diffuse attention: expendable.
"""
from __future__ import annotations

import logging
from typing import Mapping, Optional

import torch

from .kernels.entropy import MASKED_BELOW, attention_entropy, probe_rows
from .passes import AttentionSite, ProjectionRef

log = logging.getLogger("dhp_fx")

__all__ = [
    "head_slices", "head_weight_norms", "normalize_per_site", "normalized_weight_norms",
    "combine_scores", "query_padding", "attention_entropy", "probe_rows",
]


def _feature_axis(role: str, layout: str) -> int:
    # q/k/v produce head features, out consumes them; "out_in" = [out, in] (nn.Linear),
    # "in_out" = [in, out] (HF Conv1D).
    produces = role != "out"
    if layout == "out_in":
        return 0 if produces else 1
    if layout == "in_out":
        return 1 if produces else 0
    raise ValueError(f"unknown projection layout {layout!r}")


def head_slices(site: AttentionSite, role: str, width: int) -> Optional[tuple[int, list[tuple[int, int]]]]:
    """(axis, [(start, stop) per head of that projection]) of a site's projection, or None.

    ``role`` is "q", "k", "v" or "out"; k and v are indexed by kv head. ``width`` is the size of
    the weight along the feature axis, used when ``features`` is None.
    """
    ref: Optional[ProjectionRef] = getattr(site, f"{role}_proj")
    if ref is None:
        return None
    heads = site.num_kv_heads if role in ("k", "v") else site.num_heads
    dim = site.value_head_dim if role in ("v", "out") else site.head_dim
    start, stop = ref.features if ref.features is not None else (0, width)
    stride = dim if ref.head_stride is None else ref.head_stride
    if stride < dim or stop - start != (heads - 1) * stride + dim or stop > width:
        return None
    return _feature_axis(role, ref.layout), [(start + h * stride, start + h * stride + dim) for h in range(heads)]


def head_weight_norms(site: AttentionSite, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """float32 [H]: sqrt(‖Q_h‖² + ‖K_g‖² + ‖V_g‖² + ‖O_h‖²), g = h // (H / Hkv).

    Projections the site does not name, or whose weight is missing or does not split into the
    site's heads, are left out (with a log line); with none left every head gets 0.
    """
    group = site.num_heads // max(1, site.num_kv_heads)
    sq = torch.zeros(site.num_heads, dtype=torch.float64)
    for role in ("q", "k", "v", "out"):
        ref = getattr(site, f"{role}_proj")
        if ref is None:
            continue
        weight = params.get(ref.weight)
        if weight is None or weight.dim() != 2:
            log.info("dhp_fx: weight %r of site %s not available for norms", ref.weight, site.name)
            continue
        sl = head_slices(site, role, weight.shape[_feature_axis(role, ref.layout)])
        if sl is None:
            log.info("dhp_fx: %s projection of site %s does not split into its heads", role, site.name)
            continue
        axis, spans = sl
        with torch.no_grad():
            w = weight.detach().double()
            per = torch.stack([w.narrow(axis, a, b - a).square().sum() for a, b in spans]).cpu()
        if role in ("k", "v"):
            per = per.repeat_interleave(group)
        sq += per
    return sq.sqrt().float()


def normalize_per_site(values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min-max to [0, 1] along the last dim; all (nearly) equal gives 1 everywhere."""
    lo = values.min(-1, keepdim=True).values
    hi = values.max(-1, keepdim=True).values
    span = hi - lo
    flat = span <= eps * hi.abs().clamp_min(1e-12)
    return torch.where(flat, torch.ones_like(values), (values - lo) / torch.where(flat, torch.ones_like(span), span))


def normalized_weight_norms(site: AttentionSite, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return normalize_per_site(head_weight_norms(site, params))


def combine_scores(w_hat: torch.Tensor, entropy: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
    """S = α·ŵ + (1 − α)·(1 − Ĥ); ŵ [H], Ĥ [B, H] (None only when α = 1)."""
    if entropy is None:
        if alpha != 1.0:
            raise ValueError("entropy is needed unless alpha == 1")
        return w_hat[None]
    return alpha * w_hat.to(entropy.device)[None] + (1.0 - alpha) * (1.0 - entropy)


# torch.any over several dims at once (aten::any.dims) is newer than the oldest torch supported.
_ANY_OVER_DIMS = "dims" in torch.ops.aten.any.overloads()


def query_padding(attn_mask: Optional[torch.Tensor], batch: int, q_len: int, k_len: int) -> Optional[torch.Tensor]:
    """bool [B, Lq]: which query rows are real tokens, when the mask says so; else None.

    Only self-attention can tell (query i is token i): a key no query may attend to is padding,
    and so is the query row at the same position.
    """
    if attn_mask is None or q_len != k_len or q_len <= 1:
        return None
    mask = attn_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    ok = mask if mask.dtype == torch.bool else mask > MASKED_BELOW
    # no data-dependent branch: gates must stay traceable by downstream compilers
    if _ANY_OVER_DIMS:  # one reduction kernel per layer and call instead of two
        return ok.any(dim=(1, 2)).expand(batch, k_len)
    return ok.any(dim=-2).any(dim=1).expand(batch, k_len)
