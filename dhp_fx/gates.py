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

After the op, the rewrite calls the gate's ``GateTap`` with the op's output and q, k, v: it is
the identity unless the gate asked for work that needs the heads' values — calibration scores
of a gate that decided before q existed, the router's loss, attention maps for distillation,
or the straight-through estimator that lets the distillation loss reach the keep decision.
"""
from __future__ import annotations

import itertools
import math
import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake

from .kernels.entropy import attention_log_probs

from .compact_block import CompactBlock, CompactChain
from .config import DHPConfig
from .passes import AttentionSite


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """bool mask of the n_keep highest scores along the last dim, ties to the lower index."""
    n_keep = max(0, min(n_keep, scores.shape[-1]))
    # A stable sort, not topk: topk leaves the order of equal scores unspecified (CUDA's need not
    # match the CPU's), saturated router sigmoids tie at exactly 1.0, and the fused router kernel
    # (kernels/triton_router.py) must make the same choice on every device.
    idx = scores.sort(dim=-1, descending=True, stable=True).indices[..., :n_keep]
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
        # Training switches, set by dhp_fx.distill (see GateTap): ``ste`` is False, "ste"
        # (straight-through hard decision) or "relaxed" (soft top-k); attention-map capture.
        # Plain attributes: they are run-time state, not model state.
        self.ste = False
        self.capture_attention = False
        self.last_attention: Optional[AttentionCapture] = None
        self.last_budget_loss: Optional[torch.Tensor] = None
        self._tap_work: Optional[dict] = None
        # unregistered: the tap holds the gate, and the gate's module tree stays what it was
        object.__setattr__(self, "tap_module", GateTap(self))
        object.__setattr__(self, "block_module", CompactBlock(self))
        object.__setattr__(self, "chain_module", CompactChain(self))
        # Not persistent: an explicit mask is a run-time choice, not model state.
        self.register_buffer("fixed_keep", torch.ones(0, dtype=torch.bool), persistent=False)
        self._fixed_plan: Optional[tuple[int, bool]] = None  # (heads in the mask's union, rows equal)
        self._fixed_row_plan: Optional[tuple[int, bool]] = None  # (most groups of one row, whole groups)
        self._fixed_rows_apart = False  # a [B, H] mask whose rows differ
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
            self._fixed_plan = self._fixed_row_plan = None
            self._fixed_rows_apart = False
            self._fixed_heads = None
            return
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool or mask.dim() not in (1, 2) or mask.shape[-1] != self.num_heads:
            raise ValueError(
                f"keep mask for site {self.site_name!r} must be bool [{self.num_heads}] or "
                f"[batch, {self.num_heads}], got {mask.dtype} {tuple(mask.shape)}"
            )
        self.fixed_keep = mask.clone()
        # counted once here, on the host, so that compact_plan never waits for the device: the KV
        # groups the rows touch, and whether the rows are equal and keep whole groups
        rows = mask.reshape(-1, self.num_kv_heads, self.num_heads // self.num_kv_heads)
        groups = rows.any(-1)
        whole = bool((rows == groups[..., None]).all())
        self._fixed_plan = (int(groups.any(0).sum()), whole and bool((rows == rows[:1]).all()))
        self._fixed_row_plan = (max(int(groups.sum(-1).max()), 1), whole)
        self._fixed_heads = int(mask.reshape(-1, self.num_heads).any(0).sum())
        self._fixed_all = bool(mask.all())
        self._fixed_rows_apart = mask.dim() == 2 and not bool((mask == mask[:1]).all())

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
        units = scores.float()
        if group > 1:  # one unit per KV group; otherwise the mean over a size-1 dim is a wasted kernel
            units = units.reshape(batch, H // group, group).mean(-1)
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

    def per_row_bound(self) -> int:
        """The most heads ``decide`` keeps in one row under the budget (threshold or not)."""
        return min(self.num_heads, max(int(round(self.keep_ratio * self.num_heads)), self.min_heads))

    def _group_bounds(self) -> tuple[int, int, bool]:
        """(KV groups one row keeps at most, groups the batch vote keeps at most, whether rows keep
        whole groups), under the budget. Heads are the units for MHA (groups of one); with
        ``prune_kv_groups`` the budget counts groups; otherwise a row's kept heads fall in at
        most as many groups as there are heads."""
        H, kv = self.num_heads, self.num_kv_heads
        group = H // kv
        if self.prune_kv_groups:
            min_units = math.ceil(self.min_heads / group)
            per_row = min(kv, max(int(round(self.keep_ratio * kv)), min_units))
            union = kv if self.union_cap is None else min(kv, max(int(round(self.union_cap * kv)), min_units))
            return per_row, union, True
        return min(kv, self.per_row_bound()), min(kv, self._head_union_bound()), group == 1

    def _head_union_bound(self) -> int:
        """The most heads a batch vote (granularity "batch") keeps: every head unless union_cap."""
        H = self.num_heads
        return H if self.union_cap is None else min(H, max(int(round(self.union_cap * H)), self.min_heads))

    def compact_plan(self, batch: int) -> Optional[tuple[int, bool]]:
        """(cap, rows_shared) for this gate's last decision on a batch of ``batch`` rows: the kept
        heads of every row lie, together, in at most ``cap`` KV groups (heads, for MHA), and
        rows_shared says every row keeps the same, whole groups. None when the call must compute
        every head: the gate left tap work that reads q, k, v of every head, or a budget that
        keeps all.

        Read by the block module (dhp_fx.compact_block) after the gate ran; host state only."""
        if self._tap_work is not None:
            return None
        if self._buffers["fixed_keep"].numel():
            union, shared = self._fixed_plan
            return max(union, 1), shared
        if self.recording or (self.score_threshold is None and self.n_keep >= self.num_heads):
            return None
        per_row, union, whole = self._group_bounds()
        if self.granularity == "batch":
            return min(union, batch * per_row), whole
        return min(self.num_kv_heads, batch * per_row), whole and batch == 1

    def compact_head_plan(self, batch: int) -> Optional[tuple[int, bool]]:
        """(cap, rows_same) for a call that computes every KV group's K and V (GQA whose kept
        heads touch every group; a query chain, whose K/V something else reads): the rows' kept
        query heads lie, together, in at most ``cap`` heads, and rows_same says every row keeps
        the same heads. None when the call must compute every head (as for
        :meth:`compact_plan`) or when the bound is every head. Host state only."""
        if self._tap_work is not None:
            return None
        H = self.num_heads
        if self._buffers["fixed_keep"].numel():
            cap = self._fixed_heads
            return (max(cap, 1), not self._fixed_rows_apart) if cap < H else None
        if self.recording or (self.score_threshold is None and self.n_keep >= H):
            return None
        if self.prune_kv_groups:  # the budget counts whole groups, which bound the heads
            group = H // self.num_kv_heads
            per_row, union, _ = self._group_bounds()
            per_row, union = per_row * group, union * group
        else:
            per_row, union = self.per_row_bound(), self._head_union_bound()
        union = union if self.granularity == "batch" else H
        cap = min(union, batch * per_row)
        return (cap, batch == 1 or not self.decides_rows_apart()) if cap < H else None

    def compact_row_plan(self) -> Optional[tuple[int, bool]]:
        """(cap, whole) for a per-row compaction of this gate's last decision: no row's kept
        heads lie in more than ``cap`` KV groups, and whole says rows keep whole groups. None
        when the call must compute every head (as for :meth:`compact_plan`), or when rows share
        one decision (granularity "batch": a row keeps the batch's union, not its own budget).
        Host state only."""
        if self._tap_work is not None or (self.granularity == "batch" and not self._buffers["fixed_keep"].numel()):
            return None
        if self._buffers["fixed_keep"].numel():
            return self._fixed_row_plan
        if self.recording or (self.score_threshold is None and self.n_keep >= self.num_heads):
            return None
        per_row, _, whole = self._group_bounds()
        return per_row, whole

    def decides_rows_apart(self) -> bool:
        """Whether this gate's last decision may differ row by row (per-sample scoring, or a pinned
        [B, H] mask whose rows differ) and left no tap work that reads the heads' values. Then a
        block may compute every head densely and zero the pruned ones' outputs: the cheapest exact
        form where per-row compaction does not pay (dhp_fx.compact_block). Host state only."""
        if self._tap_work is not None or self.recording:
            return False
        if self._buffers["fixed_keep"].numel():
            return self._fixed_rows_apart
        return self.granularity == "sample"

    def keeps_every_head(self) -> bool:
        """Whether this gate's last decision kept every head of every row, from host state: a
        budget that keeps all (and no threshold), an all-true pinned mask, the straight-through
        estimator (every head runs; the tap weights them) or calibration recording before the
        projections. Then the head ops would compute exactly the dense block, only slower."""
        work = self._tap_work
        if work is not None and "ste" in work:
            return True
        if self._buffers["fixed_keep"].numel():
            return self._fixed_all
        if self.recording:
            return bool(work is not None and work.get("record"))
        return self.score_threshold is None and self.n_keep >= self.num_heads

    def decides_from_hidden(self) -> bool:
        """True when ``score`` needs only the layer input (``hidden``), never q, k or v."""
        return False

    @property
    def reads_qkv(self) -> bool:
        # Read by the projection-skipping pass at capture: False lets the gate run before the
        # Q/K/V projections (called with q = k = v = None), so pruned heads are never projected.
        return not self.decides_from_hidden()

    def soft_scores(self, q, k, v, attn_mask, hidden) -> Optional[torch.Tensor]:
        """Differentiable scores [B, H] in [0, 1] for the straight-through estimator, or None
        when this gate has nothing to learn (the default)."""
        return None

    def forward(self, q, k, v, attn_mask=None, hidden=None) -> torch.Tensor:
        ref = q if q is not None else hidden
        # a plain tensor that no functionalization wraps is real: skips is_fake's probes
        if (type(ref) is not torch.Tensor or torch._is_functional_tensor(ref)) and is_fake(ref):
            # A downstream compiler (aot_eager, inductor) is tracing the graph: hand it one opaque
            # op, so the gate's Python logic (budgets, lagged state, recording) runs for real at
            # every call and its buffers never meet fake tensors.
            return torch.ops.dhp.run_gate(q, k, v, attn_mask, hidden, _register(self))
        # Plain attribute writes and buffer reads: nn.Module's __setattr__/__getattr__ cost
        # several dict probes each, and a decoding step runs every gate between GEMMs that have
        # evicted those dicts from the cache (session 22: ~75 µs a gate call there, 16 µs warm).
        self.__dict__["_tap_work"] = None
        if self.ste and torch.is_grad_enabled() and not self._buffers["fixed_keep"].numel():
            keep = self._straight_through(q, k, v, attn_mask, hidden)
            if keep is not None:
                return keep
        keep = self.decide_eager(q, k, v, attn_mask, hidden)
        if self.capture_attention:
            self._want(keep=keep, attention=True)
        return keep

    def _want(self, **work) -> None:
        if self._tap_work is None:
            self._tap_work = {}
        self._tap_work.update(work)

    def _straight_through(self, q, k, v, attn_mask, hidden) -> Optional[torch.Tensor]:
        """Run every head and let the tap weight them so that the loss reaches the soft scores.

        "ste": weight hard + soft − soft.detach(): forward values are those of hard gating (pruned
        heads contribute exactly zero), the gradient reaches each head's score — pruned heads
        included, which is why every head must run while training. "relaxed": weight
        σ((soft − boundary)/T), boundary halfway between the lowest kept and highest pruned score
        (or the score threshold): a soft top-k, exact gradients of a forward that is not hard.
        """
        soft = self.soft_scores(q, k, v, attn_mask, hidden)
        if soft is None:
            return None
        hard = self.decide(soft.detach())
        self.last_budget_loss = self.budget_loss(soft)
        self._want(keep=hard, ste=soft, attention=self.capture_attention)
        ref = q if q is not None else hidden
        return torch.ones(ref.shape[0], self.num_heads, dtype=torch.bool, device=ref.device)

    relax_temperature = 0.05

    def _boundary(self, soft: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        """Per row, the score halfway between the lowest kept and the highest pruned head."""
        if self.score_threshold is not None:
            return soft.new_tensor(self.score_threshold)
        low_kept = soft.masked_fill(~hard, float("inf")).amin(-1, keepdim=True)
        high_pruned = soft.masked_fill(hard, float("-inf")).amax(-1, keepdim=True)
        low_kept = torch.where(torch.isfinite(low_kept), low_kept, high_pruned)
        high_pruned = torch.where(torch.isfinite(high_pruned), high_pruned, low_kept - 1.0)
        return 0.5 * (low_kept + high_pruned)

    def budget_loss(self, soft: torch.Tensor) -> torch.Tensor:
        """Squared gap between the soft keep fraction and the keep budget, per sample.

        Under a top-k budget it keeps the soft scores centred on the budget (so the straight-through
        gradient does not saturate the sigmoid); under a score threshold the soft count
        σ((S − t)/0.05) is what decides how many heads pass, so the penalty steers the budget.
        """
        p = soft.float()
        if self.score_threshold is not None:
            p = torch.sigmoid((p - self.score_threshold) / 0.05)
        target = min(1.0, self.n_keep / self.num_heads)
        return (p.mean(-1) - target).square().mean()

    @torch.no_grad()  # keep is boolean: nothing differentiable leaves the gate
    def decide_eager(self, q, k, v, attn_mask=None, hidden=None) -> torch.Tensor:
        ref = q if q is not None else hidden
        batch = ref.shape[0]
        if self._buffers["fixed_keep"].numel():
            fixed = self.fixed_keep.to(ref.device)
            if fixed.dim() == 2 and fixed.shape[0] != batch:
                raise ValueError(
                    f"keep mask for site {self.site_name!r} has {fixed.shape[0]} rows but the batch has {batch}"
                )
            keep = fixed.expand(batch, self.num_heads)
            if self.recording:
                self._record(None, keep)
            return keep
        if self.recording:
            if q is None:
                # Decided before the projections: score after the op from the real q and k, with
                # every head run so that the scores are those of the unpruned heads.
                self._want(record=True, hidden=hidden)
                return torch.ones(batch, self.num_heads, dtype=torch.bool, device=ref.device)
            scores = self.calibration_score(q, k, v, attn_mask, hidden)
            keep = self.decide(scores)
            self._record(scores, keep)
            return keep
        if self.score_threshold is None and self.n_keep >= self.num_heads:
            return self._all_kept(batch, ref.device)
        return self.decide(self.score(q, k, v, attn_mask, hidden))

    def _all_kept(self, batch: int, device) -> torch.Tensor:
        """Every head kept: a view of one cached row rather than a fill kernel per layer and call."""
        row = self.__dict__.get("_all_kept_row")
        if row is None or row.device != torch.device(device) or row.shape[-1] != self.num_heads:
            row = torch.ones(1, self.num_heads, dtype=torch.bool, device=device)
            self.__dict__["_all_kept_row"] = row
        return row.expand(batch, self.num_heads)

    def after_attention(self, out: torch.Tensor, q, k, v, attn_mask, work: dict) -> torch.Tensor:
        """The tap's work (see GateTap): runs once per call, after the op, with live q, k, v."""
        if work.get("record"):
            with torch.no_grad():
                scores = self.calibration_score(q, k, v, attn_mask, work.get("hidden"))
                self._record(scores, self.decide(scores))
        if work.get("attention"):
            self.last_attention = self.attention_map(q, k, attn_mask, work["keep"])
        soft = work.get("ste")
        if soft is not None:
            hard = work["keep"]
            if self.ste == "relaxed":
                gate = torch.sigmoid((soft - self._boundary(soft.detach(), hard)) / self.relax_temperature)
            else:
                gate = hard.to(soft.dtype) + (soft - soft.detach())
            out = out * gate.to(out.dtype)[:, :, None, None]
        return out

    def attention_map(self, q, k, attn_mask, keep) -> "AttentionCapture":
        """Log attention probabilities of every head (differentiable in q and k)."""
        causal = self.site.is_causal and q.shape[2] == k.shape[2]
        logp, allowed, n_keys = attention_log_probs(q, k, attn_mask, causal, self.site.scale)
        return AttentionCapture(logp, allowed, n_keys > 0, keep.detach())

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


class AttentionCapture(NamedTuple):
    """One site's attention maps from the last call: float32 log-probs [B, H, Lq, Lk], the keys
    each row may attend to (None: all), rows with at least one such key [B, H, Lq] (or
    broadcastable), and the keep mask [B, H] the call ran with."""

    log_probs: torch.Tensor
    allowed: Optional[torch.Tensor]
    row_valid: torch.Tensor
    keep: torch.Tensor


class GateTap(nn.Module):
    """Called by the rewritten graph right after the gated op: ``out = tap(out, q, k, v, mask)``.

    The identity unless the gate's last decision left work that needs the heads' values; that
    costs one Python call per site when idle. Holds its gate without registering it, so the
    gate's parameters are not counted twice.
    """

    def __init__(self, gate: HeadGate):
        super().__init__()
        object.__setattr__(self, "gate", gate)

    def forward(self, out, q, k, v, attn_mask=None):
        gate = self.gate
        work = gate._tap_work
        if work is None or is_fake(out):
            return out
        gate._tap_work = None
        return gate.after_attention(out, q, k, v, attn_mask, work)


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
def run_gate(q: Optional[torch.Tensor], k: Optional[torch.Tensor], v: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor],
             hidden: Optional[torch.Tensor], gate_id: int) -> torch.Tensor:
    """Call gate ``gate_id``'s eager decision from compiled code: bool [B, H]."""
    gate = _GATES.get(gate_id)
    if gate is None:
        raise RuntimeError(f"dhp::run_gate: gate {gate_id} no longer exists (its model was freed)")
    return gate.decide_eager(q, k, v, attn_mask, hidden).clone()


@run_gate.register_fake
def _(q, k, v, attn_mask, hidden, gate_id):
    gate = _GATES.get(gate_id)
    ref = q if q is not None else hidden
    heads = gate.num_heads if gate is not None else q.shape[1]
    return ref.new_empty((ref.shape[0], heads), dtype=torch.bool)


def build_gate(site: AttentionSite, config: DHPConfig, params: Optional[dict] = None) -> nn.Module:
    """The gate a site gets under ``config``; ``params`` maps parameter names to live tensors."""
    from .strategies import STRATEGIES

    gate = STRATEGIES[config.scoring](site, config, params or {})
    # Built on the CPU (a router's layers, statistics buffers); the gate runs beside the site's
    # weights, so it moves there: a CUDA model otherwise fails in the router's LayerNorm (seen on
    # an H100) or copies buffers across the bus on every call.
    device = next((t.device for t in (params or {}).values() if isinstance(t, torch.Tensor)), None)
    return gate.to(device) if device is not None and device.type != "meta" else gate
