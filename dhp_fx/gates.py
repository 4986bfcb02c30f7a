"""Head gates: the modules that decide, per call, which heads of one attention site run.

The rewrite pass puts ``keep = gate(q, k, v, attn_mask, hidden=x)`` in front of every gated op.
A gate returns bool [B, H]. Gates are ordinary nn.Modules owned by the optimized model, so a
user can inspect them, set masks, and train the learned ones.

``HeadGate`` owns the budget (keep ratio or score threshold, min_heads, KV groups, per-sample or
batch-shared masks) and calibration recording; the scoring strategies of ``DHPConfig.scoring``
live in ``dhp_fx.strategies`` and only implement ``score``.

Granularity, and what it costs. "sample" gives every batch row its own heads: each sample runs
exactly what it needs, but a head that is off for some rows and on for others still has to be
projected for the whole batch, or the projections become gathered (per-row) GEMMs, so savings
come mostly from the attention core. "batch" shares one mask (the union of what the rows need,
at most ``union_cap`` of the heads): pruned heads can be sliced out of the Q/K/V/O weights once
per call and every GEMM stays dense, but the union grows with the batch, so fewer heads are
skipped on large, diverse batches.
"""
from __future__ import annotations

import itertools
import math
import weakref
from typing import Optional

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake

from .config import DHPConfig
from .passes import AttentionSite


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """bool mask of the n_keep highest scores along the last dim (ties broken by index)."""
    n_keep = max(0, min(n_keep, scores.shape[-1]))
    idx = scores.topk(n_keep, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def decide_keep(
    scores: torch.Tensor,
    n_keep: int,
    min_keep: int,
    threshold: Optional[float] = None,
    batch_shared: bool = False,
    union_cap: Optional[int] = None,
) -> torch.Tensor:
    """bool [B, U] from scores [B, U] (U = heads or KV groups).

    Without threshold exactly max(n_keep, min_keep) units per row; with one, the units scoring
    >= threshold, at most n_keep and at least min_keep. batch_shared: the union of the rows'
    choices, cut to the union_cap most-voted units (ties by mean score), never below min_keep.
    """
    units = scores.shape[-1]
    n_keep, min_keep = min(units, max(n_keep, min_keep)), min(units, min_keep)
    if threshold is None:
        keep = keep_top(scores, n_keep)
    else:
        keep = scores >= threshold
        if n_keep < units:
            keep &= keep_top(scores, n_keep)
        keep |= keep_top(scores, min_keep)
    if batch_shared:
        votes = keep.sum(0, dtype=torch.float32)
        cap = units if union_cap is None else min(units, max(union_cap, min_keep))
        # votes are integers and 0.5 * score < 1 for scores in [0, 1]: ranks by votes, then score
        rank = votes + 0.5 * scores.float().mean(0).clamp(0, 1)
        shared = (votes > 0) & keep_top(rank, cap)
        shared |= keep_top(rank, min_keep)
        keep = shared.expand_as(keep)
    return keep


class HeadGate(nn.Module):
    """Gate of one site: an explicit mask if one is set, else the keep budget applied to head scores."""

    def __init__(self, site: AttentionSite, config: DHPConfig):
        super().__init__()
        self.site = site
        self.site_name = site.name
        self.num_heads = site.num_heads
        self.num_kv_heads = site.num_kv_heads
        self.keep_ratio = config.keep_ratio_for(site.name)
        self.min_heads = min(config.min_heads, site.num_heads)
        self.granularity = config.granularity
        self.score_threshold = config.score_threshold
        # Whole groups only make sense when there are several query heads per KV head.
        self.prune_kv_groups = config.prune_kv_groups and site.num_kv_heads < site.num_heads
        self.union_cap = config.union_cap
        self.recording = False
        self._last_entropy: Optional[torch.Tensor] = None
        # Not persistent: an explicit mask is a run-time choice, not model state.
        self.register_buffer("fixed_keep", torch.ones(0, dtype=torch.bool), persistent=False)
        self._init_stats()

    # ------------------------------------------------------------------ budget
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

    def set_score_threshold(self, threshold: Optional[float]) -> None:
        """Keep heads scoring >= threshold (keep_ratio caps the count); None returns to keep_ratio."""
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"score_threshold must be None or in [0, 1], got {threshold!r}")
        self.score_threshold = threshold

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

    def calibration_score(self, q, k, v, attn_mask, hidden) -> torch.Tensor:
        """The per-input score recorded (and decided on) while calibrating."""
        return self.score(q, k, v, attn_mask, hidden)

    def decide(self, scores: torch.Tensor) -> torch.Tensor:
        """bool [B, H] keep mask for scores [B, H] under this gate's budget."""
        batch, H = scores.shape[0], self.num_heads
        group = H // self.num_kv_heads if self.prune_kv_groups else 1
        units = scores.float().reshape(batch, H // group, group).mean(-1)
        n_units = H // group
        keep = decide_keep(
            units,
            n_keep=int(round(self.keep_ratio * n_units)),
            min_keep=math.ceil(self.min_heads / group),
            threshold=self.score_threshold,
            batch_shared=self.granularity == "batch",
            union_cap=None if self.union_cap is None else int(round(self.union_cap * n_units)),
        )
        return keep.repeat_interleave(group, dim=-1) if group > 1 else keep

    def forward(self, q, k, v, attn_mask=None, hidden=None) -> torch.Tensor:
        if is_fake(q):
            # A downstream compiler (aot_eager, inductor) is tracing the graph: hand it one opaque
            # op, so the gate's Python logic (budgets, lagged state, recording) runs for real at
            # every call and its buffers never meet fake tensors.
            return torch.ops.dhp.run_gate(q, k, v, attn_mask, hidden, _register(self))
        return self.decide_eager(q, k, v, attn_mask, hidden)

    @torch.no_grad()  # keep is boolean: nothing differentiable leaves the gate
    def decide_eager(self, q, k, v, attn_mask=None, hidden=None) -> torch.Tensor:
        batch = q.shape[0]
        if self.fixed_keep.numel():
            fixed = self.fixed_keep.to(q.device)
            if fixed.dim() == 2 and fixed.shape[0] != batch:
                raise ValueError(
                    f"keep mask for site {self.site_name!r} has {fixed.shape[0]} rows but the batch has {batch}"
                )
            keep = fixed.expand(batch, self.num_heads)
            if self.recording:
                self._record(None, keep)
            return keep
        if self.recording:
            scores = self.calibration_score(q, k, v, attn_mask, hidden)
            keep = self.decide(scores)
            self._record(scores, keep)
            return keep
        if self.score_threshold is None and self.n_keep >= self.num_heads:
            return torch.ones(batch, self.num_heads, dtype=torch.bool, device=q.device)
        return self.decide(self.score(q, k, v, attn_mask, hidden))

    # ------------------------------------------------------------------ calibration recording
    def _init_stats(self) -> None:
        H = self.num_heads
        # Counts are int64, which model.half() leaves alone; sums float64 for long calibrations.
        # Not persistent: calibration results are saved apart (CalibrationStats).
        for name in ("samples", "scored", "entropy_n"):
            self.register_buffer(f"stat_{name}", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("stat_keep", torch.zeros(H, dtype=torch.long), persistent=False)
        for name, init in (("score_sum", torch.zeros(H)), ("score_sq", torch.zeros(H)),
                           ("score_min", torch.full((H,), math.inf)), ("score_max", torch.full((H,), -math.inf)),
                           ("entropy_sum", torch.zeros(H))):
            self.register_buffer(f"stat_{name}", init.double(), persistent=False)

    def reset_stats(self) -> None:
        for name, buf in self.named_buffers(recurse=False):
            if name.startswith("stat_"):
                buf.fill_(math.inf if name == "stat_score_min" else -math.inf if name == "stat_score_max" else 0)

    def start_recording(self, reset: bool = True) -> None:
        if reset:
            self.reset_stats()
        self.recording = True

    def stop_recording(self) -> None:
        self.recording = False

    @torch.no_grad()
    def _record(self, scores: Optional[torch.Tensor], keep: torch.Tensor) -> None:
        # Accumulated on the gate's device: no host sync per call.
        self.stat_samples += keep.shape[0]
        self.stat_keep += keep.sum(0).to(self.stat_keep.device)
        if scores is not None:
            s = scores.detach().to(self.stat_score_sum.device, torch.float64)
            self.stat_scored += s.shape[0]
            self.stat_score_sum += s.sum(0)
            self.stat_score_sq += s.square().sum(0)
            torch.minimum(self.stat_score_min, s.min(0).values, out=self.stat_score_min)
            torch.maximum(self.stat_score_max, s.max(0).values, out=self.stat_score_max)
        entropy = self._last_entropy
        if entropy is not None and scores is not None:
            self.stat_entropy_sum += entropy.detach().to(self.stat_entropy_sum.device, torch.float64).sum(0)
            self.stat_entropy_n += entropy.shape[0]

    def recorded(self) -> dict:
        """Plain-Python summary of what was recorded (lists per head; None where nothing was)."""
        n, m = float(self.stat_samples), float(self.stat_scored)
        out = {"samples": int(n), "keep_freq": (self.stat_keep.double() / n).tolist() if n else None,
               "score_mean": None, "score_std": None, "score_min": None, "score_max": None, "entropy_mean": None}
        if m:
            mean = self.stat_score_sum / m
            out.update(score_mean=mean.tolist(),
                       score_std=(self.stat_score_sq / m - mean.square()).clamp_min(0).sqrt().tolist(),
                       score_min=self.stat_score_min.tolist(), score_max=self.stat_score_max.tolist())
        if float(self.stat_entropy_n):
            out["entropy_mean"] = (self.stat_entropy_sum / float(self.stat_entropy_n)).tolist()
        return out


_GATES: "weakref.WeakValueDictionary[int, HeadGate]" = weakref.WeakValueDictionary()
_GATE_IDS = itertools.count()


def _register(gate: HeadGate) -> int:
    gid = getattr(gate, "_gate_id", None)
    if gid is None or _GATES.get(gid) is not gate:  # new, or a copy carrying its source's id
        gid = next(_GATE_IDS)
        gate._gate_id = gid
        _GATES[gid] = gate
    return gid


@torch.library.custom_op("dhp::run_gate", mutates_args=())
def run_gate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
             hidden: Optional[torch.Tensor], gate_id: int) -> torch.Tensor:
    """Call gate ``gate_id``'s eager decision from compiled code: bool [B, H]."""
    gate = _GATES.get(gate_id)
    if gate is None:
        raise RuntimeError(f"dhp::run_gate: gate {gate_id} no longer exists (its model was freed)")
    return gate.decide_eager(q, k, v, attn_mask, hidden).clone()


@run_gate.register_fake
def _(q, k, v, attn_mask, hidden, gate_id):
    gate = _GATES.get(gate_id)
    heads = gate.num_heads if gate is not None else q.shape[1]
    return q.new_empty((q.shape[0], heads), dtype=torch.bool)


def build_gate(site: AttentionSite, config: DHPConfig, params: Optional[dict] = None) -> nn.Module:
    """The gate a site gets under ``config``; ``params`` maps parameter names to live tensors."""
    from .strategies import STRATEGIES

    return STRATEGIES[config.scoring](site, config, params or {})
