"""The scoring strategies of ``DHPConfig.scoring``: how a gate gets S before the heads run.

All share ŵ (normalised weight norms, from the live parameters handed to ``build_gate``) and the
probe (entropy of a strided subset of query rows); they differ in what they pay per call:
probe ≈ probe_fraction of QKᵀ, router a tiny MLP, lagged one probe every lag_refresh calls,
static nothing.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch._subclasses.fake_tensor import is_fake

from .config import DHPConfig
from .gates import HeadGate
from .passes import AttentionSite
from .scoring import attention_entropy, combine_scores, head_weight_norms, normalize_per_site, probe_rows, query_padding


class ScoringGate(HeadGate):
    """A gate that scores heads with S = α·ŵ + (1 − α)·(1 − Ĥ)."""

    def __init__(self, site: AttentionSite, config: DHPConfig, params: Mapping[str, torch.Tensor]):
        super().__init__(site, config)
        self.alpha = float(config.alpha)
        self.probe_fraction = float(config.probe_fraction)
        self.sink_weight = float(config.sink_weight)
        # Plain dict, not parameters: the weights belong to the model, the gate only reads them.
        self._weights = {name: params[name] for name in self._weight_names() if name in params}
        self._weights_version = None
        self.register_buffer("w_hat", torch.ones(site.num_heads), persistent=False)
        self.refresh_weight_norms()

    def _weight_names(self) -> list[str]:
        refs = (self.site.q_proj, self.site.k_proj, self.site.v_proj, self.site.out_proj)
        return [r.weight for r in refs if r is not None]

    def _version(self):
        return tuple(getattr(w, "_version", 0) for w in self._weights.values())

    @torch.no_grad()
    def refresh_weight_norms(self, params: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        """Recompute ŵ from the weights (``params`` replaces the stored references); returns it."""
        if params is not None:
            self._weights = {name: params[name] for name in self._weight_names() if name in params}
        w = normalize_per_site(head_weight_norms(self.site, self._weights))
        self.w_hat = w.to(self.w_hat.device)
        self._weights_version = self._version()
        return self.w_hat

    def _fresh_w_hat(self) -> torch.Tensor:
        # Training (distillation) updates weights in place, which bumps their version counter.
        if not torch.compiler.is_compiling() and self._weights and self._version() != self._weights_version:
            self.refresh_weight_norms()
        return self._buffers["w_hat"]

    def entropy(self, q, k, attn_mask, all_rows: bool = False) -> torch.Tensor:
        """Ĥ [B, H] from the probe rows (or every row), padding queries left out; with
        ``sink_weight`` β, (1 − β)·Ĥ + β·(mass on the first key)."""
        B, _, Lq, _ = q.shape
        valid = None if self.site.cross_attention else query_padding(attn_mask, B, Lq, k.shape[2])
        rows = None if all_rows else probe_rows(Lq, self.probe_fraction, valid, q.device)
        # The site was described from its first graph; a decoding graph of the same site (one
        # query, a longer KV cache) runs without is_causal, so causality only holds at Lq == Lk.
        causal = self.site.is_causal and Lq == k.shape[2]
        if not self.sink_weight:
            return attention_entropy(q, k, attn_mask, causal, self.site.scale, rows, valid)
        entropy, sink = attention_entropy(q, k, attn_mask, causal, self.site.scale, rows, valid, return_first_mass=True)
        return (1.0 - self.sink_weight) * entropy + self.sink_weight * sink

    def probe_score(self, q, k, attn_mask, all_rows: bool = False) -> torch.Tensor:
        w_hat = self._fresh_w_hat()
        if self.alpha == 1.0:
            self._last_entropy = None
            return w_hat[None].expand(q.shape[0], -1).to(q.device)
        entropy = self.entropy(q, k, attn_mask, all_rows)
        self._last_entropy = entropy
        return combine_scores(w_hat, entropy, self.alpha)

    def score(self, q, k, v, attn_mask, hidden) -> torch.Tensor:
        return self.probe_score(q, k, attn_mask)


class ProbeGate(ScoringGate):
    """Entropy from ceil(probe_fraction · Lq) strided query rows (≥ 1)."""


class LaggedGate(ScoringGate):
    """For autoregressive decoding: gate each call with the entropy an earlier call measured.

    Every ``lag_refresh``-th call (and whenever the batch size changes) runs the probe and
    stores its entropy; the calls between reuse it, so they pay nothing for scoring. The call
    counter is Python state: use compiler="eager" (the default) or the count is traced once.
    """

    def __init__(self, site: AttentionSite, config: DHPConfig, params):
        super().__init__(site, config, params)
        self.lag_refresh = int(config.lag_refresh)
        self._calls = 0
        self.register_buffer("lag_entropy", torch.zeros(0, site.num_heads), persistent=False)

    def reset_lag(self) -> None:
        self._calls = 0
        self.lag_entropy = self.lag_entropy.new_zeros(0, self.num_heads)

    def score(self, q, k, v, attn_mask, hidden) -> torch.Tensor:
        w_hat = self._fresh_w_hat()
        if self.alpha == 1.0:
            return w_hat[None].expand(q.shape[0], -1).to(q.device)
        stale = self._calls % self.lag_refresh == 0 or self.lag_entropy.shape[0] != q.shape[0]
        self._calls += 1
        if stale:
            self.lag_entropy = self.entropy(q, k, attn_mask).detach()
        self._last_entropy = self.lag_entropy
        return combine_scores(w_hat, self.lag_entropy.to(q.device), self.alpha)


class StaticGate(ScoringGate):
    """One ranking for every input: ŵ alone until calibration, then the mean calibration score.

    While calibrating it scores (and decides) with the probe, so the recorded keep frequencies
    are those of dynamic gating; ``dhp_fx.calibrate`` then installs the mean score.
    """

    def __init__(self, site: AttentionSite, config: DHPConfig, params):
        super().__init__(site, config, params)
        self.register_buffer("static_scores", self.w_hat.clone())
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self._decision: Optional[tuple] = None  # (inputs it was decided from, keep [1, H])

    def set_static_scores(self, scores) -> None:
        scores = torch.as_tensor(scores, dtype=torch.float32).flatten()
        if scores.numel() != self.num_heads:
            raise ValueError(f"static scores of site {self.site_name!r} need {self.num_heads} values, got {scores.numel()}")
        self.static_scores = scores.to(self.static_scores.device)
        self.calibrated = torch.ones((), dtype=torch.bool, device=self.calibrated.device)

    def calibration_score(self, q, k, v, attn_mask, hidden) -> torch.Tensor:
        return self.probe_score(q, k, attn_mask)

    def decides_from_hidden(self) -> bool:
        return True

    def compact_plan(self, batch: int) -> Optional[tuple[int, bool]]:
        plan = super().compact_plan(batch)
        if plan is None or self._buffers["fixed_keep"].numel() or self.recording:
            return plan
        per_row, _, whole = self._group_bounds()
        return min(plan[0], per_row), whole  # one decision, handed to every row

    def compact_head_plan(self, batch: int) -> Optional[tuple[int, bool]]:
        if self._buffers["fixed_keep"].numel() or self.recording:
            return super().compact_head_plan(batch)
        return super().compact_head_plan(1)  # one decision, handed to every row: bounded as one row's

    def decides_rows_apart(self) -> bool:
        return bool(self._buffers["fixed_keep"].numel()) and super().decides_rows_apart()  # else one decision for all

    def score(self, q, k, v, attn_mask, hidden) -> torch.Tensor:
        self._last_entropy = None
        ref = q if q is not None else hidden
        # where(), not an if: traced gates must not branch on buffer values
        ranking = torch.where(self.calibrated, self.static_scores, self._fresh_w_hat())
        return ranking[None].expand(ref.shape[0], -1).to(ref.device)

    def decide_eager(self, q, k, v, attn_mask=None, hidden=None) -> torch.Tensor:
        """Every input gets the same heads: decide once, then hand out a view of that decision.

        Deciding costs a dozen small kernels (top-k, scatter, the batch vote) per layer and call,
        which on a GPU under CUDA graphs is a sizeable share of a short forward. The decision is
        kept while everything it depends on is unchanged: the scores (static, calibrated flag,
        ŵ: held, so their identity and version counters can be compared), the budget and the
        device. A pinned mask and calibration recording take the general path (no_grad: the
        base class's; the cached decision is boolean). Buffers are read from ``_buffers`` for
        the reason HeadGate.forward gives."""
        buffers = self._buffers
        if buffers["fixed_keep"].numel() or self.recording:
            return super().decide_eager(q, k, v, attn_mask, hidden)
        ref = q if q is not None else hidden
        w_hat = self._fresh_w_hat()
        scores, calibrated = buffers["static_scores"], buffers["calibrated"]
        tensors = (scores, calibrated, w_hat)
        key = ((scores._version, calibrated._version, w_hat._version), ref.device, self.keep_ratio, self.min_heads,
               self.score_threshold, self.union_cap, self.granularity, self.prune_kv_groups)
        cached = self._decision
        if (cached is None or cached[1] != key or cached[0][0] is not scores or cached[0][1] is not calibrated
                or cached[0][2] is not w_hat):
            keep = super().decide_eager(None, None, None, None, ref[:1])
            cached = self._decision = (tensors, key, keep)
        return cached[2].expand(ref.shape[0], self.num_heads)


def _router_kernels(x: torch.Tensor):
    """The Triton router module where it should serve a call on x, else None (CPU tensors,
    GPUs without the Triton path, DHP_FX_TRITON_ROUTER=0)."""
    if not x.is_cuda or os.environ.get("DHP_FX_TRITON_ROUTER", "1") == "0":
        return None
    from .kernels import triton_attention, triton_router

    return triton_router if triton_attention.triton_available(x.device) else None


_ACTIVATIONS = {"none": 1, "tanh": 2}  # nn.GELU(approximate=...) -> triton_router.ACT_GELU, ACT_GELU_TANH


def _fused_router_args(router: nn.Sequential) -> Optional[tuple]:
    """(ln weight, ln bias, eps, w1, b1, w2, b2, act) of a LayerNorm → Linear [→ GELU → Linear]
    router, the layout ``RouterGate`` builds; None for anything else (a user-replaced module)."""
    mods = list(router)
    if len(mods) not in (2, 4) or not isinstance(mods[0], nn.LayerNorm) or len(mods[0].normalized_shape) != 1:
        return None
    ln, first = mods[0], mods[1]
    if not isinstance(first, nn.Linear):
        return None
    w2 = b2 = None
    act = _ACTIVATIONS["none"]
    if len(mods) == 4:
        gelu, last = mods[2], mods[3]
        if type(gelu) is not nn.GELU or gelu.approximate not in _ACTIVATIONS or not isinstance(last, nn.Linear):
            return None
        act, w2, b2 = _ACTIVATIONS[gelu.approximate], last.weight, last.bias
    return ln.weight, ln.bias, ln.eps, first.weight, first.bias, w2, b2, act


def _router_width(args: tuple) -> int:
    """The hidden width of a router given as :func:`_fused_router_args` (0: no hidden layer)."""
    return args[3].shape[0] if args[5] is not None else 0


class RouterGate(ScoringGate):
    """A learned predictor of S from the site's input, pooled over tokens: sigmoid(MLP(mean x)).

    Starts out predicting α·ŵ + (1 − α)/2 for every input (the weight-norm ranking), and learns
    per-input scores through ``router_loss``. Without ``hidden`` (the projection input was not
    found) it falls back to the probe.
    """

    def __init__(self, site: AttentionSite, config: DHPConfig, params):
        super().__init__(site, config, params)
        d_in = self._input_dim(params)
        self.router: Optional[nn.Module] = None
        self.capture_loss = False
        self.last_router_loss: Optional[torch.Tensor] = None
        if d_in is None:
            return
        width = config.router_hidden
        last = nn.Linear(width or d_in, site.num_heads)
        self.router = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, width), nn.GELU(), last) if width else nn.Sequential(nn.LayerNorm(d_in), last)
        prior = (self.alpha * self.w_hat + (1 - self.alpha) * 0.5).clamp(0.02, 0.98)
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.logit(prior))

    def _input_dim(self, params) -> Optional[int]:
        ref = self.site.q_proj
        w = params.get(ref.weight) if ref is not None else None
        if w is None or w.dim() != 2:
            return None
        return int(w.shape[1] if ref.layout == "out_in" else w.shape[0])

    def predict(self, hidden: torch.Tensor, attn_mask=None, batch: Optional[int] = None) -> torch.Tensor:
        """Predicted S [B, H] from the layer input [B, ..., d]."""
        batch = hidden.shape[0] if batch is None else batch
        x = hidden.reshape(batch, -1, hidden.shape[-1])
        valid = query_padding(attn_mask, batch, x.shape[1], x.shape[1]) if not self.site.cross_attention else None
        fused = self._fused(x)
        if fused is not None:
            kernels, args = fused
            return kernels.router_scores_triton(x, valid, *args)
        # Sums accumulate in float32 without a float32 copy of the layer input: that copy is a full
        # write and read of the activations per layer. The 0/1 weights are exact in any dtype, so
        # the result is the float32 pooling's.
        if valid is not None:
            w = valid.to(x.device, x.dtype)[..., None]
            count = valid.to(x.device).sum(1, dtype=torch.float32)[..., None]
            pooled = (x * w).sum(1, dtype=torch.float32) / count.clamp_min(1.0)
        else:
            pooled = x.mean(1, dtype=torch.float32)
        return torch.sigmoid(self.router(pooled))

    @torch.no_grad()
    def decide_eager(self, q, k, v, attn_mask=None, hidden=None) -> torch.Tensor:
        """Per-sample top-k of the router's scores in the router's own launches where the budget
        is that simple (no threshold, heads as units), and a batch-shared decision's vote in one
        more; otherwise the general path."""
        if (hidden is not None and self.router is not None and not self._buffers["fixed_keep"].numel() and not self.recording
                and self.score_threshold is None and not self.prune_kv_groups and self.n_keep < self.num_heads):
            batch = hidden.shape[0] if q is None else q.shape[0]
            x = hidden.reshape(batch, -1, hidden.shape[-1])
            fused = self._fused(x)
            if fused is not None and fused[0].fuses_top_k(_router_width(fused[1]), self.num_heads):
                kernels, args = fused
                valid = None if self.site.cross_attention else query_padding(attn_mask, batch, x.shape[1], x.shape[1])
                self._last_entropy = None
                keep, scores = kernels.router_keep_triton(x, valid, self.n_keep, *args)
                if self.granularity != "batch":
                    return keep
                H, min_keep = self.num_heads, min(self.num_heads, self.min_heads)
                cap = H if self.union_cap is None else min(H, max(int(round(self.union_cap * H)), min_keep))
                return kernels.batch_vote_triton(keep, scores, cap, min_keep).expand(batch, H)
        return super().decide_eager(q, k, v, attn_mask, hidden)

    def _fused(self, x: torch.Tensor):
        """(kernel module, its arguments) when the two-launch Triton router may replace the torch
        ops for x: on a CUDA device with the Triton path, the router in RouterGate's own layout,
        and no gradient that could reach its parameters (router training keeps autograd)."""
        kernels = _router_kernels(x)
        if kernels is None or self.router is None:
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.router.parameters()):
            return None
        args = _fused_router_args(self.router)
        if args is None:
            return None
        if kernels.head_blocks(_router_width(args), self.num_heads) is None:
            return None
        return kernels, args

    def target_scores(self, q, k, attn_mask) -> torch.Tensor:
        """What the router learns to predict: S with the entropy of every query row."""
        with torch.no_grad():
            return self.probe_score(q, k, attn_mask, all_rows=True).float()

    def router_loss(self, q, k, v, attn_mask, hidden) -> torch.Tensor:
        """MSE between predicted and measured S; gradients reach the router only."""
        if self.router is None or hidden is None:
            raise RuntimeError(f"site {self.site_name!r} has no router (input projection not found)")
        return F.mse_loss(self.predict(hidden.detach(), attn_mask, q.shape[0]), self.target_scores(q, k, attn_mask))

    def decides_from_hidden(self) -> bool:
        return self.router is not None

    def soft_scores(self, q, k, v, attn_mask, hidden) -> Optional[torch.Tensor]:
        if self.router is None or hidden is None:
            return None
        return self.predict(hidden, attn_mask, None if q is None else q.shape[0])

    def forward(self, q, k, v, attn_mask=None, hidden=None) -> torch.Tensor:
        keep = super().forward(q, k, v, attn_mask, hidden)
        if self.capture_loss and self.router is not None and hidden is not None and not is_fake(keep):
            # The distillation loop sets capture_loss, runs the model (compiler="eager": compiled
            # graphs call gates without autograd) and sums last_router_loss. Computed at the tap,
            # where q and k exist even when this gate ran before the projections.
            self._want(router_loss=True, hidden=hidden)
        return keep

    def after_attention(self, out, q, k, v, attn_mask, work: dict) -> torch.Tensor:
        if work.get("router_loss") and not torch.is_inference_mode_enabled():
            with torch.enable_grad():
                self.last_router_loss = self.router_loss(q, k, v, attn_mask, work["hidden"])
        return super().after_attention(out, q, k, v, attn_mask, work)

    def score(self, q, k, v, attn_mask, hidden) -> torch.Tensor:
        if self.router is None or hidden is None:
            return self.probe_score(q, k, attn_mask)
        self._last_entropy = None
        return self.predict(hidden, attn_mask, None if q is None else q.shape[0]).detach()


STRATEGIES = {"probe": ProbeGate, "router": RouterGate, "lagged": LaggedGate, "static": StaticGate}
