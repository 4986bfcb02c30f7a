"""Head gates: the modules that decide, per call, which heads of one attention site run.

The rewrite pass puts ``keep = gate(q, k, v, attn_mask, hidden=x)`` in front of every gated op.
A gate returns bool [B, H]. Gates are ordinary nn.Modules owned by the optimized model, so a
user can inspect them, set masks, and train the learned ones.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .config import DHPConfig
from .passes import AttentionSite


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """bool mask of the n_keep highest scores along the last dim (ties broken by index)."""
    n_keep = max(0, min(n_keep, scores.shape[-1]))
    idx = scores.topk(n_keep, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


class HeadGate(nn.Module):
    """Gate of one site: an explicit mask if one is set, else the keep budget applied to head scores."""

    def __init__(self, site: AttentionSite, config: DHPConfig):
        super().__init__()
        self.site_name = site.name
        self.num_heads = site.num_heads
        self.num_kv_heads = site.num_kv_heads
        self.keep_ratio = config.keep_ratio
        self.min_heads = min(config.min_heads, site.num_heads)
        self.granularity = config.granularity
        # Not persistent: an explicit mask is a run-time choice, not model state.
        self.register_buffer("fixed_keep", torch.ones(0, dtype=torch.bool), persistent=False)

    @property
    def n_keep(self) -> int:
        return max(self.min_heads, int(round(self.keep_ratio * self.num_heads)))

    def set_keep_ratio(self, keep_ratio: float, min_heads: Optional[int] = None) -> None:
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
        self.keep_ratio = float(keep_ratio)
        if min_heads is not None:
            if min_heads < 1:
                raise ValueError(f"min_heads must be >= 1, got {min_heads!r}")
            self.min_heads = min(min_heads, self.num_heads)

    def set_keep_mask(self, mask: Optional[torch.Tensor]) -> None:
        """Pin the gate: bool [H] (every row) or [B, H] (one row per sample); None unpins."""
        if mask is None:
            self.fixed_keep = torch.ones(0, dtype=torch.bool, device=self.fixed_keep.device)
            return
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool or mask.dim() not in (1, 2) or mask.shape[-1] != self.num_heads:
            raise ValueError(
                f"keep mask for site {self.site_name!r} must be bool [{self.num_heads}] or "
                f"[batch, {self.num_heads}], got {mask.dtype} {tuple(mask.shape)}"
            )
        self.fixed_keep = mask.clone()

    def score(self, q, k, v, attn_mask, hidden) -> torch.Tensor:
        """Importance per (batch, head), higher = keep. Scoring strategies override this."""
        raise NotImplementedError(
            f"{type(self).__name__} has no scoring rule: set keep_ratio=1.0 or a keep mask, "
            "or choose a scoring strategy in DHPConfig"
        )

    def forward(self, q, k, v, attn_mask=None, hidden=None) -> torch.Tensor:
        batch = q.shape[0]
        if self.fixed_keep.numel():
            fixed = self.fixed_keep.to(q.device)
            if fixed.dim() == 2 and fixed.shape[0] != batch:
                raise ValueError(
                    f"keep mask for site {self.site_name!r} has {fixed.shape[0]} rows but the batch has {batch}"
                )
            return fixed.expand(batch, self.num_heads)
        if self.n_keep >= self.num_heads:
            return torch.ones(batch, self.num_heads, dtype=torch.bool, device=q.device)
        scores = self.score(q, k, v, attn_mask, hidden)
        if self.granularity == "batch":
            # The union the batch needs would keep too many; rank heads by their batch-mean score.
            keep = keep_top(scores.float().mean(0, keepdim=True), self.n_keep)
            return keep.expand(batch, self.num_heads)
        return keep_top(scores, self.n_keep)


def build_gate(site: AttentionSite, config: DHPConfig) -> nn.Module:
    """The gate a site gets under ``config``."""
    return HeadGate(site, config)
